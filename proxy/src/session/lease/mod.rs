//! The session's lease on a PostgreSQL server connection.
//!
//! A session does not own its server connection: it holds a lease on one, and the relay
//! borrows the connection through the lease ([`Lease::server`]). In session mode the
//! lease is taken at startup, with the connection the client authenticated on, and
//! held until the session ends, or until the connection is lost while the session is
//! idle (the session then detaches, ADR 0014). In transaction mode (ADR 0025) the
//! lease starts empty: the relay takes a server connection from the pool when
//! something is to go upstream ([`Lease::poll_acquire`]) and gives it back when the
//! session is idle again ([`Lease::release`]).
//!
//! What belongs to the lease rather than to the socket: the cancel key's upstream half
//! (spillway's client-facing key maps to nothing once the lease is lost), the canceller
//! for a query left running, the gauge the session counts in, and the way to ask whether
//! PostgreSQL still accepts sessions at all ([`Lease::probe`]).
//!
//! Invariants:
//! - Session mode: once lost, a lease is never taken again (spillway keeps no password
//!   to authenticate a new connection for the client).
//! - The cancel registry maps the session's key to the upstream key exactly while the
//!   lease is held (in transaction mode: to the connection leased now, if any).
//! - Transaction mode: a pooled connection goes back to its pool only through
//!   [`Lease::release`]; dropped any other way it is closed.
//! - Transaction mode: every byte written to a leased connection went through the
//!   session's [`Translator`] first ([`Lease::translate`]), and every backend message
//!   read from it is shown to it ([`Filter`]), so named prepared statements follow
//!   the client from connection to connection (ADR 0028).
//! - Transaction mode: a LISTEN/UNLISTEN in the text the client sends either is served
//!   by the database's listener connection (`listen.rs`, ADR 0031) or runs on a
//!   connection the session then keeps (pinned), never on one that goes back to the
//!   pool. (LISTEN hidden in a function the client calls is not seen.)

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};

use super::GaugeGuard;
use crate::error::SessionError;
use crate::net::cancel::{CancelKey, CancelRegistry, EntryId, LeaseSlot};
use crate::net::conn::Conn;
use crate::net::pool::{Leased, Pool};
use crate::net::stream::Stream;
use crate::net::upstream::{Canceller, Connector};
use crate::protocol::frontend;
use crate::protocol::prepared::Translator;

mod filter;
mod listen;
mod listen_tx;
mod pooled;
mod settings;
use crate::net::notify::Hub;
use crate::protocol::startup::StartupMessage;
use crate::read::cache::ReadCache;
pub use filter::Filter;
use listen::Listening;
pub use listen_tx::TxView;
use pooled::{Acquiring, PINNING_SQL, Pooled};

/// `application_name` of a probe's backend, so an operator can tell it apart.
const PROBE_APP: &str = "spillway probe";

pub struct Lease {
    /// The server connection; [`Stream::Detached`] once the lease is lost.
    conn: Conn,
    /// Why the lease was lost, once it was.
    lost: Option<String>,
    /// Cancels a query still running when nobody is left to read its answer.
    canceller: Option<Canceller>,
    cancel: Arc<CancelRegistry>,
    /// The session's client-facing pid in the cancel registry, and its entry there
    /// (several sessions may share a pid: PostgreSQL reuses a detached one's).
    client_pid: i32,
    cancel_id: EntryId,
    /// `spillway_upstream_connections` while held, `spillway_detached_sessions` after;
    /// none in transaction mode (the pool counts its connections).
    gauge: Option<GaugeGuard>,
    connector: Connector,
    /// A startup packet for [`Lease::probe`]: the session's role and database.
    probe_startup: Bytes,
    /// Transaction mode: the pool and what is leased from it now.
    pooled: Option<Box<Pooled>>,
    /// Transaction mode: where the cancel registry finds the key of the connection
    /// leased now.
    slot: Option<Arc<LeaseSlot>>,
}

impl Lease {
    /// The lease on `conn`, the connection the session authenticated on; `key` is
    /// the cancel key spillway gave the client for it.
    pub fn new(
        conn: Conn,
        connector: Connector,
        cancel: Arc<CancelRegistry>,
        key: &CancelKey,
        startup: &StartupMessage,
    ) -> Self {
        let canceller = cancel.lookup(key.pid, &key.secret).map(|key| Canceller {
            connector: connector.clone(),
            key,
        });
        Self {
            conn,
            lost: None,
            canceller,
            cancel,
            client_pid: key.pid,
            cancel_id: key.id,
            gauge: Some(GaugeGuard::new(crate::metrics::UPSTREAM_CONNECTIONS)),
            connector,
            probe_startup: probe_startup(startup),
            pooled: None,
            slot: None,
        }
    }

    /// An empty lease on connections of `pool` (transaction mode); `key` is the cancel
    /// key spillway made for the client.
    pub fn pooled(
        pool: Arc<Pool>,
        hub: Arc<Hub>,
        cache: Option<Arc<ReadCache>>,
        connector: Connector,
        cancel: Arc<CancelRegistry>,
        key: &CancelKey,
        startup: &StartupMessage,
    ) -> Self {
        let max_prepared = pool.max_prepared();
        Self {
            conn: Conn::new(Stream::Detached),
            lost: None,
            canceller: None,
            cancel,
            client_pid: key.pid,
            cancel_id: key.id,
            gauge: None,
            connector,
            probe_startup: probe_startup(startup),
            slot: key.slot.clone(),
            pooled: Some(Box::new(Pooled {
                pool,
                leased: None,
                acquiring: None,
                inert_parse: Vec::new(),
                translator: (max_prepared > 0).then(|| Translator::new(max_prepared)),
                translated: 0,
                replay_due: false,
                settings: Vec::new(),
                settings_dirty: false,
                swallow: 0,
                statements: std::collections::HashSet::new(),
                pinned: false,
                hub,
                listening: None,
                cache,
            })),
        }
    }

    /// The server connection, while the lease is held.
    pub fn server(&mut self) -> Option<&mut Conn> {
        match self.pooled.as_deref_mut() {
            Some(p) => p.leased.as_mut().and_then(Leased::conn),
            None => self.lost.is_none().then_some(&mut self.conn),
        }
    }

    /// Transaction mode: server connections are leased per transaction.
    pub fn is_pooled(&self) -> bool {
        self.pooled.is_some()
    }

    /// Transaction mode: takes a server connection from the pool (waiting up to
    /// `pool.queue_timeout`). Ready at once when one is leased already.
    pub fn poll_acquire(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SessionError>> {
        let Some(p) = self.pooled.as_deref_mut() else {
            return Poll::Ready(Ok(()));
        };
        if p.leased.is_some() {
            return Poll::Ready(Ok(()));
        }
        let leased = match p.acquiring.as_mut() {
            Some(acquiring) => match acquiring.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(r) => {
                    p.acquiring = None;
                    r?
                }
            },
            // A free permit and an idle connection: leased at once, no future.
            None => match p.pool.try_acquire() {
                Ok(leased) => leased,
                Err(permit) => {
                    let mut acquiring: Acquiring = Box::pin(p.pool.clone().acquire_waiting(permit));
                    match acquiring.as_mut().poll(cx) {
                        Poll::Pending => {
                            p.acquiring = Some(acquiring);
                            return Poll::Pending;
                        }
                        Poll::Ready(r) => r?,
                    }
                }
            },
        };
        if let Some(key) = leased.key() {
            // A notification this connection sends shows this client's pid.
            p.hub.senders().leased(key.pid, self.client_pid);
            // Cancels go to this connection now (the canceller for a query left
            // running is made from the lease when needed, `cancel_running`).
            if let Some(slot) = &self.slot {
                slot.set(Some(key.clone()));
            }
        }
        p.leased = Some(leased);
        p.translated = 0;
        p.replay_due = true;
        if let Some(t) = p.translator.as_mut() {
            t.start_lease();
        }
        Poll::Ready(Ok(()))
    }

    /// Transaction mode, something queued upstream: answered without a connection if
    /// it can be (`Ready(Ok(true))`, [`Lease::answer_locally`], only outside a
    /// transaction: `idle`), else a connection leased and the queue translated for it.
    pub fn poll_pooled(
        &mut self,
        queue: &mut BytesMut,
        tx: TxView,
        cx: &mut Context<'_>,
    ) -> Poll<Result<bool, SessionError>> {
        let idle = tx.status == b'I';
        if let Some(served) = self.poll_listen(queue, tx, cx) {
            return served.map(|()| Ok(true));
        }
        if idle && self.answer_locally(queue) {
            return Poll::Ready(Ok(true));
        }
        let acquired = self.poll_acquire(cx);
        if let Poll::Ready(Err(e)) = acquired {
            return Poll::Ready(Err(e));
        }
        // Named statements under the leased connection's names (ADR 0028).
        self.translate(queue);
        acquired.map(|r| r.map(|()| false))
    }

    /// Transaction mode: notifications for the session's client from the listener
    /// connection, appended to `out` (up to about `room` bytes). The relay calls this
    /// only while the client is owed nothing, so they land between messages, as
    /// PostgreSQL sends them. True if anything was appended.
    pub fn poll_notifications(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut BytesMut,
        room: usize,
    ) -> bool {
        self.pooled
            .as_deref_mut()
            .and_then(|p| p.listening.as_mut())
            .is_some_and(|l| l.poll_deliver(cx, out, room))
    }

    /// Transaction mode: rewrites what was queued toward upstream since the last call
    /// for the leased connection (named statements under their server names, prepared
    /// there first where missing). Nothing happens while no connection is leased.
    pub fn translate(&mut self, queue: &mut BytesMut) {
        let Some(p) = self.pooled.as_deref_mut() else {
            return;
        };
        if p.leased.is_some() && p.replay_due {
            // The session's settings first, on this connection (answers swallowed).
            p.replay_due = false;
            if !p.settings.is_empty() {
                let sql: Vec<&str> = p.settings.iter().map(|(_, s)| s.as_str()).collect();
                let query = frontend::query_message(&sql.join("; "));
                let client = queue.split();
                queue.extend_from_slice(&query);
                queue.extend_from_slice(&client);
                p.translated += query.len();
                p.swallow += 1;
                p.settings_dirty = true;
            }
        }
        let (Some(t), Some(leased)) = (p.translator.as_mut(), p.leased.as_mut()) else {
            return;
        };
        if let Some((_, server)) = leased.parts() {
            p.translated = t.translate(queue, p.translated, server);
        }
    }

    /// Transaction mode, no connection leased or being waited for: answers what is
    /// queued toward upstream when it needs no server (named statements prepared or
    /// closed, and their Sync: `Translator::answer_without_server`). The answers are
    /// read as if PostgreSQL had sent them ([`Lease::server_filtered`]); true if so.
    pub fn answer_locally(&mut self, queue: &mut BytesMut) -> bool {
        let Some(p) = self.pooled.as_deref_mut() else {
            return false;
        };
        if p.leased.is_some() || p.acquiring.is_some() {
            return false;
        }
        let Some(answers) = p
            .translator
            .as_mut()
            .and_then(|t| t.answer_without_server(queue))
        else {
            return false;
        };
        p.translated = 0;
        self.conn.inbuf.extend_from_slice(&answers);
        true
    }

    /// Writes what the queue toward upstream holds to the server connection, as much
    /// as it takes now (nothing while none is leased).
    pub fn poll_write(
        &mut self,
        queue: &mut BytesMut,
        cx: &mut Context<'_>,
    ) -> std::io::Result<()> {
        let queued = queue.len();
        if self
            .pooled
            .as_deref()
            .and_then(|p| p.listening.as_ref())
            .is_some_and(Listening::holds_commit)
        {
            // A COMMIT waits for the listener to take the LISTENs of its transaction.
            return Ok(());
        }
        if let Some(server) = self.server() {
            crate::net::conn::poll_drain(&mut server.stream, queue, cx)?;
        }
        if let Some(p) = self.pooled.as_deref_mut() {
            p.translated = p.translated.saturating_sub(queued - queue.len());
        }
        Ok(())
    }

    /// The server connection, with the filter its backend messages go through first
    /// (transaction mode with named statements carried across leases). In
    /// transaction mode with no connection leased: the answers spillway gave itself
    /// ([`Lease::answer_locally`]), if any.
    pub fn server_filtered(&mut self) -> Option<(&mut Conn, Option<Filter<'_>>)> {
        match self.pooled.as_deref_mut() {
            // Answers of spillway's first (a LISTEN inside a transaction block is
            // answered while a connection is leased, with nothing outstanding there).
            Some(p) if p.leased.is_none() || !self.conn.inbuf.is_empty() => {
                (!self.conn.inbuf.is_empty()).then_some((&mut self.conn, None))
            }
            Some(p) => {
                let (conn, server) = p.leased.as_mut()?.parts()?;
                let filter = Filter {
                    t: p.translator.as_mut(),
                    server,
                    swallow: &mut p.swallow,
                    hub: &p.hub,
                    listening: p.listening.as_mut().filter(|l| l.keeps()),
                };
                Some((conn, Some(filter)))
            }
            None => self.lost.is_none().then_some((&mut self.conn, None)),
        }
    }

    /// Transaction mode: notes what a client message means for pinning (SQL whose
    /// effect outlives the transaction; named statements prepared and closed when
    /// they are not carried across leases). A Query or Parse is read once here and its
    /// text handed to each check.
    pub fn observe(&mut self, msg: &[u8]) {
        let Some(p) = self.pooled.as_deref_mut() else {
            return;
        };
        let body = frontend::body(msg);
        match msg[0] {
            frontend::PARSE => {
                if p.translator.is_some() && body == &p.inert_parse[..] {
                    // The same Parse as one that meant nothing here (a driver's
                    // unnamed statement, parsed again for every execution).
                    return;
                }
                let Some(parse) = frontend::parse(body) else {
                    return;
                };
                let set = p.observe_set(parse.sql);
                let listens = listen::contains_listen(parse.sql);
                if listens {
                    p.observe_listen_parse(parse.sql);
                }
                if p.translator.is_none() && !parse.name.is_empty() {
                    p.statements.insert(parse.name.to_owned());
                }
                if !set && !listens {
                    p.inert_parse.clear();
                    p.inert_parse.extend_from_slice(body);
                }
            }
            frontend::CLOSE if p.translator.is_none() => {
                if let Some(t) = frontend::target(body).filter(|t| t.kind == b'S') {
                    p.statements.remove(t.name);
                }
            }
            frontend::QUERY => {
                let sql = frontend::query(body).unwrap_or_default();
                p.observe_set(sql);
                let lower = sql.to_ascii_lowercase();
                if lower.contains("listen") {
                    p.observe_listen(sql);
                }
                let head: String = lower.trim_start().chars().take(32).collect();
                if !p.pinned
                    && (PINNING_SQL.iter().any(|k| head.starts_with(k))
                        || head.contains("with hold")
                        || lower.contains("pg_advisory_lock("))
                {
                    tracing::debug!("session pinned to its server connection by its SQL");
                    p.pinned = true;
                }
            }
            _ => {}
        }
    }

    /// Transaction mode: the session is idle; the connection goes back to the pool,
    /// unless the session is pinned to it (session-level state; named statements
    /// when they are not carried across leases).
    pub fn release(&mut self) {
        let Some(p) = self.pooled.as_deref_mut() else {
            return;
        };
        if p.pinned || !p.statements.is_empty() {
            return;
        }
        if let Some(mut leased) = p.leased.take() {
            let reset = std::mem::take(&mut p.settings_dirty).then_some("RESET ALL");
            if let Some(t) = p.translator.as_mut() {
                if let Some((_, server)) = leased.parts() {
                    t.end_lease(server);
                }
                let injected = t.take_injected();
                if injected > 0 {
                    metrics::counter!(crate::metrics::POOL_STATEMENTS_PREPARED).increment(injected);
                }
            }
            p.translated = 0;
            if let Some(slot) = &self.slot {
                slot.set(None);
            }
            leased.release_with(reset);
        }
    }

    /// The connection, held or not, for the last words on close (a lost one's writes
    /// go nowhere). In transaction mode a leased connection still busy is closed with
    /// the session; an idle one was released before.
    pub fn conn_for_close(&mut self) -> &mut Conn {
        if let Some(conn) = self
            .pooled
            .as_deref_mut()
            .and_then(|p| p.leased.as_mut())
            .and_then(Leased::conn)
        {
            return conn;
        }
        &mut self.conn
    }

    pub fn is_lost(&self) -> bool {
        self.lost.is_some()
    }

    /// Why the lease was lost, for the error a detached session ends with.
    pub fn lost_cause(&self) -> Option<&str> {
        self.lost.as_deref()
    }

    /// The connection is gone: drop it, leave nothing to cancel, count the session as
    /// detached.
    pub fn lose(&mut self, cause: String) {
        if let Some(p) = self.pooled.as_deref_mut() {
            // The pooled connection closes with its lease; the session leases another
            // when it next needs one.
            tracing::debug!(%cause, "pooled server connection lost");
            p.leased = None;
            if let Some(slot) = &self.slot {
                slot.set(None);
            }
            return;
        }
        self.conn.stream = Stream::Detached;
        self.conn.inbuf.clear();
        self.canceller = None;
        self.cancel.detach(self.client_pid, self.cancel_id);
        self.lost = Some(cause);
        self.gauge = Some(GaugeGuard::new(crate::metrics::DETACHED_SESSIONS));
    }

    /// Cancels what runs upstream (once): nobody will read its answer.
    pub fn cancel_running(&mut self) {
        if let Some(key) = self
            .pooled
            .as_deref_mut()
            .and_then(|p| p.leased.as_ref())
            .and_then(Leased::key)
        {
            // Transaction mode: the connection leased now runs it.
            Canceller {
                connector: self.connector.clone(),
                key: key.clone(),
            }
            .spawn();
            return;
        }
        if let Some(canceller) = self.canceller.take() {
            canceller.spawn();
        }
    }

    /// Whether PostgreSQL accepts sessions now (see `Connector::accepts_sessions`):
    /// a backend that ended while PostgreSQL does was ended on its own (an operator, a
    /// timeout), not by an outage.
    pub fn probe(&self) -> impl Future<Output = bool> + Send + 'static {
        let connector = self.connector.clone();
        let startup = self.probe_startup.clone();
        async move { connector.accepts_sessions(&startup).await }
    }
}

/// A startup packet for [`Lease::probe`]: the session's role and database.
fn probe_startup(startup: &StartupMessage) -> Bytes {
    StartupMessage::build(&[
        ("user", startup.user()),
        ("database", startup.database()),
        ("application_name", PROBE_APP),
    ])
}
