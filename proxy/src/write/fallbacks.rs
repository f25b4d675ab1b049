//! Rate-limited log lines for fallbacks: a write to a deferred table that runs
//! write-through instead (in a transaction, an unsupported shape, a full table…). A
//! busy application can fall back thousands of times a second; the counter
//! (`spillway_write_fallbacks_total`) counts each one, the log says it at most once per
//! table and reason per [`INTERVAL`], with how many it left out since its last line.
//!
//! Invariant: the std `Mutex` is held only to update one entry, never across `.await`;
//! the map is bounded by tables × reasons (both bounded sets: configured tables and
//! the fixed reason labels).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most one line per table and reason in this period.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// Per (table, reason): when the last line was logged, and fallbacks since then.
type Seen = HashMap<(String, &'static str), (Instant, u64)>;

#[derive(Default)]
pub struct FallbackLog {
    seen: Mutex<Seen>,
}

impl FallbackLog {
    /// Notes one fallback of `table` for `reason`; logs it unless a line for the same
    /// pair was logged less than [`INTERVAL`] ago.
    pub fn note(&self, table: &str, reason: &'static str) {
        if let Some(suppressed) = self.note_at(table, reason, Instant::now()) {
            tracing::info!(
                %table, reason, suppressed,
                "write to a deferred table ran write-through (fallback); at most one such \
                 line per table and reason every {}s, `suppressed` counts those left out",
                INTERVAL.as_secs()
            );
        }
    }

    /// `Some(suppressed since the last line)` when a line is due at `now`.
    fn note_at(&self, table: &str, reason: &'static str, now: Instant) -> Option<u64> {
        let mut seen = match self.seen.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        match seen.get_mut(&(table.to_owned(), reason)) {
            Some((last, suppressed)) if now.duration_since(*last) < INTERVAL => {
                *suppressed += 1;
                None
            }
            Some((last, suppressed)) => {
                *last = now;
                Some(std::mem::take(suppressed))
            }
            None => {
                seen.insert((table.to_owned(), reason), (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_logs_once_per_table_and_reason_then_the_count() {
        let log = FallbackLog::default();
        let t0 = Instant::now();
        assert_eq!(log.note_at("public.a", "in_transaction", t0), Some(0));
        for i in 1..=100 {
            let at = t0 + Duration::from_millis(i);
            assert_eq!(log.note_at("public.a", "in_transaction", at), None);
        }
        // Another reason or table has its own line.
        assert_eq!(log.note_at("public.a", "function", t0), Some(0));
        assert_eq!(log.note_at("public.b", "in_transaction", t0), Some(0));
        // After the interval: one line carrying what was left out.
        assert_eq!(
            log.note_at("public.a", "in_transaction", t0 + INTERVAL),
            Some(100)
        );
        assert_eq!(
            log.note_at("public.a", "in_transaction", t0 + INTERVAL),
            None
        );
    }
}
