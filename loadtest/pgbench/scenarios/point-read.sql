-- point-read: pgbench -S on spillway-loadtest's lt_accounts.
\set id random(1, 100000 * :scale)
SELECT balance FROM lt_accounts WHERE id = :id;
