//! The command line: `run`, `setup` and `scenarios`, their arguments, and the checks
//! that make a wrong argument fail before anything connects, with a message that says
//! what was expected (clap prints it and exits 2).

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::scenario::Scenario;

#[derive(Debug, Parser)]
#[command(
    name = "spillway-loadtest",
    version,
    about = "Load tests for spillway: the same scenario against PostgreSQL directly and \
             through spillway, in alternating rounds, with ratios, percentiles and plots",
    after_help = "Example:\n  spillway-loadtest setup --target postgres://app@127.0.0.1:5432/app\n  \
                  spillway-loadtest run --scenario point-read \\\n    \
                  --target direct=postgres://app@127.0.0.1:5432/app \\\n    \
                  --target spillway=postgres://app@127.0.0.1:6432/app"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run scenarios against the targets in alternating rounds and write reports.
    Run(RunArgs),
    /// Create and fill the tables of scenarios (drops and recreates them).
    Setup(SetupArgs),
    /// List the scenarios, their tables and the spillway table config each expects.
    Scenarios,
    /// Relay TCP to another address with an added round trip (a network link in user
    /// space), until stopped (SIGINT/SIGTERM) or for --duration.
    Link(LinkArgs),
}

#[derive(Debug, Args)]
pub struct LinkArgs {
    /// Address to accept connections on, e.g. 127.0.0.1:15432.
    #[arg(long, value_name = "ADDR")]
    pub listen: std::net::SocketAddr,

    /// Address to relay each connection to, e.g. 127.0.0.1:5432.
    #[arg(long, value_name = "ADDR")]
    pub to: std::net::SocketAddr,

    /// Round trip added: each direction holds the bytes for half of it (e.g. 1ms,
    /// 200us, 0s).
    #[arg(long, value_parser = parse_duration)]
    pub rtt: Duration,

    /// Each chunk's one-way delay is drawn from rtt/2 ± jitter/2; never reorders.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub jitter: Duration,

    /// Bytes held per direction of a connection before the link stops reading from
    /// the sender (back-pressure, never a drop).
    #[arg(long, default_value = "1048576", value_parser = clap::value_parser!(u64).range(1..=1 << 30))]
    pub buffer: u64,

    /// Stop by itself after this long (default: until SIGINT/SIGTERM).
    #[arg(long, value_parser = parse_positive_duration)]
    pub duration: Option<Duration>,

    /// Worker threads (default 1: the link should take as little CPU from the
    /// measured processes as it can).
    #[arg(long, default_value = "1", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub threads: u32,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Scenario to run (repeat, or `all`); see `spillway-loadtest scenarios`.
    #[arg(long = "scenario", short = 's', value_name = "NAME", required = true,
          value_parser = parse_scenarios)]
    pub scenarios: Vec<Vec<Scenario>>,

    /// A target as NAME=URL (repeat; the first is the baseline of the ratios), e.g.
    /// direct=postgres://app@127.0.0.1:5432/app.
    #[arg(long = "target", short = 't', value_name = "NAME=URL", required = true,
          value_parser = parse_target)]
    pub targets: Vec<TargetArg>,

    /// Concurrent client connections per target.
    #[arg(long, short = 'c', default_value = "8", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub clients: u32,

    /// Length of one measured round of one target (e.g. 5s, 1m).
    #[arg(long, short = 'd', default_value = "5s", value_parser = parse_positive_duration)]
    pub duration: Duration,

    /// Rounds; each round runs every target once, in the order given.
    #[arg(long, short = 'r', default_value = "3", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub rounds: u32,

    /// Unmeasured load per target before its first round (0s: none).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,

    /// Protocol: `simple` (Query with literals), `extended` (unnamed statement, one
    /// round trip) or `prepared` (named statements prepared once per connection).
    #[arg(long, short = 'M', value_enum, default_value_t = Mode::Extended)]
    pub mode: Mode,

    /// Seed of the key generators (default: random, printed and recorded).
    #[arg(long)]
    pub seed: Option<u64>,

    /// spillway's Prometheus endpoint, as [TARGET=]URL (repeat for several). Without
    /// TARGET it belongs to the only non-baseline target.
    #[arg(long = "metrics", value_name = "[TARGET=]URL")]
    pub metrics: Vec<String>,

    /// Directory for reports; each scenario gets a subdirectory.
    #[arg(long, default_value = "loadtest-results")]
    pub out: PathBuf,

    /// Worker threads of the load generator (default: one per core).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub threads: Option<u32>,

    /// Run `setup` for the scenarios through the first target before measuring.
    #[arg(long)]
    pub setup: bool,

    /// Scale for `--setup` (100,000 accounts per unit, see `scenarios`).
    #[arg(long, default_value = "1", value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub scale: u32,

    /// How long the correctness check waits for the final state to appear (deferred
    /// writes are applied by spillway's flush worker some time after they are
    /// acknowledged).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub verify_timeout: Duration,

    /// PID of a local PostgreSQL postmaster (first line of its postmaster.pid): report
    /// PostgreSQL's CPU time per operation for each target, from /proc. Each round
    /// then ends with `SPILLWAY FLUSH` through the target (PostgreSQL refuses it), so
    /// deferred writes are applied, and counted, before the round's closing sample.
    #[arg(long, value_name = "PID")]
    pub pg_pid: Option<u32>,

    /// Progress display: a bar on a terminal, plain lines otherwise (`auto`).
    #[arg(long, value_enum, default_value_t = ProgressKind::Auto)]
    pub progress: ProgressKind,
}

#[derive(Debug, Args)]
pub struct SetupArgs {
    /// Where to create the tables: a URL (NAME=URL is accepted too). Use the direct
    /// PostgreSQL URL.
    #[arg(long, short = 't', value_name = "URL", value_parser = parse_setup_target)]
    pub target: TargetArg,

    /// Scenario whose tables to create (repeat; default: all).
    #[arg(long = "scenario", short = 's', value_name = "NAME", value_parser = parse_scenarios)]
    pub scenarios: Vec<Vec<Scenario>>,

    /// Scale: 100,000 accounts/balances, 10,000 customers and sessions per unit.
    #[arg(long, default_value = "1", value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub scale: u32,

    /// Where to write the spillway table config the scenarios expect (TOML).
    #[arg(long, default_value = "loadtest-results/spillway-tables.toml")]
    pub config_out: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Simple,
    Extended,
    Prepared,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Simple => "simple",
            Mode::Extended => "extended",
            Mode::Prepared => "prepared",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum ProgressKind {
    #[default]
    Auto,
    Bar,
    Plain,
    None,
}

/// A named target: `config` is what tokio-postgres connects with.
#[derive(Debug, Clone)]
pub struct TargetArg {
    pub name: String,
    pub url: String,
    pub config: tokio_postgres::Config,
}

fn parse_target(s: &str) -> Result<TargetArg, String> {
    let Some((name, url)) = s.split_once('=').filter(|(n, _)| !n.contains(':')) else {
        return Err(format!(
            "expected NAME=URL, e.g. direct=postgres://app@127.0.0.1:5432/app (got {s:?})"
        ));
    };
    let name = name.trim();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(format!(
            "target name {name:?}: use letters, digits, '-', '_' or '.' (e.g. direct, spillway)"
        ));
    }
    Ok(TargetArg {
        name: name.to_owned(),
        url: url.to_owned(),
        config: parse_url(url)?,
    })
}

fn parse_setup_target(s: &str) -> Result<TargetArg, String> {
    if s.starts_with("postgres://") || s.starts_with("postgresql://") || !s.contains('=') {
        Ok(TargetArg {
            name: "setup".to_owned(),
            url: s.to_owned(),
            config: parse_url(s)?,
        })
    } else {
        parse_target(s)
    }
}

fn parse_url(url: &str) -> Result<tokio_postgres::Config, String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(format!(
            "{url:?} is not a PostgreSQL URL: expected postgres://USER@HOST:PORT/DATABASE"
        ));
    }
    let config = tokio_postgres::Config::from_str(url)
        .map_err(|e| format!("invalid PostgreSQL URL {url:?}: {e}"))?;
    if config.get_user().is_none() {
        return Err(format!(
            "{url:?} names no user: write postgres://USER@HOST:PORT/DATABASE"
        ));
    }
    Ok(config)
}

fn parse_scenarios(s: &str) -> Result<Vec<Scenario>, String> {
    if s == "all" {
        return Ok(Scenario::ALL.to_vec());
    }
    s.split(',')
        .map(|name| {
            Scenario::from_name(name.trim()).ok_or_else(|| {
                format!(
                    "unknown scenario {name:?}; known: {}, or all",
                    Scenario::ALL.map(Scenario::name).join(", ")
                )
            })
        })
        .collect()
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); write e.g. 5s, 500ms, 2m"))
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("must be longer than 0s".to_owned());
    }
    Ok(d)
}

/// Which target each `--metrics` URL belongs to: `(target index, URL)`.
pub fn resolve_metrics(
    args: &[String],
    targets: &[TargetArg],
) -> Result<Vec<(usize, String)>, String> {
    let mut out: Vec<(usize, String)> = Vec::new();
    for arg in args {
        let (index, url) = if arg.starts_with("http://") || arg.starts_with("https://") {
            let others: Vec<usize> = (1..targets.len()).collect();
            match others.as_slice() {
                [only] => (*only, arg.clone()),
                _ => {
                    return Err(format!(
                        "--metrics {arg}: say which target it belongs to, as TARGET=URL \
                         (targets: {})",
                        names(targets)
                    ));
                }
            }
        } else {
            let Some((name, url)) = arg.split_once('=') else {
                return Err(format!(
                    "--metrics {arg}: expected [TARGET=]http://HOST:PORT/metrics"
                ));
            };
            let Some(index) = targets.iter().position(|t| t.name == name) else {
                return Err(format!(
                    "--metrics {arg}: no target named {name:?} (targets: {})",
                    names(targets)
                ));
            };
            (index, url.to_owned())
        };
        if !url.starts_with("http://") {
            return Err(format!(
                "--metrics {arg}: only plain http:// URLs are supported (e.g. http://127.0.0.1:9187/metrics)"
            ));
        }
        if out.iter().any(|(i, _)| *i == index) {
            return Err(format!(
                "--metrics: target {} has two metrics URLs",
                targets[index].name
            ));
        }
        out.push((index, url));
    }
    Ok(out)
}

fn names(targets: &[TargetArg]) -> String {
    targets
        .iter()
        .map(|t| t.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

impl RunArgs {
    /// Checks that span several arguments (clap checks each alone).
    pub fn validate(&self) -> Result<(), String> {
        for (i, t) in self.targets.iter().enumerate() {
            if self.targets[..i].iter().any(|o| o.name == t.name) {
                return Err(format!("--target: the name {:?} is used twice", t.name));
            }
        }
        resolve_metrics(&self.metrics, &self.targets)?;
        Ok(())
    }

    /// Scenarios in the order given, each once.
    pub fn scenario_list(&self) -> Vec<Scenario> {
        dedup(&self.scenarios)
    }
}

impl SetupArgs {
    pub fn scenario_list(&self) -> Vec<Scenario> {
        if self.scenarios.is_empty() {
            Scenario::ALL.to_vec()
        } else {
            dedup(&self.scenarios)
        }
    }
}

fn dedup(lists: &[Vec<Scenario>]) -> Vec<Scenario> {
    let mut out = Vec::new();
    for s in lists.iter().flatten() {
        if !out.contains(s) {
            out.push(*s);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        Cli::try_parse_from(std::iter::once("spillway-loadtest").chain(args.iter().copied()))
            .map_err(|e| e.to_string())
    }

    fn run(args: &[&str]) -> Result<RunArgs, String> {
        let mut full = vec!["run"];
        full.extend_from_slice(args);
        match parse(&full)?.command {
            Command::Run(r) => {
                r.validate()?;
                Ok(r)
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    const D: &str = "direct=postgres://app@127.0.0.1:5432/app";
    const S: &str = "spillway=postgres://app@127.0.0.1:6432/app";

    #[test]
    fn defaults() {
        let r = run(&["--scenario", "point-read", "-t", D, "-t", S]).expect("valid");
        assert_eq!(r.clients, 8);
        assert_eq!(r.duration, Duration::from_secs(5));
        assert_eq!(r.warmup, Duration::from_secs(2));
        assert_eq!(r.rounds, 3);
        assert_eq!(r.mode, Mode::Extended);
        assert_eq!(r.seed, None);
        assert_eq!(r.targets[0].name, "direct");
        assert_eq!(r.targets[1].config.get_ports(), &[6432]);
        assert_eq!(r.scenario_list(), vec![Scenario::PointRead]);
    }

    #[test]
    fn all_and_lists_of_scenarios() {
        let r = run(&["-s", "all", "-t", D]).expect("valid");
        assert_eq!(r.scenario_list().len(), Scenario::ALL.len());
        let r = run(&["-s", "hot-counters,orm-tx", "-s", "orm-tx", "-t", D]).expect("valid");
        assert_eq!(
            r.scenario_list(),
            vec![Scenario::HotCounters, Scenario::OrmTx]
        );
    }

    #[test]
    fn unknown_scenario_lists_the_known_ones() {
        let e = run(&["-s", "point-reads", "-t", D]).expect_err("unknown");
        assert!(e.contains("unknown scenario \"point-reads\""), "{e}");
        assert!(e.contains("point-read, read-mostly"), "{e}");
    }

    #[test]
    fn target_errors_say_what_was_expected() {
        let e = run(&["-s", "point-read", "-t", "postgres://app@127.0.0.1/app"]).expect_err("");
        assert!(e.contains("expected NAME=URL"), "{e}");
        let e = run(&["-s", "point-read", "-t", "direct=http://x"]).expect_err("");
        assert!(e.contains("not a PostgreSQL URL"), "{e}");
        let e = run(&["-s", "point-read", "-t", "direct=postgres://127.0.0.1/app"]).expect_err("");
        assert!(e.contains("names no user"), "{e}");
        let e = run(&["-s", "point-read", "-t", "a b=postgres://u@h/d"]).expect_err("");
        assert!(e.contains("target name"), "{e}");
        let e = run(&["-s", "point-read", "-t", D, "-t", D]).expect_err("");
        assert!(e.contains("used twice"), "{e}");
        let e = run(&["-s", "point-read"]).expect_err("");
        assert!(e.contains("--target"), "{e}");
    }

    #[test]
    fn numeric_and_duration_errors() {
        let e = run(&["-s", "point-read", "-t", D, "--clients", "0"]).expect_err("");
        assert!(e.contains("--clients"), "{e}");
        let e = run(&["-s", "point-read", "-t", D, "--duration", "5"]).expect_err("");
        assert!(e.contains("not a duration"), "{e}");
        let e = run(&["-s", "point-read", "-t", D, "--duration", "0s"]).expect_err("");
        assert!(e.contains("longer than 0s"), "{e}");
        let e = run(&["-s", "point-read", "-t", D, "--mode", "fast"]).expect_err("");
        assert!(e.contains("simple") && e.contains("prepared"), "{e}");
        let r = run(&[
            "-s",
            "point-read",
            "-t",
            D,
            "--warmup",
            "0s",
            "-d",
            "1500ms",
        ])
        .expect("ok");
        assert!(r.warmup.is_zero());
        assert_eq!(r.duration, Duration::from_millis(1500));
    }

    #[test]
    fn metrics_belong_to_a_target() {
        let targets = run(&["-s", "point-read", "-t", D, "-t", S])
            .expect("valid")
            .targets;
        let m = resolve_metrics(&["http://127.0.0.1:9187/metrics".to_owned()], &targets);
        assert_eq!(m, Ok(vec![(1, "http://127.0.0.1:9187/metrics".to_owned())]));
        let m = resolve_metrics(&["spillway=http://h:1/metrics".to_owned()], &targets);
        assert_eq!(m, Ok(vec![(1, "http://h:1/metrics".to_owned())]));
        let e = resolve_metrics(&["proxy=http://h:1/metrics".to_owned()], &targets)
            .expect_err("unknown target");
        assert!(e.contains("no target named \"proxy\""), "{e}");
        let e = resolve_metrics(&["spillway=https://h/metrics".to_owned()], &targets)
            .expect_err("https");
        assert!(e.contains("http://"), "{e}");
        let e = resolve_metrics(&["http://h:1/metrics".to_owned()], &targets[..1])
            .expect_err("no other target");
        assert!(e.contains("which target"), "{e}");
        let e = run(&["-s", "point-read", "-t", D, "--metrics", "x"]).expect_err("");
        assert!(e.contains("[TARGET=]"), "{e}");
    }

    #[test]
    fn setup_accepts_a_bare_url_or_a_named_one() {
        let c = parse(&[
            "setup",
            "--target",
            "postgres://app@127.0.0.1:5432/app?sslmode=disable",
        ])
        .expect("valid");
        let Command::Setup(s) = c.command else {
            panic!("setup")
        };
        assert_eq!(s.target.config.get_dbname(), Some("app"));
        assert_eq!(s.scale, 1);
        assert_eq!(s.scenario_list().len(), Scenario::ALL.len());
        let c =
            parse(&["setup", "--target", D, "-s", "hot-counters", "--scale", "2"]).expect("valid");
        let Command::Setup(s) = c.command else {
            panic!("setup")
        };
        assert_eq!(s.scenario_list(), vec![Scenario::HotCounters]);
        assert_eq!(s.scale, 2);
    }
}
