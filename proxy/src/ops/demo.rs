//! `spillway demo`: a throwaway PostgreSQL with a small schema, spillway in front of
//! it, and the URL to connect with. Everything is removed on Ctrl-C.

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::ops::server::{Server, ServerError};
use crate::ops::throwaway::{ThrowawayError, ThrowawayPostgres};

pub const DEMO_DATABASE: &str = "demo";
pub const DEMO_USER: &str = "spillway";

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
}

impl Demo {
    /// Starts PostgreSQL, loads the schema and binds spillway on `listen` (or, if that
    /// port is taken, on any free port).
    pub async fn start(listen: SocketAddr) -> Result<Demo, DemoError> {
        let postgres = ThrowawayPostgres::builder().superuser(DEMO_USER).start()?;
        postgres.psql("postgres", &format!("CREATE DATABASE {DEMO_DATABASE}"))?;
        postgres.psql(DEMO_DATABASE, DEMO_SCHEMA)?;
        let journal = postgres.dir().join("spillway-data");
        let config_for = |listen: SocketAddr| {
            Config::from_toml_str(&format!(
                "[server]\nlisten = \"{listen}\"\nshutdown_timeout = \"5s\"\n\
                 [metrics]\nlisten = \"127.0.0.1:0\"\n\
                 [backend]\nurl = \"{}\"\n[journal]\ndir = \"{}\"\n",
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
        })
    }

    pub fn url(&self) -> String {
        format!(
            "postgres://{DEMO_USER}@{}:{}/{DEMO_DATABASE}",
            self.addr.ip(),
            self.addr.port()
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
