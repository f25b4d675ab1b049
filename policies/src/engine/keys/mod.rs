//! The key index: which primary keys exist in each deferred table, so that exact row
//! counts (`row_counts = "exact"`) of a key with nothing pending need no point read.
//! A decision asks the key overlay (pending writes) first, then this index, then
//! PostgreSQL (a point read, batched: `reads.rs`).
//!
//! The index is trusted only while it reflects PostgreSQL's committed state, which
//! needs the change stream (`changes.rs`): without it other applications' writes are
//! not seen. So a table's index is loaded only once the stream follows the database
//! ([`ChangeSink::resumed`]), dropped when it stops ([`ChangeSink::lost`]), and
//! answers only when [`Phase::Ready`]. Loading runs in the background (`load.rs`:
//! keyset pagination, one short query a chunk); meanwhile the table uses point reads.
//!
//! Three sources change a table's index, and their order is the whole difficulty:
//! - **Loading chunks**, each read in its own snapshot. A change the stream delivers
//!   while the table loads may be newer than a chunk read later (the chunk's query
//!   ran before the change committed, its answer came after), so keys the stream
//!   touched during the load (`touched`) are never overwritten by a chunk.
//! - **The change stream**, in commit order but behind PostgreSQL. A table becomes
//!   ready only once the stream delivered a commit at or past the WAL position read
//!   after its last chunk, or said it passed that position with nothing left to
//!   deliver (`ChangeSink::passed`, an idle stream): every commit a chunk saw has then been delivered too (the
//!   keys it touched keep its answer), so the index is PostgreSQL's state as of the
//!   stream's position, and every later commit is newer than every chunk.
//! - **spillway's own batches**, applied to the index as they commit (before their keys
//!   leave the overlay), which is ahead of the stream. A key a batch wrote is *pinned*
//!   until the stream delivers a commit at or past the WAL position read after the
//!   batch committed (`Sink::wal_position`): until then a change to it from the stream
//!   may be older than the batch. One that agrees with the pin changes nothing; one of
//!   spillway's own (`Commit::own`) is older; any other makes the key *unknown*
//!   (point reads) until a later change settles it. Keys of a refused record (a dead
//!   letter) or of a batch whose outcome was not seen are unknown too.
//!
//! Invariants:
//! - A table answers only in [`Phase::Ready`], which needs the stream following since
//!   its load began; after `lost` it is [`Phase::Untrusted`] and holds nothing until it
//!   is loaded again after `resumed`.
//! - Answers never go back behind one of spillway's own applied writes (pins); other
//!   writers' changes are seen once the stream delivers them (ARCHITECTURE, the
//!   guarantee table: the window ends in a dead letter, never a silent wrong count).
//! - The indexes together stay under `key_index.max_bytes` (estimated heap bytes); a
//!   table that would pass it drops its index and is [`Phase::OverBound`] until the
//!   next load.
//! - Lock order: the engine's state lock, then this index's lock; nothing here waits
//!   while holding it.

mod load;
pub mod set;
mod stream;
mod table;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio::time::Instant;

pub use set::{Chunk, Cursor, Key, KeyKind};

use super::table_set::TableSet;
use crate::KeyIndexConfig;
use crate::writes::{Record, RowOp};
use set::KeySet;
use table::{Pin, TableIndex};

/// A table's index, as the console and the metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No index: switched off, assumed counts, or a key type without a canonical form.
    Off,
    /// The change stream does not follow the database (not yet, or lost): point reads.
    Untrusted,
    /// Being loaded, or waiting for the stream to pass the load's start: point reads.
    Loading,
    /// Answers.
    Ready,
    /// Dropped at `key_index.max_bytes`: point reads until the next load.
    OverBound,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::Off,
        Phase::Untrusted,
        Phase::Loading,
        Phase::Ready,
        Phase::OverBound,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Off => "off",
            Phase::Untrusted => "untrusted",
            Phase::Loading => "loading",
            Phase::Ready => "ready",
            Phase::OverBound => "over_bound",
        }
    }
}

/// One table's index as the console and `/metrics` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStats {
    pub table: String,
    pub phase: Phase,
    pub keys: u64,
    pub bytes: u64,
    /// Why it is [`Phase::Off`].
    pub off: Option<&'static str>,
}

/// The key index of the engine's database; the change stream's [`ChangeSink`].
pub struct KeyIndex {
    inner: Mutex<Index>,
    /// Wakes the loader (`load.rs`) when a table needs loading.
    wake: Notify,
}

struct Index {
    /// The database whose commits count (the backend database).
    database: String,
    config: KeyIndexConfig,
    /// The stream follows the database: resumed, and not lost since.
    following: bool,
    /// The highest commit position the stream delivered since it resumed.
    position: Option<u64>,
    tables: BTreeMap<String, TableIndex>,
    batches: Batches,
}

/// spillway's own batches whose keys are pinned, by number, with the WAL position read
/// after each committed (when it could be read).
#[derive(Default)]
struct Batches {
    /// The number of the last batch that pinned keys.
    last: u64,
    /// Pins of batches up to this one are released.
    released: u64,
    positions: VecDeque<(u64, u64)>,
}

impl Batches {
    /// The stream delivered a commit at `lsn`: every batch known to have committed at
    /// or before it (and those before that one) is released.
    fn release(&mut self, lsn: u64) -> bool {
        let before = self.released;
        while let Some((id, _)) = self.positions.front().filter(|(_, at)| *at <= lsn) {
            self.released = self.released.max(*id);
            self.positions.pop_front();
        }
        self.released != before
    }
}

/// What the loader should read next for a table.
#[derive(Debug, Clone)]
pub struct Job {
    pub table: String,
    pub generation: u64,
    pub kind: KeyKind,
    /// `None` before the first chunk.
    pub cursor: Option<Cursor>,
    /// Every chunk is read: the WAL position after them is wanted.
    pub finish: bool,
    pub limit: usize,
}

impl Default for KeyIndex {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Index {
                database: String::new(),
                config: KeyIndexConfig::default(),
                following: false,
                position: None,
                tables: BTreeMap::new(),
                batches: Batches::default(),
            }),
            wake: Notify::new(),
        }
    }
}

impl KeyIndex {
    fn lock(&self) -> MutexGuard<'_, Index> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Sets the database whose commits count and `[key_index]`, and the tables.
    pub fn configure(&self, database: &str, config: &KeyIndexConfig, set: &TableSet) {
        {
            let mut ix = self.lock();
            ix.database = database.to_owned();
            if ix.config != *config {
                ix.config = config.clone();
                ix.tables.clear();
            }
        }
        self.sync(set);
    }

    /// Follows the deferred tables of `set`: new ones get an index (loaded at once
    /// while the stream follows), changed keys start over, gone ones are dropped.
    pub fn sync(&self, set: &TableSet) {
        let mut ix = self.lock();
        let ix = &mut *ix;
        let mut seen = HashSet::new();
        let mut load = false;
        for name in set.names() {
            let Some(t) = set.deferring(name) else {
                continue;
            };
            seen.insert(name.clone());
            let fresh = TableIndex::new(t, &ix.config);
            let same = ix
                .tables
                .get(name)
                .is_some_and(|old| old.signature == fresh.signature && old.off == fresh.off);
            if same {
                continue;
            }
            let mut entry = fresh;
            if ix.following {
                load |= entry.restart();
            }
            ix.tables.insert(name.clone(), entry);
        }
        ix.tables.retain(|name, _| seen.contains(name));
        if load {
            self.wake.notify_one();
        }
    }

    /// Whether `key` of `table` exists, if the index may answer.
    pub fn lookup(&self, table: &str, key: &[String]) -> Option<bool> {
        let ix = self.lock();
        let t = ix.tables.get(table).filter(|t| t.phase == Phase::Ready)?;
        let key = t.key(key)?;
        if t.unknown.contains(&key) {
            return None;
        }
        t.set.as_ref().map(|s| s.contains(&key))
    }

    /// [`Self::lookup`] of each slot, under one lock: the answered ones.
    pub fn lookup_many(
        &self,
        slots: Vec<(String, Vec<String>)>,
    ) -> HashMap<(String, Vec<String>), bool> {
        if slots.is_empty() {
            return HashMap::new();
        }
        let ix = self.lock();
        slots
            .into_iter()
            .filter_map(|(table, key)| {
                let t = ix.tables.get(&table).filter(|t| t.phase == Phase::Ready)?;
                let k = t.key(&key).filter(|k| !t.unknown.contains(k))?;
                let exists = t.set.as_ref()?.contains(&k);
                Some(((table, key), exists))
            })
            .collect()
    }

    /// spillway's batch committed (before its keys leave the overlay): each key it
    /// wrote takes the state its last operation left, pinned; a record that was
    /// refused (`dead`, or every record when the outcome was not seen, `None`) leaves
    /// its keys unknown. Returns the batch's number when it pinned keys: its WAL
    /// position is wanted then ([`Self::positioned`]).
    pub fn applied(
        &self,
        batch: &[(u64, Arc<Record>)],
        dead: Option<&HashSet<u64>>,
        key_of: impl Fn(&RowOp) -> Option<Vec<String>>,
    ) -> Option<u64> {
        let mut ix = self.lock();
        let ix = &mut *ix;
        if !ix.following {
            return None;
        }
        let id = ix.batches.last + 1;
        let mut pinned = false;
        let mut changed: HashSet<String> = HashSet::new();
        for (seq, record) in batch {
            let refused = dead.is_none_or(|d| d.contains(seq));
            for op in &record.ops {
                let Some(t) = ix.tables.get_mut(op.table()).filter(|t| t.has_data()) else {
                    continue;
                };
                changed.insert(op.table().to_owned());
                let Some(key) = key_of(op).and_then(|k| t.key(&k)) else {
                    // Cannot happen for a deferred write's canonical key; if it did,
                    // nothing about the table could be trusted.
                    t.restart();
                    self.wake.notify_one();
                    continue;
                };
                if refused {
                    t.pins.remove(&key);
                    t.unknown.insert(key);
                    continue;
                }
                let exists = !matches!(op, RowOp::Delete { .. });
                t.pins.insert(key.clone(), Pin { exists, batch: id });
                t.put(key, exists);
                pinned = true;
            }
        }
        for name in changed {
            ix.settle(&name);
        }
        pinned.then(|| {
            ix.batches.last = id;
            id
        })
    }

    /// The WAL position read after batch `id` committed.
    pub fn positioned(&self, id: u64, lsn: u64) {
        let mut ix = self.lock();
        if id <= ix.batches.released {
            return;
        }
        ix.batches.positions.push_back((id, lsn));
        if let Some(at) = ix.position.filter(|_| ix.following)
            && ix.batches.release(at)
        {
            ix.sweep_pins();
        }
    }

    /// Every table's index, by name.
    pub fn stats(&self) -> Vec<KeyStats> {
        let ix = self.lock();
        ix.tables
            .iter()
            .map(|(name, t)| KeyStats {
                table: name.clone(),
                phase: t.phase,
                keys: t.set.as_ref().map_or(0, KeySet::len),
                bytes: t.bytes as u64,
                off: t.off,
            })
            .collect()
    }

    /// The next table to read keys of, if one is loading.
    pub fn next_job(&self) -> Option<Job> {
        let ix = self.lock();
        let limit = ix.config.chunk_rows;
        ix.tables.iter().find_map(|(name, t)| {
            let kind = t.kind?;
            (t.phase == Phase::Loading && t.load.end.is_none()).then(|| Job {
                table: name.clone(),
                generation: t.generation,
                kind,
                cursor: t.load.cursor.clone(),
                finish: t.load.chunks_done,
                limit,
            })
        })
    }

    /// The loader read the WAL position `lsn` after `job`'s last chunk.
    pub fn finished(&self, job: &Job, lsn: u64) {
        let mut ix = self.lock();
        if let Some(t) = ix.current(job).filter(|t| t.load.chunks_done) {
            t.load.end = Some(lsn);
            ix.settle(&job.table);
        }
    }

    /// The loader read `chunk` for `job`: keys the stream touched since the load began
    /// keep the stream's answer.
    pub fn chunk(&self, job: &Job, chunk: Chunk) {
        let mut ix = self.lock();
        let complete = chunk.len() < job.limit;
        let Some(t) = ix.current(job).filter(|t| !t.load.chunks_done) else {
            return;
        };
        t.load.began.get_or_insert_with(Instant::now);
        if let Some(cursor) = chunk.last() {
            t.load.cursor = Some(cursor);
        }
        let keys = chunk.keys(job.kind);
        if let Some(set) = &mut t.set {
            for key in keys {
                if t.touched.is_empty() || !t.touched.contains(&key) {
                    set.insert(key);
                }
            }
            if complete {
                set.shrink();
            }
        }
        if complete {
            t.load.chunks_done = true;
        }
        ix.settle(&job.table);
    }

    /// A table that left deferral while it loaded.
    pub fn abandon(&self, job: &Job) {
        let mut ix = self.lock();
        ix.tables.remove(&job.table);
    }

    /// Waits until a table may need loading.
    pub async fn wanted(&self) {
        self.wake.notified().await;
    }
}

impl Index {
    /// `job`'s table if it still loads in `job`'s generation.
    fn current(&mut self, job: &Job) -> Option<&mut TableIndex> {
        self.tables.get_mut(&job.table).filter(|t| {
            t.generation == job.generation && t.phase == Phase::Loading && t.load.end.is_none()
        })
    }

    /// After `table` changed: its bytes, the bound, and whether it is ready now.
    fn settle(&mut self, table: &str) {
        let position = self.position;
        let Some(t) = self.tables.get_mut(table) else {
            return;
        };
        t.measure();
        let total: usize = self.tables.values().map(|t| t.bytes).sum();
        let max = usize::try_from(self.config.max_bytes.as_u64()).unwrap_or(usize::MAX);
        let Some(t) = self.tables.get_mut(table) else {
            return;
        };
        if total > max && t.has_data() {
            tracing::warn!(
                table,
                bytes = t.bytes,
                max_bytes = max,
                "key index over key_index.max_bytes: the table's exact row counts use point reads"
            );
            t.reset(Phase::OverBound);
            return;
        }
        if t.phase == Phase::Loading && t.load.end.is_some_and(|e| position.is_some_and(|p| p >= e))
        {
            t.phase = Phase::Ready;
            t.touched = HashSet::new();
            t.measure();
            tracing::info!(
                table,
                keys = t.set.as_ref().map_or(0, KeySet::len),
                bytes = t.bytes,
                elapsed = ?t.load.began.map(|b| b.elapsed()),
                "key index ready: exact row counts of keys with nothing pending need no point read"
            );
        }
    }

    /// Pins of released batches are dropped (they no longer change anything).
    fn sweep_pins(&mut self) {
        let released = self.batches.released;
        for t in self.tables.values_mut() {
            if !t.pins.is_empty() {
                t.pins.retain(|_, p| p.batch > released);
            }
        }
    }
}
