//! Tests of the journal at its API: durability modes, recovery from torn tails and
//! damage, the fence, confirmation, back-pressure, group commit and poisoning.
//! Faults are injected through [`Faults`], which exists only in test builds.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use bytesize::ByteSize;

use super::*;

/// Test-only switches the writer reads.
#[derive(Debug, Default)]
pub struct Faults {
    /// The next frame write writes half the frame, then fails.
    pub fail_write: AtomicBool,
    /// The next fsync fails.
    pub fail_sync: AtomicBool,
    /// While set, every growth of a segment finds the disk full.
    pub disk_full: AtomicBool,
    /// While set, the writer holds the command it just received, so that others queue
    /// up behind it.
    pub paused: AtomicBool,
}

fn config(dir: &Path, fsync: FsyncMode) -> JournalConfig {
    JournalConfig {
        dir: dir.to_path_buf(),
        fsync,
        fsync_interval: Duration::from_millis(20),
        max_bytes: ByteSize::mib(1),
        ..JournalConfig::default()
    }
}

const SMALL: Tuning = Tuning {
    segment_bytes: 2048,
};

fn open(dir: &Path) -> (Journal, Recovery) {
    Journal::open_with(&config(dir, FsyncMode::Always), SMALL).expect("open")
}

fn payload(n: u64) -> Bytes {
    Bytes::from(format!("record {n:04} {}", "x".repeat(80)))
}

async fn append_n(journal: &Journal, from: u64, to: u64) {
    for n in from..=to {
        assert_eq!(journal.append(payload(n)).await.expect("append"), n);
    }
}

fn seqs(recovery: &Recovery) -> Vec<u64> {
    recovery.records.iter().map(|r| r.seq).collect()
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    segment::list(dir)
        .expect("list")
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}

fn last_segment(dir: &Path) -> PathBuf {
    segments(dir).pop().expect("a segment")
}

/// Where the frames of a segment end: its tail is preallocated zeros, and every test
/// payload ends in a non-zero byte.
fn data_end(path: &Path) -> u64 {
    let data = std::fs::read(path).expect("read");
    data.iter()
        .rposition(|&b| b != 0)
        .map_or(0, |i| i as u64 + 1)
}

#[tokio::test]
async fn round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, recovery) = open(dir.path());
    assert!(recovery.records.is_empty());
    assert_eq!(recovery.next_seq, 1);
    append_n(&journal, 1, 3).await;
    let empty = journal.append(Bytes::new()).await.expect("empty payload");
    assert_eq!(empty, 4);
    assert_eq!(journal.durable_seq(), 4);
    journal.close().await.expect("close");

    let (_journal, recovery) = open(dir.path());
    let expected: Vec<Record> = (1..=3)
        .map(|n| Record {
            seq: n,
            payload: payload(n),
        })
        .chain([Record {
            seq: 4,
            payload: Bytes::new(),
        }])
        .collect();
    assert_eq!(recovery.records, expected);
    assert_eq!(recovery.next_seq, 5);
    assert_eq!(recovery.torn, None);
}

#[tokio::test]
async fn seq_continues_and_epoch_grows_across_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, _) = open(dir.path());
    let (id, first_epoch) = (journal.id(), journal.epoch());
    assert_eq!(first_epoch, 1);
    append_n(&journal, 1, 2).await;
    journal.close().await.expect("close");

    let (journal, recovery) = open(dir.path());
    assert_eq!(journal.epoch(), 2);
    assert_eq!(journal.id(), id);
    assert_eq!(recovery.next_seq, 3);
    append_n(&journal, 3, 4).await;
    journal.close().await.expect("close");

    let (journal, recovery) = open(dir.path());
    assert_eq!(journal.epoch(), 3);
    assert_eq!(seqs(&recovery), vec![1, 2, 3, 4]);
}

#[tokio::test]
async fn second_open_while_the_first_is_alive_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, _) = open(dir.path());
    let second = Journal::open_with(&config(dir.path(), FsyncMode::Always), SMALL);
    assert!(matches!(second, Err(JournalError::Locked(_))));
    // The refused open must not have bumped the epoch or touched anything.
    append_n(&journal, 1, 1).await;
    journal.close().await.expect("close");
    let (journal, recovery) = open(dir.path());
    assert_eq!(journal.epoch(), 2);
    assert_eq!(seqs(&recovery), vec![1]);
}

#[tokio::test]
async fn truncated_last_record_is_cut_off_and_appends_continue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, _) = open(dir.path());
    append_n(&journal, 1, 3).await;
    journal.close().await.expect("close");
    let path = last_segment(dir.path());
    let len = data_end(&path);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open segment");
    file.set_len(len - 10).expect("truncate mid-record");

    let (journal, recovery) = open(dir.path());
    assert_eq!(seqs(&recovery), vec![1, 2]);
    let torn = recovery.torn.expect("torn tail reported");
    assert_eq!(torn.offset + torn.bytes, len - 10);
    assert_eq!(recovery.next_seq, 3);
    append_n(&journal, 3, 4).await;
    journal.close().await.expect("close");

    let (_journal, recovery) = open(dir.path());
    assert_eq!(seqs(&recovery), vec![1, 2, 3, 4]);
    assert_eq!(recovery.records[2].payload, payload(3));
    assert_eq!(recovery.torn, None);
}

/// Flips a byte `at_from_end` bytes before the end of the segment's frames.
fn flip_byte(path: &Path, at_from_end: u64) {
    let at = (data_end(path) - at_from_end) as usize;
    let mut data = std::fs::read(path).expect("read");
    data[at] ^= 0x40;
    std::fs::write(path, data).expect("write");
}

#[tokio::test]
async fn flipped_byte_in_last_record_is_cut_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, _) = open(dir.path());
    append_n(&journal, 1, 3).await;
    journal.close().await.expect("close");
    flip_byte(&last_segment(dir.path()), 5);

    let (journal, recovery) = open(dir.path());
    assert_eq!(seqs(&recovery), vec![1, 2]);
    assert!(recovery.torn.is_some());
    assert_eq!(journal.append(payload(3)).await.expect("append"), 3);
}

#[tokio::test]
async fn damage_in_the_middle_is_an_error_not_a_skip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, _) = open(dir.path());
    append_n(&journal, 1, 3).await;
    journal.close().await.expect("close");
    let path = last_segment(dir.path());
    let mut data = std::fs::read(&path).expect("read");
    data[format::SEGMENT_HEADER_LEN + 40] ^= 0x01; // inside the first record's payload
    std::fs::write(&path, &data).expect("write");

    let reopened = Journal::open_with(&config(dir.path(), FsyncMode::Always), SMALL);
    let Err(JournalError::Corrupt { offset, .. }) = reopened else {
        panic!("expected Corrupt");
    };
    assert_eq!(offset, format::SEGMENT_HEADER_LEN as u64);
    // Nothing was cut: the file is as it was.
    assert_eq!(std::fs::read(&path).expect("read"), data);
}

#[tokio::test]
async fn damage_in_a_sealed_segment_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, _) = open(dir.path());
    append_n(&journal, 1, 40).await;
    journal.close().await.expect("close");
    let all = segments(dir.path());
    assert!(all.len() >= 2, "small segments rotate");
    // The last frame of the first (sealed) segment: damage there is never a torn tail.
    flip_byte(&all[0], 3);
    let reopened = Journal::open_with(&config(dir.path(), FsyncMode::Always), SMALL);
    assert!(matches!(reopened, Err(JournalError::Corrupt { .. })));
}

#[tokio::test]
async fn with_interval_a_damaged_frame_and_what_follows_are_cut_and_reported() {
    // Several frames may be unsynced at an OS crash with `interval`, so a damaged frame
    // followed by intact ones can be a torn write: recovery keeps the prefix.
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), FsyncMode::Interval);
    let (journal, _) = Journal::open_with(&cfg, SMALL).expect("open");
    append_n(&journal, 1, 3).await;
    journal.close().await.expect("close");
    let path = last_segment(dir.path());
    let frame_len = format::FRAME_HEADER_LEN + format::RECORD_HEADER_LEN + payload(1).len();
    let second_frame = format::SEGMENT_HEADER_LEN + frame_len;
    let mut data = std::fs::read(&path).expect("read");
    data[second_frame + 30] ^= 0x01;
    std::fs::write(&path, &data).expect("write");

    let (journal, recovery) = Journal::open_with(&cfg, SMALL).expect("open");
    assert_eq!(seqs(&recovery), vec![1]);
    let torn = recovery.torn.expect("reported");
    assert_eq!(torn.offset, second_frame as u64);
    assert_eq!(journal.append(payload(2)).await.expect("append"), 2);
}

#[tokio::test]
async fn confirm_removes_sealed_segments_and_bytes_shrink() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, _) = open(dir.path());
    append_n(&journal, 1, 100).await;
    let before = journal.bytes();
    let files_before = segments(dir.path()).len();
    let on_disk: u64 = segments(dir.path())
        .iter()
        .map(|p| std::fs::metadata(p).expect("stat").len())
        .sum();
    assert_eq!(before, on_disk, "bytes() is the size of the files");

    journal.confirm(60).await.expect("confirm");
    assert!(journal.bytes() < before);
    let remaining = segments(dir.path());
    assert!(remaining.len() < files_before);
    assert!(journal.stats().segments_removed.load(Ordering::Relaxed) > 0);
    let on_disk: u64 = remaining
        .iter()
        .map(|p| std::fs::metadata(p).expect("stat").len())
        .sum();
    assert_eq!(journal.bytes(), on_disk);
    assert!(matches!(
        journal.confirm(101).await,
        Err(JournalError::ConfirmAhead {
            seq: 101,
            last: 100
        })
    ));
    journal.close().await.expect("close");

    // What remains starts at a segment boundary at or before 61 and runs to 100.
    let (_journal, recovery) = open(dir.path());
    let got = seqs(&recovery);
    assert!(got[0] > 1 && got[0] <= 61, "first kept record {}", got[0]);
    assert_eq!(got, (got[0]..=100).collect::<Vec<_>>());
}

#[tokio::test]
async fn seq_continues_when_no_record_is_left() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, _) = open(dir.path());
    // Append until a rotation leaves an empty active segment, then confirm everything.
    let mut last = 0;
    while segments(dir.path()).len() < 2 {
        last += 1;
        append_n(&journal, last, last).await;
    }
    journal.confirm(last).await.expect("confirm");
    assert_eq!(segments(dir.path()).len(), 1);
    journal.close().await.expect("close");

    let (journal, recovery) = open(dir.path());
    assert!(recovery.records.is_empty());
    assert_eq!(recovery.next_seq, last + 1);
    append_n(&journal, last + 1, last + 1).await;
    journal.close().await.expect("close");

    // A torn tail that removes the only record also keeps the floor.
    let path = last_segment(dir.path());
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    file.set_len(format::SEGMENT_HEADER_LEN as u64 + 7)
        .expect("truncate");
    let (_journal, recovery) = open(dir.path());
    assert!(recovery.records.is_empty());
    assert_eq!(recovery.next_seq, last + 1);
}

#[tokio::test]
async fn full_over_max_bytes_until_confirmed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path(), FsyncMode::Always);
    cfg.max_bytes = ByteSize::kib(8);
    let (journal, _) = Journal::open_with(&cfg, SMALL).expect("open");
    let mut appended = 0;
    let err = loop {
        match journal.append(payload(appended + 1)).await {
            Ok(seq) => appended = seq,
            Err(err) => break err,
        }
        assert!(appended < 1000, "never full");
    };
    let JournalError::Full { bytes, max_bytes } = err else {
        panic!("expected Full, got {err}");
    };
    assert!(bytes >= max_bytes && max_bytes == 8 * 1024);
    assert!(err.is_retryable());
    assert_eq!(journal.stats().full.load(Ordering::Relaxed), 1);

    journal.confirm(appended).await.expect("confirm");
    assert!(journal.bytes() < journal.max_bytes());
    assert_eq!(
        journal.append(payload(0)).await.expect("room again"),
        appended + 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_serves_many_appends_with_one_fsync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, _) = open(dir.path());
    journal.shared.faults.paused.store(true, Ordering::SeqCst);
    let tasks: Vec<_> = (0..64)
        .map(|n| {
            let journal = journal.clone();
            tokio::spawn(async move { journal.append(payload(n)).await })
        })
        .collect();
    // The writer holds the first append; the other 63 queue behind it.
    while journal.queued() < 63 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    journal.shared.faults.paused.store(false, Ordering::SeqCst);
    let mut got = Vec::new();
    for task in tasks {
        got.push(task.await.expect("task").expect("append"));
    }
    got.sort_unstable();
    assert_eq!(got, (1..=64).collect::<Vec<_>>());
    let stats = journal.stats();
    assert_eq!(stats.appends.load(Ordering::Relaxed), 64);
    assert_eq!(stats.groups.load(Ordering::Relaxed), 1);
    assert_eq!(stats.fsyncs.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_get_distinct_seqs_in_journal_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, _) = open(dir.path());
    let tasks: Vec<_> = (0..8u64)
        .map(|writer| {
            let journal = journal.clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                for n in 0..50 {
                    let body = Bytes::from(format!("{writer}:{n}"));
                    mine.push((journal.append(body.clone()).await.expect("append"), body));
                }
                mine
            })
        })
        .collect();
    let mut acked = Vec::new();
    for task in tasks {
        acked.extend(task.await.expect("task"));
    }
    acked.sort();
    let stats = journal.stats();
    assert!(stats.fsyncs.load(Ordering::Relaxed) <= 400);
    journal.close().await.expect("close");
    let (_journal, recovery) = open(dir.path());
    let recovered: Vec<(u64, Bytes)> = recovery
        .records
        .into_iter()
        .map(|r| (r.seq, r.payload))
        .collect();
    assert_eq!(recovered, acked, "every acknowledged record, under its seq");
}

#[tokio::test]
async fn failed_write_poisons_and_reopen_recovers_what_was_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, _) = open(dir.path());
    append_n(&journal, 1, 2).await;
    journal
        .shared
        .faults
        .fail_write
        .store(true, Ordering::SeqCst);
    let err = journal.append(payload(3)).await.expect_err("injected");
    assert!(matches!(err, JournalError::Poisoned { .. }), "{err}");
    assert!(err.to_string().contains("injected write failure"), "{err}");
    assert!(journal.is_poisoned());
    // Poison is permanent: no retry can report success.
    let again = journal.append(payload(3)).await.expect_err("poisoned");
    assert!(matches!(again, JournalError::Poisoned { .. }));
    assert!(!again.is_retryable());
    drop(journal);

    let (journal, recovery) = reopen_when_released(dir.path()).await;
    assert_eq!(seqs(&recovery), vec![1, 2]);
    assert!(recovery.torn.is_some(), "the half frame is cut off");
    assert_eq!(journal.append(payload(3)).await.expect("append"), 3);
}

#[tokio::test]
async fn a_full_disk_refuses_appends_without_poisoning_and_they_resume_when_space_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, _) = open(dir.path());
    append_n(&journal, 1, 3).await;
    let faults = &journal.shared.faults;
    faults.disk_full.store(true, Ordering::SeqCst);
    // Appends go on into space already grown; the first that needs more is refused.
    let mut last = 3;
    let err = loop {
        match journal.append(payload(last + 1)).await {
            Ok(seq) => {
                assert_eq!(seq, last + 1);
                last = seq;
                assert!(last < 200, "the segment never needed to grow");
            }
            Err(err) => break err,
        }
    };
    assert!(matches!(err, JournalError::NoSpace { .. }), "{err}");
    assert!(err.is_retryable() && err.is_out_of_room());
    assert!(!journal.is_poisoned());
    assert_eq!(journal.durable_seq(), last);
    // Still full: still refused, and no sequence number is used up.
    let again = journal.append(payload(last + 1)).await.expect_err("full");
    assert!(matches!(again, JournalError::NoSpace { .. }), "{again}");
    assert_eq!(journal.stats().no_space.load(Ordering::Relaxed), 2);

    faults.disk_full.store(false, Ordering::SeqCst);
    append_n(&journal, last + 1, last + 30).await;
    journal.close().await.expect("close");
    let (_, recovery) = reopen_when_released(dir.path()).await;
    assert_eq!(seqs(&recovery), (1..=last + 30).collect::<Vec<_>>());
    assert!(recovery.torn.is_none(), "nothing half-written");
}

#[tokio::test]
async fn failed_fsync_poisons() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, _) = open(dir.path());
    append_n(&journal, 1, 1).await;
    journal
        .shared
        .faults
        .fail_sync
        .store(true, Ordering::SeqCst);
    let err = journal.append(payload(2)).await.expect_err("injected");
    assert!(err.to_string().contains("injected fsync failure"), "{err}");
    assert!(matches!(
        journal.append(payload(2)).await,
        Err(JournalError::Poisoned { .. })
    ));
    assert!(matches!(
        journal.clone().close().await,
        Err(JournalError::Poisoned { .. })
    ));
    assert_eq!(journal.durable_seq(), 1);
}

/// A dropped (not closed) journal releases its lock when the writer thread ends.
async fn reopen_when_released(dir: &Path) -> (Journal, Recovery) {
    for _ in 0..500 {
        match Journal::open_with(&config(dir, FsyncMode::Always), SMALL) {
            Err(JournalError::Locked(_)) => tokio::time::sleep(Duration::from_millis(2)).await,
            other => return other.expect("reopen"),
        }
    }
    panic!("lock never released");
}

#[tokio::test]
async fn interval_acknowledges_before_sync_and_syncs_within_the_interval() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), FsyncMode::Interval);
    let (journal, _) = Journal::open_with(&cfg, SMALL).expect("open");
    for n in 1..=5 {
        journal.append(payload(n)).await.expect("append");
    }
    // Acknowledged after the write; the timer syncs within fsync_interval (20 ms).
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while journal.durable_seq() < 5 {
        assert!(std::time::Instant::now() < deadline, "never synced");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let fsyncs = journal.stats().fsyncs.load(Ordering::Relaxed);
    assert!((1..5).contains(&fsyncs), "{fsyncs} fsyncs for 5 appends");
}

#[tokio::test]
async fn never_does_not_fsync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), FsyncMode::Never);
    let (journal, _) = Journal::open_with(&cfg, SMALL).expect("open");
    append_n(&journal, 1, 50).await;
    assert_eq!(journal.stats().fsyncs.load(Ordering::Relaxed), 0);
    journal.close().await.expect("close");
    let (_journal, recovery) = Journal::open_with(&cfg, SMALL).expect("open");
    assert_eq!(recovery.records.len(), 50);
}

#[tokio::test]
async fn oversized_record_is_refused_without_poisoning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, _) = open(dir.path());
    let big = Bytes::from(vec![0u8; MAX_RECORD_BYTES + 1]);
    assert!(matches!(
        journal.append(big).await,
        Err(JournalError::TooLarge { .. })
    ));
    append_n(&journal, 1, 1).await;
}

#[tokio::test]
async fn public_open_uses_config_dir_and_creates_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nested = dir.path().join("a/b");
    let (journal, recovery) =
        Journal::open(&config(&nested, FsyncMode::Always)).expect("open nested");
    assert_eq!(recovery.next_seq, 1);
    append_n(&journal, 1, 1).await;
    assert!(nested.join("meta").exists() && nested.join("LOCK").exists());
}
