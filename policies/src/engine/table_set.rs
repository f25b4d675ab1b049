//! Which tables the engine defers, as one immutable [`TableSet`] behind an `ArcSwap`,
//! and how a reload changes it (SPEC §7: "leaving a deferred policy flushes first").
//!
//! Sessions and the flusher read the set with one atomic load and never lock it; a
//! reload builds a new set and swaps it in. A reload runs in two steps:
//!
//! 1. [`Engine::begin_reload`] installs the new set with every table that leaves
//!    deferral still in it, marked *leaving*: no new write to it is deferred, but
//!    anything that touches it waits for its pending writes first (a strong barrier),
//!    exactly as for a deferred table.
//! 2. [`Engine::drain_leaving`] waits until no deferral of a leaving table is in
//!    flight (decided but not yet pending) and everything pending up to then is applied
//!    upstream; [`Engine::finish_reload`] then drops the leaving tables, and their
//!    statements run write-through with nothing of theirs still pending.
//!
//! Invariants:
//! - A table's write is deferred only while the table is in the set and not leaving;
//!   the check and the in-flight count happen under the state lock, and the swap of
//!   step 1 takes that lock too, so after step 1 no new record of a leaving table can
//!   appear once its in-flight count reached zero.
//! - `metas` and `oids` only grow (an entry is replaced when a table re-enters
//!   deferral, never removed): the flusher plans and invalidates records of a table
//!   that left deferral with the facts it was journaled under.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use super::table::DeferredTable;
use super::{Checks, DeferError, Engine, Log};
use crate::writes::TableMeta;
use crate::{Consistency, FlushConfig, Policy, TableConfig};

/// The deferred tables at one moment.
#[derive(Default)]
pub struct TableSet {
    /// Deferred tables and those leaving deferral (see `leaving`), by `schema.name`.
    tables: HashMap<String, Arc<DeferredTable>>,
    /// Tables in `tables` whose writes are no longer deferred (a reload moves them off
    /// a deferred policy); they still get barriers until their pending writes are in.
    leaving: HashSet<String>,
    by_oid: HashMap<u32, String>,
    /// Catalog facts of every table deferred since start (the flush planner's input).
    pub(super) metas: HashMap<String, TableMeta>,
    /// OIDs of every table deferred since start (cache invalidation after a flush).
    oids: HashMap<String, u32>,
}

impl TableSet {
    pub(super) fn new(tables: HashMap<String, DeferredTable>) -> Self {
        let mut set = TableSet::default();
        for (name, t) in tables {
            set.insert(name, Arc::new(t));
        }
        set
    }

    fn insert(&mut self, name: String, t: Arc<DeferredTable>) {
        self.by_oid.insert(t.oid, name.clone());
        self.metas.insert(name.clone(), t.meta.clone());
        self.oids.insert(name.clone(), t.oid);
        self.tables.insert(name, t);
    }

    /// A set with the same history (`metas`, `oids`) and no tables yet.
    fn successor(&self) -> Self {
        TableSet {
            metas: self.metas.clone(),
            oids: self.oids.clone(),
            ..TableSet::default()
        }
    }

    /// The table if writes to it are deferred now (not when it is leaving deferral).
    pub fn deferring(&self, name: &str) -> Option<&Arc<DeferredTable>> {
        self.tables
            .get(name)
            .filter(|_| !self.leaving.contains(name))
    }

    /// The deferred or leaving table with this OID (barriers cover both).
    pub fn name_of(&self, oid: u32) -> Option<&str> {
        self.by_oid.get(&oid).map(String::as_str)
    }

    /// Every deferred or leaving table.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tables.keys()
    }

    /// Deferred or leaving tables a name may denote when no catalog is at hand.
    pub fn names_like(&self, schema: Option<&str>, name: &str) -> Vec<String> {
        self.tables
            .values()
            .filter(|t| t.meta.table == name && schema.is_none_or(|s| s == t.meta.schema))
            .map(|t| t.meta.name.clone())
            .collect()
    }

    /// When reads of `name` wait for its pending writes: its `consistency`, and always
    /// (`strong`) while it leaves deferral, so that nobody reads around its last
    /// pending writes once it runs write-through.
    pub fn consistency(&self, name: &str) -> Consistency {
        match self.tables.get(name) {
            Some(t) if !self.leaving.contains(name) => t.config.consistency,
            _ => Consistency::Strong,
        }
    }

    /// The OID of a table deferred at some point since start.
    pub fn oid_of(&self, name: &str) -> Option<u32> {
        self.oids.get(name).copied()
    }

    /// Whether `table` is write-back (its operations fold per key at flush).
    pub fn coalesces(&self, table: &str) -> bool {
        self.metas.get(table).is_some_and(|m| m.coalesce)
    }

    /// How long the flusher may sleep: `interval`, or less when a table with
    /// `consistency = "bounded"` promises a shorter `max_staleness` (its readers skip
    /// barriers, so the flusher is what bounds how old their view can be).
    pub fn tick(&self, flush: &FlushConfig) -> Duration {
        self.tables
            .iter()
            .filter(|(n, t)| {
                !self.leaving.contains(*n) && t.config.consistency == Consistency::Bounded
            })
            .map(|(_, t)| t.config.max_staleness / 2)
            .fold(flush.interval, Duration::min)
            .max(Duration::from_millis(1))
    }
}

/// What a reload asks of the write side.
pub struct TablesChange {
    /// The new `[tables.*]` of every table that stays or becomes deferred.
    pub configs: HashMap<String, TableConfig>,
    /// Tables that become deferred, already checked against the catalog.
    pub entering: HashMap<String, DeferredTable>,
}

impl<C: Checks, L: Log> Engine<C, L> {
    /// Names of the deferred tables (not those leaving deferral).
    pub fn deferred_names(&self) -> Vec<String> {
        let set = self.tables.load();
        set.tables
            .keys()
            .filter(|n| !set.leaving.contains(*n))
            .cloned()
            .collect()
    }

    /// Step 1 of a reload: installs the new set, with tables that leave deferral
    /// marked leaving; returns their names and the set that was in force before
    /// (for [`Engine::restore`]).
    pub fn begin_reload(&self, change: TablesChange) -> (Vec<String>, Arc<TableSet>) {
        // The state lock orders this swap against `enter` (see the module invariants).
        let state = self.state();
        let old = self.tables.load_full();
        let mut next = old.successor();
        let mut leaving = Vec::new();
        for (name, t) in &old.tables {
            match change.configs.get(name) {
                Some(config) => {
                    let mut t = DeferredTable::clone(t);
                    t.config = config.clone();
                    // Between write-behind and write-back: records still pending are
                    // applied under the new policy (the reload made sure they were all
                    // acknowledged with exact row counts, see `reload.rs`).
                    t.meta.coalesce = config.policy == Policy::WriteBack;
                    next.insert(name.clone(), Arc::new(t));
                }
                None => {
                    next.insert(name.clone(), t.clone());
                    next.leaving.insert(name.clone());
                    leaving.push(name.clone());
                }
            }
        }
        for (name, t) in change.entering {
            next.insert(name, Arc::new(t));
        }
        self.tables.store(Arc::new(next));
        drop(state);
        self.keys.sync(&self.tables.load());
        // Bounded tables may have changed: the flusher recomputes its sleep.
        self.wake.notify_one();
        (leaving, old)
    }

    /// Step 2: returns once no deferral of a `leaving` table is in flight and every
    /// record pending until then is applied upstream.
    pub async fn drain_leaving(&self, leaving: &[String]) -> Result<(), DeferError> {
        if leaving.is_empty() {
            return Ok(());
        }
        loop {
            if let Some(cause) = self.poisoned.get() {
                return Err(DeferError::Stopped(cause.clone()));
            }
            let busy = {
                let state = self.state();
                leaving
                    .iter()
                    .any(|t| state.inflight.get(t).is_some_and(|n| *n > 0))
            };
            if !busy {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // No record of a leaving table can become pending from here on.
        if let Some(target) = self.barrier_target(leaving.iter().map(String::as_str)) {
            tracing::info!(
                tables = ?leaving, through = target,
                "reload: flushing the pending writes of tables leaving a deferred policy"
            );
            self.wait_applied(target).await?;
        }
        Ok(())
    }

    /// Step 3: the leaving tables are gone from the set (their metadata stays).
    pub fn finish_reload(&self) {
        let _state = self.state();
        let old = self.tables.load_full();
        let mut next = old.successor();
        for (name, t) in &old.tables {
            if !old.leaving.contains(name) {
                next.insert(name.clone(), t.clone());
            }
        }
        self.tables.store(Arc::new(next));
        self.keys.sync(&self.tables.load());
    }

    /// Puts back the set of before a reload that could not finish.
    pub fn restore(&self, set: Arc<TableSet>) {
        let _state = self.state();
        self.tables.store(set);
        self.keys.sync(&self.tables.load());
        self.wake.notify_one();
    }

    /// Installs new `[flush]` settings; the flusher uses them from its next round.
    pub fn set_flush(&self, flush: FlushConfig) {
        self.flush.store(Arc::new(flush));
        self.wake.notify_one();
    }

    /// Counts a deferral of `table` in flight, if writes to it are deferred now.
    pub(super) fn enter(
        self: &Arc<Self>,
        table: &str,
    ) -> Result<(Arc<DeferredTable>, InFlight<C, L>), DeferError> {
        let mut state = self.state();
        let Some(t) = self.tables.load().deferring(table).cloned() else {
            return Err(DeferError::NotDeferred(table.to_owned()));
        };
        *state.inflight.entry(table.to_owned()).or_default() += 1;
        Ok((
            t,
            InFlight {
                engine: self.clone(),
                table: table.to_owned(),
            },
        ))
    }
}

/// One deferral of a table between its decision and its record being pending (or
/// given up); a reload waits for these before it flushes a table leaving deferral.
pub struct InFlight<C: Checks, L: Log> {
    engine: Arc<Engine<C, L>>,
    table: String,
}

impl<C: Checks, L: Log> Drop for InFlight<C, L> {
    fn drop(&mut self) {
        let mut state = self.engine.state();
        if let Some(n) = state.inflight.get_mut(&self.table) {
            *n = n.saturating_sub(1);
        }
    }
}
