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
            Some(&self.unnamed[..]).filter(|p| !p.is_empty())?
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
            self.unnamed.clear();
            self.unnamed.extend_from_slice(msg);
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
        // Tags and a Parse's first byte first: a cycle that needs a server (any
        // Bind, Execute, Query, or the unnamed statement's Parse) is turned down
        // without reading a message through. This runs before every lease.
        let mut rest = &queue[..];
        let mut last = 0;
        while !rest.is_empty() {
            let len = u32::from_be_bytes(rest.get(1..5)?.try_into().ok()?) as usize;
            let msg = rest.get(..len.checked_add(1)?)?;
            let body = frontend::body(msg);
            let local = match msg[0] {
                PARSE => body.first().is_some_and(|&b| b != 0),
                CLOSE => body.first() == Some(&b'S'),
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
        // Then each message read once; a malformed one sends the whole queue to
        // PostgreSQL, which reports it (nothing is remembered before that is known).
        enum Step<'a> {
            Parse(&'a str, std::sync::Arc<Def>),
            Close(&'a str),
            Sync,
        }
        let mut steps = Vec::new();
        let mut rest = &queue[..];
        while rest.len() >= Header::SIZE {
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            let (msg, tail) = rest.split_at(len + 1);
            let body = frontend::body(msg);
            steps.push(match msg[0] {
                PARSE => {
                    let p = frontend::parse(body)?;
                    Step::Parse(p.name, Def::new(p.sql, p.param_types))
                }
                CLOSE => Step::Close(frontend::target(body)?.name),
                _ => Step::Sync,
            });
            rest = tail;
        }
        let mut answers = Vec::new();
        for step in steps {
            match step {
                Step::Parse(name, def) => {
                    self.named.insert(name.to_owned(), def);
                    answers.extend_from_slice(frontend::PARSE_COMPLETE);
                }
                Step::Close(name) => {
                    if name.is_empty() {
                        self.unnamed.clear();
                    } else {
                        self.named.remove(name);
                    }
                    answers.extend_from_slice(frontend::CLOSE_COMPLETE);
                }
                Step::Sync => answers.extend_from_slice(&frontend::ready_for_query(b'I')),
            }
        }
        queue.clear();
        Some(answers)
    }
}
