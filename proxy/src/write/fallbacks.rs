//! Fallbacks: a write to a deferred table that runs write-through instead (in a
//! transaction, an unsupported shape, a full table…). [`Fallback`] says why, and is a
//! metric label (`reason="…"` of `spillway_write_fallbacks_total`); [`FallbackLog`]
//! rate-limits the log lines: a busy application can fall back thousands of times a
//! second; the counter counts each one, the log says it at most once per table and
//! reason per [`INTERVAL`], with how many it left out since its last line.
//!
//! Invariants: a reason's label never changes (dashboards use it); the std `Mutex` is
//! held only to update one entry, never across `.await`; the map is bounded by tables
//! × reasons (both bounded sets: configured tables and the fixed reason labels).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Why a write to a deferred table runs write-through instead of being deferred.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fallback {
    /// The classifier found no deferrable shape (`read/classify/shape/reason.rs`).
    Shape(&'static str),
    /// A parameter or key value spillway cannot carry as text (`params.rs`:
    /// `binary_parameter_type`, `parameter_value`, `key_type`).
    Value(&'static str),
    /// A value the client cast.
    Cast,
    /// A date, time or interval value (its text depends on session settings).
    DatetimeValue,
    /// A parameter declared with a type other than its column's.
    ParameterType,
    /// `'now'`, `'today'`… for a date/time column.
    ClockLiteral,
    /// An INSERT leaving out a column whose default reads the clock or makes a value
    /// (`now()`, `gen_random_uuid()` …) that spillway cannot evaluate for it.
    ClockDefault,
    /// `now()`, `CURRENT_DATE`… into a date, time or timestamp (no zone) column, or
    /// `LOCALTIMESTAMP` and the like, in a session whose TimeZone is not UTC: the
    /// local value needs the zone's rules (ADR 0030).
    ClockTimeZone,
    /// A clock or random function into a column of a type it is not assigned to
    /// exactly here (text, a timestamp precision that rounds, a cast …).
    ClockType,
    /// A value PostgreSQL would refuse for its column.
    InvalidValue,
    NullInNotNullColumn,
    /// The WHERE is not exactly the primary key.
    WhereNotPrimaryKey,
    /// A WHERE equality beyond the key on a column spillway cannot compare exactly
    /// (only integer columns are guarded, ADR 0035).
    GuardColumn,
    /// A guarded write whose row spillway does not know exactly (ADR 0035): a delta
    /// pending on a guarded column, a column's default, a row a bypassing writer
    /// changed.
    RowUnknown,
    NullKey,
    UnknownColumn,
    /// An INSERT without a NOT NULL column that has no default.
    RequiredColumnMissing,
    /// An INSERT without a key column (and no reserved value for it).
    KeyNotGiven,
    /// An INSERT leaving a `serial`/identity key out while the table's block of
    /// reserved values is empty (a burst beyond it, or PostgreSQL unreachable).
    KeyReservation,
    /// An INSERT giving a value to a `GENERATED ALWAYS` column (PostgreSQL refuses
    /// it: the client gets PostgreSQL's error).
    GeneratedAlways,
    /// An UPDATE of a key column.
    KeyUpdate,
    ArithmeticOnNonNumeric,
    /// A RETURNING value not supplied by the statement or not known exactly.
    ReturningUnknown,
    /// Execute limits the rows below what a RETURNING write returns.
    ReturningRowLimit,
    /// The table is not deferred (or the session's deferred tables are another
    /// database's).
    NotDeferred,
    MultipleStatements,
    /// One of several Executes in one extended-protocol cycle (a pipelined batch:
    /// psycopg's executemany), which PostgreSQL runs as one implicit transaction.
    Pipelined,
    /// An extended-protocol cycle forwarded before its Sync (a Flush, a named portal,
    /// more than spillway holds).
    Forwarded,
    NotADeferrableWrite,
    /// In a transaction block (not a held one), or behind unanswered requests.
    InTransaction,
    /// The session's settings or role are not followed (its key is unusable).
    SessionState,
    /// `client_encoding` or `standard_conforming_strings` not as the flusher's.
    SessionSettings,
    /// `default_transaction_read_only = on`: PostgreSQL refuses the write itself.
    ReadOnly,
    /// A function or SQL value function in the statement.
    Function,
    CatalogNotLoaded,
    /// The name denotes more than one relation.
    AmbiguousTable,
    /// A reload is moving the table off a deferred policy.
    PolicyReloading,
    /// `INSERT … ON CONFLICT` whose arbiter is not exactly the primary key (another
    /// unique constraint conflicts on rows spillway does not follow).
    ConflictNotPrimaryKey,
    /// `INSERT … ON CONFLICT` giving one key in two of its rows.
    ConflictRepeatedKey,
    /// `DO UPDATE SET c = EXCLUDED.d` where the INSERT left `d` to its default.
    ExcludedDefault,
    /// `max_pending` reached with `when_full = "write-through"`.
    Full,
}

impl Fallback {
    /// The metric label (`reason="…"`), as documented in `docs/operations.md`.
    pub fn label(self) -> &'static str {
        match self {
            Fallback::Shape(reason) | Fallback::Value(reason) => reason,
            Fallback::Cast => "cast",
            Fallback::DatetimeValue => "datetime_value",
            Fallback::ParameterType => "parameter_type",
            Fallback::ClockLiteral => "clock_literal",
            Fallback::ClockDefault => "clock_default",
            Fallback::ClockTimeZone => "clock_time_zone",
            Fallback::ClockType => "clock_type",
            Fallback::InvalidValue => "invalid_value",
            Fallback::NullInNotNullColumn => "null_in_not_null_column",
            Fallback::WhereNotPrimaryKey => "where_not_primary_key",
            Fallback::GuardColumn => "guard_column",
            Fallback::RowUnknown => "row_unknown",
            Fallback::NullKey => "null_key",
            Fallback::UnknownColumn => "unknown_column",
            Fallback::RequiredColumnMissing => "required_column_missing",
            Fallback::KeyNotGiven => "key_not_given",
            Fallback::KeyReservation => "key_reservation",
            Fallback::GeneratedAlways => "generated_always",
            Fallback::KeyUpdate => "key_update",
            Fallback::ArithmeticOnNonNumeric => "arithmetic_on_non_numeric",
            Fallback::ReturningUnknown => "returning_unknown",
            Fallback::ReturningRowLimit => "returning_row_limit",
            Fallback::NotDeferred => "not_deferred",
            Fallback::MultipleStatements => "multiple_statements",
            Fallback::Pipelined => "pipelined",
            Fallback::Forwarded => "forwarded",
            Fallback::NotADeferrableWrite => "not_a_deferrable_write",
            Fallback::InTransaction => "in_transaction",
            Fallback::SessionState => "session_state",
            Fallback::SessionSettings => "session_settings",
            Fallback::ReadOnly => "read_only",
            Fallback::Function => "function",
            Fallback::CatalogNotLoaded => "catalog_not_loaded",
            Fallback::AmbiguousTable => "ambiguous_table",
            Fallback::PolicyReloading => "policy_reloading",
            Fallback::ConflictNotPrimaryKey => "on_conflict_not_primary_key",
            Fallback::ConflictRepeatedKey => "on_conflict_repeated_key",
            Fallback::ExcludedDefault => "excluded_default",
            Fallback::Full => "full",
        }
    }
}

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
    pub fn note(&self, table: &str, reason: Fallback) {
        let reason = reason.label();
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
