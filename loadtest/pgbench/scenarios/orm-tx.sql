-- orm-tx: an order and its first item in one transaction, as an ORM writes them.
\set id random(1000000000, 9000000000000000000)
\set customer random(1, 10000 * :scale)
\set total random(100, 100000)
\set qty random(1, 5)
BEGIN;
INSERT INTO lt_orm_orders (id, customer_id, status, total_cents) VALUES (:id, :customer, 'new', :total);
INSERT INTO lt_orm_items (order_id, line, sku, qty) VALUES (:id, 1, 'sku-1', :qty);
COMMIT;
