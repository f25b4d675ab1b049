//! The catalog facts of one table, asked one question at a time (sqlx): what the
//! write side checks a deferred table against (`write/tables.rs`: kind, row security,
//! inheritance children, foreign keys and rules, primary key) and what its write path
//! needs (columns with their types and RowDescription facts, triggers, foreign keys).
//! Every catalog query spillway runs is in this module or in `load.rs`; the write
//! side asks here and never queries the catalog itself.
//!
//! Tables are identified by OID after [`relation`] found them: a name would need
//! quoting, and could match another table after a rename.

use sqlx::postgres::types::Oid;
use sqlx::{PgConnection, Row};

use spillway_policies::writes::order::ForeignKey;

/// What `pg_class` says of a table found by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationFacts {
    pub oid: u32,
    /// `pg_class.relkind` (`r` for an ordinary table).
    pub relkind: String,
    pub row_security: bool,
}

/// A column as `pg_attribute`/`pg_type` give it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnFacts {
    pub name: String,
    /// `format_type(atttypid, atttypmod)`.
    pub type_name: String,
    pub type_oid: u32,
    pub typmod: i32,
    pub not_null: bool,
    /// A default, an identity or a generated column: an INSERT may leave it out.
    pub has_default: bool,
    pub attnum: i16,
    /// `pg_type.typlen` (-1 variable, -2 C string).
    pub typlen: i16,
    /// The column's default expression as `pg_get_expr` prints it (not for identity
    /// or generated columns).
    pub default_expr: Option<String>,
    /// `attidentity` (`a` always, `d` by default, empty: not an identity column).
    pub identity: String,
    /// The column's type is an enum (`pg_type.typtype = 'e'`): its labels, in sort
    /// order (a value prints as its label, and only a label is accepted as input).
    pub enum_labels: Option<Vec<String>>,
    /// A generated (computed) column: an INSERT may not give it a value.
    pub generated: bool,
}

fn oid(relation: u32) -> Oid {
    Oid(relation)
}

/// The relation `schema.name`, if it exists.
pub async fn relation(
    conn: &mut PgConnection,
    schema: &str,
    name: &str,
) -> Result<Option<RelationFacts>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT c.oid, c.relkind::text, c.relrowsecurity \
         FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relname = $2",
    )
    .bind(schema)
    .bind(name)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|row| {
        Ok(RelationFacts {
            oid: row.try_get::<Oid, _>(0)?.0,
            relkind: row.try_get(1)?,
            row_security: row.try_get(2)?,
        })
    })
    .transpose()
}

/// Whether the table has inheritance children (or partitions).
pub async fn has_children(conn: &mut PgConnection, table: u32) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_inherits WHERE inhparent = $1)")
        .bind(oid(table))
        .fetch_one(&mut *conn)
        .await
}

/// What makes the table's writes order-sensitive across keys, if anything: `"a
/// foreign key"` in either direction (its actions and checks see rows in the order
/// they are applied), else `"a rule"`.
pub async fn order_sensitive(
    conn: &mut PgConnection,
    table: u32,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT CASE \
           WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_constraint \
                        WHERE contype = 'f' AND (conrelid = $1 OR confrelid = $1)) \
             THEN 'a foreign key' \
           WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_rewrite \
                        WHERE ev_class = $1 AND rulename <> '_RETURN') \
             THEN 'a rule' END",
    )
    .bind(oid(table))
    .fetch_one(&mut *conn)
    .await
}

/// Every column, in table order.
pub async fn columns(conn: &mut PgConnection, table: u32) -> Result<Vec<ColumnFacts>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod), \
                a.atttypid, a.atttypmod, a.attnotnull, \
                (a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> ''), \
                a.attnum, t.typlen, \
                (SELECT pg_catalog.pg_get_expr(d.adbin, d.adrelid) \
                 FROM pg_catalog.pg_attrdef d \
                 WHERE d.adrelid = a.attrelid AND d.adnum = a.attnum \
                   AND a.attgenerated = ''), \
                a.attidentity::text, a.attgenerated <> '', \
                CASE WHEN t.typtype = 'e' THEN ARRAY( \
                    SELECT e.enumlabel::text FROM pg_catalog.pg_enum e \
                    WHERE e.enumtypid = t.oid ORDER BY e.enumsortorder) END \
         FROM pg_catalog.pg_attribute a \
         JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
         WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped \
         ORDER BY a.attnum",
    )
    .bind(oid(table))
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|c| {
            Ok(ColumnFacts {
                name: c.try_get(0)?,
                type_name: c.try_get(1)?,
                type_oid: c.try_get::<Oid, _>(2)?.0,
                typmod: c.try_get(3)?,
                not_null: c.try_get(4)?,
                has_default: c.try_get(5)?,
                attnum: c.try_get(6)?,
                typlen: c.try_get(7)?,
                default_expr: c.try_get(8)?,
                identity: c.try_get(9)?,
                generated: c.try_get(10)?,
                enum_labels: c.try_get(11)?,
            })
        })
        .collect()
}

/// The primary key's columns in key order (empty: none) and its constraint's name.
pub async fn primary_key(
    conn: &mut PgConnection,
    table: u32,
) -> Result<(Vec<String>, Option<String>), sqlx::Error> {
    let key = sqlx::query_scalar(
        "SELECT a.attname::text \
         FROM pg_catalog.pg_index i \
         CROSS JOIN LATERAL pg_catalog.unnest(i.indkey) WITH ORDINALITY AS k(attnum, pos) \
         JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
         WHERE i.indrelid = $1 AND i.indisprimary \
         ORDER BY k.pos",
    )
    .bind(oid(table))
    .fetch_all(&mut *conn)
    .await?;
    if key.is_empty() {
        return Ok((key, None));
    }
    let name = sqlx::query_scalar(
        "SELECT conname::text FROM pg_catalog.pg_constraint \
         WHERE conrelid = $1 AND contype = 'p'",
    )
    .bind(oid(table))
    .fetch_optional(&mut *conn)
    .await?;
    Ok((key, name))
}

/// Whether a BEFORE ROW trigger or a rule may change the row a write stores; and
/// whether the table has no triggers (other than foreign keys' internal ones) and no
/// rules at all (its INSERTs may be planned apart from other tables').
pub async fn triggers_and_rules(
    conn: &mut PgConnection,
    table: u32,
) -> Result<(bool, bool), sqlx::Error> {
    // tgtype bits: 1 = ROW, 2 = BEFORE (INSTEAD OF is for views only).
    let row = sqlx::query(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger \
                        WHERE tgrelid = $1 AND NOT tgisinternal AND tgtype::int & 3 = 3) \
             OR EXISTS (SELECT 1 FROM pg_catalog.pg_rewrite \
                        WHERE ev_class = $1 AND rulename <> '_RETURN'), \
                NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger \
                            WHERE tgrelid = $1 AND NOT tgisinternal) \
            AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_rewrite \
                            WHERE ev_class = $1 AND rulename <> '_RETURN')",
    )
    .bind(oid(table))
    .fetch_one(&mut *conn)
    .await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}

/// Whether a foreign key of the table has an ON DELETE or ON UPDATE action that
/// changes its rows (CASCADE, SET NULL, SET DEFAULT) when the referenced row changes.
pub async fn changed_by_parents(conn: &mut PgConnection, table: u32) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint \
                        WHERE conrelid = $1 AND contype = 'f' \
                          AND (confdeltype IN ('c', 'n', 'd') OR confupdtype IN ('c', 'n', 'd')))",
    )
    .bind(oid(table))
    .fetch_one(&mut *conn)
    .await
}

/// The table's foreign keys: the referenced table (`schema.name`), its columns and the
/// referenced columns, in constraint order.
pub async fn foreign_keys(
    conn: &mut PgConnection,
    table: u32,
) -> Result<Vec<ForeignKey>, sqlx::Error> {
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
         WHERE c.conrelid = $1 AND c.contype = 'f' ORDER BY c.conname",
    )
    .bind(oid(table))
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
