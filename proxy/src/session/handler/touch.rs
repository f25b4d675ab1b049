//! Which deferred tables a request touches (`Touch`): read, written or altered by
//! name, resolved through the catalog (views and partitions to their base tables,
//! foreign keys to the tables their actions reach), or by name alone without one; and
//! the one deferred table a write's shape names (`target`).
//!
//! Invariant: whatever may touch anything (unanalysed text, unknown side effects,
//! DDL without named tables) touches every deferred table.

use crate::read::catalog::Catalog;
use crate::read::classify::{Analysis, Kind};
use crate::write::fallbacks::Fallback;
use crate::write::service::TableSet;

/// The deferred tables a request touches, and those a write that runs upstream
/// reaches beyond them.
#[derive(Default)]
pub(super) struct Touch {
    /// Read, written or altered, by name.
    pub(super) tables: Vec<String>,
    /// It may touch any table (unanalysed, unknown side effects, DDL without named
    /// targets).
    pub(super) all: bool,
    /// Those a foreign key links a written table to (its checks and actions read and
    /// write them).
    pub(super) linked: Vec<String>,
    /// A written table has triggers or rules: it may reach any table.
    pub(super) linked_all: bool,
}

impl Touch {
    pub(super) fn of(set: &TableSet, catalog: Option<&Catalog>, analyses: &[&Analysis]) -> Self {
        let mut touch = Touch::default();
        for a in analyses {
            touched(set, catalog, a, &mut touch);
        }
        if let Some(catalog) = catalog {
            for a in analyses {
                linked(set, catalog, a, &mut touch);
            }
        }
        touch
    }

    pub(super) fn is_empty(&self) -> bool {
        self.tables.is_empty() && !self.all && self.linked.is_empty() && !self.linked_all
    }
}

fn push(out: &mut Vec<String>, name: &str) {
    if !out.iter().any(|n| n == name) {
        out.push(name.to_owned());
    }
}

/// The deferred tables `analysis` touches (read, written, or altered).
fn touched(set: &TableSet, catalog: Option<&Catalog>, analysis: &Analysis, touch: &mut Touch) {
    if analysis.unanalysed {
        touch.all = true;
        return;
    }
    for stmt in &analysis.statements {
        // A user-defined volatile function (or one spillway does not know) may
        // write any table; so may DO, CALL and the like.
        let may_write_anything = stmt.functions.iter().any(|f| {
            catalog
                .and_then(|c| c.function(&f.name))
                .is_none_or(|info| info.user_volatile)
        });
        if matches!(stmt.kind, Kind::Unknown) || may_write_anything {
            touch.all = true;
        }
        if matches!(stmt.kind, Kind::Ddl { .. }) && stmt.ddl_targets.is_empty() {
            touch.all = true;
        }
        for rel in stmt
            .reads
            .iter()
            .chain(&stmt.writes)
            .chain(&stmt.ddl_targets)
        {
            match catalog {
                Some(c) => {
                    for r in c.resolve(rel.schema.as_deref(), &rel.name) {
                        let mut oids = vec![r.oid];
                        let _ = c.read_dependencies(r, &mut oids);
                        // Pending writes to a table one of these references change
                        // them when applied (ON DELETE / ON UPDATE actions).
                        let read = oids.clone();
                        for oid in read {
                            oids.extend_from_slice(c.foreign_key_parents(oid));
                        }
                        for oid in oids {
                            if let Some(name) = set.name_of(oid) {
                                push(&mut touch.tables, name);
                            }
                        }
                    }
                }
                // No catalog: match deferred tables by name alone.
                None => {
                    for name in set.names_like(rel.schema.as_deref(), &rel.name) {
                        push(&mut touch.tables, &name);
                    }
                }
            }
        }
    }
}

/// The deferred tables a write in `analysis` reaches beyond its own tables. Only a
/// write that runs upstream needs them applied first.
fn linked(set: &TableSet, catalog: &Catalog, analysis: &Analysis, touch: &mut Touch) {
    for stmt in &analysis.statements {
        if !matches!(
            stmt.kind,
            Kind::Write | Kind::Truncate { .. } | Kind::Ddl { .. }
        ) {
            continue;
        }
        for rel in stmt.writes.iter().chain(&stmt.ddl_targets) {
            for r in catalog.resolve(rel.schema.as_deref(), &rel.name) {
                touch.linked_all |= r.write_side_effects;
                for oid in catalog.foreign_key_links(r.oid) {
                    if let Some(name) = set.name_of(*oid) {
                        push(&mut touch.linked, name);
                    }
                }
            }
        }
    }
}

/// The deferred tables among `touched` that `analysis` writes (for the fallback
/// counters), by the last part of their names.
pub(super) fn written<'a>(analysis: &Analysis, touched: &'a [String]) -> Vec<&'a String> {
    analysis
        .statements
        .iter()
        .filter(|s| matches!(s.kind, Kind::Write | Kind::Truncate { .. }))
        .flat_map(|s| s.writes.iter())
        .filter_map(|rel| {
            touched
                .iter()
                .find(|t| t.ends_with(&format!(".{}", rel.name)))
        })
        .collect()
}

/// The one deferred table a write's shape names, if it resolves to exactly one.
pub(super) fn target<'a>(
    set: &'a TableSet,
    catalog: &Catalog,
    schema: Option<&str>,
    name: &str,
) -> Result<&'a str, Fallback> {
    let candidates = catalog.resolve(schema, name);
    let [relation] = candidates.as_slice() else {
        return Err(Fallback::AmbiguousTable);
    };
    set.name_of(relation.oid).ok_or(Fallback::NotDeferred)
}
