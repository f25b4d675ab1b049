-- orm-tx: an order and its first line written in one transaction, as an ORM does;
-- empty to start with, keys chosen by the client.
DROP TABLE IF EXISTS lt_orm_items;
DROP TABLE IF EXISTS lt_orm_orders;
CREATE TABLE lt_orm_orders (
    id          bigint PRIMARY KEY,
    customer_id bigint NOT NULL,
    status      text NOT NULL,
    total_cents bigint NOT NULL
);
CREATE TABLE lt_orm_items (
    order_id bigint NOT NULL REFERENCES lt_orm_orders (id),
    line     integer NOT NULL,
    sku      text NOT NULL,
    qty      integer NOT NULL,
    PRIMARY KEY (order_id, line)
);
INSERT INTO lt_meta VALUES ('orm', :scale, md5(random()::text))
    ON CONFLICT (name) DO UPDATE SET scale = EXCLUDED.scale, dataset = EXCLUDED.dataset;
