//! The deferred tables as PostgreSQL defines them, checked at startup: each configured
//! write-behind/write-back table must exist, be an ordinary table, have a primary key,
//! and not use row-level security (SPEC §6); a write-back table must not have foreign
//! keys (either side) or rules, whose effects depend on the order of different keys,
//! which write-back's folding does not keep. The facts come from the read layer's
//! catalog reader (`read/catalog/tables.rs`); the result feeds the flush planner
//! (`TableMeta`) and the statement checks of the write path (key columns, column
//! types, and the column facts a RowDescription of a RETURNING answered locally
//! gives).

use std::collections::{BTreeMap, HashMap};

pub use spillway_policies::engine::{Column, Defaults, DeferredTable, KeySequence, RowChanges};
use spillway_policies::writes::TableMeta;
use spillway_policies::writes::plan::ident;
use spillway_policies::{Policy, TableConfig, TableName};
use sqlx::PgConnection;

use crate::read::catalog::tables as catalog;
use crate::read::classify::Clock;

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
        let oid = check(conn, name, config).await?;
        let table = describe(conn, name, config, oid).await?;
        out.insert(name.to_string(), table);
    }
    Ok(out)
}

/// The checks every deferred table must pass (SPEC §6); its OID.
async fn check(
    conn: &mut PgConnection,
    name: &TableName,
    config: &TableConfig,
) -> Result<u32, TableError> {
    let Some(rel) = catalog::relation(conn, &name.schema, &name.name).await? else {
        return Err(TableError::Missing(name.clone()));
    };
    if rel.relkind != "r" {
        return Err(TableError::NotATable(name.clone(), rel.relkind));
    }
    if rel.row_security {
        return Err(TableError::RowSecurity(name.clone(), config.policy));
    }
    if catalog::has_children(conn, rel.oid).await? {
        return Err(TableError::Inherited(name.clone(), config.policy));
    }
    if config.policy == Policy::WriteBack
        && let Some(what) = catalog::order_sensitive(conn, rel.oid).await?
    {
        return Err(TableError::OrderSensitive(name.clone(), what));
    }
    Ok(rel.oid)
}

/// What the write path needs of a checked table.
async fn describe(
    conn: &mut PgConnection,
    name: &TableName,
    config: &TableConfig,
    oid: u32,
) -> Result<DeferredTable, TableError> {
    let columns = catalog::columns(conn, oid).await?;
    let (key, pkey_name) = catalog::primary_key(conn, oid).await?;
    let Some(pkey_name) = pkey_name.filter(|_| !key.is_empty()) else {
        return Err(TableError::NoPrimaryKey(name.clone(), config.policy));
    };
    let (rewritten, plain) = catalog::triggers_and_rules(conn, oid).await?;
    let by_parents = catalog::changed_by_parents(conn, oid).await?;
    let parents = catalog::foreign_keys(conn, oid).await?;
    let types: HashMap<String, String> = columns
        .iter()
        .map(|c| (c.name.clone(), c.type_name.clone()))
        .collect();
    let not_null: Vec<String> = columns
        .iter()
        .filter(|c| c.not_null)
        .map(|c| c.name.clone())
        .collect();
    // Also those whose default is not a constant (`now()`, `nextval(…)`…): left out,
    // it would be evaluated when the flusher applies the row, not when the client
    // wrote it.
    let clock_defaults: Vec<(String, String)> = columns
        .iter()
        .filter_map(|c| {
            let e = c.default_expr.as_deref()?;
            clock_default(e).map(|_| (c.name.clone(), e.to_owned()))
        })
        .collect();
    let constant_defaults = columns
        .iter()
        .filter_map(|c| {
            let v = constant_value(c.default_expr.as_deref()?, &c.type_name)?;
            Some((c.name.clone(), v))
        })
        .collect();
    let enum_types: HashMap<u32, Vec<String>> = columns
        .iter()
        .filter_map(|c| Some((c.type_oid, c.enum_labels.clone()?)))
        .collect();
    // A `serial` key's `nextval` default is not required: spillway reserves its values.
    let key_sequence = key_sequence(conn, name, &key, &columns).await?;
    let required = columns
        .iter()
        .filter(|c| !(key_sequence.is_some() && key.contains(&c.name)))
        .filter(|c| {
            (c.not_null && !c.has_default)
                || c.default_expr
                    .as_deref()
                    .is_some_and(|e| !constant_default(e) && clock_default(e).is_none())
        })
        .map(|c| c.name.clone())
        .collect();
    let overriding = key_sequence.is_some()
        && columns
            .iter()
            .any(|c| key.contains(&c.name) && c.identity == "a");
    let generated_always = columns
        .iter()
        .filter(|c| c.identity == "a" || c.generated)
        .map(|c| c.name.clone())
        .collect();
    let exists_sql = exists_sql(name, &key, &types);
    let qualified = name.to_string();
    Ok(DeferredTable {
        oid,
        config: config.clone(),
        meta: TableMeta {
            name: qualified,
            schema: name.schema.clone(),
            table: name.name.clone(),
            key,
            types,
            coalesce: config.policy == Policy::WriteBack,
            plain,
            parents,
            overriding,
        },
        type_oids: columns
            .iter()
            .map(|c| (c.name.clone(), c.type_oid))
            .collect(),
        typmods: columns.iter().map(|c| (c.name.clone(), c.typmod)).collect(),
        not_null,
        required,
        defaults: Defaults {
            clock: clock_defaults,
            constant: constant_defaults,
        },
        enum_types,
        pkey_name,
        exists_sql,
        columns: columns
            .into_iter()
            .map(|c| Column {
                name: c.name,
                attnum: c.attnum,
                type_oid: c.type_oid,
                typlen: c.typlen,
                typmod: c.typmod,
            })
            .collect(),
        row_changes: RowChanges {
            rewritten,
            by_parents,
        },
        key_sequence,
        generated_always,
    })
}

/// The sequence behind a single integer key column: an identity's, or the one a
/// `nextval('…'::regclass)` default (a `serial`) names, by OID.
async fn key_sequence(
    conn: &mut PgConnection,
    name: &TableName,
    key: &[String],
    columns: &[catalog::ColumnFacts],
) -> Result<Option<KeySequence>, TableError> {
    let [k] = key else { return Ok(None) };
    let Some(c) = columns.iter().find(|c| c.name == *k) else {
        return Ok(None);
    };
    if !matches!(c.type_oid, INT2 | INT4 | INT8) {
        return Ok(None);
    }
    let oid: Option<sqlx::postgres::types::Oid> = if !c.identity.is_empty() {
        let table = format!("{}.{}", ident(&name.schema), ident(&name.name));
        sqlx::query_scalar("SELECT pg_catalog.pg_get_serial_sequence($1, $2)::regclass::oid")
            .bind(table)
            .bind(&c.name)
            .fetch_one(&mut *conn)
            .await?
    } else if let Some(seq) = c.default_expr.as_deref().and_then(nextval_of) {
        sqlx::query_scalar("SELECT $1::regclass::oid")
            .bind(seq)
            .fetch_one(&mut *conn)
            .await?
    } else {
        None
    };
    Ok(oid.map(|oid| KeySequence {
        oid: oid.0,
        type_oid: c.type_oid,
    }))
}

const INT2: u32 = 21;
const INT4: u32 = 23;
const INT8: u32 = 20;

/// The sequence name of a default that is exactly `nextval('name'::regclass)`, as
/// `pg_get_expr` prints a `serial`'s.
fn nextval_of(expr: &str) -> Option<String> {
    let inner = expr
        .strip_prefix("nextval('")?
        .strip_suffix("'::regclass)")?;
    // One quoted literal: its only quotes are doubled ones.
    (!inner.replace("''", "").contains('\'')).then(|| inner.replace("''", "'"))
}

/// `SELECT EXISTS (… WHERE key = $1 …)` with text parameters cast to the key's types:
/// the point read of `row_counts = "exact"`.
fn exists_sql(name: &TableName, key: &[String], types: &HashMap<String, String>) -> String {
    let conditions: Vec<String> = key
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let ty = types.get(k).map_or("text", String::as_str);
            format!("{} = ${}::text::{ty}", ident(k), i + 1)
        })
        .collect();
    format!(
        "SELECT EXISTS (SELECT 1 FROM {}.{} WHERE {})",
        ident(&name.schema),
        ident(&name.name),
        conditions.join(" AND ")
    )
}

/// The clock or random function a default expression (as `pg_get_expr` prints it)
/// calls, when it is nothing else: `now()`, `CURRENT_TIMESTAMP`, `CURRENT_DATE`,
/// `LOCALTIMESTAMP`, `transaction_timestamp()`, `statement_timestamp()`,
/// `clock_timestamp()`, `gen_random_uuid()`. (A default is stored parsed: its
/// functions are already resolved, so the name is the built-in one.)
pub fn clock_default(expr: &str) -> Option<Clock> {
    Some(match expr.trim() {
        "now()" | "CURRENT_TIMESTAMP" | "transaction_timestamp()" => Clock::TransactionStart,
        "statement_timestamp()" => Clock::StatementStart,
        "clock_timestamp()" => Clock::Now,
        "LOCALTIMESTAMP" => Clock::LocalTimestamp,
        "CURRENT_DATE" => Clock::CurrentDate,
        "CURRENT_TIME" => Clock::CurrentTime,
        "LOCALTIME" => Clock::LocalTime,
        "gen_random_uuid()" => Clock::RandomUuid,
        _ => return None,
    })
}

/// The value of a constant default (as `pg_get_expr` prints it) for a column of type
/// `type_name` (`format_type`'s text): the literal's input text (`Some(None)`: NULL),
/// when it is written without a cast or cast to the column's own type (its modifier
/// aside); `None` otherwise.
pub fn constant_value(expr: &str, type_name: &str) -> Option<Option<String>> {
    if !constant_default(expr) {
        return None;
    }
    let e = expr.trim();
    let e = e
        .strip_prefix('(')
        .and_then(|x| x.strip_suffix(')'))
        .unwrap_or(e);
    let (value, ty) = match e.strip_prefix('\'') {
        Some(rest) => {
            // The closing quote: the first one not doubled.
            let bytes = rest.as_bytes();
            let mut i = 0;
            let end = loop {
                match bytes.get(i) {
                    Some(b'\'') if bytes.get(i + 1) == Some(&b'\'') => i += 2,
                    Some(b'\'') => break i,
                    Some(_) => i += 1,
                    None => return None,
                }
            };
            let after = &rest[end + 1..];
            let ty = match after {
                "" => None,
                _ => Some(after.strip_prefix("::")?),
            };
            (Some(rest[..end].replace("''", "'")), ty)
        }
        None => {
            let (v, ty) = match e.split_once("::") {
                Some((v, t)) => (v, Some(t)),
                None => (e, None),
            };
            ((v != "NULL").then(|| v.to_owned()), ty)
        }
    };
    let base = |t: &str| -> String {
        let mut out = String::new();
        let mut depth = 0;
        for c in t.chars() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ if depth == 0 => out.push(c),
                _ => {}
            }
        }
        out.split_whitespace().collect::<Vec<_>>().join(" ")
    };
    match ty {
        Some(t) if base(t) != base(type_name) => None,
        _ => Some(value),
    }
}

/// Whether a default expression (as `pg_get_expr` prints it) is a constant, maybe
/// cast: `0`, `true`, `'new'::order_status`, `NULL::text`, `(-1)`. Anything else may
/// read the clock, a sequence or the session.
fn constant_default(expr: &str) -> bool {
    let e = expr.trim();
    let e = e
        .strip_prefix('(')
        .and_then(|x| x.strip_suffix(')'))
        .unwrap_or(e);
    let (value, ty) = match e.split_once("::") {
        Some((v, t)) => (v, Some(t)),
        None => (e, None),
    };
    let plain_type = ty.is_none_or(|t| {
        t.chars()
            .all(|c| c.is_ascii_alphanumeric() || " _.\"[]".contains(c))
    });
    let value_ok = match value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
        Some(inner) => {
            !inner.replace("''", "").contains('\'') && !crate::write::params::is_clock_word(inner)
        }
        None => {
            let v = value.strip_prefix('-').unwrap_or(value);
            (!v.is_empty() && v.chars().all(|c| c.is_ascii_digit() || c == '.'))
                || matches!(value, "true" | "false" | "NULL")
        }
    };
    plain_type && value_ok
}

#[cfg(test)]
mod default_tests {
    use super::{clock_default, constant_default, constant_value, nextval_of};
    use crate::read::classify::Clock;

    #[test]
    fn clock_defaults_are_known_by_their_printed_form() {
        assert_eq!(clock_default("now()"), Some(Clock::TransactionStart));
        assert_eq!(clock_default("CURRENT_DATE"), Some(Clock::CurrentDate));
        assert_eq!(clock_default("gen_random_uuid()"), Some(Clock::RandomUuid));
        assert_eq!(clock_default("(now() + '1 day'::interval)"), None);
        assert_eq!(clock_default("CURRENT_TIMESTAMP(0)"), None);
    }

    #[test]
    fn constant_defaults_have_their_values() {
        let v = |e, t| constant_value(e, t);
        assert_eq!(
            v("'new'::order_status", "order_status"),
            Some(Some("new".into()))
        );
        assert_eq!(v("0", "bigint"), Some(Some("0".into())));
        assert_eq!(v("(-1)", "integer"), Some(Some("-1".into())));
        assert_eq!(v("true", "boolean"), Some(Some("true".into())));
        assert_eq!(v("NULL::text", "text"), Some(None));
        assert_eq!(
            v("'it''s'::character varying", "character varying(40)"),
            Some(Some("it's".into()))
        );
        // Cast to another type: the column's input would not see the literal.
        assert_eq!(v("'x'::text", "character varying(40)"), None);
        assert_eq!(v("now()", "timestamp with time zone"), None);
        assert_eq!(v("'now'::text", "text"), None);
    }

    #[test]
    fn serial_defaults_name_their_sequence() {
        assert_eq!(
            nextval_of("nextval('orders_id_seq'::regclass)").as_deref(),
            Some("orders_id_seq")
        );
        assert_eq!(
            nextval_of("nextval('\"S\".\"it''s\"'::regclass)").as_deref(),
            Some("\"S\".\"it's\"")
        );
        for e in [
            "nextval('a'::regclass) + 1",
            "(nextval('a'::regclass))",
            "nextval('a'::regclass) || nextval('b'::regclass)",
            "nextval('a'::text)",
        ] {
            assert_eq!(nextval_of(e), None, "{e}");
        }
    }

    #[test]
    fn only_constant_defaults() {
        for e in [
            "0",
            "true",
            "'new'::order_status",
            "NULL::text",
            "(-1)",
            "'a''b'::text",
            "1.5",
        ] {
            assert!(constant_default(e), "{e}");
        }
        for e in [
            "now()",
            "CURRENT_TIMESTAMP",
            "nextval('s'::regclass)",
            "'now'::text",
            "gen_random_uuid()",
            "(1 + 2)",
            "'a'::text || 'b'::text",
        ] {
            assert!(!constant_default(e), "{e}");
        }
    }
}
