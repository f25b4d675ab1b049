-- read-mostly: 95% point reads, 5% updates by key on lt_accounts.
\set id random(1, 100000 * :scale)
\set r random(1, 100)
\set delta random(1, 100)
\if :r <= 5
UPDATE lt_accounts SET balance = balance + :delta WHERE id = :id;
\else
SELECT balance FROM lt_accounts WHERE id = :id;
\endif
