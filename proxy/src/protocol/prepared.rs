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
//! - The unnamed statement is the client's own too: a lease starts with a server
//!   connection whose unnamed statement is someone else's, so a Bind or Describe of
//!   the unnamed statement before any Parse of it in this lease re-parses the client's
//!   last one there (or closes the foreign one, so that PostgreSQL's error is the
//!   client's).
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
//! - Simple-protocol `PREPARE`/`EXECUTE` are not handled here (they pin the session,
//!   `session/lease.rs`); `DISCARD ALL`/`DEALLOCATE` in a simple Query make the
//!   connection forget what it held.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::{Arc, OnceLock};

use bytes::{BufMut, Bytes, BytesMut};

use super::frame::Header;
use super::frontend::{self, CLOSE, DESCRIBE, FUNCTION_CALL, PARSE, QUERY, SYNC};

/// A statement name that never exists on a server connection: closing it is a no-op
/// PostgreSQL answers with CloseComplete.
const NOWHERE: &str = "sw_none";

/// A scratch buffer larger than this (one large message went through) is not kept.
const SCRATCH_KEEP: usize = 64 * 1024;

/// Prefix of server-side statement names.
const PREFIX: &str = "sw_";

/// A statement a client prepared, as it is known on server connections.
#[derive(Debug)]
pub struct Def {
    /// The server-side name (`sw_` + 32 hex digits); empty for the unnamed statement.
    pub server_name: Box<str>,
    /// The Parse message that prepares it on a server connection, under
    /// `server_name`.
    pub parse: Bytes,
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

/// What a statement's Parse sent on this connection will make it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// PostgreSQL confirmed it.
    Held,
    /// Its Parse went in cycle `n`, not confirmed yet.
    Pending(u64),
}

#[derive(Debug)]
struct Entry {
    slot: Slot,
    /// Last use, for eviction (the connection's clock).
    used: u64,
}

/// The statements one server connection holds under spillway's names. It travels
/// with the connection between leases.
#[derive(Debug, Default)]
pub struct ServerStatements {
    held: HashMap<Box<str>, Entry>,
    clock: u64,
}

impl ServerStatements {
    /// How many statements the connection holds or is preparing.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// The connection holds none of spillway's statements any more (`DISCARD ALL`).
    pub fn clear(&mut self) {
        self.held.clear();
    }

    /// Whether `name` may be used by a message sent now, in cycle `cycle`.
    fn usable(&self, name: &str, cycle: u64) -> bool {
        self.held
            .get(name)
            .is_some_and(|e| e.slot == Slot::Held || e.slot == Slot::Pending(cycle))
    }

    fn touch(&mut self, name: &str) {
        self.clock += 1;
        if let Some(e) = self.held.get_mut(name) {
            e.used = self.clock;
        }
    }

    fn pending(&mut self, name: &str, cycle: u64) {
        self.clock += 1;
        self.held.insert(
            name.into(),
            Entry {
                slot: Slot::Pending(cycle),
                used: self.clock,
            },
        );
    }

    /// The least recently used statement PostgreSQL confirmed, other than `keep`.
    fn victim(&self, keep: &str) -> Option<Box<str>> {
        self.held
            .iter()
            .filter(|(name, e)| e.slot == Slot::Held && &***name != keep)
            .min_by_key(|(_, e)| e.used)
            .map(|(name, _)| name.clone())
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
    named: HashMap<String, Arc<Def>>,
    unnamed: Option<Bytes>,
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
    /// [`Translator::translate`]'s copy of the bytes it rewrites.
    scratch: Vec<u8>,
}

impl Translator {
    /// `limit`: statements one server connection may hold (0: no limit).
    pub fn new(limit: usize) -> Self {
        Self {
            named: HashMap::new(),
            unnamed: None,
            server_unnamed: Unnamed::Foreign,
            limit,
            sent: VecDeque::new(),
            cycles_sent: 0,
            cycles_done: 0,
            failed: None,
            injected: 0,
            scratch: Vec::new(),
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
    pub fn translate(
        &mut self,
        buf: &mut BytesMut,
        from: usize,
        server: &mut ServerStatements,
    ) -> usize {
        let from = from.min(buf.len());
        if from == buf.len() {
            return from;
        }
        // The new bytes move to a scratch buffer (kept between calls) and come back
        // rewritten.
        let mut input = std::mem::take(&mut self.scratch);
        input.clear();
        input.extend_from_slice(&buf[from..]);
        buf.truncate(from);
        let mut rest = &input[..];
        while rest.len() >= Header::SIZE {
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            let total = len.saturating_add(1);
            if len < 4 || rest.len() < total {
                break;
            }
            let (msg, tail) = rest.split_at(total);
            self.message(msg, buf, server);
            rest = tail;
        }
        let end = buf.len();
        buf.extend_from_slice(rest);
        if input.capacity() > SCRATCH_KEEP {
            input = Vec::new();
        }
        self.scratch = input;
        end
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
                        let server_name = server_name(p.sql, p.param_types);
                        self.named.insert(
                            p.name.to_owned(),
                            Arc::new(Def {
                                parse: parse_message(&server_name, p.sql, p.param_types),
                                server_name: server_name.into(),
                            }),
                        );
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

    /// One frontend message toward the server.
    fn message(&mut self, msg: &[u8], out: &mut BytesMut, server: &mut ServerStatements) {
        let cycle = self.cycles_sent;
        if self.failed == Some(cycle) {
            // PostgreSQL skips it (an error earlier in the cycle): as it is.
            out.extend_from_slice(msg);
            if matches!(msg[0], SYNC | QUERY | FUNCTION_CALL) {
                self.cycles_sent += 1;
            }
            return;
        }
        let body = frontend::body(msg);
        match msg[0] {
            PARSE => self.parse(msg, body, out, server),
            frontend::BIND => self.bind(msg, body, out, server),
            DESCRIBE => match frontend::target(body) {
                Some(t) if t.kind == b'S' => {
                    self.statement_use(t.name, out, server, |name, out| {
                        write_target(out, DESCRIBE, b'S', name);
                    });
                    if t.name.is_empty() || !self.named.contains_key(t.name) {
                        out.extend_from_slice(msg);
                    }
                }
                _ => out.extend_from_slice(msg),
            },
            CLOSE => self.close(msg, body, out),
            QUERY => {
                self.cycles_sent += 1;
                self.unnamed = None;
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
                out.extend_from_slice(msg);
            }
            SYNC | FUNCTION_CALL => {
                self.cycles_sent += 1;
                out.extend_from_slice(msg);
            }
            _ => out.extend_from_slice(msg),
        }
    }

    fn parse(
        &mut self,
        msg: &[u8],
        body: &[u8],
        out: &mut BytesMut,
        server: &mut ServerStatements,
    ) {
        let cycle = self.cycles_sent;
        let Some(p) = frontend::parse(body) else {
            // Malformed: PostgreSQL says so, as it would directly.
            out.extend_from_slice(msg);
            self.expect(b'1', Reply::Pass, Effect::None);
            return;
        };
        if p.name.is_empty() {
            self.unnamed = Some(Bytes::copy_from_slice(msg));
            self.server_unnamed = Unnamed::Ours;
            out.extend_from_slice(msg);
            self.expect(b'1', Reply::Pass, Effect::PreparesUnnamed);
            return;
        }
        let server_name = server_name(p.sql, p.param_types);
        let def = Arc::new(Def {
            parse: parse_message(&server_name, p.sql, p.param_types),
            server_name: server_name.into(),
        });
        self.named.insert(p.name.to_owned(), def.clone());
        if server.usable(&def.server_name, cycle) {
            server.touch(&def.server_name);
            write_target(out, CLOSE, b'S', NOWHERE);
            self.expect(b'3', Reply::AsParseComplete, Effect::None);
        } else {
            self.prepare(&def, Reply::Pass, out, server);
        }
    }

    fn bind(&mut self, msg: &[u8], body: &[u8], out: &mut BytesMut, server: &mut ServerStatements) {
        let Some(b) = frontend::bind(body) else {
            out.extend_from_slice(msg);
            return;
        };
        let rest = &body[b.portal.len() + 1 + b.statement.len() + 1..];
        let portal = b.portal;
        self.statement_use(b.statement, out, server, |name, out| {
            let len = 4 + portal.len() + 1 + name.len() + 1 + rest.len();
            out.put_u8(frontend::BIND);
            out.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
            put_cstr(out, portal);
            put_cstr(out, name);
            out.extend_from_slice(rest);
        });
        if b.statement.is_empty() || !self.named.contains_key(b.statement) {
            out.extend_from_slice(msg);
        }
    }

    /// A Bind or a Describe uses statement `name`: for a client statement, make sure
    /// the connection holds it and write the message (`write`) under its server name;
    /// for the unnamed one, make the connection's the client's. Writes nothing for the
    /// unnamed statement or an unknown name (the caller sends the message as it is).
    fn statement_use(
        &mut self,
        name: &str,
        out: &mut BytesMut,
        server: &mut ServerStatements,
        write: impl FnOnce(&str, &mut BytesMut),
    ) {
        if name.is_empty() {
            match (&self.unnamed, self.server_unnamed) {
                (_, Unnamed::Ours) => {}
                (Some(parse), _) => {
                    let parse = parse.clone();
                    out.extend_from_slice(&parse);
                    self.expect(b'1', Reply::Swallow, Effect::PreparesUnnamed);
                    self.server_unnamed = Unnamed::Ours;
                }
                (None, Unnamed::Foreign) => {
                    write_target(out, CLOSE, b'S', "");
                    self.expect(b'3', Reply::Swallow, Effect::None);
                    self.server_unnamed = Unnamed::Empty;
                }
                (None, Unnamed::Empty) => {}
            }
            return;
        }
        let Some(def) = self.named.get(name).cloned() else {
            return;
        };
        if server.usable(&def.server_name, self.cycles_sent) {
            server.touch(&def.server_name);
        } else {
            self.prepare(&def, Reply::Swallow, out, server);
        }
        write(&def.server_name, out);
    }

    /// Prepares `def` on the connection: room first (the least recently used
    /// statement closed), then a Close of its name (its state may be uncertain) and
    /// its Parse, answered with `reply`.
    fn prepare(
        &mut self,
        def: &Def,
        reply: Reply,
        out: &mut BytesMut,
        server: &mut ServerStatements,
    ) {
        let cycle = self.cycles_sent;
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

    fn close(&mut self, msg: &[u8], body: &[u8], out: &mut BytesMut) {
        match frontend::target(body) {
            Some(t) if t.kind == b'S' && t.name.is_empty() => {
                self.unnamed = None;
                self.server_unnamed = Unnamed::Empty;
                out.extend_from_slice(msg);
            }
            Some(t) if t.kind == b'S' && self.named.remove(t.name).is_some() => {
                // The connection keeps its copy for whoever needs it next.
                write_target(out, CLOSE, b'S', NOWHERE);
            }
            _ => out.extend_from_slice(msg),
        }
        self.expect(b'3', Reply::Pass, Effect::None);
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

/// The server-side name of a statement: `sw_` and a 128-bit hash of its text and
/// parameter types, keyed per process (a client cannot aim a collision at another's
/// statement).
pub fn server_name(sql: &str, param_types: &[u8]) -> String {
    static KEYS: OnceLock<(RandomState, RandomState)> = OnceLock::new();
    let (a, b) = KEYS.get_or_init(|| (RandomState::new(), RandomState::new()));
    let hash = |state: &RandomState| {
        let mut h = state.build_hasher();
        h.write(sql.as_bytes());
        h.write_u8(0xff);
        h.write(param_types);
        h.finish()
    };
    format!("{PREFIX}{:016x}{:016x}", hash(a), hash(b))
}

/// A Parse of `name` with `sql` and the raw parameter types.
fn parse_message(name: &str, sql: &str, param_types: &[u8]) -> Bytes {
    let len = 4 + name.len() + 1 + sql.len() + 1 + 2 + param_types.len();
    let mut m = BytesMut::with_capacity(1 + len);
    m.put_u8(PARSE);
    m.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    put_cstr(&mut m, name);
    put_cstr(&mut m, sql);
    m.put_u16(u16::try_from(param_types.len() / 4).unwrap_or(u16::MAX));
    m.extend_from_slice(param_types);
    m.freeze()
}

/// A Describe or Close (`tag`) of `kind` (`S` or `P`) `name`.
fn write_target(out: &mut BytesMut, tag: u8, kind: u8, name: &str) {
    out.put_u8(tag);
    out.put_u32(u32::try_from(4 + 1 + name.len() + 1).unwrap_or(u32::MAX));
    out.put_u8(kind);
    put_cstr(out, name);
}

fn put_cstr(out: &mut BytesMut, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.put_u8(0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frontend::build;

    /// The messages in `bytes`, each as (tag, readable summary).
    fn messages(bytes: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while rest.len() >= 5 {
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            let (msg, tail) = rest.split_at(len + 1);
            let body = frontend::body(msg);
            let s = match msg[0] {
                PARSE => {
                    let p = frontend::parse(body).expect("parse");
                    format!("P {} {}", short(p.name), p.sql)
                }
                frontend::BIND => {
                    let b = frontend::bind(body).expect("bind");
                    format!("B {} {}", b.portal, short(b.statement))
                }
                DESCRIBE | CLOSE => {
                    let t = frontend::target(body).expect("target");
                    format!(
                        "{} {} {}",
                        char::from(msg[0]),
                        char::from(t.kind),
                        short(t.name)
                    )
                }
                tag => char::from(tag).to_string(),
            };
            out.push(s);
            rest = tail;
        }
        out
    }

    /// Server names shortened to `sw` (they are random per process).
    fn short(name: &str) -> &str {
        if name.starts_with(PREFIX) && name != NOWHERE {
            "sw"
        } else {
            name
        }
    }

    fn send(t: &mut Translator, s: &mut ServerStatements, msgs: &[Vec<u8>]) -> Vec<String> {
        let mut buf = BytesMut::new();
        for m in msgs {
            buf.extend_from_slice(m);
        }
        t.translate(&mut buf, 0, s);
        messages(&buf)
    }

    fn target(tag: u8, kind: u8, name: &str) -> Vec<u8> {
        let mut b = BytesMut::new();
        write_target(&mut b, tag, kind, name);
        b.to_vec()
    }

    const SYNC_MSG: &[u8] = b"S\0\0\0\x04";

    fn replies(t: &mut Translator, s: &mut ServerStatements, tags: &[u8]) -> Vec<Reply> {
        tags.iter().map(|&tag| t.on_backend(tag, s)).collect()
    }

    #[test]
    fn a_statement_is_prepared_once_per_connection_and_shared() {
        let mut server = ServerStatements::default();
        let mut a = Translator::new(0);
        a.start_lease();
        let sent = send(
            &mut a,
            &mut server,
            &[
                build::parse("s1", "SELECT $1", &[23]),
                build::bind("", "s1", &[Some(b"1")], &[]),
                build::execute("", 0),
                SYNC_MSG.to_vec(),
            ],
        );
        assert_eq!(sent, ["P sw SELECT $1", "B  sw", "E", "S"]);
        assert_eq!(
            replies(&mut a, &mut server, b"12DCZ"),
            [Reply::Pass; 5],
            "the client's own Parse is answered to the client"
        );
        assert!(a.is_quiet());
        a.end_lease(&mut server);

        // Another client, same statement under another name, same connection: no
        // second parse, and its ParseComplete comes in order from a no-op Close.
        let mut b = Translator::new(0);
        b.start_lease();
        let sent = send(
            &mut b,
            &mut server,
            &[
                build::parse("other", "SELECT $1", &[23]),
                target(DESCRIBE, b'S', "other"),
                SYNC_MSG.to_vec(),
            ],
        );
        assert_eq!(sent, ["C S sw_none", "D S sw", "S"]);
        assert_eq!(
            replies(&mut b, &mut server, b"3tTZ"),
            [
                Reply::AsParseComplete,
                Reply::Pass,
                Reply::Pass,
                Reply::Pass
            ]
        );
        // Closing it forgets the client's name only.
        let sent = send(
            &mut b,
            &mut server,
            &[target(CLOSE, b'S', "other"), SYNC_MSG.to_vec()],
        );
        assert_eq!(sent, ["C S sw_none", "S"]);
        assert_eq!(replies(&mut b, &mut server, b"3Z"), [Reply::Pass; 2]);
        assert_eq!(server.len(), 1);
        assert_eq!(b.client_statements(), 0);
    }

    #[test]
    fn a_connection_lacking_the_statement_gets_it_injected_before_use() {
        let mut t = Translator::new(0);
        let mut first = ServerStatements::default();
        t.start_lease();
        send(
            &mut t,
            &mut first,
            &[build::parse("s1", "SELECT 1", &[]), SYNC_MSG.to_vec()],
        );
        replies(&mut t, &mut first, b"1Z");
        t.end_lease(&mut first);
        // The next lease is on another connection.
        let mut second = ServerStatements::default();
        t.start_lease();
        let sent = send(
            &mut t,
            &mut second,
            &[
                build::bind("", "s1", &[], &[]),
                build::execute("", 0),
                SYNC_MSG.to_vec(),
                build::bind("", "s1", &[], &[]),
                build::execute("", 0),
                SYNC_MSG.to_vec(),
            ],
        );
        // No Close for a statement the connection never had. The second cycle went
        // before the first was answered: whether the first Parse ran is not known
        // yet (an error earlier in its cycle would skip it), so it is closed and
        // parsed again.
        assert_eq!(
            sent,
            [
                "P sw SELECT 1",
                "B  sw",
                "E",
                "S",
                "C S sw",
                "P sw SELECT 1",
                "B  sw",
                "E",
                "S"
            ],
        );
        use Reply::{Pass, Swallow};
        assert_eq!(
            replies(&mut t, &mut second, b"12DCZ312DCZ"),
            [
                Swallow, Pass, Pass, Pass, Pass, Swallow, Swallow, Pass, Pass, Pass, Pass
            ]
        );
        assert!(t.is_quiet());
        assert_eq!(t.take_injected(), 2);
        // Once confirmed, it is used as it is.
        let sent = send(
            &mut t,
            &mut second,
            &[build::bind("", "s1", &[], &[]), SYNC_MSG.to_vec()],
        );
        assert_eq!(sent, ["B  sw", "S"]);
    }

    #[test]
    fn an_error_before_an_injected_parse_leaves_the_statement_unheld() {
        let mut t = Translator::new(0);
        let mut server = ServerStatements::default();
        t.start_lease();
        send(
            &mut t,
            &mut server,
            &[build::parse("s1", "SELECT 1", &[]), SYNC_MSG.to_vec()],
        );
        replies(&mut t, &mut server, b"1Z");
        t.end_lease(&mut server);
        let mut other = ServerStatements::default();
        t.start_lease();
        // A failing Execute of an unnamed statement, then the Bind of s1 in the
        // same cycle: PostgreSQL skips the injected Parse.
        let sent = send(
            &mut t,
            &mut other,
            &[
                build::parse("", "SELECT 1/0", &[]),
                build::bind("", "", &[], &[]),
                build::execute("", 0),
                build::bind("p", "s1", &[], &[]),
                build::execute("p", 0),
                SYNC_MSG.to_vec(),
            ],
        );
        assert_eq!(
            sent,
            [
                "P  SELECT 1/0",
                "B  ",
                "E",
                "P sw SELECT 1",
                "B p sw",
                "E",
                "S"
            ]
        );
        assert_eq!(replies(&mut t, &mut other, b"12EZ"), [Reply::Pass; 4]);
        assert!(t.is_quiet());
        assert!(other.is_empty(), "the skipped Parse prepared nothing");
        // The next use prepares it (no Close needed).
        let sent = send(
            &mut t,
            &mut other,
            &[build::bind("", "s1", &[], &[]), SYNC_MSG.to_vec()],
        );
        assert_eq!(sent, ["P sw SELECT 1", "B  sw", "S"]);
    }

    #[test]
    fn what_goes_into_a_failed_cycle_is_passed_as_is() {
        let mut t = Translator::new(0);
        let mut server = ServerStatements::default();
        t.start_lease();
        send(&mut t, &mut server, &[build::parse("", "SELEC", &[])]);
        assert_eq!(replies(&mut t, &mut server, b"E"), [Reply::Pass]);
        let sent = send(
            &mut t,
            &mut server,
            &[build::parse("s1", "SELECT 1", &[]), SYNC_MSG.to_vec()],
        );
        assert_eq!(sent, ["P s1 SELECT 1", "S"], "skipped by PostgreSQL");
        assert_eq!(replies(&mut t, &mut server, b"Z"), [Reply::Pass]);
        assert!(t.is_quiet());
        assert_eq!(t.client_statements(), 0);
    }

    #[test]
    fn the_least_recently_used_statement_makes_room() {
        let mut t = Translator::new(2);
        let mut server = ServerStatements::default();
        t.start_lease();
        for (name, sql) in [("a", "SELECT 1"), ("b", "SELECT 2")] {
            send(
                &mut t,
                &mut server,
                &[build::parse(name, sql, &[]), SYNC_MSG.to_vec()],
            );
            replies(&mut t, &mut server, b"1Z");
        }
        send(
            &mut t,
            &mut server,
            &[build::bind("", "a", &[], &[]), SYNC_MSG.to_vec()],
        );
        replies(&mut t, &mut server, b"2Z");
        let sent = send(
            &mut t,
            &mut server,
            &[build::parse("c", "SELECT 3", &[]), SYNC_MSG.to_vec()],
        );
        assert_eq!(sent, ["C S sw", "P sw SELECT 3", "S"]);
        assert_eq!(
            replies(&mut t, &mut server, b"31Z"),
            [Reply::Swallow, Reply::Pass, Reply::Pass]
        );
        assert_eq!(server.len(), 2);
        // `b` was closed: its next use prepares it again (and closes `a`, now the
        // least recently used).
        let sent = send(
            &mut t,
            &mut server,
            &[build::bind("", "b", &[], &[]), SYNC_MSG.to_vec()],
        );
        assert_eq!(sent, ["C S sw", "P sw SELECT 2", "B  sw", "S"]);
    }

    #[test]
    fn the_unnamed_statement_of_a_previous_lessee_is_never_used() {
        let mut t = Translator::new(0);
        let mut server = ServerStatements::default();
        t.start_lease();
        send(
            &mut t,
            &mut server,
            &[build::parse("", "SELECT 1", &[]), SYNC_MSG.to_vec()],
        );
        replies(&mut t, &mut server, b"1Z");
        t.end_lease(&mut server);
        t.start_lease();
        let sent = send(
            &mut t,
            &mut server,
            &[build::bind("", "", &[], &[]), SYNC_MSG.to_vec()],
        );
        assert_eq!(
            sent,
            ["P  SELECT 1", "B  ", "S"],
            "the client's, parsed again"
        );
        assert_eq!(
            replies(&mut t, &mut server, b"12Z"),
            [Reply::Swallow, Reply::Pass, Reply::Pass]
        );
        // After a simple Query the client has none: a foreign one is closed first.
        send(&mut t, &mut server, &[frontend::query_message("SELECT 2")]);
        replies(&mut t, &mut server, b"Z");
        t.end_lease(&mut server);
        t.start_lease();
        let sent = send(
            &mut t,
            &mut server,
            &[build::bind("", "", &[], &[]), SYNC_MSG.to_vec()],
        );
        assert_eq!(sent, ["C S ", "B  ", "S"]);
    }

    #[test]
    fn discard_all_forgets_the_connections_statements_and_the_clients() {
        let mut t = Translator::new(0);
        let mut server = ServerStatements::default();
        t.start_lease();
        send(
            &mut t,
            &mut server,
            &[build::parse("s1", "SELECT 1", &[]), SYNC_MSG.to_vec()],
        );
        replies(&mut t, &mut server, b"1Z");
        send(
            &mut t,
            &mut server,
            &[frontend::query_message("DISCARD ALL;")],
        );
        assert!(server.is_empty());
        assert_eq!(t.client_statements(), 0);
    }

    #[test]
    fn prepares_and_closes_alone_are_answered_without_a_server() {
        let mut t = Translator::new(0);
        let mut queue = BytesMut::new();
        queue.extend_from_slice(&build::parse("s1", "SELECT 1", &[]));
        queue.extend_from_slice(SYNC_MSG);
        let answers = t.answer_without_server(&mut queue).expect("local");
        assert_eq!(answers, b"1\0\0\0\x04Z\0\0\0\x05I");
        assert!(queue.is_empty());
        assert_eq!(t.client_statements(), 1);
        // Bound later on a connection: prepared there first.
        let mut server = ServerStatements::default();
        t.start_lease();
        let sent = send(
            &mut t,
            &mut server,
            &[build::bind("", "s1", &[], &[]), SYNC_MSG.to_vec()],
        );
        assert_eq!(sent, ["P sw SELECT 1", "B  sw", "S"]);
        replies(&mut t, &mut server, b"12Z");
        t.end_lease(&mut server);
        // A Close and its Sync: no server either.
        let mut queue = BytesMut::from(&target(CLOSE, b'S', "s1")[..]);
        queue.extend_from_slice(SYNC_MSG);
        assert!(t.answer_without_server(&mut queue).is_some());
        assert_eq!(t.client_statements(), 0);
        // Anything else, or no Sync at the end, needs the server.
        for msgs in [
            vec![build::parse("s2", "SELECT 2", &[])],
            vec![
                build::parse("s2", "SELECT 2", &[]),
                target(DESCRIBE, b'S', "s2"),
                SYNC_MSG.to_vec(),
            ],
            vec![build::parse("", "SELECT 2", &[]), SYNC_MSG.to_vec()],
        ] {
            let mut queue = BytesMut::new();
            for m in &msgs {
                queue.extend_from_slice(m);
            }
            let before = queue.clone();
            assert!(t.answer_without_server(&mut queue).is_none());
            assert_eq!(queue, before, "left as it was");
        }
    }

    #[test]
    fn names_depend_on_text_and_types_only() {
        assert_eq!(server_name("SELECT 1", &[]), server_name("SELECT 1", &[]));
        assert_ne!(
            server_name("SELECT $1", &[0, 0, 0, 23]),
            server_name("SELECT $1", &[0, 0, 0, 25])
        );
        assert!(server_name("x", &[]).len() < 64, "fits NAMEDATALEN");
    }
}
