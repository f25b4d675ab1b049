//! The benchmark scripts run end to end and produce their report, with PostgreSQL
//! behind the link (`-L`): `write-bench.sh` (PostgreSQL's CPU per operation for both
//! targets, the summary), `pgbench/compare.sh` and `pgbench/pool.sh`; `idle.sh` and
//! `nats-bench.sh` on loopback. Short rounds; nothing is asserted about speed or
//! memory, only that the runs happen, check what they check and say what they measured.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const LOADTEST: &str = env!("CARGO_BIN_EXE_spillway-loadtest");

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The spillway binary of the same build, built if this test runs alone.
fn spillway() -> PathBuf {
    let bin = Path::new(LOADTEST)
        .parent()
        .expect("bin dir")
        .join("spillway");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let status = Command::new(cargo)
            .args(["build", "-p", "spillway", "--bin", "spillway"])
            .current_dir(root())
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building spillway");
    }
    bin
}

fn script(path: &str, args: &[&str], cwd: &Path) -> Output {
    Command::new("bash")
        .arg(root().join(path))
        .args(args)
        .env("SPILLWAY_BIN", spillway())
        .env("LOADTEST_BIN", LOADTEST)
        .env_remove("RUST_LOG")
        .current_dir(cwd)
        .output()
        .expect("bash runs")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn write_bench_behind_the_link_reports_postgres_cpu_per_operation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = [
        "-d",
        "500ms",
        "-w",
        "0s",
        "-r",
        "1",
        "-c",
        "2",
        "-L",
        "1ms",
        "-S",
        "write-update orm-tx",
    ];
    let out = script("loadtest/write-bench.sh", &args, dir.path());
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("behind a link adding a 1ms round trip"),
        "{stderr}"
    );
    // The link's closing line: it carried connections.
    let link = stderr
        .lines()
        .find(|l| l.contains("link: stopped;"))
        .unwrap_or_else(|| panic!("no closing line from the link:\n{stderr}"));
    assert!(!link.contains("stopped; 0 connections"), "{link}");
    assert!(stdout.contains("## Summary"), "{stdout}");
    assert!(
        stdout.contains("direct PG CPU µs/op | spillway PG CPU µs/op |"),
        "{stdout}"
    );
    let mut reports = 0;
    for entry in std::fs::read_dir(dir.path().join("loadtest-results")).expect("results") {
        let path = entry.expect("entry").path().join("report.json");
        if !path.is_file() {
            continue;
        }
        reports += 1;
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        assert_eq!(json["correctness_ok"], true, "{}", path.display());
        for t in json["targets"].as_array().expect("targets") {
            assert!(
                t["pg_cpu_us_per_op"].as_f64().is_some_and(|x| x >= 0.0),
                "{}: {}",
                path.display(),
                t["pg_cpu_us_per_op"]
            );
        }
    }
    assert_eq!(reports, 2);
}

#[test]
fn compare_behind_the_link_prints_its_ratios() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = [
        "-T", "1", "-r", "1", "-s", "1", "-M", "prepared", "-L", "500us",
    ];
    let out = script("loadtest/pgbench/compare.sh", &args, dir.path());
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("PostgreSQL behind a 500us round trip"),
        "{stdout}"
    );
    assert!(
        stdout.contains("select-only    prepared   spillway/direct = "),
        "{stdout}"
    );
    assert!(!stdout.contains("=failed"), "{stdout}");
}

#[test]
fn pool_runs_more_clients_than_its_pool_and_checks_the_balances() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = ["-c", "40", "-b", "8", "-T", "2", "-r", "1", "-s", "1"];
    let out = script("loadtest/pgbench/pool.sh", &args, dir.path());
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(
        stdout.matches("failed 0 (0.000%)").count(),
        2,
        "both 40-client runs on a pool of 20 finish without a failed transaction:\n{stdout}"
    );
    // pgbench does not count aborted clients as failed transactions: its errors (a
    // pool exhausted while statements pin their connections) are printed instead.
    assert!(!stdout.contains("pgbench: "), "{stdout}");
    assert!(!stdout.contains("CHECK FAILED"), "{stdout}");
    assert!(stdout.contains("spillway pool:"), "{stdout}");
}

#[test]
fn idle_clients_are_served_and_their_memory_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = script("loadtest/idle.sh", &["-n", "120", "-b", "40"], dir.path());
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("spillway "))
        .expect("spillway's line");
    let json: serde_json::Value = serde_json::from_str(line).expect("idle.py JSON");
    assert_eq!(json["clients"], 120, "{json}");
    assert_eq!(json["last_served"], true, "{json}");
    assert!(
        json["rss_kib"][0][1].as_u64().is_some_and(|k| k > 0),
        "{json}"
    );
    assert!(stderr.contains("bytes per idle client"), "{stderr}");
}

#[test]
fn nats_bench_compares_the_journals_and_checks_every_target() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = ["-d", "1s", "-w", "0s", "-r", "1", "-S", "write-insert"];
    let out = script("loadtest/nats-bench.sh", &args, dir.path());
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for target in ["local", "nats-r1", "nats-r3"] {
        assert!(
            stdout.contains(&format!("{target}/direct: median of rounds")),
            "{target}:\n{stdout}"
        );
        assert!(
            stdout.contains(&format!("- {target}: passed")),
            "{target}'s writes checked:\n{stdout}"
        );
    }
}

#[test]
fn sweep_over_two_round_trips_writes_its_tables_and_plots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = dir.path().join("sweep");
    let out_arg = out_dir.to_str().expect("utf-8 path");
    let args = [
        "-R",
        "0 500us",
        "-c",
        "2",
        "-M",
        "prepared",
        "-S",
        "point-read write-update",
        "-d",
        "300ms",
        "-w",
        "0s",
        "-r",
        "1",
        "-o",
        out_arg,
    ];
    let mut cmd = Command::new("bash");
    cmd.arg(root().join("loadtest/sweep.sh"))
        .args(args)
        .env("SPILLWAY_BIN", spillway())
        .env("LOADTEST_BIN", LOADTEST)
        .env("PREFILL", "300ms")
        .env_remove("RUST_LOG")
        .current_dir(dir.path());
    let out = cmd.output().expect("bash runs");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(!stderr.contains("failed (exit"), "{stderr}");
    assert!(!stderr.contains("prefill of"), "{stderr}");
    let md = std::fs::read_to_string(out_dir.join("sweep.md")).expect("sweep.md");
    // One row per round trip for each scenario, the pass-through columns for point-read.
    for row in [
        "| prepared | 2 | 0 |",
        "| prepared | 2 | 500us |",
        "### point-read",
        "### write-update",
        "pass-through / PgBouncer",
    ] {
        assert!(md.contains(row), "{row} missing:\n{md}");
    }
    assert!(!md.contains("correctness check failed"), "{md}");
    assert_eq!(md.matches("| prepared | 2 |").count(), 4, "{md}");
    // Latency needs 200 samples per point: point-read has them even in short rounds.
    for plot in [
        "point-read-prepared-c2-latency.svg",
        "write-update-prepared-c2-tps.svg",
    ] {
        let svg = std::fs::read_to_string(out_dir.join("plots").join(plot)).expect("plot");
        assert!(svg.contains("<polyline"), "{plot} has no line");
    }
}

#[test]
fn storm_is_served_or_refused_with_53300_and_spillway_stays_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = script(
        "loadtest/storm.sh",
        &["-n", "300", "-l", "40", "-v", "150"],
        dir.path(),
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).expect("storm.py JSON");
    let outcomes = json["outcomes"].as_object().expect("outcomes");
    // Exactly the limit served, every other connection refused as PostgreSQL refuses.
    assert_eq!(
        outcomes.get("served").and_then(|v| v.as_u64()),
        Some(40),
        "{json}"
    );
    assert_eq!(
        outcomes.get("refused:53300").and_then(|v| v.as_u64()),
        Some(260),
        "{json}"
    );
    assert_eq!(outcomes.len(), 2, "{json}");
    assert_eq!(json["fresh_client"], "served", "{json}");
    assert!(
        json["rss_kib"]["peak"].as_u64().is_some_and(|k| k > 0),
        "{json}"
    );
}

#[test]
fn a_short_soak_samples_and_checks_every_round() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = script(
        "loadtest/soak.sh",
        &["-t", "16", "-r", "4s", "-R", "5", "-w", "0"],
        dir.path(),
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let start = stdout.find('{').expect("summary JSON");
    let json: serde_json::Value = serde_json::from_str(&stdout[start..]).expect("summary");
    assert!(json["samples"].as_u64().is_some_and(|n| n >= 1), "{json}");
    // Five loads, each at least one round, each with its correctness check.
    assert!(json["runs"].as_u64().is_some_and(|n| n >= 5), "{json}");
    assert_eq!(json["correctness_failed"], 0, "{json}");
    assert!(json["reconnects"].as_u64().is_some_and(|n| n > 0), "{json}");
    assert_eq!(json["failures"], serde_json::json!([]), "{json}");
}
