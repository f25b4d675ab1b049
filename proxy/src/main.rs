//! The `spillway` command: parses the CLI, loads config, installs tracing, runs the
//! chosen subcommand and waits for a signal. Everything else is library code.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use spillway::config::{Config, LogConfig, LogFormat};
use spillway::ops::demo::Demo;
use spillway::ops::reload::{LogLevelSetter, ReloadSource};
use spillway::ops::server::{Server, ServerError};
use spillway::read::cache::stream::setup;
use spillway::write::schema;
use spillway_policies::TableName;
use tokio_util::sync::CancellationToken;

/// EX_USAGE from sysexits.h: the configuration is wrong.
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "spillway",
    version,
    about = "PostgreSQL-wire caching proxy with durable write-behind"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// Config file (default: ./spillway.toml if present).
        #[arg(long, short, env = "SPILLWAY_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate the configuration and exit (64 when invalid).
    CheckConfig {
        #[arg(long, short, env = "SPILLWAY_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Create or update spillway's schema in the backend database (`backend.url`).
    Migrate {
        #[arg(long, short, env = "SPILLWAY_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Put the `spillway_invalidate` NOTIFY trigger on tables (runs `migrate` first).
    ///
    /// Without --table: every ordinary and partitioned table outside the system
    /// schemas and `spillway`. All tables change in one transaction, or none.
    InstallTriggers {
        #[arg(long, short, env = "SPILLWAY_CONFIG")]
        config: Option<PathBuf>,
        /// A table, written schema.name exactly as stored (case-sensitive, unquoted);
        /// repeat for more.
        #[arg(long = "table", value_name = "SCHEMA.NAME", value_parser = parse_table)]
        tables: Vec<TableName>,
        /// Remove the trigger instead of installing it.
        #[arg(long)]
        drop: bool,
    },
    /// Drop the change stream's replication slot of the backend database and the
    /// publication (`cache.invalidation = "replication"`; `migrate` creates them).
    DropReplication {
        #[arg(long, short, env = "SPILLWAY_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Print a SCRAM-SHA-256 verifier for `admin.password`; reads the password from
    /// the first line of standard input.
    HashPassword,
    /// Start a throwaway PostgreSQL with a demo schema and spillway in front of it.
    Demo {
        #[arg(long, default_value = "127.0.0.1:6432")]
        listen: SocketAddr,
    },
}

/// jemalloc, whose decay returns what a connection storm took once it has passed;
/// glibc's per-thread arenas kept it (ADR 0022).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => {
            match Config::load(config.as_deref())
                .map_err(anyhow::Error::from)
                .and_then(|c| {
                    spillway::ops::server::check_files(&c)?;
                    Ok(c)
                }) {
                Ok(c) => {
                    println!(
                        "configuration OK: listen {}, backend {}, {} table(s) configured",
                        c.server.listen,
                        c.backend.redacted_url(),
                        c.tables.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("spillway: {err}");
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
        Command::Run { config } => {
            let config_path = config.clone();
            let config = match Config::load(config.as_deref()) {
                Ok(c) => c,
                Err(err) => {
                    eprintln!("spillway: {err}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let source = ReloadSource {
                path: config_path,
                log_level: init_tracing(&config.log),
            };
            let result = runtime()
                .map_err(RunError::Other)
                .and_then(|rt| rt.block_on(run(config, source)));
            match result {
                Err(RunError::Config(err)) => {
                    eprintln!("spillway: {err:#}");
                    ExitCode::from(EXIT_CONFIG)
                }
                Err(RunError::Other(err)) => report(Err(err)),
                Ok(()) => ExitCode::SUCCESS,
            }
        }
        Command::Migrate { config } => {
            let config = match load_config(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let _ = init_tracing(&config.log);
            finish(runtime().and_then(|rt| rt.block_on(migrate(&config))))
        }
        Command::InstallTriggers {
            config,
            tables,
            drop,
        } => {
            let config = match load_config(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let _ = init_tracing(&config.log);
            let install = install_triggers(&config, &tables, drop);
            finish(runtime().and_then(|rt| rt.block_on(install)))
        }
        Command::DropReplication { config } => {
            let config = match load_config(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let _ = init_tracing(&config.log);
            finish(runtime().and_then(|rt| rt.block_on(drop_replication(&config))))
        }
        Command::HashPassword => hash_password(),
        Command::Demo { listen } => {
            let _ = init_tracing(&LogConfig::default());
            report(runtime().and_then(|rt| rt.block_on(demo(listen))))
        }
    }
}

/// `spillway hash-password`: the verifier keeps the password out of the config file.
fn hash_password() -> ExitCode {
    let mut line = String::new();
    if let Err(err) = std::io::stdin().read_line(&mut line) {
        eprintln!("spillway: reading the password from standard input: {err}");
        return ExitCode::FAILURE;
    }
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        eprintln!("spillway: no password on standard input");
        return ExitCode::FAILURE;
    }
    println!(
        "{}",
        spillway::protocol::scram::Verifier::from_password(password)
    );
    ExitCode::SUCCESS
}

/// Loads the config for a one-shot command; a config error is reported and exits 64.
fn load_config(path: Option<PathBuf>) -> Result<Config, ExitCode> {
    Config::load(path.as_deref()).map_err(|err| {
        eprintln!("spillway: {err}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn parse_table(s: &str) -> Result<TableName, String> {
    s.parse()
        .map_err(|_| format!("expected schema.name (for example public.accounts), got {s:?}"))
}

async fn migrate(config: &Config) -> anyhow::Result<()> {
    let applied = schema::migrate(&config.backend.url).await?;
    for version in &applied {
        println!("applied migration {version} ({})", describe(*version));
    }
    if config.cache.invalidation == spillway_policies::Invalidation::Replication {
        for what in setup::create_backend(&config.backend.url, &config.replication).await? {
            println!("created {what}");
        }
    }
    let latest = schema::MIGRATOR
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap_or(0);
    println!(
        "{} applied; schema spillway is at version {latest} on {}",
        count(applied.len(), "migration", "migrations"),
        config.backend.redacted_url()
    );
    Ok(())
}

async fn drop_replication(config: &Config) -> anyhow::Result<()> {
    let dropped = setup::drop_backend(&config.backend.url, &config.replication).await?;
    for what in &dropped {
        println!("dropped {what}");
    }
    println!(
        "done: {} dropped ({})",
        count(dropped.len(), "object", "objects"),
        config.backend.redacted_url()
    );
    Ok(())
}

async fn install_triggers(config: &Config, tables: &[TableName], drop: bool) -> anyhow::Result<()> {
    let done = schema::install_triggers(&config.backend.url, tables, drop).await?;
    let (verb, prep) = if drop {
        ("dropped", "from")
    } else {
        ("installed", "on")
    };
    for table in &done {
        println!("{verb} trigger {} {prep} {table}", schema::TRIGGER_NAME);
    }
    println!(
        "done: trigger {} {verb} {prep} {} ({})",
        schema::TRIGGER_NAME,
        count(done.len(), "table", "tables"),
        config.backend.redacted_url()
    );
    Ok(())
}

fn describe(version: i64) -> &'static str {
    schema::MIGRATOR
        .iter()
        .find(|m| m.version == version)
        .map(|m| m.description.as_ref())
        .unwrap_or("")
}

fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("spillway: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Like [`report`] for one-shot commands, whose stderr is read by a person or a
/// script: the error chain once, without a duplicate log line.
fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("spillway: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // The main runtime accepts connections and runs housekeeping; sessions run on the
    // per-core workers (see `spillway::net::workers`), so one thread is enough here.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn run(config: Config, source: ReloadSource) -> Result<(), RunError> {
    // Installed before the (possibly long) start: SIGHUP's default action would end
    // the process.
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")
        .map_err(RunError::Other)?;
    let server = Server::bind_with(config, Some(source))
        .await
        .map_err(|e| match e {
            // Unreadable TLS files are a configuration mistake, reported like one.
            ServerError::Tls(_) | ServerError::Config(_) => RunError::Config(e.into()),
            other => RunError::Other(other.into()),
        })?;
    let addr = server.local_addr().map_err(|e| RunError::Other(e.into()))?;
    reload_on_hangup(hangup, server.reloader());
    tracing::info!(%addr, "listening on {addr}");
    server
        .run(shutdown_on_signal().map_err(RunError::Other)?)
        .await;
    Ok(())
}

enum RunError {
    Config(anyhow::Error),
    Other(anyhow::Error),
}

async fn demo(listen: SocketAddr) -> anyhow::Result<()> {
    let demo = Demo::start(listen).await?;
    // Written with errors ignored: a demo whose stdout reader went away (a closed pipe)
    // keeps serving instead of dying on println!'s panic.
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(demo.instructions().as_bytes());
    let _ = out.flush();
    drop(out);
    tracing::info!(addr = %demo.addr, "listening on {}", demo.addr);
    demo.run(shutdown_on_signal()?).await;
    Ok(())
}

/// Reloads the configuration at every SIGHUP (one at a time; the reloader logs the
/// outcome).
fn reload_on_hangup(
    mut hangup: tokio::signal::unix::Signal,
    reloader: std::sync::Arc<spillway::ops::reload::Reloader>,
) {
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the configuration");
            // The outcome, error included, is logged by the reloader.
            let _ = reloader.reload().await;
        }
    });
}

/// Cancels the returned token on the first SIGTERM/SIGINT; a second one exits at once.
fn shutdown_on_signal() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let trigger = token.clone();
    tokio::spawn(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("signal received: shutting down (send again to exit immediately)");
        trigger.cancel();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::warn!("second signal: exiting immediately");
        std::process::exit(130);
    });
    Ok(token)
}

/// Installs the subscriber (`log.format`, `log.level` unless `RUST_LOG` is set); returns
/// how a reload changes the level, or `None` when `RUST_LOG` decides it.
fn init_tracing(log: &LogConfig) -> Option<LogLevelSetter> {
    use tracing_subscriber::EnvFilter;
    // An empty RUST_LOG counts as unset (then log.level decides, and reloads).
    let from_env = std::env::var(EnvFilter::DEFAULT_ENV)
        .is_ok_and(|v| !v.trim().is_empty())
        .then(|| EnvFilter::try_from_default_env().ok())
        .flatten();
    let fixed = from_env.is_some();
    let filter = from_env
        .or_else(|| EnvFilter::try_new(&log.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let setter: LogLevelSetter = match log.format {
        LogFormat::Text => {
            let builder = builder.with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Box::new(move |level| {
                let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
                handle.reload(filter).map_err(|e| e.to_string())
            })
        }
        LogFormat::Json => {
            let builder = builder.json().with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Box::new(move |level| {
                let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
                handle.reload(filter).map_err(|e| e.to_string())
            })
        }
    };
    (!fixed).then_some(setter)
}
