//! Protocol state of one session, driven only by the messages that pass (transaction
//! status, outstanding requests, the server-reported settings), and the [`Outbox`]:
//! the two outgoing queues, which feed that state machine themselves.
//!
//! The state machine sees every frontend message the session takes and every backend
//! message it gives the client, whether the answer came from PostgreSQL or from
//! spillway: it has no way to tell and no reason to. Nobody feeds it by hand: a
//! frontend message is seen when it is taken (forwarded, held or answered), a backend
//! message when it is queued for the client or swallowed.
//!
//! Invariants:
//! - `awaiting_ready` counts requests that PostgreSQL answers with exactly one
//!   ReadyForQuery each (Query, Sync, FunctionCall), so `awaiting_ready == 0 &&
//!   !unsynced` means no answer is owed to the client.
//! - The message being handled is seen before any answer to it is queued (a
//!   ReadyForQuery answering a Query never precedes the Query), and exactly once:
//!   messages held earlier and released upstream later are not seen again, nor are
//!   Parses spillway injects (their answers are swallowed and change nothing here).

use std::collections::BTreeMap;

use bytes::BytesMut;

use crate::error::ClientError;
use crate::net::conn::READ_CHUNK;
use crate::protocol::backend;
use crate::protocol::frame::Header;

#[derive(Debug)]
pub struct ProtocolState {
    /// b'I' idle, b'T' in a transaction block, b'E' in a failed transaction block.
    pub tx_status: u8,
    /// Requests sent upstream whose ReadyForQuery has not yet come back.
    pub awaiting_ready: u32,
    /// Extended-query messages sent since the last Sync.
    pub unsynced: bool,
    /// An Execute sent since the last Sync: its statement belongs to the implicit
    /// transaction the next Sync ends.
    pub executed: bool,
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
            executed: false,
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
                self.executed = false;
            }
            b'E' => {
                self.unsynced = true;
                self.executed = true;
            }
            b'P' | b'B' | b'D' | b'C' => self.unsynced = true,
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

/// Output toward both sides of a session, and the protocol state it feeds.
pub struct Outbox {
    client: BytesMut,
    upstream: BytesMut,
    state: ProtocolState,
    /// The frontend message being handled, until the state machine has seen it.
    offered: Option<u8>,
}

const READY_FOR_QUERY_LEN: usize = 6;

impl Outbox {
    pub fn new(state: ProtocolState) -> Self {
        Self {
            client: BytesMut::with_capacity(READ_CHUNK),
            upstream: BytesMut::with_capacity(READ_CHUNK),
            state,
            offered: None,
        }
    }

    pub fn state(&self) -> &ProtocolState {
        &self.state
    }

    /// The transaction status the next ReadyForQuery reports.
    pub fn tx_status(&self) -> u8 {
        self.state.tx_status
    }

    // Frontend messages.

    /// A frontend message of type `tag` is being handled: it is seen once it is taken,
    /// or before the first answer to it.
    pub fn offer(&mut self, tag: u8) {
        self.offered = Some(tag);
    }

    /// The offered message is taken (consumed): seen now, if it was not yet.
    pub fn take(&mut self) {
        if let Some(tag) = self.offered.take() {
            self.state.on_frontend(tag);
        }
    }

    /// The offered message is not taken now (it waits, or the session ends): unseen.
    pub fn withdraw(&mut self) {
        self.offered = None;
    }

    /// The offered message goes upstream.
    pub fn forward(&mut self, msg: &[u8]) {
        self.take();
        self.upstream.extend_from_slice(msg);
    }

    /// A message goes upstream that the state machine must not see now: one taken
    /// earlier and held, or a Parse spillway injects (its answer is swallowed).
    pub fn release(&mut self, msg: &[u8]) {
        self.upstream.extend_from_slice(msg);
    }

    /// A simple Query spillway sends itself (a held transaction's replay): counted
    /// like the client's, since its ReadyForQuery, swallowed, is seen too.
    pub fn internal_query(&mut self, msg: &[u8]) {
        self.state.on_frontend(msg[0]);
        self.upstream.extend_from_slice(msg);
    }

    /// Bytes queued upstream so far (see [`Outbox::truncate_upstream`]).
    pub fn upstream_len(&self) -> usize {
        self.upstream.len()
    }

    /// Drops what was queued upstream after `len` bytes: a detached session cannot send
    /// it (the session then ends).
    pub fn truncate_upstream(&mut self, len: usize) {
        self.upstream.truncate(len);
    }

    // Backend messages.

    /// A whole backend message passes to the client.
    pub fn relay(&mut self, msg: &[u8]) {
        self.state.on_backend(msg[0], &msg[Header::SIZE..]);
        self.client.extend_from_slice(msg);
    }

    /// A whole backend message answers a request spillway sent itself: seen, not sent.
    pub fn swallow(&mut self, msg: &[u8]) {
        self.state.on_backend(msg[0], &msg[Header::SIZE..]);
    }

    /// Part of a backend message too large to hold, as it arrives. Only its type
    /// counted ([`Outbox::streamed_fatal`]); none that change state is ever streamed
    /// but an ErrorResponse.
    pub fn stream(&mut self, bytes: &[u8]) {
        self.client.extend_from_slice(bytes);
    }

    /// A streamed ErrorResponse is FATAL (read from its first bytes).
    pub fn streamed_fatal(&mut self) {
        self.state.upstream_fatal = true;
    }

    /// Answers spillway gives itself that change no protocol state: RowDescription,
    /// DataRow, CommandComplete, ParseComplete, BindComplete, ParameterDescription,
    /// NoData, CloseComplete.
    pub fn answer(&mut self, msgs: &[u8]) {
        self.take();
        self.client.extend_from_slice(msgs);
    }

    /// An error of spillway's for the client.
    pub fn error(&mut self, err: &ClientError) {
        self.take();
        let msg = err.encode();
        self.state.on_backend(msg[0], &msg[Header::SIZE..]);
        self.client.extend_from_slice(&msg);
    }

    /// ReadyForQuery with transaction status `status`.
    pub fn ready(&mut self, status: u8) {
        self.take();
        let msg: [u8; READY_FOR_QUERY_LEN] = [backend::READY_FOR_QUERY, 0, 0, 0, 5, status];
        self.state.on_backend(msg[0], &msg[Header::SIZE..]);
        self.client.extend_from_slice(&msg);
    }

    /// ReadyForQuery with the current transaction status.
    pub fn ready_now(&mut self) {
        self.ready(self.state.tx_status);
    }

    // The relay's side.

    pub fn to_client(&mut self) -> &mut BytesMut {
        &mut self.client
    }

    pub fn to_upstream(&mut self) -> &mut BytesMut {
        &mut self.upstream
    }

    /// Both queues at once (toward the client, toward upstream), for the last words.
    pub fn queues(&mut self) -> (&mut BytesMut, &mut BytesMut) {
        (&mut self.client, &mut self.upstream)
    }

    pub fn client_terminated(&self) -> bool {
        self.state.client_terminated
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
    fn the_outbox_feeds_every_message_once_and_in_order() {
        let mut out = Outbox::new(ProtocolState::default());
        // A Query answered locally: seen before its ReadyForQuery.
        out.offer(b'Q');
        out.answer(b"C\0\0\0\x0bSELECT 1\0");
        out.ready_now();
        out.take();
        assert!(out.state().is_idle());
        // A held message is seen when taken; released later, not again.
        out.offer(b'P');
        out.take();
        assert!(out.state().unsynced);
        out.offer(b'S');
        out.forward(b"S\0\0\0\x04");
        out.release(b"P\0\0\0\x04");
        assert_eq!(out.state().awaiting_ready, 1);
        assert!(!out.state().unsynced);
        out.relay(b"Z\0\0\0\x05I");
        assert!(out.state().is_idle());
        // A message that waits is not seen.
        out.offer(b'Q');
        out.withdraw();
        out.take();
        assert!(out.state().is_idle());
        // spillway's own query counts, and its answers too.
        out.internal_query(b"Q\0\0\0\x05\0");
        assert_eq!(out.state().awaiting_ready, 1);
        out.swallow(b"Z\0\0\0\x05T");
        assert_eq!(out.state().tx_status, b'T');
        assert_eq!(out.state().awaiting_ready, 0);
        // Errors of spillway's are seen as any.
        out.offer(b'Q');
        out.error(&ClientError {
            severity: backend::Severity::Fatal,
            code: crate::protocol::sqlstate::SqlState::ADMIN_SHUTDOWN,
            message: "x".into(),
            detail: None,
        });
        assert!(out.state().upstream_fatal);
    }

    #[test]
    fn parameter_status_tracked() {
        let mut s = ProtocolState::default();
        s.on_backend(b'S', b"TimeZone\0UTC\0");
        assert_eq!(s.params.get("TimeZone").map(String::as_str), Some("UTC"));
    }
}
