//! Startup packets PostgreSQL refuses: spillway answers what PostgreSQL answers for the
//! same bytes (issue 18). A length word out of range (node-postgres writes its
//! Terminate before the startup packet when `end()` follows `connect()`, an HTTP
//! request, a cancel request of the wrong size) is closed without a word; versions,
//! layouts and requests PostgreSQL answers with an error get the same SQLSTATE.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Lang, both};
use crate::context::{Context, DB, USER};
use crate::wire::{Msg, Raw, startup_packet};

#[tokio::test]
async fn node_postgres_quick_disconnect_sees_no_error() {
    let ctx = Context::start().await;
    let (through, direct) = both(&ctx, Lang::Node, "pg_quick_disconnect.js").await;
    assert_eq!(direct, json!(["ended"]), "PostgreSQL itself");
    assert_eq!(through, direct);
}

/// What a server does with `parts`, sent in turn (each but the last an SSLRequest or
/// GSSENCRequest whose one-byte answer is read before the next is sent; the client
/// then closes its side): those answers, then "silent" or the ErrorResponse's
/// SQLSTATE ("v2" for PostgreSQL's old-style error to a client of protocol 1 or 2).
async fn answer(addr: std::net::SocketAddr, parts: &[&[u8]]) -> String {
    let mut raw = Raw::connect(addr).await;
    let mut out = String::new();
    let (last, negotiations) = parts.split_last().expect("something to send");
    for part in negotiations {
        raw.send(part).await;
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(10), raw.stream.read(&mut byte)).await {
            Ok(Ok(1)) => out.push_str(&format!("{} ", byte[0] as char)),
            other => return format!("{out}no answer to a negotiation ({other:?})"),
        }
    }
    raw.send(last).await;
    let _ = raw.stream.shutdown().await;
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), raw.stream.read_to_end(&mut got))
        .await
        .expect("server closed in time")
        .unwrap_or(0);
    match &got[..] {
        [] => out.push_str("silent"),
        [b'E', a, b, c, d, body @ ..] => {
            if i32::from_be_bytes([*a, *b, *c, *d]) as usize == body.len() + 4 {
                let msg = Msg {
                    tag: b'E',
                    body: body.to_vec(),
                };
                out.push_str(&msg.code().unwrap_or_default());
            } else {
                out.push_str("v2");
            }
        }
        other => out.push_str(&format!("{other:?}")),
    }
    out
}

fn packet(code: i32, body: &[u8]) -> Vec<u8> {
    let mut p = ((8 + body.len()) as i32).to_be_bytes().to_vec();
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(body);
    p
}

#[tokio::test]
async fn refused_startup_packets_get_what_postgres_gives() {
    let ctx = Context::start().await;
    let bystander = ctx.proxy_client().await;
    let ssl = packet(80_877_103, &[]);
    let gss = packet(80_877_104, &[]);
    let v3 = startup_packet(USER, DB);
    let huge = packet(196_608, &[b'a'; 10_000]);
    let short_cancel = packet(80_877_102, &[0, 0, 0, 1]);
    let v4 = packet(4 << 16, b"user\0x\0\0");
    let no_user = packet(196_608, b"database\0x\0\0");
    let empty_user = packet(196_608, b"user\0\0\0");
    let mut trailing = v3.clone();
    trailing.push(b'x');
    let len = trailing.len() as i32;
    trailing[..4].copy_from_slice(&len.to_be_bytes());
    let cases: Vec<(&str, Vec<&[u8]>, &str)> = vec![
        ("nothing at all", vec![b""], "silent"),
        ("half a length word", vec![b"\0\0"], "silent"),
        (
            "node-postgres' Terminate first",
            vec![b"X\0\0\0\x04"],
            "silent",
        ),
        (
            "an HTTP request",
            vec![b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"],
            "silent",
        ),
        ("length 4", vec![b"\0\0\0\x04"], "silent"),
        ("over 10000 bytes", vec![&huge], "silent"),
        ("a short cancel request", vec![&short_cancel], "silent"),
        ("a truncated packet", vec![&v3[..v3.len() - 3]], "silent"),
        ("protocol 4.0", vec![&v4], "0A000"),
        ("no user", vec![&no_user], "28000"),
        ("an empty user", vec![&empty_user], "28000"),
        ("bytes after the terminator", vec![&trailing], "08P01"),
        (
            "SSL, then startup",
            vec![&ssl, &v3[..v3.len() - 3]],
            "N silent",
        ),
        ("a second SSLRequest", vec![&ssl, &ssl], "N 0A000"),
    ];
    // PostgreSQL built with GSSAPI (Debian's is) answers a GSSENCRequest 'G'; spillway
    // never encrypts with GSS and answers 'N', as PostgreSQL without it does. Its
    // order rules are PostgreSQL's: each request once, GSS after a refused SSL, SSL
    // after a refused GSS.
    let gss_cases: Vec<(&str, Vec<&[u8]>, &str)> = vec![
        ("GSS after SSL", vec![&ssl, &gss, &no_user], "N N 28000"),
        ("SSL after GSS", vec![&gss, &ssl, &no_user], "N N 28000"),
        ("a second GSSENCRequest", vec![&gss, &gss], "N 0A000"),
    ];
    for (what, parts, expected) in &gss_cases {
        let through = answer(ctx.proxy.addr, parts).await;
        assert_eq!(through, *expected, "{what}");
    }
    let direct_addr = std::net::SocketAddr::from(([127, 0, 0, 1], ctx.pg.port()));
    let mut mismatches = Vec::new();
    for (what, parts, expected) in &cases {
        let direct = answer(direct_addr, parts).await;
        let through = answer(ctx.proxy.addr, parts).await;
        if direct != *expected {
            mismatches.push(format!(
                "{what}: PostgreSQL gave {direct:?}, test expects {expected:?}"
            ));
        }
        if through != direct {
            mismatches.push(format!(
                "{what}: spillway gave {through:?}, PostgreSQL {direct:?}"
            ));
        }
    }
    // Versions below 3 are refused by both; PostgreSQL answers them in protocol 2's
    // format, which spillway does not speak, so only the refusal is compared.
    for old in [packet(2 << 16, b"user\0x\0\0"), packet(1, b"user\0x\0\0")] {
        let direct = answer(direct_addr, &[&old]).await;
        let through = answer(ctx.proxy.addr, &[&old]).await;
        assert_eq!((direct.as_str(), through.as_str()), ("v2", "0A000"));
    }
    assert!(mismatches.is_empty(), "{mismatches:#?}");
    bystander
        .simple_query("SELECT 1")
        .await
        .expect("bystander still answers");
}
