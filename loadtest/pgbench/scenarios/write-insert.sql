-- write-insert: client-generated keys. pgbench has no per-client counter, so keys are
-- random 63-bit numbers above the seeded rows (a collision, about 1 in 10^7 per
-- million inserts, would end that client with 23505).
\set id random(1000000000, 9000000000000000000)
\set account random(1, 1000)
INSERT INTO lt_events (id, account_id, kind, payload) VALUES (:id, :account, 'click', 'pgbench');
