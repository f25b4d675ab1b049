-- mixed-session: a user session writes its own row, then reads it back. Client c owns
-- the rows with (id - 1) % clients = c (run with -D clients=N, N = pgbench -c).
\set sid 1 + :client_id + :clients * random(0, 10000 * :scale / :clients - 1)
\set token random(1, 1000000000)
UPDATE lt_sessions SET data = :token, version = version + 1 WHERE id = :sid;
SELECT data FROM lt_sessions WHERE id = :sid;
