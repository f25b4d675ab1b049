-- join-read: one customer's orders and their lines (15 rows).
\set c random(1, 10000 * :scale)
SELECT c.name, o.id, o.total_cents, l.line, l.sku, l.qty FROM lt_customers c JOIN lt_orders o ON o.customer_id = c.id JOIN lt_order_lines l ON l.order_id = o.id WHERE c.id = :c ORDER BY o.id, l.line;
