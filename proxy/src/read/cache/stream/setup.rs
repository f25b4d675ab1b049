//! What the change stream needs in PostgreSQL, checked and created: `wal_level =
//! logical`, a role with REPLICATION (or superuser), the publication (`FOR ALL
//! TABLES` when spillway creates it) covering every cached table, and the database's
//! logical slot (pgoutput). `spillway migrate` creates them, `spillway
//! drop-replication` removes them, and with `replication.create` a start creates what
//! is missing.
//!
//! Invariant: every error names the fix. Names are checked by the config
//! (`[a-z0-9_]`), so they are quoted but never need escaping.

use sqlx::{PgConnection, Row};

use crate::config::ReplicationConfig;

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(
        "wal_level is {0}, the change stream needs logical: set wal_level = logical in \
         postgresql.conf (ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL"
    )]
    WalLevel(String),
    #[error(
        "role {0} may not use replication slots: ALTER ROLE {0} REPLICATION (or use a \
         superuser in backend.url)"
    )]
    Privilege(String),
    #[error(
        "publication {0} does not exist: run `spillway migrate`, or set replication.create = \
         true, or CREATE PUBLICATION {0} FOR ALL TABLES"
    )]
    NoPublication(String),
    #[error(
        "replication slot {0} does not exist: run `spillway migrate`, or set \
         replication.create = true"
    )]
    NoSlot(String),
    #[error(
        "publication {publication} does not cover cached tables {}: ALTER PUBLICATION \
         {publication} ADD TABLE …, or recreate it FOR ALL TABLES (unlogged tables are never \
         published: ALTER TABLE … SET LOGGED)",
        tables.join(", ")
    )]
    NotCovered {
        publication: String,
        tables: Vec<String>,
    },
    #[error(
        "publication {publication} does not publish {missing}: ALTER PUBLICATION \
         {publication} SET (publish = 'insert, update, delete, truncate')"
    )]
    NotPublishing {
        publication: String,
        missing: String,
    },
    #[error("{what}: {error}")]
    Query {
        what: &'static str,
        error: sqlx::Error,
    },
}

fn q(what: &'static str) -> impl FnOnce(sqlx::Error) -> SetupError {
    move |error| SetupError::Query { what, error }
}

/// Checks (and with `create`, creates) the stream's prerequisites on `conn`'s database.
pub async fn check(
    conn: &mut PgConnection,
    publication: &str,
    slot: &str,
    create: bool,
) -> Result<(), SetupError> {
    let level: String = sqlx::query_scalar("SELECT current_setting('wal_level')")
        .fetch_one(&mut *conn)
        .await
        .map_err(q("reading wal_level"))?;
    if level != "logical" {
        return Err(SetupError::WalLevel(level));
    }
    let (role, allowed): (String, bool) = sqlx::query_as(
        "SELECT rolname::text, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(q("reading the role's privileges"))?;
    if !allowed {
        return Err(SetupError::Privilege(role));
    }
    if !exists(
        conn,
        "SELECT 1 FROM pg_publication WHERE pubname = $1",
        publication,
    )
    .await?
    {
        if !create {
            return Err(SetupError::NoPublication(publication.to_owned()));
        }
        create_publication(conn, publication).await?;
    }
    coverage(conn, publication).await?;
    if !exists(
        conn,
        "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
        slot,
    )
    .await?
    {
        if !create {
            return Err(SetupError::NoSlot(slot.to_owned()));
        }
        create_slot(conn, slot).await?;
    }
    Ok(())
}

async fn exists(
    conn: &mut PgConnection,
    sql: &'static str,
    name: &str,
) -> Result<bool, SetupError> {
    Ok(sqlx::query(sql)
        .bind(name)
        .fetch_optional(&mut *conn)
        .await
        .map_err(q("looking up the publication or slot"))?
        .is_some())
}

/// Every ordinary table outside spillway's and the system's schemas must have its
/// changes published: an unlogged table or one left out of the publication is an
/// error (its writes would never be seen).
pub async fn coverage(conn: &mut PgConnection, publication: &str) -> Result<(), SetupError> {
    let actions: Option<(bool, bool, bool, bool)> = sqlx::query_as(
        "SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication \
         WHERE pubname = $1",
    )
    .bind(publication)
    .fetch_optional(&mut *conn)
    .await
    .map_err(q("reading the publication"))?;
    let Some((insert, update, delete, truncate)) = actions else {
        return Err(SetupError::NoPublication(publication.to_owned()));
    };
    let missing: Vec<&str> = [
        (insert, "insert"),
        (update, "update"),
        (delete, "delete"),
        (truncate, "truncate"),
    ]
    .into_iter()
    .filter(|(on, _)| !on)
    .map(|(_, action)| action)
    .collect();
    if !missing.is_empty() {
        return Err(SetupError::NotPublishing {
            publication: publication.to_owned(),
            missing: missing.join(", "),
        });
    }
    let rows = sqlx::query(
        "SELECT format('%I.%I', n.nspname, c.relname) AS name FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind = 'r' AND c.relpersistence <> 't' \
           AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'spillway') \
           AND n.nspname NOT LIKE 'pg\\_%' \
           AND (c.relpersistence = 'u' OR NOT EXISTS (\
                SELECT 1 FROM pg_publication_tables p \
                WHERE p.pubname = $1 AND p.schemaname = n.nspname AND p.tablename = c.relname)) \
         ORDER BY 1 LIMIT 20",
    )
    .bind(publication)
    .fetch_all(&mut *conn)
    .await
    .map_err(q("checking the publication's tables"))?;
    if rows.is_empty() {
        return Ok(());
    }
    Err(SetupError::NotCovered {
        publication: publication.to_owned(),
        tables: rows
            .iter()
            .filter_map(|r| r.try_get::<String, _>("name").ok())
            .collect(),
    })
}

pub async fn create_publication(
    conn: &mut PgConnection,
    publication: &str,
) -> Result<(), SetupError> {
    sqlx::query(&format!(
        "CREATE PUBLICATION \"{publication}\" FOR ALL TABLES"
    ))
    .execute(&mut *conn)
    .await
    .map_err(q(
        "creating the publication (FOR ALL TABLES needs a superuser)",
    ))?;
    tracing::info!(publication, "publication created");
    Ok(())
}

pub async fn create_slot(conn: &mut PgConnection, slot: &str) -> Result<(), SetupError> {
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(slot)
        .execute(&mut *conn)
        .await
        .map_err(q("creating the replication slot"))?;
    tracing::info!(slot, "replication slot created");
    Ok(())
}

/// The slot at the current position: dropped (when it exists) and created again.
pub async fn recreate_slot(conn: &mut PgConnection, slot: &str) -> Result<(), SetupError> {
    drop_slot(conn, slot).await?;
    create_slot(conn, slot).await
}

/// Drops the slot when it exists; true when it did.
pub async fn drop_slot(conn: &mut PgConnection, slot: &str) -> Result<bool, SetupError> {
    let dropped = sqlx::query(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(&mut *conn)
    .await
    .map_err(q("dropping the replication slot"))?;
    Ok(dropped.is_some())
}

/// Drops the publication when it exists; true when it did.
pub async fn drop_publication(
    conn: &mut PgConnection,
    publication: &str,
) -> Result<bool, SetupError> {
    let existed = exists(
        conn,
        "SELECT 1 FROM pg_publication WHERE pubname = $1",
        publication,
    )
    .await?;
    sqlx::query(&format!("DROP PUBLICATION IF EXISTS \"{publication}\""))
        .execute(&mut *conn)
        .await
        .map_err(q("dropping the publication"))?;
    Ok(existed)
}

/// Connects to the backend database of `url` (sqlx, like the service connections).
async fn connect(url: &str) -> Result<(PgConnection, String), SetupError> {
    use sqlx::ConnectOptions;
    let options: sqlx::postgres::PgConnectOptions =
        url.parse().map_err(q("parsing backend.url"))?;
    let database = options
        .get_database()
        .map(str::to_owned)
        .or_else(|| options.get_username().to_owned().into())
        .unwrap_or_default();
    let conn = options
        .application_name("spillway replication setup")
        .connect()
        .await
        .map_err(q("connecting to PostgreSQL"))?;
    Ok((conn, database))
}

/// At start: the backend database can be followed (created what is missing when
/// `replication.create`). Errors name the fix.
pub async fn check_backend(url: &str, config: &ReplicationConfig) -> Result<(), SetupError> {
    let (mut conn, database) = connect(url).await?;
    check(
        &mut conn,
        &config.publication,
        &config.slot_for(&database),
        config.create,
    )
    .await
}

/// `spillway migrate` with replication: the publication and the backend database's
/// slot; what already exists is kept. Returns what was created.
pub async fn create_backend(
    url: &str,
    config: &ReplicationConfig,
) -> Result<Vec<String>, SetupError> {
    let (mut conn, database) = connect(url).await?;
    let slot = config.slot_for(&database);
    check(&mut conn, &config.publication, &slot, false)
        .await
        .or_else(|e| match e {
            SetupError::NoPublication(_) | SetupError::NoSlot(_) => Ok(()),
            e => Err(e),
        })?;
    let mut created = Vec::new();
    if !exists(
        &mut conn,
        "SELECT 1 FROM pg_publication WHERE pubname = $1",
        &config.publication,
    )
    .await?
    {
        create_publication(&mut conn, &config.publication).await?;
        created.push(format!("publication {}", config.publication));
    }
    if !exists(
        &mut conn,
        "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
        &slot,
    )
    .await?
    {
        create_slot(&mut conn, &slot).await?;
        created.push(format!("replication slot {slot}"));
    }
    Ok(created)
}

/// `spillway drop-replication`: the backend database's slot and the publication.
/// Returns what was dropped.
pub async fn drop_backend(
    url: &str,
    config: &ReplicationConfig,
) -> Result<Vec<String>, SetupError> {
    let (mut conn, database) = connect(url).await?;
    let slot = config.slot_for(&database);
    let mut dropped = Vec::new();
    if drop_slot(&mut conn, &slot).await? {
        dropped.push(format!("replication slot {slot}"));
    }
    if drop_publication(&mut conn, &config.publication).await? {
        dropped.push(format!("publication {}", config.publication));
    }
    Ok(dropped)
}
