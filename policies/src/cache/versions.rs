//! Version counters: the stale-fill guard and lazy invalidation of the read cache, per
//! table and per row.
//!
//! Every database has an epoch that stands for "all of its tables". Every table (by
//! OID, within one database) has three kinds of counters, each only growing:
//! - `any`, bumped by every write to the table: what a result that reads the table as
//!   a whole depends on;
//! - `whole`, bumped by writes whose keys are not known (other predicates, triggers,
//!   TRUNCATE, DDL, a notification): with one stripe, what a point read depends on;
//! - [`STRIPES`] striped counters: a write with known keys bumps the stripe of each key
//!   (by a hash of its canonical text) and `any`, never `whole`.
//!
//! A cache fill records the counters of everything it read *before* its query goes
//! upstream ([`Deps`]) and is stored only if they are unchanged when the answer is
//! complete; an entry is served only while they are still unchanged. So an entry can
//! never outlive a write spillway heard of, and a result computed concurrently with a
//! write is never stored. A point read that fixes a table's primary key depends on
//! the epoch, `whole` and its key's stripe: a write to another key of another stripe
//! leaves it current; one of the same stripe (a false share) only invalidates more.
//!
//! Invariants: counters are never reset or removed (a removed counter recreated at 0
//! could make an old entry look current again). Memory is one [`TableVersions`] per
//! table ever touched (bounded by the catalog), plus [`STRIPES`] counters (8 bytes
//! each) for each table that had a point read or a keyed write.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

/// Striped counters per table: a write with a known key bumps one of them.
pub const STRIPES: usize = 1024;

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

/// The counters of one table (see the module docs).
#[derive(Debug, Default)]
pub struct TableVersions {
    any: Arc<Version>,
    whole: Arc<Version>,
    /// Allocated on first keyed use; never replaced.
    stripes: OnceLock<Arc<[AtomicU64]>>,
}

impl TableVersions {
    /// What a result reading the whole table depends on.
    pub fn any(&self) -> &Arc<Version> {
        &self.any
    }

    /// Bumped only by writes whose keys are unknown.
    pub fn whole(&self) -> &Arc<Version> {
        &self.whole
    }

    fn stripes(&self) -> &Arc<[AtomicU64]> {
        self.stripes
            .get_or_init(|| (0..STRIPES).map(|_| AtomicU64::new(0)).collect())
    }

    /// A write whose keys are unknown.
    pub fn bump_whole(&self) {
        self.whole.bump();
        self.any.bump();
    }

    /// A write to the row with this key (canonical text, one part per key column).
    pub fn bump_key<S: AsRef<str>>(&self, key: &[S]) {
        let stripes = self.stripes();
        stripes[stripe_of(key)].fetch_add(1, Ordering::SeqCst);
        self.any.bump();
    }
}

/// The stripe of a key: a hash of its parts, each length-prefixed so that `("ab",
/// "c")` and `("a", "bc")` differ. `DefaultHasher::new()` has fixed keys, so a key's
/// stripe is the same everywhere in the process.
pub fn stripe_of<S: AsRef<str>>(key: &[S]) -> usize {
    let mut h = DefaultHasher::new();
    key.len().hash(&mut h);
    for part in key {
        let part = part.as_ref();
        part.len().hash(&mut h);
        h.write(part.as_bytes());
    }
    // STRIPES is a power of two far below u64::MAX: the cast keeps the low bits.
    usize::try_from(h.finish() % STRIPES as u64).unwrap_or(0)
}

/// The counters of one database.
#[derive(Debug, Default)]
pub struct DbVersions {
    epoch: Arc<Version>,
    /// Invalidations of single keys and of whole tables so far (metrics).
    keys_bumped: AtomicU64,
    tables_bumped: AtomicU64,
    /// Lock protects only the map; counters are atomics read and bumped without it.
    tables: RwLock<HashMap<u32, Arc<TableVersions>>>,
}

impl DbVersions {
    /// The database-wide epoch: bumped when anything may have changed.
    pub fn epoch(&self) -> &Arc<Version> {
        &self.epoch
    }

    /// What a result reading table `oid` as a whole depends on (its `any` counter).
    pub fn table(&self, oid: u32) -> Arc<Version> {
        self.table_versions(oid).any.clone()
    }

    /// The counters of table `oid`, created on first use.
    pub fn table_versions(&self, oid: u32) -> Arc<TableVersions> {
        if let Ok(map) = self.tables.read()
            && let Some(v) = map.get(&oid)
        {
            return v.clone();
        }
        // A poisoned map still holds the shared counters (a panic cannot leave an
        // entry half inserted), so it is used as is.
        let mut map = match self.tables.write() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry(oid).or_default().clone()
    }

    /// Writes with unknown keys happened to these tables (or are about to be
    /// acknowledged).
    pub fn bump_tables(&self, oids: impl IntoIterator<Item = u32>) {
        for oid in oids {
            self.table_versions(oid).bump_whole();
            self.tables_bumped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A write to the row of table `oid` with this key.
    pub fn bump_key<S: AsRef<str>>(&self, oid: u32, key: &[S]) {
        self.table_versions(oid).bump_key(key);
        self.keys_bumped.fetch_add(1, Ordering::Relaxed);
    }

    /// Invalidations so far: (single keys, whole tables).
    pub fn invalidations(&self) -> (u64, u64) {
        (
            self.keys_bumped.load(Ordering::Relaxed),
            self.tables_bumped.load(Ordering::Relaxed),
        )
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

    /// Invalidations of every database so far: (single keys, whole tables).
    pub fn invalidations(&self) -> (u64, u64) {
        let map = match self.dbs.read() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.values()
            .map(|db| db.invalidations())
            .fold((0, 0), |(k, t), (dk, dt)| (k + dk, t + dt))
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

/// One counter a result depends on.
#[derive(Debug, Clone)]
enum Counter {
    One(Arc<Version>),
    /// Stripe `.1` of a table's striped counters.
    Stripe(Arc<[AtomicU64]>, usize),
}

impl Counter {
    fn current(&self) -> u64 {
        match self {
            Counter::One(v) => v.current(),
            Counter::Stripe(s, i) => s.get(*i).map_or(u64::MAX, |c| c.load(Ordering::SeqCst)),
        }
    }
}

/// The versions a result was computed against.
#[derive(Debug, Clone, Default)]
pub struct Deps {
    items: Vec<(Counter, u64)>,
}

impl Deps {
    /// Records the current value of each counter. Call before the query goes upstream.
    pub fn capture<'a>(versions: impl IntoIterator<Item = &'a Arc<Version>>) -> Self {
        Self {
            items: versions
                .into_iter()
                .map(|v| (Counter::One(v.clone()), v.current()))
                .collect(),
        }
    }

    /// Adds the dependency of a point read on the row of `table` with this key:
    /// writes with unknown keys and writes to the key's stripe. Call before the
    /// query goes upstream.
    pub fn add_key<S: AsRef<str>>(&mut self, table: &TableVersions, key: &[S]) {
        self.items
            .push((Counter::One(table.whole.clone()), table.whole.current()));
        let stripes = table.stripes().clone();
        let i = stripe_of(key);
        let seen = stripes[i].load(Ordering::SeqCst);
        self.items.push((Counter::Stripe(stripes, i), seen));
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

    /// Two keys of different stripes (found by search: the hash is fixed).
    fn keys_in_two_stripes() -> (String, String) {
        let first = "1".to_owned();
        let other = (2..)
            .map(|i: u32| i.to_string())
            .find(|k| stripe_of(&[k]) != stripe_of(&[&first]))
            .expect("another stripe");
        (first, other)
    }

    #[test]
    fn a_point_read_depends_on_its_key_only() {
        let reg = Registry::default();
        let db = reg.database("app");
        let t = db.table_versions(5);
        let (k1, k2) = keys_in_two_stripes();
        let mut point = Deps::capture([db.epoch()]);
        point.add_key(&t, &[&k1]);
        let whole = Deps::capture([db.epoch(), t.any()]);
        db.bump_key(5, &[&k2]);
        assert!(point.is_current(), "another key's write leaves it current");
        assert!(
            !whole.is_current(),
            "a read of the whole table is invalidated"
        );
        db.bump_key(5, &[&k1]);
        assert!(!point.is_current(), "its own key's write invalidates it");
    }

    #[test]
    fn a_write_with_unknown_keys_invalidates_point_reads() {
        let reg = Registry::default();
        let db = reg.database("app");
        let t = db.table_versions(5);
        let mut point = Deps::capture([db.epoch()]);
        point.add_key(&t, &["1"]);
        db.bump_tables([5]);
        assert!(!point.is_current());
        let mut point = Deps::capture([db.epoch()]);
        point.add_key(&t, &["1"]);
        db.bump_all();
        assert!(!point.is_current());
    }

    #[test]
    fn key_parts_are_delimited() {
        // Equal concatenations, different keys (with this fixed hash they also land in
        // different stripes; a bare concatenation would always collide).
        assert_ne!(stripe_of(&["ab", "c"]), stripe_of(&["a", "bc"]));
        assert_ne!(stripe_of(&["1", "23"]), stripe_of(&["12", "3"]));
    }
}
