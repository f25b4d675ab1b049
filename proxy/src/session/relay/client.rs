//! Client bytes framed into whole messages and handed to the handler one by one, or
//! a whole extended cycle at once when the cache answers it (below).
//!
//! A cycle that has arrived whole (Parse or Bind … Sync, at most [`WHOLE_CYCLE`]
//! messages) is first offered to the handler as a whole (`Handler::answer_cycle`):
//! answered from the cache exactly as it would be message by message, without holding
//! each message first; refused, nothing has changed and its messages go one by one.
//! Not in transaction mode, where the lease observes every message.

use bytes::Buf;

use super::{Relay, TERMINATE};
use crate::error::SessionError;
use crate::net::conn::shrink_if_idle;
use crate::protocol::frame::peek_header;
use crate::protocol::frontend;
use crate::session::handler::Disposition;

/// The most messages of a cycle offered whole (libpq and pgbench send four: Bind,
/// Describe, Execute, Sync; tokio-postgres's `query_typed` five, with a Parse).
const WHOLE_CYCLE: usize = 8;

impl Relay {
    /// Frames complete client messages and hands each to the handler, until one is
    /// blocked. Never while the handler is blocked: the turn that ends a wait may also
    /// read the client's next bytes, and the message offered again then may wait
    /// anew; offering it a second time would replace its wait (a held transaction's
    /// replay was sent twice so, its answers taken for missing: 40001).
    pub(super) fn on_client_data(&mut self) -> Result<(), SessionError> {
        while !self.handler.is_blocked()
            && let Some(h) = peek_header(&self.client.inbuf, self.max_message)?
        {
            if matches!(h.tag, frontend::PARSE | frontend::BIND) && self.answer_whole_cycle() {
                continue;
            }
            if self.client.inbuf.len() < h.total_len {
                self.client
                    .inbuf
                    .reserve(h.total_len - self.client.inbuf.len());
                break;
            }
            if h.tag == TERMINATE[0] && self.lease.is_pooled() {
                self.client.inbuf.advance(h.total_len);
                self.pooled_terminated = true;
                break;
            }
            let msg = &self.client.inbuf[..h.total_len];
            self.lease.observe(msg);
            self.out.offer(h.tag);
            match self.handler.on_frontend(msg, &mut self.out) {
                Disposition::Consumed => self.out.take(),
                Disposition::Blocked => {
                    self.out.withdraw();
                    break;
                }
                Disposition::NeedsUpstream => {
                    self.out.withdraw();
                    return Err(SessionError::UpstreamLost {
                        cause: self
                            .lease
                            .lost_cause()
                            .unwrap_or("not connected")
                            .to_owned(),
                    });
                }
            }
            self.client.inbuf.advance(h.total_len);
            if self.out.client_terminated() {
                break;
            }
        }
        shrink_if_idle(&mut self.client.inbuf);
        Ok(())
    }

    /// The cycle at the front of the client's bytes, offered whole: true when the
    /// handler answered it and it was consumed.
    fn answer_whole_cycle(&mut self) -> bool {
        if self.lease.is_pooled() {
            return false;
        }
        let buf = &self.client.inbuf[..];
        let mut msgs: [&[u8]; WHOLE_CYCLE] = [&[]; WHOLE_CYCLE];
        let (mut n, mut at) = (0, 0);
        loop {
            if n == WHOLE_CYCLE {
                return false;
            }
            // Not whole yet, or malformed: the message-by-message path says what then.
            let Ok(Some(h)) = peek_header(&buf[at..], self.max_message) else {
                return false;
            };
            if buf.len() - at < h.total_len {
                return false;
            }
            msgs[n] = &buf[at..at + h.total_len];
            n += 1;
            at += h.total_len;
            if h.tag == frontend::SYNC {
                break;
            }
        }
        if !self.handler.answer_cycle(&msgs[..n], &mut self.out) {
            return false;
        }
        self.client.inbuf.advance(at);
        true
    }
}
