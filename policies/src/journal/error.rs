//! `JournalError`: every way the journal can fail, for the proxy to log, count and map
//! to a client answer.
//!
//! Invariant: an error that means "the journal can no longer promise durability"
//! (`Poisoned`) is never turned into a retry; only `Full` and `NoSpace` are retryable.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// An I/O failure while opening or recovering, naming the file and the operation.
    #[error("journal: {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Another process (or another `Journal` in this one) holds the directory's lock.
    #[error(
        "journal directory {} is in use by another spillway process (its LOCK file is held)",
        .0.display()
    )]
    Locked(PathBuf),
    /// The meta file (journal id and epoch) is missing where data exists, or unreadable.
    #[error("journal meta file {}: {problem}", path.display())]
    Meta { path: PathBuf, problem: String },
    /// Damage that is not a torn tail: data after it is intact, or it is in a sealed
    /// segment. Records would be lost silently if recovery skipped it, so it refuses.
    #[error("journal segment {} is corrupt at byte {offset}: {problem}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        problem: String,
    },
    /// The journal holds `journal.max_bytes` or more; the caller applies `when_full`.
    #[error("journal is full: {bytes} bytes held, journal.max_bytes is {max_bytes}")]
    Full { bytes: u64, max_bytes: u64 },
    /// The journal's disk has no room for the next preallocation or segment (ENOSPC,
    /// EDQUOT, EFBIG). Nothing of the failed appends was written and the journal stays
    /// usable: the same append succeeds once space returns.
    #[error("journal: no space left on the journal's disk ({op} {}): {detail}", path.display())]
    NoSpace {
        op: &'static str,
        path: PathBuf,
        detail: Arc<str>,
    },
    #[error("journal record of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// A write or fsync failed earlier. After a failed fsync the kernel may have dropped
    /// the dirty pages and cleared the error, so a retry could report success for data
    /// that is gone: the journal stops accepting writes until it is reopened, and
    /// recovery then reads back only what is really on disk.
    #[error("journal is poisoned by an earlier I/O failure and accepts no writes: {cause}")]
    Poisoned { cause: Arc<str> },
    /// `confirm(seq)` named a record that was never appended: a caller bug.
    #[error("confirm({seq}) is ahead of the last appended record ({last})")]
    ConfirmAhead { seq: u64, last: u64 },
    /// The journal was closed (or its writer thread ended).
    #[error("journal is closed")]
    Closed,
    /// A replicated log (the NATS backend) could not store the record on a quorum now:
    /// nothing was acknowledged. Like `Full`, a refusal the client may retry later.
    #[error("the replicated journal cannot store writes now: {0}")]
    Unavailable(String),
    /// A replicated log sent the record but no answer came back (the connection or the
    /// stream leader was lost meanwhile): it may be stored, and then it is applied like
    /// another instance's record; or not. The client is told the outcome is unknown
    /// (08006), as PostgreSQL does when a connection dies during COMMIT.
    #[error("the replicated journal did not answer; the write may or may not be applied: {0}")]
    Indeterminate(String),
    /// A shared journal refused a keyed append: another instance wrote the key first.
    /// The engine decides the statement again; a client sees it only after many.
    #[error("another spillway instance wrote the same key concurrently: {0}")]
    Conflict(String),
}

impl JournalError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        JournalError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn no_space(op: &'static str, path: impl Into<PathBuf>, e: &io::Error) -> Self {
        JournalError::NoSpace {
            op,
            path: path.into(),
            detail: e.to_string().into(),
        }
    }

    /// Whether the same append may succeed later without anyone intervening: only when
    /// the journal or its disk was full (the flusher frees space as it confirms, an
    /// operator frees the disk).
    pub fn is_retryable(&self) -> bool {
        self.is_out_of_room()
    }

    /// `journal.max_bytes` reached or the disk full: the table's `when_full` applies.
    pub fn is_out_of_room(&self) -> bool {
        matches!(
            self,
            JournalError::Full { .. } | JournalError::NoSpace { .. }
        )
    }
}

/// Whether an I/O error means the disk (or the process's share of it) is full, as
/// opposed to failing: such a failure before a frame is written poisons nothing.
pub(crate) fn is_no_space(e: &io::Error) -> bool {
    use io::ErrorKind::{FileTooLarge, QuotaExceeded, StorageFull};
    matches!(e.kind(), StorageFull | QuotaExceeded | FileTooLarge)
}
