-- hot-counters: 100 hot keys whatever the scale.
DROP TABLE IF EXISTS lt_counters;
CREATE TABLE lt_counters (
    id bigint PRIMARY KEY,
    n  bigint NOT NULL DEFAULT 0
);
INSERT INTO lt_counters SELECT g, 0 FROM generate_series(1, 100) g;
ANALYZE lt_counters;
INSERT INTO lt_meta VALUES ('counters', :scale, md5(random()::text))
    ON CONFLICT (name) DO UPDATE SET scale = EXCLUDED.scale, dataset = EXCLUDED.dataset;
