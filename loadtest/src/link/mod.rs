//! `spillway-loadtest link`: a network link in user space (this kernel has no
//! `netem`). It accepts TCP connections, opens one to `--to` for each, and relays both
//! directions, holding every chunk it reads for half the round trip (plus jitter)
//! before it writes it on.
//!
//! Invariants:
//! - Bytes are never reordered or dropped: each direction is one FIFO queue drained
//!   by one writer, and a chunk is never written before the one read ahead of it (its
//!   send time is at least its predecessor's, whatever the jitter drew).
//! - A chunk is never written before its send time (`Clock`); it may be late by the
//!   kernel's wake-up latency, which is measured and reported (`Stats`).
//! - Memory is bounded: per direction of a connection, at most `buffer` bytes read and
//!   not yet written (plus one read buffer). When the queue is full the link stops
//!   reading from that side, so TCP flow control pushes back on the sender: a full
//!   link slows the sender down, it never drops.
//! - A half-close is relayed (after the queued bytes); an error on either side of a
//!   connection closes both.
//! - Faults, for tests that drive the link in process ([`Faults`]): while stalled,
//!   nothing is written on in either direction (bytes read meanwhile wait, up to the
//!   buffer; the stall ends with them in order); a cut closes every open connection
//!   at once, both sides, and new ones are relayed as before.

pub mod clock;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};

pub use clock::Clock;

/// Largest single read (and so the largest chunk).
const READ_CHUNK: usize = 16 * 1024;

/// How the link behaves.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub to: SocketAddr,
    /// Round trip added: each direction waits half of it.
    pub rtt: Duration,
    /// Each chunk's one-way delay is drawn uniformly from `rtt/2 ± jitter/2` (at least
    /// zero).
    pub jitter: Duration,
    /// Bytes read and not yet written, per direction of a connection.
    pub buffer: usize,
}

impl LinkConfig {
    fn one_way(&self) -> Duration {
        self.rtt / 2
    }

    fn delay(&self) -> Duration {
        let half = self.one_way();
        if self.jitter.is_zero() {
            return half;
        }
        let j = self.jitter.as_nanos();
        let offset = rand::rng().random_range(0..=j);
        // half - jitter/2 + offset, floored at zero.
        let nanos = (half.as_nanos() + offset).saturating_sub(j / 2);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// What the link did, for its closing line and the tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub failed_connects: AtomicU64,
    pub bytes: AtomicU64,
    pub chunks: AtomicU64,
    /// Sum and maximum of how late chunks were written after their send time (ns).
    pub late_ns_sum: AtomicU64,
    pub late_ns_max: AtomicU64,
    /// The most bytes one direction of one connection held at any time.
    pub max_queued: AtomicU64,
}

impl Stats {
    /// One line for stderr.
    pub fn summary(&self) -> String {
        let chunks = self.chunks.load(Ordering::Relaxed);
        let late_mean = self
            .late_ns_sum
            .load(Ordering::Relaxed)
            .checked_div(chunks)
            .unwrap_or(0);
        format!(
            "{} connections ({} failed to connect), {} bytes in {} chunks, \
             late after their send time by {:.1} µs on average (max {:.1} µs), \
             at most {} bytes queued in one direction",
            self.connections.load(Ordering::Relaxed),
            self.failed_connects.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
            chunks,
            late_mean as f64 / 1000.0,
            self.late_ns_max.load(Ordering::Relaxed) as f64 / 1000.0,
            self.max_queued.load(Ordering::Relaxed),
        )
    }
}

/// Faults a test injects into a running link: a stall (the link holds every byte
/// until it ends) and a cut (every open connection closed). Cheap to clone.
#[derive(Clone)]
pub struct Faults {
    stalled: watch::Sender<bool>,
    /// Bumped by every cut; a connection ends when it changes.
    cuts: watch::Sender<u64>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            stalled: watch::Sender::new(false),
            cuts: watch::Sender::new(0),
        }
    }
}

impl Faults {
    /// Holds every byte from now until [`Faults::resume`].
    pub fn stall(&self) {
        self.stalled.send_replace(true);
    }

    pub fn resume(&self) {
        self.stalled.send_replace(false);
    }

    /// Closes every connection open now, both sides, without relaying what they hold.
    pub fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }
}

/// Accepts on `listener` and relays each connection until `stop` completes; then
/// every connection is closed.
pub async fn serve(
    listener: TcpListener,
    config: LinkConfig,
    clock: Clock,
    stats: Arc<Stats>,
    stop: impl std::future::Future<Output = ()>,
) {
    serve_with_faults(listener, config, clock, stats, Faults::default(), stop).await;
}

/// [`serve`], with faults injected through `faults`.
pub async fn serve_with_faults(
    listener: TcpListener,
    config: LinkConfig,
    clock: Clock,
    stats: Arc<Stats>,
    faults: Faults,
    stop: impl std::future::Future<Output = ()>,
) {
    let config = Arc::new(config);
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    let (config, clock, stats) =
                        (Arc::clone(&config), clock.clone(), Arc::clone(&stats));
                    let (stalled, mut cuts) = (faults.stalled.subscribe(), faults.cuts.subscribe());
                    tasks.spawn(async move {
                        tokio::select! {
                            () = connection(client, &config, &clock, &stats, stalled) => {}
                            _ = cuts.changed() => {}
                        }
                    });
                }
                // Out of descriptors and the like: wait a little rather than spin.
                Err(e) => {
                    eprintln!("spillway-loadtest link: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            // Reap finished connections so the set stays small.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.shutdown().await;
}

async fn connection(
    client: TcpStream,
    config: &LinkConfig,
    clock: &Clock,
    stats: &Stats,
    stalled: watch::Receiver<bool>,
) {
    stats.connections.fetch_add(1, Ordering::Relaxed);
    let server = match TcpStream::connect(config.to).await {
        Ok(s) => s,
        Err(e) => {
            if stats.failed_connects.fetch_add(1, Ordering::Relaxed) == 0 {
                eprintln!("spillway-loadtest link: connecting to {}: {e}", config.to);
            }
            return;
        }
    };
    // Small messages must not wait for Nagle: the link adds exactly its delay.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // The first error ends both directions (dropping the sockets closes them).
    let _ = tokio::try_join!(
        direction(
            client_read,
            server_write,
            config,
            clock,
            stats,
            stalled.clone()
        ),
        direction(server_read, client_write, config, clock, stats, stalled),
    );
}

struct Chunk {
    at: Instant,
    bytes: Vec<u8>,
}

/// One direction: a reader that stamps each chunk with its send time and a writer
/// that sends it then, joined by a queue bounded in bytes.
async fn direction(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    config: &LinkConfig,
    clock: &Clock,
    stats: &Stats,
    mut stalled: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let chunk = READ_CHUNK.min(config.buffer).max(1);
    let budget = Semaphore::new(config.buffer.max(chunk));
    let queued = AtomicU64::new(0);
    let (tx, mut rx) = mpsc::unbounded_channel::<Chunk>();
    let (budget, queued) = (&budget, &queued);
    // Owns the sender: when the reader ends, the writer's queue ends after its last
    // chunk.
    let read = async move {
        let mut scratch = vec![0u8; chunk];
        let mut last = Instant::now();
        loop {
            // Room for a whole read first: a full queue stops the reading (back-pressure).
            let permit = budget
                .acquire_many(u32::try_from(chunk).unwrap_or(u32::MAX))
                .await
                .map_err(std::io::Error::other)?;
            let n = from.read(&mut scratch).await?;
            permit.forget();
            budget.add_permits(chunk - n);
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            let now = Instant::now();
            last = last.max(now + config.delay());
            let q = queued.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
            stats.max_queued.fetch_max(q, Ordering::Relaxed);
            if tx
                .send(Chunk {
                    at: last,
                    bytes: scratch[..n].to_vec(),
                })
                .is_err()
            {
                return Ok(());
            }
        }
    };
    let write = async {
        while let Some(c) = rx.recv().await {
            clock.sleep_until(c.at).await;
            if *stalled.borrow() {
                // Held until the stall ends; the sender side is never dropped while the
                // link runs, so an error here only means the link is stopping.
                let _ = stalled.wait_for(|s| !s).await;
            }
            let late = u64::try_from(c.at.elapsed().as_nanos()).unwrap_or(u64::MAX);
            to.write_all(&c.bytes).await?;
            let n = c.bytes.len();
            queued.fetch_sub(n as u64, Ordering::Relaxed);
            budget.add_permits(n);
            stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
            stats.chunks.fetch_add(1, Ordering::Relaxed);
            stats.late_ns_sum.fetch_add(late, Ordering::Relaxed);
            stats.late_ns_max.fetch_max(late, Ordering::Relaxed);
        }
        // The reader saw the end: pass the half-close on after the queued bytes.
        to.shutdown().await
    };
    tokio::try_join!(read, write).map(|_| ())
}
