//! The read-cache verdict on one query string: may its result be cached (and on which
//! tables does it then depend, for how long), and what does running it invalidate.
//!
//! Pure: it reads the classifier's [`Analysis`], a catalog snapshot and the per-table
//! settings. Everything it cannot prove harmless it treats as harmful: an unknown
//! relation or function is never cacheable, and a write to an unknown relation
//! invalidates the whole database.

use std::collections::HashMap;
use std::time::Duration;

use super::point::{self, Params, PointKey, WriteKeys};
use crate::read::catalog::{Catalog, Volatility};
use crate::read::classify::{Analysis, Kind, RelName, Statement, TxCommand};

/// Per-table cache settings: `tables."schema.name".cache` and `.ttl`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableSettings {
    pub default_ttl: Duration,
    pub invalidate_on_unknown: bool,
    /// `cache` and `ttl` by schema, then table name (two lookups, no allocation).
    pub by_table: HashMap<String, HashMap<String, (bool, Option<Duration>)>>,
}

impl TableSettings {
    /// The settings `config` asks for (`[cache]` defaults, `[tables.*]` overrides).
    pub fn from_config(config: &crate::config::Config) -> Self {
        let mut tables = TableSettings {
            default_ttl: config.cache.ttl,
            invalidate_on_unknown: config.cache.invalidate_on_unknown,
            by_table: HashMap::new(),
        };
        for (name, t) in &config.tables {
            if let Some((schema, table)) = name.split_once('.') {
                tables
                    .by_table
                    .entry(schema.to_owned())
                    .or_default()
                    .insert(table.to_owned(), (t.cache, t.ttl));
            }
        }
        tables
    }

    fn lookup(&self, schema: &str, name: &str) -> (bool, Duration) {
        match self.by_table.get(schema).and_then(|t| t.get(name)) {
            Some(&(cache, ttl)) => (cache, ttl.unwrap_or(self.default_ttl)),
            None => (true, self.default_ttl),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cacheable {
    /// Base tables (OIDs) the result depends on.
    pub tables: Vec<u32>,
    pub ttl: Duration,
}

/// What running the statement invalidates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effects {
    /// Every table written (keyed or not).
    pub tables: Vec<u32>,
    /// Tables of `tables` whose every write has its key in `keys`: only those keys are
    /// invalidated, not the table.
    pub keyed_tables: Vec<u32>,
    /// The rows written to `keyed_tables`: (table, canonical key).
    pub keys: Vec<(u32, Vec<String>)>,
    /// Every entry of this database (unknown targets, unknown side effects, DDL).
    pub database: bool,
    /// Every entry of every database (roles, cluster-wide settings).
    pub everything: bool,
    /// The catalog snapshot is out of date (DDL).
    pub catalog_changed: bool,
    /// The statement may change session state out of sight (SET, SET ROLE, temporary
    /// objects inside DO, CALL, EXECUTE or a user-defined volatile function).
    pub hidden_session_changes: bool,
}

impl Effects {
    /// What a statement spillway cannot see into (FunctionCall, a portal of an
    /// unknown statement) may have done.
    pub fn unknown(invalidate_on_unknown: bool) -> Self {
        Self {
            database: invalidate_on_unknown,
            hidden_session_changes: true,
            ..Self::default()
        }
    }

    /// Nothing to invalidate (session-only effects aside).
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty() && !self.database && !self.everything && !self.catalog_changed
    }

    /// Tables written whose keys are not all known.
    pub fn unkeyed_tables(&self) -> impl Iterator<Item = u32> + '_ {
        self.tables
            .iter()
            .copied()
            .filter(|t| !self.keyed_tables.contains(t))
    }

    pub fn merge(&mut self, other: &Effects) {
        // A table stays keyed only if no statement wrote it with unknown keys.
        let unkeyed: Vec<u32> = self
            .unkeyed_tables()
            .chain(other.unkeyed_tables())
            .collect();
        for t in &other.tables {
            if !self.tables.contains(t) {
                self.tables.push(*t);
            }
        }
        for t in &other.keyed_tables {
            if !self.keyed_tables.contains(t) {
                self.keyed_tables.push(*t);
            }
        }
        self.keyed_tables.retain(|t| !unkeyed.contains(t));
        for k in &other.keys {
            if !self.keys.contains(k) {
                self.keys.push(k.clone());
            }
        }
        self.database |= other.database;
        self.everything |= other.everything;
        self.catalog_changed |= other.catalog_changed;
        self.hidden_session_changes |= other.hidden_session_changes;
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub cacheable: Result<Cacheable, &'static str>,
    /// The refusal names a relation or function the catalog snapshot does not know:
    /// the snapshot may be behind (reloaded at most once a second).
    pub catalog_behind: bool,
    pub effects: Effects,
    /// A cacheable single-table read that fixes the table's whole primary key: the
    /// row its result depends on (`point.rs`), with its parameters unresolved.
    pub point: Option<PointKey>,
    /// A single write whose rows' keys are certain (`point.rs`), unresolved.
    pub write_keys: Option<WriteKeys>,
}

impl Decision {
    /// The effects with `params`: a keyed write's table becomes keyed when every key
    /// resolves (else the table is invalidated whole, as without keys).
    pub fn effects_with(&self, params: &Params<'_>) -> std::borrow::Cow<'_, Effects> {
        let e = &self.effects;
        let keyed = self.write_keys.as_ref().filter(|w| {
            !e.database && !e.everything && !e.catalog_changed && e.tables == [w.table]
        });
        match keyed.and_then(|w| Some((w.table, w.resolve(params)?))) {
            Some((table, rows)) => {
                let mut e = e.clone();
                e.keyed_tables.push(table);
                e.keys.extend(rows.into_iter().map(|k| (table, k)));
                std::borrow::Cow::Owned(e)
            }
            None => std::borrow::Cow::Borrowed(e),
        }
    }
}

/// Why [`cacheable`] refuses: a name the catalog does not know, or anything else.
enum Refused {
    Unknown(&'static str),
    Not(&'static str),
}

pub fn decide(analysis: &Analysis, catalog: Option<&Catalog>, tables: &TableSettings) -> Decision {
    let mut effects = Effects::default();
    if analysis.unanalysed {
        effects.database = tables.invalidate_on_unknown;
        return Decision {
            cacheable: Err("statement not analysed"),
            catalog_behind: false,
            effects,
            point: None,
            write_keys: None,
        };
    }
    for stmt in &analysis.statements {
        statement_effects(stmt, catalog, tables, &mut effects);
    }
    let refused = match (analysis.statements.as_slice(), catalog) {
        _ if !analysis.is_cacheable_shape() => Err(Refused::Not("not a plain SELECT")),
        (_, None) => Err(Refused::Not("catalog not loaded")),
        ([stmt], Some(catalog)) => cacheable(stmt, catalog, tables),
        _ => Err(Refused::Not("not a single statement")),
    };
    let (cacheable, catalog_behind) = match refused {
        Ok(c) => (Ok(c), false),
        Err(Refused::Unknown(why)) => (Err(why), true),
        Err(Refused::Not(why)) => (Err(why), false),
    };
    let single = match analysis.statements.as_slice() {
        [stmt] => Some(stmt),
        _ => None,
    };
    let point = match (&cacheable, single, catalog) {
        (Ok(c), Some(stmt), Some(catalog)) => match (c.tables.as_slice(), &stmt.point) {
            ([oid], Some(filter)) => point::point_key(filter, *oid, catalog),
            _ => None,
        },
        _ => None,
    };
    let write_keys = match (single, catalog) {
        (Some(stmt), Some(catalog)) if stmt.kind == Kind::Write => match &stmt.shape {
            Some(Ok(shape)) => point::write_keys(shape, catalog),
            _ => None,
        },
        _ => None,
    };
    Decision {
        cacheable,
        catalog_behind,
        effects,
        point,
        write_keys,
    }
}

fn cacheable(
    stmt: &Statement,
    catalog: &Catalog,
    settings: &TableSettings,
) -> Result<Cacheable, Refused> {
    for f in &stmt.functions {
        match catalog.function(&f.name) {
            None => return Err(Refused::Unknown("unknown function")),
            Some(info) if info.worst != Volatility::Immutable => {
                return Err(Refused::Not("non-immutable function"));
            }
            Some(_) => {}
        }
    }
    let mut deps = Vec::new();
    for name in &stmt.reads {
        let rels = catalog.resolve(name.schema.as_deref(), &name.name);
        if rels.is_empty() {
            return Err(Refused::Unknown("unknown relation"));
        }
        for rel in rels {
            catalog
                .read_dependencies(rel, &mut deps)
                .map_err(|why| Refused::Not(why.as_str()))?;
        }
    }
    deps.sort_unstable();
    deps.dedup();
    let mut ttl = settings.default_ttl;
    for oid in &deps {
        let Some(rel) = catalog.relation_by_oid(*oid) else {
            return Err(Refused::Unknown("unknown relation"));
        };
        let (cache, table_ttl) = settings.lookup(&rel.schema, &rel.name);
        if !cache {
            return Err(Refused::Not("cache disabled for a table"));
        }
        ttl = ttl.min(table_ttl);
    }
    Ok(Cacheable { tables: deps, ttl })
}

fn statement_effects(
    stmt: &Statement,
    catalog: Option<&Catalog>,
    settings: &TableSettings,
    effects: &mut Effects,
) {
    // A user-defined volatile function may write anything. In a SELECT, a function
    // the catalog does not know fails in PostgreSQL (or the snapshot is behind, and the
    // statement is not cacheable anyway); elsewhere it is treated as unknown.
    let side_effects =
        stmt.functions
            .iter()
            .any(|f| match catalog.and_then(|c| c.function(&f.name)) {
                Some(info) => info.user_volatile,
                None => !matches!(stmt.kind, Kind::Select),
            });
    effects.database |= side_effects && settings.invalidate_on_unknown;
    // Only a function known to be user-defined and volatile counts as possibly
    // changing session state (an unknown name while the catalog loads does not).
    effects.hidden_session_changes |= stmt.functions.iter().any(|f| {
        catalog
            .and_then(|c| c.function(&f.name))
            .is_some_and(|info| info.user_volatile)
    });
    match &stmt.kind {
        Kind::Write => write_targets(&stmt.writes, catalog, effects),
        Kind::Truncate { cascade } => {
            write_targets(&stmt.writes, catalog, effects);
            effects.database |= *cascade;
        }
        // A temporary object is visible to its session only; the session stops
        // using the cache (see the handler), nobody else is affected.
        Kind::Ddl {
            temp: true,
            global: false,
        } => {}
        Kind::Ddl { global, .. } => {
            effects.database = true;
            effects.everything |= *global;
            effects.catalog_changed = true;
        }
        Kind::Unknown => {
            effects.database |= settings.invalidate_on_unknown;
            effects.hidden_session_changes = true;
        }
        // Commits writes prepared earlier, possibly by another session.
        Kind::Transaction(TxCommand::CommitPrepared) => effects.database = true,
        Kind::Select | Kind::OtherRead | Kind::Transaction(_) | Kind::Session(_) | Kind::Empty => {}
    }
}

fn write_targets(names: &[RelName], catalog: Option<&Catalog>, effects: &mut Effects) {
    let Some(catalog) = catalog else {
        effects.database = true;
        return;
    };
    if names.is_empty() {
        effects.database = true;
    }
    for name in names {
        let rels = catalog.resolve(name.schema.as_deref(), &name.name);
        if rels.is_empty() {
            effects.database = true;
        }
        for rel in rels {
            // Triggers, rules and cascading foreign keys reach tables the statement
            // does not name.
            effects.database |= rel.write_side_effects;
            let mut targets = Vec::new();
            catalog.write_targets(rel, &mut targets);
            for oid in targets {
                if !effects.tables.contains(&oid) {
                    effects.tables.push(oid);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read::catalog::tests::sample;
    use crate::read::classify::analyze;

    fn settings() -> TableSettings {
        let mut s = TableSettings {
            default_ttl: Duration::from_secs(60),
            invalidate_on_unknown: true,
            by_table: HashMap::new(),
        };
        s.by_table
            .entry("audit".into())
            .or_default()
            .insert("accounts".into(), (true, Some(Duration::from_secs(5))));
        s
    }

    fn run(sql: &str) -> Decision {
        decide(&analyze(sql), Some(&sample()), &settings())
    }

    #[test]
    fn select_through_views_depends_on_base_tables() {
        let d = run("SELECT * FROM richer WHERE lower(x) = 'a'");
        assert_eq!(
            d.cacheable,
            Ok(Cacheable {
                tables: vec![1],
                ttl: Duration::from_secs(60)
            })
        );
        assert!(d.effects.is_empty());
    }

    #[test]
    fn unqualified_name_depends_on_every_schema_and_takes_the_smallest_ttl() {
        let d = run("SELECT * FROM accounts");
        let c = d.cacheable.expect("cacheable");
        assert_eq!(c.tables, vec![1, 2]);
        assert_eq!(c.ttl, Duration::from_secs(5));
    }

    #[test]
    fn refusals_say_why() {
        assert_eq!(
            run("SELECT now() FROM accounts").cacheable,
            Err("non-immutable function")
        );
        assert_eq!(run("SELECT * FROM nope").cacheable, Err("unknown relation"));
        assert_eq!(
            run("SELECT * FROM secrets").cacheable,
            Err("row-level security")
        );
        assert_eq!(
            run("SELECT * FROM accounts FOR UPDATE").cacheable,
            Err("not a plain SELECT")
        );
        assert_eq!(
            decide(&analyze("SELECT 1"), None, &settings()).cacheable,
            Err("catalog not loaded")
        );
        let mut off = settings();
        off.by_table
            .entry("public".into())
            .or_default()
            .insert("accounts".into(), (false, None));
        assert_eq!(
            decide(
                &analyze("SELECT * FROM public.accounts"),
                Some(&sample()),
                &off
            )
            .cacheable,
            Err("cache disabled for a table")
        );
    }

    #[test]
    fn unknown_names_say_the_catalog_may_be_behind() {
        assert!(run("SELECT * FROM nope").catalog_behind);
        assert!(run("SELECT no_such_function() FROM accounts").catalog_behind);
        assert!(!run("SELECT now() FROM accounts").catalog_behind);
        assert!(!run("SELECT * FROM secrets").catalog_behind);
    }

    #[test]
    fn writes_invalidate_their_targets() {
        let d = run("UPDATE public.accounts SET x = 1");
        assert_eq!(d.effects.tables, vec![1]);
        assert!(!d.effects.database);
        let d = run("WITH w AS (DELETE FROM audit.accounts RETURNING 1) SELECT * FROM w");
        assert_eq!(d.effects.tables, vec![2]);
    }

    #[test]
    fn unknown_targets_and_side_effects_invalidate_the_database() {
        assert!(run("INSERT INTO nope VALUES (1)").effects.database);
        assert!(run("DO $$ BEGIN NULL; END $$").effects.database);
        assert!(run("TRUNCATE accounts CASCADE").effects.database);
        let ddl = run("ALTER TABLE accounts ADD COLUMN y int").effects;
        assert!(ddl.database && ddl.catalog_changed && !ddl.everything);
        assert!(run("ALTER ROLE bob SET search_path = a").effects.everything);
    }

    #[test]
    fn ddl_on_types_domains_functions_and_views_invalidates_the_database() {
        // A table's rows change shape or value without a write to it (issue 18:
        // asyncpg's type-cache scenarios); spillway does not track which tables use
        // which type, domain, function or view, so the whole database goes.
        for ddl in [
            "ALTER TYPE typ1 ADD ATTRIBUTE c text",
            "ALTER TYPE typ1 DROP ATTRIBUTE x",
            "ALTER TYPE typ1 RENAME ATTRIBUTE y TO z",
            "ALTER TYPE typ1 ALTER ATTRIBUTE y TYPE bigint",
            "ALTER TYPE mood ADD VALUE 'meh'",
            "ALTER TYPE mood RENAME VALUE 'meh' TO 'fine'",
            "DROP TYPE typ1 CASCADE",
            "CREATE TYPE typ2 AS (a int)",
            "ALTER DOMAIN dom1 ADD CONSTRAINT positive CHECK (VALUE > 0)",
            "ALTER DOMAIN dom1 SET DEFAULT 1",
            "DROP DOMAIN dom1 CASCADE",
            "CREATE OR REPLACE FUNCTION f(int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT $1'",
            "ALTER FUNCTION f(int) STABLE",
            "DROP FUNCTION f(int)",
            "CREATE OR REPLACE VIEW richer AS SELECT 1 AS x",
            "ALTER VIEW richer RENAME COLUMN x TO y",
            "DROP VIEW richer",
            "CREATE OR REPLACE RULE r AS ON SELECT TO t DO INSTEAD SELECT 1",
            "CREATE CAST (int AS text) WITH INOUT",
            "ALTER OPERATOR + (int, int) SET (RESTRICT = NONE)",
        ] {
            let effects = run(ddl).effects;
            assert!(
                effects.database && effects.catalog_changed,
                "{ddl}: {effects:?}"
            );
        }
    }
}
