//! The real binary against a throwaway PostgreSQL it starts itself (spillway's
//! `ThrowawayPostgres`, ADR 0005), used as both targets: setup, every scenario in every
//! protocol mode for two 250 ms rounds (no errors, correctness passes), the files it
//! writes, each `report.json` checked against `report.schema.json`; and the clear
//! failures (a target that is down, tables not set up, bad arguments). Not a
//! benchmark: nothing is asserted about speed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use spillway::ops::throwaway::ThrowawayPostgres;

const BIN: &str = env!("CARGO_BIN_EXE_spillway-loadtest");

fn loadtest(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("spillway-loadtest runs")
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn reports(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).expect("out dir") {
        let path = entry.expect("entry").path();
        if path.join("report.json").is_file() {
            found.push(path);
        }
    }
    found.sort();
    found
}

/// A stand-in for spillway's `/metrics` (which it does not serve yet): every answer
/// advances the counters, so each measured round sees 9 hits, 1 miss, 1 fallback, 10
/// client writes and 1 upstream statement per read, and a flush lag of 0.25 s.
fn fake_metrics() -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for (n, stream) in (1u64..).zip(listener.incoming()) {
            let Ok(mut stream) = stream else { continue };
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => request.extend_from_slice(&buf[..k]),
                }
            }
            let body = format!(
                "# TYPE spillway_cache_hits_total counter\n\
                 spillway_cache_hits_total {}\n\
                 spillway_cache_misses_total {n}\n\
                 spillway_fallbacks_total{{reason=\"on_conflict\",table=\"public.lt_counters\"}} {n}\n\
                 spillway_client_writes_total{{table=\"public.lt_counters\",policy=\"write-back\"}} {}\n\
                 spillway_upstream_statements_total {n}\n\
                 spillway_pending_oldest_age_seconds{{table=\"public.lt_counters\"}} 0.25\n",
                9 * n,
                10 * n
            );
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    format!("b=http://127.0.0.1:{port}/metrics")
}

fn schema_validator() -> jsonschema::Validator {
    let schema: serde_json::Value =
        serde_json::from_str(include_str!("../report.schema.json")).expect("the schema is JSON");
    jsonschema::validator_for(&schema).expect("the schema is a valid JSON Schema")
}

#[test]
fn every_scenario_in_every_mode_against_postgres() {
    let pg = ThrowawayPostgres::builder()
        .start()
        .expect("throwaway PostgreSQL starts");
    let url = pg.url("spillway", "postgres");
    let tmp = tempfile::tempdir().expect("tempdir");
    let config_out = tmp.path().join("tables.toml");

    let out = loadtest(&[
        "setup",
        "--target",
        &url,
        "--config-out",
        config_out.to_str().expect("utf8"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let config = std::fs::read_to_string(&config_out).expect("config written");
    assert!(
        config.contains("[tables.\"public.lt_counters\"]\npolicy = \"write-back\""),
        "{config}"
    );
    assert!(
        config.contains("[tables.\"public.lt_orm_items\"]"),
        "{config}"
    );

    let a = format!("a={url}");
    let b = format!("b={url}");
    let validator = schema_validator();
    let metrics = fake_metrics();
    for mode in ["simple", "extended", "prepared"] {
        let results = tmp.path().join(mode);
        let out = loadtest(&[
            "run",
            "-s",
            "all",
            "-t",
            &a,
            "-t",
            &b,
            "--clients",
            "2",
            "--rounds",
            "2",
            "--duration",
            "250ms",
            "--warmup",
            "100ms",
            "--mode",
            mode,
            "--seed",
            "7",
            "--progress",
            "plain",
            "--out",
            results.to_str().expect("utf8"),
            "--metrics",
            &metrics,
        ]);
        let log = text(&out);
        assert!(out.status.success(), "{mode}: {log}");
        // Plain progress (not a terminal), the Markdown report and the summary.
        assert!(log.contains("round 2/2 b: "), "{log}");
        assert!(log.contains("| target | median tps | vs a |"), "{log}");
        assert!(log.contains("## Summary"), "{log}");
        assert!(
            log.contains(
                "- b: hit ratio 0.900, fallbacks 2 (on_conflict: 2), \
                 upstream statements per client write 0.10, flush lag max 0.250 s"
            ),
            "{log}"
        );

        let dirs = reports(&results);
        assert_eq!(dirs.len(), 8, "{dirs:?}");
        for dir in &dirs {
            let json: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(dir.join("report.json")).expect("report.json"),
            )
            .expect("report.json is JSON");
            let errors: Vec<String> = validator
                .iter_errors(&json)
                .map(|e| e.to_string())
                .collect();
            assert!(errors.is_empty(), "{}: {errors:#?}", dir.display());
            let writes = json["scenario"]["writes"].as_bool().expect("writes");
            let expected_ok = if writes {
                serde_json::Value::Bool(true)
            } else {
                serde_json::Value::Null
            };
            assert_eq!(json["correctness_ok"], expected_ok, "{json:#}");
            assert_eq!(json["baseline"], "a");
            assert_eq!(json["settings"]["seed"], 7);
            assert_eq!(json["settings"]["mode"], mode);
            let ratios = json["ratios"].as_array().expect("ratios");
            assert_eq!(ratios.len(), 1);
            assert_eq!(
                ratios[0]["per_round"].as_array().expect("per_round").len(),
                2
            );
            let m = &json["targets"][1]["metrics"];
            assert_eq!(m["available"], true, "{m:#}");
            assert_eq!(m["hit_ratio"], 0.9, "{m:#}");
            assert_eq!(m["flush_lag_max_seconds"], 0.25, "{m:#}");
            assert_eq!(json["targets"][0]["metrics"]["available"], false);
            for t in json["targets"].as_array().expect("targets") {
                assert_eq!(t["rounds"].as_array().expect("rounds").len(), 2);
                assert!(t["ops"].as_u64().expect("ops") > 0, "{t:#}");
                assert_eq!(t["error_total"], 0, "{t:#}");
                if writes {
                    // Both targets are one database: each check adds up both ledgers.
                    assert_eq!(t["correctness"]["writers"], serde_json::json!(["a", "b"]));
                }
            }
            let name = json["scenario"]["name"].as_str().expect("name");
            for file in ["report.md", "plot.svg"] {
                let body = std::fs::read_to_string(dir.join(file)).expect(file);
                assert!(body.contains(name), "{file}");
            }
            let png = std::fs::read(dir.join("plot.png")).expect("plot.png");
            assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
        }
        assert!(
            std::fs::read_dir(&results).expect("results").any(|e| e
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .starts_with("summary-")),
            "summary written"
        );
    }

    // A database without the tables: a message that says what to run.
    pg.psql("postgres", "CREATE DATABASE empty")
        .expect("create database");
    let empty = format!("direct={}", pg.url("spillway", "empty"));
    let out = loadtest(&["run", "-s", "point-read", "-t", &empty, "--duration", "1s"]);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("are not set up"), "{log}");
    assert!(
        log.contains("spillway-loadtest setup --target URL --scenario point-read"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn a_target_that_is_down_is_reported_not_a_panic() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let target = format!("spillway=postgres://app@127.0.0.1:{port}/app");
    let out = loadtest(&["run", "-s", "point-read", "-t", &target, "--duration", "1s"]);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "target spillway (postgres://app@127.0.0.1:{port}/app): cannot connect"
        )),
        "{log}"
    );
    assert!(log.contains("Is it running"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn bad_arguments_exit_2_with_the_reason() {
    let cases: &[(&[&str], &str)] = &[
        (&["run", "-t", "d=postgres://u@h/d"], "--scenario"),
        (
            &["run", "-s", "nope", "-t", "d=postgres://u@h/d"],
            "unknown scenario \"nope\"",
        ),
        (
            &["run", "-s", "point-read", "-t", "postgres://u@h/d"],
            "expected NAME=URL",
        ),
        (
            &[
                "run",
                "-s",
                "point-read",
                "-t",
                "d=postgres://u@h/d",
                "--rounds",
                "0",
            ],
            "--rounds",
        ),
        (
            &[
                "run",
                "-s",
                "point-read",
                "-t",
                "d=postgres://u@h/d",
                "-t",
                "d=postgres://u@h/e",
            ],
            "used twice",
        ),
        (
            &[
                "run",
                "-s",
                "point-read",
                "-t",
                "d=postgres://u@h/d",
                "--metrics",
                "http://h/m",
            ],
            "which target",
        ),
        (&["setup"], "--target"),
    ];
    for (args, expected) in cases {
        let out = loadtest(args);
        let log = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {log}");
        assert!(log.contains(expected), "{args:?}: {log}");
    }
    let out = loadtest(&["scenarios"]);
    assert!(out.status.success());
    let listing = String::from_utf8_lossy(&out.stdout);
    for name in ["point-read", "mixed-session", "policy = \"write-behind\""] {
        assert!(listing.contains(name), "{listing}");
    }
}
