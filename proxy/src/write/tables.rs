//! The deferred tables as PostgreSQL defines them, checked at startup: each configured
//! write-behind/write-back table must exist, be an ordinary table, have a primary key,
//! and not use row-level security (SPEC §6); a write-back table must not have foreign
//! keys (either side) or rules, whose effects depend on the order of different keys,
//! which write-back's folding does not keep. Loaded on the flush connection; the
//! result feeds the flush planner (`TableMeta`) and the statement checks of the write
//! path (key columns, column types, and the column facts a RowDescription of a
//! RETURNING answered locally gives).

use std::collections::{BTreeMap, HashMap};

pub use spillway_policies::engine::{Column, DeferredTable};
use spillway_policies::writes::TableMeta;
use spillway_policies::writes::order::ForeignKey;
use spillway_policies::writes::plan::ident;
use spillway_policies::{TableConfig, TableName};
use sqlx::{PgConnection, Row};

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error(
        "tables.\"{0}\": no such table in the backend database; deferred policies need an \
         existing ordinary table"
    )]
    Missing(TableName),
    #[error(
        "tables.\"{0}\": policy \"{1}\" needs a primary key (deferred writes are applied \
         per key); add one or use \"write-through\""
    )]
    NoPrimaryKey(TableName, spillway_policies::Policy),
    #[error(
        "tables.\"{0}\": policy \"{1}\" is refused on a table with row-level security \
         (the flusher's role would decide which rows a write reaches); use \"write-through\""
    )]
    RowSecurity(TableName, spillway_policies::Policy),
    #[error(
        "tables.\"{0}\": policy \"{1}\" is refused on a table with inheritance children \
         (a key is unique per table, not across them); use \"write-through\""
    )]
    Inherited(TableName, spillway_policies::Policy),
    #[error(
        "tables.\"{0}\": policy \"write-back\" is refused on a table with {1} (write-back \
         folds writes per key and applies different keys in any order, which a foreign key \
         or rule between rows can observe); use \"write-behind\", which keeps the order"
    )]
    OrderSensitive(TableName, String),
    #[error("tables.\"{0}\": is not an ordinary table (relkind {1}); use \"write-through\"")]
    NotATable(TableName, String),
    #[error("reading the catalog for the deferred tables: {0}")]
    Query(#[from] sqlx::Error),
}

/// Loads and checks every deferred table of `tables`.
pub async fn load(
    conn: &mut PgConnection,
    tables: &BTreeMap<TableName, TableConfig>,
) -> Result<HashMap<String, DeferredTable>, TableError> {
    let mut out = HashMap::new();
    for (name, config) in tables.iter().filter(|(_, c)| c.policy.is_deferred()) {
        let row = sqlx::query(
            "SELECT c.oid::int8, c.relkind::text, c.relrowsecurity \
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
        )
        .bind(&name.schema)
        .bind(&name.name)
        .fetch_optional(&mut *conn)
        .await?;
        let Some(row) = row else {
            return Err(TableError::Missing(name.clone()));
        };
        let oid: i64 = row.try_get(0)?;
        let relkind: String = row.try_get(1)?;
        let rls: bool = row.try_get(2)?;
        if relkind != "r" {
            return Err(TableError::NotATable(name.clone(), relkind));
        }
        if rls {
            return Err(TableError::RowSecurity(name.clone(), config.policy));
        }
        let children: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_inherits WHERE inhparent = $1::int8::oid)",
        )
        .bind(oid)
        .fetch_one(&mut *conn)
        .await?;
        if children {
            return Err(TableError::Inherited(name.clone(), config.policy));
        }
        if config.policy == spillway_policies::Policy::WriteBack {
            // Foreign keys in either direction (their actions and checks see rows in the
            // order the flusher applies them) and rules.
            let found: Option<String> = sqlx::query_scalar(
                "SELECT CASE \
                   WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_constraint \
                                WHERE contype = 'f' \
                                  AND (conrelid = $1::int8::oid OR confrelid = $1::int8::oid)) \
                     THEN 'a foreign key' \
                   WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_rewrite \
                                WHERE ev_class = $1::int8::oid AND rulename <> '_RETURN') \
                     THEN 'a rule' END",
            )
            .bind(oid)
            .fetch_one(&mut *conn)
            .await?;
            if let Some(what) = found {
                return Err(TableError::OrderSensitive(name.clone(), what));
            }
        }
        let columns = sqlx::query(
            "SELECT a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod), \
                    a.atttypid::int8, a.atttypmod, a.attnotnull, \
                    (a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> ''), \
                    a.attnum, t.typlen \
             FROM pg_catalog.pg_attribute a \
             JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
             WHERE a.attrelid = $1::int8::oid AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
        )
        .bind(oid)
        .fetch_all(&mut *conn)
        .await?;
        let key_rows = sqlx::query(
            "SELECT a.attname::text \
             FROM pg_catalog.pg_index i \
             CROSS JOIN LATERAL pg_catalog.unnest(i.indkey) WITH ORDINALITY AS k(attnum, pos) \
             JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = $1::int8::oid AND i.indisprimary \
             ORDER BY k.pos",
        )
        .bind(oid)
        .fetch_all(&mut *conn)
        .await?;
        if key_rows.is_empty() {
            return Err(TableError::NoPrimaryKey(name.clone(), config.policy));
        }
        let mut types = HashMap::new();
        let mut type_oids = HashMap::new();
        let mut typmods = HashMap::new();
        let mut required = Vec::new();
        let mut not_null = Vec::new();
        let mut described = Vec::with_capacity(columns.len());
        for c in &columns {
            let column: String = c.try_get(0)?;
            let ty: String = c.try_get(1)?;
            let ty_oid: i64 = c.try_get(2)?;
            let typmod: i32 = c.try_get(3)?;
            let notnull: bool = c.try_get(4)?;
            let has_default: bool = c.try_get(5)?;
            described.push(Column {
                name: column.clone(),
                attnum: c.try_get(6)?,
                type_oid: u32::try_from(ty_oid).unwrap_or(0),
                typlen: c.try_get(7)?,
                typmod,
            });
            if notnull {
                not_null.push(column.clone());
                if !has_default {
                    required.push(column.clone());
                }
            }
            typmods.insert(column.clone(), typmod);
            type_oids.insert(column.clone(), u32::try_from(ty_oid).unwrap_or(0));
            types.insert(column, ty);
        }
        let key = key_rows
            .iter()
            .map(|r| r.try_get::<String, _>(0))
            .collect::<Result<Vec<_>, _>>()?;
        // tgtype bits: 1 = ROW, 2 = BEFORE (INSTEAD OF is for views only).
        let rewrites_rows: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger \
                            WHERE tgrelid = $1::int8::oid AND NOT tgisinternal \
                              AND tgtype::int & 3 = 3) \
                 OR EXISTS (SELECT 1 FROM pg_catalog.pg_rewrite \
                            WHERE ev_class = $1::int8::oid AND rulename <> '_RETURN')",
        )
        .bind(oid)
        .fetch_one(&mut *conn)
        .await?;
        // Any trigger (not the internal ones of foreign keys) or rule: its INSERTs keep
        // journal order relative to other tables' (`policies::writes::order`).
        let plain: bool = sqlx::query_scalar(
            "SELECT NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger \
                                WHERE tgrelid = $1::int8::oid AND NOT tgisinternal) \
                AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_rewrite \
                                WHERE ev_class = $1::int8::oid AND rulename <> '_RETURN')",
        )
        .bind(oid)
        .fetch_one(&mut *conn)
        .await?;
        let parents = foreign_keys(conn, oid).await?;
        let pkey_name: String = sqlx::query_scalar(
            "SELECT conname::text FROM pg_catalog.pg_constraint \
             WHERE conrelid = $1::int8::oid AND contype = 'p'",
        )
        .bind(oid)
        .fetch_one(&mut *conn)
        .await?;
        let mut conditions = Vec::with_capacity(key.len());
        for (i, k) in key.iter().enumerate() {
            let ty = types.get(k).map_or("text", String::as_str);
            conditions.push(format!("{} = ${}::text::{ty}", ident(k), i + 1));
        }
        let exists_sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {}.{} WHERE {})",
            ident(&name.schema),
            ident(&name.name),
            conditions.join(" AND ")
        );
        let qualified = name.to_string();
        out.insert(
            qualified.clone(),
            DeferredTable {
                oid: u32::try_from(oid).unwrap_or(0),
                config: config.clone(),
                meta: TableMeta {
                    name: qualified,
                    schema: name.schema.clone(),
                    table: name.name.clone(),
                    key,
                    types,
                    coalesce: config.policy == spillway_policies::Policy::WriteBack,
                    plain,
                    parents,
                },
                type_oids,
                typmods,
                not_null,
                required,
                pkey_name,
                exists_sql,
                columns: described,
                rewrites_rows,
            },
        );
    }
    Ok(out)
}

/// The foreign keys of table `oid`: the referenced table (`schema.name`), its columns
/// and the referenced columns, in constraint order.
async fn foreign_keys(conn: &mut PgConnection, oid: i64) -> Result<Vec<ForeignKey>, TableError> {
    let rows = sqlx::query(
        "SELECT pn.nspname::text || '.' || pc.relname::text, \
                ARRAY(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY k(n, i) \
                      JOIN pg_catalog.pg_attribute a \
                        ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.i), \
                ARRAY(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY k(n, i) \
                      JOIN pg_catalog.pg_attribute a \
                        ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY k.i) \
         FROM pg_catalog.pg_constraint c \
         JOIN pg_catalog.pg_class pc ON pc.oid = c.confrelid \
         JOIN pg_catalog.pg_namespace pn ON pn.oid = pc.relnamespace \
         WHERE c.conrelid = $1::int8::oid AND c.contype = 'f' ORDER BY c.conname",
    )
    .bind(oid)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(ForeignKey {
                parent: r.try_get(0)?,
                columns: r.try_get(1)?,
                references: r.try_get(2)?,
            })
        })
        .collect()
}
