//! Real client drivers, from their registries, against spillway and against PostgreSQL
//! directly: psycopg 3, asyncpg, SQLAlchemy and Django (Python), pg and knex (Node).
//!
//! `bash .ci/setup test` (part of the README's test command) installs the versions
//! pinned in `proxy/tests/drivers/` into `$SPILLWAY_DRIVERS` (default
//! `target/drivers`): a venv and a node_modules. A test runs one of the scripts beside
//! the pins with a connection URL, once through spillway and once direct; each script
//! prints one JSON value of what it observed, and the test compares the two and checks
//! what the scenario is about. A missing install fails the test with the command that
//! makes it, never skips it.

mod backend_pid;
mod refusal;
mod shop;
mod smoke;
mod startup;
mod type_cache;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use crate::context::{Context, DB, USER};

/// Where `.ci/setup test` put the drivers.
fn drivers_dir() -> PathBuf {
    match std::env::var_os("SPILLWAY_DRIVERS") {
        Some(dir) => PathBuf::from(dir),
        None => repo().join("target/drivers"),
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The pinned scripts and pin files.
fn scripts() -> PathBuf {
    repo().join("proxy/tests/drivers")
}

#[derive(Clone, Copy)]
pub enum Lang {
    Python,
    Node,
}

/// Runs `script` (under `proxy/tests/drivers/python/` or `node/`) with `args`; its
/// stdout parsed as JSON. Panics with the script's stderr when it fails or runs longer
/// than a minute.
pub async fn run(lang: Lang, script: &str, args: &[&str]) -> serde_json::Value {
    let drivers = drivers_dir();
    let (program, path, env) = match lang {
        Lang::Python => (
            drivers.join("venv/bin/python"),
            scripts().join("python").join(script),
            ("PYTHONDONTWRITEBYTECODE", drivers.join("venv")),
        ),
        Lang::Node => (
            PathBuf::from("node"),
            scripts().join("node").join(script),
            ("NODE_PATH", drivers.join("node/node_modules")),
        ),
    };
    let installed = match lang {
        Lang::Python => program.exists(),
        Lang::Node => env.1.exists(),
    };
    assert!(
        installed,
        "the driver tests need the pinned drivers in {}: run `bash .ci/setup test` (the \
         README's test command does)",
        drivers.display()
    );
    let child = tokio::process::Command::new(&program)
        .arg(&path)
        .args(args)
        .env(env.0, &env.1)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{script} {args:?} ran over a minute"))
        .expect("driver script output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script} {args:?} failed ({}):\n{stderr}\n{stdout}",
        out.status
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("{script} {args:?} printed no JSON ({e}):\n{stdout}\nstderr:\n{stderr}")
    })
}

/// Connection URLs for drivers: through spillway and direct.
pub fn urls(ctx: &Context) -> (String, String) {
    let url = |port: u16| format!("postgresql://{USER}@127.0.0.1:{port}/{DB}?sslmode=disable");
    (url(ctx.proxy.addr.port()), url(ctx.pg.port()))
}

/// Runs `script` through spillway and directly; both results, in that order.
pub async fn both(
    ctx: &Context,
    lang: Lang,
    script: &str,
) -> (serde_json::Value, serde_json::Value) {
    let (through, direct) = urls(ctx);
    let a = run(lang, script, &[&through]).await;
    let b = run(lang, script, &[&direct]).await;
    (a, b)
}
