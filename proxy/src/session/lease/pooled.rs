//! What transaction mode adds to a lease (`Pooled`): the pool and the connection
//! leased from it now, the translator of named statements carried across leases, the
//! session-level settings replayed on each lease, what pins the session to its
//! connection, and its listening through the database's listener hub (ADR 0025, 0028,
//! 0031). Plain state; the lease's methods in `mod.rs` drive it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::listen::{self, Listening};
use super::settings::{SessionSet, set_statement};
use crate::error::SessionError;
use crate::net::notify::Hub;
use crate::net::pool::{Leased, Pool};
use crate::protocol::prepared::Translator;
use crate::read::cache::ReadCache;

pub(super) type Acquiring = Pin<Box<dyn Future<Output = Result<Leased, SessionError>> + Send>>;

pub(super) struct Pooled {
    pub(super) pool: Arc<Pool>,
    pub(super) leased: Option<Leased>,
    /// A wait for a connection, while one runs (only when none could be leased at
    /// once).
    pub(super) acquiring: Option<Acquiring>,
    /// The body of the last Parse that was neither a SET nor a LISTEN: the same one
    /// again is not read again ([`Lease::observe`](super::Lease::observe)).
    pub(super) inert_parse: Vec<u8>,
    /// Named prepared statements carried across leases (`protocol/prepared/`);
    /// `None` with `pool.max_prepared_statements = 0`.
    pub(super) translator: Option<Translator>,
    /// Bytes at the head of the queue toward upstream already translated for the
    /// leased connection.
    pub(super) translated: usize,
    /// The lease is new: the session's settings are replayed before anything else.
    pub(super) replay_due: bool,
    /// Without a translator: named protocol-level statements the client prepared and
    /// has not closed, which live on the leased connection only, so the session keeps
    /// it (pinned).
    pub(super) statements: std::collections::HashSet<String>,
    /// Session-level `SET`s the client ran (parameter name, statement), replayed at the
    /// start of each lease; the connection is reset (`RESET ALL`) when it goes back.
    pub(super) settings: Vec<(String, String)>,
    /// A `SET` or `RESET` went to the leased connection: reset it at release.
    pub(super) settings_dirty: bool,
    /// spillway's own simple Queries (the replay) whose answers are swallowed, up to
    /// and including their ReadyForQuery.
    pub(super) swallow: u32,
    /// The client ran SQL whose effect outlives its transaction on that connection
    /// (LISTEN run on it, PREPARE, a temporary table, a `WITH HOLD` cursor, a session advisory
    /// lock): pinned until the session ends.
    pub(super) pinned: bool,
    /// The database's listener hub (LISTEN/NOTIFY through one connection, ADR 0031),
    /// and the session's listening there once it ran LISTEN.
    pub(super) hub: Arc<Hub>,
    pub(super) listening: Option<Listening>,
    /// The read cache, whose classifier says what a statement is (`settings.rs`);
    /// `None` with the cache off (statements that may be a SET are parsed then).
    pub(super) cache: Option<Arc<ReadCache>>,
}

impl Pooled {
    /// A simple Query that mentions LISTEN: one LISTEN/UNLISTEN is left for the
    /// listener connection ([`Lease::poll_pooled`]); anything else pins the session
    /// (it runs on the leased connection, which must stay the session's to get the
    /// notifications).
    pub(super) fn observe_listen(&mut self, sql: &str) {
        match listen::listen_command(sql) {
            Some(cmd) if self.pinned => {
                // Runs on the pinned connection; what the listener connection listens
                // on for the session stops too.
                if let (listen::ListenCommand::Unlisten(channel), Some(l)) =
                    (cmd, self.listening.as_mut())
                {
                    l.unlisten_now(channel);
                }
            }
            Some(_) => {
                let (hub, pool) = (&self.hub, &self.pool);
                let l = self
                    .listening
                    .get_or_insert_with(|| Listening::new(hub.subscribe(pool.clone())));
                l.unanswered += 1;
            }
            None if listen::mentions_listen(sql)
                || sql.to_ascii_lowercase().contains("listen ") =>
            {
                tracing::debug!(
                    "session pinned to its server connection by LISTEN among other SQL"
                );
                self.hub.senders().activate();
                self.pinned = true;
            }
            None => {}
        }
    }
}

impl Pooled {
    /// The text of a simple Query or a Parse: a session-level `SET` or `RESET` is
    /// remembered for the replay (or pins the session, `settings.rs`); true if it was
    /// one.
    pub(super) fn observe_set(&mut self, sql: &str) -> bool {
        let cache = self.cache.as_deref();
        let classify = |sql: &str| match cache {
            Some(c) => c.classifier.classify(sql),
            None => Arc::new(crate::read::classify::analyze(sql)),
        };
        let Some(set) = set_statement(sql, &classify) else {
            return false;
        };
        self.settings_dirty = true;
        match set {
            SessionSet::Pin => {
                tracing::debug!(
                    "session pinned to its server connection by a SET among other statements"
                );
                self.pinned = true;
            }
            SessionSet::Set(name, sql) => {
                self.settings.retain(|(n, _)| *n != name);
                self.settings.push((name, sql));
            }
            SessionSet::Reset(name) => self.settings.retain(|(n, _)| *n != name),
            SessionSet::ResetAll => self.settings.clear(),
        }
        true
    }

    /// A Parse that mentions LISTEN: one LISTEN/UNLISTEN may be executed through the
    /// listener connection (a later cycle at the queue's head, [`Lease::poll_pooled`]);
    /// anything else pins.
    pub(super) fn observe_listen_parse(&mut self, sql: &str) {
        if self.pinned {
            return;
        }
        if listen::listen_command(sql).is_some() {
            let (hub, pool) = (&self.hub, &self.pool);
            let l = self
                .listening
                .get_or_insert_with(|| Listening::new(hub.subscribe(pool.clone())));
            l.prepared = true;
        } else if listen::mentions_listen(sql) || sql.to_ascii_lowercase().contains("listen ") {
            tracing::debug!(
                "session pinned to its server connection by LISTEN among other SQL (extended protocol)"
            );
            self.hub.senders().activate();
            self.pinned = true;
        }
    }
}

/// Statements whose effect outlives the transaction on the server connection, by the
/// start of their text (lower case, after leading blanks). Crude on purpose: a false
/// positive only pins a session, never breaks one.
pub(super) const PINNING_SQL: [&str; 8] = [
    "set role",
    "set session authorization",
    "reset role",
    "prepare",
    "create temp",
    "create temporary",
    "declare",
    "select pg_advisory_lock",
];
