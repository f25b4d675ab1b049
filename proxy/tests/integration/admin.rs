//! The admin console (SPEC §7): database `spillway` answered by spillway itself, through
//! psql and tokio-postgres. Commands give the expected rows (pending writes, flush,
//! clients, invalidation, RELOAD), the extended protocol gets 0A000, and only roles
//! in `admin.users` with the right password get in (28000, 28P01 otherwise), with a
//! verifier from `spillway hash-password` or from PostgreSQL itself.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use crate::context::{Context, USER};

pub const ADMIN: &str = "ops";
pub const PASSWORD: &str = "console secret";

/// `spillway hash-password` with `password` on stdin.
pub fn hash_password(password: &str) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_spillway"))
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spillway hash-password");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("write password");
    let out = child.wait_with_output().expect("hash-password runs");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_owned()
}

async fn start() -> Context {
    let verifier = hash_password(PASSWORD);
    assert!(verifier.starts_with("SCRAM-SHA-256$4096:"), "{verifier}");
    Context::builder()
        .before_proxy("CREATE TABLE public.wb (id int PRIMARY KEY, v text)")
        .section(&format!(
            "[admin]\nusers = [\"{ADMIN}\"]\npassword = \"{verifier}\"\n\
             [flush]\ninterval = \"1h\"\n\
             [tables.\"public.wb\"]\npolicy = \"write-behind\"\n"
        ))
        .start()
        .await
}

fn console_config(ctx: &Context, user: &str, password: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user={user} dbname=spillway password='{password}' sslmode=disable",
        ctx.proxy.addr.port()
    )
}

/// `psql -c command` against the console; unaligned, tuples only, `|` between fields.
pub fn psql(ctx: &Context, command: &str) -> Output {
    Command::new("psql")
        .args(["-X", "-A", "-t", "-F", "|", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(format!(
            "host=127.0.0.1 port={} user={ADMIN} dbname=spillway sslmode=disable",
            ctx.proxy.addr.port()
        ))
        .args(["-c", command])
        .env("PGPASSWORD", PASSWORD)
        .output()
        .expect("run psql")
}

pub fn rows(out: &Output) -> Vec<Vec<String>> {
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.split('|').map(str::to_owned).collect())
        .collect()
}

fn row<'a>(rows: &'a [Vec<String>], first: &str) -> &'a [String] {
    rows.iter()
        .find(|r| r[0] == first)
        .unwrap_or_else(|| panic!("no row {first} in {rows:?}"))
}

#[tokio::test]
async fn console_commands_answer_through_psql() {
    let ctx = start().await;
    let app = ctx.proxy_client().await;
    for i in 1..=3 {
        app.simple_query(&format!("INSERT INTO wb (id, v) VALUES ({i}, 'x')"))
            .await
            .expect("deferred insert");
    }

    // policy, consistency, cache, ttl, pending, oldest pending age, fallbacks
    let tables = rows(&psql(&ctx, "SHOW TABLES"));
    let wb = row(&tables, "public.wb");
    assert_eq!(
        &wb[1..6],
        ["write-behind", "strong", "t", "1m", "3"],
        "{wb:?}"
    );
    assert!(wb[6].parse::<f64>().expect("age") > 0.0, "{wb:?}");
    assert_eq!(wb[7], "0");

    let pending = rows(&psql(&ctx, "SHOW PENDING"));
    let wb = row(&pending, "public.wb");
    assert_eq!(wb[1], "3");
    assert_eq!(&wb[3..], ["100000", "block", "running"], "{wb:?}");

    // The application's session and the console's own, by user and database.
    let clients = rows(&psql(&ctx, "SHOW CLIENTS"));
    assert!(
        clients.iter().any(|c| c[1] == USER && c[2] == "postgres"),
        "{clients:?}"
    );
    assert!(
        clients.iter().any(|c| c[1] == ADMIN && c[2] == "spillway"),
        "{clients:?}"
    );

    let cache = rows(&psql(&ctx, "show cache"));
    assert_eq!(cache.len(), 1);
    assert_eq!(cache[0][0], "t", "{cache:?}");

    let stats = rows(&psql(&ctx, "SHOW STATS"));
    let writes = stats
        .iter()
        .find(|r| r[0] == "spillway_client_writes_total" && r[1].contains("public.wb"))
        .unwrap_or_else(|| panic!("no client writes in {stats:?}"));
    assert_eq!(writes[2], "3");
    assert!(
        stats
            .iter()
            .any(|r| r[0] == "spillway_pending_writes" && r[2] == "3"),
        "{stats:?}"
    );

    // FLUSH returns once the writes are in PostgreSQL.
    assert_eq!(ctx.psql_direct("SELECT count(*) FROM wb").trim(), "0");
    let out = psql(&ctx, "FLUSH public.wb");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(ctx.psql_direct("SELECT count(*) FROM wb").trim(), "3");
    let pending = rows(&psql(&ctx, "SHOW PENDING"));
    assert_eq!(row(&pending, "public.wb")[1], "0");

    // INVALIDATE names what it dropped; a name nobody knows is 42P01.
    app.simple_query("SELECT v FROM wb WHERE id = 1")
        .await
        .expect("read through spillway");
    let invalidated = rows(&psql(&ctx, "INVALIDATE public.wb"));
    assert_eq!(invalidated, [["postgres", "public.wb", "table"]]);

    // Several statements in one Query run in turn (psql prints FLUSH's tag).
    let both = rows(&psql(&ctx, "FLUSH; SHOW CACHE"));
    assert_eq!(both.len(), 2, "{both:?}");
    assert_eq!(both[0], ["FLUSH"]);
    assert_eq!(both[1][0], "t");

    // Errors keep the session usable and carry their SQLSTATE.
    let console = crate::context::connect(&console_config(&ctx, ADMIN, PASSWORD)).await;
    let code = |e: tokio_postgres::Error| e.code().map(|c| c.code().to_owned());
    // RELOAD of an unchanged file changes nothing (tests/integration/reload.rs).
    let reloaded = console.simple_query("RELOAD").await.expect("RELOAD");
    assert!(
        !reloaded
            .iter()
            .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))),
        "nothing changed"
    );
    let err = console
        .simple_query("INVALIDATE public.nope")
        .await
        .expect_err("unknown table");
    assert_eq!(code(err).as_deref(), Some("42P01"));
    let err = console.simple_query("SELECT 1").await.expect_err("not SQL");
    assert_eq!(code(err).as_deref(), Some("42601"));
    // The extended protocol is refused per cycle, then the session goes on.
    let err = console
        .query("SHOW STATS", &[])
        .await
        .expect_err("extended");
    assert_eq!(code(err).as_deref(), Some("0A000"));
    let msgs = console.simple_query("SHOW PENDING").await.expect("simple");
    let rows: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get("table").map(str::to_owned)),
            _ => None,
        })
        .collect();
    assert_eq!(rows, [Some("public.wb".to_owned())]);

    let out = psql(&ctx, "RELOAD");
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test]
async fn console_refuses_other_roles_and_wrong_passwords() {
    let ctx = start().await;
    let refused = |config: String| async move {
        match tokio_postgres::connect(&config, tokio_postgres::NoTls).await {
            Ok(_) => panic!("{config} got in"),
            Err(e) => e.code().map(|c| c.code().to_owned()),
        }
    };
    // A role PostgreSQL would accept, but not listed in admin.users.
    assert_eq!(
        refused(console_config(&ctx, USER, PASSWORD))
            .await
            .as_deref(),
        Some("28000")
    );
    assert_eq!(
        refused(console_config(&ctx, ADMIN, "guess"))
            .await
            .as_deref(),
        Some("28P01")
    );
    let out = Command::new("psql")
        .args(["-X", "-d"])
        .arg(format!(
            "host=127.0.0.1 port={} user={ADMIN} dbname=spillway sslmode=disable",
            ctx.proxy.addr.port()
        ))
        .args(["-c", "SHOW STATS"])
        .env("PGPASSWORD", "guess")
        .output()
        .expect("psql");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("password authentication failed"),
        "{out:?}"
    );
    // Other databases are still relayed to PostgreSQL.
    ctx.proxy_client()
        .await
        .simple_query("SELECT 1")
        .await
        .expect("relayed session");

    // A verifier PostgreSQL made is one spillway accepts.
    ctx.psql_direct(
        "SET password_encryption = 'scram-sha-256'; CREATE ROLE pgmade LOGIN PASSWORD 'pencil'",
    );
    let stored = ctx.psql_direct("SELECT rolpassword FROM pg_authid WHERE rolname = 'pgmade'");
    let verifier =
        spillway::protocol::scram::Verifier::parse(stored.trim()).expect("PostgreSQL's verifier");
    let mut client = postgres_protocol::authentication::sasl::ScramSha256::new(
        b"pencil",
        postgres_protocol::authentication::sasl::ChannelBinding::unsupported(),
    );
    let (exchange, server_first) =
        spillway::protocol::scram::Exchange::start(&verifier, client.message()).expect("first");
    client.update(server_first.as_bytes()).expect("update");
    let server_final = exchange.finish(client.message()).expect("proof accepted");
    client
        .finish(server_final.as_bytes())
        .expect("server signature accepted");
}
