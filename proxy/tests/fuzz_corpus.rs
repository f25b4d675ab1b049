//! Replays the fuzz targets' seed corpora (`fuzz/corpus/<target>/`) through the
//! targets' own bodies (`fuzz/src/lib.rs`) on the stable toolchain: every seed, and
//! every finding added to a corpus as a regression seed, runs in the ordinary suite.
//! libFuzzer itself runs with `fuzz/run.sh` (nightly, cargo-fuzz).
//!
//! `smoke`: the short fuzz run of every target that CI makes (issue 18), on stable and
//! without coverage guidance: for a few seconds per target (`SPILLWAY_FUZZ_SMOKE_SECS`,
//! default 8), inputs mutated from the seeds (bit flips, byte and length-field
//! changes, cuts, insertions, splices of two seeds) from a seed that changes per run
//! and is printed. A panic fails the test, names the seed and saves the input under
//! `fuzz/artifacts/<target>/` to be replayed with libFuzzer or added to the corpus.
//! It finds shallow faults in what changed; the coverage-guided runs stay `run.sh`'s.

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

/// A target's body.
type Body = fn(&[u8]);

/// The target bodies, by corpus name.
const TARGETS: [(&str, Body); 6] = [
    ("startup", targets::startup),
    ("messages", targets::messages),
    ("classify", targets::classify),
    ("journal", targets::journal),
    ("config", targets::config),
    ("pgoutput", targets::pgoutput),
];

/// One input derived from the seeds.
fn mutate(rng: &mut impl rand::Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut data = seeds[rng.random_range(0..seeds.len())].clone();
    for _ in 0..rng.random_range(1..=4) {
        let len = data.len();
        match rng.random_range(0..7) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                data[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                data[i] = *[0u8, 0xff, 0x7f, 0x80, b'\'', b'(', b'$']
                    .get(rng.random_range(0..7))
                    .unwrap_or(&0);
            }
            // A length or count field: four bytes set to an edge value.
            2 if len >= 4 => {
                let i = rng.random_range(0..=len - 4);
                let v: u32 = *[0u32, 1, 3, 4, 5, 0x7fff_ffff, 0xffff_ffff, 1 << 30]
                    .get(rng.random_range(0..8))
                    .unwrap_or(&0);
                data[i..i + 4].copy_from_slice(&v.to_be_bytes());
            }
            3 if len > 0 => data.truncate(rng.random_range(0..len)),
            4 => {
                let at = rng.random_range(0..=len);
                let n = rng.random_range(1..=16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                data.splice(at..at, bytes);
            }
            5 if len > 0 => {
                let (a, b) = (rng.random_range(0..len), rng.random_range(0..len));
                let (lo, hi) = (a.min(b), a.max(b));
                let copy = data[lo..=hi].to_vec();
                data.splice(hi..hi, copy);
            }
            _ => {
                let other = &seeds[rng.random_range(0..seeds.len())];
                let cut = rng.random_range(0..=data.len());
                let from = rng.random_range(0..=other.len());
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
        }
    }
    data
}

#[test]
fn smoke() {
    use rand::SeedableRng;
    let secs: u64 = std::env::var("SPILLWAY_FUZZ_SMOKE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let seed: u64 = std::env::var("SPILLWAY_FUZZ_SMOKE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("fuzz smoke: seed {seed} (SPILLWAY_FUZZ_SMOKE_SEED), {secs} s per target");
    // The targets' own panics are what this looks for; keep their messages short.
    for (target, run) in TARGETS {
        let seeds: Vec<Vec<u8>> = corpus(target)
            .iter()
            .map(|p| std::fs::read(p).expect("read seed"))
            .collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ target.len() as u64);
        let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        let mut runs = 0u64;
        while std::time::Instant::now() < until {
            let data = mutate(&mut rng, &seeds);
            if std::panic::catch_unwind(|| run(&data)).is_err() {
                let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../fuzz/artifacts")
                    .join(target);
                let _ = std::fs::create_dir_all(&dir);
                let path = dir.join(format!("smoke-{seed}-{runs}"));
                let _ = std::fs::write(&path, &data);
                panic!(
                    "{target}: input {runs} of seed {seed} panics; saved as {}",
                    path.display()
                );
            }
            runs += 1;
        }
        eprintln!("fuzz smoke: {target}: {runs} inputs, none panicked");
    }
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

#[test]
fn pgoutput_seeds() {
    replay("pgoutput", targets::pgoutput);
}
