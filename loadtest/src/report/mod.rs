//! The report of one scenario run: the serde structure written as `report.json`
//! (its schema is `loadtest/report.schema.json`, documented in `loadtest/README.md`;
//! [`SCHEMA_VERSION`] changes whenever a field changes meaning or goes away), the
//! Markdown rendering and the plot, and the files they go to.

pub mod markdown;
pub mod plot;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context as _;
use serde::Serialize;

use crate::cli::Mode;
use crate::metrics::Figures;
use crate::plan::{self, Latency, Ratios};
use crate::runner::{Correctness, ErrorCount, Outcome, RoundResult};

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema_version: u32,
    pub tool: Tool,
    pub started_at: String,
    pub finished_at: String,
    pub scenario: ScenarioInfo,
    pub settings: Settings,
    /// The name of the first target, the denominator of every ratio.
    pub baseline: String,
    pub targets: Vec<TargetReport>,
    pub ratios: Vec<RatioReport>,
    /// `null` for read-only scenarios; otherwise whether every target's check passed.
    pub correctness_ok: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Tool {
    pub name: &'static str,
    pub version: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioInfo {
    pub name: &'static str,
    pub description: &'static str,
    pub writes: bool,
    pub tables: Vec<&'static str>,
    /// The spillway table config the scenario expects (TOML).
    pub spillway_config: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub mode: Mode,
    pub clients: u32,
    pub threads: u32,
    pub rounds: u32,
    pub duration_seconds: f64,
    pub warmup_seconds: f64,
    pub seed: u64,
    pub verify_timeout_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    pub name: String,
    /// Password replaced by `****`.
    pub url: String,
    pub dataset: DatasetInfo,
    pub rounds: Vec<RoundResult>,
    pub median_tps: Option<f64>,
    /// Median over the rounds of PostgreSQL's CPU per operation, µs (`--pg-pid`).
    pub pg_cpu_us_per_op: Option<f64>,
    /// Successful operations in the measured rounds.
    pub ops: u64,
    pub error_total: u64,
    /// Measured rounds only, keyed by SQLSTATE or by the tool's own codes.
    pub errors: BTreeMap<String, ErrorCount>,
    pub warmup_errors: u64,
    /// All measured rounds together.
    pub latency_ms: Latency,
    pub metrics: Figures,
    pub writes: Option<WritesInfo>,
    pub correctness: Option<Correctness>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DatasetInfo {
    pub id: String,
    pub scale: u32,
}

/// What this target's clients were acknowledged, warm-up included.
#[derive(Debug, Clone, Serialize)]
pub struct WritesInfo {
    pub acknowledged: u64,
    pub acknowledged_delta: i64,
    pub unknown: u64,
    pub unknown_delta: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RatioReport {
    pub target: String,
    pub baseline: String,
    #[serde(flatten)]
    pub ratios: Ratios,
}

/// RFC 3339, seconds, UTC.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl Report {
    pub fn new(o: &Outcome, threads: u32) -> Report {
        let spec = &o.spec;
        let s = spec.scenario;
        let targets: Vec<TargetReport> = spec
            .targets
            .iter()
            .zip(&o.targets)
            .map(|(t, r)| {
                let tps: Vec<f64> = r.rounds.iter().map(|x| x.tps).collect();
                TargetReport {
                    name: t.name.clone(),
                    url: t.url.clone(),
                    dataset: DatasetInfo {
                        id: r.dataset.id.clone(),
                        scale: r.dataset.scale,
                    },
                    median_tps: plan::median(&tps),
                    pg_cpu_us_per_op: plan::median(
                        &r.rounds
                            .iter()
                            .filter_map(|x| x.pg_cpu_us_per_op)
                            .collect::<Vec<_>>(),
                    ),
                    ops: r.rounds.iter().map(|x| x.ops).sum(),
                    error_total: r.rounds.iter().map(|x| x.errors).sum(),
                    rounds: r.rounds.clone(),
                    errors: r.errors.clone(),
                    warmup_errors: r.warmup_errors,
                    latency_ms: Latency::from_micros(&r.histogram),
                    metrics: r.metrics.clone(),
                    writes: s.writes().then_some(WritesInfo {
                        acknowledged: r.ledger.acked,
                        acknowledged_delta: r.ledger.acked_delta,
                        unknown: r.ledger.unknown,
                        unknown_delta: r.ledger.unknown_delta,
                    }),
                    correctness: r.correctness.clone(),
                }
            })
            .collect();
        let baseline = targets.first().map(|t| t.name.clone()).unwrap_or_default();
        let base_tps: Vec<f64> = targets
            .first()
            .map(|t| t.rounds.iter().map(|r| r.tps).collect())
            .unwrap_or_default();
        let ratios = targets
            .iter()
            .skip(1)
            .map(|t| {
                let tps: Vec<f64> = t.rounds.iter().map(|r| r.tps).collect();
                RatioReport {
                    target: t.name.clone(),
                    baseline: baseline.clone(),
                    ratios: plan::ratios(&tps, &base_tps),
                }
            })
            .collect();
        let correctness_ok = s.writes().then(|| {
            targets
                .iter()
                .all(|t| t.correctness.as_ref().is_some_and(|c| c.ok))
        });
        Report {
            schema_version: SCHEMA_VERSION,
            tool: Tool {
                name: "spillway-loadtest",
                version: env!("CARGO_PKG_VERSION"),
            },
            started_at: timestamp(o.started_at),
            finished_at: timestamp(o.finished_at),
            scenario: ScenarioInfo {
                name: s.name(),
                description: s.description(),
                writes: s.writes(),
                tables: s.group().tables().to_vec(),
                spillway_config: s.spillway_config(),
            },
            settings: Settings {
                mode: spec.mode,
                clients: spec.clients,
                threads,
                rounds: spec.rounds,
                duration_seconds: spec.duration.as_secs_f64(),
                warmup_seconds: spec.warmup.as_secs_f64(),
                seed: spec.seed,
                verify_timeout_seconds: spec.verify_timeout.as_secs_f64(),
            },
            baseline,
            targets,
            ratios,
            correctness_ok,
        }
    }

    /// Writes `report.json`, `report.md`, `plot.svg` and `plot.png` into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = dir.join("report.json");
        let md = dir.join("report.md");
        let svg = dir.join("plot.svg");
        let png = dir.join("plot.png");
        let text = serde_json::to_string_pretty(self).context("encoding the JSON report")?;
        std::fs::write(&json, text + "\n")
            .with_context(|| format!("writing {}", json.display()))?;
        std::fs::write(&md, markdown::render(self))
            .with_context(|| format!("writing {}", md.display()))?;
        plot::draw(self, &svg, &png)?;
        Ok(vec![json, md, svg, png])
    }
}

/// A directory name for one run: `<scenario>-<mode>-<UTC time>`.
pub fn run_dir(out: &Path, scenario: &str, mode: Mode, at: SystemTime) -> PathBuf {
    let stamp: String = timestamp(at)
        .chars()
        .filter(|c| !matches!(c, '-' | ':'))
        .collect();
    out.join(format!("{scenario}-{}-{stamp}", mode.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;
    use std::time::Duration;

    use crate::cli::TargetArg;
    use crate::metrics::Accumulator;
    use crate::runner::{RunSpec, TargetOutcome};
    use crate::scenario::Scenario;
    use crate::scenario::verify::{CheckItem, Ledger};
    use crate::target::{Dataset, Target};

    const SCHEMA: &str = include_str!("../../report.schema.json");
    const README: &str = include_str!("../../README.md");

    fn target(name: &str, metrics: Option<&str>) -> Target {
        let url = format!("postgres://app:secret@127.0.0.1:5432/{name}");
        Target::new(
            &TargetArg {
                name: name.to_owned(),
                url: url.clone(),
                config: tokio_postgres::Config::from_str(&url).expect("url"),
            },
            metrics.map(str::to_owned),
        )
    }

    fn outcome(rounds: usize) -> Outcome {
        let spec = RunSpec {
            scenario: Scenario::HotCounters,
            targets: vec![
                target("direct", None),
                target("spillway", Some("http://127.0.0.1:1/metrics")),
            ],
            clients: 4,
            duration: Duration::from_secs(5),
            warmup: Duration::from_secs(2),
            rounds: u32::try_from(rounds).expect("small"),
            mode: Mode::Prepared,
            seed: 42,
            verify_timeout: Duration::from_secs(10),
            pg_cpu: None,
        };
        let one = |scale: f64, metrics: Figures| {
            let mut h = plan::new_histogram();
            for i in 1..=1000u64 {
                h.record((i as f64 * scale) as u64 + 50).expect("in range");
            }
            let ledger = Ledger {
                acked: 10,
                acked_delta: 10,
                ..Ledger::default()
            };
            let mut errors = BTreeMap::new();
            errors.insert(
                "40001".to_owned(),
                ErrorCount {
                    count: 2,
                    example: "could not serialize | access".to_owned(),
                },
            );
            TargetOutcome {
                rounds: (1..=rounds)
                    .map(|r| RoundResult {
                        round: r,
                        ops: 5000 + 100 * r as u64,
                        errors: 1,
                        seconds: 5.0,
                        tps: (1000 + 20 * r) as f64 / scale,
                        latency_ms: Latency::from_micros(&h),
                        pg_cpu_us_per_op: None,
                    })
                    .collect(),
                histogram: h,
                errors,
                warmup_errors: 0,
                ledger,
                metrics,
                correctness: Some(Correctness {
                    ok: true,
                    checks: vec![CheckItem {
                        name: "sum".to_owned(),
                        expected: "20".to_owned(),
                        found: "20".to_owned(),
                        ok: true,
                    }],
                    error: None,
                    writers: vec!["direct".to_owned(), "spillway".to_owned()],
                }),
                dataset: Dataset {
                    group: Scenario::HotCounters.group(),
                    id: "abc".to_owned(),
                    scale: 1,
                },
            }
        };
        let mut acc = Accumulator::new("http://127.0.0.1:1/metrics");
        acc.fail("cannot connect: refused".to_owned());
        Outcome {
            spec,
            started_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000),
            finished_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_040),
            targets: vec![one(1.0, Figures::not_configured()), one(0.5, acc.figures())],
        }
    }

    fn validate(value: &serde_json::Value) -> Vec<String> {
        let schema: serde_json::Value = serde_json::from_str(SCHEMA).expect("schema is JSON");
        let validator = jsonschema::validator_for(&schema).expect("valid JSON Schema");
        validator
            .iter_errors(value)
            .map(|e| format!("{e} at {}", e.instance_path))
            .collect()
    }

    #[test]
    fn report_matches_the_schema_and_carries_the_ratios() {
        let report = Report::new(&outcome(3), 2);
        let value = serde_json::to_value(&report).expect("serialises");
        assert_eq!(validate(&value), Vec::<String>::new());
        assert_eq!(value["baseline"], "direct");
        assert_eq!(
            value["targets"][1]["url"],
            "postgres://app:****@127.0.0.1:5432/spillway"
        );
        let r = &value["ratios"][0];
        assert_eq!(r["target"], "spillway");
        assert_eq!(r["per_round"], serde_json::json!([2.0, 2.0, 2.0]));
        assert_eq!(r["median_of_rounds"], 2.0);
        assert_eq!(value["correctness_ok"], true);
        assert_eq!(value["targets"][1]["metrics"]["available"], false);
        assert_eq!(value["started_at"], "2026-09-21T14:13:20Z");
        // The schema is strict: an unknown field or a wrong type is caught.
        let mut bad = value.clone();
        bad["targets"][0]["surprise"] = serde_json::json!(1);
        bad["settings"]["clients"] = serde_json::json!("four");
        assert_eq!(validate(&bad).len(), 2, "{:?}", validate(&bad));
    }

    #[test]
    fn markdown_and_plot_render() {
        let report = Report::new(&outcome(3), 2);
        let md = markdown::render(&report);
        assert!(md.contains("| spillway | 2080 | 2.00× |"), "{md}");
        assert!(md.contains("| 2 | 1040 | 2080 | 2.00× |"), "{md}");
        assert!(md.contains("could not serialize \\| access"), "{md}");
        assert!(
            md.contains("- spillway: not available (not available: cannot connect"),
            "{md}"
        );
        assert!(
            md.contains("- direct: passed (writes of direct + spillway)"),
            "{md}"
        );
        let summary = markdown::summary(&[report.clone(), report.clone()]);
        assert_eq!(summary.lines().count(), 4, "{summary}");
        assert!(
            summary.contains("| hot-counters | prepared | 2.00× |"),
            "{summary}"
        );

        let dir = tempfile::tempdir().expect("tempdir");
        let files = report.write(dir.path()).expect("written");
        assert_eq!(files.len(), 4);
        let svg = std::fs::read_to_string(dir.path().join("plot.svg")).expect("svg");
        assert!(
            svg.contains("Throughput per round") && svg.contains("p99.9"),
            "svg text"
        );
        let png = std::fs::read(dir.path().join("plot.png")).expect("png");
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
        // One round and too few samples for percentiles still plot.
        let mut small = outcome(1);
        for t in &mut small.targets {
            t.histogram = plan::new_histogram();
        }
        Report::new(&small, 1).write(dir.path()).expect("written");
    }

    #[test]
    fn postgres_cpu_per_operation_is_reported_when_measured() {
        let plain = Report::new(&outcome(3), 2);
        assert!(!markdown::render(&plain).contains("PostgreSQL CPU"));
        assert!(!markdown::summary(&[plain]).contains("PG CPU"));
        let mut o = outcome(3);
        for (t, per_op) in o.targets.iter_mut().zip([100.0, 25.0]) {
            for (i, r) in t.rounds.iter_mut().enumerate() {
                r.pg_cpu_us_per_op = Some(per_op + i as f64);
            }
        }
        let report = Report::new(&o, 2);
        let value = serde_json::to_value(&report).expect("serialises");
        assert_eq!(validate(&value), Vec::<String>::new());
        assert_eq!(value["targets"][0]["pg_cpu_us_per_op"], 101.0);
        assert_eq!(value["targets"][1]["rounds"][2]["pg_cpu_us_per_op"], 27.0);
        let md = markdown::render(&report);
        assert!(
            md.contains("direct 101.0 µs, spillway 26.0 µs (0.26× of direct)"),
            "{md}"
        );
        let summary = markdown::summary(&[report]);
        assert!(
            summary.contains("direct PG CPU µs/op | spillway PG CPU µs/op |"),
            "{summary}"
        );
        assert!(summary.contains("| 101.0 | 26.0 |"), "{summary}");
    }

    #[test]
    fn the_readme_documents_every_schema_field() {
        fn fields(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(map) => {
                    if let Some(serde_json::Value::Object(props)) = map.get("properties") {
                        out.extend(props.keys().cloned());
                    }
                    map.values().for_each(|v| fields(v, out));
                }
                serde_json::Value::Array(items) => items.iter().for_each(|v| fields(v, out)),
                _ => {}
            }
        }
        let schema: serde_json::Value = serde_json::from_str(SCHEMA).expect("schema is JSON");
        let mut names = Vec::new();
        fields(&schema, &mut names);
        assert!(names.len() > 50, "{names:?}");
        let missing: Vec<&String> = names
            .iter()
            .filter(|n| {
                !README.contains(&format!("`{n}`")) && !README.contains(&format!("`{n}[]`"))
            })
            .collect();
        assert!(
            missing.is_empty(),
            "loadtest/README.md does not document {missing:?}"
        );
    }

    #[test]
    fn run_dirs_are_sortable_names() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        let d = run_dir(Path::new("out"), "point-read", Mode::Prepared, at);
        assert_eq!(d.parent(), Some(Path::new("out")));
        let name = d.file_name().and_then(|n| n.to_str()).expect("utf8");
        assert!(name.starts_with("point-read-prepared-2026"), "{name}");
        assert!(name.ends_with('Z') && !name.contains(':'), "{name}");
    }
}
