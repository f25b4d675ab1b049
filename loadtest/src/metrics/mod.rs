//! spillway's own view of a run, from its Prometheus endpoint: read before and after
//! each measured round of the target it belongs to (and once a second during them for
//! the flush-lag gauge), turned into hit ratio, fallbacks, upstream statements per
//! client write, flush lag and the flush worker's apply rate.
//!
//! The metric names are the contract with the proxy (SPEC §7):
//! [`CACHE_HITS`], [`CACHE_MISSES`], [`FALLBACKS`] (labels `reason`, `table`),
//! [`CLIENT_WRITES`] (labels `table`, `policy`), [`UPSTREAM_STATEMENTS`],
//! [`PENDING_OLDEST_AGE`] (label `table`; flush lag = its maximum), [`FLUSH_ROWS`] and
//! [`FLUSH_SECONDS`] (the flush-batch histogram's sum: time spent applying batches).
//! The last two are optional: a spillway without deferred tables may not export them.
//!
//! Nothing here can fail a run: an endpoint that is absent or unreachable, or a metric
//! it does not export, makes the figure "not available" with the reason.

pub mod http;
pub mod parse;

use std::collections::BTreeMap;

use serde::Serialize;

pub use parse::Snapshot;

pub const CACHE_HITS: &str = "spillway_cache_hits_total";
pub const CACHE_MISSES: &str = "spillway_cache_misses_total";
pub const FALLBACKS: &str = "spillway_fallbacks_total";
pub const CLIENT_WRITES: &str = "spillway_client_writes_total";
pub const UPSTREAM_STATEMENTS: &str = "spillway_upstream_statements_total";
pub const PENDING_OLDEST_AGE: &str = "spillway_pending_oldest_age_seconds";
pub const FLUSH_ROWS: &str = "spillway_flush_rows_total";
pub const FLUSH_SECONDS: &str = "spillway_flush_batch_duration_seconds_sum";

/// The figures of one target over its measured rounds. `None` means not available.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Figures {
    pub available: bool,
    /// Why the figures are missing, or which were not exported.
    pub note: Option<String>,
    pub url: Option<String>,
    pub cache_hits: Option<f64>,
    pub cache_misses: Option<f64>,
    pub hit_ratio: Option<f64>,
    pub fallbacks: Option<f64>,
    pub fallbacks_by_reason: BTreeMap<String, f64>,
    pub client_writes: Option<f64>,
    pub client_writes_by_policy: BTreeMap<String, f64>,
    pub upstream_statements: Option<f64>,
    pub upstream_statements_per_client_write: Option<f64>,
    pub flush_lag_max_seconds: Option<f64>,
    /// Rows the flush worker applied upstream.
    pub flush_rows: Option<f64>,
    /// Seconds the flush worker spent applying batches.
    pub flush_busy_seconds: Option<f64>,
    /// `flush_rows / flush_busy_seconds`: the apply rate while applying.
    pub flush_rows_per_busy_second: Option<f64>,
}

impl Figures {
    /// For a target without `--metrics`.
    pub fn not_configured() -> Figures {
        Figures {
            note: Some("no --metrics URL for this target".to_owned()),
            ..Figures::default()
        }
    }
}

/// Sums counter increases over rounds and tracks the gauge's maximum.
#[derive(Debug, Clone, Default)]
pub struct Accumulator {
    url: String,
    failure: Option<String>,
    rounds: u32,
    hits: Option<f64>,
    misses: Option<f64>,
    fallbacks: Option<f64>,
    fallbacks_by_reason: BTreeMap<String, f64>,
    writes: Option<f64>,
    writes_by_policy: BTreeMap<String, f64>,
    upstream: Option<f64>,
    lag_max: Option<f64>,
    flush_rows: Option<f64>,
    flush_seconds: Option<f64>,
}

/// The increase of a counter between two reads; a counter that went down was reset
/// (spillway restarted), so its whole current value is the increase.
pub fn increase(before: f64, after: f64) -> f64 {
    if after >= before {
        after - before
    } else {
        after
    }
}

fn add(acc: &mut Option<f64>, v: Option<f64>) {
    if let Some(v) = v {
        *acc = Some(acc.unwrap_or(0.0) + v);
    }
}

fn add_map(
    acc: &mut BTreeMap<String, f64>,
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) {
    for (k, a) in after {
        let b = before.get(k).copied().unwrap_or(0.0);
        *acc.entry(k.clone()).or_insert(0.0) += increase(b, *a);
    }
}

impl Accumulator {
    pub fn new(url: &str) -> Accumulator {
        Accumulator {
            url: url.to_owned(),
            ..Accumulator::default()
        }
    }

    /// Once a read has failed, the endpoint is not asked again during the run.
    pub fn failed(&self) -> bool {
        self.failure.is_some()
    }

    pub fn fail(&mut self, reason: String) {
        if self.failure.is_none() {
            self.failure = Some(reason);
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Adds what one measured round changed.
    pub fn add_round(&mut self, before: &Snapshot, after: &Snapshot) {
        self.rounds += 1;
        let delta = |name: &str| match (before.sum(name), after.sum(name)) {
            (Some(b), Some(a)) => Some(increase(b, a)),
            (None, Some(a)) => Some(a),
            _ => None,
        };
        add(&mut self.hits, delta(CACHE_HITS));
        add(&mut self.misses, delta(CACHE_MISSES));
        add(&mut self.fallbacks, delta(FALLBACKS));
        add(&mut self.writes, delta(CLIENT_WRITES));
        add(&mut self.upstream, delta(UPSTREAM_STATEMENTS));
        add(&mut self.flush_rows, delta(FLUSH_ROWS));
        add(&mut self.flush_seconds, delta(FLUSH_SECONDS));
        add_map(
            &mut self.fallbacks_by_reason,
            &before.sum_by(FALLBACKS, "reason"),
            &after.sum_by(FALLBACKS, "reason"),
        );
        add_map(
            &mut self.writes_by_policy,
            &before.sum_by(CLIENT_WRITES, "policy"),
            &after.sum_by(CLIENT_WRITES, "policy"),
        );
        self.observe_gauges(after);
    }

    /// Folds in the flush-lag gauge of a read taken during a round.
    pub fn observe_gauges(&mut self, snap: &Snapshot) {
        if let Some(lag) = snap.max(PENDING_OLDEST_AGE) {
            self.lag_max = Some(self.lag_max.map_or(lag, |m: f64| m.max(lag)));
        }
    }

    pub fn figures(&self) -> Figures {
        let url = Some(self.url.clone());
        if let Some(reason) = &self.failure {
            return Figures {
                note: Some(format!("not available: {reason}")),
                url,
                ..Figures::default()
            };
        }
        if self.rounds == 0 {
            return Figures {
                note: Some("not available: no measured round was read".to_owned()),
                url,
                ..Figures::default()
            };
        }
        let missing: Vec<&str> = [
            (CACHE_HITS, self.hits),
            (CACHE_MISSES, self.misses),
            (FALLBACKS, self.fallbacks),
            (CLIENT_WRITES, self.writes),
            (UPSTREAM_STATEMENTS, self.upstream),
            (PENDING_OLDEST_AGE, self.lag_max),
        ]
        .into_iter()
        .filter(|(_, v)| v.is_none())
        .map(|(n, _)| n)
        .collect();
        let hit_ratio = match (self.hits, self.misses) {
            (Some(h), Some(m)) => crate::plan::ratio(h, h + m),
            _ => None,
        };
        let per_write = match (self.upstream, self.writes) {
            (Some(u), Some(w)) => crate::plan::ratio(u, w),
            _ => None,
        };
        Figures {
            available: missing.len() < 6,
            note: (!missing.is_empty()).then(|| format!("not exported: {}", missing.join(", "))),
            url,
            cache_hits: self.hits,
            cache_misses: self.misses,
            hit_ratio,
            fallbacks: self.fallbacks,
            fallbacks_by_reason: self.fallbacks_by_reason.clone(),
            client_writes: self.writes,
            client_writes_by_policy: self.writes_by_policy.clone(),
            upstream_statements: self.upstream,
            upstream_statements_per_client_write: per_write,
            flush_lag_max_seconds: self.lag_max,
            flush_rows: self.flush_rows,
            flush_busy_seconds: self.flush_seconds,
            flush_rows_per_busy_second: match (self.flush_rows, self.flush_seconds) {
                (Some(r), Some(s)) => crate::plan::ratio(r, s),
                _ => None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(text: &str) -> Snapshot {
        Snapshot::parse(text)
    }

    #[test]
    fn figures_from_two_rounds() {
        let mut acc = Accumulator::new("http://127.0.0.1:9187/metrics");
        let r0 = snap(
            "spillway_cache_hits_total 100\nspillway_cache_misses_total 10\n\
             spillway_fallbacks_total{reason=\"on_conflict\",table=\"public.t\"} 1\n\
             spillway_client_writes_total{table=\"public.t\",policy=\"write-back\"} 50\n\
             spillway_upstream_statements_total 60\n\
             spillway_pending_oldest_age_seconds{table=\"public.t\"} 0.05\n",
        );
        let r1 = snap(
            "spillway_cache_hits_total 190\nspillway_cache_misses_total 20\n\
             spillway_fallbacks_total{reason=\"on_conflict\",table=\"public.t\"} 3\n\
             spillway_fallbacks_total{reason=\"returning\",table=\"public.u\"} 1\n\
             spillway_client_writes_total{table=\"public.t\",policy=\"write-back\"} 150\n\
             spillway_upstream_statements_total 70\n\
             spillway_pending_oldest_age_seconds{table=\"public.t\"} 0.25\n\
             spillway_pending_oldest_age_seconds{table=\"public.u\"} 0.1\n",
        );
        acc.add_round(&r0, &r1);
        // A restart between rounds: counters start again from zero.
        let r2 = snap(
            "spillway_cache_hits_total 5\nspillway_cache_misses_total 0\n\
             spillway_fallbacks_total{reason=\"on_conflict\",table=\"public.t\"} 0\n\
             spillway_client_writes_total{table=\"public.t\",policy=\"write-back\"} 0\n\
             spillway_upstream_statements_total 0\n",
        );
        let r3 = snap(
            "spillway_cache_hits_total 15\nspillway_cache_misses_total 0\n\
             spillway_fallbacks_total{reason=\"on_conflict\",table=\"public.t\"} 0\n\
             spillway_client_writes_total{table=\"public.t\",policy=\"write-back\"} 100\n\
             spillway_upstream_statements_total 10\n",
        );
        acc.add_round(&r2, &r3);
        let f = acc.figures();
        assert!(f.available);
        assert_eq!(f.note, None);
        assert_eq!(f.cache_hits, Some(100.0));
        assert_eq!(f.cache_misses, Some(10.0));
        assert_eq!(f.hit_ratio, Some(100.0 / 110.0));
        assert_eq!(f.fallbacks, Some(3.0));
        assert_eq!(f.fallbacks_by_reason.get("on_conflict"), Some(&2.0));
        assert_eq!(f.fallbacks_by_reason.get("returning"), Some(&1.0));
        assert_eq!(f.client_writes, Some(200.0));
        assert_eq!(f.client_writes_by_policy.get("write-back"), Some(&200.0));
        assert_eq!(f.upstream_statements, Some(20.0));
        assert_eq!(f.upstream_statements_per_client_write, Some(0.1));
        assert_eq!(f.flush_lag_max_seconds, Some(0.25));
        // Not exported by that spillway: not available, and not a reason to fail.
        assert_eq!((f.flush_rows, f.flush_rows_per_busy_second), (None, None));
    }

    #[test]
    fn the_flush_apply_rate_is_rows_over_batch_time() {
        let mut acc = Accumulator::new("http://x/metrics");
        acc.add_round(
            &snap(
                "spillway_flush_rows_total 100
                 spillway_flush_batch_duration_seconds_sum 0.5
                 spillway_flush_batch_duration_seconds_count 4
",
            ),
            &snap(
                "spillway_flush_rows_total 4100
                 spillway_flush_batch_duration_seconds_sum 2.5
                 spillway_flush_batch_duration_seconds_count 9
",
            ),
        );
        let f = acc.figures();
        assert_eq!(f.flush_rows, Some(4000.0));
        assert_eq!(f.flush_busy_seconds, Some(2.0));
        assert_eq!(f.flush_rows_per_busy_second, Some(2000.0));
    }

    #[test]
    fn missing_metrics_and_failures_are_not_available() {
        let mut acc = Accumulator::new("http://x/metrics");
        acc.add_round(
            &snap("spillway_cache_hits_total 1\n"),
            &snap("spillway_cache_hits_total 4\n"),
        );
        let f = acc.figures();
        assert!(f.available);
        assert_eq!(f.cache_hits, Some(3.0));
        assert_eq!(f.hit_ratio, None);
        let note = f.note.expect("lists what is missing");
        assert!(
            note.contains(CACHE_MISSES) && note.contains(PENDING_OLDEST_AGE),
            "{note}"
        );

        let mut acc = Accumulator::new("http://x/metrics");
        acc.add_round(&snap("# nothing\n"), &snap("other_metric 1\n"));
        assert!(!acc.figures().available);

        let mut acc = Accumulator::new("http://x/metrics");
        acc.fail("connection refused".to_owned());
        acc.fail("second reason is ignored".to_owned());
        let f = acc.figures();
        assert!(!f.available);
        assert_eq!(f.note.as_deref(), Some("not available: connection refused"));
        assert_eq!(f.cache_hits, None);
        assert!(!Accumulator::new("u").figures().available);
    }

    #[test]
    fn counter_increase_handles_resets() {
        assert_eq!(increase(10.0, 15.0), 5.0);
        assert_eq!(increase(10.0, 3.0), 3.0);
    }
}
