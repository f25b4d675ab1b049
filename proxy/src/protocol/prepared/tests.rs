//! Unit tests of the statement translation: what goes to the server, and what
//! becomes of each answer.

use super::wire::{NOWHERE, PREFIX, write_target};
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

#[test]
fn messages_that_go_unchanged_are_not_copied() {
    let mut t = Translator::new(0);
    let mut server = ServerStatements::default();
    t.start_lease();
    let mut buf = BytesMut::new();
    for m in [
        build::parse("", "SELECT 1", &[]),
        build::bind("", "", &[], &[]),
        build::execute("", 0),
        SYNC_MSG.to_vec(),
    ] {
        buf.extend_from_slice(&m);
    }
    let before = buf.clone();
    let at = buf.as_ptr();
    let end = t.translate(&mut buf, 0, &mut server);
    assert_eq!(end, buf.len());
    assert_eq!(buf, before);
    assert_eq!(buf.as_ptr(), at, "the queue's buffer is left where it is");
}

#[test]
fn a_rewrite_keeps_what_was_translated_before_and_a_partial_message_after() {
    let mut t = Translator::new(0);
    let mut server = ServerStatements::default();
    t.start_lease();
    // Translated by an earlier call (and not written yet): `from` is past it.
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&build::parse("s1", "SELECT 1", &[]));
    let from = t.translate(&mut buf, 0, &mut server);
    assert_eq!(from, buf.len());
    let earlier = buf.to_vec();
    // Then a Bind of it and half a Sync.
    buf.extend_from_slice(&build::bind("", "s1", &[], &[]));
    buf.extend_from_slice(&SYNC_MSG[..3]);
    let end = t.translate(&mut buf, from, &mut server);
    assert_eq!(&buf[..from], &earlier[..], "the earlier bytes stay first");
    assert_eq!(&buf[end..], &SYNC_MSG[..3], "the partial message waits");
    assert_eq!(messages(&buf[..end]), ["P sw SELECT 1", "B  sw"]);
    // The rest of the Sync completes it in the next call.
    buf.extend_from_slice(&SYNC_MSG[3..]);
    let end = t.translate(&mut buf, end, &mut server);
    assert_eq!(end, buf.len());
    assert_eq!(messages(&buf), ["P sw SELECT 1", "B  sw", "S"]);
}

#[test]
fn the_same_unnamed_parse_again_is_still_the_clients_on_the_next_lease() {
    let mut t = Translator::new(0);
    let mut first = ServerStatements::default();
    t.start_lease();
    let cycle = [
        build::parse("", "SELECT $1", &[23]),
        build::bind("", "", &[Some(b"1")], &[]),
        build::execute("", 0),
        SYNC_MSG.to_vec(),
    ];
    for _ in 0..2 {
        let sent = send(&mut t, &mut first, &cycle);
        assert_eq!(sent, ["P  SELECT $1", "B  ", "E", "S"]);
        assert_eq!(replies(&mut t, &mut first, b"12CZ"), [Reply::Pass; 4]);
    }
    t.end_lease(&mut first);
    // Another connection: a Bind of the unnamed statement alone gets it parsed there
    // first (answer swallowed), from the bytes the client sent.
    let mut second = ServerStatements::default();
    t.start_lease();
    let sent = send(&mut t, &mut second, &cycle[1..]);
    assert_eq!(sent, ["P  SELECT $1", "B  ", "E", "S"]);
    assert_eq!(
        replies(&mut t, &mut second, b"12CZ"),
        [Reply::Swallow, Reply::Pass, Reply::Pass, Reply::Pass]
    );
    // A simple Query replaces it: nothing to re-parse on the next lease, and the
    // foreign one there is closed instead.
    send(
        &mut t,
        &mut second,
        &[frontend::query_message("SELECT 2").to_vec()],
    );
    replies(&mut t, &mut second, b"Z");
    t.end_lease(&mut second);
    t.start_lease();
    let sent = send(&mut t, &mut first, &cycle[1..]);
    assert_eq!(sent, ["C S ", "B  ", "E", "S"]);
}
