//! Plain reads inside a held transaction (issue 13, part 2; ADR 0034): a read that
//! cannot observe the transaction's own held writes does not move it upstream. It is
//! answered as PostgreSQL's READ COMMITTED answers it at that moment (a snapshot of
//! what is committed when the statement starts): after the barrier a read-your-writes
//! read waits for (the pending deferred writes on the tables it reads), by PostgreSQL
//! outside the client's transaction, which stays held. Its ReadyForQuery carries the
//! held status (`tx.held_cycles`), and an error in it fails the held transaction, as it
//! would have failed PostgreSQL's.
//!
//! "Cannot observe": one plain SELECT (no FOR UPDATE/SHARE), calling no function and no
//! SQL value function (`now()` and the like are the transaction's, not a statement's),
//! every relation it reads known to the catalog and an ordinary table or view (views
//! and partitioned tables resolved to their base tables; no sequence, temporary,
//! foreign, system or row-security relation), none of them a table the transaction
//! wrote or one a foreign key action of those writes reaches; and no table it wrote
//! has triggers or rules. Anything else moves the transaction upstream as before, the
//! reason counted in `spillway_held_reads_total`.
//!
//! One exception to "none of them a table the transaction wrote" (ADR 0038): a point
//! read (one plain table, no inheritance, its whole one-column primary key fixed by
//! equalities, `read/cache/point.rs`) of a key none of the transaction's writes of that
//! table wrote. Every held write of a deferred table writes exactly the rows of its
//! keys (an UPDATE never assigns a key column; an upsert's arbiter is the primary key;
//! no triggers, rules or cascading foreign keys, checked above), so the one row such a
//! read can return is not one the transaction changed. The table must not be reached
//! otherwise (through a foreign key of another written table, or a parent written
//! through its partitions): then it still counts as `reads_held_writes`.
//!
//! Invariant: a read answered outside the transaction sees no state the transaction's
//! held writes could have changed, so running it outside, before them (a replay, if
//! the transaction later moves upstream, applies them after it) gives the answer
//! PostgreSQL would have given inside it.

use super::super::touch::Touch;
use super::super::{Caching, Disposition};
use crate::read::cache::point::{Params, point_key};
use crate::read::catalog::Catalog;
use crate::read::classify::{Analysis, Kind, Statement};
use crate::write::params::Bound;

/// Counts a plain read in a held transaction by `outcome`.
fn counted(outcome: &'static str) {
    metrics::counter!(crate::metrics::HELD_READS, "outcome" => outcome).increment(1);
}

/// A held table's name split as `schema.table`.
fn split(table: &str) -> (Option<&str>, &str) {
    match table.split_once('.') {
        Some((schema, name)) => (Some(schema), name),
        None => (None, table),
    }
}

impl Caching {
    /// A plain read while a transaction is held. `None`: not one (or it must move the
    /// transaction upstream; the reason is counted); `Some(None)`: it goes upstream
    /// now, outside the transaction; `Some(Some(d))`: it waits for its barrier first.
    pub(in super::super) fn held_read(
        &mut self,
        analysis: &Analysis,
        bound: &Bound,
    ) -> Option<Option<Disposition>> {
        let [stmt] = analysis.statements.as_slice() else {
            return None;
        };
        if analysis.unanalysed || !matches!(stmt.kind, Kind::Select) {
            return None;
        }
        let w = self.writes.as_ref()?.service.clone();
        let catalog = self.routing_catalog();
        let verdict = match catalog.as_deref() {
            Some(c) => self.outside_of_held(stmt, c, bound),
            None => Err("no_catalog"),
        };
        if let Err(reason) = verdict {
            counted(reason);
            return None;
        }
        if !self.wait.passed_barrier() {
            let touch = Touch::of(&w.tables(), catalog.as_deref(), &[analysis]);
            if let Some(target) = self.barrier_target(&w, &[analysis], &touch) {
                return Some(Some(self.barrier(target, false)));
            }
        }
        counted("outside");
        // Its ReadyForQuery carries the held transaction's status.
        self.tx
            .held_cycles
            .push_back(self.tracker.next_ready_index());
        Some(None)
    }

    /// Whether `stmt`, a plain SELECT, cannot observe the held transaction's writes
    /// (see the module documentation), or why it may.
    fn outside_of_held(
        &self,
        stmt: &Statement,
        catalog: &Catalog,
        bound: &Bound,
    ) -> Result<(), &'static str> {
        if stmt.locking {
            return Err("locking");
        }
        if !stmt.functions.is_empty() || stmt.sql_value_function {
            return Err("function");
        }
        let held = self.tx.held.as_ref().ok_or("not_held")?;
        // What the held writes may have changed: their tables (with their partitions
        // and inheritance children: a row written through the parent lands in one),
        // and the tables their foreign keys link them to. `by_key`: a standalone
        // table written directly, with the keys each of its statements wrote;
        // `reached`: every table reached otherwise.
        let mut written: Vec<u32> = Vec::new();
        let mut by_key: Vec<(u32, &[Vec<String>])> = Vec::new();
        let mut reached: Vec<u32> = Vec::new();
        for s in &held.stmts {
            let (schema, name) = split(&s.table);
            let relations = catalog.resolve(schema, name);
            if relations.is_empty() {
                return Err("relation");
            }
            for r in relations {
                if r.write_side_effects {
                    return Err("side_effects");
                }
                let mut deps = Vec::new();
                if catalog.read_dependencies(r, &mut deps).is_err() {
                    return Err("relation");
                }
                if deps == [r.oid] && catalog.is_standalone_table(r.oid) {
                    by_key.push((r.oid, &s.converted.keys));
                } else {
                    reached.extend_from_slice(&deps);
                }
                written.extend_from_slice(&deps);
                written.extend_from_slice(catalog.foreign_key_links(r.oid));
                reached.extend_from_slice(catalog.foreign_key_links(r.oid));
            }
        }
        for rel in &stmt.reads {
            let relations = catalog.resolve(rel.schema.as_deref(), &rel.name);
            if relations.is_empty() {
                return Err("relation");
            }
            for r in relations {
                let mut oids = Vec::new();
                if catalog.read_dependencies(r, &mut oids).is_err() {
                    return Err("relation");
                }
                if oids.iter().any(|o| written.contains(o))
                    && !other_key(stmt, catalog, r.oid, &oids, &by_key, &reached, bound)
                {
                    return Err("reads_held_writes");
                }
            }
        }
        Ok(())
    }
}

/// Whether `stmt` is a point read of table `oid` (its only relation, `oids` its
/// dependencies) by a one-column primary key that no held write of the table wrote,
/// the table reached by no held write otherwise (module documentation).
fn other_key(
    stmt: &Statement,
    catalog: &Catalog,
    oid: u32,
    oids: &[u32],
    by_key: &[(u32, &[Vec<String>])],
    reached: &[u32],
    bound: &Bound,
) -> bool {
    if oids != [oid] || stmt.reads.len() != 1 || reached.contains(&oid) {
        return false;
    }
    let Some(point) = stmt.point.as_ref().and_then(|f| point_key(f, oid, catalog)) else {
        return false;
    };
    let values: Vec<(bool, Option<&[u8]>)> = bound
        .values
        .iter()
        .enumerate()
        .map(|(i, v)| (bound.binary.get(i).copied().unwrap_or(false), v.as_deref()))
        .collect();
    let params = Params {
        declared: &bound.types,
        values: &values,
    };
    let Some(key) = point.resolve(&params) else {
        return false;
    };
    if key.len() != 1 {
        return false;
    }
    by_key
        .iter()
        .filter(|(t, _)| *t == oid)
        .all(|(_, keys)| keys.iter().all(|k| k.len() == 1 && *k != key))
}
