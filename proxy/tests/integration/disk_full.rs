//! The journal's disk full (issue 18, hardening 4), on a real small file system: a
//! tmpfs mounted for the test (the suite runs as root, as CI does) holds the journal,
//! and a filler file takes the rest of it while spillway serves.
//! - A deferred write that needs room the disk does not have is refused with 53100
//!   (disk full) under `when_full = "block"`, and nothing of it is journaled or
//!   applied; the journal is not poisoned (`/readyz` stays ready).
//! - A table with `when_full = "write-through"` runs its writes upstream meanwhile
//!   (the row is in PostgreSQL at once while the flush worker is stalled).
//! - Once space returns, deferred writes are acknowledged again without a restart, and
//!   every acknowledged write is applied exactly once.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::context::Context;

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root (the suite runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file until the disk refuses; returns its path.
    fn fill(&self) -> PathBuf {
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).expect("create filler");
        let chunk = vec![0xa5u8; 4096];
        loop {
            match file.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
        // What a partial write left is freed with the file.
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn code(e: &tokio_postgres::Error) -> Option<&str> {
    e.code().map(|c| c.code())
}

/// `GET path` on the metrics endpoint: status and the whole answer.
async fn get(ctx: &Context, path: &str) -> (u16, String) {
    let addr = ctx.proxy.metrics_addr();
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut body = String::new();
    stream.read_to_string(&mut body).await.expect("read");
    let status = body
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_journal_disk_refuses_with_53100_or_goes_write_through_and_recovers() {
    let disk = SmallDisk::mount("24m");
    let journal = disk.path().join("journal");
    let mut ctx = Context::builder()
        .before_proxy(
            "CREATE TABLE disk_a (id int PRIMARY KEY, body text);\
             CREATE TABLE disk_b (id int PRIMARY KEY, body text);",
        )
        .section(&format!(
            // Segments of 1 MiB, grown 1 MiB at a time.
            "[journal]\ndir = \"{}\"\nmax_bytes = \"16MiB\"\n\
             [flush]\ninterval = \"20ms\"\n\
             [tables.\"public.disk_a\"]\npolicy = \"write-behind\"\n\
             [tables.\"public.disk_b\"]\npolicy = \"write-behind\"\nwhen_full = \"write-through\"\n",
            journal.display()
        ))
        .start()
        .await;
    let client = ctx.proxy_client().await;
    let body = "x".repeat(60_000);
    let insert_a = client
        .prepare("INSERT INTO disk_a (id, body) VALUES ($1, $2)")
        .await
        .expect("prepare");

    // Deferred and applied while there is room.
    client
        .execute(&insert_a, &[&1i32, &body])
        .await
        .expect("insert 1");
    crate::write_load::flush(&ctx, Duration::from_secs(30)).await;

    // The flush worker stalls (nothing is confirmed, so no segment is freed), and the
    // disk fills up.
    let locker = ctx.direct_client().await;
    locker
        .batch_execute("BEGIN; SELECT 1 FROM spillway.flush_ledger FOR UPDATE")
        .await
        .expect("lock the ledger row");
    let filler = disk.fill();

    // Writes go on into the space the journal had grown; the first that needs more
    // is refused with 53100, and so is the next.
    let mut acked = vec![1];
    let mut refused = Vec::new();
    for id in 2..400 {
        match client.execute(&insert_a, &[&id, &body]).await {
            Ok(1) => acked.push(id),
            Ok(n) => panic!("insert {id} reported {n} rows"),
            Err(e) => {
                assert_eq!(code(&e), Some("53100"), "insert {id}: {e:?}");
                refused.push(id);
                if refused.len() == 2 {
                    break;
                }
            }
        }
    }
    assert_eq!(
        refused.len(),
        2,
        "the disk never filled: {} acked",
        acked.len()
    );
    let (status, answer) = get(&ctx, "/readyz").await;
    assert_eq!(
        status, 200,
        "a full disk does not poison the journal: {answer}"
    );
    let (_, metrics) = get(&ctx, "/metrics").await;
    let refusals = metrics
        .lines()
        .find_map(|l| l.strip_prefix("spillway_journal_refusals_total{reason=\"no_space\"} "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert_eq!(refusals, Some(2.0), "{metrics}");

    // The write-through table runs upstream meanwhile: its row is in PostgreSQL while
    // the flush worker still waits.
    // (As large as the refused writes: a smaller record may still fit.)
    let insert_b = client
        .prepare("INSERT INTO disk_b (id, body) VALUES ($1, $2)")
        .await
        .expect("prepare");
    client
        .execute(&insert_b, &[&1i32, &body])
        .await
        .expect("write-through while the disk is full");
    assert_eq!(
        ctx.psql_direct("SELECT length(body) FROM disk_b WHERE id = 1")
            .trim(),
        "60000"
    );

    // Space returns: deferred writes are acknowledged again, no restart.
    std::fs::remove_file(filler).expect("free the disk");
    let after = 1000;
    client
        .execute(&insert_a, &[&after, &body])
        .await
        .expect("deferred again once there is room");
    acked.push(after);

    locker
        .batch_execute("COMMIT")
        .await
        .expect("let the flush go");
    crate::write_load::flush(&ctx, Duration::from_secs(60)).await;
    let present: Vec<i32> = ctx
        .psql_direct("SELECT id FROM disk_a ORDER BY id")
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let mut expected = acked.clone();
    expected.sort_unstable();
    assert_eq!(
        present, expected,
        "every acknowledged write applied, none refused"
    );
    let logs = ctx.proxy.logs();
    assert!(!logs.contains("poisoned"), "{logs}");
    eprintln!(
        "disk full: {} writes acknowledged before the disk was full, refused {:?} with 53100",
        acked.len() - 1,
        refused
    );
    ctx.proxy.kill();
}
