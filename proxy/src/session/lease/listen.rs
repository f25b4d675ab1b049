//! LISTEN and UNLISTEN of a session in transaction mode (ADR 0031): which simple
//! Queries are served by the database's listener connection (`net/notify.rs`) rather
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
    fn tag(&self) -> &'static str {
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

/// The length of the first message of `queue` if it is a whole simple Query served by
/// the listener, and its command.
pub(super) fn head_command(queue: &[u8]) -> Option<(usize, ListenCommand)> {
    let h = peek_header(queue, usize::MAX).ok()??;
    if h.tag != frontend::QUERY || queue.len() < h.total_len {
        return None;
    }
    let sql = frontend::query(frontend::body(&queue[..h.total_len]))?;
    Some((h.total_len, listen_command(sql)?))
}

/// Whether any whole message in `queue` is a simple Query that LISTENs or UNLISTENs.
pub(super) fn queue_mentions_listen(queue: &[u8]) -> bool {
    let mut rest = queue;
    while let Ok(Some(h)) = peek_header(rest, usize::MAX) {
        if rest.len() < h.total_len {
            break;
        }
        let msg = &rest[..h.total_len];
        if h.tag == frontend::QUERY
            && frontend::query(frontend::body(msg)).is_some_and(mentions_listen)
        {
            return true;
        }
        rest = &rest[h.total_len..];
    }
    false
}

/// The session's listening: its subscription to the database's hub (made at the
/// first LISTEN) and the request waiting for the hub's answer.
pub(super) struct Listening {
    sub: Subscription,
    pending: Option<(usize, &'static str, Answer)>,
    /// Simple Queries mentioning LISTEN taken from the client and not answered here
    /// yet: while any is, what goes to a server connection is checked for them.
    pub(super) unanswered: u32,
}

impl Listening {
    pub(super) fn new(sub: Subscription) -> Self {
        Self {
            sub,
            pending: None,
            unanswered: 0,
        }
    }

    /// Serves the LISTEN/UNLISTEN at the head of `queue` through the listener: sends
    /// the request once, then, when the hub answered, removes the Query from `queue`
    /// and appends the answer PostgreSQL would give (CommandComplete or the error,
    /// then ReadyForQuery `I`) to `answers`. `None` when the head is not one;
    /// `Some(Pending)` while the hub works on it.
    pub(super) fn poll_serve(
        &mut self,
        queue: &mut BytesMut,
        answers: &mut BytesMut,
        cx: &mut Context<'_>,
    ) -> Option<Poll<()>> {
        if self.pending.is_none() {
            let (len, cmd) = head_command(queue)?;
            let tag = cmd.tag();
            let answer = match cmd {
                ListenCommand::Listen(channel) => self.sub.listen(channel),
                ListenCommand::Unlisten(channel) => self.sub.unlisten(channel),
            };
            self.pending = Some((len, tag, answer));
        }
        let (len, tag, answer) = self.pending.as_mut()?;
        let result = match std::pin::Pin::new(answer).poll(cx) {
            Poll::Pending => return Some(Poll::Pending),
            Poll::Ready(r) => r.unwrap_or_else(|_| Err("the listener stopped".to_owned())),
        };
        bytes::Buf::advance(queue, *len);
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
        assert!(!mentions_listen("select 'listen'"));
    }

    #[test]
    fn the_head_of_a_queue_is_read_whole() {
        let mut queue = frontend::query_message("LISTEN a");
        let len = queue.len();
        queue.extend_from_slice(&frontend::query_message("SELECT 1"));
        assert_eq!(
            head_command(&queue),
            Some((len, ListenCommand::Listen("a".to_owned())))
        );
        assert_eq!(head_command(&queue[..len - 1]), None);
        assert!(queue_mentions_listen(&queue));
        assert!(!queue_mentions_listen(&frontend::query_message("SELECT 1")));
    }
}
