//! The `spillway` command: parses the CLI, loads config, installs tracing, runs the
//! chosen subcommand and waits for a signal. Everything else is library code.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use spillway::config::{Config, LogConfig, LogFormat};
use spillway::demo::Demo;
use spillway::server::{Server, ServerError};
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
    /// Start a throwaway PostgreSQL with a demo schema and spillway in front of it.
    Demo {
        #[arg(long, default_value = "127.0.0.1:6432")]
        listen: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => {
            match Config::load(config.as_deref())
                .map_err(anyhow::Error::from)
                .and_then(|c| {
                    spillway::server::check_files(&c)?;
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
            let config = match Config::load(config.as_deref()) {
                Ok(c) => c,
                Err(err) => {
                    eprintln!("spillway: {err}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            init_tracing(&config.log);
            let result = runtime()
                .map_err(RunError::Other)
                .and_then(|rt| rt.block_on(run(config)));
            match result {
                Err(RunError::Config(err)) => {
                    eprintln!("spillway: {err:#}");
                    ExitCode::from(EXIT_CONFIG)
                }
                Err(RunError::Other(err)) => report(Err(err)),
                Ok(()) => ExitCode::SUCCESS,
            }
        }
        Command::Demo { listen } => {
            init_tracing(&LogConfig::default());
            report(runtime().and_then(|rt| rt.block_on(demo(listen))))
        }
    }
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

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // The main runtime accepts connections and runs housekeeping; sessions run on the
    // per-core workers (see `spillway::workers`), so one thread is enough here.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn run(config: Config) -> Result<(), RunError> {
    let server = Server::bind(config).await.map_err(|e| match e {
        // Unreadable TLS files are a configuration mistake, reported like one.
        ServerError::Tls(_) | ServerError::Config(_) => RunError::Config(e.into()),
        other => RunError::Other(other.into()),
    })?;
    let addr = server.local_addr().map_err(|e| RunError::Other(e.into()))?;
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
    let _ = writeln!(out, "spillway demo is ready.");
    let _ = writeln!(out, "  through spillway: psql {}", demo.url());
    let _ = writeln!(
        out,
        "  direct:           psql {}",
        demo.postgres
            .url(spillway::demo::DEMO_USER, spillway::demo::DEMO_DATABASE)
    );
    let _ = writeln!(out, "Press Ctrl-C to stop; everything is removed on exit.");
    let _ = out.flush();
    drop(out);
    tracing::info!(addr = %demo.addr, "listening on {}", demo.addr);
    demo.run(shutdown_on_signal()?).await;
    Ok(())
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

fn init_tracing(log: &LogConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
