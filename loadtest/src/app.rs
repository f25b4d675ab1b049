//! The `run` command from parsed arguments to reports: targets and metrics URLs,
//! the optional setup, each scenario in turn (a failure to connect or a missing table
//! ends the run with a message), the files, the summary, and the exit status.

use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context as _;

use crate::cli::{RunArgs, resolve_metrics};
use crate::pgcpu::PgCpu;
use crate::progress::Progress;
use crate::report::{self, Report, markdown};
use crate::runner::{self, RunSpec};
use crate::setup;
use crate::target::Target;

/// Exit status when a correctness check failed (1 is any other failure, 2 a usage error).
pub const EXIT_INCORRECT: u8 = 3;

pub async fn run(args: RunArgs, threads: u32) -> anyhow::Result<ExitCode> {
    let progress = Progress::new(args.progress);
    let metrics = resolve_metrics(&args.metrics, &args.targets).map_err(anyhow::Error::msg)?;
    let targets: Vec<Target> = args
        .targets
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let url = metrics
                .iter()
                .find(|(j, _)| *j == i)
                .map(|(_, u)| u.clone());
            Target::new(a, url)
        })
        .collect();
    let scenarios = args.scenario_list();
    let seed = args.seed.unwrap_or_else(rand::random);
    let pg_cpu = args.pg_pid.map(PgCpu::new).transpose()?;
    if args.setup {
        setup::setup(&targets[0], &scenarios, args.scale, progress).await?;
    }
    let names: Vec<String> = targets
        .iter()
        .map(|t| format!("{}={}", t.name, t.url))
        .collect();
    progress.note(&format!(
        "spillway-loadtest: {} against {}; {} clients, {} rounds of {}s, warm-up {}s, {} protocol, seed {seed}",
        scenarios.iter().map(|s| s.name()).collect::<Vec<_>>().join(", "),
        names.join(" "),
        args.clients,
        args.rounds,
        args.duration.as_secs_f64(),
        args.warmup.as_secs_f64(),
        args.mode.as_str(),
    ));
    let started = SystemTime::now();
    let mut reports = Vec::new();
    for scenario in scenarios {
        progress.note(&format!(
            "== {} ({})",
            scenario.name(),
            scenario.description()
        ));
        let spec = RunSpec {
            scenario,
            targets: targets.clone(),
            clients: args.clients,
            duration: args.duration,
            warmup: args.warmup,
            rounds: args.rounds,
            mode: args.mode,
            seed,
            verify_timeout: args.verify_timeout,
            pg_cpu,
        };
        let outcome = runner::run(spec, progress)
            .await
            .with_context(|| format!("scenario {}", scenario.name()))?;
        let report = Report::new(&outcome, threads);
        let dir = report::run_dir(&args.out, scenario.name(), args.mode, outcome.started_at);
        let files = report.write(&dir)?;
        println!("{}", markdown::render(&report));
        progress.note(&format!(
            "wrote {}",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        reports.push(report);
    }
    if reports.len() > 1 {
        let text = markdown::summary(&reports);
        let path = report::run_dir(&args.out, "summary", args.mode, started).with_extension("md");
        std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
        println!("## Summary\n\n{text}");
        progress.note(&format!("wrote {}", path.display()));
    }
    let incorrect = reports.iter().any(|r| r.correctness_ok == Some(false));
    Ok(if incorrect {
        eprintln!("spillway-loadtest: a correctness check FAILED (see the reports)");
        ExitCode::from(EXIT_INCORRECT)
    } else {
        ExitCode::SUCCESS
    })
}
