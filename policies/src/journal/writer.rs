//! The writer: one dedicated thread that owns every file handle of the journal and
//! performs all writes, fsyncs, rotations and removals, in queue order.
//!
//! Group commit: the thread waits for one command, then drains whatever else is
//! queued (up to [`GROUP_MAX_RECORDS`] records / [`GROUP_MAX_BYTES`] bytes) into one
//! frame, writes it with one `write`, and with `fsync = "always"` makes it durable with
//! one `fdatasync` before completing every caller in the group. Callers that arrive
//! during that fsync form the next group, so the number of fsyncs follows the disk's
//! latency, not the number of appends.
//!
//! Invariants:
//! - An append is acknowledged only after its frame was written and, with `always`,
//!   synced. `durable_seq` never passes a record that is not on stable storage (with
//!   `never` it means "written", the test-only mode makes no promise).
//! - Sequence numbers are assigned here, in queue order, without gaps.
//! - After any write or fsync error the journal is poisoned: the group in flight and
//!   every later command fail with `Poisoned`. Nothing is retried (see `JournalError`).
//!   The one exception is a full disk before a frame is written (growing the active
//!   segment, creating or growing the next one): the group fails with `NoSpace`,
//!   the file is cut back to what it held, and the next group tries again, so the
//!   journal resumes by itself once space returns. A frame is only ever written into
//!   space already grown, so a full disk never leaves half a frame.
//! - A segment is synced before the next one is created, and the new one (header,
//!   directory entry) is durable before any frame goes into it.
//! - Frames are written into space preallocated with written zeros
//!   ([`PREALLOCATE_BYTES`] at a time), so a group's fdatasync flushes data blocks
//!   only; an fdatasync that must also persist a new file size or newly allocated
//!   blocks waits for a file-system journal commit (ADR 0010). A segment's first
//!   extension happens at open or rotation; each later one inside the group that
//!   needs it, whose fsync then pays for it (once per 4 MiB).
//! - A segment is removed only when all its records are confirmed and it is not the
//!   one being appended to.
//!
//! The thread runs a current-thread tokio runtime only for its timer (the
//! `fsync = "interval"` deadline while waiting for commands); file I/O is plain
//! blocking std I/O, which is what a dedicated thread is for.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::error::is_no_space;
use super::segment::{self, Segment};
use super::{FsyncMode, JournalError, Shared};

/// Upper bounds of one group commit: the frame's record count and payload bytes. A
/// single record larger than the byte bound forms a group of its own.
pub const GROUP_MAX_RECORDS: usize = 4096;
pub const GROUP_MAX_BYTES: usize = 4 * 1024 * 1024;
/// How much the active segment grows at a time (at most `segment_bytes`).
pub const PREALLOCATE_BYTES: u64 = 4 * 1024 * 1024;

pub enum Command {
    Append {
        payload: Bytes,
        reply: oneshot::Sender<Result<u64, JournalError>>,
    },
    Confirm {
        seq: u64,
        reply: oneshot::Sender<Result<(), JournalError>>,
    },
    Close {
        reply: oneshot::Sender<Result<(), JournalError>>,
    },
}

pub struct Writer {
    pub dir: PathBuf,
    pub mode: FsyncMode,
    pub fsync_interval: Duration,
    /// A segment at or over this size is sealed after the frame that crossed it.
    pub segment_bytes: u64,
    pub shared: Arc<Shared>,
    pub active: File,
    pub active_segment: Segment,
    /// Older segments, oldest first; all synced.
    pub sealed: VecDeque<Segment>,
    pub next_seq: u64,
    /// When the oldest unsynced write happened (`interval` mode only).
    pub unsynced_since: Option<Instant>,
    /// Held for the writer's lifetime: the directory's exclusive lock.
    pub _lock: File,
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn run(mut self, rt: tokio::runtime::Runtime, mut rx: mpsc::Receiver<Command>) {
        let closed = rt.block_on(async {
            let mut carry: Option<Command> = None;
            loop {
                let command = match carry.take() {
                    Some(command) => command,
                    None => match self.next_command(&mut rx).await {
                        Some(command) => command,
                        None => break,
                    },
                };
                match command {
                    Command::Append { payload, reply } => {
                        self.pause_point();
                        let mut group = vec![(payload, reply)];
                        carry = drain_group(&mut rx, &mut group);
                        self.commit(group);
                    }
                    Command::Confirm { seq, reply } => {
                        let result = self.confirm(seq);
                        let _ = reply.send(result);
                    }
                    Command::Close { reply } => return Some((reply, self.sync_pending())),
                }
            }
            // Every `Journal` handle is gone: sync what `interval` left unsynced.
            let _ = self.sync_pending();
            None
        });
        // Release the files and the lock before telling `close` it is done, so the
        // directory can be reopened as soon as it returns.
        drop(self);
        if let Some((reply, result)) = closed {
            let _ = reply.send(result);
        }
    }

    /// The next command; with unsynced `interval` data, syncs when the deadline passes
    /// while waiting.
    async fn next_command(&mut self, rx: &mut mpsc::Receiver<Command>) -> Option<Command> {
        loop {
            let Some(since) = self.unsynced_since else {
                return rx.recv().await;
            };
            let deadline = tokio::time::Instant::from_std(since + self.fsync_interval);
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(command) => return command,
                Err(_elapsed) => {
                    // A failure poisons; the next append reports it.
                    let _ = self.sync_pending();
                }
            }
        }
    }

    #[cfg(test)]
    fn pause_point(&self) {
        while self.shared.faults.paused.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[cfg(not(test))]
    fn pause_point(&self) {}

    fn poisoned(&self) -> Option<JournalError> {
        self.shared
            .poisoned
            .get()
            .map(|cause| JournalError::Poisoned {
                cause: cause.clone(),
            })
    }

    fn poison(&self, what: &str, err: &io::Error) -> JournalError {
        let cause: Arc<str> =
            format!("{what} {}: {err}", self.active_segment.path.display()).into();
        let _ = self.shared.poisoned.set(cause);
        self.poisoned().unwrap_or(JournalError::Closed)
    }

    fn commit(&mut self, group: Vec<(Bytes, oneshot::Sender<Result<u64, JournalError>>)>) {
        if let Some(err) = self.poisoned() {
            return fail_all(group, &err);
        }
        let first_seq = self.next_seq;
        self.buf.clear();
        super::format::encode_frame(
            &mut self.buf,
            first_seq,
            group.iter().map(|(p, _)| p.as_ref()),
        );
        let written = self.buf.len() as u64;
        let needed = self.active_segment.data_len + written;
        if needed > self.active_segment.file_len
            && let Err(e) = self.preallocate(needed)
        {
            // Nothing of the frame is written yet: a full disk refuses this group and
            // the next one tries again; any other failure poisons.
            let err = if is_no_space(&e) {
                self.shared.stats.no_space.fetch_add(1, Ordering::Relaxed);
                JournalError::no_space("preallocating", &self.active_segment.path, &e)
            } else {
                self.poison("preallocating", &e)
            };
            return fail_all(group, &err);
        }
        if let Err(e) = self.write_frame() {
            let err = self.poison("write to", &e);
            return fail_all(group, &err);
        }
        let count = group.len() as u64;
        self.next_seq += count;
        self.active_segment.end_seq = self.next_seq;
        self.active_segment.data_len += written;
        self.shared.stats.groups.fetch_add(1, Ordering::Relaxed);
        self.shared
            .stats
            .bytes_written
            .fetch_add(written, Ordering::Relaxed);

        let synced = match self.mode {
            FsyncMode::Always => self.sync(),
            FsyncMode::Interval => {
                let since = *self.unsynced_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= self.fsync_interval {
                    self.sync_pending()
                } else {
                    Ok(())
                }
            }
            FsyncMode::Never => {
                self.mark_durable();
                Ok(())
            }
        };
        if let Err(err) = synced {
            return fail_all(group, &err);
        }
        if self.active_segment.data_len >= self.segment_bytes {
            // Before the replies, so that a caller sees the rotation done. A failure
            // poisons later appends (a full disk does not: the next commit tries again);
            // these records are durable, so they still succeed.
            let _ = self.rotate();
        }
        self.shared
            .stats
            .appends
            .fetch_add(count, Ordering::Relaxed);
        for (n, (_, reply)) in group.into_iter().enumerate() {
            let _ = reply.send(Ok(first_seq + n as u64));
        }
    }

    /// Preallocates the active segment's next [`PREALLOCATE_BYTES`] and syncs them, so
    /// that the appends after it pay only data fsyncs. Called at open and at rotation,
    /// not by the first append of a segment.
    pub fn prepare_segment(&mut self) -> Result<(), JournalError> {
        let step = PREALLOCATE_BYTES.min(self.segment_bytes);
        let path = self.active_segment.path.clone();
        if self.active_segment.file_len < self.active_segment.data_len + step {
            self.preallocate(self.active_segment.data_len + step)
                .map_err(|e| {
                    if is_no_space(&e) {
                        JournalError::no_space("preallocate", &path, &e)
                    } else {
                        JournalError::io("preallocate", &path, e)
                    }
                })?;
            if self.mode != FsyncMode::Never {
                self.active
                    .sync_all()
                    .map_err(|e| JournalError::io("sync", &path, e))?;
            }
        }
        Ok(())
    }

    /// Grows the active segment with written zeros to at least `needed` bytes, leaving
    /// the file position at the end of the data. On failure the file is cut back to
    /// its length before (so a full disk gets back what a partial growth took) and
    /// the position is the end of the data again.
    fn preallocate(&mut self, needed: u64) -> io::Result<()> {
        let grown = self.grow(needed);
        if grown.is_err() {
            let _ = self.active.set_len(self.active_segment.file_len);
        }
        self.active
            .seek(SeekFrom::Start(self.active_segment.data_len))?;
        let target = grown?;
        self.shared
            .bytes
            .fetch_add(target - self.active_segment.file_len, Ordering::Relaxed);
        self.active_segment.file_len = target;
        Ok(())
    }

    /// Writes the zeros of [`Self::preallocate`]; returns the new file length.
    fn grow(&mut self, needed: u64) -> io::Result<u64> {
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        #[cfg(test)]
        if self.shared.faults.disk_full.load(Ordering::SeqCst) {
            return Err(io::Error::from(io::ErrorKind::StorageFull));
        }
        let step = PREALLOCATE_BYTES.min(self.segment_bytes);
        let target = needed.max(self.active_segment.file_len + step);
        self.active
            .seek(SeekFrom::Start(self.active_segment.file_len))?;
        let mut at = self.active_segment.file_len;
        while at < target {
            let n = (target - at).min(ZEROS.len() as u64) as usize;
            self.active.write_all(&ZEROS[..n])?;
            at += n as u64;
        }
        Ok(target)
    }

    fn write_frame(&mut self) -> io::Result<()> {
        #[cfg(test)]
        if self.shared.faults.fail_write.swap(false, Ordering::SeqCst) {
            // Half a frame reaches the file, as a failing disk might leave it.
            self.active.write_all(&self.buf[..self.buf.len() / 2])?;
            return Err(io::Error::other("injected write failure"));
        }
        self.active.write_all(&self.buf)
    }

    /// fdatasync of the active segment; on success everything written is durable.
    fn sync(&mut self) -> Result<(), JournalError> {
        let started = Instant::now();
        #[cfg(test)]
        let injected = self.shared.faults.fail_sync.swap(false, Ordering::SeqCst);
        #[cfg(not(test))]
        let injected = false;
        let result = if injected {
            Err(io::Error::other("injected fsync failure"))
        } else {
            self.active.sync_data()
        };
        let stats = &self.shared.stats;
        stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        stats.fsync_micros.fetch_add(micros, Ordering::Relaxed);
        if let Err(e) = result {
            return Err(self.poison("fsync of", &e));
        }
        self.unsynced_since = None;
        self.mark_durable();
        Ok(())
    }

    /// Syncs if `interval` left anything unsynced.
    fn sync_pending(&mut self) -> Result<(), JournalError> {
        if let Some(err) = self.poisoned() {
            return Err(err);
        }
        if self.unsynced_since.is_some() {
            self.sync()?;
        }
        Ok(())
    }

    fn mark_durable(&self) {
        self.shared
            .durable_seq
            .store(self.next_seq - 1, Ordering::Release);
    }

    /// Seals the active segment (synced) and starts a new one at `next_seq`.
    fn rotate(&mut self) -> Result<(), JournalError> {
        // With `always` the last frame is already synced; `never` promises nothing.
        if self.mode == FsyncMode::Interval {
            self.sync_pending()?;
        }
        let (file, segment) = match segment::create(&self.dir, self.next_seq) {
            Ok(created) => created,
            // Nothing changed: the active segment stays, the next commit tries again.
            Err(err @ JournalError::NoSpace { .. }) => return Err(err),
            Err(err) => {
                let cause: Arc<str> = format!("starting a new segment: {err}").into();
                let _ = self.shared.poisoned.set(cause);
                return Err(err);
            }
        };
        self.shared
            .bytes
            .fetch_add(segment.file_len, Ordering::Relaxed);
        let mut sealed = std::mem::replace(&mut self.active_segment, segment);
        let sealed_file = std::mem::replace(&mut self.active, file);
        // Give back the unused preallocation. Not synced, and a failure is ignored:
        // zeros after the last frame are harmless either way.
        if sealed_file.set_len(sealed.data_len).is_ok() {
            self.shared
                .bytes
                .fetch_sub(sealed.file_len - sealed.data_len, Ordering::Relaxed);
            sealed.file_len = sealed.data_len;
        }
        self.sealed.push_back(sealed);
        if let Err(err) = self.prepare_segment() {
            // Without room the new segment has only its header; a commit grows it.
            if matches!(err, JournalError::NoSpace { .. }) {
                return Err(err);
            }
            let cause: Arc<str> = format!("preparing a new segment: {err}").into();
            let _ = self.shared.poisoned.set(cause);
            return Err(err);
        }
        Ok(())
    }

    /// Everything up to `seq` is applied upstream: remove the sealed segments that hold
    /// nothing newer.
    fn confirm(&mut self, seq: u64) -> Result<(), JournalError> {
        let last = self.next_seq - 1;
        if seq > last {
            return Err(JournalError::ConfirmAhead { seq, last });
        }
        let mut removed = false;
        while let Some(oldest) = self.sealed.front() {
            if oldest.end_seq > seq + 1 {
                break;
            }
            // Removal errors do not poison: nothing acknowledged is at risk, the file
            // just stays (and counts toward max_bytes) until a later confirm.
            std::fs::remove_file(&oldest.path)
                .map_err(|e| JournalError::io("remove", &oldest.path, e))?;
            self.shared
                .bytes
                .fetch_sub(oldest.file_len, Ordering::Relaxed);
            self.shared
                .stats
                .segments_removed
                .fetch_add(1, Ordering::Relaxed);
            self.sealed.pop_front();
            removed = true;
        }
        if removed {
            super::meta::sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

/// Moves queued appends into `group` up to the group bounds; returns the command that
/// ended the group (a non-append, or an append that did not fit), to run next.
fn drain_group(
    rx: &mut mpsc::Receiver<Command>,
    group: &mut Vec<(Bytes, oneshot::Sender<Result<u64, JournalError>>)>,
) -> Option<Command> {
    let mut bytes: usize = group.iter().map(|(p, _)| p.len()).sum();
    while group.len() < GROUP_MAX_RECORDS {
        match rx.try_recv() {
            Ok(Command::Append { payload, reply }) => {
                if bytes + payload.len() > GROUP_MAX_BYTES {
                    return Some(Command::Append { payload, reply });
                }
                bytes += payload.len();
                group.push((payload, reply));
            }
            Ok(other) => return Some(other),
            Err(_) => return None,
        }
    }
    None
}

fn fail_all(group: Vec<(Bytes, oneshot::Sender<Result<u64, JournalError>>)>, err: &JournalError) {
    for (_, reply) in group {
        let _ = reply.send(Err(clone_failure(err)));
    }
}

/// The error for each member of a failed group: a full disk as itself, anything else
/// as the poison it caused.
fn clone_failure(err: &JournalError) -> JournalError {
    match err {
        JournalError::Poisoned { cause } => JournalError::Poisoned {
            cause: cause.clone(),
        },
        JournalError::NoSpace { op, path, detail } => JournalError::NoSpace {
            op,
            path: path.clone(),
            detail: detail.clone(),
        },
        other => JournalError::Poisoned {
            cause: other.to_string().into(),
        },
    }
}
