-- join-read: customers, their orders (5 each) and order lines (3 each); 10,000
-- customers per scale unit.
DROP TABLE IF EXISTS lt_order_lines;
DROP TABLE IF EXISTS lt_orders;
DROP TABLE IF EXISTS lt_customers;
CREATE TABLE lt_customers (
    id     bigint PRIMARY KEY,
    name   text NOT NULL,
    region text NOT NULL
);
CREATE TABLE lt_orders (
    id          bigint PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES lt_customers (id),
    total_cents bigint NOT NULL
);
CREATE INDEX lt_orders_customer ON lt_orders (customer_id);
CREATE TABLE lt_order_lines (
    order_id    bigint NOT NULL REFERENCES lt_orders (id),
    line        integer NOT NULL,
    sku         text NOT NULL,
    qty         integer NOT NULL,
    price_cents integer NOT NULL,
    PRIMARY KEY (order_id, line)
);
INSERT INTO lt_customers SELECT g, 'customer ' || g, 'region ' || (g % 20)
    FROM generate_series(1, 10000 * :scale) g;
INSERT INTO lt_orders SELECT g, 1 + (g - 1) / 5, 1000 + g % 5000
    FROM generate_series(1, 50000 * :scale) g;
INSERT INTO lt_order_lines SELECT o, l, 'sku-' || ((o * 7 + l) % 1000), 1 + l, 100 * l
    FROM generate_series(1, 50000 * :scale) o, generate_series(1, 3) l;
ANALYZE lt_customers;
ANALYZE lt_orders;
ANALYZE lt_order_lines;
INSERT INTO lt_meta VALUES ('shop', :scale, md5(random()::text))
    ON CONFLICT (name) DO UPDATE SET scale = EXCLUDED.scale, dataset = EXCLUDED.dataset;
