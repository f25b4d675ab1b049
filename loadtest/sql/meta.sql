-- spillway-loadtest: which table groups are set up, at what scale. `dataset` is a
-- random id per setup: targets that read the same id share the same data (the
-- correctness check adds up what all of them wrote).
CREATE TABLE IF NOT EXISTS lt_meta (
    name    text PRIMARY KEY,
    scale   integer NOT NULL,
    dataset text NOT NULL
);
