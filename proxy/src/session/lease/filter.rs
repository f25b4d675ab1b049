//! The filter a pooled connection's backend messages pass before the handler sees
//! them (ADR 0028, 0031): answers to what spillway sent itself are swallowed (a
//! statement prepared there, the session's settings replayed), a CloseComplete
//! standing in for a Parse becomes ParseComplete, a notification's sender pid the
//! sending client's.

use super::listen::Listening;
use crate::net::notify::Hub;
use crate::protocol::prepared::{Reply, ServerStatements, Translator};

/// What the relay does with backend messages of a pooled connection before the
/// handler sees them: answers to statements spillway prepared there are swallowed.
pub struct Filter<'a> {
    pub(super) t: Option<&'a mut Translator>,
    pub(super) server: &'a mut ServerStatements,
    pub(super) swallow: &'a mut u32,
    pub(super) hub: &'a Hub,
    /// The session's listening while it keeps LISTENs of a transaction block whose
    /// end is read from PostgreSQL's answers (`listen_tx.rs`).
    pub(super) listening: Option<&'a mut Listening>,
}

impl Filter<'_> {
    /// A NotificationResponse on the leased connection (a pinned session's own
    /// LISTEN) carries the sender's server pid: the sending client's spillway pid when
    /// the sender is a pooled connection (rewritten in place).
    pub fn map_notification_pid(&self, msg: &mut [u8]) {
        if msg.first() != Some(&b'A') {
            return;
        }
        let Some(pid) = msg.get(5..9).and_then(|b| <[u8; 4]>::try_from(b).ok()) else {
            return;
        };
        if let Some(client) = self.hub.senders().client_pid(i32::from_be_bytes(pid)) {
            msg[5..9].copy_from_slice(&client.to_be_bytes());
        }
    }

    /// A whole backend message, before [`Filter::on_backend`]: while LISTENs of a
    /// transaction block are kept, its COMMIT or ROLLBACK answered by PostgreSQL
    /// settles them (a block ended in a way not read from the client's text).
    pub fn watch(&mut self, tag: u8, msg: &[u8]) {
        if let Some(l) = self.listening.as_deref_mut() {
            l.on_block_answer(tag, msg);
        }
    }

    pub fn on_backend(&mut self, tag: u8) -> Reply {
        if *self.swallow > 0 {
            // The answers to the session's settings replayed (an error among them
            // too: the setting then stays as the connection had it).
            if tag == b'Z' {
                *self.swallow -= 1;
            }
            return Reply::Swallow;
        }
        match self.t.as_deref_mut() {
            Some(t) => t.on_backend(tag, self.server),
            None => Reply::Pass,
        }
    }
}
