-- mixed-session: one row per user session; each client owns its own rows. 10,000
-- rows per scale unit.
DROP TABLE IF EXISTS lt_sessions;
CREATE TABLE lt_sessions (
    id      bigint PRIMARY KEY,
    data    text NOT NULL,
    version bigint NOT NULL
);
INSERT INTO lt_sessions SELECT g, 'new', 0 FROM generate_series(1, 10000 * :scale) g;
ANALYZE lt_sessions;
INSERT INTO lt_meta VALUES ('sessions', :scale, md5(random()::text))
    ON CONFLICT (name) DO UPDATE SET scale = EXCLUDED.scale, dataset = EXCLUDED.dataset;
