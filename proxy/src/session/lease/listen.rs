//! LISTEN and UNLISTEN of a session in transaction mode (ADR 0031): which simple
//! Queries are served by the database's listener connection (`net/notify/`) rather
//! than by a leased server connection, and the session's side of that: the request in
//! flight and the answer spillway gives in PostgreSQL's place.
//!
//! Served by the listener: a simple Query that is one `LISTEN channel`, `UNLISTEN
//! channel` or `UNLISTEN *` (an optional `;`), sent outside a transaction while the
//! session holds no server connection. Anything else that LISTENs (inside a
//! transaction block, among other statements, through the extended protocol) goes to
//! the leased connection, which the session then keeps (pinned) so the notifications
//! still reach it.

use std::future::Future;
use std::task::{Context, Poll};

use bytes::BytesMut;

use crate::net::notify::{Answer, Subscription};
use crate::protocol::backend::{self, Severity};
use crate::protocol::frame::peek_header;
use crate::protocol::frontend;
use crate::protocol::sqlstate::SqlState;

/// PostgreSQL's longest identifier (NAMEDATALEN - 1); longer names are left to it.
const MAX_IDENT: usize = 63;

/// A LISTEN or UNLISTEN the listener connection can serve.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ListenCommand {
    Listen(String),
    /// `None`: `UNLISTEN *`.
    Unlisten(Option<String>),
}

impl ListenCommand {
    pub(super) fn tag(&self) -> &'static str {
        match self {
            ListenCommand::Listen(_) => "LISTEN",
            ListenCommand::Unlisten(_) => "UNLISTEN",
        }
    }
}

/// Whether the text of a simple Query starts with LISTEN or UNLISTEN (after blanks),
/// whatever follows.
pub(super) fn mentions_listen(sql: &str) -> bool {
    let head: String = sql.trim_start().chars().take(9).collect();
    let head = head.to_ascii_lowercase();
    head.starts_with("listen") || head.starts_with("unlisten")
}

/// Whether `sql` mentions LISTEN anywhere, in any case (no allocation, and one
/// memchr pass for its first letter: this runs on every Parse).
pub(super) fn contains_listen(sql: &str) -> bool {
    let text = sql.as_bytes();
    memchr::memchr2_iter(b'l', b'L', text).any(|at| {
        text.get(at..at + 6)
            .is_some_and(|w| w.eq_ignore_ascii_case(b"listen"))
    })
}

/// The one LISTEN/UNLISTEN statement `sql` is, if it is exactly one in a form read
/// here for sure (a plain or double-quoted identifier, `*` for UNLISTEN; no comment).
pub(super) fn listen_command(sql: &str) -> Option<ListenCommand> {
    let sql = sql.trim();
    let sql = sql.strip_suffix(';').unwrap_or(sql).trim_end();
    let (word, rest) = sql.split_once(|c: char| c.is_ascii_whitespace())?;
    let word = word.to_ascii_lowercase();
    let rest = rest.trim_start();
    if word == "unlisten" && rest == "*" {
        return Some(ListenCommand::Unlisten(None));
    }
    let channel = identifier(rest)?;
    match word.as_str() {
        "listen" => Some(ListenCommand::Listen(channel)),
        "unlisten" => Some(ListenCommand::Unlisten(Some(channel))),
        _ => None,
    }
}

/// `text` as one whole identifier: `"quoted"` (doubled quotes inside) or a plain one
/// (folded to lower case, as PostgreSQL folds ASCII letters).
fn identifier(text: &str) -> Option<String> {
    let name = if let Some(inner) = text.strip_prefix('"') {
        let inner = inner.strip_suffix('"')?;
        let unescaped = inner.replace("\"\"", "\"");
        // A lone quote inside means this was more than one token.
        if unescaped.matches('"').count() * 2 != inner.matches('"').count() {
            return None;
        }
        unescaped
    } else {
        let mut chars = text.chars();
        let first = chars.next()?;
        if !(first.is_ascii_alphabetic() || first == '_')
            || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
        {
            return None;
        }
        text.to_ascii_lowercase()
    };
    (!name.is_empty() && name.len() <= MAX_IDENT && !name.contains('\0')).then_some(name)
}

/// What the listener connection serves at the head of the queue toward upstream.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Served {
    /// Bytes of the queue it takes (one Query, or one extended cycle to its Sync).
    pub(super) len: usize,
    /// `None`: a prepare only (`Parse [Describe] Flush`, asyncpg's), answered at once.
    pub(super) cmd: Option<ListenCommand>,
    /// The answers due before the command's own (ParseComplete, BindComplete,
    /// Describe's), as PostgreSQL gives them.
    pub(super) before: Vec<u8>,
    /// The offset of a Parse in the cycle, which the session's statements must learn.
    pub(super) parse: Option<usize>,
}

/// The LISTEN/UNLISTEN at the head of `queue`, whole: a simple Query, or an extended
/// cycle `[Parse [Describe]] Bind [Describe] Execute Sync` with no parameters whose
/// statement (the cycle's Parse, else `statement_sql` of the Bind's statement) is
/// one, or the prepare of one, `Parse [Describe] Flush`.
pub(super) fn head_command(
    queue: &[u8],
    statement_sql: &dyn Fn(&str) -> Option<String>,
) -> Option<Served> {
    let h = peek_header(queue, usize::MAX).ok()??;
    if h.tag == frontend::QUERY {
        if queue.len() < h.total_len {
            return None;
        }
        let sql = frontend::query(frontend::body(&queue[..h.total_len]))?;
        return Some(Served {
            len: h.total_len,
            cmd: Some(listen_command(sql)?),
            before: Vec::new(),
            parse: None,
        });
    }
    // An extended cycle.
    let mut at = 0;
    let mut sql: Option<String> = None;
    let mut parse = None;
    let mut parsed_name: Option<String> = None;
    let mut before = Vec::new();
    let mut stage = 0; // 0: Parse may come, 1: Bind, 2: Describe/Execute, 3: Sync.
    loop {
        let h = peek_header(&queue[at..], usize::MAX).ok()??;
        let msg = queue.get(at..at + h.total_len)?;
        let body = frontend::body(msg);
        match (h.tag, stage) {
            (frontend::PARSE, 0) => {
                let p = frontend::parse(body)?;
                sql = Some(p.sql.to_owned());
                parsed_name = Some(p.name.to_owned());
                parse = Some(at);
                before.extend_from_slice(frontend::PARSE_COMPLETE);
                stage = 1;
            }
            (frontend::BIND, 0 | 1) => {
                let b = frontend::bind(body)?;
                if !frontend::bind_params(b.params_and_formats)?.is_empty() {
                    return None;
                }
                if parsed_name.as_deref() != Some(b.statement) {
                    // Not the statement this cycle parsed: the one prepared before.
                    sql = statement_sql(b.statement);
                }
                before.extend_from_slice(frontend::BIND_COMPLETE);
                stage = 2;
            }
            (frontend::DESCRIBE, 1 | 2) => {
                if frontend::target(body)?.kind == b'S' {
                    // No parameters.
                    before.extend_from_slice(b"t\0\0\0\x06\0\0");
                }
                before.extend_from_slice(frontend::NO_DATA);
            }
            (frontend::EXECUTE, 2) => stage = 3,
            (frontend::FLUSH, 1) => {
                listen_command(sql.as_deref()?)?;
                return Some(Served {
                    len: at + h.total_len,
                    cmd: None,
                    before,
                    parse,
                });
            }
            (frontend::SYNC, 3) => {
                return Some(Served {
                    len: at + h.total_len,
                    cmd: Some(listen_command(sql.as_deref()?)?),
                    before,
                    parse,
                });
            }
            _ => return None,
        }
        at += h.total_len;
    }
}

/// Whether any whole message in `queue` runs LISTEN/UNLISTEN: a simple Query that
/// mentions it, or a Bind of a statement that does (prepared in the queue or before).
/// Preparing one runs nothing.
pub(super) fn queue_mentions_listen(
    queue: &[u8],
    statement_sql: &dyn Fn(&str) -> Option<String>,
) -> bool {
    let mut parsed: Vec<(String, String)> = Vec::new();
    let mut rest = queue;
    while let Ok(Some(h)) = peek_header(rest, usize::MAX) {
        if rest.len() < h.total_len {
            break;
        }
        let body = frontend::body(&rest[..h.total_len]);
        let sql = match h.tag {
            frontend::QUERY => frontend::query(body).map(str::to_owned),
            frontend::PARSE => {
                if let Some(p) = frontend::parse(body) {
                    parsed.retain(|(n, _)| n != p.name);
                    parsed.push((p.name.to_owned(), p.sql.to_owned()));
                }
                None
            }
            frontend::BIND => frontend::bind(body).and_then(|b| {
                parsed
                    .iter()
                    .rev()
                    .find(|(n, _)| n == b.statement)
                    .map(|(_, s)| s.clone())
                    .or_else(|| statement_sql(b.statement))
            }),
            _ => None,
        };
        if sql.is_some_and(|s| mentions_listen(&s)) {
            return true;
        }
        rest = &rest[h.total_len..];
    }
    false
}

/// Removes what `served` takes from the head of `queue`, its Parse handed to `learn`.
fn take(queue: &mut BytesMut, served: &Served, learn: &mut dyn FnMut(&[u8])) {
    if let Some(at) = served.parse
        && let Ok(Some(h)) = peek_header(&queue[at..], usize::MAX)
    {
        learn(&queue[at..at + h.total_len]);
    }
    bytes::Buf::advance(queue, served.len);
}

/// The session's listening: its subscription to the database's hub (made at the
/// first LISTEN) and the request waiting for the hub's answer.
pub(super) struct Listening {
    pub(super) sub: Subscription,
    pending: Option<(Served, Answer)>,
    /// Simple Queries mentioning LISTEN taken from the client and not answered here
    /// yet: while any is, what goes to a server connection is checked for them.
    pub(super) unanswered: u32,
    /// The client prepared a LISTEN/UNLISTEN statement (extended protocol): every
    /// queue toward upstream is checked for its execution from now on.
    pub(super) prepared: bool,
    /// LISTEN/UNLISTEN run inside the transaction block now open (answered by
    /// spillway), for the listener when the block commits; dropped at ROLLBACK.
    pub(super) in_tx: Vec<ListenCommand>,
    /// Their requests to the hub at COMMIT, which waits for them.
    pub(super) committing: Vec<Answer>,
    /// PostgreSQL answered COMMIT (`true`) or ROLLBACK in the block: settled at its
    /// ReadyForQuery if that says the block ended.
    pub(super) answered_end: Option<bool>,
}

impl Listening {
    pub(super) fn new(sub: Subscription) -> Self {
        Self {
            sub,
            pending: None,
            unanswered: 0,
            prepared: false,
            in_tx: Vec::new(),
            committing: Vec::new(),
            answered_end: None,
        }
    }

    /// Serves the LISTEN/UNLISTEN at the head of `queue` through the listener: sends
    /// the request once, then, when the hub answered, removes it from `queue` and
    /// appends the answers PostgreSQL would give (those before the command's, its
    /// CommandComplete or the error, then ReadyForQuery `I`) to `answers`. A Parse in
    /// it is handed to `learn`. `None` when the head is not one; `Some(Pending)` while
    /// the hub works on it.
    pub(super) fn poll_serve(
        &mut self,
        queue: &mut BytesMut,
        answers: &mut BytesMut,
        statement_sql: &dyn Fn(&str) -> Option<String>,
        learn: &mut dyn FnMut(&[u8]),
        cx: &mut Context<'_>,
    ) -> Option<Poll<()>> {
        if self.pending.is_none() {
            let served = head_command(queue, statement_sql)?;
            let answer = match &served.cmd {
                Some(ListenCommand::Listen(channel)) => self.sub.listen(channel.clone()),
                Some(ListenCommand::Unlisten(channel)) => self.sub.unlisten(channel.clone()),
                None => {
                    // A prepare only: nothing for the listener.
                    take(queue, &served, learn);
                    answers.extend_from_slice(&served.before);
                    return Some(Poll::Ready(()));
                }
            };
            self.pending = Some((served, answer));
        }
        let (served, answer) = self.pending.as_mut()?;
        let result = match std::pin::Pin::new(answer).poll(cx) {
            Poll::Pending => return Some(Poll::Pending),
            Poll::Ready(r) => r.unwrap_or_else(|_| Err("the listener stopped".to_owned())),
        };
        take(queue, served, learn);
        answers.extend_from_slice(&served.before);
        let tag = served.cmd.as_ref().map_or("LISTEN", ListenCommand::tag);
        match result {
            Ok(()) => answers.extend_from_slice(&frontend::command_complete(tag)),
            Err(e) => answers.extend_from_slice(&backend::error_response(
                Severity::Error,
                SqlState::CONNECTION_FAILURE,
                &format!("{tag} could not be served by spillway's listener connection: {e}"),
            )),
        }
        answers.extend_from_slice(&frontend::ready_for_query(b'I'));
        self.pending = None;
        self.unanswered = self.unanswered.saturating_sub(1);
        Some(Poll::Ready(()))
    }

    /// UNLISTEN without waiting for the answer (the session runs it on its pinned
    /// connection as well).
    pub(super) fn unlisten_now(&mut self, channel: Option<String>) {
        drop(self.sub.unlisten(channel));
    }

    /// A LISTEN request is in flight (the queue's head is spoken for).
    pub(super) fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Notifications for the client, at a message boundary (the relay calls this
    /// only while the client is owed nothing).
    pub(super) fn poll_deliver(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut BytesMut,
        room: usize,
    ) -> bool {
        self.sub.poll_deliver(cx, out, room)
    }
}

impl super::Lease {
    /// Transaction mode: a LISTEN/UNLISTEN at the head of the queue, outside a
    /// transaction and with no connection leased, served by the database's listener
    /// connection (`Some`: answered, read as PostgreSQL's answer, or waiting for the
    /// listener). Where one goes to a server connection instead (inside a transaction,
    /// behind other requests), the session keeps that connection (pinned), so the
    /// notifications reach it there.
    pub(super) fn poll_listen(
        &mut self,
        queue: &mut BytesMut,
        tx: super::TxView,
        cx: &mut Context<'_>,
    ) -> Option<Poll<()>> {
        let idle = tx.status == b'I';
        let p = self.pooled.as_deref_mut()?;
        let l = p.listening.as_mut()?;
        if l.unanswered == 0 && !l.prepared && !l.is_pending() && !l.in_transaction() {
            return None;
        }
        if idle {
            // Outside a transaction block: what a block kept and never saw end by a
            // COMMIT or ROLLBACK read here (ended another way) is dropped.
            l.end_transaction();
        } else if p.leased.is_some() && !p.pinned {
            // Inside one: LISTEN/UNLISTEN kept for its COMMIT (ADR 0033).
            let alone = tx.awaiting == 1;
            if let Some(r) = l.poll_in_tx(queue, &mut self.conn.inbuf, tx.status, alone, cx) {
                return Some(r);
            }
        }
        let mut learnt: Option<Vec<u8>> = None;
        let served = {
            let translator = &p.translator;
            let sql_of = |name: &str| {
                translator
                    .as_ref()
                    .and_then(|t| t.statement_sql(name))
                    .map(str::to_owned)
            };
            // Without a translator (`pool.max_prepared_statements = 0`) a statement
            // answered here would be missing on the connection that binds it later:
            // only simple Queries are served then.
            let servable =
                translator.is_some() || l.is_pending() || queue.first() == Some(&frontend::QUERY);
            let served =
                if servable && idle && p.leased.is_none() && p.acquiring.is_none() && !p.pinned {
                    l.poll_serve(
                        queue,
                        &mut self.conn.inbuf,
                        &sql_of,
                        &mut |parse| learnt = Some(parse.to_vec()),
                        cx,
                    )
                } else {
                    None
                };
            if served.is_none() && !l.is_pending() && queue_mentions_listen(queue, &sql_of) {
                tracing::debug!(
                    "session pinned to its server connection by a LISTEN it runs there"
                );
                p.pinned = true;
                l.unanswered = 0;
            }
            served
        };
        if let (Some(parse), Some(t)) = (learnt, p.translator.as_mut()) {
            t.remember_parse(&parse);
        }
        served
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_listen_or_unlisten_is_read() {
        let l = |s: &str| Some(ListenCommand::Listen(s.to_owned()));
        assert_eq!(listen_command("LISTEN chan"), l("chan"));
        assert_eq!(listen_command("  listen Chan ;  "), l("chan"));
        assert_eq!(listen_command("LISTEN \"Mixed Case\""), l("Mixed Case"));
        assert_eq!(listen_command("LISTEN \"a\"\"b\""), l("a\"b"));
        assert_eq!(listen_command("LISTEN a_b$1"), l("a_b$1"));
        assert_eq!(
            listen_command("UNLISTEN *"),
            Some(ListenCommand::Unlisten(None))
        );
        assert_eq!(
            listen_command("unlisten\tx;"),
            Some(ListenCommand::Unlisten(Some("x".to_owned())))
        );
    }

    #[test]
    fn anything_else_is_left_to_postgresql() {
        for sql in [
            "LISTEN",
            "LISTEN a; LISTEN b",
            "LISTEN a; SELECT 1",
            "LISTEN a b",
            "LISTEN \"a\" \"b\"",
            "LISTEN \"a",
            "LISTEN 1a",
            "LISTEN a -- comment",
            "LISTEN /* c */ a",
            "LISTEN *",
            "LISTEN \"\"",
            "NOTIFY a",
            "LISTEN U&\"a\"",
            &format!("LISTEN {}", "x".repeat(64)),
        ] {
            assert_eq!(listen_command(sql), None, "{sql}");
        }
        assert!(mentions_listen("  Unlisten *"));
        assert!(contains_listen("select 1; LiStEn x"));
        assert!(!contains_listen("select 'listn'"));
        assert!(!mentions_listen("select 'listen'"));
    }

    #[test]
    fn the_head_of_a_queue_is_read_whole() {
        let none = |_: &str| None;
        let mut queue = frontend::query_message("LISTEN a");
        let len = queue.len();
        queue.extend_from_slice(&frontend::query_message("SELECT 1"));
        let served = head_command(&queue, &none).expect("served");
        assert_eq!(
            (served.len, served.cmd),
            (len, Some(ListenCommand::Listen("a".to_owned())))
        );
        assert_eq!(head_command(&queue[..len - 1], &none), None);
        assert!(queue_mentions_listen(&queue, &none));
        assert!(!queue_mentions_listen(
            &frontend::query_message("SELECT 1"),
            &none
        ));
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&u32::try_from(body.len() + 4).expect("len").to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    /// Bind of `stmt` to the unnamed portal, no parameters, no result formats.
    fn bind(stmt: &str) -> Vec<u8> {
        let mut b = vec![0];
        b.extend_from_slice(stmt.as_bytes());
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0]);
        msg(b'B', &b)
    }

    #[test]
    fn an_extended_cycle_of_a_listen_statement_is_served() {
        let parse = msg(b'P', b"\0LISTEN \"x\"\0\0\0");
        let describe = msg(b'D', b"P\0");
        let execute = msg(b'E', b"\0\0\0\0\0");
        let sync = msg(b'S', b"");
        let none = |_: &str| None;
        // psycopg: Parse, Bind, Describe, Execute, Sync of the unnamed statement.
        let cycle = [&parse[..], &bind(""), &describe, &execute, &sync].concat();
        let served = head_command(&cycle, &none).expect("served");
        assert_eq!(served.len, cycle.len());
        assert_eq!(served.cmd, Some(ListenCommand::Listen("x".to_owned())));
        assert_eq!(served.parse, Some(0));
        assert_eq!(
            served.before,
            [
                frontend::PARSE_COMPLETE,
                frontend::BIND_COMPLETE,
                frontend::NO_DATA
            ]
            .concat()
        );
        // asyncpg: Bind of a named statement prepared before.
        let named = |n: &str| (n == "s1").then(|| "UNLISTEN *".to_owned());
        let cycle = [&bind("s1")[..], &execute, &sync].concat();
        let served = head_command(&cycle, &named).expect("served");
        assert_eq!(served.cmd, Some(ListenCommand::Unlisten(None)));
        // asyncpg's prepare: Parse, Describe, Flush, answered with no listener.
        let flush = msg(b'H', b"");
        let prepare = [&parse[..], &msg(b'D', b"S\0"), &flush].concat();
        let served = head_command(&prepare, &none).expect("served");
        assert_eq!(served.cmd, None);
        assert_eq!(
            served.before,
            [
                frontend::PARSE_COMPLETE,
                b"t\0\0\0\x06\0\0",
                frontend::NO_DATA
            ]
            .concat()
        );
        assert!(queue_mentions_listen(&cycle, &named));
        assert!(!queue_mentions_listen(&cycle, &none));
        // Preparing runs nothing; binding what the queue prepared does.
        let prepare = [&parse[..], &msg(b'D', b"S\0"), &sync].concat();
        assert!(!queue_mentions_listen(&prepare, &none));
        assert!(queue_mentions_listen(
            &[&prepare[..], &bind(""), &execute, &sync].concat(),
            &none
        ));
        // Not whole, or not a LISTEN: left alone.
        assert_eq!(head_command(&cycle[..cycle.len() - 1], &named), None);
        // A cycle that parses a LISTEN but binds another statement is not one.
        let other = [&parse[..], &bind("s2"), &execute, &sync].concat();
        assert_eq!(head_command(&other, &named), None);
        assert_eq!(
            head_command(&[&bind("s2")[..], &execute, &sync].concat(), &named),
            None
        );
    }
}
