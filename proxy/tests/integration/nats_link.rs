//! A TCP relay in front of one `nats-server` node, for the NATS journal's fault tests:
//! it passes bytes both ways until told to hold the server's side (what the server
//! sends is kept back while what the client sends still goes through, so a publish is
//! stored and its PubAck never arrives), to cut every connection and refuse new ones,
//! and to pass again.
//!
//! Invariant: in `Hold` no byte from the server reaches the client; `cut` closes every
//! connection it relays (held bytes are dropped with them); in `Cut` a new connection
//! is closed at once.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const PASS: u8 = 0;
const HOLD: u8 = 1;
const CUT: u8 = 2;

struct State {
    mode: AtomicU8,
    /// Held bytes contained a PubAck (or a publish error) of the journal's stream.
    ack_held: AtomicBool,
    /// Bumped by `cut`: every relayed connection ends.
    cuts: watch::Sender<u64>,
    held: Mutex<Vec<u8>>,
}

pub struct NatsLink {
    pub port: u16,
    state: Arc<State>,
}

impl NatsLink {
    /// Relays a free loopback port to `127.0.0.1:target`.
    pub async fn start(target: u16) -> NatsLink {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind nats link");
        let port = listener.local_addr().expect("link addr").port();
        let state = Arc::new(State {
            mode: AtomicU8::new(PASS),
            ack_held: AtomicBool::new(false),
            cuts: watch::channel(0).0,
            held: Mutex::new(Vec::new()),
        });
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if shared.mode.load(Ordering::SeqCst) == CUT {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                tokio::spawn(relay(client, server, shared.clone()));
            }
        });
        NatsLink { port, state }
    }

    /// `servers = [...]` for `[journal.nats]`: this link only.
    pub fn servers_toml(&self) -> String {
        format!("[\"nats://127.0.0.1:{}\"]", self.port)
    }

    /// From now on the server's bytes are held back.
    pub fn hold_answers(&self) {
        self.state.held.lock().expect("held lock").clear();
        self.state.ack_held.store(false, Ordering::SeqCst);
        self.state.mode.store(HOLD, Ordering::SeqCst);
    }

    /// Waits until the held bytes contain an answer to a publish to `stream`: JetStream
    /// stored the message (or refused it) and the answer is not delivered.
    pub async fn held_an_ack(&self, within: Duration) -> bool {
        let until = Instant::now() + within;
        while Instant::now() < until {
            if self.state.ack_held.load(Ordering::SeqCst) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// Closes every relayed connection and refuses new ones.
    pub fn cut(&self) {
        self.state.mode.store(CUT, Ordering::SeqCst);
        self.state.cuts.send_modify(|n| *n += 1);
    }

    /// Relays again.
    pub fn pass(&self) {
        self.state.mode.store(PASS, Ordering::SeqCst);
    }
}

async fn relay(mut client: TcpStream, mut server: TcpStream, state: Arc<State>) {
    let mut cuts = state.cuts.subscribe();
    let (mut from_client, mut to_client) = client.split();
    let (mut from_server, mut to_server) = server.split();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if to_server.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from_server.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if state.mode.load(Ordering::SeqCst) == PASS {
                if to_client.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                continue;
            }
            let mut held = state.held.lock().expect("held lock");
            held.extend_from_slice(&buf[..n]);
            if held.windows(STREAM_FIELD.len()).any(|w| w == STREAM_FIELD) {
                state.ack_held.store(true, Ordering::SeqCst);
            }
        }
    };
    tokio::select! {
        () = up => {}
        () = down => {}
        _ = cuts.changed() => {}
    }
}

/// How a PubAck of the journal's stream (`stream = "spillway"`) starts.
const STREAM_FIELD: &[u8] = b"\"stream\":\"spillway\"";
