//! The durable write journal behind write-behind and write-back (SPEC §6): an
//! append-only, checksummed, group-committed log of opaque records, each with a
//! sequence number, in segment files under `journal.dir`.
//!
//! It is not: a reader of what it stores, or a flush worker. The proxy serializes
//! statements into payloads, keeps the pending ones in memory (recovery hands them back
//! after a restart), applies them upstream, and calls [`Journal::confirm`] once the
//! ledger holds them. Why a hand-written format rather than a storage crate:
//! `docs/adr/0010-write-journal.md`.
//!
//! Use:
//! ```no_run
//! # async fn demo(config: &spillway_policies::JournalConfig) -> Result<(), spillway_policies::journal::JournalError> {
//! use spillway_policies::journal::Journal;
//! let (journal, recovery) = Journal::open(config)?; // blocking: at startup
//! // Replay `recovery.records` the ledger does not hold yet, then serve:
//! let seq = journal.append(bytes::Bytes::from_static(b"statement")).await?; // durable
//! // … the flusher applies everything up to `seq` and advances the ledger …
//! journal.confirm(seq).await?;
//! # Ok(()) }
//! ```
//!
//! Guarantees and invariants:
//! - **Durability.** With `fsync = "always"`, `append` returns only after its record
//!   is fsynced (group commit: one `fdatasync` serves every append queued meanwhile).
//!   With `"interval"` it returns after the `write`; an fsync follows within
//!   `fsync_interval`, so an OS crash or power failure can lose the records
//!   acknowledged in the last `fsync_interval` plus the duration of one fsync (a crash
//!   of spillway alone loses nothing: the kernel holds the written pages). `"never"`
//!   leaves it to the kernel: tests only.
//! - **Flush only what is durable.** The flusher must not apply records beyond
//!   [`Journal::durable_seq`]. With `"always"` that is every acknowledged record; with
//!   `"interval"` it keeps an OS crash from erasing records the ledger already counts,
//!   whose sequence numbers would then be reused for new records and skipped at replay.
//! - **Order.** Sequence numbers start at 1, grow by one per record in queue order,
//!   and continue after the highest one recovered (or the current segment's start when
//!   none is left), across restarts.
//! - **Fence.** One process per directory (an exclusive lock on `LOCK`); the `epoch`
//!   grows by one, durably, at every open; the `id` never changes.
//! - **Recovery** returns every intact record, in order, cuts off a torn tail, and
//!   refuses (`Corrupt`) damage that is not one (see `segment`). Records already in the
//!   ledger may be among them: the ledger, not the journal, is the authority.
//! - **Poison.** After a failed write or fsync every later append fails with
//!   `Poisoned`; reopening recovers what is really on disk. A full disk is not a
//!   failure: appends fail with `NoSpace` (nothing of them written) until space
//!   returns, then succeed again without a restart.
//! - **Bounds.** The command queue holds [`QUEUE_CAPACITY`] commands; when it is full
//!   `append` waits for a slot (the caller's own `block_timeout` bounds the wait).
//!   `append` fails fast with `Full` once [`Journal::bytes`] reaches
//!   `journal.max_bytes`; appends already queued still go in, so the bound can be
//!   exceeded by at most the queue's contents. A record is at most
//!   [`MAX_RECORD_BYTES`].

mod error;
mod format;
mod meta;
mod segment;
mod writer;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

pub use error::JournalError;
pub use meta::JournalId;

use crate::config::{FsyncMode, JournalConfig};
use writer::{Command, Writer};

/// Recovery of the segment files in `dir` on their own, as [`Journal::open`] runs it
/// (torn tails cut, a first segment created when there is none), without the lock, the
/// meta file or the writer thread: the fuzz target of recovery (`fuzz/`) feeds it
/// arbitrary segment bytes. Returns how many records were recovered.
#[doc(hidden)]
pub fn recover_segments(dir: &std::path::Path, strict: bool) -> Result<usize, JournalError> {
    segment::recover(dir, strict).map(|scan| scan.records.len())
}

/// Name of the segment file whose first record is `first_seq` (for the fuzz target).
#[doc(hidden)]
pub fn segment_path(dir: &std::path::Path, first_seq: u64) -> PathBuf {
    segment::path(dir, first_seq)
}

/// Commands (appends, confirms) waiting for the writer thread.
pub const QUEUE_CAPACITY: usize = 4096;
/// Largest payload `append` accepts.
pub const MAX_RECORD_BYTES: usize = 64 * 1024 * 1024;

/// One journaled record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub payload: Bytes,
}

/// What [`Journal::open`] found on disk.
#[derive(Debug)]
pub struct Recovery {
    /// Every intact record, in sequence order (the ledger decides which to replay).
    pub records: Vec<Record>,
    /// The sequence number the next append will get.
    pub next_seq: u64,
    /// What was cut off as a torn tail, if anything (for a log line and a counter).
    pub torn: Option<TornTail>,
}

/// Bytes cut off the end of the last segment at recovery: a write that a crash
/// interrupted, never acknowledged with `fsync = "always"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub segment: PathBuf,
    pub offset: u64,
    pub bytes: u64,
}

/// Monotonic counters for metrics and tests.
#[derive(Debug, Default)]
pub struct JournalStats {
    /// Records acknowledged.
    pub appends: AtomicU64,
    /// Frames written (one per group commit).
    pub groups: AtomicU64,
    /// fsync calls on segments (attempted, failed ones included).
    pub fsyncs: AtomicU64,
    /// Time spent in those fsyncs.
    pub fsync_micros: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Appends refused with `Full`.
    pub full: AtomicU64,
    /// Groups refused with `NoSpace` (the disk was full).
    pub no_space: AtomicU64,
    pub segments_removed: AtomicU64,
}

/// State shared by the handles and the writer thread. Atomics only: no lock is ever
/// taken on the append path outside the writer.
struct Shared {
    /// Bytes of all segment files on disk.
    bytes: AtomicU64,
    durable_seq: AtomicU64,
    /// Set once, by the writer, at the first write or fsync failure.
    poisoned: OnceLock<Arc<str>>,
    stats: JournalStats,
    #[cfg(test)]
    faults: tests::Faults,
}

/// A handle to the journal; cheap to clone, usable from any runtime or thread.
#[derive(Clone)]
pub struct Journal {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    id: JournalId,
    epoch: u64,
    max_bytes: u64,
}

/// Knobs derived from the config; tests shrink segments to exercise rotation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tuning {
    pub segment_bytes: u64,
}

impl Tuning {
    /// Segments of a sixteenth of `max_bytes` (64 KiB to 64 MiB): small enough that
    /// confirmed data is freed long before the bound, few enough to list quickly.
    fn from_config(config: &JournalConfig) -> Self {
        let segment_bytes = (config.max_bytes.as_u64() / 16).clamp(64 << 10, 64 << 20);
        Tuning { segment_bytes }
    }
}

impl Journal {
    /// Opens (creating if needed) the journal in `config.dir`: takes the lock, bumps
    /// the epoch, recovers the records, and starts the writer thread. Blocking: call it
    /// at startup or from `spawn_blocking`.
    pub fn open(config: &JournalConfig) -> Result<(Journal, Recovery), JournalError> {
        Self::open_with(config, Tuning::from_config(config))
    }

    pub(crate) fn open_with(
        config: &JournalConfig,
        tuning: Tuning,
    ) -> Result<(Journal, Recovery), JournalError> {
        let dir = config.dir.clone();
        std::fs::create_dir_all(&dir).map_err(|e| JournalError::io("create", &dir, e))?;
        let lock = meta::lock(&dir)?;
        let has_segments = !segment::list(&dir)?.is_empty();
        let (id, epoch) = meta::open_and_bump(&dir, has_segments)?;
        let scan = segment::recover(&dir, config.fsync == FsyncMode::Always)?;

        let mut segments: VecDeque<_> = scan.segments.into();
        let Some(active_segment) = segments.pop_back() else {
            return Err(JournalError::Corrupt {
                path: dir,
                offset: 0,
                problem: "recovery left no segment".into(),
            });
        };
        let active = segment::open_for_append(&active_segment)?;
        // What a previous run wrote with `interval`/`never` may still be only in the
        // page cache; make it durable before anything is built on it.
        active
            .sync_all()
            .map_err(|e| JournalError::io("fsync", &active_segment.path, e))?;
        let next_seq = active_segment.end_seq;
        let bytes = segments.iter().map(|s| s.file_len).sum::<u64>() + active_segment.file_len;

        let shared = Arc::new(Shared {
            bytes: AtomicU64::new(bytes),
            durable_seq: AtomicU64::new(next_seq - 1),
            poisoned: OnceLock::new(),
            stats: JournalStats::default(),
            #[cfg(test)]
            faults: tests::Faults::default(),
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| JournalError::io("start runtime for", &dir, e))?;
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let mut writer = Writer {
            dir: dir.clone(),
            mode: config.fsync,
            fsync_interval: config.fsync_interval,
            segment_bytes: tuning.segment_bytes,
            shared: shared.clone(),
            active,
            active_segment,
            sealed: segments,
            next_seq,
            unsynced_since: None,
            _lock: lock,
            buf: Vec::new(),
        };
        match writer.prepare_segment() {
            // A full disk at start: the journal opens, and appends say `NoSpace` until
            // space returns (the first commit grows the segment then).
            Ok(()) | Err(JournalError::NoSpace { .. }) => {}
            Err(e) => return Err(e),
        }
        std::thread::Builder::new()
            .name("spillway-journal".into())
            .spawn(move || writer.run(rt, rx))
            .map_err(|e| JournalError::io("start writer thread for", &dir, e))?;

        let journal = Journal {
            tx,
            shared,
            id,
            epoch,
            max_bytes: config.max_bytes.as_u64(),
        };
        let recovery = Recovery {
            records: scan.records,
            next_seq,
            torn: scan.torn,
        };
        Ok((journal, recovery))
    }

    /// Appends one record and returns its sequence number once it is as durable as
    /// `journal.fsync` promises. Fails fast with `Full` over `journal.max_bytes`; waits
    /// for a queue slot when [`QUEUE_CAPACITY`] commands are queued.
    pub async fn append(&self, payload: Bytes) -> Result<u64, JournalError> {
        if let Some(cause) = self.shared.poisoned.get() {
            return Err(JournalError::Poisoned {
                cause: cause.clone(),
            });
        }
        if payload.len() > MAX_RECORD_BYTES {
            return Err(JournalError::TooLarge {
                len: payload.len(),
                max: MAX_RECORD_BYTES,
            });
        }
        let bytes = self.bytes();
        if bytes >= self.max_bytes {
            self.shared.stats.full.fetch_add(1, Ordering::Relaxed);
            return Err(JournalError::Full {
                bytes,
                max_bytes: self.max_bytes,
            });
        }
        let (reply, answer) = oneshot::channel();
        self.send(Command::Append { payload, reply }).await?;
        answer.await.map_err(|_| self.gone())?
    }

    /// Everything up to and including `seq` is applied upstream (the ledger holds it):
    /// segments holding nothing newer are deleted. Returns once they are.
    pub async fn confirm(&self, seq: u64) -> Result<(), JournalError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Confirm { seq, reply }).await?;
        answer.await.map_err(|_| self.gone())?
    }

    /// Writes and syncs what is queued, then stops the writer and releases the lock.
    /// Other handles' later calls fail with `Closed`.
    pub async fn close(self) -> Result<(), JournalError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Close { reply }).await?;
        answer.await.map_err(|_| self.gone())?
    }

    async fn send(&self, command: Command) -> Result<(), JournalError> {
        self.tx.send(command).await.map_err(|_| self.gone())
    }

    /// Why the writer is not answering: poisoned, or closed.
    fn gone(&self) -> JournalError {
        match self.shared.poisoned.get() {
            Some(cause) => JournalError::Poisoned {
                cause: cause.clone(),
            },
            None => JournalError::Closed,
        }
    }

    /// Bytes of the journal's files on disk; back-pressure starts at `max_bytes`.
    pub fn bytes(&self) -> u64 {
        self.shared.bytes.load(Ordering::Relaxed)
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The highest sequence number that is on stable storage (module docs: the
    /// flusher applies nothing beyond it).
    pub fn durable_seq(&self) -> u64 {
        self.shared.durable_seq.load(Ordering::Acquire)
    }

    pub fn id(&self) -> JournalId {
        self.id
    }

    /// This open's epoch: one more than the previous open's.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn stats(&self) -> &JournalStats {
        &self.shared.stats
    }

    /// Whether an earlier I/O failure stopped the journal.
    pub fn is_poisoned(&self) -> bool {
        self.shared.poisoned.get().is_some()
    }

    /// Commands waiting for the writer (for tests and a queue-depth gauge).
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}
