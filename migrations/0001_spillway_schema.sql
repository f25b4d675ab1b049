-- spillway's own schema and the trigger function behind cache.invalidation = "notify"
-- (SPEC §5, "Writes that bypass spillway").
--
-- Applied by `spillway migrate` (and first thing by `spillway install-triggers`) through
-- sqlx's migrator, inside one transaction. Never edit this file once released: the
-- migrator stores its checksum and refuses to run when an applied migration changed.
-- Add a new, higher-numbered file instead.

-- Everything spillway creates in the backend database lives here, apart from the
-- per-table triggers themselves, which must sit on the user's tables. spillway also
-- keeps its migration record here (spillway._sqlx_migrations), not in the public
-- schema, so it cannot collide with an application that uses sqlx migrations too.
CREATE SCHEMA IF NOT EXISTS spillway;

COMMENT ON SCHEMA spillway IS
    'spillway caching proxy: migration record, invalidation trigger function';

-- Called by the statement-level trigger `spillway_invalidate` that
-- `spillway install-triggers` puts on user tables (AFTER INSERT OR UPDATE OR DELETE OR
-- TRUNCATE ... FOR EACH STATEMENT). It tells every LISTENer on channel
-- `spillway_invalidate` which table changed.
--
-- The payload is the table's OID in decimal text: spillway's cache identifies tables by
-- OID, so renames and search_path do not matter, and the payload stays far below
-- NOTIFY's 8000-byte limit.
--
-- One notification per statement, not per row (the trigger is FOR EACH STATEMENT), and
-- PostgreSQL folds identical notifications of one transaction into one. Notifications
-- are delivered at COMMIT, so a rolled-back write never invalidates anything.
--
-- pg_notify is schema-qualified so that a function of the same name elsewhere on the
-- caller's search_path can never be picked up. The return value of an AFTER ... FOR
-- EACH STATEMENT trigger is ignored; NULL is the convention.
CREATE OR REPLACE FUNCTION spillway.notify_invalidate()
    RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_catalog.pg_notify('spillway_invalidate', TG_RELID::oid::text);
    RETURN NULL;
END;
$$;

COMMENT ON FUNCTION spillway.notify_invalidate() IS
    'Trigger function: NOTIFY spillway_invalidate with the changed table''s OID';
