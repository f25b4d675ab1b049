//! Replays the fuzz targets' seed corpora (`fuzz/corpus/<target>/`) through the
//! targets' own bodies (`fuzz/src/lib.rs`) on the stable toolchain: every seed, and
//! every finding added to a corpus as a regression seed, runs in the ordinary suite.
//! libFuzzer itself runs with `fuzz/run.sh` (nightly, cargo-fuzz).

#[path = "../../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod targets;

use std::path::{Path, PathBuf};

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    files
}

fn replay(target: &str, run: fn(&[u8])) {
    for path in corpus(target) {
        let data = std::fs::read(&path).expect("read seed");
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{target}: {} panics", path.display());
    }
}

#[test]
fn startup_seeds() {
    replay("startup", targets::startup);
}

#[test]
fn messages_seeds() {
    replay("messages", targets::messages);
}

#[test]
fn classify_seeds() {
    replay("classify", targets::classify);
}

#[test]
fn journal_seeds() {
    replay("journal", targets::journal);
}

#[test]
fn config_seeds() {
    replay("config", targets::config);
}

/// Writes the journal target's seeds: segments the journal itself wrote (a few
/// records; one with a torn last frame). Run by hand when the format changes:
/// `cargo test -p spillway --test fuzz_corpus -- --ignored write_journal_seeds`.
#[test]
#[ignore = "regenerates fuzz/corpus/journal; run by hand"]
fn write_journal_seeds() {
    use spillway_policies::config::{FsyncMode, JournalConfig};
    use spillway_policies::journal::Journal;
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/journal");
    std::fs::create_dir_all(&out).expect("corpus dir");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = JournalConfig {
        dir: dir.path().to_path_buf(),
        fsync: FsyncMode::Always,
        ..JournalConfig::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (journal, _) = Journal::open(&config).expect("open");
        for payload in [&b"first"[..], b"second record", &[b'x'; 300]] {
            journal
                .append(bytes::Bytes::copy_from_slice(payload))
                .await
                .expect("append");
        }
        journal.close().await.expect("close");
    });
    let segment = spillway_policies::journal::segment_path(dir.path(), 1);
    let bytes = std::fs::read(&segment).expect("segment");
    // Preallocated zeros past the last frame are not interesting to the fuzzer.
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    std::fs::write(out.join("three-records"), &bytes[..end]).expect("write seed");
    std::fs::write(out.join("torn-tail"), &bytes[..end.saturating_sub(7)]).expect("write seed");
}
