//! Segment files on disk: naming, creation, and the recovery scan.
//!
//! A segment is named after the sequence number of its first record
//! (`00000000000000000001.seg`), so the names alone order the segments and keep the
//! sequence floor even when a segment holds no record yet.
//!
//! Invariants kept by recovery (and by the writer, which produces them):
//! - Segments are contiguous: each one's first sequence number is one past the last
//!   record of the one before. A gap or overlap is `Corrupt`.
//! - Only the last segment can have a torn tail: the writer fsyncs a segment before it
//!   creates the next one. Damage in any earlier segment is `Corrupt`.
//! - Zeros after the last frame are preallocated space (the writer extends a segment
//!   with written zeros so that an fdatasync flushes data only, not the file size
//!   and block map: ADR 0010), not damage, in any segment.
//! - In the last segment, a damaged or incomplete frame is a torn tail, cut off, if no
//!   intact frame follows it. If one follows, the frame was synced before the later one
//!   was written (true with `fsync = "always"`), so it is damage: `Corrupt`. With
//!   `interval`/`never` several frames may be unsynced at a crash, so there the damaged
//!   frame and everything after it are cut off and reported in [`TornTail`].

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::error::is_no_space;
use super::format::{self, Decoded};
use super::meta::sync_dir;
use super::{JournalError, Record, TornTail};

const SEGMENT_SUFFIX: &str = ".seg";

/// A segment as the writer tracks it.
#[derive(Debug, Clone)]
pub struct Segment {
    pub path: PathBuf,
    /// Sequence number after its last record (the first one, from its name, when it
    /// holds none).
    pub end_seq: u64,
    /// End of the last frame (the header's end when there is none): where the next
    /// frame goes.
    pub data_len: u64,
    /// Size of the file, preallocated zeros included; what `Journal::bytes` counts.
    pub file_len: u64,
}

pub fn path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}{SEGMENT_SUFFIX}"))
}

/// The directory's segment files, ordered by first sequence number.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    let mut out = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| JournalError::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| JournalError::io("list", dir, e))?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(SEGMENT_SUFFIX)) else {
            continue;
        };
        let first_seq = stem.parse().map_err(|_| JournalError::Corrupt {
            path: entry.path(),
            offset: 0,
            problem: "segment file name is not a sequence number".into(),
        })?;
        out.push((first_seq, entry.path()));
    }
    out.sort_unstable_by_key(|(seq, _)| *seq);
    Ok(out)
}

/// Creates a new, empty segment and makes its existence durable. Returns it opened
/// for appending.
pub fn create(dir: &Path, first_seq: u64) -> Result<(File, Segment), JournalError> {
    let path = path(dir, first_seq);
    let mut file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&path)
        .map_err(|e| JournalError::io("create", &path, e))?;
    if let Err(e) = file
        .write_all(&format::encode_segment_header(first_seq))
        .and_then(|()| file.sync_all())
    {
        // A full disk leaves no half-made segment behind for the next attempt (which
        // uses the same name) or for recovery to trip over.
        if is_no_space(&e) {
            drop(file);
            let _ = fs::remove_file(&path);
            return Err(JournalError::no_space("create", &path, &e));
        }
        return Err(JournalError::io("write header", &path, e));
    }
    sync_dir(dir)?;
    let segment = Segment {
        path,
        end_seq: first_seq,
        data_len: format::SEGMENT_HEADER_LEN as u64,
        file_len: format::SEGMENT_HEADER_LEN as u64,
    };
    Ok((file, segment))
}

/// Opens the last segment after recovery, positioned where the next frame goes.
pub fn open_for_append(segment: &Segment) -> Result<File, JournalError> {
    let mut file = OpenOptions::new()
        .write(true)
        .open(&segment.path)
        .map_err(|e| JournalError::io("open", &segment.path, e))?;
    file.seek(SeekFrom::Start(segment.data_len))
        .map_err(|e| JournalError::io("seek", &segment.path, e))?;
    Ok(file)
}

/// What recovery found.
pub struct Scan {
    pub segments: Vec<Segment>,
    pub records: Vec<Record>,
    pub torn: Option<TornTail>,
}

/// Reads and verifies every segment, cuts off a torn tail, and creates the first
/// segment of a new journal. `strict` is true with `fsync = "always"` (module docs).
pub fn recover(dir: &Path, strict: bool) -> Result<Scan, JournalError> {
    let listed = list(dir)?;
    let mut scan = Scan {
        segments: Vec::with_capacity(listed.len()),
        records: Vec::new(),
        torn: None,
    };
    let Some(last_index) = listed.len().checked_sub(1) else {
        let (_, segment) = create(dir, 1)?;
        scan.segments.push(segment);
        return Ok(scan);
    };
    let mut expected = listed[0].0;
    for (i, (first_seq, path)) in listed.into_iter().enumerate() {
        let corrupt = |offset: usize, problem: String| JournalError::Corrupt {
            path: path.clone(),
            offset: offset as u64,
            problem,
        };
        if first_seq != expected {
            return Err(corrupt(
                0,
                format!("segment starts at sequence {first_seq}, expected {expected}"),
            ));
        }
        let is_last = i == last_index;
        let data = Bytes::from(fs::read(&path).map_err(|e| JournalError::io("read", &path, e))?);
        match format::decode_segment_header(&data) {
            Some(seq) if seq == first_seq => {}
            Some(seq) => {
                return Err(corrupt(
                    0,
                    format!("header says sequence {seq}, name says {first_seq}"),
                ));
            }
            // A crash while the last segment was being created: it holds no record.
            None if is_last && data.len() <= format::SEGMENT_HEADER_LEN => {
                fs::remove_file(&path).map_err(|e| JournalError::io("remove", &path, e))?;
                let (_, segment) = create(dir, first_seq)?;
                scan.torn = Some(TornTail {
                    segment: path.clone(),
                    offset: 0,
                    bytes: data.len() as u64,
                });
                scan.segments.push(segment);
                continue;
            }
            None => return Err(corrupt(0, "bad segment header".into())),
        }

        let mut at = format::SEGMENT_HEADER_LEN;
        let mut file_len = data.len();
        while at < data.len() {
            let problem = match format::decode_frame(&data[at..]) {
                Decoded::Frame(frame) if frame.first_seq == expected => {
                    for (n, range) in frame.payloads.iter().enumerate() {
                        scan.records.push(Record {
                            seq: expected + n as u64,
                            payload: data.slice(at + range.start..at + range.end),
                        });
                    }
                    expected += frame.payloads.len() as u64;
                    at += frame.len;
                    continue;
                }
                Decoded::Frame(frame) => {
                    return Err(corrupt(
                        at,
                        format!(
                            "frame starts at sequence {}, expected {expected}",
                            frame.first_seq
                        ),
                    ));
                }
                // Preallocated space: the clean end of the data.
                _ if data[at..].iter().all(|&b| b == 0) => break,
                Decoded::Incomplete => "incomplete frame",
                Decoded::Invalid(problem) => problem,
            };
            if !is_last {
                return Err(corrupt(at, format!("{problem} in a sealed segment")));
            }
            if strict && let Some(later) = format::find_frame_after(&data, at + 1, expected) {
                return Err(corrupt(
                    at,
                    format!("{problem}, but an intact frame follows at byte {later}"),
                ));
            }
            // Cutting the preallocated zeros too is harmless: the writer extends again.
            truncate(&path, at as u64)?;
            let damaged_end = data.iter().rposition(|&b| b != 0).map_or(at, |i| i + 1);
            scan.torn = Some(TornTail {
                segment: path.clone(),
                offset: at as u64,
                bytes: (damaged_end - at) as u64,
            });
            file_len = at;
            break;
        }
        scan.segments.push(Segment {
            data_len: at.min(data.len()) as u64,
            file_len: file_len as u64,
            path,
            end_seq: expected,
        });
    }
    Ok(scan)
}

fn truncate(path: &Path, len: u64) -> Result<(), JournalError> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| {
            f.set_len(len)?;
            f.sync_all()
        })
        .map_err(|e| JournalError::io("truncate torn tail of", path, e))
}
