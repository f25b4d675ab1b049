//! `spillway demo`: a throwaway PostgreSQL with a small schema, spillway in front of
//! it with each write policy on one table, the admin console and `/metrics`, and what
//! to try ([`Demo::instructions`]). Everything is removed on Ctrl-C.
//!
//! Invariant: every command the instructions print runs as printed (a test follows
//! them with psql and checks that each does what its comment says).

use std::net::{SocketAddr, TcpListener};

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::ops::server::{Server, ServerError};
use crate::ops::throwaway::{ThrowawayError, ThrowawayPostgres};

pub const DEMO_DATABASE: &str = "demo";
pub const DEMO_USER: &str = "spillway";
/// The admin console's login in the demo (a throwaway, so a fixed password is fine).
pub const DEMO_ADMIN: &str = "admin";
pub const DEMO_ADMIN_PASSWORD: &str = "demo";
/// The port `/metrics` gets when it is free and the demo listens on its default
/// port, 6432 (the metrics port the README's config example uses).
const METRICS_PORT: u16 = 9187;
const DEFAULT_PORT: u16 = 6432;
/// Long enough to look at a deferred write before the flusher applies it.
const FLUSH_INTERVAL_SECS: u64 = 10;

/// The three policies, one table each (README, "Write-behind" and "Write-back"):
/// `accounts` is read through the cache and written through; `events` (it has a
/// foreign key, which write-back refuses) is write-behind; `counters` is write-back.
const DEMO_TABLES: &str = "
[tables.\"public.accounts\"]
policy = \"write-through\"
cache = true
[tables.\"public.events\"]
policy = \"write-behind\"
[tables.\"public.counters\"]
policy = \"write-back\"
row_counts = \"exact\"
";

/// The demo schema: a keyed table, an append-mostly table with a foreign key, and a
/// counter table — the shapes the write policies care about.
pub const DEMO_SCHEMA: &str = "
CREATE TABLE accounts (
    id      bigint PRIMARY KEY,
    name    text NOT NULL,
    balance numeric(12,2) NOT NULL DEFAULT 0
);
CREATE TABLE events (
    id         bigint PRIMARY KEY,
    account_id bigint NOT NULL REFERENCES accounts(id),
    kind       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE counters (
    id bigint PRIMARY KEY,
    n  bigint NOT NULL DEFAULT 0
);
INSERT INTO accounts SELECT g, 'account ' || g, g * 10 FROM generate_series(1, 1000) g;
INSERT INTO events SELECT g, 1 + g % 1000, 'signup' FROM generate_series(1, 5000) g;
INSERT INTO counters SELECT g, 0 FROM generate_series(1, 100) g;
";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Postgres(#[from] ThrowawayError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("demo configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
}

/// A running demo: PostgreSQL plus a bound (not yet serving) spillway.
pub struct Demo {
    pub postgres: ThrowawayPostgres,
    pub server: Server,
    pub addr: SocketAddr,
    /// Where `/metrics` is served.
    pub metrics: SocketAddr,
}

impl Demo {
    /// Starts PostgreSQL, loads the schema and binds spillway on `listen` (or, if that
    /// port is taken, on any free port).
    pub async fn start(listen: SocketAddr) -> Result<Demo, DemoError> {
        let postgres = ThrowawayPostgres::builder().superuser(DEMO_USER).start()?;
        postgres.psql("postgres", &format!("CREATE DATABASE {DEMO_DATABASE}"))?;
        postgres.psql(DEMO_DATABASE, DEMO_SCHEMA)?;
        let journal = postgres.dir().join("spillway-data");
        let metrics = metrics_addr(listen);
        let config_for = |listen: SocketAddr| {
            Config::from_toml_str(&format!(
                "[server]\nlisten = \"{listen}\"\nshutdown_timeout = \"5s\"\n\
                 [metrics]\nlisten = \"{metrics}\"\n\
                 [backend]\nurl = \"{}\"\n[journal]\ndir = \"{}\"\n\
                 [flush]\ninterval = \"{FLUSH_INTERVAL_SECS}s\"\n\
                 [admin]\nusers = [\"{DEMO_ADMIN}\"]\npassword = \"{DEMO_ADMIN_PASSWORD}\"\n\
                 {DEMO_TABLES}",
                postgres.url(DEMO_USER, DEMO_DATABASE),
                journal.display()
            ))
        };
        let server = match Server::bind(config_for(listen)?).await {
            Ok(s) => s,
            Err(ServerError::Bind { .. }) => {
                tracing::warn!(%listen, "address in use; picking a free port instead");
                Server::bind(config_for(SocketAddr::new(listen.ip(), 0))?).await?
            }
            Err(e) => return Err(e.into()),
        };
        let addr = server.local_addr().map_err(|e| ServerError::Bind {
            addr: listen,
            error: e,
        })?;
        Ok(Demo {
            postgres,
            server,
            addr,
            metrics,
        })
    }

    pub fn url(&self) -> String {
        format!(
            "postgres://{DEMO_USER}@{}:{}/{DEMO_DATABASE}",
            self.addr.ip(),
            self.addr.port()
        )
    }

    /// The console's URL (user, password and database `spillway` included).
    pub fn console_url(&self) -> String {
        format!(
            "postgres://{DEMO_ADMIN}:{DEMO_ADMIN_PASSWORD}@{}:{}/spillway",
            self.addr.ip(),
            self.addr.port()
        )
    }

    /// What the demo prints once it is up: where to connect, and what to try. Each
    /// `psql` line runs as printed; its comment says what it shows.
    pub fn instructions(&self) -> String {
        let through = self.url();
        let direct = self.postgres.url(DEMO_USER, DEMO_DATABASE);
        let console = self.console_url();
        let metrics = format!("http://{}/metrics", self.metrics);
        let read = "SELECT name, balance FROM accounts WHERE id = 42";
        let applied = "SELECT (SELECT n FROM counters WHERE id = 1) AS n, \
                       (SELECT count(*) FROM events WHERE id = 5001) AS events";
        let wait = FLUSH_INTERVAL_SECS;
        format!(
            "spillway demo is ready.\n\
             \x20 through spillway: psql {through}\n\
             \x20 direct:           psql {direct}\n\
             \x20 admin console:    psql {console}\n\
             \x20 metrics:          {metrics}\n\
             \n\
             Tables (database {DEMO_DATABASE}): accounts is write-through and cached, \
             events write-behind, counters write-back.\n\
             \n\
             Try this:\n\
             1. A cached read, twice: the second answer comes from spillway's memory \
             (spillway_cache_hits_total on {metrics} goes up).\n\
             \x20   psql \"{through}\" -c \"{read}\"\n\
             \x20   psql \"{through}\" -c \"{read}\"\n\
             2. Deferred writes, acknowledged from spillway's journal and applied to \
             PostgreSQL within {wait} s:\n\
             \x20   psql \"{through}\" -c \"UPDATE counters SET n = n + 1 WHERE id = 1\"   # UPDATE 1 (write-back)\n\
             \x20   psql \"{through}\" -c \"INSERT INTO events (id, account_id, kind) VALUES (5001, 42, 'demo')\"   # INSERT 0 1 (write-behind)\n\
             \x20   psql \"{direct}\" -c \"{applied}\"   # directly: 0 and 0, not applied yet\n\
             3. Apply pending writes now:\n\
             \x20   psql \"{through}\" -c \"SPILLWAY FLUSH\"\n\
             \x20   psql \"{direct}\" -c \"{applied}\"   # directly: now 1 and 1\n\
             4. The admin console (user {DEMO_ADMIN}, password {DEMO_ADMIN_PASSWORD}): \
             each table's policy, then the cache's hits.\n\
             \x20   psql \"{console}\" -c \"SHOW TABLES\"\n\
             \x20   psql \"{console}\" -c \"SHOW CACHE\"\n\
             \n\
             Press Ctrl-C to stop; everything is removed on exit.\n"
        )
    }

    /// Serves until `shutdown`, then stops spillway and PostgreSQL.
    pub async fn run(self, shutdown: CancellationToken) {
        let Demo {
            postgres, server, ..
        } = self;
        server.run(shutdown).await;
        drop(postgres);
    }
}

/// `/metrics` on the listen address's host: with the default listen address, port
/// 9187 when it is free; else (and for any other listen address, as tests and second
/// demos use) a free port, found by binding it: the moment between that and
/// spillway's bind is a race a demo can live with.
fn metrics_addr(listen: SocketAddr) -> SocketAddr {
    let ip = listen.ip();
    let preferred = (listen.port() == DEFAULT_PORT).then_some(METRICS_PORT);
    preferred
        .into_iter()
        .chain([0])
        .find_map(|port| TcpListener::bind((ip, port)).ok()?.local_addr().ok())
        .unwrap_or(SocketAddr::new(ip, 0))
}
