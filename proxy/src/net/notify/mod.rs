//! LISTEN/NOTIFY in transaction mode (ADR 0031): one listener connection per database
//! that LISTENs on the union of the channels its sessions listen on, and fans each
//! NotificationResponse out to the sessions that listen on its channel.
//!
//! A session in transaction mode has no server connection of its own between
//! transactions, so a LISTEN run on a leased connection would deliver to whichever
//! client leases it next. Instead the session's LISTEN and UNLISTEN become requests to
//! the database's [`Hub`] (`session/lease/listen.rs`), answered once the listener
//! connection has run them; notifications reach the session through a bounded queue
//! ([`Subscription`]) and the relay writes them to the client when the client is idle
//! (between transactions, nothing owed to it), as PostgreSQL delivers them.
//!
//! The hub's task owns the listener connection, logged in as the role of a pool whose
//! session listens (`Pool::connect_dedicated`, outside `pool.size`). It opens the
//! connection at the first LISTEN, closes it when no channel is listened any more, and
//! after a loss reconnects (backing off up to [`MAX_BACKOFF`]) and LISTENs again on
//! every channel. Notifications sent while it was away are lost, as they are for a
//! PostgreSQL session whose connection broke.
//!
//! Invariants:
//! - The listener connection LISTENs on a channel exactly while at least one session
//!   does (every change goes through the task, in order).
//! - A session's queue holds at most `pool.notify_queue` notifications; past that,
//!   new ones for it are dropped and counted, and the session tells its client with a
//!   WARNING before the next notification it delivers. Memory per session is bounded,
//!   and one slow client never holds up the others or the listener.
//! - A session that ends (its [`Subscription`] dropped) stops listening on everything.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};

use crate::error::SessionError;
use crate::net::conn::{Conn, read_upstream_frame};
use crate::net::pool::Pool;
use crate::protocol::backend;
use wire::{NOTIFICATION_RESPONSE, Notification, dropped_notice, quote_ident};

mod wire;

/// `application_name` of the listener connections.
const LISTENER_APP: &str = "spillway listener";
/// Longest wait between two attempts to reconnect a lost listener connection.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long opening and logging in a listener connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Server pids remembered for the pid mapping before the map starts over.
const MAX_SENDERS: usize = 65_536;

/// The listener hubs of every database, and which client each pooled server
/// connection served last (for the sender's pid in a notification).
pub struct Listeners {
    queue: usize,
    hubs: Mutex<HashMap<String, Arc<Hub>>>,
    senders: Arc<Senders>,
}

impl Listeners {
    /// `queue`: `pool.notify_queue`, notifications held per session at most.
    pub fn new(queue: usize) -> Self {
        Self {
            queue: queue.max(1),
            hubs: Mutex::new(HashMap::new()),
            senders: Arc::new(Senders::default()),
        }
    }

    /// The hub of `database`, created on first use (its task starts at the first
    /// LISTEN).
    pub fn hub(&self, database: &str) -> Arc<Hub> {
        self.hubs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(database.to_owned())
            .or_insert_with(|| {
                Arc::new(Hub {
                    database: database.to_owned(),
                    queue: self.queue,
                    senders: self.senders.clone(),
                    task: Mutex::new(None),
                    next_id: AtomicU64::new(1),
                })
            })
            .clone()
    }
}

/// Which client-facing pid each pooled server connection (by its backend pid) was
/// last leased to: a notification's sender pid is shown as the pid spillway gave the
/// sending client, when the sender is one of ours.
/// Nothing is recorded until some session listens (no cost per lease before).
#[derive(Default)]
pub struct Senders {
    active: std::sync::atomic::AtomicBool,
    map: Mutex<HashMap<i32, i32>>,
}

impl Senders {
    /// Some session listens: leases are recorded from now on.
    pub fn activate(&self) {
        self.active.store(true, Ordering::Relaxed);
    }

    pub fn leased(&self, server_pid: i32, client_pid: i32) {
        if !self.active.load(Ordering::Relaxed) {
            return;
        }
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= MAX_SENDERS && !map.contains_key(&server_pid) {
            map.clear();
        }
        map.insert(server_pid, client_pid);
    }

    pub fn client_pid(&self, server_pid: i32) -> Option<i32> {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&server_pid)
            .copied()
    }
}

/// One database's listener: the task that owns its connection, started at the first
/// LISTEN and running while spillway does.
pub struct Hub {
    database: String,
    queue: usize,
    senders: Arc<Senders>,
    task: Mutex<Option<mpsc::UnboundedSender<Command>>>,
    next_id: AtomicU64,
}

/// What the hub's task is asked to do.
enum Command {
    Listen {
        id: u64,
        channel: String,
        sink: Sink,
        pool: Arc<Pool>,
        done: oneshot::Sender<Result<(), String>>,
    },
    /// `None`: every channel (UNLISTEN *).
    Unlisten {
        id: u64,
        channel: Option<String>,
        done: oneshot::Sender<Result<(), String>>,
    },
    Gone {
        id: u64,
    },
}

/// Where a session's notifications go.
#[derive(Clone)]
struct Sink {
    tx: mpsc::Sender<Bytes>,
    dropped: Arc<AtomicU64>,
}

impl Hub {
    pub fn senders(&self) -> &Senders {
        &self.senders
    }

    /// A session's subscription (nothing is listened yet; no queue is allocated until
    /// the first notification).
    pub fn subscribe(self: &Arc<Self>, pool: Arc<Pool>) -> Subscription {
        self.senders.activate();
        let (tx, rx) = mpsc::channel(self.queue);
        Subscription {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            hub: self.clone(),
            pool,
            sink: Sink {
                tx,
                dropped: Arc::new(AtomicU64::new(0)),
            },
            rx,
            used: false,
        }
    }

    fn send(self: &Arc<Self>, cmd: Command) {
        let mut task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        let tx = task.get_or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let hub = self.clone();
            tokio::spawn(async move { hub.run(rx).await });
            tx
        });
        // The task never ends while the hub holds its sender.
        let _ = tx.send(cmd);
    }

    /// The task: commands in order, the listener connection's messages, reconnects.
    async fn run(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Command>) {
        let mut state = TaskState::default();
        loop {
            let retry = state.retry_in;
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.on_command(&mut state, cmd).await,
                    None => return,
                },
                frame = read_frame(state.conn.as_mut()) => match frame {
                    Ok((tag, msg)) => self.on_message(&mut state, tag, &msg),
                    Err(e) => self.lost(&mut state, &e.to_string()),
                },
                () = tokio::time::sleep(retry.unwrap_or_default()), if retry.is_some()
                    && state.conn.is_none() => self.reconnect(&mut state).await,
            }
        }
    }

    async fn on_command(&self, state: &mut TaskState, cmd: Command) {
        match cmd {
            Command::Listen {
                id,
                channel,
                sink,
                pool,
                done,
            } => {
                state.pool = Some(pool);
                let result = if state.channels.contains_key(&channel) {
                    Ok(())
                } else {
                    self.listen_new(state, &channel).await
                };
                if result.is_ok() {
                    let sub = state.subs.entry(id).or_insert_with(|| SubState {
                        sink,
                        channels: HashSet::new(),
                    });
                    if sub.channels.insert(channel.clone()) {
                        *state.channels.entry(channel).or_default() += 1;
                    }
                }
                let _ = done.send(result);
            }
            Command::Unlisten { id, channel, done } => {
                self.unlisten(state, id, channel.as_deref()).await;
                let _ = done.send(Ok(()));
            }
            Command::Gone { id } => {
                self.unlisten(state, id, None).await;
                state.subs.remove(&id);
            }
        }
    }

    /// LISTENs on a channel nobody listened on yet, connecting first if needed.
    async fn listen_new(&self, state: &mut TaskState, channel: &str) -> Result<(), String> {
        if state.conn.is_none() {
            self.connect(state).await?;
        }
        let sql = format!("LISTEN {}", quote_ident(channel));
        match self.execute(state, &sql).await {
            Ok(()) => Ok(()),
            Err(Exec::Refused(e)) => Err(e),
            Err(Exec::Lost(e)) => {
                self.lost(state, &e);
                Err(format!("the listener connection was lost: {e}"))
            }
        }
    }

    /// Removes `channel` (or all) from session `id`, UNLISTENing what nobody listens
    /// on any more; closes the connection when nothing is listened.
    async fn unlisten(&self, state: &mut TaskState, id: u64, channel: Option<&str>) {
        let Some(sub) = state.subs.get_mut(&id) else {
            return;
        };
        let removed: Vec<String> = match channel {
            Some(c) => sub.channels.take(c).into_iter().collect(),
            None => sub.channels.drain().collect(),
        };
        for channel in removed {
            let Some(count) = state.channels.get_mut(&channel) else {
                continue;
            };
            *count -= 1;
            if *count > 0 {
                continue;
            }
            state.channels.remove(&channel);
            if state.conn.is_some() && !state.channels.is_empty() {
                let sql = format!("UNLISTEN {}", quote_ident(&channel));
                if let Err(Exec::Lost(e)) = self.execute(state, &sql).await {
                    self.lost(state, &e);
                }
            }
        }
        if state.channels.is_empty() && state.conn.is_some() {
            // Nothing to listen on: the connection goes (Terminate, then close).
            if let Some(mut conn) = state.conn.take() {
                let _ = conn.send(b"X\0\0\0\x04").await;
            }
            state.retry_in = None;
            tracing::debug!(database = %self.database, "listener connection closed: no channel listened");
        }
    }

    /// Opens the listener connection with the latest listening session's pool.
    async fn connect(&self, state: &mut TaskState) -> Result<(), String> {
        let Some(pool) = state.pool.clone() else {
            return Err("no pool to log in with".to_owned());
        };
        let opened = tokio::time::timeout(CONNECT_TIMEOUT, pool.connect_dedicated(LISTENER_APP))
            .await
            .map_err(|_| format!("no listener connection within {CONNECT_TIMEOUT:?}"))
            .and_then(|r| r.map_err(|e| e.to_string()));
        match opened {
            Ok((conn, _key)) => {
                state.conn = Some(conn);
                state.retry_in = None;
                metrics::counter!(crate::metrics::POOL_LISTENER_CONNECTS).increment(1);
                Ok(())
            }
            Err(e) => {
                if !state.channels.is_empty() {
                    state.retry_in = Some(backoff(state.retry_in));
                }
                Err(e)
            }
        }
    }

    /// After a loss: a new connection, and LISTEN on every channel again.
    async fn reconnect(&self, state: &mut TaskState) {
        if state.channels.is_empty() {
            state.retry_in = None;
            return;
        }
        if let Err(e) = self.connect(state).await {
            tracing::warn!(database = %self.database, error = %e, "listener connection: reconnect failed; retrying");
            return;
        }
        let sql = state
            .channels
            .keys()
            .map(|c| format!("LISTEN {}", quote_ident(c)))
            .collect::<Vec<_>>()
            .join("; ");
        match self.execute(state, &sql).await {
            Ok(()) => tracing::info!(
                database = %self.database,
                channels = state.channels.len(),
                "listener connection reconnected and listening again (notifications sent while it was away are lost)"
            ),
            Err(Exec::Refused(e) | Exec::Lost(e)) => self.lost(state, &e),
        }
    }

    /// The connection is gone: retry soon while anything is listened.
    fn lost(&self, state: &mut TaskState, cause: &str) {
        state.conn = None;
        if state.channels.is_empty() {
            state.retry_in = None;
            return;
        }
        tracing::warn!(database = %self.database, %cause, "listener connection lost; notifications are lost until it is back");
        state.retry_in = Some(backoff(state.retry_in));
    }

    /// Runs `sql` (simple protocol) on the listener connection up to ReadyForQuery;
    /// notifications that arrive meanwhile are delivered. A server that does not
    /// answer within [`CONNECT_TIMEOUT`] counts as lost (the sessions waiting for
    /// their LISTEN get an error rather than hang).
    async fn execute(&self, state: &mut TaskState, sql: &str) -> Result<(), Exec> {
        tokio::time::timeout(CONNECT_TIMEOUT, self.execute_now(state, sql))
            .await
            .unwrap_or_else(|_| {
                state.conn = None;
                Err(Exec::Lost(format!("no answer within {CONNECT_TIMEOUT:?}")))
            })
    }

    async fn execute_now(&self, state: &mut TaskState, sql: &str) -> Result<(), Exec> {
        let Some(conn) = state.conn.as_mut() else {
            return Err(Exec::Lost("not connected".to_owned()));
        };
        let msg = crate::protocol::frontend::query_message(sql);
        conn.send(&msg)
            .await
            .map_err(|e| Exec::Lost(e.to_string()))?;
        let mut error = None;
        loop {
            let Some(conn) = state.conn.as_mut() else {
                return Err(Exec::Lost("not connected".to_owned()));
            };
            let (tag, msg) = read_upstream_frame(conn)
                .await
                .map_err(|e| Exec::Lost(e.to_string()))?;
            match tag {
                backend::READY_FOR_QUERY => {
                    return error.map_or(Ok(()), |e| Err(Exec::Refused(e)));
                }
                backend::ERROR_RESPONSE => {
                    let text = backend::describe_error(&msg[5..]);
                    if backend::prefix_is_fatal(&msg[5..]) {
                        return Err(Exec::Lost(text));
                    }
                    error = Some(text);
                }
                _ => self.on_message(state, tag, &msg),
            }
        }
    }

    /// A message that arrived on the listener connection outside a request: a
    /// notification is fanned out; a FATAL (the server going away) ends the connection.
    fn on_message(&self, state: &mut TaskState, tag: u8, msg: &[u8]) {
        match tag {
            NOTIFICATION_RESPONSE => {
                let Some(note) = Notification::parse(&msg[5..]) else {
                    return;
                };
                self.fan_out(state, &note);
            }
            backend::ERROR_RESPONSE if backend::prefix_is_fatal(&msg[5..]) => {
                let cause = backend::describe_error(&msg[5..]);
                self.lost(state, &cause);
            }
            _ => {}
        }
    }

    fn fan_out(&self, state: &TaskState, note: &Notification<'_>) {
        let pid = self.senders.client_pid(note.pid).unwrap_or(note.pid);
        let msg = note.encode(pid);
        for sub in state.subs.values() {
            if !sub.channels.contains(note.channel) {
                continue;
            }
            match sub.sink.tx.try_send(msg.clone()) {
                Ok(()) => {
                    metrics::counter!(crate::metrics::POOL_NOTIFICATIONS).increment(1);
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    sub.sink.dropped.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(crate::metrics::POOL_NOTIFICATIONS_DROPPED).increment(1);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }
}

/// How a request on the listener connection failed.
enum Exec {
    /// PostgreSQL answered with an error; the connection is fine.
    Refused(String),
    /// The connection is gone.
    Lost(String),
}

#[derive(Default)]
struct TaskState {
    conn: Option<Conn>,
    /// The pool the connection logs in with: the latest listening session's.
    pool: Option<Arc<Pool>>,
    /// Channel → sessions listening on it.
    channels: HashMap<String, usize>,
    subs: HashMap<u64, SubState>,
    /// The connection was lost (or could not be made) while channels are listened:
    /// try again after this long.
    retry_in: Option<Duration>,
}

struct SubState {
    sink: Sink,
    channels: HashSet<String>,
}

fn backoff(previous: Option<Duration>) -> Duration {
    previous.map_or(Duration::from_millis(100), |d| (d * 2).min(MAX_BACKOFF))
}

/// The next message on the listener connection; never ready without one.
async fn read_frame(conn: Option<&mut Conn>) -> Result<(u8, Bytes), SessionError> {
    match conn {
        Some(conn) => read_upstream_frame(conn).await,
        None => std::future::pending().await,
    }
}

/// A session's listening: its requests to the hub and its queue of notifications.
/// Dropped, the session stops listening on every channel.
pub struct Subscription {
    id: u64,
    hub: Arc<Hub>,
    pool: Arc<Pool>,
    sink: Sink,
    rx: mpsc::Receiver<Bytes>,
    /// A request went to the hub: it knows this session.
    used: bool,
}

/// The hub's answer to a LISTEN or UNLISTEN: `Err` with PostgreSQL's (or the
/// connection's) error.
pub type Answer = oneshot::Receiver<Result<(), String>>;

impl Subscription {
    /// LISTEN `channel`: answered once the listener connection listens on it.
    pub fn listen(&mut self, channel: String) -> Answer {
        let (done, answer) = oneshot::channel();
        self.used = true;
        self.hub.send(Command::Listen {
            id: self.id,
            channel,
            sink: self.sink.clone(),
            pool: self.pool.clone(),
            done,
        });
        answer
    }

    /// UNLISTEN `channel`, or every channel with `None`.
    pub fn unlisten(&mut self, channel: Option<String>) -> Answer {
        let (done, answer) = oneshot::channel();
        if self.used {
            self.hub.send(Command::Unlisten {
                id: self.id,
                channel,
                done,
            });
        } else {
            let _ = done.send(Ok(()));
        }
        answer
    }

    /// Appends the notifications waiting for the session to `out` (after a WARNING
    /// if some were dropped); true if anything was appended. Registers `cx` for the
    /// next one when none is waiting.
    pub fn poll_deliver(&mut self, cx: &mut Context<'_>, out: &mut BytesMut, room: usize) -> bool {
        if !self.used {
            return false;
        }
        let mut any = false;
        let dropped = self.sink.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            out.extend_from_slice(&dropped_notice(dropped));
            any = true;
        }
        while out.len() < room {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(msg)) => {
                    out.extend_from_slice(&msg);
                    any = true;
                }
                Poll::Ready(None) | Poll::Pending => break,
            }
        }
        any
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.used {
            self.hub.send(Command::Gone { id: self.id });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        assert_eq!(backoff(None), Duration::from_millis(100));
        assert_eq!(backoff(Some(Duration::from_secs(4))), MAX_BACKOFF);
    }
}
