//! spillway's own objects in the backend database: the embedded migrations of schema
//! `spillway` (`migrations/`, applied with sqlx's migrator, ADR 0008) and the
//! statement-level `spillway_invalidate` triggers that `spillway install-triggers` puts
//! on user tables for `cache.invalidation = "notify"` (SPEC §5, "Writes that bypass
//! spillway").
//!
//! Invariants:
//! - The migration record lives in `spillway._sqlx_migrations`, not in the public
//!   schema, so it cannot collide with an application that uses sqlx migrations too.
//! - Migrations run under sqlx's advisory lock, and the applied versions reported are
//!   read under that same lock, so two concurrent `migrate` runs never both claim one.
//! - Installing or dropping triggers is all or nothing: one transaction, and a listed
//!   table that does not exist aborts it before any trigger changes.
//! - Identifiers are always double-quoted ([`quote_ident`]), so mixed-case names and
//!   names with dots, quotes or spaces reach exactly the table they name.
//!
//! It is not: the LISTEN side. The service connection that consumes the notifications
//! belongs to the read cache.

use std::collections::BTreeSet;

use spillway_policies::TableName;
use sqlx::migrate::{Migrate, MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{Connection, Row};

use crate::config::BackendConfig;

/// The migrations in `migrations/`, embedded at compile time.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Name of the trigger on every user table; `CREATE OR REPLACE` makes installing twice
/// harmless.
pub const TRIGGER_NAME: &str = "spillway_invalidate";

/// The channel the trigger function notifies (see `migrations/0001_spillway_schema.sql`).
pub const CHANNEL: &str = "spillway_invalidate";

/// Schema that holds spillway's own objects and its migration record.
const SCHEMA: &str = "spillway";

/// What `migrate` and `install_triggers` can fail with.
///
/// sqlx's errors repeat their cause in their own message and again as their `source`,
/// so they are printed once, inside these messages, and not chained as sources: an
/// error chain printed with `{:#}` would otherwise show every cause twice.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("backend.url is not a usable PostgreSQL URL ({url}): {error}")]
    Url { url: String, error: sqlx::Error },
    /// Unreachable server, TLS refused under `sslmode=require`, authentication failed.
    #[error("connecting to PostgreSQL at {url}: {error}")]
    Connect { url: String, error: sqlx::Error },
    /// A migration failed (and was rolled back), or the applied ones no longer match
    /// the files embedded in this binary.
    #[error("migrating schema spillway: {0}")]
    Migrate(MigrateError),
    #[error("{what}: {error}")]
    Query { what: String, error: sqlx::Error },
    #[error("no such table: {}; no trigger was changed", list(.0))]
    TablesNotFound(Vec<TableName>),
    #[error("{table} is a {kind}, not a table; no trigger was changed")]
    NotATable {
        table: TableName,
        kind: &'static str,
    },
}

fn list(tables: &[TableName]) -> String {
    tables
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn query(what: impl Into<String>) -> impl FnOnce(sqlx::Error) -> SchemaError {
    let what = what.into();
    move |error| SchemaError::Query { what, error }
}

/// Applies every migration the database lacks; returns the versions applied by this
/// call, in order (empty when the schema was already up to date).
///
/// Connects with `url` as sqlx reads it (user, password, database, `sslmode`). A
/// migration that fails is rolled back and nothing after it runs.
pub async fn migrate(url: &str) -> Result<Vec<i64>, SchemaError> {
    let mut conn = connect(url).await?;
    let applied = migrate_on(&mut conn).await?;
    close(conn).await;
    Ok(applied)
}

/// Runs [`migrate`], then, in one transaction, creates (or with `drop`, removes) the
/// `spillway_invalidate` trigger on each of `tables`, or on every ordinary and
/// partitioned table outside `pg_catalog`, `information_schema`, `pg_toast*` and
/// `spillway` when `tables` is empty. Returns the tables acted on, sorted.
///
/// Partitions are tables too and get their own trigger: a statement that names a
/// partition fires only that partition's statement triggers, and its notification
/// carries the partition's OID. `CREATE TRIGGER` locks each table (SHARE ROW
/// EXCLUSIVE) until the transaction commits, so writers wait briefly.
pub async fn install_triggers(
    url: &str,
    tables: &[TableName],
    drop: bool,
) -> Result<Vec<TableName>, SchemaError> {
    let mut conn = connect(url).await?;
    migrate_on(&mut conn).await?;
    let mut tx = conn
        .begin()
        .await
        .map_err(query("starting the trigger transaction"))?;
    let targets = if tables.is_empty() {
        all_tables(&mut tx).await?
    } else {
        listed_tables(&mut tx, tables).await?
    };
    for table in &targets {
        let target = format!(
            "{}.{}",
            quote_ident(&table.schema),
            quote_ident(&table.name)
        );
        let (sql, what) = if drop {
            (
                format!("DROP TRIGGER IF EXISTS {TRIGGER_NAME} ON {target}"),
                format!("dropping trigger {TRIGGER_NAME} on {table}"),
            )
        } else {
            (
                format!(
                    "CREATE OR REPLACE TRIGGER {TRIGGER_NAME} \
                     AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {target} \
                     FOR EACH STATEMENT EXECUTE FUNCTION {SCHEMA}.notify_invalidate()"
                ),
                format!("creating trigger {TRIGGER_NAME} on {table}"),
            )
        };
        sqlx::raw_sql(&sql)
            .execute(&mut *tx)
            .await
            .map_err(query(what))?;
    }
    tx.commit()
        .await
        .map_err(query("committing the trigger transaction"))?;
    close(conn).await;
    Ok(targets)
}

async fn connect(url: &str) -> Result<PgConnection, SchemaError> {
    let redacted = BackendConfig {
        url: url.to_owned(),
        ..BackendConfig::default()
    }
    .redacted_url();
    let options: PgConnectOptions = url.parse().map_err(|error| SchemaError::Url {
        url: redacted.clone(),
        error,
    })?;
    PgConnection::connect_with(&options)
        .await
        .map_err(|error| SchemaError::Connect {
            url: redacted,
            error,
        })
}

/// Closing politely is a courtesy to the server; a failure here changes nothing
/// already committed.
async fn close(conn: PgConnection) {
    if let Err(err) = conn.close().await {
        tracing::debug!(%err, "closing the schema connection");
    }
}

async fn migrate_on(conn: &mut PgConnection) -> Result<Vec<i64>, SchemaError> {
    // sqlx creates `_sqlx_migrations` unqualified, so the search path decides where it
    // goes. The schema must exist before that table can be created in it; the first
    // migration creates it again (IF NOT EXISTS) so that it also documents it.
    // Advisory locks are re-entrant within a session: `MIGRATOR.run` takes the same
    // lock again and releases it once, and ours still covers both reads of the record.
    // The NOTICEs of every `IF NOT EXISTS` ("already exists, skipping") would reach the
    // log at INFO on each run; they say nothing an operator needs.
    conn.lock().await.map_err(SchemaError::Migrate)?;
    sqlx::raw_sql(
        "SET client_min_messages TO warning; \
         CREATE SCHEMA IF NOT EXISTS spillway; \
         SET search_path TO spillway",
    )
    .execute(&mut *conn)
    .await
    .map_err(query("creating schema spillway"))?;
    conn.ensure_migrations_table()
        .await
        .map_err(SchemaError::Migrate)?;
    let before: BTreeSet<i64> = applied_versions(conn).await?;
    MIGRATOR
        .run(&mut *conn)
        .await
        .map_err(SchemaError::Migrate)?;
    let after = applied_versions(conn).await?;
    conn.unlock().await.map_err(SchemaError::Migrate)?;
    let applied: Vec<i64> = after.difference(&before).copied().collect();
    for version in &applied {
        let description = MIGRATOR
            .iter()
            .find(|m| m.version == *version)
            .map(|m| m.description.as_ref())
            .unwrap_or_default();
        tracing::info!(version, description, "applied migration");
    }
    Ok(applied)
}

async fn applied_versions(conn: &mut PgConnection) -> Result<BTreeSet<i64>, SchemaError> {
    Ok(conn
        .list_applied_migrations()
        .await
        .map_err(SchemaError::Migrate)?
        .into_iter()
        .map(|m| m.version)
        .collect())
}

async fn all_tables(conn: &mut PgConnection) -> Result<Vec<TableName>, SchemaError> {
    // User schemas cannot start with `pg_` (it is reserved), so the LIKE also covers
    // pg_toast*, pg_temp_* and pg_toast_temp_*: other sessions' temporary tables.
    let rows = sqlx::query(
        "SELECT n.nspname::text, c.relname::text \
         FROM pg_catalog.pg_class c \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r', 'p') \
           AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'spillway') \
           AND n.nspname NOT LIKE 'pg\\_%' \
         ORDER BY 1, 2",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(query("listing tables"))?;
    rows.into_iter()
        .map(|row| {
            Ok(TableName {
                schema: row.try_get(0).map_err(query("listing tables"))?,
                name: row.try_get(1).map_err(query("listing tables"))?,
            })
        })
        .collect()
}

/// Checks that every listed table exists and is one a trigger can go on; deduplicated
/// and sorted.
async fn listed_tables(
    conn: &mut PgConnection,
    tables: &[TableName],
) -> Result<Vec<TableName>, SchemaError> {
    let tables: BTreeSet<&TableName> = tables.iter().collect();
    let mut missing = Vec::new();
    let mut wrong_kind = None;
    for table in &tables {
        let kind: Option<String> = sqlx::query_scalar(
            "SELECT c.relkind::text \
             FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
        )
        .bind(&table.schema)
        .bind(&table.name)
        .fetch_optional(&mut *conn)
        .await
        .map_err(query(format!("looking up table {table}")))?;
        match kind.as_deref() {
            None => missing.push((*table).clone()),
            Some("r" | "p") => {}
            Some(other) => {
                wrong_kind.get_or_insert(((*table).clone(), relkind_name(other)));
            }
        }
    }
    if !missing.is_empty() {
        return Err(SchemaError::TablesNotFound(missing));
    }
    if let Some((table, kind)) = wrong_kind {
        return Err(SchemaError::NotATable { table, kind });
    }
    Ok(tables.into_iter().cloned().collect())
}

fn relkind_name(relkind: &str) -> &'static str {
    match relkind {
        "v" => "view",
        "m" => "materialized view",
        "f" => "foreign table",
        "S" => "sequence",
        "i" | "I" => "index",
        "c" => "composite type",
        "t" => "TOAST table",
        _ => "relation of another kind",
    }
}

/// `ident` as a PostgreSQL quoted identifier: always double-quoted, inner `"` doubled.
/// Quoting even plain names is always correct and keeps case exactly as given.
pub fn quote_ident(ident: &str) -> String {
    let mut out = String::with_capacity(ident.len() + 2);
    out.push('"');
    for c in ident.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_ident_always_quotes_and_doubles_quotes() {
        assert_eq!(quote_ident("accounts"), "\"accounts\"");
        assert_eq!(quote_ident("LineItems"), "\"LineItems\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_ident("x.y z"), "\"x.y z\"");
        assert_eq!(quote_ident(""), "\"\"");
    }

    #[test]
    fn migrations_are_embedded_in_order() {
        let versions: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
        assert_eq!(versions.first(), Some(&1));
        assert!(versions.windows(2).all(|w| w[0] < w[1]));
        let first = MIGRATOR.iter().next().expect("one migration");
        assert_eq!(first.description, "spillway schema");
        assert!(first.sql.contains("spillway.notify_invalidate()"));
    }

    #[test]
    fn errors_name_the_tables() {
        let t = |s: &str| s.parse::<TableName>().expect("valid name");
        let err = SchemaError::TablesNotFound(vec![t("public.missing"), t("s.other")]);
        assert_eq!(
            err.to_string(),
            "no such table: public.missing, s.other; no trigger was changed"
        );
    }
}
