//! Loads a [`Catalog`] snapshot over a service connection (sqlx): the relations, view
//! dependencies, functions' volatility, inheritance and foreign-key pairs, primary keys,
//! plus every user view's `pg_get_viewdef`, which the classifier reads to find functions and SQL
//! value functions that `pg_depend` does not record.

use std::collections::{HashMap, HashSet};

use sqlx::postgres::types::Oid;
use sqlx::{PgConnection, Row};

use super::{Catalog, FunctionInfo, RelKind, Relation, Volatility};
use crate::read::classify;

const RELATIONS: &str = "
SELECT c.oid, n.nspname, c.relname, c.relkind::text, c.relpersistence = 't',
       n.nspname IN ('pg_catalog', 'information_schema') OR n.nspname LIKE 'pg\\_toast%',
       c.relrowsecurity,
       c.oid IN (SELECT tgrelid FROM pg_trigger
                 WHERE NOT tgisinternal AND tgname <> 'spillway_invalidate')
       OR c.oid IN (SELECT confrelid FROM pg_constraint WHERE contype = 'f'
                    AND (confdeltype IN ('c', 'n', 'd') OR confupdtype IN ('c', 'n', 'd')))
       OR (c.relhasrules AND c.relkind <> 'v')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')";

/// Relations each view's rewrite rule references (its direct dependencies).
const VIEW_DEPS: &str = "
SELECT DISTINCT r.ev_class, d.refobjid
FROM pg_rewrite r
JOIN pg_class v ON v.oid = r.ev_class AND v.relkind = 'v'
JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
     AND d.refclassid = 'pg_class'::regclass";

/// User views and their definitions (system views are never cacheable anyway).
const VIEW_DEFS: &str = "
SELECT c.oid, pg_get_viewdef(c.oid)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'v' AND n.nspname NOT IN ('pg_catalog', 'information_schema')";

const INHERITS: &str = "SELECT inhrelid, inhparent FROM pg_inherits";

const FOREIGN_KEYS: &str = "SELECT conrelid, confrelid FROM pg_constraint WHERE contype = 'f'";

/// Primary-key columns in key order; a key with a nondeterministic collation is left
/// out whole (its rows have no canonical key text).
const PRIMARY_KEYS: &str = "
SELECT i.indrelid, a.attname::text, a.atttypid
FROM pg_index i
CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indisprimary AND NOT EXISTS (
    SELECT 1 FROM unnest(i.indcollation::oid[]) AS c(oid)
    JOIN pg_collation pc ON pc.oid = c.oid WHERE NOT pc.collisdeterministic)
ORDER BY i.indrelid, k.n";

const FUNCTIONS: &str = "
SELECT p.proname, p.provolatile::text, n.nspname = 'pg_catalog'
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace";

/// One snapshot of the connection's database.
pub async fn load(conn: &mut PgConnection) -> Result<Catalog, sqlx::Error> {
    let relations = relations(conn).await?;
    let view_deps = oid_pairs(conn, VIEW_DEPS).await?;
    let functions = functions(conn).await?;
    let mut volatile_views = HashSet::new();
    for row in sqlx::query(VIEW_DEFS).fetch_all(&mut *conn).await? {
        let oid: Oid = row.try_get(0)?;
        let def: Option<String> = row.try_get(1)?;
        let immutable = def.is_some_and(|def| definition_is_immutable(&def, &functions));
        if !immutable {
            volatile_views.insert(oid.0);
        }
    }
    let inherits = oid_pairs(conn, INHERITS).await?;
    let foreign_keys = oid_pairs(conn, FOREIGN_KEYS).await?;
    let mut primary_keys = Vec::new();
    for row in sqlx::query(PRIMARY_KEYS).fetch_all(&mut *conn).await? {
        primary_keys.push((
            row.try_get::<Oid, _>(0)?.0,
            row.try_get::<String, _>(1)?,
            row.try_get::<Oid, _>(2)?.0,
        ));
    }
    Ok(
        Catalog::new(relations, &view_deps, volatile_views, functions, &inherits)
            .with_foreign_keys(&foreign_keys)
            .with_primary_keys(primary_keys),
    )
}

async fn relations(conn: &mut PgConnection) -> Result<Vec<Relation>, sqlx::Error> {
    let mut relations = Vec::new();
    for row in sqlx::query(RELATIONS).fetch_all(&mut *conn).await? {
        let kind = match row.try_get::<&str, _>(3)? {
            "r" | "p" => RelKind::Table,
            "v" => RelKind::View,
            "m" => RelKind::MaterializedView,
            "S" => RelKind::Sequence,
            _ => RelKind::Foreign,
        };
        relations.push(Relation {
            oid: row.try_get::<Oid, _>(0)?.0,
            schema: row.try_get(1)?,
            name: row.try_get(2)?,
            kind,
            temp: row.try_get(4)?,
            system: row.try_get(5)?,
            row_security: row.try_get(6)?,
            write_side_effects: row.try_get(7)?,
        });
    }
    Ok(relations)
}

/// Every function name's worst volatility, and whether a user-defined overload is
/// volatile.
async fn functions(conn: &mut PgConnection) -> Result<HashMap<String, FunctionInfo>, sqlx::Error> {
    let mut functions: HashMap<String, FunctionInfo> = HashMap::new();
    for row in sqlx::query(FUNCTIONS).fetch_all(&mut *conn).await? {
        let volatility = match row.try_get::<&str, _>(1)? {
            "i" => Volatility::Immutable,
            "s" => Volatility::Stable,
            _ => Volatility::Volatile,
        };
        let builtin: bool = row.try_get(2)?;
        let entry = functions
            .entry(row.try_get::<String, _>(0)?)
            .or_insert(FunctionInfo {
                worst: Volatility::Immutable,
                user_volatile: false,
            });
        entry.worst = entry.worst.max(volatility);
        entry.user_volatile |= volatility == Volatility::Volatile && !builtin;
    }
    Ok(functions)
}

/// The (OID, OID) rows of `sql`.
async fn oid_pairs(conn: &mut PgConnection, sql: &str) -> Result<Vec<(u32, u32)>, sqlx::Error> {
    sqlx::query(sql)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|row| Ok((row.try_get::<Oid, _>(0)?.0, row.try_get::<Oid, _>(1)?.0)))
        .collect()
}

/// A view definition reads no clock or user and calls only immutable functions.
fn definition_is_immutable(def: &str, functions: &HashMap<String, FunctionInfo>) -> bool {
    let analysis = classify::analyze(def);
    !analysis.unanalysed
        && analysis.statements.iter().all(|s| {
            !s.sql_value_function
                && s.functions.iter().all(|f| {
                    functions
                        .get(&f.name)
                        .is_some_and(|info| info.worst == Volatility::Immutable)
                })
        })
}
