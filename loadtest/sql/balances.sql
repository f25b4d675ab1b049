-- write-update: the same shape as lt_accounts, its own table so it can have its own
-- write policy. 100,000 rows per scale unit.
DROP TABLE IF EXISTS lt_balances;
CREATE TABLE lt_balances (
    id      bigint PRIMARY KEY,
    balance bigint NOT NULL,
    filler  char(84) NOT NULL DEFAULT ''
);
INSERT INTO lt_balances (id, balance) SELECT g, 0 FROM generate_series(1, 100000 * :scale) g;
ANALYZE lt_balances;
INSERT INTO lt_meta VALUES ('balances', :scale, md5(random()::text))
    ON CONFLICT (name) DO UPDATE SET scale = EXCLUDED.scale, dataset = EXCLUDED.dataset;
