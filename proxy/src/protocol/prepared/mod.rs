//! Named prepared statements across pooled server connections (transaction mode,
//! ADR 0028): the bookkeeping that lets a client prepare a statement once and use it
//! on whichever server connection it leases next. Sans I/O: it rewrites the frontend
//! messages bound for a leased connection and says what to do with the backend
//! messages that answer them.
//!
//! The model is PgBouncer's `max_prepared_statements` (1.21+):
//! - A client's named Parse is remembered per session ([`Translator`]): its name maps
//!   to the statement's text and parameter types. On the server the statement is
//!   called by a name derived from those two (`sw_` + a keyed 128-bit hash), so every
//!   client preparing the same statement shares one server-side copy per connection.
//! - Each server connection remembers which of those names it holds
//!   ([`ServerStatements`], travelling with the connection between leases). Before a
//!   Bind or a Describe of a client statement on a connection that lacks it, a Parse
//!   (after a Close of the same name) is injected; both answers are swallowed.
//! - A client's Parse of a statement its connection already holds is not parsed
//!   again: a Close of a name that never exists goes instead, and its CloseComplete is
//!   given to the client as the ParseComplete it expects, in order. A client's Close
//!   of a statement only forgets the client's name (a Close of a name that never
//!   exists goes, so the client's CloseComplete comes from PostgreSQL, in order).
//! - A lease starts on a connection whose unnamed statement is someone else's: a Bind
//!   or Describe of it before any Parse of it in the lease re-parses the client's
//!   last one there (or closes the foreign one: PostgreSQL's error is the client's).
//! - A connection holds at most `limit` of these statements; the least recently used
//!   one is closed to make room.
//!
//! Answers are matched to requests by order: only Parse and Close are answered by
//! ParseComplete and CloseComplete, so a queue of those two, in the order they were
//! sent, says whose each answer is. After an ErrorResponse PostgreSQL skips every
//! message up to the next Sync: requests are numbered by how many
//! ReadyForQuery-bearing messages (Sync, Query, FunctionCall) went before them, and an
//! error drops the queued ones of the cycle it happened in; what is sent into a cycle
//! that already failed is passed through unchanged and remembered nowhere.
//!
//! Invariants:
//! - The server-side state is changed when a message is sent (stream order) and a
//!   statement counts as held only once PostgreSQL confirmed its Parse, or while its
//!   Parse is in the same cycle ahead of the message using it.
//! - Nothing here ever makes PostgreSQL raise an error the client did not cause: a
//!   statement whose state is uncertain is closed and parsed again (Close of a missing
//!   statement is no error).
//! - `DISCARD`/`DEALLOCATE` in a simple Query make the connection forget what it held.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use super::frame::Header;
use super::frontend::{self, CLOSE, DESCRIBE, FUNCTION_CALL, PARSE, QUERY, SYNC};

mod local;
mod server;
#[cfg(test)]
mod tests;
mod wire;

pub use server::ServerStatements;
use server::{Entry, Slot};
pub use wire::server_name;
use wire::{NOWHERE, Rewrite, parse_message, put_cstr, write_target};

/// A scratch buffer larger than this (one large message went through) is not kept.
const SCRATCH_KEEP: usize = 64 * 1024;

/// A statement a client prepared, as it is known on server connections.
#[derive(Debug)]
pub struct Def {
    /// The server-side name (`sw_` + 32 hex digits); empty for the unnamed statement.
    pub server_name: Box<str>,
    /// The Parse message that prepares it on a server connection, under
    /// `server_name`.
    pub parse: Bytes,
}

impl Def {
    /// A client statement's definition: its server-side name and the Parse that
    /// prepares it under that name.
    pub fn new(sql: &str, param_types: &[u8]) -> Arc<Self> {
        let server_name = server_name(sql, param_types);
        Arc::new(Self {
            parse: parse_message(&server_name, sql, param_types),
            server_name: server_name.into(),
        })
    }
}

/// What to do with a backend message ([`Translator::on_backend`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// It is the client's: on as usual.
    Pass,
    /// It answers a message spillway injected: nobody sees it.
    Swallow,
    /// A CloseComplete standing in for the ParseComplete of a Parse not sent again:
    /// the client gets ParseComplete.
    AsParseComplete,
}

impl Reply {
    /// The message the client gets for the backend message `msg` (`None`: nothing).
    pub fn apply(self, msg: &[u8]) -> Option<&[u8]> {
        match self {
            Reply::Pass => Some(msg),
            Reply::Swallow => None,
            Reply::AsParseComplete => Some(frontend::PARSE_COMPLETE),
        }
    }
}

/// What a queued Parse or Close stands for.
#[derive(Debug)]
struct Sent {
    /// The cycle it was sent in.
    cycle: u64,
    /// The answer PostgreSQL gives it: `b'1'` or `b'3'`.
    answer: u8,
    reply: Reply,
    effect: Effect,
}

#[derive(Debug, PartialEq, Eq)]
enum Effect {
    None,
    /// A Parse of this server-side statement.
    Prepares(Box<str>),
    /// A Parse of the unnamed statement (the client's, or one spillway injected).
    PreparesUnnamed,
    /// A Close that made room (the statement was held before).
    Evicts(Box<str>),
}

/// The server connection's unnamed statement, as far as this lease knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unnamed {
    /// Whatever the connection's last lessee left: not the client's.
    Foreign,
    /// None (a simple Query or a Close removed it).
    Empty,
    /// The client's current one.
    Ours,
}

/// One session's side: its named statements, its unnamed one, and what is in flight
/// on the connection it leases now.
#[derive(Debug)]
pub struct Translator {
    /// aHash: looked up at every Bind of a named statement.
    named: ahash::AHashMap<String, Arc<Def>>,
    /// The client's unnamed statement's Parse, as sent (empty: none); the buffer is
    /// reused from one Parse to the next.
    unnamed: Vec<u8>,
    server_unnamed: Unnamed,
    /// Statements a connection may hold; 0: no limit.
    limit: usize,
    /// Parse and Close sent, oldest first, awaiting their answers.
    sent: VecDeque<Sent>,
    /// ReadyForQuery-bearing messages sent / ReadyForQuery received in this lease.
    cycles_sent: u64,
    cycles_done: u64,
    /// PostgreSQL raised an error in this cycle: it skips everything up to its Sync.
    failed: Option<u64>,
    /// Statements prepared on connections by injection, for the metric.
    injected: u64,
    /// [`Translator::translate`]'s buffer for a queue it rewrites (the queue's old
    /// buffer after a rewrite), kept between calls.
    scratch: BytesMut,
}

impl Translator {
    /// `limit`: statements one server connection may hold (0: no limit).
    pub fn new(limit: usize) -> Self {
        Self {
            named: ahash::AHashMap::new(),
            unnamed: Vec::new(),
            server_unnamed: Unnamed::Foreign,
            limit,
            sent: VecDeque::new(),
            cycles_sent: 0,
            cycles_done: 0,
            failed: None,
            injected: 0,
            scratch: BytesMut::new(),
        }
    }

    /// How many named statements the client has.
    pub fn client_statements(&self) -> usize {
        self.named.len()
    }

    /// Statements injected so far (taken: the count restarts).
    pub fn take_injected(&mut self) -> u64 {
        std::mem::take(&mut self.injected)
    }

    /// A new lease begins: nothing in flight, the connection's unnamed statement is
    /// not the client's.
    pub fn start_lease(&mut self) {
        self.sent.clear();
        self.cycles_sent = 0;
        self.cycles_done = 0;
        self.failed = None;
        self.server_unnamed = Unnamed::Foreign;
    }

    /// Whether every answer to what was sent in this lease arrived.
    pub fn is_quiet(&self) -> bool {
        self.sent.is_empty() && self.cycles_sent == self.cycles_done
    }

    /// The lease ends. If answers are still owed (never, when the session saw the
    /// connection idle) the connection's state is unknown: it forgets everything.
    pub fn end_lease(&mut self, server: &mut ServerStatements) {
        if !self.is_quiet() {
            tracing::debug!(
                owed = self.sent.len(),
                "lease ended with answers owed; the connection forgets its statements"
            );
            server.clear();
        }
        self.start_lease();
    }

    /// Rewrites the whole frontend messages in `buf` from byte `from` on for the
    /// leased connection `server` (bytes before `from` were rewritten already), and
    /// returns where the rewritten bytes end. A partial message at the end stays as
    /// it is, for the next call.
    ///
    /// Messages that go as they are stay where they are: when nothing changes (the
    /// unnamed statement's cycle, a Sync, an Execute) no byte is copied. When
    /// something does, the queue is written once into a second buffer (unchanged
    /// runs and rewritten messages in order), and the two buffers swap.
    pub fn translate(
        &mut self,
        buf: &mut BytesMut,
        from: usize,
        server: &mut ServerStatements,
    ) -> usize {
        let from = from.min(buf.len());
        let mut w = Rewrite {
            src: &buf[..],
            out: None,
            spare: std::mem::take(&mut self.scratch),
            copied: 0,
            at: from,
        };
        loop {
            let rest = &w.src[w.at..];
            if rest.len() < Header::SIZE {
                break;
            }
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            let total = len.saturating_add(1);
            if len < 4 || rest.len() < total {
                break;
            }
            let src = w.src;
            let msg = &src[w.at..w.at + total];
            if !self.message(msg, &mut w, server) {
                // Replaced by what was written: the original is skipped.
                w.copied = w.at + total;
            }
            w.at += total;
        }
        let Rewrite {
            out,
            spare,
            copied,
            at,
            ..
        } = w;
        let Some(mut out) = out else {
            self.scratch = spare;
            return at;
        };
        out.extend_from_slice(&buf[copied..at]);
        let end = out.len();
        out.extend_from_slice(&buf[at..]);
        std::mem::swap(buf, &mut out);
        // `out` is the queue's old buffer now: the scratch for the next rewrite.
        out.clear();
        if out.capacity() <= SCRATCH_KEEP {
            self.scratch = out;
        }
        end
    }

    /// One frontend message toward the server: true if it goes as it is (after
    /// whatever was written into `w` for it), false if what was written replaces it.
    fn message(&mut self, msg: &[u8], w: &mut Rewrite<'_>, server: &mut ServerStatements) -> bool {
        let cycle = self.cycles_sent;
        if self.failed == Some(cycle) {
            // PostgreSQL skips it (an error earlier in the cycle): as it is.
            if matches!(msg[0], SYNC | QUERY | FUNCTION_CALL) {
                self.cycles_sent += 1;
            }
            return true;
        }
        let body = frontend::body(msg);
        match msg[0] {
            PARSE => self.parse(msg, body, w, server),
            frontend::BIND => self.bind(body, w, server),
            DESCRIBE => match frontend::target(body) {
                Some(t) if t.kind == b'S' => self.statement_use(t.name, w, server, |name, out| {
                    write_target(out, DESCRIBE, b'S', name);
                }),
                _ => true,
            },
            CLOSE => self.close(body, w),
            QUERY => {
                self.cycles_sent += 1;
                self.unnamed.clear();
                self.server_unnamed = Unnamed::Empty;
                if let Some(sql) = frontend::query(body) {
                    let lower = sql.to_ascii_lowercase();
                    if lower.contains("discard") || lower.contains("deallocate") {
                        // It may have dropped statements the connection held: parsed
                        // again when next needed.
                        server.clear();
                    }
                    let exact = lower.trim().trim_end_matches(';').trim_end();
                    if matches!(
                        exact,
                        "discard all" | "deallocate all" | "deallocate prepare all"
                    ) {
                        self.named.clear();
                    }
                }
                true
            }
            SYNC | FUNCTION_CALL => {
                self.cycles_sent += 1;
                true
            }
            _ => true,
        }
    }

    fn parse(
        &mut self,
        msg: &[u8],
        body: &[u8],
        w: &mut Rewrite<'_>,
        server: &mut ServerStatements,
    ) -> bool {
        let cycle = self.cycles_sent;
        if body.first() == Some(&0) && msg == &self.unnamed[..] {
            // The client's last unnamed statement again, byte for byte (read then).
            self.server_unnamed = Unnamed::Ours;
            self.expect(b'1', Reply::Pass, Effect::PreparesUnnamed);
            return true;
        }
        let Some(p) = frontend::parse(body) else {
            // Malformed: PostgreSQL says so, as it would directly.
            self.expect(b'1', Reply::Pass, Effect::None);
            return true;
        };
        if p.name.is_empty() {
            self.unnamed.clear();
            self.unnamed.extend_from_slice(msg);
            self.server_unnamed = Unnamed::Ours;
            self.expect(b'1', Reply::Pass, Effect::PreparesUnnamed);
            return true;
        }
        let def = Def::new(p.sql, p.param_types);
        self.named.insert(p.name.to_owned(), def.clone());
        if server.touch_if_usable(&def.server_name, cycle) {
            write_target(w.out(), CLOSE, b'S', NOWHERE);
            self.expect(b'3', Reply::AsParseComplete, Effect::None);
        } else {
            self.prepare(&def, Reply::Pass, w, server);
        }
        false
    }

    fn bind(&mut self, body: &[u8], w: &mut Rewrite<'_>, server: &mut ServerStatements) -> bool {
        // The names only: the parameters go as they are (PostgreSQL reads them).
        let Some((portal, statement, rest)) = frontend::bind_names(body) else {
            return true;
        };
        self.statement_use(statement, w, server, |name, out| {
            let len = 4 + portal.len() + 1 + name.len() + 1 + rest.len();
            out.put_u8(frontend::BIND);
            out.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
            put_cstr(out, portal);
            put_cstr(out, name);
            out.extend_from_slice(rest);
        })
    }

    /// A Bind or a Describe uses statement `name`: for a client statement, make sure
    /// the connection holds it and write the message (`write`) under its server name
    /// (false: that replaces the client's); for the unnamed one, make the
    /// connection's the client's. For the unnamed statement or an unknown name the
    /// message goes as it is (true).
    fn statement_use(
        &mut self,
        name: &str,
        w: &mut Rewrite<'_>,
        server: &mut ServerStatements,
        write: impl FnOnce(&str, &mut BytesMut),
    ) -> bool {
        if name.is_empty() {
            match (self.unnamed.is_empty(), self.server_unnamed) {
                (_, Unnamed::Ours) => {}
                (false, _) => {
                    w.out().extend_from_slice(&self.unnamed);
                    self.expect(b'1', Reply::Swallow, Effect::PreparesUnnamed);
                    self.server_unnamed = Unnamed::Ours;
                }
                (true, Unnamed::Foreign) => {
                    write_target(w.out(), CLOSE, b'S', "");
                    self.expect(b'3', Reply::Swallow, Effect::None);
                    self.server_unnamed = Unnamed::Empty;
                }
                (true, Unnamed::Empty) => {}
            }
            return true;
        }
        let Some(def) = self.named.get(name) else {
            return true;
        };
        // One lookup on the connection's side when it holds the statement (the usual
        // case); the definition is cloned only to prepare it.
        if server.touch_if_usable(&def.server_name, self.cycles_sent) {
            write(&def.server_name, w.out());
        } else {
            let def = def.clone();
            self.prepare(&def, Reply::Swallow, w, server);
            write(&def.server_name, w.out());
        }
        false
    }

    /// Prepares `def` on the connection: room first (the least recently used
    /// statement closed), then a Close of its name (its state may be uncertain) and
    /// its Parse, answered with `reply`.
    fn prepare(
        &mut self,
        def: &Def,
        reply: Reply,
        w: &mut Rewrite<'_>,
        server: &mut ServerStatements,
    ) {
        let cycle = self.cycles_sent;
        let out = w.out();
        let known = server.held.contains_key(&def.server_name);
        if !known
            && self.limit > 0
            && server.len() >= self.limit
            && let Some(victim) = server.victim(&def.server_name)
        {
            server.held.remove(&victim);
            write_target(out, CLOSE, b'S', &victim);
            self.expect(b'3', Reply::Swallow, Effect::Evicts(victim));
        }
        if known {
            // Its Parse went in an earlier cycle whose outcome is not known yet.
            write_target(out, CLOSE, b'S', &def.server_name);
            self.expect(b'3', Reply::Swallow, Effect::None);
        }
        out.extend_from_slice(&def.parse);
        server.pending(&def.server_name, cycle);
        self.expect(b'1', reply, Effect::Prepares(def.server_name.clone()));
        if reply == Reply::Swallow {
            self.injected += 1;
        }
    }

    fn close(&mut self, body: &[u8], w: &mut Rewrite<'_>) -> bool {
        let keep = match frontend::target(body) {
            Some(t) if t.kind == b'S' && t.name.is_empty() => {
                self.unnamed.clear();
                self.server_unnamed = Unnamed::Empty;
                true
            }
            Some(t) if t.kind == b'S' && self.named.remove(t.name).is_some() => {
                // The connection keeps its copy for whoever needs it next.
                write_target(w.out(), CLOSE, b'S', NOWHERE);
                false
            }
            _ => true,
        };
        self.expect(b'3', Reply::Pass, Effect::None);
        keep
    }

    fn expect(&mut self, answer: u8, reply: Reply, effect: Effect) {
        self.sent.push_back(Sent {
            cycle: self.cycles_sent,
            answer,
            reply,
            effect,
        });
    }

    /// A backend message of type `tag` arrived from the leased connection.
    pub fn on_backend(&mut self, tag: u8, server: &mut ServerStatements) -> Reply {
        match tag {
            b'1' | b'3' => {
                let Some(sent) = self.sent.pop_front() else {
                    return Reply::Pass;
                };
                if sent.answer != tag {
                    // Not what was sent: stop guessing (the connection forgets what it
                    // held, so everything is prepared again where needed).
                    tracing::warn!(
                        got = %char::from(tag),
                        expected = %char::from(sent.answer),
                        "unexpected answer on a pooled connection; its statements are forgotten"
                    );
                    self.sent.clear();
                    server.clear();
                    return Reply::Pass;
                }
                if let Effect::Prepares(name) = &sent.effect
                    && let Some(e) = server.held.get_mut(name)
                    && e.slot == Slot::Pending(sent.cycle)
                {
                    e.slot = Slot::Held;
                }
                sent.reply
            }
            b'E' => {
                let cycle = self.cycles_done;
                self.failed = Some(cycle);
                while self.sent.front().is_some_and(|s| s.cycle == cycle) {
                    if let Some(skipped) = self.sent.pop_front() {
                        self.skipped(skipped, server);
                    }
                }
                Reply::Pass
            }
            b'Z' => {
                self.cycles_done += 1;
                // Anything of a finished cycle still queued was skipped.
                while self
                    .sent
                    .front()
                    .is_some_and(|s| s.cycle < self.cycles_done)
                {
                    if let Some(skipped) = self.sent.pop_front() {
                        self.skipped(skipped, server);
                    }
                }
                Reply::Pass
            }
            _ => Reply::Pass,
        }
    }

    /// PostgreSQL skipped `sent` (an error earlier in its cycle).
    fn skipped(&mut self, sent: Sent, server: &mut ServerStatements) {
        match sent.effect {
            Effect::Prepares(name) => {
                if server
                    .held
                    .get(&name)
                    .is_some_and(|e| e.slot == Slot::Pending(sent.cycle))
                {
                    server.held.remove(&name);
                }
            }
            Effect::PreparesUnnamed => self.server_unnamed = Unnamed::Foreign,
            Effect::Evicts(name) => {
                // Not closed after all: still held.
                server.clock += 1;
                let used = server.clock;
                server.held.entry(name).or_insert(Entry {
                    slot: Slot::Held,
                    used,
                });
            }
            Effect::None => {}
        }
    }
}
