//! Detached sessions: the session's upstream connection died (PostgreSQL stopped,
//! restarted, or ended the backend) while the session was idle, and the session goes
//! on serving what needs no upstream (SPEC §6: write-behind keeps acknowledging writes
//! while PostgreSQL is down).
//!
//! The relay decides *when* a session detaches (nothing outstanding upstream, no
//! transaction, no COPY, and PostgreSQL not accepting sessions) with
//! [`Caching::can_detach`]'s say; this module owns what a detached session still
//! answers:
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
//!   one is dropped then, for the read cache; `Caching::routing_catalog`); a snapshot
//!   that DDL through spillway made stale is never used. DDL made by others while the
//!   connection is down goes unseen, as it does for up to a minute between reloads
//!   anyway.

use super::wait::{Resume, Wait};
use super::{Caching, Disposition};
use crate::protocol::frontend;
use crate::session::state::Outbox;

const TERMINATE: u8 = b'X';

/// Whether the session still has its upstream connection, and may lose it.
#[derive(Default)]
pub struct Link {
    /// The upstream connection is gone; only local answers remain.
    pub detached: bool,
    /// The session ran LISTEN: it must not outlive its upstream connection.
    pub listened: bool,
}

impl Caching {
    /// Whether the session may outlive its upstream connection now: nothing it sent
    /// upstream awaits an answer, no extended cycle is half forwarded, and the session
    /// never ran LISTEN. Messages held for their Sync never went upstream and do not
    /// count: the cycle is decided when its Sync comes (a deferred write in it is
    /// answered here, anything else ends the session). The relay checks the protocol
    /// state (nothing owed, no transaction) itself.
    pub(super) fn can_detach(&self) -> bool {
        !self.link.detached
            && !self.link.listened
            && self.tracker.quiet
            && !self.tracker.desynced
            && !self.cycle.upstream
    }

    /// A frontend message of a detached session.
    pub(super) fn on_frontend_detached(&mut self, msg: &[u8], out: &mut Outbox) -> Disposition {
        let tag = msg[0];
        let nothing_held = self.cycle.held.is_empty()
            && matches!(self.wait, Wait::Fresh | Wait::Resumed(Resume::Again { .. }));
        match tag {
            TERMINATE => return Disposition::Consumed,
            frontend::SYNC if nothing_held => {
                out.ready_now();
                return Disposition::Consumed;
            }
            frontend::CLOSE if nothing_held => {
                if let Some(t) = frontend::target(frontend::body(msg)) {
                    self.stmts.closed(t.kind, t.name);
                    out.answer(frontend::CLOSE_COMPLETE);
                    return Disposition::Consumed;
                }
            }
            _ => {}
        }
        let before = out.upstream_len();
        match self.route(msg, out) {
            Disposition::Consumed if out.upstream_len() > before => {
                out.truncate_upstream(before);
                Disposition::NeedsUpstream
            }
            d => d,
        }
    }
}
