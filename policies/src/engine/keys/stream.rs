//! The key index as the change stream's sink: committed transactions move keys (or
//! start a table's load over), `passed` (an idle stream's position) counts as a commit
//! at that position for loads and pins waiting on it, `lost` drops every table's
//! index, `resumed` loads them again (the rules are in the parent module's header).

use std::collections::{HashMap, HashSet};

use super::{KeyIndex, Phase};
use crate::changes::{Change, ChangeSink, Commit};

impl ChangeSink for KeyIndex {
    fn committed(&self, commit: &Commit) {
        let mut ix = self.lock();
        let ix = &mut *ix;
        if commit.database != ix.database || !ix.following {
            return;
        }
        ix.position = Some(ix.position.map_or(commit.lsn, |p| p.max(commit.lsn)));
        if ix.batches.release(commit.lsn) {
            ix.sweep_pins();
        }
        let mut restarted = false;
        // Whole-table changes first: the table loads again, and this commit is visible
        // to every chunk of that load.
        for change in &commit.changes {
            if let Change::Table { table } = change
                && let Some(t) = ix.tables.get_mut(&table.name)
                && t.has_data()
            {
                restarted |= t.restart();
            }
        }
        // Each key's state once the whole transaction is in.
        let mut last: HashMap<(&str, Vec<String>), bool> = HashMap::new();
        for change in &commit.changes {
            match change {
                Change::Insert { table, key } => {
                    last.insert((&table.name, key.clone()), true);
                }
                Change::Delete { table, key } => {
                    last.insert((&table.name, key.clone()), false);
                }
                Change::Update {
                    table,
                    key,
                    old_key,
                } => {
                    if let Some(old) = old_key.as_ref().filter(|o| *o != key) {
                        last.insert((&table.name, old.clone()), false);
                    }
                    last.insert((&table.name, key.clone()), true);
                }
                Change::Table { .. } => {}
            }
        }
        let released = ix.batches.released;
        let mut changed: HashSet<&str> = HashSet::new();
        for ((table, key), exists) in last {
            let Some(t) = ix.tables.get_mut(table).filter(|t| t.has_data()) else {
                continue;
            };
            changed.insert(table);
            match t.key(&key) {
                Some(key) => t.deliver(key, exists, commit.own, released),
                None => restarted |= t.restart(),
            }
        }
        // Tables waiting for the stream to pass their load's start.
        let waiting: Vec<String> = ix
            .tables
            .iter()
            .filter(|(name, t)| {
                changed.contains(name.as_str()) || (t.phase == Phase::Loading && t.load.chunks_done)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in waiting {
            ix.settle(&name);
        }
        if restarted {
            self.wake.notify_one();
        }
    }

    fn passed(&self, database: &str, lsn: u64) {
        let mut ix = self.lock();
        let ix = &mut *ix;
        if database != ix.database || !ix.following || ix.position.is_some_and(|p| p >= lsn) {
            return;
        }
        // As a commit at `lsn` would: every change before it is in.
        ix.position = Some(lsn);
        if ix.batches.release(lsn) {
            ix.sweep_pins();
        }
        let waiting: Vec<String> = ix
            .tables
            .iter()
            .filter(|(_, t)| t.phase == Phase::Loading && t.load.chunks_done)
            .map(|(name, _)| name.clone())
            .collect();
        for name in waiting {
            ix.settle(&name);
        }
    }

    fn lost(&self, database: &str) {
        let mut ix = self.lock();
        if database != ix.database {
            return;
        }
        ix.following = false;
        ix.position = None;
        // Batch numbers go on (a position read for an earlier batch may still come);
        // nothing is pinned any more.
        ix.batches.positions.clear();
        ix.batches.released = ix.batches.last;
        for t in ix.tables.values_mut().filter(|t| t.phase != Phase::Off) {
            t.reset(Phase::Untrusted);
        }
        tracing::info!(
            database,
            "change stream lost: the key index is dropped; exact row counts use point reads"
        );
    }

    fn resumed(&self, database: &str) {
        let mut ix = self.lock();
        if database != ix.database {
            return;
        }
        ix.following = true;
        ix.position = None;
        let mut load = false;
        for t in ix.tables.values_mut() {
            load |= t.restart();
        }
        drop(ix);
        if load {
            self.wake.notify_one();
        }
    }
}
