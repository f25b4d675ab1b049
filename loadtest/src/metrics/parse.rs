//! The Prometheus text exposition format (0.0.4, and the OpenMetrics lines a scrape
//! may also contain), read leniently: comments, `# HELP`/`# TYPE`, blank lines and
//! `# EOF` are skipped; label values may hold escaped quotes, backslashes and
//! newlines, commas and braces; values may be `NaN`, `+Inf`, `-Inf` or exponents; a
//! timestamp after the value is ignored. A line that cannot be read is counted in
//! [`Snapshot::skipped`] and otherwise ignored, so one odd line never hides the rest.

use std::collections::BTreeMap;

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One read of an endpoint.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub samples: Vec<Sample>,
    pub skipped: usize,
}

impl Snapshot {
    pub fn parse(text: &str) -> Snapshot {
        let mut snap = Snapshot::default();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match parse_line(line) {
                Some(s) => snap.samples.push(s),
                None => snap.skipped += 1,
            }
        }
        snap
    }

    fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples
            .iter()
            .filter(move |s| s.name == name && !s.value.is_nan())
    }

    /// The sum over all label sets, `None` when the metric is absent.
    pub fn sum(&self, name: &str) -> Option<f64> {
        self.named(name)
            .map(|s| s.value)
            .fold(None, |acc, v| Some(acc.unwrap_or(0.0) + v))
    }

    /// The maximum over all label sets, `None` when the metric is absent.
    pub fn max(&self, name: &str) -> Option<f64> {
        self.named(name)
            .map(|s| s.value)
            .fold(None, |acc: Option<f64>, v| {
                Some(acc.map_or(v, |a| a.max(v)))
            })
    }

    /// Sums per value of `label` (a missing label counts as `""`).
    pub fn sum_by(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for s in self.named(name) {
            *out.entry(s.label(label).unwrap_or("").to_owned())
                .or_insert(0.0) += s.value;
        }
        out
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let (parsed, remaining) = parse_labels(after)?;
        labels = parsed;
        rest = remaining;
    }
    let mut fields = rest.split_whitespace();
    let value = parse_value(fields.next()?)?;
    // An optional timestamp; anything more is not a sample line.
    if let Some(ts) = fields.next() {
        ts.parse::<f64>().ok()?;
    }
    if fields.next().is_some() {
        return None;
    }
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Reads `k="v",…}`; returns the labels and what follows the closing brace.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return None;
        }
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        labels.push((key.to_owned(), value));
        s = s[end + 1..].trim_start();
        if let Some(rest) = s.strip_prefix(',') {
            s = rest;
        } else if !s.starts_with('}') {
            return None;
        }
    }
}

fn parse_value(v: &str) -> Option<f64> {
    match v {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => v.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_usual_shapes() {
        let text = "\
# HELP spillway_cache_hits_total Cache hits.
# TYPE spillway_cache_hits_total counter
spillway_cache_hits_total 1027
spillway_fallbacks_total{reason=\"on_conflict\",table=\"public.t\"} 3 1700000000000
spillway_fallbacks_total{ reason = \"weird \\\"quoted\\\", {braces}\\\\ \\n\" , table=\"public.u\", } 2
spillway_pending_oldest_age_seconds{table=\"public.t\"} 1.5e-1
spillway_latency_bucket{le=\"+Inf\"} +Inf
spillway_nan NaN

# EOF
";
        let s = Snapshot::parse(text);
        assert_eq!(s.skipped, 0, "{s:?}");
        assert_eq!(s.samples.len(), 6);
        assert_eq!(s.sum("spillway_cache_hits_total"), Some(1027.0));
        assert_eq!(s.sum("spillway_fallbacks_total"), Some(5.0));
        assert_eq!(
            s.samples[2].label("reason"),
            Some("weird \"quoted\", {braces}\\ \n")
        );
        assert_eq!(s.samples[2].label("table"), Some("public.u"));
        assert_eq!(s.max("spillway_pending_oldest_age_seconds"), Some(0.15));
        assert_eq!(s.sum("spillway_latency_bucket"), Some(f64::INFINITY));
        assert_eq!(s.sum("spillway_nan"), None, "NaN samples are ignored");
        assert_eq!(s.sum("absent"), None);
        let by = s.sum_by("spillway_fallbacks_total", "reason");
        assert_eq!(by.get("on_conflict"), Some(&3.0));
    }

    #[test]
    fn bad_lines_are_skipped_not_fatal() {
        let text = "\
good 1
bad{label=\"unterminated} 2
bad{=\"x\"} 2
bad{l=x} 2
bad 1 2 3
bad not-a-number
bad{l=\"x\"
-bad 1
also_good{a=\"b\"} 2
<html>
";
        let s = Snapshot::parse(text);
        assert_eq!(s.sum("good"), Some(1.0));
        assert_eq!(s.sum("also_good"), Some(2.0));
        assert_eq!(s.sum("bad"), None);
        assert_eq!(s.skipped, 8);
    }

    #[test]
    fn max_and_sum_by_with_missing_label() {
        let s = Snapshot::parse("g{table=\"a\"} 1\ng{table=\"b\"} 4\ng 2\n");
        assert_eq!(s.max("g"), Some(4.0));
        let by = s.sum_by("g", "table");
        assert_eq!(by.get(""), Some(&2.0));
        assert_eq!(by.len(), 3);
    }
}
