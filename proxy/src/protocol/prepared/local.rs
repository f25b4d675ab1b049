//! Prepares and closes answered without a server connection (ADR 0028).

use bytes::BytesMut;

use super::super::frame::Header;
use super::super::frontend::{self, CLOSE, PARSE, SYNC};
use super::{Def, Translator};

impl Translator {
    /// The SQL text of the client's statement `name` (`""`: the unnamed one), if the
    /// session prepared it.
    pub fn statement_sql(&self, name: &str) -> Option<&str> {
        let parse = if name.is_empty() {
            self.unnamed.as_deref()?
        } else {
            &self.named.get(name)?.parse[..]
        };
        frontend::parse(frontend::body(parse)).map(|p| p.sql)
    }

    /// A client's Parse answered without any server (a LISTEN the listener connection
    /// serves, ADR 0031): the statement is remembered as if it had been sent.
    pub fn remember_parse(&mut self, msg: &[u8]) {
        let Some(p) = frontend::parse(frontend::body(msg)) else {
            return;
        };
        if p.name.is_empty() {
            self.unnamed = Some(bytes::Bytes::copy_from_slice(msg));
            return;
        }
        self.named
            .insert(p.name.to_owned(), Def::new(p.sql, p.param_types));
    }

    /// With no server connection leased: when `queue` holds only whole Parses of
    /// named statements, Closes of statements and Syncs, ending with a Sync, they
    /// need no server. The statements are remembered (prepared on a connection when
    /// first bound or described there), the queue is emptied, and the answers
    /// PostgreSQL would give are returned (ParseComplete, CloseComplete, and
    /// ReadyForQuery `I` per Sync: the caller knows no transaction is open).
    ///
    /// This is what lets a client that prepares synchronously (libpq's `PQprepare`,
    /// as pgbench `-M prepared` does) never wait for a connection for it: waiting
    /// there would block every other client of its thread, some holding connections
    /// in their transactions.
    pub fn answer_without_server(&mut self, queue: &mut BytesMut) -> Option<Vec<u8>> {
        let mut rest = &queue[..];
        let mut last = 0;
        while !rest.is_empty() {
            let len = u32::from_be_bytes(rest.get(1..5)?.try_into().ok()?) as usize;
            let msg = rest.get(..len.checked_add(1)?)?;
            let local = match msg[0] {
                PARSE => frontend::parse(frontend::body(msg)).is_some_and(|p| !p.name.is_empty()),
                CLOSE => frontend::target(frontend::body(msg)).is_some_and(|t| t.kind == b'S'),
                SYNC => true,
                _ => false,
            };
            if !local {
                return None;
            }
            last = msg[0];
            rest = &rest[msg.len()..];
        }
        if last != SYNC {
            return None;
        }
        let mut answers = Vec::new();
        let mut rest = &queue[..];
        while rest.len() >= Header::SIZE {
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            let (msg, tail) = rest.split_at(len + 1);
            let body = frontend::body(msg);
            match msg[0] {
                PARSE => {
                    if let Some(p) = frontend::parse(body) {
                        self.named
                            .insert(p.name.to_owned(), Def::new(p.sql, p.param_types));
                    }
                    answers.extend_from_slice(frontend::PARSE_COMPLETE);
                }
                CLOSE => {
                    if let Some(t) = frontend::target(body) {
                        if t.name.is_empty() {
                            self.unnamed = None;
                        } else {
                            self.named.remove(t.name);
                        }
                    }
                    answers.extend_from_slice(frontend::CLOSE_COMPLETE);
                }
                _ => answers.extend_from_slice(&frontend::ready_for_query(b'I')),
            }
            rest = tail;
        }
        queue.clear();
        Some(answers)
    }
}
