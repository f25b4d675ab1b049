-- write-insert: an append-mostly table keyed by client-generated ids; 10,000 rows per
-- scale unit to start with.
DROP TABLE IF EXISTS lt_events;
CREATE TABLE lt_events (
    id         bigint PRIMARY KEY,
    account_id bigint NOT NULL,
    kind       text NOT NULL,
    payload    text NOT NULL
);
INSERT INTO lt_events SELECT g, 1 + g % 1000, 'seed', 'x' FROM generate_series(1, 10000 * :scale) g;
ANALYZE lt_events;
INSERT INTO lt_meta VALUES ('events', :scale, md5(random()::text))
    ON CONFLICT (name) DO UPDATE SET scale = EXCLUDED.scale, dataset = EXCLUDED.dataset;
