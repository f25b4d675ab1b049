//! Live progress on stderr: an indicatif bar per phase with current tps and errors
//! on a terminal, one plain line a second otherwise (CI logs), or nothing. The
//! summary line of each finished phase is printed in every mode but `none`.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::ProgressKind;

/// How often plain mode prints a line.
const PLAIN_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bar,
    Plain,
    None,
}

#[derive(Debug, Clone, Copy)]
pub struct Progress {
    kind: Kind,
}

impl Progress {
    pub fn new(kind: ProgressKind) -> Progress {
        let kind = match kind {
            ProgressKind::Auto if std::io::stderr().is_terminal() => Kind::Bar,
            ProgressKind::Auto | ProgressKind::Plain => Kind::Plain,
            ProgressKind::Bar => Kind::Bar,
            ProgressKind::None => Kind::None,
        };
        Progress { kind }
    }

    /// A line for the person watching (not part of the report).
    pub fn note(&self, line: &str) {
        if self.kind != Kind::None {
            eprintln!("{line}");
        }
    }

    pub fn phase(&self, label: String, length: Duration) -> PhaseProgress {
        let bar = (self.kind == Kind::Bar).then(|| {
            let bar = ProgressBar::new(u64::try_from(length.as_millis()).unwrap_or(u64::MAX));
            let style = ProgressStyle::with_template(
                "{prefix:>24} [{bar:30.cyan/blue}] {elapsed:>3}/{len_s} {msg}",
            )
            .map(|s| {
                s.with_key(
                    "len_s",
                    |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = write!(w, "{}s", state.len().unwrap_or(0).div_ceil(1000));
                    },
                )
                .progress_chars("=> ")
            })
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_prefix(label.clone());
            bar
        });
        let now = Instant::now();
        PhaseProgress {
            kind: self.kind,
            bar,
            label,
            started: now,
            length,
            last_at: now,
            last_ops: 0,
            last_print: now,
        }
    }
}

pub struct PhaseProgress {
    kind: Kind,
    bar: Option<ProgressBar>,
    label: String,
    started: Instant,
    length: Duration,
    last_at: Instant,
    last_ops: u64,
    last_print: Instant,
}

impl PhaseProgress {
    /// Called a few times a second with the phase's running totals.
    pub fn update(&mut self, ops: u64, errors: u64) {
        let now = Instant::now();
        let dt = now.duration_since(self.last_at).as_secs_f64();
        let tps = if dt > 0.0 {
            ops.saturating_sub(self.last_ops) as f64 / dt
        } else {
            0.0
        };
        match self.kind {
            Kind::Bar => {
                if let Some(bar) = &self.bar {
                    let elapsed = now.duration_since(self.started).min(self.length);
                    bar.set_position(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX));
                    bar.set_message(format!("{tps:>9.0} tps  {errors} errors"));
                }
                self.last_at = now;
                self.last_ops = ops;
            }
            Kind::Plain => {
                if now.duration_since(self.last_print) >= PLAIN_EVERY {
                    let t = now.duration_since(self.started).as_secs_f64();
                    eprintln!(
                        "  {} t={t:.0}s/{:.0}s {tps:.0} tps, {errors} errors",
                        self.label,
                        self.length.as_secs_f64()
                    );
                    self.last_print = now;
                    self.last_at = now;
                    self.last_ops = ops;
                }
            }
            Kind::None => {}
        }
    }

    pub fn finish(self, summary: &str) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if self.kind != Kind::None {
            eprintln!("  {}: {summary}", self.label);
        }
    }
}
