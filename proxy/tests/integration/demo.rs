//! `spillway demo`, the README's first command: it must come up, serve its schema
//! through spillway, and leave nothing running after Ctrl-C.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test]
async fn demo_serves_its_schema_and_cleans_up_on_sigint() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(["demo", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn spillway demo");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut urls = (None, None);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let url = line.split_whitespace().last().map(str::to_owned);
            if line.contains("through spillway:") {
                urls.0 = url;
            } else if line.contains("direct:") {
                urls.1 = url;
            }
            if let (Some(a), Some(b)) = &urls {
                let _ = tx.send((a.clone(), b.clone()));
                urls = (None, None);
            }
        }
    });
    let (through, direct) = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(urls) => urls,
        Err(e) => {
            let _ = child.kill();
            let out = child.wait_with_output().expect("demo output");
            panic!(
                "demo did not print its URLs ({e}); stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };

    let (client, conn) = match tokio_postgres::connect(&through, tokio_postgres::NoTls).await {
        Ok(pair) => pair,
        Err(e) => {
            let _ = child.kill();
            let out = child.wait_with_output().expect("demo output");
            panic!(
                "connect through the demo: {e}; demo stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    tokio::spawn(conn);
    let n: i64 = client
        .query_one("SELECT count(*) FROM accounts", &[])
        .await
        .expect("query the demo schema")
        .get(0);
    assert_eq!(n, 1000);
    drop(client);

    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "demo did not exit after SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "demo exit status {exit}");
    // The throwaway PostgreSQL is gone too.
    let gone = tokio_postgres::connect(&direct, tokio_postgres::NoTls).await;
    assert!(
        gone.is_err(),
        "throwaway PostgreSQL still accepts connections"
    );
}

/// Runs `spillway demo` and returns it with what it printed up to "Press Ctrl-C".
fn start_demo() -> (std::process::Child, Vec<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(["demo", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn spillway demo");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let done = line.starts_with("Press Ctrl-C");
            lines.push(line);
            if done {
                let _ = tx.send(std::mem::take(&mut lines));
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(90)) {
        Ok(lines) => (child, lines),
        Err(e) => {
            let _ = child.kill();
            panic!("demo did not print its instructions ({e})");
        }
    }
}

/// The `psql` commands of "Try this" step `n`, as printed.
fn step(lines: &[String], n: usize) -> Vec<String> {
    let head = format!("{n}. ");
    lines
        .iter()
        .skip_while(|l| !l.starts_with(&head))
        .skip(1)
        .take_while(|l| l.starts_with("    "))
        .map(|l| l.trim().to_owned())
        .collect()
}

/// Runs a printed command line with the shell, as a person pasting it would.
fn sh(command: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", command])
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("run sh");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{command}\nfailed: {}\n{text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The first data row of psql's aligned output, cell by cell.
fn first_row(output: &str) -> Vec<String> {
    let row = output
        .lines()
        .skip_while(|l| !l.starts_with('-'))
        .nth(1)
        .unwrap_or_else(|| panic!("no row in {output}"));
    row.split('|').map(|c| c.trim().to_owned()).collect()
}

/// `spillway_cache_hits_total` from the printed /metrics URL (0 before the first hit).
fn cache_hits(metrics_url: &str) -> f64 {
    use std::io::{Read, Write};
    let rest = metrics_url.strip_prefix("http://").expect("an http URL");
    let (host, path) = rest.split_once('/').expect("host/path");
    let mut conn = std::net::TcpStream::connect(host).expect("connect to /metrics");
    write!(
        conn,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut body = String::new();
    conn.read_to_string(&mut body).expect("response");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix("spillway_cache_hits_total "))
        .map(|v| v.trim().parse().expect("a number"))
        .unwrap_or(0.0)
}

#[tokio::test]
async fn demo_instructions_do_what_they_say() {
    let (mut child, lines) = start_demo();
    let text = lines.join("\n");
    let url_after = |label: &str| {
        lines
            .iter()
            .find_map(|l| l.trim_start().strip_prefix(label))
            .and_then(|rest| rest.split_whitespace().last())
            .unwrap_or_else(|| panic!("no {label} line in:\n{text}"))
            .to_owned()
    };
    let metrics = url_after("metrics:");
    assert!(metrics.ends_with("/metrics"), "{text}");
    assert!(url_after("admin console:").ends_with("/spillway"), "{text}");
    assert!(
        text.contains(
            "accounts is write-through and cached, events write-behind, counters write-back"
        ),
        "{text}"
    );

    // 1. A cached read, twice: the same answer, and a cache hit.
    let read = step(&lines, 1);
    assert_eq!(read.len(), 2, "{text}");
    let before = cache_hits(&metrics);
    let first = sh(&read[0]);
    let second = sh(&read[1]);
    assert!(first.contains("account 42"), "{first}");
    assert_eq!(first, second);
    assert!(cache_hits(&metrics) > before, "no cache hit counted");

    // 2. Deferred writes: acknowledged, not yet in PostgreSQL.
    let deferred = step(&lines, 2);
    assert_eq!(deferred.len(), 3, "{text}");
    assert!(sh(&deferred[0]).contains("UPDATE 1"));
    assert!(sh(&deferred[1]).contains("INSERT 0 1"));
    assert_eq!(
        first_row(&sh(&deferred[2])),
        ["0", "0"],
        "applied before the flush"
    );

    // 3. SPILLWAY FLUSH applies them.
    let flush = step(&lines, 3);
    assert_eq!(flush.len(), 2, "{text}");
    sh(&flush[0]);
    assert_eq!(
        first_row(&sh(&flush[1])),
        ["1", "1"],
        "not applied by the flush"
    );

    // 4. The console shows the three policies and the hit.
    let console = step(&lines, 4);
    assert_eq!(console.len(), 2, "{text}");
    let tables = sh(&console[0]);
    for (table, policy) in [
        ("public.accounts", "write-through"),
        ("public.events", "write-behind"),
        ("public.counters", "write-back"),
    ] {
        assert!(
            tables
                .lines()
                .any(|l| l.contains(table) && l.contains(policy)),
            "{table} {policy} not in\n{tables}"
        );
    }
    let cache = sh(&console[1]);
    assert!(cache.contains("hits"), "{cache}");

    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("try_wait").is_none() {
        assert!(Instant::now() < deadline, "demo did not exit after SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    }
}
