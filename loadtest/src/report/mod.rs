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
    use std::time::Duration;

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
