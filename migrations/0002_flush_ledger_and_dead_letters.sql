-- The flush ledger and the dead-letter table of the deferred write policies (SPEC §6,
-- "Exactly once" and "Failures at apply time").
--
-- Applied by `spillway migrate` and, before serving any deferred table, by `spillway
-- run` itself. Never edit once released; add a higher-numbered file instead.

-- One row per journal. Every upstream batch transaction of the flush worker advances
-- its row with a compare-and-set on (journal_id, epoch, last_seq) in the same
-- transaction that applies the batch, so a batch is applied exactly once: a replay
-- after a crash skips every record up to last_seq, and a journal opened again (a new
-- epoch) fences the previous owner, whose next compare-and-set matches no row.
CREATE TABLE IF NOT EXISTS spillway.flush_ledger (
    journal_id text PRIMARY KEY,
    epoch bigint NOT NULL,
    last_seq bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);

COMMENT ON TABLE spillway.flush_ledger IS
    'spillway: last journal sequence number applied upstream, per journal and epoch';

-- Writes spillway acknowledged but PostgreSQL refused at apply time (a constraint
-- violation, a type error, a key that was not there). Inserted in the same transaction
-- that applies the rest of their batch, so a dead letter and its batch's other writes
-- commit together or not at all.
CREATE TABLE IF NOT EXISTS spillway.dead_letters (
    id bigserial PRIMARY KEY,
    journal_id text NOT NULL,
    seq bigint NOT NULL,
    table_name text NOT NULL,
    -- The statement shape (no values), e.g. `UPDATE public.t SET n = n + ? WHERE <key> = ?`.
    statement text NOT NULL,
    -- Every value of the operation as text, key first; NULL elements are SQL NULLs.
    parameters text[] NOT NULL,
    sqlstate text NOT NULL,
    message text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);

CREATE INDEX IF NOT EXISTS dead_letters_table_created
    ON spillway.dead_letters (table_name, created_at);

COMMENT ON TABLE spillway.dead_letters IS
    'spillway: deferred writes PostgreSQL refused at apply time, with SQLSTATE and message';
