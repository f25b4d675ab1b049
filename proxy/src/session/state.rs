//! Protocol state of one session, driven only by the messages that pass: transaction
//! status, outstanding requests, and the server-reported settings.
//!
//! It is fed every frontend and backend message tag (and the bodies it needs), whether
//! the answer came from PostgreSQL or, later, from the cache: it has no way to tell and
//! no reason to.
//!
//! Invariant: `awaiting_ready` counts requests that PostgreSQL answers with exactly one
//! ReadyForQuery each (Query, Sync, FunctionCall), so `awaiting_ready == 0 &&
//! !unsynced` means no answer is owed to the client.

use std::collections::BTreeMap;

use crate::protocol::backend;

#[derive(Debug)]
pub struct ProtocolState {
    /// b'I' idle, b'T' in a transaction block, b'E' in a failed transaction block.
    pub tx_status: u8,
    /// Requests sent upstream whose ReadyForQuery has not yet come back.
    pub awaiting_ready: u32,
    /// Extended-query messages sent since the last Sync.
    pub unsynced: bool,
    /// The latest value of every ParameterStatus the server reported.
    pub params: BTreeMap<String, String>,
    /// PostgreSQL sent a FATAL error: the upstream connection is about to close.
    pub upstream_fatal: bool,
    /// The client sent Terminate.
    pub client_terminated: bool,
}

impl Default for ProtocolState {
    fn default() -> Self {
        Self {
            tx_status: b'I',
            awaiting_ready: 0,
            unsynced: false,
            params: BTreeMap::new(),
            upstream_fatal: false,
            client_terminated: false,
        }
    }
}

impl ProtocolState {
    /// Frontend message tags, as sent upstream.
    pub fn on_frontend(&mut self, tag: u8) {
        match tag {
            b'Q' | b'F' => self.awaiting_ready += 1,
            b'S' => {
                self.awaiting_ready += 1;
                self.unsynced = false;
            }
            b'P' | b'B' | b'E' | b'D' | b'C' => self.unsynced = true,
            b'X' => self.client_terminated = true,
            _ => {}
        }
    }

    /// Backend message tags and bodies, as sent to the client.
    pub fn on_backend(&mut self, tag: u8, body: &[u8]) {
        match tag {
            backend::READY_FOR_QUERY => {
                self.awaiting_ready = self.awaiting_ready.saturating_sub(1);
                if let Some(status) = backend::ready_for_query_status(body) {
                    self.tx_status = status;
                }
            }
            backend::PARAMETER_STATUS => {
                if let Ok((name, value)) = backend::parse_parameter_status(body) {
                    self.params.insert(name, value);
                }
            }
            // The same check as for streamed errors: no allocation, severity only.
            backend::ERROR_RESPONSE if backend::prefix_is_fatal(body) => {
                self.upstream_fatal = true;
            }
            _ => {}
        }
    }

    /// No request is outstanding and no transaction is open: closing the session now
    /// loses nothing the client asked for.
    pub fn is_idle(&self) -> bool {
        self.awaiting_ready == 0 && !self.unsynced && self.tx_status == b'I'
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_query_cycle() {
        let mut s = ProtocolState::default();
        assert!(s.is_idle());
        s.on_frontend(b'Q');
        assert!(!s.is_idle());
        s.on_backend(b'Z', b"T");
        assert_eq!(s.tx_status, b'T');
        assert!(!s.is_idle(), "inside a transaction block");
        s.on_frontend(b'Q');
        s.on_backend(b'Z', b"I");
        assert!(s.is_idle());
    }

    #[test]
    fn extended_without_sync_is_busy() {
        let mut s = ProtocolState::default();
        s.on_frontend(b'P');
        s.on_frontend(b'B');
        s.on_frontend(b'E');
        s.on_frontend(b'H');
        assert!(!s.is_idle());
        s.on_frontend(b'S');
        s.on_backend(b'Z', b"I");
        assert!(s.is_idle());
    }

    #[test]
    fn pipelined_syncs_each_need_their_ready() {
        let mut s = ProtocolState::default();
        for _ in 0..3 {
            s.on_frontend(b'E');
            s.on_frontend(b'S');
        }
        s.on_backend(b'Z', b"I");
        s.on_backend(b'Z', b"I");
        assert!(!s.is_idle());
        s.on_backend(b'Z', b"I");
        assert!(s.is_idle());
    }

    #[test]
    fn fatal_error_is_noticed() {
        let mut s = ProtocolState::default();
        let msg = backend::error_response(
            backend::Severity::Fatal,
            crate::protocol::sqlstate::SqlState::ADMIN_SHUTDOWN,
            "x",
        );
        s.on_backend(b'E', &msg[5..]);
        assert!(s.upstream_fatal);
    }

    #[test]
    fn parameter_status_tracked() {
        let mut s = ProtocolState::default();
        s.on_backend(b'S', b"TimeZone\0UTC\0");
        assert_eq!(s.params.get("TimeZone").map(String::as_str), Some("UTC"));
    }
}
