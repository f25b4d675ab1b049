//! Per-table version counters: the stale-fill guard and lazy invalidation of the read
//! cache.
//!
//! Every table (by OID, within one database) has a counter that only grows; every
//! database has an epoch that stands for "all of its tables". A write bumps the
//! counters of the tables it touches; an unknown side effect bumps the epoch. A cache
//! fill records the counters of everything it read *before* its query goes upstream
//! ([`Deps::capture`]) and is stored only if they are unchanged when the answer is
//! complete; an entry is served only while they are still unchanged. So an entry can
//! never outlive a write spillway saw, and a result computed concurrently with a write
//! is never stored.
//!
//! Invariant: counters are never reset or removed (a removed counter recreated at 0
//! could make an old entry look current again). Memory is one counter per table ever
//! touched, which is bounded by the catalog.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// One monotonic counter; shared by the registry and every entry that depends on it.
#[derive(Debug, Default)]
pub struct Version(AtomicU64);

impl Version {
    pub fn current(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    pub fn bump(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// The counters of one database.
#[derive(Debug, Default)]
pub struct DbVersions {
    epoch: Arc<Version>,
    /// Lock protects only the map; counters are atomics read and bumped without it.
    tables: RwLock<HashMap<u32, Arc<Version>>>,
}

impl DbVersions {
    /// The database-wide epoch: bumped when anything may have changed.
    pub fn epoch(&self) -> &Arc<Version> {
        &self.epoch
    }

    /// The counter of table `oid`, created on first use.
    pub fn table(&self, oid: u32) -> Arc<Version> {
        if let Ok(map) = self.tables.read()
            && let Some(v) = map.get(&oid)
        {
            return v.clone();
        }
        match self.tables.write() {
            Ok(mut map) => map.entry(oid).or_default().clone(),
            // A poisoned map cannot be trusted to hand out the shared counter: a fresh,
            // unshared one would let stale entries survive. Fall back to the epoch,
            // which every entry depends on.
            Err(_) => self.epoch.clone(),
        }
    }

    /// A write to these tables happened (or is about to be acknowledged).
    pub fn bump_tables(&self, oids: impl IntoIterator<Item = u32>) {
        for oid in oids {
            self.table(oid).bump();
        }
    }

    /// Anything in this database may have changed.
    pub fn bump_all(&self) {
        self.epoch.bump();
    }
}

/// The counters of every database spillway has seen, by database name.
#[derive(Debug, Default)]
pub struct Registry {
    dbs: RwLock<HashMap<String, Arc<DbVersions>>>,
}

impl Registry {
    pub fn database(&self, name: &str) -> Arc<DbVersions> {
        if let Ok(map) = self.dbs.read()
            && let Some(db) = map.get(name)
        {
            return db.clone();
        }
        match self.dbs.write() {
            Ok(mut map) => map.entry(name.to_owned()).or_default().clone(),
            Err(poisoned) => poisoned
                .into_inner()
                .entry(name.to_owned())
                .or_default()
                .clone(),
        }
    }

    /// Cluster-wide change (roles, `ALTER SYSTEM`, a lost invalidation feed).
    pub fn bump_everything(&self) {
        let dbs: Vec<Arc<DbVersions>> = match self.dbs.read() {
            Ok(map) => map.values().cloned().collect(),
            Err(poisoned) => poisoned.into_inner().values().cloned().collect(),
        };
        for db in dbs {
            db.bump_all();
        }
    }
}

/// The versions a result was computed against.
#[derive(Debug, Clone, Default)]
pub struct Deps {
    items: Vec<(Arc<Version>, u64)>,
}

impl Deps {
    /// Records the current value of each counter. Call before the query goes upstream.
    pub fn capture<'a>(versions: impl IntoIterator<Item = &'a Arc<Version>>) -> Self {
        Self {
            items: versions
                .into_iter()
                .map(|v| (v.clone(), v.current()))
                .collect(),
        }
    }

    /// No counter moved since capture.
    pub fn is_current(&self) -> bool {
        self.items.iter().all(|(v, seen)| v.current() == *seen)
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bump_makes_captured_deps_stale() {
        let reg = Registry::default();
        let db = reg.database("app");
        let t = db.table(42);
        let deps = Deps::capture([db.epoch(), &t]);
        assert!(deps.is_current());
        db.bump_tables([7]);
        assert!(deps.is_current(), "another table does not matter");
        db.bump_tables([42]);
        assert!(!deps.is_current());
    }

    #[test]
    fn epoch_covers_every_table() {
        let reg = Registry::default();
        let db = reg.database("app");
        let deps = Deps::capture([db.epoch(), &db.table(1)]);
        reg.bump_everything();
        assert!(!deps.is_current());
    }

    #[test]
    fn counters_are_shared_per_database() {
        let reg = Registry::default();
        let a = reg.database("a").table(1);
        let again = reg.database("a").table(1);
        let other = reg.database("b").table(1);
        assert!(Arc::ptr_eq(&a, &again));
        assert!(!Arc::ptr_eq(&a, &other));
    }
}
