//! The link emulator (`spillway-loadtest link`): it never reorders or drops bytes (a
//! seeded random stream each way through many connections at once, with jitter,
//! compared byte for byte, half-closes included), it applies its delay (a round trip
//! takes at least `rtt`), a reader that does not read bounds what the link holds
//! (back-pressure, then everything arrives), and the binary stops by itself. Nothing
//! here asserts speed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use spillway_loadtest::link::{self, Clock, LinkConfig, Stats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// A running link in this process; dropping it stops it.
struct Link {
    addr: SocketAddr,
    stats: Arc<Stats>,
    _stop: oneshot::Sender<()>,
}

async fn start_link(to: SocketAddr, rtt: Duration, jitter: Duration, buffer: usize) -> Link {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stats = Arc::new(Stats::default());
    let (stop, stopped) = oneshot::channel::<()>();
    let config = LinkConfig {
        to,
        rtt,
        jitter,
        buffer,
    };
    let clock = Clock::start().expect("clock");
    tokio::spawn(link::serve(
        listener,
        config,
        clock,
        Arc::clone(&stats),
        async move {
            let _ = stopped.await;
        },
    ));
    Link {
        addr,
        stats,
        _stop: stop,
    }
}

/// A seeded random byte stream that does not depend on how it is cut into pieces
/// (unlike an RNG's `fill_bytes`, which drops the rest of a word).
struct Bytes {
    seed: u64,
    pos: u64,
    word: u64,
}

impl Bytes {
    fn new(seed: u64) -> Bytes {
        Bytes {
            seed,
            pos: 0,
            word: 0,
        }
    }

    fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            if self.pos.is_multiple_of(8) {
                // splitmix64 of (seed, word index)
                let mut z =
                    ((self.seed << 40) ^ (self.pos / 8)).wrapping_add(0x9e37_79b9_7f4a_7c15);
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                self.word = z ^ (z >> 31);
            }
            *b = (self.word >> (8 * (self.pos % 8))) as u8;
            self.pos += 1;
        }
    }
}

/// Writes `len` bytes of the stream seeded by `seed`, in random pieces.
async fn send_stream(w: &mut (impl AsyncWriteExt + Unpin), seed: u64, len: usize) {
    let mut data = Bytes::new(seed);
    let mut sizes = StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut sent = 0;
    while sent < len {
        let n = sizes.random_range(1..=9000).min(len - sent);
        let mut piece = vec![0u8; n];
        data.fill(&mut piece);
        w.write_all(&piece).await.expect("write");
        sent += n;
        if sizes.random_ratio(1, 8) {
            tokio::task::yield_now().await;
        }
    }
}

/// Reads to the end and checks that it is exactly the stream seeded by `seed` of `len`
/// bytes; returns where it first differs, if it does.
async fn check_stream(
    r: &mut (impl AsyncReadExt + Unpin),
    seed: u64,
    len: usize,
) -> Result<(), String> {
    let mut data = Bytes::new(seed);
    let mut buf = vec![0u8; 32 * 1024];
    let mut expected = vec![0u8; 32 * 1024];
    let mut seen = 0usize;
    loop {
        let n = r
            .read(&mut buf)
            .await
            .map_err(|e| format!("read at {seen}: {e}"))?;
        if n == 0 {
            break;
        }
        if seen + n > len {
            return Err(format!("{} bytes, expected {len}", seen + n));
        }
        data.fill(&mut expected[..n]);
        if let Some(i) = (0..n).find(|&i| buf[i] != expected[i]) {
            return Err(format!("byte {} differs", seen + i));
        }
        seen += n;
    }
    if seen == len {
        Ok(())
    } else {
        Err(format!("{seen} bytes, expected {len}"))
    }
}

const LEN: usize = 300_000;

/// Each connection starts with its number (8 bytes); the server then checks the
/// client's stream seeded with it and sends its own back.
async fn stream_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let mut id = [0u8; 8];
                r.read_exact(&mut id).await.expect("id");
                let id = u64::from_le_bytes(id);
                let check = tokio::spawn(async move { check_stream(&mut r, 2 * id, LEN).await });
                send_stream(&mut w, 2 * id + 1, LEN).await;
                w.shutdown().await.expect("half-close");
                let verdict = check.await.expect("check");
                // Report the verdict through the connection's end: an error resets it.
                if let Err(e) = verdict {
                    panic!("server side of connection {id}: {e}");
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_are_never_reordered_or_dropped_either_way() {
    let server = stream_server().await;
    let link = start_link(
        server,
        Duration::from_millis(2),
        Duration::from_millis(2),
        64 * 1024,
    )
    .await;
    let clients: Vec<_> = (0..24u64)
        .map(|id| {
            let addr = link.addr;
            tokio::spawn(async move {
                let s = TcpStream::connect(addr).await.expect("connect");
                let (mut r, mut w) = s.into_split();
                let send = async {
                    w.write_all(&id.to_le_bytes()).await.expect("id");
                    send_stream(&mut w, 2 * id, LEN).await;
                    w.shutdown().await.expect("half-close");
                };
                let (_, verdict) = tokio::join!(send, check_stream(&mut r, 2 * id + 1, LEN));
                verdict.map_err(|e| format!("client side of connection {id}: {e}"))
            })
        })
        .collect();
    for c in clients {
        c.await.expect("client task").expect("stream intact");
    }
    // Both directions of every connection, with the 8-byte ids. The link counts a
    // chunk after its write returns, which may be after the peer read it: wait for
    // the count to settle (bounded).
    let expected = 24 * (2 * LEN as u64 + 8);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut bytes = link.stats.bytes.load(std::sync::atomic::Ordering::Relaxed);
    while bytes < expected && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        bytes = link.stats.bytes.load(std::sync::atomic::Ordering::Relaxed);
    }
    assert_eq!(bytes, expected);
}

async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_round_trip_takes_at_least_the_rtt() {
    let echo = echo_server().await;
    for (rtt, jitter) in [(20, 0), (20, 10), (1, 0)] {
        let rtt = Duration::from_millis(rtt);
        let jitter = Duration::from_millis(jitter);
        let link = start_link(echo, rtt, jitter, 1 << 20).await;
        let mut s = TcpStream::connect(link.addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        for i in 0..10u8 {
            let start = Instant::now();
            s.write_all(&[i]).await.expect("write");
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.expect("read");
            let took = start.elapsed();
            assert_eq!(b[0], i);
            // Each direction waits at least rtt/2 - jitter/2.
            assert!(
                took >= rtt - jitter,
                "round trip {took:?} with rtt {rtt:?} jitter {jitter:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_does_not_read_holds_the_sender_back_and_loses_nothing() {
    const BUFFER: usize = 64 * 1024;
    // More than the kernel's socket buffers on both sides of the link can hold.
    const TOTAL: usize = 96 << 20;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let server = listener.local_addr().expect("addr");
    let link = start_link(server, Duration::from_millis(1), Duration::ZERO, BUFFER).await;
    let sender = tokio::spawn(async move {
        let mut s = TcpStream::connect(link.addr).await.expect("connect");
        send_stream(&mut s, 7, TOTAL).await;
        s.shutdown().await.expect("close");
        link
    });
    let (mut slow, _) = listener.accept().await.expect("accept");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !sender.is_finished(),
        "96 MiB went into a link whose reader reads nothing"
    );
    check_stream(&mut slow, 7, TOTAL)
        .await
        .expect("everything, in order");
    let link = sender.await.expect("sender");
    let queued = link
        .stats
        .max_queued
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        queued <= BUFFER as u64,
        "held {queued} bytes with a {BUFFER}-byte buffer"
    );
}

#[test]
fn the_binary_stops_by_itself_and_on_sigterm() {
    let bin = env!("CARGO_BIN_EXE_spillway-loadtest");
    let out = std::process::Command::new(bin)
        .args([
            "link",
            "--listen",
            "127.0.0.1:0",
            "--to",
            "127.0.0.1:9",
            "--rtt",
            "1ms",
        ])
        .args(["--duration", "300ms"])
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("stopped; 0 connections"), "{stderr}");

    let mut child = std::process::Command::new(bin)
        .args([
            "link",
            "--listen",
            "127.0.0.1:0",
            "--to",
            "127.0.0.1:9",
            "--rtt",
            "0s",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    // Wait for its first line (it has installed its handlers by then).
    let mut err = child.stderr.take().expect("stderr");
    let mut first = [0u8; 20];
    std::io::Read::read_exact(&mut err, &mut first).expect("first line");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = child.wait().expect("wait");
    assert!(exit.success(), "{exit:?}");
}
