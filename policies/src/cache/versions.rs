//! Version counters: the stale-fill guard and lazy invalidation of the read cache, per
//! table and per row.
//!
//! Every database has an epoch that stands for "all of its tables". Every table (by
//! OID, within one database) has three kinds of counters, each only growing:
//! - `any`, bumped by every write to the table: what a result that reads the table as
//!   a whole depends on;
//! - `whole`, bumped by writes whose keys are not known (other predicates, triggers,
//!   TRUNCATE, DDL, a notification): with one stripe, what a point read depends on;
//! - a share of the process's row stripes: a write with known keys bumps the stripe
//!   of each key (a hash of the database, the table and the key's canonical text) and
//!   `any`, never `whole`.
//!
//! A cache fill records the counters of everything it read *before* its query goes
//! upstream ([`Deps`]) and is stored only if they are unchanged when the answer is
//! complete; an entry is served only while they are still unchanged. So an entry can
//! never outlive a write spillway heard of, and a result computed concurrently with a
//! write is never stored. A point read that fixes a table's primary key depends on
//! the epoch, `whole` and its key's stripe: a write to a key of another stripe leaves
//! it current; one of the same stripe (a false share) only invalidates more.
//!
//! Row stripes are one array for the whole process ([`Registry::with_row_stripes`]),
//! sized from the cache's byte budget ([`row_stripes_for`]: one counter per 256 bytes,
//! fewer than one entry per stripe when the cache is full of point reads). With 1,024
//! stripes per table, as before, a write to a 100,000-row table falsely invalidated
//! about 100 cached rows, and a read-mostly load with 5% writes hit 13% of the time.
//!
//! Invariants: counters are never reset or removed (a removed counter recreated at 0
//! could make an old entry look current again). Memory is one [`TableVersions`] per
//! table ever touched (bounded by the catalog), plus the row stripes (8 bytes each),
//! allocated once.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Row stripes when the cache's size does not choose (tests, a `Registry::default()`).
pub const DEFAULT_ROW_STRIPES: usize = 1 << 16;

/// The row stripes for a cache of `cache_bytes`: one counter per 256 bytes (a cached
/// point read costs more than that, so a full cache has fewer entries than stripes), a
/// power of two between 1,024 and 4 Mi (32 MiB of counters).
pub fn row_stripes_for(cache_bytes: u64) -> usize {
    let wanted = usize::try_from(cache_bytes / 256).unwrap_or(usize::MAX);
    wanted.clamp(1 << 10, 1 << 22).next_power_of_two()
}

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
#[derive(Debug)]
pub struct TableVersions {
    any: Arc<Version>,
    whole: Arc<Version>,
    /// The process's row stripes (a power-of-two count), shared with every table.
    stripes: Arc<[AtomicU64]>,
    /// Mixed into each key's hash: the database and the table.
    salt: u64,
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

    /// A write whose keys are unknown.
    pub fn bump_whole(&self) {
        self.whole.bump();
        self.any.bump();
    }

    /// A write to the row with this key (canonical text, one part per key column).
    pub fn bump_key<S: AsRef<str>>(&self, key: &[S]) {
        if let Some(c) = self.stripes.get(self.stripe_of(key)) {
            c.fetch_add(1, Ordering::SeqCst);
        }
        self.any.bump();
    }

    /// The stripe of a key of this table: a hash of the table's salt and the key's
    /// parts, each length-prefixed so that `("ab", "c")` and `("a", "bc")` differ.
    /// `DefaultHasher::new()` has fixed keys, so a key's stripe is the same everywhere
    /// in the process.
    pub fn stripe_of<S: AsRef<str>>(&self, key: &[S]) -> usize {
        let mut h = DefaultHasher::new();
        self.salt.hash(&mut h);
        key.len().hash(&mut h);
        for part in key {
            let part = part.as_ref();
            part.len().hash(&mut h);
            h.write(part.as_bytes());
        }
        // The count is a power of two: the mask keeps the low bits of the hash.
        let mask = self.stripes.len().saturating_sub(1) as u64;
        usize::try_from(h.finish() & mask).unwrap_or(0)
    }
}

/// The counters of one database.
#[derive(Debug)]
pub struct DbVersions {
    epoch: Arc<Version>,
    /// The process's row stripes, and this database's part of each table's salt.
    stripes: Arc<[AtomicU64]>,
    salt: u64,
    /// Invalidations of single keys and of whole tables so far (metrics).
    keys_bumped: AtomicU64,
    tables_bumped: AtomicU64,
    /// Lock protects only the map; counters are atomics read and bumped without it.
    tables: RwLock<HashMap<u32, Arc<TableVersions>>>,
}

impl DbVersions {
    fn new(name: &str, stripes: Arc<[AtomicU64]>) -> Self {
        let mut h = DefaultHasher::new();
        name.hash(&mut h);
        Self {
            epoch: Arc::default(),
            stripes,
            salt: h.finish(),
            keys_bumped: AtomicU64::new(0),
            tables_bumped: AtomicU64::new(0),
            tables: RwLock::default(),
        }
    }

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
        map.entry(oid)
            .or_insert_with(|| {
                let mut h = DefaultHasher::new();
                (self.salt, oid).hash(&mut h);
                Arc::new(TableVersions {
                    any: Arc::default(),
                    whole: Arc::default(),
                    stripes: self.stripes.clone(),
                    salt: h.finish(),
                })
            })
            .clone()
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

/// The counters of every database spillway has seen, by database name, and the row
/// stripes they share.
#[derive(Debug)]
pub struct Registry {
    dbs: RwLock<HashMap<String, Arc<DbVersions>>>,
    stripes: Arc<[AtomicU64]>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::with_row_stripes(DEFAULT_ROW_STRIPES)
    }
}

impl Registry {
    /// A registry with `count` row stripes (rounded up to a power of two, at least 2).
    pub fn with_row_stripes(count: usize) -> Self {
        let count = count.max(2).next_power_of_two();
        Self {
            dbs: RwLock::default(),
            stripes: (0..count).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// How many row stripes there are (for the docs' memory figures and tests).
    pub fn row_stripes(&self) -> usize {
        self.stripes.len()
    }

    pub fn database(&self, name: &str) -> Arc<DbVersions> {
        if let Ok(map) = self.dbs.read()
            && let Some(db) = map.get(name)
        {
            return db.clone();
        }
        let mut map = match self.dbs.write() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry(name.to_owned())
            .or_insert_with(|| Arc::new(DbVersions::new(name, self.stripes.clone())))
            .clone()
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
    /// Stripe `.1` of the row stripes.
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
        let i = table.stripe_of(key);
        let seen = table
            .stripes
            .get(i)
            .map_or(u64::MAX, |c| c.load(Ordering::SeqCst));
        self.items
            .push((Counter::Stripe(table.stripes.clone(), i), seen));
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

    /// Two keys of different stripes of `t` (found by search: the hash is fixed).
    fn keys_in_two_stripes(t: &TableVersions) -> (String, String) {
        let first = "1".to_owned();
        let other = (2..)
            .map(|i: u32| i.to_string())
            .find(|k| t.stripe_of(&[k]) != t.stripe_of(&[&first]))
            .expect("another stripe");
        (first, other)
    }

    #[test]
    fn a_point_read_depends_on_its_key_only() {
        let reg = Registry::default();
        let db = reg.database("app");
        let t = db.table_versions(5);
        let (k1, k2) = keys_in_two_stripes(&t);
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
        let reg = Registry::default();
        let t = reg.database("app").table_versions(5);
        assert_ne!(t.stripe_of(&["ab", "c"]), t.stripe_of(&["a", "bc"]));
        assert_ne!(t.stripe_of(&["1", "23"]), t.stripe_of(&["12", "3"]));
    }

    /// The regression behind the row stripes' size: 100,000 cached rows of one table,
    /// 5,000 writes to random other rows. With 1,024 stripes per table (before) about
    /// 99% of the rows were falsely invalidated; with the stripes a 256 MiB cache gets,
    /// a few percent at most.
    #[test]
    fn writes_to_other_rows_leave_most_point_reads_current() {
        for (stripes, at_most) in [(row_stripes_for(256 << 20), 0.05), (1024, 1.0)] {
            let reg = Registry::with_row_stripes(stripes);
            let db = reg.database("app");
            let t = db.table_versions(5);
            let reads: Vec<Deps> = (0..100_000u32)
                .map(|k| {
                    let mut d = Deps::capture([db.epoch()]);
                    d.add_key(&t, &[k.to_string()]);
                    d
                })
                .collect();
            for k in (100_000u32..).step_by(7).take(5_000) {
                db.bump_key(5, &[k.to_string()]);
            }
            let stale = reads.iter().filter(|d| !d.is_current()).count();
            #[allow(clippy::cast_precision_loss)]
            let share = stale as f64 / reads.len() as f64;
            assert!(share <= at_most, "{stripes} stripes: {share} stale");
            if stripes == 1024 {
                assert!(
                    share > 0.9,
                    "1,024 stripes falsely invalidate most: {share}"
                );
            }
        }
    }

    #[test]
    fn stripes_follow_the_cache_size() {
        assert_eq!(row_stripes_for(256 << 20), 1 << 20);
        assert_eq!(row_stripes_for(0), 1 << 10);
        assert_eq!(row_stripes_for(u64::MAX), 1 << 22);
        assert_eq!(Registry::with_row_stripes(1000).row_stripes(), 1024);
    }

    #[test]
    fn tables_and_databases_do_not_share_a_key_stripe_by_construction() {
        // The same key of two tables, or of one table in two databases, hashes with a
        // different salt: they land in different stripes (for this fixed hash).
        let reg = Registry::default();
        let a = reg.database("a");
        let b = reg.database("b");
        let (t1, t2, t3) = (
            a.table_versions(1),
            a.table_versions(2),
            b.table_versions(1),
        );
        assert_ne!(t1.stripe_of(&["42"]), t2.stripe_of(&["42"]));
        assert_ne!(t1.stripe_of(&["42"]), t3.stripe_of(&["42"]));
    }
}
