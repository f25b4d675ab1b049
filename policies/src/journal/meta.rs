//! The journal directory's identity and fence: the `LOCK` file and the `meta` file
//! (journal id and epoch).
//!
//! Invariants:
//! - The exclusive lock on `LOCK` is taken before anything else in the directory is
//!   read or written, and held for as long as the writer runs; a second open fails
//!   with `Locked` instead of interleaving appends.
//! - The id is chosen once, when the directory is new, and never changes. A directory
//!   with segments but no meta file is refused: a fresh id would detach the journal
//!   from its ledger rows and replay everything.
//! - The epoch grows by one at every open and is durable before `open` returns: the
//!   new contents go to `meta.tmp`, which is fsynced, renamed over `meta`, and the
//!   directory is fsynced.

use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::Path;

use super::JournalError;

const LOCK_FILE: &str = "LOCK";
const META_FILE: &str = "meta";
const META_TMP: &str = "meta.tmp";
const META_HEADER: &str = "spillway-journal 1";

/// A journal's identity, random and fixed for the life of its directory. Shown as a
/// version-4 UUID so the ledger can store it in a `uuid` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct JournalId(pub u128);

impl JournalId {
    fn random() -> Self {
        // RFC 9562 version 4, variant 10xx: the 122 other bits are random.
        let bits = rand::random::<u128>();
        let bits = (bits & !(0xF << 76)) | (0x4 << 76);
        let bits = (bits & !(0x3 << 62)) | (0x2 << 62);
        JournalId(bits)
    }

    fn parse(s: &str) -> Option<Self> {
        let hex: String = s.chars().filter(|c| *c != '-').collect();
        if hex.len() != 32 {
            return None;
        }
        u128::from_str_radix(&hex, 16).ok().map(JournalId)
    }
}

impl fmt::Display for JournalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = format!("{:032x}", self.0);
        write!(
            f,
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..]
        )
    }
}

/// Takes the directory's exclusive lock; the returned file holds it until dropped.
pub fn lock(dir: &Path) -> Result<File, JournalError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| JournalError::io("open", &path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(JournalError::Locked(dir.to_path_buf())),
        Err(TryLockError::Error(e)) => Err(JournalError::io("lock", &path, e)),
    }
}

/// Reads (or creates) the meta file, bumps the epoch, and makes the result durable.
/// `has_segments` says whether the directory already holds journal data.
pub fn open_and_bump(dir: &Path, has_segments: bool) -> Result<(JournalId, u64), JournalError> {
    let path = dir.join(META_FILE);
    let (id, epoch) = match fs::read_to_string(&path) {
        Ok(text) => parse(&text).ok_or_else(|| JournalError::Meta {
            path: path.clone(),
            problem: "unreadable contents (expected a spillway-journal 1 meta file)".into(),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if has_segments {
                return Err(JournalError::Meta {
                    path,
                    problem: "missing, but the directory holds journal segments; restore it \
                              from a backup rather than starting a new journal over old data"
                        .into(),
                });
            }
            (JournalId::random(), 0)
        }
        Err(e) => return Err(JournalError::io("read", &path, e)),
    };
    let epoch = epoch + 1;
    let tmp = dir.join(META_TMP);
    let text = format!("{META_HEADER}\nid {id}\nepoch {epoch}\n");
    let mut file = File::create(&tmp).map_err(|e| JournalError::io("create", &tmp, e))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| JournalError::io("write", &tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| JournalError::io("rename", &path, e))?;
    sync_dir(dir)?;
    Ok((id, epoch))
}

fn parse(text: &str) -> Option<(JournalId, u64)> {
    let mut lines = text.lines();
    if lines.next()? != META_HEADER {
        return None;
    }
    let id = JournalId::parse(lines.next()?.strip_prefix("id ")?)?;
    let epoch = lines.next()?.strip_prefix("epoch ")?.parse().ok()?;
    Some((id, epoch))
}

/// Makes the directory's entries (created, renamed, removed files) durable.
pub fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| JournalError::io("fsync directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_is_a_v4_uuid_and_round_trips() {
        let id = JournalId::random();
        let s = id.to_string();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"));
        assert_eq!(JournalId::parse(&s), Some(id));
    }

    #[test]
    fn epoch_bumps_and_id_stays() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (id1, e1) = open_and_bump(dir.path(), false).expect("first");
        let (id2, e2) = open_and_bump(dir.path(), true).expect("second");
        assert_eq!((e1, e2), (1, 2));
        assert_eq!(id1, id2);
    }

    #[test]
    fn missing_meta_with_data_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            open_and_bump(dir.path(), true),
            Err(JournalError::Meta { .. })
        ));
    }
}
