//! Journal storage benchmark behind ADR 0010: spillway's own segment files against
//! the storage crates it could have used, with `fsync = "always"` semantics.
//!
//! - **appends/s**: `WRITERS` writers append 100-byte records, each waiting until its
//!   record is durable, for `SPILLWAY_BENCH_SECS` (2) seconds per variant and round.
//!   The writers are OS threads blocking on each append in every variant, so that the
//!   comparison is of storage and group commit only. `spillway` is the real `Journal`;
//!   `fjall` puts the journal's group commit in front of fjall 2 (a writer thread
//!   drains the queue into one batch, commits it with `PersistMode::SyncAll`, then
//!   acknowledges); `okaywal` uses its own group commit (a leader thread syncs for all
//!   waiting writers). `spillway (tokio tasks)` drives the real `Journal` from tokio
//!   tasks on two current-thread runtimes, the way the proxy's workers will.
//! - **recovery**: reopen a journal of `SPILLWAY_BENCH_RECORDS` (100,000) records and
//!   read every record back into memory.
//!
//! This machine's fsync latency drifts by several times within seconds, so variants run
//! back to back in a rotating order and the ratios are taken within each round; the
//! report gives their median and quartiles over `SPILLWAY_BENCH_ROUNDS` (10) rounds. The
//! data goes to `SPILLWAY_BENCH_DIR` (default: the system temp dir), which must be a
//! real disk: on a tmpfs fsync is free. Run:
//! `cargo bench -p spillway-policies --bench journal`.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytesize::ByteSize;
use spillway_policies::journal::Journal;
use spillway_policies::{FsyncMode, JournalConfig};
use tokio::sync::{mpsc, oneshot};

const WRITERS: usize = 8;
const PAYLOAD: usize = 100;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn payload() -> Bytes {
    Bytes::from(vec![b'p'; PAYLOAD])
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn journal_config(dir: &Path) -> JournalConfig {
    JournalConfig {
        dir: dir.to_path_buf(),
        fsync: FsyncMode::Always,
        fsync_interval: Duration::from_millis(10),
        max_bytes: ByteSize::gib(8),
        ..JournalConfig::default()
    }
}

/// Runs `WRITERS` tokio tasks calling `append` until the deadline, spread over two
/// current-thread runtimes on their own threads, like the proxy's session workers
/// (ADR 0007); returns appends/s.
fn drive_tasks<F, Fut>(secs: u64, append: F) -> f64
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    const RUNTIMES: usize = 2;
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let threads: Vec<_> = (0..RUNTIMES)
        .map(|_| {
            let (append, done) = (append.clone(), done.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    let tasks: Vec<_> = (0..WRITERS / RUNTIMES)
                        .map(|_| {
                            let (append, done) = (append.clone(), done.clone());
                            tokio::spawn(async move {
                                while Instant::now() < deadline {
                                    append().await;
                                    done.fetch_add(1, Ordering::Relaxed);
                                }
                            })
                        })
                        .collect();
                    for task in tasks {
                        task.await.expect("writer task");
                    }
                });
            })
        })
        .collect();
    for t in threads {
        t.join().expect("runtime thread");
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

fn bench_spillway(rt: &tokio::runtime::Runtime, dir: &Path, secs: u64, tasks: bool) -> (f64, f64) {
    let (journal, _) = Journal::open(&journal_config(dir)).expect("open");
    let j = journal.clone();
    let append = move || {
        let j = j.clone();
        async move {
            j.append(payload()).await.expect("append");
        }
    };
    let rate = if tasks {
        drive_tasks(secs, append)
    } else {
        drive_threads(rt, secs, append)
    };
    let groups = journal.stats().groups.load(Ordering::Relaxed);
    let appends = journal.stats().appends.load(Ordering::Relaxed);
    rt.block_on(journal.close()).expect("close");
    (rate, appends as f64 / groups.max(1) as f64)
}

/// Runs `WRITERS` OS threads, each blocking on `append` in turn until the deadline;
/// returns appends/s. okaywal's own model, and the common harness of the comparison.
fn drive_threads<F, Fut>(rt: &tokio::runtime::Runtime, secs: u64, append: F) -> f64
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let threads: Vec<_> = (0..WRITERS)
        .map(|_| {
            let (append, done, handle) = (append.clone(), done.clone(), rt.handle().clone());
            std::thread::spawn(move || {
                while Instant::now() < deadline {
                    handle.block_on(append());
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("writer thread");
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

type Reply = oneshot::Sender<u64>;

/// The journal's group commit in front of fjall: one thread drains the queue into one
/// batch, commits it with SyncAll, then acknowledges every caller.
fn fjall_writer(
    keyspace: fjall::Keyspace,
    part: fjall::PartitionHandle,
) -> mpsc::Sender<(Bytes, Reply)> {
    let (tx, mut rx) = mpsc::channel::<(Bytes, Reply)>(4096);
    std::thread::spawn(move || {
        let mut seq: u64 = 0;
        while let Some(first) = rx.blocking_recv() {
            let mut group = vec![first];
            while let Ok(more) = rx.try_recv() {
                group.push(more);
            }
            let mut batch = keyspace
                .batch()
                .durability(Some(fjall::PersistMode::SyncAll));
            for (payload, _) in &group {
                seq += 1;
                batch.insert(&part, seq.to_be_bytes(), payload.as_ref());
            }
            batch.commit().expect("fjall commit");
            for (_, reply) in group {
                let _ = reply.send(seq);
            }
        }
    });
    tx
}

fn open_fjall(dir: &Path) -> (fjall::Keyspace, fjall::PartitionHandle) {
    let keyspace = fjall::Config::new(dir)
        .manual_journal_persist(true)
        .open()
        .expect("fjall open");
    let part = keyspace
        .open_partition("journal", fjall::PartitionCreateOptions::default())
        .expect("partition");
    (keyspace, part)
}

fn bench_fjall(rt: &tokio::runtime::Runtime, dir: &Path, secs: u64) -> f64 {
    let (keyspace, part) = open_fjall(dir);
    let tx = fjall_writer(keyspace, part);
    drive_threads(rt, secs, move || {
        let tx = tx.clone();
        async move {
            let (reply, answer) = oneshot::channel();
            tx.send((payload(), reply)).await.expect("queue");
            answer.await.expect("ack");
        }
    })
}

#[derive(Debug, Default)]
struct Collect {
    records: Arc<AtomicU64>,
}

impl okaywal::LogManager for Collect {
    fn recover(&mut self, entry: &mut okaywal::Entry<'_>) -> io::Result<()> {
        if let Some(chunks) = entry.read_all_chunks()? {
            let records: Vec<Bytes> = chunks.into_iter().map(Bytes::from).collect();
            self.records
                .fetch_add(records.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    fn checkpoint_to(
        &mut self,
        _last: okaywal::EntryId,
        _entries: &mut okaywal::SegmentReader,
        _wal: &okaywal::WriteAheadLog,
    ) -> io::Result<()> {
        Ok(())
    }
}

fn okaywal_append(wal: &okaywal::WriteAheadLog, payload: &[u8]) {
    let mut entry = wal.begin_entry().expect("begin");
    entry.write_chunk(payload).expect("chunk");
    entry.commit().expect("commit");
}

fn bench_okaywal(rt: &tokio::runtime::Runtime, dir: &Path, secs: u64) -> f64 {
    let wal = okaywal::WriteAheadLog::recover(dir, Collect::default()).expect("okaywal");
    let w = wal.clone();
    let rate = drive_threads(rt, secs, move || {
        let w = w.clone();
        async move { okaywal_append(&w, &payload()) }
    });
    wal.shutdown().expect("shutdown");
    rate
}

/// Fills a journal of `n` records (not timed), then times reopen + reading all back.
fn recovery_spillway(rt: &tokio::runtime::Runtime, dir: &Path, n: u64) -> Duration {
    let mut cfg = journal_config(dir);
    cfg.fsync = FsyncMode::Never; // filling is not what is measured
    let (journal, _) = Journal::open(&cfg).expect("open");
    rt.block_on(async {
        let tasks: Vec<_> = (0..WRITERS as u64)
            .map(|_| {
                let j = journal.clone();
                tokio::spawn(async move {
                    for _ in 0..n / WRITERS as u64 {
                        j.append(payload()).await.expect("append");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("fill");
        }
    });
    rt.block_on(journal.close()).expect("close");
    // Filled without fsync for speed; sync now (untimed), as the others' fills are.
    for entry in std::fs::read_dir(dir).expect("list") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "seg") {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .expect("sync");
        }
    }
    let started = Instant::now();
    let (journal, recovery) = Journal::open(&journal_config(dir)).expect("reopen");
    assert_eq!(
        recovery.records.len() as u64,
        n / WRITERS as u64 * WRITERS as u64
    );
    let took = started.elapsed();
    rt.block_on(journal.close()).expect("close");
    took
}

fn recovery_fjall(dir: &Path, n: u64) -> Duration {
    {
        let (keyspace, part) = open_fjall(dir);
        for chunk in (1..=n).collect::<Vec<_>>().chunks(1000) {
            let mut batch = keyspace.batch();
            for seq in chunk {
                batch.insert(&part, seq.to_be_bytes(), payload().as_ref());
            }
            batch.commit().expect("commit");
        }
        keyspace
            .persist(fjall::PersistMode::SyncAll)
            .expect("persist");
    }
    let started = Instant::now();
    let (_keyspace, part) = open_fjall(dir);
    let records: Vec<(u64, Bytes)> = part
        .iter()
        .map(|kv| {
            let (k, v) = kv.expect("read");
            let mut seq = [0u8; 8];
            seq.copy_from_slice(&k);
            (u64::from_be_bytes(seq), Bytes::copy_from_slice(&v))
        })
        .collect();
    assert_eq!(records.len() as u64, n);
    started.elapsed()
}

/// okaywal checkpoints on its own after `checkpoint_after_bytes` (768 KiB by default),
/// handing entries to `LogManager::checkpoint_to` and never recovering them; raise it so
/// that recovery has all `n` records to read, as spillway's and fjall's do.
fn okaywal_for_recovery(dir: &Path, manager: Collect) -> okaywal::WriteAheadLog {
    okaywal::Configuration::default_for(dir)
        .checkpoint_after_bytes(1 << 30)
        .open(manager)
        .expect("okaywal")
}

fn recovery_okaywal(dir: &Path, n: u64) -> Duration {
    {
        let wal = okaywal_for_recovery(dir, Collect::default());
        // One entry per chunk of 1000 records keeps filling fast; recovery reads chunks.
        let mut entry = wal.begin_entry().expect("begin");
        for i in 1..=n {
            entry.write_chunk(&payload()).expect("chunk");
            if i % 1000 == 0 {
                entry.commit().expect("commit");
                entry = wal.begin_entry().expect("begin");
            }
        }
        entry.commit().expect("commit");
        // Dropped, not shut down: shutdown checkpoints (hands every entry to the
        // LogManager and recycles the files), leaving nothing to recover.
        drop(wal);
    }
    let started = Instant::now();
    let collect = Collect::default();
    let count = collect.records.clone();
    let wal = okaywal_for_recovery(dir, collect);
    let took = started.elapsed();
    drop(wal);
    assert_eq!(
        count.load(Ordering::Relaxed),
        n,
        "okaywal recovered every record"
    );
    took
}

fn quartiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.25), at(0.5), at(0.75))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let secs = env_num("SPILLWAY_BENCH_SECS", 2);
    let rounds = env_num("SPILLWAY_BENCH_ROUNDS", 10) as usize;
    let recovery_rounds = 5;
    let n = env_num("SPILLWAY_BENCH_RECORDS", 100_000);
    let base = std::env::var_os("SPILLWAY_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let rt = runtime();
    let tmp = |name: &str| {
        tempfile::Builder::new()
            .prefix(name)
            .tempdir_in(&base)
            .expect("tempdir")
    };

    let names = ["spillway", "fjall", "okaywal", "spillway (tokio tasks)"];
    let mut rates: [Vec<f64>; 4] = Default::default();
    let mut recovery: [Vec<f64>; 3] = Default::default();
    let mut ratios: [Vec<f64>; 4] = Default::default();
    let mut per_fsync = Vec::new();
    let mut per_fsync_tasks = Vec::new();
    for round in 1..=rounds {
        // The disk's fsync latency drifts by several times within seconds here, so the
        // variants run back to back in short slices, in a rotating order, and each
        // round's ratios are taken within the round.
        for k in 0..4 {
            match (k + round) % 4 {
                0 => {
                    let (rate, group) = bench_spillway(&rt, tmp("spillway").path(), secs, false);
                    rates[0].push(rate);
                    per_fsync.push(group);
                }
                1 => rates[1].push(bench_fjall(&rt, tmp("fjall").path(), secs)),
                2 => rates[2].push(bench_okaywal(&rt, tmp("okaywal").path(), secs)),
                _ => {
                    let (rate, group) = bench_spillway(&rt, tmp("spillway").path(), secs, true);
                    rates[3].push(rate);
                    per_fsync_tasks.push(group);
                }
            }
        }
        let last = |v: &Vec<f64>| v.last().copied().unwrap_or_default();
        for k in 0..4 {
            ratios[k].push(last(&rates[k]) / last(&rates[0]));
        }
        if round <= recovery_rounds {
            recovery[0].push(recovery_spillway(&rt, tmp("spillway-rec").path(), n).as_secs_f64());
            recovery[1].push(recovery_fjall(tmp("fjall-rec").path(), n).as_secs_f64());
            recovery[2].push(recovery_okaywal(tmp("okaywal-rec").path(), n).as_secs_f64());
        }
        eprintln!(
            "round {round}: appends/s {:?}",
            rates.each_ref().map(|v| last(v).round()),
        );
    }
    let quartiles = ratios.each_ref().map(|v| quartiles(v.clone()));
    let rates = rates.map(median);
    let recovery = recovery.map(median);
    println!(
        "durable appends/s (fsync always), {WRITERS} writers, {PAYLOAD}-byte records, \
         {rounds} rounds x {secs}s; writers are OS threads unless noted."
    );
    println!("  median appends/s, and the ratio to spillway within a round (median [quartiles]):");
    for ((name, rate), (q1, q2, q3)) in names.iter().zip(rates).zip(quartiles) {
        println!("  {name:<24} {rate:>8.0}  {q2:.2} [{q1:.2}, {q3:.2}]");
    }
    println!(
        "  spillway records per fsync: {:.1} (threads), {:.1} (tokio tasks)",
        median(per_fsync),
        median(per_fsync_tasks)
    );
    println!("recovery of {n} records (open + read all back), median of {recovery_rounds}:");
    for (name, took) in names.iter().zip(recovery) {
        println!(
            "  {name:<24} {:>8.1} ms ({:.2} x spillway)",
            took * 1e3,
            took / recovery[0]
        );
    }
}
