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
