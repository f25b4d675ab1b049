-- write-update: UPDATE by key.
\set id random(1, 100000 * :scale)
\set delta random(1, 100)
UPDATE lt_balances SET balance = balance + :delta WHERE id = :id;
