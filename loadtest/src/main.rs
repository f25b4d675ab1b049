//! The `spillway-loadtest` command: parses the arguments, builds the runtime and calls
//! the library. Exit status: 0 done, 1 failure (a target down, tables missing, files
//! not writable), 2 bad arguments, 3 a correctness check failed.

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use spillway_loadtest::cli::{Cli, Command};
use spillway_loadtest::progress::Progress;
use spillway_loadtest::target::Target;
use spillway_loadtest::{app, setup};

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

fn report(result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("spillway-loadtest: {e:#}");
            ExitCode::FAILURE
        }
    }
}
