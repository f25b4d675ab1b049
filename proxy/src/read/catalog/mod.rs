//! What spillway knows about one database's catalog: relations (kind, schema,
//! persistence, row security), which base tables each view reads, and the volatility
//! of every function name. The read cache consults it to decide whether a statement
//! may be cached and which tables it depends on or invalidates.
//!
//! A `Catalog` is an immutable snapshot (loaded by [`load`] on a service connection,
//! replaced whole on refresh). Resolution is conservative where names are ambiguous:
//! an unqualified name stands for every relation of that name in any schema, since the
//! session's search_path decides which one PostgreSQL uses; so a read depends on all of
//! them and a write invalidates all of them. A function name is as volatile as its
//! most volatile overload in any schema.
//!
//! Every catalog query spillway runs is in this module's two readers: [`load`] (the
//! snapshot) and [`tables`] (one table's facts, for the write side's checks of its
//! deferred tables).

pub mod load;
pub mod tables;

use std::collections::HashMap;

/// `pg_class.relkind`, as far as the cache cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelKind {
    Table,
    View,
    MaterializedView,
    Sequence,
    Foreign,
}

#[derive(Debug, Clone)]
pub struct Relation {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    pub kind: RelKind,
    /// `relpersistence = 't'`.
    pub temp: bool,
    /// In pg_catalog, information_schema or a toast schema.
    pub system: bool,
    /// Row-level security enabled: results may depend on settings the key cannot see.
    pub row_security: bool,
    /// A write to it may change other tables: user triggers, rules, or foreign keys
    /// referencing it with a cascading action.
    pub write_side_effects: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Volatility {
    Immutable,
    Stable,
    Volatile,
}

#[derive(Debug, Clone, Copy)]
pub struct FunctionInfo {
    /// The most volatile overload of this name, in any schema.
    pub worst: Volatility,
    /// Some volatile overload is user-defined (outside pg_catalog): calling it may
    /// write anything.
    pub user_volatile: bool,
}

/// Why a relation cannot back a cached result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uncacheable {
    Temporary,
    SystemCatalog,
    Sequence,
    Foreign,
    RowSecurity,
    /// A view whose definition calls a non-immutable function or reads the clock/user.
    VolatileView,
}

impl Uncacheable {
    pub fn as_str(self) -> &'static str {
        match self {
            Uncacheable::Temporary => "temporary table",
            Uncacheable::SystemCatalog => "system catalog",
            Uncacheable::Sequence => "sequence",
            Uncacheable::Foreign => "foreign table",
            Uncacheable::RowSecurity => "row-level security",
            Uncacheable::VolatileView => "view with non-immutable functions",
        }
    }
}

#[derive(Debug, Default)]
pub struct Catalog {
    relations: Vec<Relation>,
    by_name: HashMap<String, Vec<usize>>,
    by_oid: HashMap<u32, usize>,
    /// Every view's base tables (views of views expanded), by view OID.
    view_bases: HashMap<u32, Vec<u32>>,
    /// Views whose definitions are not immutable.
    volatile_views: std::collections::HashSet<u32>,
    functions: HashMap<String, FunctionInfo>,
    /// Inheritance and partitioning: direct children and parents by OID.
    children: HashMap<u32, Vec<u32>>,
    parents: HashMap<u32, Vec<u32>>,
    /// Tables linked by a foreign key, in both directions, by OID.
    foreign_keys: HashMap<u32, Vec<u32>>,
    /// Referencing table → the tables its foreign keys reference.
    referenced: HashMap<u32, Vec<u32>>,
    /// Each table's primary key: (column, type OID) in key order. Absent for tables
    /// without one, or whose key has a column with a nondeterministic collation (two
    /// spellings of one key would compare equal: no canonical text).
    primary_keys: HashMap<u32, Vec<(String, u32)>>,
}

impl Catalog {
    /// `view_deps`: (view, relation) pairs from the views' rewrite rules;
    /// `inherits`: (child, parent) pairs from `pg_inherits`.
    pub fn new(
        relations: Vec<Relation>,
        view_deps: &[(u32, u32)],
        volatile_views: std::collections::HashSet<u32>,
        functions: HashMap<String, FunctionInfo>,
        inherits: &[(u32, u32)],
    ) -> Self {
        let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
        let mut parents: HashMap<u32, Vec<u32>> = HashMap::new();
        for &(child, parent) in inherits {
            children.entry(parent).or_default().push(child);
            parents.entry(child).or_default().push(parent);
        }
        let kinds: HashMap<u32, RelKind> = relations.iter().map(|r| (r.oid, r.kind)).collect();
        let mut direct: HashMap<u32, Vec<u32>> = HashMap::new();
        for &(view, dep) in view_deps {
            if view != dep {
                direct.entry(view).or_default().push(dep);
            }
        }
        let mut view_bases = HashMap::new();
        let mut volatile = volatile_views;
        for &view in direct.keys() {
            let mut bases = Vec::new();
            let mut seen = vec![view];
            let mut stack = vec![view];
            while let Some(v) = stack.pop() {
                for &dep in direct.get(&v).map(Vec::as_slice).unwrap_or_default() {
                    if seen.contains(&dep) {
                        continue;
                    }
                    seen.push(dep);
                    if kinds.get(&dep) == Some(&RelKind::View) {
                        stack.push(dep);
                    } else {
                        bases.push(dep);
                    }
                }
            }
            // A view over a volatile view is volatile too.
            if seen.iter().any(|v| *v != view && volatile.contains(v)) {
                volatile.insert(view);
            }
            view_bases.insert(view, bases);
        }
        let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
        let mut by_oid = HashMap::new();
        for (i, r) in relations.iter().enumerate() {
            by_name.entry(r.name.clone()).or_default().push(i);
            by_oid.insert(r.oid, i);
        }
        Self {
            relations,
            by_name,
            by_oid,
            view_bases,
            volatile_views: volatile,
            functions,
            children,
            parents,
            foreign_keys: HashMap::new(),
            referenced: HashMap::new(),
            primary_keys: HashMap::new(),
        }
    }

    /// Adds the tables' primary keys: (table, column, type OID) in key order.
    pub fn with_primary_keys(mut self, columns: Vec<(u32, String, u32)>) -> Self {
        for (table, column, type_oid) in columns {
            self.primary_keys
                .entry(table)
                .or_default()
                .push((column, type_oid));
        }
        self
    }

    /// Table `oid`'s primary key columns and their type OIDs, in key order.
    pub fn primary_key(&self, oid: u32) -> Option<&[(String, u32)]> {
        self.primary_keys.get(&oid).map(Vec::as_slice)
    }

    /// A plain table that no other table inherits from or is a partition of, and that
    /// is no one's child: its rows are read and written under its OID alone.
    pub fn is_standalone_table(&self, oid: u32) -> bool {
        self.relation_by_oid(oid)
            .is_some_and(|r| r.kind == RelKind::Table)
            && !self.children.contains_key(&oid)
            && !self.parents.contains_key(&oid)
    }

    /// Adds the (referencing, referenced) table pairs of foreign keys.
    pub fn with_foreign_keys(mut self, pairs: &[(u32, u32)]) -> Self {
        for &(from, to) in pairs {
            if from != to {
                self.foreign_keys.entry(from).or_default().push(to);
                self.foreign_keys.entry(to).or_default().push(from);
                self.referenced.entry(from).or_default().push(to);
            }
        }
        self
    }

    /// Tables `oid`'s foreign keys reference: their writes may change `oid` through the
    /// keys' ON DELETE / ON UPDATE actions.
    pub fn foreign_key_parents(&self, oid: u32) -> &[u32] {
        self.referenced
            .get(&oid)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Tables a foreign key links `oid` to, either way: a write to `oid` is checked
    /// against them (or cascades to them).
    pub fn foreign_key_links(&self, oid: u32) -> &[u32] {
        self.foreign_keys
            .get(&oid)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Every table reachable through `links` from `oid` (not `oid` itself).
    fn closure(links: &HashMap<u32, Vec<u32>>, oid: u32, out: &mut Vec<u32>) {
        let mut stack = vec![oid];
        while let Some(o) = stack.pop() {
            for &next in links.get(&o).map(Vec::as_slice).unwrap_or_default() {
                if next != oid && !out.contains(&next) {
                    out.push(next);
                    stack.push(next);
                }
            }
        }
    }

    /// Every relation the name may denote (see module docs); empty when unknown.
    pub fn resolve(&self, schema: Option<&str>, name: &str) -> Vec<&Relation> {
        let Some(idx) = self.by_name.get(name) else {
            return Vec::new();
        };
        let all = idx.iter().filter_map(|&i| self.relations.get(i));
        match schema {
            Some(s) if s.starts_with("pg_temp") => all.filter(|r| r.temp).collect(),
            Some(s) => all.filter(|r| r.schema == s).collect(),
            None => all.collect(),
        }
    }

    pub fn relation_by_oid(&self, oid: u32) -> Option<&Relation> {
        self.by_oid.get(&oid).and_then(|&i| self.relations.get(i))
    }

    /// The tables a read of `rel` depends on, or why it cannot be cached.
    pub fn read_dependencies(&self, rel: &Relation, out: &mut Vec<u32>) -> Result<(), Uncacheable> {
        self.check(rel)?;
        match rel.kind {
            RelKind::View => {
                if self.volatile_views.contains(&rel.oid) {
                    return Err(Uncacheable::VolatileView);
                }
                for &base in self
                    .view_bases
                    .get(&rel.oid)
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                {
                    if let Some(b) = self.relation_by_oid(base) {
                        self.check(b)?;
                    }
                    out.push(base);
                }
                Ok(())
            }
            _ => {
                // A parent's rows include its children's (partitions, inheritance).
                out.push(rel.oid);
                let mut below = Vec::new();
                Self::closure(&self.children, rel.oid, &mut below);
                for child in below {
                    if let Some(c) = self.relation_by_oid(child) {
                        self.check(c)?;
                    }
                    out.push(child);
                }
                Ok(())
            }
        }
    }

    /// The tables a write to `rel` may change: itself, and for a view (written through
    /// its rules or INSTEAD OF triggers) every base table it reads.
    pub fn write_targets(&self, rel: &Relation, out: &mut Vec<u32>) {
        self.write_targets_by_oid(rel.oid, out);
        if rel.kind == RelKind::View {
            out.extend(
                self.view_bases
                    .get(&rel.oid)
                    .map(Vec::as_slice)
                    .unwrap_or_default(),
            );
        }
    }

    /// A write to table `oid` changes what its ancestors return (they include its rows)
    /// and, written through a parent, its descendants.
    pub fn write_targets_by_oid(&self, oid: u32, out: &mut Vec<u32>) {
        out.push(oid);
        Self::closure(&self.parents, oid, out);
        Self::closure(&self.children, oid, out);
    }

    fn check(&self, rel: &Relation) -> Result<(), Uncacheable> {
        if rel.temp {
            Err(Uncacheable::Temporary)
        } else if rel.system {
            Err(Uncacheable::SystemCatalog)
        } else if rel.row_security {
            Err(Uncacheable::RowSecurity)
        } else {
            match rel.kind {
                RelKind::Sequence => Err(Uncacheable::Sequence),
                RelKind::Foreign => Err(Uncacheable::Foreign),
                _ => Ok(()),
            }
        }
    }

    /// `None` when no function of that name exists (PostgreSQL will say so).
    pub fn function(&self, name: &str) -> Option<FunctionInfo> {
        self.functions.get(name).copied()
    }

    pub fn relation_count(&self) -> usize {
        self.relations.len()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn rel(oid: u32, schema: &str, name: &str, kind: RelKind) -> Relation {
        Relation {
            oid,
            schema: schema.into(),
            name: name.into(),
            kind,
            temp: false,
            system: schema == "pg_catalog",
            row_security: false,
            write_side_effects: false,
        }
    }

    pub fn sample() -> Catalog {
        let mut secret = rel(5, "public", "secrets", RelKind::Table);
        secret.row_security = true;
        let mut tmp = rel(6, "pg_temp_3", "scratch", RelKind::Table);
        tmp.temp = true;
        let relations = vec![
            rel(1, "public", "accounts", RelKind::Table),
            rel(2, "audit", "accounts", RelKind::Table),
            rel(3, "public", "rich", RelKind::View),
            rel(4, "public", "richer", RelKind::View),
            secret,
            tmp,
            rel(7, "public", "seq", RelKind::Sequence),
            rel(8, "pg_catalog", "pg_class", RelKind::Table),
            rel(9, "public", "clock", RelKind::View),
        ];
        let functions = HashMap::from([
            (
                "lower".to_owned(),
                FunctionInfo {
                    worst: Volatility::Immutable,
                    user_volatile: false,
                },
            ),
            (
                "now".to_owned(),
                FunctionInfo {
                    worst: Volatility::Stable,
                    user_volatile: false,
                },
            ),
        ]);
        Catalog::new(
            relations,
            &[(3, 1), (3, 3), (4, 3), (9, 1)],
            std::collections::HashSet::from([9]),
            functions,
            &[],
        )
    }

    #[test]
    fn primary_keys_in_key_order_and_standalone_tables() {
        let c = sample().with_primary_keys(vec![
            (1, "b".into(), 23),
            (2, "id".into(), 20),
            (1, "a".into(), 25),
        ]);
        assert_eq!(
            c.primary_key(1),
            Some(&[("b".to_owned(), 23), ("a".to_owned(), 25)][..])
        );
        assert_eq!(c.primary_key(3), None);
        assert!(c.is_standalone_table(1));
        assert!(!c.is_standalone_table(3), "a view");
        let parted = Catalog::new(
            vec![
                rel(10, "public", "m", RelKind::Table),
                rel(11, "public", "m_1", RelKind::Table),
            ],
            &[],
            std::collections::HashSet::new(),
            HashMap::new(),
            &[(11, 10)],
        );
        assert!(!parted.is_standalone_table(10));
        assert!(!parted.is_standalone_table(11));
    }

    #[test]
    fn unqualified_names_cover_every_schema() {
        let c = sample();
        assert_eq!(c.resolve(None, "accounts").len(), 2);
        assert_eq!(c.resolve(Some("audit"), "accounts").len(), 1);
        assert!(c.resolve(None, "nope").is_empty());
    }

    #[test]
    fn views_resolve_to_base_tables_recursively() {
        let c = sample();
        let mut deps = Vec::new();
        let richer = c.resolve(None, "richer")[0];
        c.read_dependencies(richer, &mut deps).expect("cacheable");
        assert_eq!(deps, vec![1]);
    }

    #[test]
    fn partitions_are_read_with_their_parent_and_written_through_it() {
        let relations = vec![
            rel(10, "public", "m", RelKind::Table),
            rel(11, "public", "m_2025", RelKind::Table),
            rel(12, "public", "m_2025_01", RelKind::Table),
        ];
        let c = Catalog::new(
            relations,
            &[],
            std::collections::HashSet::new(),
            HashMap::new(),
            &[(11, 10), (12, 11)],
        );
        let mut deps = Vec::new();
        c.read_dependencies(c.resolve(None, "m")[0], &mut deps)
            .expect("cacheable");
        deps.sort_unstable();
        assert_eq!(deps, vec![10, 11, 12]);
        let mut w = Vec::new();
        c.write_targets_by_oid(11, &mut w);
        w.sort_unstable();
        assert_eq!(w, vec![10, 11, 12]);
    }

    #[test]
    fn uncacheable_relations_say_why() {
        let c = sample();
        let mut deps = Vec::new();
        let why = |name: &str| c.read_dependencies(c.resolve(None, name)[0], &mut Vec::new());
        assert_eq!(why("secrets"), Err(Uncacheable::RowSecurity));
        assert_eq!(why("scratch"), Err(Uncacheable::Temporary));
        assert_eq!(why("seq"), Err(Uncacheable::Sequence));
        assert_eq!(why("pg_class"), Err(Uncacheable::SystemCatalog));
        assert_eq!(why("clock"), Err(Uncacheable::VolatileView));
        c.read_dependencies(c.resolve(None, "rich")[0], &mut deps)
            .expect("plain view");
    }
}
