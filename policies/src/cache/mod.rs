//! The read cache: encoded query results by key, bounded in bytes, with per-entry TTL,
//! lazy invalidation through version counters, and coalescing of concurrent misses.
//!
//! It is not: a parser of keys or results. The proxy builds the key (database, role,
//! settings, statement, parameters, formats) as opaque bytes and hands over the encoded
//! backend messages; this module only decides what is kept, for how long, and who
//! fills a missing key.
//!
//! Invariants:
//! - A served entry's [`Deps`] are current and its TTL has not run out: an entry whose
//!   tables were written since it was computed, or whose time is up, is a miss (and is
//!   dropped) when it is looked up; entries nobody looks up again leave by eviction.
//! - The entries' weights (bytes, with a fixed overhead each) stay within `max_bytes`:
//!   quick_cache evicts on insert, in the inserting thread (ADR 0032); nothing is
//!   deferred to a housekeeping task.
//! - A fill is stored only if its deps were still current when it completed (the
//!   stale-fill guard), it is at most `max_entry_bytes`, and the key is not bypassed.
//! - At most one session fills a key at a time ([`Lookup::Lead`]); others wait for it
//!   ([`Lookup::Wait`]) and then look again. A leader that gives up (error, too large,
//!   session gone) wakes the waiters when its [`FillTicket`] drops.
//! - Inserting never fails a query: an entry the cache cannot take is simply not kept.

mod keys;
mod versions;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quick_cache::{Lifecycle, Weighter};
use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;

pub use keys::{Key, KeyLike, KeyParts, KeyStream};
pub use versions::{
    DEFAULT_ROW_STRIPES, DbVersions, Deps, Registry, TableVersions, Version, row_stripes_for,
};

/// Fixed per-entry overhead counted by the weigher (the map's slot, the Arc, the deps).
const ENTRY_OVERHEAD: usize = 160;

/// One cached result: the backend messages PostgreSQL sent for it, replayed verbatim.
#[derive(Debug)]
pub struct CachedResult {
    /// The RowDescription the statement produces with the key's result formats, when
    /// the fill saw one (a simple query always does; an extended Execute only if the
    /// client asked for a portal Describe).
    pub row_description: Option<Bytes>,
    /// ParameterDescription and RowDescription (text formats) as PostgreSQL answered a
    /// Describe of the statement, when the fill saw one (tokio-postgres's
    /// `query_typed` describes the statement, not the portal).
    pub statement: Option<Bytes>,
    /// DataRow messages followed by the CommandComplete.
    pub body: Bytes,
    /// Versions the result was computed against.
    pub deps: Deps,
    /// Time to live (the smallest TTL of the tables it read).
    pub ttl: Duration,
}

impl CachedResult {
    fn weight(&self, key: &Key) -> u32 {
        let bytes = key.len()
            + self.row_description.as_ref().map_or(0, Bytes::len)
            + self.statement.as_ref().map_or(0, Bytes::len)
            + self.body.len()
            + self.deps.len() * 16
            + ENTRY_OVERHEAD;
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }
}

/// What a session should do for a key.
pub enum Lookup {
    /// Serve this.
    Hit(Arc<CachedResult>),
    /// Nobody is filling this key: go upstream and report through the ticket.
    Lead(FillTicket),
    /// Another session is filling this key: wait, then look again.
    Wait(OwnedNotified),
}

/// Counters for metrics and tests; monotonic.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub stored: AtomicU64,
    /// Fills refused because a table they read was written meanwhile.
    pub rejected_stale: AtomicU64,
    /// Fills refused because the result exceeded `max_entry_bytes`.
    pub rejected_too_large: AtomicU64,
    /// Entries found but no longer current.
    pub invalidated: AtomicU64,
    /// Entries evicted for size.
    pub evicted: AtomicU64,
    /// Entries expired by TTL.
    pub expired: AtomicU64,
}

pub struct ResultCache {
    entries: Entries,
    /// Keys being filled, and how to wake those waiting for them. A std mutex: held
    /// only for a map operation, never across an await.
    inflight: Mutex<HashMap<Key, Arc<Notify>>>,
    /// Every key's hash starts here (`keys.rs`).
    seed: ahash::RandomState,
    max_entry_bytes: usize,
    stats: Arc<CacheStats>,
}

type Entries = quick_cache::sync::Cache<Key, Entry, Weigh, keys::BuildPrehashed, CountEvictions>;

/// A stored result and the moment it stops being served.
#[derive(Clone)]
struct Entry {
    result: Arc<CachedResult>,
    expires: Instant,
}

#[derive(Clone)]
struct Weigh;

impl Weighter<Key, Entry> for Weigh {
    fn weight(&self, key: &Key, entry: &Entry) -> u64 {
        u64::from(entry.result.weight(key))
    }
}

/// Counts evictions for space (`CacheStats::evicted`). Replacing or removing an entry
/// is not an eviction and does not pass here.
#[derive(Clone)]
struct CountEvictions(Arc<CacheStats>);

impl Lifecycle<Key, Entry> for CountEvictions {
    type RequestState = ();

    fn begin_request(&self) -> Self::RequestState {}

    fn on_evict(&self, _state: &mut Self::RequestState, _key: Key, _entry: Entry) {
        self.0.evicted.fetch_add(1, Ordering::Relaxed);
    }
}

/// Shards of the map: as many as quick_cache would choose for this machine, fewer when
/// a shard (an equal part of `max_bytes`) could not hold a few of the largest entries.
fn shards_for(max_bytes: u64, max_entry_bytes: u64) -> usize {
    let parallel = std::thread::available_parallelism().map_or(4, |n| n.get()) * 4;
    let by_size = max_bytes / max_entry_bytes.max(1).saturating_mul(4);
    let shards = usize::try_from(by_size)
        .unwrap_or(usize::MAX)
        .clamp(1, parallel.next_power_of_two());
    // A power of two not above `shards` (quick_cache rounds up otherwise).
    1 << shards.ilog2()
}

impl ResultCache {
    pub fn new(max_bytes: u64, max_entry_bytes: u64) -> Arc<Self> {
        let stats = Arc::new(CacheStats::default());
        let mut options = quick_cache::OptionsBuilder::new();
        options
            .weight_capacity(max_bytes)
            // A guess of the entry count (for the shard sizes only; the map grows).
            .estimated_items_capacity(
                usize::try_from(max_bytes / 1024)
                    .unwrap_or(usize::MAX)
                    .max(64),
            )
            .shards(shards_for(max_bytes, max_entry_bytes));
        let entries = match options.build() {
            Ok(options) => Entries::with_options(
                options,
                Weigh,
                keys::BuildPrehashed::default(),
                CountEvictions(stats.clone()),
            ),
            // Only a zero shard count is refused, and `shards_for` gives at least one.
            Err(_) => Entries::with(
                64,
                max_bytes,
                Weigh,
                keys::BuildPrehashed::default(),
                CountEvictions(stats.clone()),
            ),
        };
        Arc::new(Self {
            entries,
            inflight: Mutex::new(HashMap::new()),
            seed: ahash::RandomState::new(),
            max_entry_bytes: usize::try_from(max_entry_bytes).unwrap_or(usize::MAX),
            stats,
        })
    }

    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    pub fn max_entry_bytes(&self) -> usize {
        self.max_entry_bytes
    }

    /// A hash state to begin a key with: a session continues it with its key prefix
    /// and keeps it, so that a hit hashes only the rest ([`KeyParts`]).
    pub fn stream(&self) -> KeyStream {
        KeyStream::new(&self.seed)
    }

    /// `bytes` as a key of this cache.
    pub fn key(&self, bytes: &[u8]) -> Key {
        Key::new(self.stream(), bytes)
    }

    /// A current entry, without registering a fill.
    pub fn get(&self, key: &[u8]) -> Option<Arc<CachedResult>> {
        self.get_key(&self.key(key))
    }

    /// A current entry under a key not built (the hit path), without registering a
    /// fill; `now`: when the request arrived (an entry expired by then is not served).
    pub fn get_parts(&self, key: &KeyParts<'_>, now: Instant) -> Option<Arc<CachedResult>> {
        self.current(key, now)
    }

    fn get_key(&self, key: &Key) -> Option<Arc<CachedResult>> {
        self.current(key, Instant::now())
    }

    fn current(&self, key: &dyn KeyLike, now: Instant) -> Option<Arc<CachedResult>> {
        let entry = self.entries.get(key)?;
        if !entry.result.deps.is_current() {
            self.entries.remove(key);
            self.stats.invalidated.fetch_add(1, Ordering::Relaxed);
            None
        } else if now >= entry.expires {
            self.entries.remove(key);
            self.stats.expired.fetch_add(1, Ordering::Relaxed);
            None
        } else {
            Some(entry.result)
        }
    }

    /// Hit, or the right to fill, or a wait for whoever holds that right.
    /// Counts a miss when it returns [`Lookup::Lead`]; hits are counted by the caller
    /// when it actually serves one ([`ResultCache::record_hit`]).
    pub fn lookup(self: &Arc<Self>, key: &[u8]) -> Lookup {
        let key = self.key(key);
        if let Some(hit) = self.get_key(&key) {
            return Lookup::Hit(hit);
        }
        let Ok(mut inflight) = self.inflight.lock() else {
            // Coalescing is an optimisation; without it every miss goes upstream.
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return Lookup::Lead(FillTicket::detached(self.clone(), key));
        };
        if let Some(notify) = inflight.get(&key) {
            return Lookup::Wait(notify.clone().notified_owned());
        }
        // The leader may have stored its result between our get and taking the lock.
        if let Some(hit) = self.get_key(&key) {
            return Lookup::Hit(hit);
        }
        let notify = Arc::new(Notify::new());
        inflight.insert(key.clone(), notify.clone());
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        Lookup::Lead(FillTicket {
            cache: self.clone(),
            key,
            notify: Some(notify),
        })
    }

    /// A result was served from the cache.
    pub fn record_hit(&self) {
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
    }

    /// Drops every entry (a lost invalidation feed). Callers also bump the version
    /// epochs so that fills already in flight are refused too.
    pub fn clear(&self) {
        self.entries.clear();
    }

    pub fn entry_count(&self) -> u64 {
        self.entries.len() as u64
    }

    pub fn weighted_bytes(&self) -> u64 {
        self.entries.weight()
    }

    fn store(&self, key: Key, result: CachedResult) -> bool {
        let size = result.row_description.as_ref().map_or(0, Bytes::len)
            + result.statement.as_ref().map_or(0, Bytes::len)
            + result.body.len();
        if size > self.max_entry_bytes {
            self.stats
                .rejected_too_large
                .fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if !result.deps.is_current() {
            self.stats.rejected_stale.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let expires = Instant::now() + result.ttl;
        self.entries.insert(
            key,
            Entry {
                result: Arc::new(result),
                expires,
            },
        );
        self.stats.stored.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn finish(&self, key: &Key, notify: &Notify) {
        if let Ok(mut inflight) = self.inflight.lock() {
            inflight.remove(key);
        }
        notify.notify_waiters();
    }
}

/// The right (and duty) to fill one key. Dropping it without [`FillTicket::complete`]
/// abandons the fill and wakes the waiters, who then look again.
pub struct FillTicket {
    cache: Arc<ResultCache>,
    key: Key,
    /// `None` when coalescing was unavailable (nobody waits on this fill).
    notify: Option<Arc<Notify>>,
}

impl FillTicket {
    fn detached(cache: Arc<ResultCache>, key: Key) -> Self {
        Self {
            cache,
            key,
            notify: None,
        }
    }

    pub fn key(&self) -> &[u8] {
        self.key.bytes()
    }

    pub fn max_entry_bytes(&self) -> usize {
        self.cache.max_entry_bytes
    }

    /// Stores the result if it is still current and small enough; true if stored.
    pub fn complete(self, result: CachedResult) -> bool {
        self.cache.store(self.key.clone(), result)
    }

    /// Counts a result that grew past `max_entry_bytes` while being captured.
    pub fn abandon_too_large(self) {
        self.cache
            .stats
            .rejected_too_large
            .fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for FillTicket {
    fn drop(&mut self) {
        if let Some(notify) = self.notify.take() {
            self.cache.finish(&self.key, &notify);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(body: &'static [u8], deps: Deps) -> CachedResult {
        CachedResult {
            row_description: Some(Bytes::from_static(b"T...")),
            statement: None,
            body: Bytes::from_static(body),
            deps,
            ttl: Duration::from_secs(60),
        }
    }

    fn lead(cache: &Arc<ResultCache>, key: &[u8]) -> FillTicket {
        match cache.lookup(key) {
            Lookup::Lead(t) => t,
            Lookup::Hit(_) => panic!("unexpected hit"),
            Lookup::Wait(_) => panic!("unexpected wait"),
        }
    }

    #[test]
    fn fill_then_hit() {
        let cache = ResultCache::new(1 << 20, 1 << 16);
        let ticket = lead(&cache, b"k");
        assert!(ticket.complete(result(b"rows", Deps::default())));
        match cache.lookup(b"k") {
            Lookup::Hit(r) => assert_eq!(&r.body[..], b"rows"),
            _ => panic!("expected a hit"),
        }
        assert_eq!(cache.stats().misses.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn stale_fill_is_not_stored() {
        let reg = Registry::default();
        let db = reg.database("app");
        let t = db.table(1);
        let cache = ResultCache::new(1 << 20, 1 << 16);
        let ticket = lead(&cache, b"k");
        let deps = Deps::capture([db.epoch(), &t]);
        db.bump_tables([1]); // a write lands while the read is upstream
        assert!(!ticket.complete(result(b"old", deps)));
        assert!(cache.get(b"k").is_none());
        assert_eq!(cache.stats().rejected_stale.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn entry_invalidated_by_a_later_write() {
        let reg = Registry::default();
        let db = reg.database("app");
        let cache = ResultCache::new(1 << 20, 1 << 16);
        let deps = Deps::capture([db.epoch(), &db.table(5)]);
        assert!(lead(&cache, b"k").complete(result(b"v", deps)));
        assert!(cache.get(b"k").is_some());
        db.bump_tables([5]);
        assert!(cache.get(b"k").is_none());
        assert!(matches!(cache.lookup(b"k"), Lookup::Lead(_)));
    }

    #[test]
    fn too_large_is_not_stored() {
        let cache = ResultCache::new(1 << 20, 8);
        assert!(!lead(&cache, b"k").complete(result(b"0123456789", Deps::default())));
        assert!(cache.get(b"k").is_none());
    }

    #[tokio::test]
    async fn concurrent_misses_wait_for_the_leader() {
        let cache = ResultCache::new(1 << 20, 1 << 16);
        let ticket = lead(&cache, b"k");
        let Lookup::Wait(wait) = cache.lookup(b"k") else {
            panic!("second miss should wait");
        };
        let waiter = tokio::spawn(wait);
        tokio::task::yield_now().await;
        assert!(ticket.complete(result(b"v", Deps::default())));
        waiter.await.expect("waiter woke");
        assert!(matches!(cache.lookup(b"k"), Lookup::Hit(_)));
        assert_eq!(cache.stats().misses.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn abandoned_fill_wakes_waiters_who_then_lead() {
        let cache = ResultCache::new(1 << 20, 1 << 16);
        let ticket = lead(&cache, b"k");
        let Lookup::Wait(wait) = cache.lookup(b"k") else {
            panic!("second miss should wait");
        };
        drop(ticket);
        wait.await;
        assert!(matches!(cache.lookup(b"k"), Lookup::Lead(_)));
    }

    #[test]
    fn byte_bound_holds_under_overfill() {
        let cache = ResultCache::new(64 * 1024, 4096);
        let body = Bytes::from(vec![b'x'; 1000]);
        for i in 0..1000u32 {
            let t = lead(&cache, &i.to_be_bytes());
            t.complete(CachedResult {
                row_description: None,
                statement: None,
                body: body.clone(),
                deps: Deps::default(),
                ttl: Duration::from_secs(60),
            });
        }
        assert!(cache.weighted_bytes() <= 64 * 1024);
        assert!(cache.entry_count() < 1000);
        assert!(cache.stats().evicted.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn entries_expire_after_their_ttl() {
        let cache = ResultCache::new(1 << 20, 1 << 16);
        let mut r = result(b"v", Deps::default());
        r.ttl = Duration::from_millis(50);
        assert!(lead(&cache, b"k").complete(r));
        assert!(cache.get(b"k").is_some());
        std::thread::sleep(Duration::from_millis(120));
        assert!(cache.get(b"k").is_none());
        assert_eq!(cache.stats().expired.load(Ordering::Relaxed), 1);
        assert_eq!(cache.entry_count(), 0, "an expired entry found is dropped");
    }

    #[test]
    fn a_shard_holds_several_of_the_largest_entries() {
        for (max_bytes, max_entry) in [(64 * 1024, 4096), (1 << 28, 1 << 20), (4096, 4096)] {
            let shards = shards_for(max_bytes, max_entry) as u64;
            assert!(shards.is_power_of_two());
            assert!(
                shards == 1 || max_bytes / shards >= 4 * max_entry,
                "{max_bytes} in {shards} shards for entries of {max_entry}"
            );
        }
        // The largest entry fits whatever the shard count.
        let cache = ResultCache::new(2 * 4096, 4096);
        let body = Bytes::from(vec![b'x'; 4096]);
        let r = CachedResult {
            row_description: None,
            statement: None,
            body,
            deps: Deps::default(),
            ttl: Duration::from_secs(60),
        };
        assert!(lead(&cache, b"k").complete(r));
        assert!(cache.get(b"k").is_some());
    }
}
