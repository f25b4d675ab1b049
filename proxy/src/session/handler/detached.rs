//! Detached sessions: the session's upstream connection died (PostgreSQL stopped,
//! restarted, or ended the backend) while the session was idle, and the session goes
//! on serving what needs no upstream (SPEC §6: write-behind keeps acknowledging writes
//! while PostgreSQL is down).
//!
//! The relay decides *when* a session detaches ([`Handler::can_detach`]: nothing
//! outstanding upstream, no transaction, no COPY); this module owns
//! what a detached session still answers:
//! - deferred writes (simple Query, or an extended cycle on a statement the session
//!   already prepared, or an unnamed Parse + Bind + [Describe portal] + Execute),
//!   acknowledged from the journal as usual; with `row_counts = "exact"`, a key the
//!   write service can neither find in its overlay nor read upstream is refused with
//!   a retryable ERROR 08006, never guessed;
//! - cache hits, `SPILLWAY FLUSH` (it waits for the flush worker, as always);
//! - a Sync with nothing held, and a Close with nothing held (CloseComplete; the
//!   statement or portal is forgotten here: PostgreSQL's copy died with the backend).
//!
//! Anything else would have to go upstream: [`Disposition::NeedsUpstream`], and the
//! relay ends the session with FATAL 08006 after the answers already queued, so
//! answers still reach the client in request order. A detached session never
//! reconnects: spillway relays authentication and holds no password to replay it.
//!
//! Invariants:
//! - A session that ran LISTEN never detaches (it would wait for notifications that
//!   can no longer come, without being told); nor does a desynced one.
//! - Routing of deferred writes (which table a statement writes) uses the last catalog
//!   snapshot that was trusted when the cache's service connection was lost (the live
//!   one is dropped then, for the read cache); a snapshot that DDL through spillway
//!   made stale is never used. DDL made by others while the connection is down goes
//!   unseen, as it does for up to a minute between reloads anyway.

use std::sync::Arc;

use super::{Caching, Disposition, Handler, Out};
use crate::protocol::frontend;
use crate::read::catalog::Catalog;

const TERMINATE: u8 = b'X';

impl Handler {
    /// Whether the session may outlive its upstream connection now: the handler
    /// caches (there is something to answer locally), nothing it sent upstream awaits
    /// an answer, no extended cycle is half forwarded, and the session never ran
    /// LISTEN. Messages held for their Sync never went upstream and do not count: the
    /// cycle is decided when its Sync comes (a deferred write in it is answered here,
    /// anything else ends the session). The relay checks the protocol state (nothing
    /// owed, no transaction) itself.
    pub fn can_detach(&self) -> bool {
        self.caching.as_deref().is_some_and(|c| {
            !c.detached
                && !c.listened
                && c.tracker.is_quiet()
                && !c.tracker.is_desynced()
                && !c.cycle_upstream
        })
    }

    /// From now on nothing goes upstream; see the module documentation.
    pub fn detach(&mut self) {
        if let Some(c) = self.caching.as_deref_mut() {
            c.detached = true;
        }
    }
}

impl Caching {
    /// A frontend message of a detached session.
    pub(super) fn on_frontend_detached(
        &mut self,
        tag: u8,
        msg: &[u8],
        out: &mut Out<'_>,
    ) -> Disposition {
        let nothing_held = self.held.is_empty() && self.waiting.is_none();
        match tag {
            TERMINATE => {
                out.state.on_frontend(tag);
                return Disposition::Consumed;
            }
            frontend::SYNC if nothing_held => {
                out.state.on_frontend(tag);
                self.answer_ready(out);
                return Disposition::Consumed;
            }
            frontend::CLOSE if nothing_held => {
                if let Some(t) = frontend::target(frontend::body(msg)) {
                    match (t.kind, t.name.is_empty()) {
                        (b'S', true) => self.forget_unnamed_statement(),
                        (b'S', false) => {
                            self.named.remove(t.name);
                        }
                        _ => {
                            self.portals.remove(t.name);
                        }
                    }
                    out.state.on_frontend(tag);
                    out.client.extend_from_slice(frontend::CLOSE_COMPLETE);
                    return Disposition::Consumed;
                }
            }
            _ => {}
        }
        let before = out.upstream.len();
        match self.on_frontend(tag, msg, out) {
            Disposition::Consumed if out.upstream.len() > before => {
                out.upstream.truncate(before);
                Disposition::NeedsUpstream
            }
            d => d,
        }
    }

    /// The catalog deferred-write routing uses: the live snapshot, or while the
    /// cache's service connection is down the last one trusted before it was lost.
    /// Not only for detached sessions: PostgreSQL's backends die at about the same
    /// moment, and a write that arrives between the service connection's end and its
    /// own session's would otherwise run write-through into a dying connection.
    pub(super) fn routing_catalog(&self) -> Option<Arc<Catalog>> {
        self.db.catalog().or_else(|| self.db.last_trusted_catalog())
    }

    fn forget_unnamed_statement(&mut self) {
        self.unnamed_client = None;
        self.unnamed_upstream = None;
        self.unnamed_pending = false;
    }
}
