//! The correctness pass: what the generator was acknowledged (a [`Ledger`]) against
//! what the tables hold at the end.
//!
//! - Sum scenarios (`read-mostly`, `write-update`, `hot-counters`, `mixed-session`):
//!   the column's sum must have grown by exactly the acknowledged deltas, plus any
//!   part of the deltas whose fate is unknown (connection lost mid-statement).
//! - Key scenarios (`write-insert`, `orm-tx`): every acknowledged key is present
//!   exactly once, and the rows at or past the run's first key number between the
//!   acknowledged and the acknowledged-plus-unknown; for `orm-tx`, no order lacks its
//!   item (a transaction was never split).
//!
//! Checks read in a `REPEATABLE READ READ ONLY` transaction: spillway never answers
//! those from its cache (SPEC §5), so they see PostgreSQL's state (after spillway's
//! barrier, for deferred tables).

use serde::Serialize;

use super::Scenario;
use super::ops::{Applied, Effect};
use crate::db::{OpError, Session};

/// What the generator knows about the writes of one target (or several).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ledger {
    pub acked: u64,
    pub acked_delta: i64,
    pub unknown: u64,
    pub unknown_delta: i64,
    pub acked_keys: Vec<i64>,
}

impl Ledger {
    pub fn record(&mut self, effect: Effect, applied: Applied) {
        match applied {
            Applied::Yes => {
                self.acked += 1;
                self.acked_delta += effect.delta;
                if let Some(k) = effect.key {
                    self.acked_keys.push(k);
                }
            }
            Applied::Unknown => {
                self.unknown += 1;
                self.unknown_delta += effect.delta;
            }
            Applied::No => {}
        }
    }

    pub fn merge(&mut self, other: &Ledger) {
        self.acked += other.acked;
        self.acked_delta += other.acked_delta;
        self.unknown += other.unknown;
        self.unknown_delta += other.unknown_delta;
        self.acked_keys.extend_from_slice(&other.acked_keys);
    }
}

/// The state before the run, read through the first target of a dataset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Baseline {
    /// The checked column's sum (sum scenarios).
    pub sum: i64,
    /// One past the largest key (key scenarios): the first key this run inserts.
    pub next_key: i64,
}

/// One comparison of the correctness pass.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckItem {
    pub name: String,
    pub expected: String,
    pub found: String,
    pub ok: bool,
}

enum Kind {
    Sum {
        table: &'static str,
        column: &'static str,
    },
    Keys {
        table: &'static str,
        key: &'static str,
        items: bool,
    },
}

fn kind(s: Scenario) -> Option<Kind> {
    Some(match s {
        Scenario::PointRead | Scenario::JoinRead => return None,
        Scenario::ReadMostly => Kind::Sum {
            table: "lt_accounts",
            column: "balance",
        },
        Scenario::WriteUpdate => Kind::Sum {
            table: "lt_balances",
            column: "balance",
        },
        Scenario::HotCounters => Kind::Sum {
            table: "lt_counters",
            column: "n",
        },
        Scenario::MixedSession => Kind::Sum {
            table: "lt_sessions",
            column: "version",
        },
        Scenario::WriteInsert => Kind::Keys {
            table: "lt_events",
            key: "id",
            items: false,
        },
        Scenario::OrmTx => Kind::Keys {
            table: "lt_orm_orders",
            key: "id",
            items: true,
        },
    })
}

async fn in_snapshot<T>(
    s: &mut Session,
    body: impl AsyncFnOnce(&mut Session) -> Result<T, OpError>,
) -> Result<T, OpError> {
    s.batch("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let r = body(&mut *s).await;
    let _ = s.batch("COMMIT").await;
    r
}

async fn scalar(s: &mut Session, sql: &str) -> Result<i64, OpError> {
    let rows = s.text_rows(sql).await?;
    let value = rows.first().and_then(|r| r.first()).cloned().flatten();
    value
        .as_deref()
        .unwrap_or("0")
        .parse()
        .map_err(|e| OpError::check("client", format!("{sql}: not an integer ({e})")))
}

/// Reads the baseline (`Baseline::default()` for read-only scenarios).
pub async fn baseline(scenario: Scenario, s: &mut Session) -> Result<Baseline, OpError> {
    match kind(scenario) {
        None => Ok(Baseline::default()),
        Some(Kind::Sum { table, column }) => {
            let sql = format!("SELECT coalesce(sum({column}), 0) FROM {table}");
            let sum = in_snapshot(s, async |s| scalar(s, &sql).await).await?;
            Ok(Baseline { sum, next_key: 0 })
        }
        Some(Kind::Keys { table, key, .. }) => {
            let sql = format!("SELECT coalesce(max({key}), 0) + 1 FROM {table}");
            let next_key = in_snapshot(s, async |s| scalar(s, &sql).await).await?;
            Ok(Baseline { sum: 0, next_key })
        }
    }
}

/// Compares the final state (read through `s`) with the ledger of every target that
/// shares this data.
pub async fn check(
    scenario: Scenario,
    s: &mut Session,
    base: Baseline,
    ledger: &Ledger,
) -> Result<Vec<CheckItem>, OpError> {
    let Some(kind) = kind(scenario) else {
        return Ok(Vec::new());
    };
    in_snapshot(s, async |s| match kind {
        Kind::Sum { table, column } => {
            let found = scalar(
                s,
                &format!("SELECT coalesce(sum({column}), 0) FROM {table}"),
            )
            .await?
                - base.sum;
            Ok(vec![range_item(
                &format!("sum({table}.{column}) grew by the acknowledged deltas"),
                found,
                ledger.acked_delta,
                ledger.acked_delta + ledger.unknown_delta,
            )])
        }
        Kind::Keys { table, key, items } => {
            let acked = i64::try_from(ledger.acked_keys.len()).unwrap_or(i64::MAX);
            let mut present = 0;
            for chunk in ledger.acked_keys.chunks(5000) {
                let list: Vec<String> = chunk.iter().map(i64::to_string).collect();
                present += scalar(
                    s,
                    &format!(
                        "SELECT count(*) FROM {table} WHERE {key} = ANY('{{{}}}'::bigint[])",
                        list.join(",")
                    ),
                )
                .await?;
            }
            let new_rows = scalar(
                s,
                &format!(
                    "SELECT count(*) FROM {table} WHERE {key} >= {}",
                    base.next_key
                ),
            )
            .await?;
            let unknown = i64::try_from(ledger.unknown).unwrap_or(i64::MAX);
            let mut out = vec![
                range_item(
                    &format!("acknowledged keys present in {table}"),
                    present,
                    acked,
                    acked,
                ),
                range_item(
                    &format!("rows inserted into {table}"),
                    new_rows,
                    acked,
                    acked + unknown,
                ),
            ];
            if items {
                let orphans = scalar(
                    s,
                    &format!(
                        "SELECT count(*) FROM lt_orm_orders o WHERE o.id >= {} AND NOT EXISTS \
                         (SELECT 1 FROM lt_orm_items i WHERE i.order_id = o.id)",
                        base.next_key
                    ),
                )
                .await?;
                let lines = scalar(
                    s,
                    &format!(
                        "SELECT count(*) FROM lt_orm_items WHERE order_id >= {}",
                        base.next_key
                    ),
                )
                .await?;
                out.push(range_item("orders without their item", orphans, 0, 0));
                out.push(range_item(
                    "items inserted into lt_orm_items",
                    lines,
                    new_rows,
                    new_rows,
                ));
            }
            Ok(out)
        }
    })
    .await
}

/// `found` must lie in `[low, high]`.
pub fn range_item(name: &str, found: i64, low: i64, high: i64) -> CheckItem {
    CheckItem {
        name: name.to_owned(),
        expected: if low == high {
            low.to_string()
        } else {
            format!("{low}..={high}")
        },
        found: found.to_string(),
        ok: (low..=high).contains(&found),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_counts_acked_and_unknown_separately() {
        let mut l = Ledger::default();
        let e = |delta, key| Effect { delta, key };
        l.record(e(3, None), Applied::Yes);
        l.record(e(5, None), Applied::No);
        l.record(e(7, None), Applied::Unknown);
        l.record(e(0, Some(42)), Applied::Yes);
        l.record(e(0, Some(43)), Applied::Unknown);
        assert_eq!(l.acked, 2);
        assert_eq!(l.acked_delta, 3);
        assert_eq!(l.unknown, 2);
        assert_eq!(l.unknown_delta, 7);
        assert_eq!(l.acked_keys, vec![42]);
        let mut total = Ledger::default();
        total.merge(&l);
        total.merge(&l);
        assert_eq!(total.acked_delta, 6);
        assert_eq!(total.acked_keys, vec![42, 42]);
    }

    #[test]
    fn range_items() {
        let exact = range_item("x", 5, 5, 5);
        assert!(exact.ok);
        assert_eq!(exact.expected, "5");
        let within = range_item("x", 6, 5, 7);
        assert!(within.ok);
        assert_eq!(within.expected, "5..=7");
        assert!(!range_item("x", 4, 5, 7).ok);
        assert!(!range_item("x", 8, 5, 7).ok);
    }
}
