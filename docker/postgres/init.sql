-- The example schema of docker/compose.yml, run once by the postgres image when its
-- data volume is new (/docker-entrypoint-initdb.d). docker/spillway.toml defers
-- writes to public.events, and spillway checks at startup that a deferred table
-- exists, is an ordinary table with a primary key, and has no row-level security.

CREATE TABLE public.events (
    id bigint PRIMARY KEY,
    kind text NOT NULL,
    payload text,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE public.accounts (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    balance numeric NOT NULL DEFAULT 0
);

INSERT INTO public.accounts (id, name, balance)
SELECT n, 'account ' || n, n * 10
FROM generate_series(1, 100) AS n;
