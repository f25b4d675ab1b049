-- point-read, read-mostly: pgbench_accounts' shape, 100,000 rows per scale unit.
DROP TABLE IF EXISTS lt_accounts;
CREATE TABLE lt_accounts (
    id      bigint PRIMARY KEY,
    balance bigint NOT NULL,
    filler  char(84) NOT NULL DEFAULT ''
);
INSERT INTO lt_accounts (id, balance) SELECT g, 0 FROM generate_series(1, 100000 * :scale) g;
ANALYZE lt_accounts;
INSERT INTO lt_meta VALUES ('accounts', :scale, md5(random()::text))
    ON CONFLICT (name) DO UPDATE SET scale = EXCLUDED.scale, dataset = EXCLUDED.dataset;
