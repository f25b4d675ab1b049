//! The `spillway-loadtest` command: parses the arguments, builds the runtime and calls
//! the library. Exit status: 0 done, 1 failure (a target down, tables missing, files
//! not writable), 2 bad arguments, 3 a correctness check failed.

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use spillway_loadtest::cli::{Cli, Command};
use spillway_loadtest::progress::Progress;
use spillway_loadtest::target::Target;
use spillway_loadtest::{app, link, setup};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Scenarios => {
            print!("{}", setup::listing());
            ExitCode::SUCCESS
        }
        Command::Setup(args) => {
            let scenarios = args.scenario_list();
            report(runtime(1).and_then(|rt| {
                rt.block_on(async {
                    let target = Target::new(&args.target, None);
                    setup::setup(
                        &target,
                        &scenarios,
                        args.scale,
                        Progress::new(Default::default()),
                    )
                    .await?;
                    let text = setup::write_config(&scenarios, &args.config_out)?;
                    println!("{text}");
                    eprintln!("wrote {}", args.config_out.display());
                    Ok(ExitCode::SUCCESS)
                })
            }))
        }
        Command::Link(args) => report(link_main(&args)),
        Command::Run(args) => {
            if let Err(msg) = args.validate() {
                Cli::command()
                    .error(clap::error::ErrorKind::ValueValidation, msg)
                    .exit();
            }
            let threads = args.threads.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map_or(1, |n| u32::try_from(n.get()).unwrap_or(1))
            });
            report(runtime(threads).and_then(|rt| rt.block_on(app::run(args, threads))))
        }
    }
}

fn runtime(threads: u32) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1) as usize)
        .enable_all()
        .build()?)
}

/// The link runs on its own small runtime; its sleeps use the link's own clock.
fn link_main(args: &spillway_loadtest::cli::LinkArgs) -> anyhow::Result<ExitCode> {
    // Before any thread starts, so the clock thread inherits it.
    let slack = link::clock::reduce_timer_slack();
    let rt = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        runtime(args.threads)?
    };
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| anyhow::anyhow!("listening on {}: {e}", args.listen))?;
        let config = link::LinkConfig {
            to: args.to,
            rtt: args.rtt,
            jitter: args.jitter,
            buffer: usize::try_from(args.buffer)?,
        };
        // Installed before the first line, which tells a script the link is up.
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        eprintln!(
            "spillway-loadtest link: {} -> {}, rtt {:?}, jitter {:?}, {} bytes per direction{}",
            listener.local_addr()?,
            args.to,
            args.rtt,
            args.jitter,
            args.buffer,
            if slack {
                ""
            } else {
                " (timer slack not reduced)"
            }
        );
        let stats = std::sync::Arc::new(link::Stats::default());
        let duration = args.duration;
        let stop = async move {
            let limit = async {
                match duration {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = limit => {}
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        link::serve(
            listener,
            config,
            link::Clock::start()?,
            std::sync::Arc::clone(&stats),
            stop,
        )
        .await;
        eprintln!("spillway-loadtest link: stopped; {}", stats.summary());
        Ok(ExitCode::SUCCESS)
    })
}

fn report(result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("spillway-loadtest: {e:#}");
            ExitCode::FAILURE
        }
    }
}
