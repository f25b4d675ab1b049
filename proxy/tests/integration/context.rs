//! The test context: a throwaway PostgreSQL started by the test itself and the real
//! `spillway` binary in front of it on port 0, plus clients for both paths.
//!
//! Built with [`Context::builder`]; everything is torn down on drop (spillway killed,
//! PostgreSQL stopped, directories removed), also when the test panics.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spillway::ops::throwaway::{Builder as PgBuilder, ThrowawayPostgres};

pub const USER: &str = "spillway";
pub const DB: &str = "postgres";

pub struct ContextBuilder {
    pg: PgBuilder,
    config: String,
    env: Vec<(String, String)>,
    /// SQL run on PostgreSQL (as the superuser) before spillway starts.
    setup: Vec<String>,
}

impl ContextBuilder {
    /// Adjusts the PostgreSQL server before it starts.
    pub fn pg(mut self, f: impl FnOnce(PgBuilder) -> PgBuilder) -> Self {
        self.pg = f(self.pg);
        self
    }

    /// Extra `[server]` keys, one `key = value` per line.
    pub fn server(mut self, lines: &str) -> Self {
        self.config = self
            .config
            .replacen("[server]\n", &format!("[server]\n{lines}\n"), 1);
        self
    }

    /// Raw TOML appended to the config file: whole sections with their header, for
    /// example `[cache]\nttl = "1s"` or `[tables."public.t"]\ncache = false`.
    pub fn section(mut self, toml: &str) -> Self {
        self.config.push_str(toml);
        self.config.push('\n');
        self
    }

    /// SQL run directly on PostgreSQL before spillway starts (tables that deferred
    /// policies check at startup).
    pub fn before_proxy(mut self, sql: &str) -> Self {
        self.setup.push(sql.to_owned());
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    pub async fn start(self) -> Context {
        self.start_via(|port| port).await
    }

    /// Like [`ContextBuilder::start`], but spillway's `backend.url` names the port
    /// `via` returns for PostgreSQL's (a fault-injecting forwarder in front of it).
    pub async fn start_via(self, via: impl FnOnce(u16) -> u16) -> Context {
        let pg = tokio::task::spawn_blocking(move || self.pg.start())
            .await
            .expect("pg start task")
            .expect("throwaway PostgreSQL starts");
        for sql in &self.setup {
            pg.psql(DB, sql).expect("setup before spillway");
        }
        let mut config = self.config;
        config.push_str(&format!(
            "[backend]\nurl = \"postgres://{USER}@127.0.0.1:{}/{DB}?sslmode=disable\"\n",
            via(pg.port())
        ));
        if !config.contains("[journal]") {
            // Each test its own journal, inside PostgreSQL's throwaway directory.
            let dir = pg.dir().join("journal");
            config.push_str(&format!("[journal]\ndir = \"{}\"\n", dir.display()));
        }
        let proxy = Proxy::spawn(&pg, &config, &self.env);
        Context {
            proxy,
            pg,
            config,
            env: self.env,
        }
    }
}

pub struct Context {
    // Field order = drop order: spillway goes before PostgreSQL.
    pub proxy: Proxy,
    pub pg: ThrowawayPostgres,
    config: String,
    env: Vec<(String, String)>,
}

impl Context {
    pub fn builder() -> ContextBuilder {
        ContextBuilder {
            pg: ThrowawayPostgres::builder(),
            config: "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_timeout = \"5s\"\n\
                     [metrics]\nlisten = \"127.0.0.1:0\"\n\n"
                .to_owned(),
            env: Vec::new(),
            setup: Vec::new(),
        }
    }

    /// Starts spillway again with the same config (after it exited or was killed);
    /// the previous process is killed if it still runs.
    pub fn restart_proxy(&mut self) {
        if let Err(log) = self.try_restart_proxy() {
            panic!("spillway did not start listening; log:\n{log}");
        }
    }

    /// [`Self::restart_proxy`] for a start that may be refused: its log when it is.
    pub fn try_restart_proxy(&mut self) -> Result<(), String> {
        self.proxy.kill();
        let fresh = Proxy::try_spawn(&self.pg, &self.config, &self.env)?;
        let old = std::mem::replace(&mut self.proxy, fresh);
        drop(old);
        Ok(())
    }

    pub async fn start() -> Context {
        Self::builder().start().await
    }

    /// Starts a second spillway with this context's config plus `extra` TOML and the
    /// environment `env`; its log when it refuses to start (it is stopped at once when
    /// it does start).
    pub fn try_another_proxy(&self, extra: &str, env: &[(&str, &str)]) -> Result<(), String> {
        let config = format!("{}\n{extra}\n", self.config);
        let env: Vec<(String, String)> = self
            .env
            .iter()
            .cloned()
            .chain(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())))
            .collect();
        Proxy::try_spawn(&self.pg, &config, &env).map(drop)
    }

    /// Another spillway with this context's config and environment, left running (it
    /// stops when the returned value drops); its log when it does not start.
    pub fn spawn_another(&self) -> Result<Proxy, String> {
        Proxy::try_spawn(&self.pg, &self.config, &self.env)
    }

    /// The config spillway was started with (as written to its file).
    pub fn config_text(&self) -> &str {
        &self.config
    }

    /// Replaces spillway's config file (for a reload; the process is not told).
    pub fn write_config(&self, config: &str) {
        std::fs::write(&self.proxy.config_path, config).expect("rewrite config");
    }

    pub fn proxy_url(&self) -> String {
        self.proxy_url_for(USER, DB)
    }

    pub fn proxy_url_for(&self, user: &str, db: &str) -> String {
        format!(
            "postgres://{user}@127.0.0.1:{}/{db}?sslmode=disable",
            self.proxy.addr.port()
        )
    }

    pub fn proxy_config(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={USER} dbname={DB} sslmode=disable",
            self.proxy.addr.port()
        )
    }

    pub fn direct_config(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={USER} dbname={DB} sslmode=disable",
            self.pg.port()
        )
    }

    /// A tokio-postgres client through spillway.
    pub async fn proxy_client(&self) -> tokio_postgres::Client {
        connect(&self.proxy_config()).await
    }

    /// A tokio-postgres client straight to PostgreSQL.
    pub async fn direct_client(&self) -> tokio_postgres::Client {
        connect(&self.direct_config()).await
    }

    /// Runs SQL directly against PostgreSQL as the superuser (setup, checks).
    pub fn psql_direct(&self, sql: &str) -> String {
        self.pg.psql(DB, sql).expect("psql direct")
    }
}

/// Connects and drives the connection on a task; errors end up in the client's calls.
pub async fn connect(config: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(config, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {config}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// The real `spillway` binary, run with a generated config file.
pub struct Proxy {
    pub addr: SocketAddr,
    /// The config file it was started with (a reload test rewrites it).
    pub config_path: std::path::PathBuf,
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Proxy {
    fn spawn(pg: &ThrowawayPostgres, config: &str, env: &[(String, String)]) -> Proxy {
        Self::try_spawn(pg, config, env)
            .unwrap_or_else(|log| panic!("spillway did not start listening; log:\n{log}"))
    }

    /// Starts spillway; its log when it exits or does not listen within 20 s.
    fn try_spawn(
        pg: &ThrowawayPostgres,
        config: &str,
        env: &[(String, String)],
    ) -> Result<Proxy, String> {
        let config_path = pg.dir().join(format!("spillway-{}.toml", rand_suffix()));
        std::fs::write(&config_path, config).expect("write config");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_spillway"));
        cmd.args(["run", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "spillway=debug,info")
            .env_remove("SPILLWAY_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn spillway");
        let stderr = child.stderr.take().expect("stderr piped");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                // Text or JSON lines: the address ends at a space or a quote.
                if let Some(rest) = line.split("listening on ").nth(1)
                    && let (Some(tx), Some(addr)) = (
                        tx.take(),
                        rest.split(|c: char| c.is_whitespace() || c == '"').next(),
                    )
                {
                    let _ = tx.send(addr.to_owned());
                }
                let mut log = sink.lock().expect("log lock");
                log.push_str(&line);
                log.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => addr.parse().expect("listen address"),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                return Err(log.lock().expect("log lock").clone());
            }
        };
        Ok(Proxy {
            addr,
            config_path,
            child,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Where `/metrics` is served (from the log line spillway writes at start).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.logs()
            .lines()
            .find_map(|l| l.split("metrics endpoint on ").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .expect("spillway logged its metrics endpoint")
    }

    /// Everything spillway logged so far.
    pub fn logs(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    /// Sends a signal by name (TERM, INT, KILL, HUP).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit; `None` if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// (current RSS, peak RSS) in bytes, from /proc.
    pub fn memory(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc status");
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .map(|kb| kb * 1024)
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- spillway log ---\n{}", self.logs());
        }
    }
}

fn rand_suffix() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Polls `f` until it returns true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    f()
}

impl ContextBuilder {
    /// Like [`ContextBuilder::start`], but `backend.url` carries `query` (for example
    /// `sslmode=require`) instead of `sslmode=disable`. The URL needs PostgreSQL's port,
    /// which exists only once the server runs, so it cannot go through `.env()`.
    pub async fn start_with_backend_query(self, query: &str) -> Context {
        let pg = tokio::task::spawn_blocking(move || self.pg.start())
            .await
            .expect("pg start task")
            .expect("throwaway PostgreSQL starts");
        let mut config = self.config;
        config.push_str(&format!(
            "[backend]\nurl = \"postgres://{USER}@127.0.0.1:{}/{DB}?{query}\"\n",
            pg.port()
        ));
        let proxy = Proxy::spawn(&pg, &config, &self.env);
        Context {
            proxy,
            pg,
            config,
            env: self.env,
        }
    }
}
