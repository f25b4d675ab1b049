//! The session's lease on a PostgreSQL server connection.
//!
//! A session does not own its server connection: it holds a lease on one, and the relay
//! borrows the connection through the lease ([`Lease::server`]). In session mode
//! (the only mode today) the lease is taken at startup, with the connection the
//! client authenticated on, and held until the session ends, or until the connection
//! is lost while the session is idle (the session then detaches, ADR 0014). Pooling
//! would grant and take back leases per transaction without changing the relay.
//!
//! What belongs to the lease rather than to the socket: the cancel key's upstream half
//! (spillway's client-facing key maps to nothing once the lease is lost), the canceller
//! for a query left running, the gauge the session counts in, and the way to ask whether
//! PostgreSQL still accepts sessions at all ([`Lease::probe`]).
//!
//! Invariants:
//! - Once lost, a lease is never taken again (spillway keeps no password to
//!   authenticate a new connection for the client).
//! - The cancel registry maps the session's key to the upstream key exactly while the
//!   lease is held.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;

use super::GaugeGuard;
use crate::net::cancel::{CancelKey, CancelRegistry, EntryId};
use crate::net::conn::Conn;
use crate::net::stream::Stream;
use crate::net::upstream::{Canceller, Connector};
use crate::protocol::startup::StartupMessage;

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
    /// `spillway_upstream_connections` while held, `spillway_detached_sessions` after.
    gauge: GaugeGuard,
    connector: Connector,
    /// A startup packet for [`Lease::probe`]: the session's role and database.
    probe_startup: Bytes,
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
            gauge: GaugeGuard::new(crate::metrics::UPSTREAM_CONNECTIONS),
            connector,
            probe_startup: StartupMessage::build(&[
                ("user", startup.user()),
                ("database", startup.database()),
                ("application_name", PROBE_APP),
            ]),
        }
    }

    /// The server connection, while the lease is held.
    pub fn server(&mut self) -> Option<&mut Conn> {
        self.lost.is_none().then_some(&mut self.conn)
    }

    /// The connection, held or not, for the last words on close (a lost one's writes
    /// go nowhere).
    pub fn conn_for_close(&mut self) -> &mut Conn {
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
        self.conn.stream = Stream::Detached;
        self.conn.inbuf.clear();
        self.canceller = None;
        self.cancel.detach(self.client_pid, self.cancel_id);
        self.lost = Some(cause);
        self.gauge = GaugeGuard::new(crate::metrics::DETACHED_SESSIONS);
    }

    /// Cancels what runs upstream (once): nobody will read its answer.
    pub fn cancel_running(&mut self) {
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
