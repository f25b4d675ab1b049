//! The shape of a run and its arithmetic, free of I/O so it can be unit-tested: the
//! alternation schedule (warm-ups, then rounds A B A B …), medians, ratios per round
//! and overall, and latency percentiles from an HDR histogram.
//!
//! Invariants: every target runs exactly once per round and in the same order in every
//! round, so round `r` of each target is adjacent in time to round `r` of the others;
//! a ratio is `None` (never NaN or infinite) when either side is missing or the
//! baseline is zero; a percentile is `None` below [`MIN_SAMPLES`] samples.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Fewer samples than this and a percentile says more about luck than about latency.
pub const MIN_SAMPLES: u64 = 200;

/// One step of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Load whose results are thrown away: connections warm, caches filled, prepared
    /// statements made. Writes still happen (and are checked for correctness).
    Warmup { target: usize },
    /// A measured round (`round` counts from 1).
    Round { round: usize, target: usize },
}

impl Phase {
    pub fn target(self) -> usize {
        match self {
            Phase::Warmup { target } | Phase::Round { target, .. } => target,
        }
    }
}

/// Warm-ups for every target (in target order) when `warmup`, then `rounds` rounds in
/// each of which every target runs once, in target order: A B A B …
pub fn schedule(targets: usize, rounds: usize, warmup: bool) -> Vec<Phase> {
    let mut phases = Vec::with_capacity(targets * (rounds + 1));
    if warmup {
        phases.extend((0..targets).map(|target| Phase::Warmup { target }));
    }
    for round in 1..=rounds {
        phases.extend((0..targets).map(|target| Phase::Round { round, target }));
    }
    phases
}

/// The median of the finite values; the mean of the middle two for an even count.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// `num / den`, or `None` when it would not be a meaningful finite number.
pub fn ratio(num: f64, den: f64) -> Option<f64> {
    let r = num / den;
    (num.is_finite() && den.is_finite() && den > 0.0 && r.is_finite()).then_some(r)
}

/// One target's throughput compared with the baseline's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ratios {
    /// `tps[r] / baseline[r]` for each round `r`.
    pub per_round: Vec<Option<f64>>,
    /// The median of the per-round ratios: the headline figure, since each pair of
    /// rounds ran next to each other in time.
    pub median_of_rounds: Option<f64>,
    /// `median(tps) / median(baseline)`, as `pgbench/compare.sh` reports it.
    pub of_medians: Option<f64>,
}

/// Compares per-round throughputs; rounds missing on either side give `None`.
pub fn ratios(tps: &[f64], baseline: &[f64]) -> Ratios {
    let rounds = tps.len().max(baseline.len());
    let per_round: Vec<Option<f64>> = (0..rounds)
        .map(|i| match (tps.get(i), baseline.get(i)) {
            (Some(&t), Some(&b)) => ratio(t, b),
            _ => None,
        })
        .collect();
    let present: Vec<f64> = per_round.iter().flatten().copied().collect();
    let of_medians = match (median(tps), median(baseline)) {
        (Some(t), Some(b)) => ratio(t, b),
        _ => None,
    };
    Ratios {
        median_of_rounds: median(&present),
        per_round,
        of_medians,
    }
}

/// Operations per second; `None` for an empty window.
pub fn tps(ops: u64, seconds: f64) -> Option<f64> {
    ratio(ops as f64, seconds)
}

/// Latency summary in milliseconds. Percentiles are `None` below [`MIN_SAMPLES`].
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Latency {
    pub samples: u64,
    pub mean: Option<f64>,
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
    pub p999: Option<f64>,
    pub max: Option<f64>,
}

impl Latency {
    /// From a histogram of microseconds.
    pub fn from_micros(h: &Histogram<u64>) -> Latency {
        let samples = h.len();
        let ms = |us: u64| us as f64 / 1000.0;
        let enough = samples >= MIN_SAMPLES;
        let q = |quantile: f64| enough.then(|| ms(h.value_at_quantile(quantile)));
        Latency {
            samples,
            mean: (samples > 0).then(|| h.mean() / 1000.0),
            p50: q(0.50),
            p95: q(0.95),
            p99: q(0.99),
            p999: q(0.999),
            max: (samples > 0).then(|| ms(h.max())),
        }
    }

    /// `(label, value)` pairs in display order, for tables and plots.
    pub fn points(&self) -> [(&'static str, Option<f64>); 5] {
        [
            ("p50", self.p50),
            ("p95", self.p95),
            ("p99", self.p99),
            ("p99.9", self.p999),
            ("max", self.max),
        ]
    }
}

/// A histogram of latencies in microseconds, 1 µs to 10 min at 3 significant digits;
/// larger values are clamped (saturating) rather than dropped.
pub fn new_histogram() -> Histogram<u64> {
    // Constant bounds the constructor accepts (1 ≤ low, high ≥ 2·low, sigfig ≤ 5).
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid constant histogram bounds")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_alternates_targets_within_each_round() {
        let s = schedule(2, 3, true);
        use Phase::*;
        assert_eq!(
            s,
            vec![
                Warmup { target: 0 },
                Warmup { target: 1 },
                Round {
                    round: 1,
                    target: 0
                },
                Round {
                    round: 1,
                    target: 1
                },
                Round {
                    round: 2,
                    target: 0
                },
                Round {
                    round: 2,
                    target: 1
                },
                Round {
                    round: 3,
                    target: 0
                },
                Round {
                    round: 3,
                    target: 1
                },
            ]
        );
        assert_eq!(s[3].target(), 1);
    }

    #[test]
    fn schedule_without_warmup_and_three_targets() {
        let s = schedule(3, 2, false);
        let targets: Vec<usize> = s.iter().map(|p| p.target()).collect();
        assert_eq!(targets, vec![0, 1, 2, 0, 1, 2]);
        assert!(s.iter().all(|p| matches!(p, Phase::Round { .. })));
        assert!(schedule(2, 0, false).is_empty());
    }

    #[test]
    fn median_odd_even_and_non_finite() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn ratio_refuses_meaningless_values() {
        assert_eq!(ratio(3.0, 2.0), Some(1.5));
        assert_eq!(ratio(1.0, 0.0), None);
        assert_eq!(ratio(1.0, -1.0), None);
        assert_eq!(ratio(f64::NAN, 1.0), None);
        assert_eq!(ratio(0.0, 2.0), Some(0.0));
    }

    #[test]
    fn ratios_per_round_median_and_ratio_of_medians() {
        let spillway = [200.0, 330.0, 150.0];
        let direct = [100.0, 110.0, 100.0];
        let r = ratios(&spillway, &direct);
        assert_eq!(r.per_round, vec![Some(2.0), Some(3.0), Some(1.5)]);
        assert_eq!(r.median_of_rounds, Some(2.0));
        // median 200 / median 100
        assert_eq!(r.of_medians, Some(2.0));
    }

    #[test]
    fn ratios_with_a_zero_baseline_round_or_missing_round() {
        let r = ratios(&[10.0, 10.0, 30.0], &[0.0, 5.0]);
        assert_eq!(r.per_round, vec![None, Some(2.0), None]);
        assert_eq!(r.median_of_rounds, Some(2.0));
        assert_eq!(r.of_medians, ratio(10.0, 2.5));
        let none = ratios(&[], &[]);
        assert_eq!(none.median_of_rounds, None);
        assert_eq!(none.of_medians, None);
    }

    #[test]
    fn tps_of_an_empty_window_is_none() {
        assert_eq!(tps(10, 2.0), Some(5.0));
        assert_eq!(tps(10, 0.0), None);
    }

    #[test]
    fn percentiles_need_enough_samples() {
        let mut h = new_histogram();
        for us in 1..=199u64 {
            h.record(us * 1000).expect("in range");
        }
        let l = Latency::from_micros(&h);
        assert_eq!(l.samples, 199);
        assert_eq!(l.p50, None);
        assert_eq!(l.p999, None);
        // HDR reports the top of the value's bucket: 3 significant digits.
        let max = l.max.expect("max");
        assert!((199.0..=199.2).contains(&max), "{max}");
        assert!(l.mean.is_some());
        h.record(200_000).expect("in range");
        let l = Latency::from_micros(&h);
        let p50 = l.p50.expect("200 samples are enough");
        assert!((99.0..=101.0).contains(&p50), "{p50}");
        let p99 = l.p99.expect("p99");
        assert!((197.0..=199.5).contains(&p99), "{p99}");
        assert_eq!(Latency::from_micros(&new_histogram()).max, None);
    }

    #[test]
    fn histogram_saturates_instead_of_failing() {
        let mut h = new_histogram();
        h.saturating_record(u64::MAX);
        assert_eq!(h.len(), 1);
    }
}
