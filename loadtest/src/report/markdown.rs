//! The Markdown rendering of a [`Report`] (printed at the end of a run and written as
//! `report.md`), and the one-line-per-scenario summary of a multi-scenario run.
//! Missing figures are written `–`, never 0.

use std::fmt::Write as _;

use super::Report;

fn num(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "–".to_owned(), |x| format!("{x:.decimals$}"))
}

fn ratio(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_owned(), |x| format!("{x:.2}×"))
}

pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let s = &r.settings;
    let _ = writeln!(
        out,
        "## {} ({} protocol)\n",
        r.scenario.name,
        s.mode.as_str()
    );
    let _ = writeln!(out, "{}.\n", r.scenario.description);
    let _ = writeln!(
        out,
        "{} clients, {} rounds of {}s per target (alternating), warm-up {}s, seed {}, {} — {}.\n",
        s.clients,
        s.rounds,
        s.duration_seconds,
        s.warmup_seconds,
        s.seed,
        r.started_at,
        r.finished_at
    );

    let _ = writeln!(
        out,
        "| target | median tps | vs {} | p50 ms | p95 ms | p99 ms | p99.9 ms | max ms | errors |",
        r.baseline
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for t in &r.targets {
        let vs = if t.name == r.baseline {
            "1.00×".to_owned()
        } else {
            ratio(
                r.ratios
                    .iter()
                    .find(|x| x.target == t.name)
                    .and_then(|x| x.ratios.median_of_rounds),
            )
        };
        let l = &t.latency_ms;
        let _ = writeln!(
            out,
            "| {} | {} | {vs} | {} | {} | {} | {} | {} | {} |",
            t.name,
            num(t.median_tps, 0),
            num(l.p50, 3),
            num(l.p95, 3),
            num(l.p99, 3),
            num(l.p999, 3),
            num(l.max, 3),
            t.error_total
        );
    }
    let _ = writeln!(
        out,
        "\nRatios are the median of the per-round ratios; percentiles need at least {} samples.\n",
        crate::plan::MIN_SAMPLES
    );
    if r.targets.iter().any(|t| t.pg_cpu_us_per_op.is_some()) {
        let base = r.targets.first().and_then(|t| t.pg_cpu_us_per_op);
        let figures: Vec<String> = r
            .targets
            .iter()
            .map(|t| {
                let share = match (t.pg_cpu_us_per_op, base) {
                    (Some(x), Some(b)) if b > 0.0 && t.name != r.baseline => {
                        format!(" ({:.2}× of {})", x / b, r.baseline)
                    }
                    _ => String::new(),
                };
                format!("{} {} µs{share}", t.name, num(t.pg_cpu_us_per_op, 1))
            })
            .collect();
        let _ = writeln!(
            out,
            "PostgreSQL CPU per operation (median of rounds; its processes' time from /proc, \
             each round until the target's deferred writes were applied): {}.\n",
            figures.join(", ")
        );
    }

    // Per round.
    let _ = write!(out, "| round |");
    for t in &r.targets {
        let _ = write!(out, " {} tps |", t.name);
    }
    for x in &r.ratios {
        let _ = write!(out, " {}/{} |", x.target, x.baseline);
    }
    let _ = writeln!(out);
    let _ = write!(out, "|---:|");
    for _ in 0..r.targets.len() + r.ratios.len() {
        let _ = write!(out, "---:|");
    }
    let _ = writeln!(out);
    for round in 0..s.rounds as usize {
        let _ = write!(out, "| {} |", round + 1);
        for t in &r.targets {
            let _ = write!(out, " {} |", num(t.rounds.get(round).map(|x| x.tps), 0));
        }
        for x in &r.ratios {
            let _ = write!(
                out,
                " {} |",
                ratio(x.ratios.per_round.get(round).copied().flatten())
            );
        }
        let _ = writeln!(out);
    }
    for x in &r.ratios {
        let _ = writeln!(
            out,
            "\n{}/{}: median of rounds {}, ratio of median tps {}.",
            x.target,
            x.baseline,
            ratio(x.ratios.median_of_rounds),
            ratio(x.ratios.of_medians)
        );
    }

    // Errors.
    let any_errors = r.targets.iter().any(|t| !t.errors.is_empty());
    if any_errors {
        let _ = writeln!(out, "\n### Errors (measured rounds)\n");
        let _ = writeln!(out, "| target | code | count | first message |");
        let _ = writeln!(out, "|---|---|---:|---|");
        for t in &r.targets {
            for (code, e) in &t.errors {
                let msg = e.example.replace('|', "\\|").replace('\n', " ");
                let _ = writeln!(out, "| {} | {code} | {} | {msg} |", t.name, e.count);
            }
        }
    }

    // spillway metrics.
    let _ = writeln!(out, "\n### spillway metrics\n");
    for t in &r.targets {
        let m = &t.metrics;
        if t.name == r.baseline && m.url.is_none() {
            continue;
        }
        if !m.available {
            let _ = writeln!(
                out,
                "- {}: not available ({})",
                t.name,
                m.note.as_deref().unwrap_or("no data")
            );
            continue;
        }
        let fallbacks = if m.fallbacks_by_reason.is_empty() {
            num(m.fallbacks, 0)
        } else {
            let by: Vec<String> = m
                .fallbacks_by_reason
                .iter()
                .map(|(k, v)| format!("{k}: {v:.0}"))
                .collect();
            format!("{} ({})", num(m.fallbacks, 0), by.join(", "))
        };
        let _ = writeln!(
            out,
            "- {}: hit ratio {}, fallbacks {fallbacks}, upstream statements per client write {}, \
             flush lag max {} s, flush worker applied {} rows at {} rows/s of batch time{}",
            t.name,
            num(m.hit_ratio, 3),
            num(m.upstream_statements_per_client_write, 2),
            num(m.flush_lag_max_seconds, 3),
            num(m.flush_rows, 0),
            num(m.flush_rows_per_busy_second, 0),
            m.note
                .as_deref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        );
    }

    // Correctness.
    if r.scenario.writes {
        let _ = writeln!(out, "\n### Correctness\n");
        for t in &r.targets {
            let Some(c) = &t.correctness else { continue };
            let verdict = if c.ok { "passed" } else { "FAILED" };
            let _ = writeln!(
                out,
                "- {}: {verdict} (writes of {})",
                t.name,
                c.writers.join(" + ")
            );
            if let Some(e) = &c.error {
                let _ = writeln!(out, "  - could not check: {e}");
            }
            for item in &c.checks {
                let _ = writeln!(
                    out,
                    "  - {}: expected {}, found {}{}",
                    item.name,
                    item.expected,
                    item.found,
                    if item.ok { "" } else { " ✗" }
                );
            }
        }
    }

    let _ = writeln!(
        out,
        "\n### Expected spillway table config\n\n```toml\n{}```",
        r.scenario.spillway_config
    );
    out
}

/// One row per scenario: median-of-rounds ratio of every non-baseline target.
pub fn summary(reports: &[Report]) -> String {
    let mut out = String::new();
    let Some(first) = reports.first() else {
        return out;
    };
    let _ = write!(out, "| scenario | mode |");
    for x in &first.ratios {
        let _ = write!(out, " {}/{} tps |", x.target, x.baseline);
    }
    for t in &first.targets {
        let _ = write!(out, " {} p50 ms |", t.name);
    }
    let cpu = reports
        .iter()
        .any(|r| r.targets.iter().any(|t| t.pg_cpu_us_per_op.is_some()));
    let cpu_columns = if cpu { first.targets.len() } else { 0 };
    for t in first.targets.iter().take(cpu_columns) {
        let _ = write!(out, " {} PG CPU µs/op |", t.name);
    }
    let _ = writeln!(out, " errors | correctness |");
    let _ = write!(out, "|---|---|");
    for _ in 0..first.ratios.len() + first.targets.len() + cpu_columns {
        let _ = write!(out, "---:|");
    }
    let _ = writeln!(out, "---:|---|");
    for r in reports {
        let _ = write!(
            out,
            "| {} | {} |",
            r.scenario.name,
            r.settings.mode.as_str()
        );
        for x in &r.ratios {
            let _ = write!(out, " {} |", ratio(x.ratios.median_of_rounds));
        }
        for t in &r.targets {
            let _ = write!(out, " {} |", num(t.latency_ms.p50, 3));
        }
        for t in r.targets.iter().take(cpu_columns) {
            let _ = write!(out, " {} |", num(t.pg_cpu_us_per_op, 1));
        }
        let errors: u64 = r.targets.iter().map(|t| t.error_total).sum();
        let verdict = match r.correctness_ok {
            None => "–",
            Some(true) => "passed",
            Some(false) => "FAILED",
        };
        let _ = writeln!(out, " {errors} | {verdict} |");
    }
    out
}
