-- hot-counters: increments on 100 hot keys.
\set id random(1, 100)
UPDATE lt_counters SET n = n + 1 WHERE id = :id;
