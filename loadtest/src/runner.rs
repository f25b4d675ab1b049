//! One scenario against every target: preflight (connect, find the tables, read the
//! baseline), the phases of [`plan::schedule`], the client tasks, and the
//! correctness pass at the end.
//!
//! Invariants:
//! - Every phase of a target uses the same `clients` connections, opened before the
//!   first phase (a lost one is reopened, and the attempt counted as an error), so
//!   connection set-up never falls inside a measured window.
//! - An operation counts (throughput, latency, errors) only if it finished before its
//!   phase's deadline; the window is exactly `duration`. Its write counts in the
//!   ledger whenever it happened, also during warm-up, since it changed the tables.
//! - Nothing waits forever: an operation still running [`GRACE`] after the deadline
//!   is abandoned (error `timeout`, its write's fate unknown, its connection dropped).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::bail;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cli::Mode;
use crate::db::{OpError, Session};
use crate::metrics::{self, Accumulator, Figures, Snapshot};
use crate::pgcpu::{self, PgCpu};
use crate::plan::{self, Latency, Phase};
use crate::progress::Progress;
use crate::scenario::Scenario;
use crate::scenario::ops::{self, Applied, ClientGen, Effect, Step, Workload};
use crate::scenario::verify::{self, Baseline, CheckItem, Ledger};
use crate::target::{Dataset, Target};

/// How long an operation may overrun its phase before it is abandoned.
pub const GRACE: Duration = Duration::from_secs(5);
const TICK: Duration = Duration::from_millis(250);
const GAUGE_EVERY: Duration = Duration::from_secs(1);

/// What to run.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub scenario: Scenario,
    pub targets: Vec<Target>,
    pub clients: u32,
    pub duration: Duration,
    pub warmup: Duration,
    pub rounds: u32,
    pub mode: Mode,
    pub seed: u64,
    pub verify_timeout: Duration,
    /// PostgreSQL's CPU per operation is measured per round when set (`--pg-pid`).
    pub pg_cpu: Option<PgCpu>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ErrorCount {
    pub count: u64,
    /// The first message seen with this code.
    pub example: String,
}

fn count_error(map: &mut BTreeMap<String, ErrorCount>, e: &OpError, n: u64) {
    let entry = map.entry(e.code.clone()).or_insert_with(|| ErrorCount {
        count: 0,
        example: e.message.clone(),
    });
    entry.count += n;
}

fn merge_errors(into: &mut BTreeMap<String, ErrorCount>, from: &BTreeMap<String, ErrorCount>) {
    for (code, c) in from {
        let entry = into.entry(code.clone()).or_insert_with(|| ErrorCount {
            count: 0,
            example: c.example.clone(),
        });
        entry.count += c.count;
    }
}

/// One measured round of one target.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundResult {
    pub round: usize,
    pub ops: u64,
    pub errors: u64,
    pub seconds: f64,
    pub tps: f64,
    pub latency_ms: Latency,
    /// PostgreSQL's CPU time in the round (and until the target's deferred writes
    /// were applied) per operation, µs; `None` unless `--pg-pid`.
    pub pg_cpu_us_per_op: Option<f64>,
}

/// The correctness pass, through one target.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Correctness {
    pub ok: bool,
    pub checks: Vec<CheckItem>,
    /// Set when the check itself could not run.
    pub error: Option<String>,
    /// Targets whose writes the expectation adds up (they share this target's data).
    pub writers: Vec<String>,
}

/// Everything measured for one target.
#[derive(Debug)]
pub struct TargetOutcome {
    pub rounds: Vec<RoundResult>,
    pub histogram: Histogram<u64>,
    pub errors: BTreeMap<String, ErrorCount>,
    pub warmup_errors: u64,
    pub ledger: Ledger,
    pub metrics: Figures,
    pub correctness: Option<Correctness>,
    pub dataset: Dataset,
}

#[derive(Debug)]
pub struct Outcome {
    pub spec: RunSpec,
    pub started_at: SystemTime,
    pub finished_at: SystemTime,
    pub targets: Vec<TargetOutcome>,
}

#[derive(Default)]
struct Live {
    ops: AtomicU64,
    errors: AtomicU64,
}

struct Worker {
    session: Option<Session>,
    generator: ClientGen,
}

struct WorkerResult {
    histogram: Histogram<u64>,
    ops: u64,
    errors: BTreeMap<String, ErrorCount>,
    error_total: u64,
    ledger: Ledger,
}

/// Runs `spec` to the end and returns what was measured.
pub async fn run(spec: RunSpec, progress: Progress) -> anyhow::Result<Outcome> {
    let started_at = SystemTime::now();
    let scenario = spec.scenario;
    // Preflight: every target answers and has the tables; read the baselines.
    let mut checkers = Vec::new();
    let mut datasets = Vec::new();
    for t in &spec.targets {
        let mut s = t.connect(Mode::Simple).await?;
        datasets.push(t.dataset(&mut s, scenario).await?);
        checkers.push(s);
    }
    // Targets that read the same dataset id share tables, key counter and baseline.
    let mut workloads: Vec<Arc<Workload>> = Vec::new();
    let mut baselines: Vec<Baseline> = Vec::new();
    for (i, d) in datasets.iter().enumerate() {
        if let Some(first) = datasets[..i].iter().position(|o| o.id == d.id) {
            workloads.push(Arc::clone(&workloads[first]));
            baselines.push(baselines[first]);
            continue;
        }
        let base = verify::baseline(scenario, &mut checkers[i])
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "target {}: reading the baseline: {} ({})",
                    spec.targets[i].name,
                    e.message,
                    e.code
                )
            })?;
        let w = Workload::new(scenario, d.scale, spec.clients, base.next_key);
        if scenario == Scenario::MixedSession && w.sessions() < i64::from(spec.clients) {
            bail!(
                "mixed-session needs a row per client: {} clients but {} lt_sessions rows; \
                 use fewer clients or a larger --scale",
                spec.clients,
                w.sessions()
            );
        }
        workloads.push(Arc::new(w));
        baselines.push(base);
    }
    // Keep idle connections out of the way of the measurement; reopen for the check.
    drop(checkers);

    let mut workers: Vec<Vec<Worker>> = Vec::new();
    for t in &spec.targets {
        let sessions =
            futures_util::future::join_all((0..spec.clients).map(|_| t.connect(spec.mode))).await;
        let mut ws = Vec::new();
        for (client, s) in (0u32..).zip(sessions) {
            ws.push(Worker {
                session: Some(s?),
                generator: ClientGen::new(spec.seed, client),
            });
        }
        workers.push(ws);
    }

    let n = spec.targets.len();
    let mut hist: Vec<Histogram<u64>> = (0..n).map(|_| plan::new_histogram()).collect();
    let mut rounds: Vec<Vec<RoundResult>> = vec![Vec::new(); n];
    let mut errors: Vec<BTreeMap<String, ErrorCount>> = vec![BTreeMap::new(); n];
    let mut warmup_errors = vec![0u64; n];
    let mut ledgers: Vec<Ledger> = vec![Ledger::default(); n];
    let mut accs: Vec<Option<Accumulator>> = spec
        .targets
        .iter()
        .map(|t| t.metrics.as_deref().map(Accumulator::new))
        .collect();

    // Whether a target still answers `SPILLWAY FLUSH` (PostgreSQL does not).
    let mut settles = vec![true; n];
    let schedule = plan::schedule(n, spec.rounds as usize, !spec.warmup.is_zero());
    for phase in schedule {
        let ti = phase.target();
        let target = &spec.targets[ti];
        let (label, length, measured) = match phase {
            Phase::Warmup { .. } => (format!("warm-up {}", target.name), spec.warmup, false),
            Phase::Round { round, .. } => (
                format!("round {round}/{} {}", spec.rounds, target.name),
                spec.duration,
                true,
            ),
        };
        let acc = if measured { accs[ti].as_mut() } else { None };
        let before = match acc {
            Some(acc) => read_metrics(acc).await,
            None => None,
        };
        let cpu_before = spec.pg_cpu.filter(|_| measured).and_then(|c| c.sample());
        let (ws, results) = run_phase(
            std::mem::take(&mut workers[ti]),
            target,
            spec.mode,
            &workloads[ti],
            length,
            progress.phase(label, length),
            if measured { accs[ti].as_mut() } else { None },
        )
        .await;
        workers[ti] = ws;
        // A spillway target applies what it acknowledged before any other phase runs,
        // warm-ups included: its flush must not land in another target's round on the
        // same tables (a direct round's read-back would see an older deferred write
        // applied after its own), nor its cost in another round's CPU.
        settle(&mut workers[ti], &mut settles[ti]).await;
        let cpu = match (spec.pg_cpu, cpu_before) {
            (Some(c), Some(before)) => c.sample().map(|after| before.until(after)),
            _ => None,
        };
        let mut phase_hist = plan::new_histogram();
        let (mut ops, mut errs) = (0, 0);
        for r in &results {
            ledgers[ti].merge(&r.ledger);
            ops += r.ops;
            errs += r.error_total;
            // Same bounds everywhere, so adding cannot fail.
            let _ = phase_hist.add(&r.histogram);
            if measured {
                merge_errors(&mut errors[ti], &r.errors);
            }
        }
        match phase {
            Phase::Warmup { .. } => warmup_errors[ti] += errs,
            Phase::Round { round, .. } => {
                let seconds = length.as_secs_f64();
                let _ = hist[ti].add(&phase_hist);
                rounds[ti].push(RoundResult {
                    round,
                    ops,
                    errors: errs,
                    seconds,
                    tps: plan::tps(ops, seconds).unwrap_or(0.0),
                    latency_ms: Latency::from_micros(&phase_hist),
                    pg_cpu_us_per_op: cpu.and_then(|c| pgcpu::per_op_micros(c, ops)),
                });
                if let (Some(acc), Some(before)) = (accs[ti].as_mut(), before)
                    && let Some(after) = read_metrics(acc).await
                {
                    acc.add_round(&before, &after);
                }
            }
        }
    }
    drop(workers);

    // Correctness: each target sees the writes of every target sharing its data.
    let mut correctness: Vec<Option<Correctness>> = vec![None; n];
    if scenario.writes() {
        for (i, t) in spec.targets.iter().enumerate() {
            let sharing: Vec<usize> = (0..n)
                .filter(|j| datasets[*j].id == datasets[i].id)
                .collect();
            let mut total = Ledger::default();
            for j in &sharing {
                total.merge(&ledgers[*j]);
            }
            let writers = sharing
                .iter()
                .map(|j| spec.targets[*j].name.clone())
                .collect();
            correctness[i] = Some(
                check_target(
                    t,
                    scenario,
                    baselines[i],
                    &total,
                    spec.verify_timeout,
                    writers,
                )
                .await,
            );
        }
    }

    let targets = (0..n)
        .map(|i| TargetOutcome {
            rounds: std::mem::take(&mut rounds[i]),
            histogram: std::mem::replace(&mut hist[i], plan::new_histogram()),
            errors: std::mem::take(&mut errors[i]),
            warmup_errors: warmup_errors[i],
            ledger: std::mem::take(&mut ledgers[i]),
            metrics: accs[i]
                .as_ref()
                .map_or_else(Figures::not_configured, Accumulator::figures),
            correctness: correctness[i].take(),
            dataset: datasets[i].clone(),
        })
        .collect();
    Ok(Outcome {
        spec,
        started_at,
        finished_at: SystemTime::now(),
        targets,
    })
}

async fn read_metrics(acc: &mut Accumulator) -> Option<Snapshot> {
    if acc.failed() {
        return None;
    }
    match metrics::http::get(acc.url()).await {
        Ok(body) => Some(Snapshot::parse(&body)),
        Err(e) => {
            acc.fail(e);
            None
        }
    }
}

/// After each phase, before the closing CPU sample: lets a spillway target apply what
/// it acknowledged, through the first connection still open.
async fn settle(workers: &mut [Worker], asks: &mut bool) {
    if !*asks {
        return;
    }
    if let Some(s) = workers.iter_mut().find_map(|w| w.session.as_mut()) {
        let flushed = tokio::time::timeout(Duration::from_secs(30), pgcpu::settle(s)).await;
        *asks = matches!(flushed, Ok(true));
    }
}

/// Runs every worker of one target for `length`, updating progress and sampling the
/// flush-lag gauge while it runs.
async fn run_phase(
    workers: Vec<Worker>,
    target: &Target,
    mode: Mode,
    workload: &Arc<Workload>,
    length: Duration,
    mut bar: crate::progress::PhaseProgress,
    mut acc: Option<&mut Accumulator>,
) -> (Vec<Worker>, Vec<WorkerResult>) {
    let live = Arc::new(Live::default());
    let deadline = tokio::time::Instant::now() + length;
    let handles: Vec<_> = workers
        .into_iter()
        .map(|mut w| {
            let (target, workload, live) =
                (target.clone(), Arc::clone(workload), Arc::clone(&live));
            tokio::spawn(async move {
                let r = drive(&mut w, &target, mode, &workload, deadline, &live).await;
                (w, r)
            })
        })
        .collect();
    let all = futures_util::future::join_all(handles);
    tokio::pin!(all);
    let mut next_gauge = tokio::time::Instant::now() + GAUGE_EVERY;
    let joined = loop {
        tokio::select! {
            joined = &mut all => break joined,
            _ = tokio::time::sleep(TICK) => {
                bar.update(live.ops.load(Ordering::Relaxed), live.errors.load(Ordering::Relaxed));
                if let Some(acc) = acc.as_deref_mut()
                    && tokio::time::Instant::now() >= next_gauge
                    && tokio::time::Instant::now() < deadline
                {
                    next_gauge += GAUGE_EVERY;
                    if let Some(snap) = read_metrics(acc).await {
                        acc.observe_gauges(&snap);
                    }
                }
            }
        }
    };
    let ops = live.ops.load(Ordering::Relaxed);
    let errors = live.errors.load(Ordering::Relaxed);
    bar.finish(&format!(
        "{ops} ops, {:.0} tps, {errors} errors",
        plan::tps(ops, length.as_secs_f64()).unwrap_or(0.0)
    ));
    let mut workers = Vec::new();
    let mut results = Vec::new();
    for j in joined {
        match j {
            Ok((w, r)) => {
                workers.push(w);
                results.push(r);
            }
            // A worker task cannot panic short of a bug; its client is lost, not the run.
            Err(e) => eprintln!("spillway-loadtest: a client task failed: {e}"),
        }
    }
    (workers, results)
}

/// One client's loop for one phase.
async fn drive(
    w: &mut Worker,
    target: &Target,
    mode: Mode,
    workload: &Workload,
    deadline: tokio::time::Instant,
    live: &Live,
) -> WorkerResult {
    let mut r = WorkerResult {
        histogram: plan::new_histogram(),
        ops: 0,
        errors: BTreeMap::new(),
        error_total: 0,
        ledger: Ledger::default(),
    };
    let fail = |r: &mut WorkerResult, e: &OpError| {
        count_error(&mut r.errors, e, 1);
        r.error_total += 1;
        live.errors.fetch_add(1, Ordering::Relaxed);
    };
    // One timer for the whole phase, not one per operation (registering a timer costs
    // more than a cached answer), and two clock reads per operation: the load
    // generator's own CPU per operation caps every ratio it reports.
    let grace = tokio::time::sleep_until(deadline + GRACE);
    tokio::pin!(grace);
    let end = deadline.into_std();
    // Successful operations not yet added to the shared progress counter.
    let mut unreported = 0u64;
    let mut now = Instant::now();
    while now < end {
        let mut session = match w.session.take() {
            Some(s) if !s.is_closed() => s,
            _ => match tokio::time::timeout_at(deadline, target.connect(mode)).await {
                Ok(Ok(s)) => {
                    now = Instant::now();
                    s
                }
                Ok(Err(e)) => {
                    fail(&mut r, &OpError::check("connect", e.to_string()));
                    tokio::time::sleep_until(
                        deadline.min(tokio::time::Instant::now() + Duration::from_millis(200)),
                    )
                    .await;
                    now = Instant::now();
                    continue;
                }
                Err(_) => break,
            },
        };
        let start = now;
        let step = tokio::select! {
            biased;
            step = ops::step(workload, &mut w.generator, &mut session) => Some(step),
            () = &mut grace => None,
        };
        now = Instant::now();
        let micros = u64::try_from((now - start).as_micros()).unwrap_or(u64::MAX);
        let step = match step {
            Some(step) => {
                w.session = Some(session);
                step
            }
            None => Step {
                write: workload
                    .scenario
                    .writes()
                    .then(|| (timeout_effect(workload), Applied::Unknown)),
                error: Some(OpError {
                    code: "timeout".to_owned(),
                    message: format!("no answer {}s after the end of the phase", GRACE.as_secs()),
                    ambiguous: true,
                }),
            },
        };
        if let Some((effect, applied)) = step.write {
            r.ledger.record(effect, applied);
        }
        if now > end {
            break;
        }
        match step.error {
            None => {
                r.ops += 1;
                r.histogram.saturating_record(micros.max(1));
                unreported += 1;
                if unreported == 32 {
                    live.ops.fetch_add(unreported, Ordering::Relaxed);
                    unreported = 0;
                }
            }
            Some(e) => fail(&mut r, &e),
        }
    }
    live.ops.fetch_add(unreported, Ordering::Relaxed);
    r
}

/// The largest effect an abandoned operation may have had.
fn timeout_effect(w: &Workload) -> Effect {
    let delta = match w.scenario {
        Scenario::ReadMostly | Scenario::WriteUpdate => 100,
        Scenario::HotCounters | Scenario::MixedSession => 1,
        _ => 0,
    };
    Effect { delta, key: None }
}

/// Runs the correctness check through `t`, retrying until it passes or `timeout`
/// elapses (deferred writes reach PostgreSQL after they were acknowledged).
async fn check_target(
    t: &Target,
    scenario: Scenario,
    base: Baseline,
    ledger: &Ledger,
    timeout: Duration,
    writers: Vec<String>,
) -> Correctness {
    let until = Instant::now() + timeout;
    loop {
        let attempt = tokio::time::timeout(timeout + GRACE, async {
            let mut s = t.connect(Mode::Simple).await.map_err(|e| e.to_string())?;
            verify::check(scenario, &mut s, base, ledger)
                .await
                .map_err(|e| format!("{} ({})", e.message, e.code))
        })
        .await
        .unwrap_or_else(|_| Err("the check's queries did not answer".to_owned()));
        let done = Instant::now() >= until;
        match attempt {
            Ok(checks) if checks.iter().all(|c| c.ok) || done => {
                return Correctness {
                    ok: checks.iter().all(|c| c.ok),
                    checks,
                    error: None,
                    writers,
                };
            }
            Err(e) if done => {
                return Correctness {
                    ok: false,
                    checks: Vec::new(),
                    error: Some(e),
                    writers,
                };
            }
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}
