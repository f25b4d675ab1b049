//! One operation of each scenario: the statements, the generated parameters, the
//! per-operation checks (row counts, read-your-writes), and the effect the operation
//! was meant to have, for the correctness pass.
//!
//! Keys come from a per-client seeded generator, so client `i` of every target draws
//! the same key sequence (same cache behaviour, a fair comparison). Inserted keys come
//! from one counter shared by all targets of a dataset, so they are never reused.

use std::sync::atomic::{AtomicI64, Ordering};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::types::Type;

use super::Scenario;
use crate::db::{OpError, Param, Session, Stmt};

/// Read-only state shared by every client of a dataset (plus the key counter).
#[derive(Debug)]
pub struct Workload {
    pub scenario: Scenario,
    /// The scale the dataset was set up with (from `lt_meta`).
    pub scale: u32,
    pub clients: u32,
    /// First key this run inserts (one past the largest key at the start).
    pub key_base: i64,
    next_key: AtomicI64,
}

impl Workload {
    pub fn new(scenario: Scenario, scale: u32, clients: u32, key_base: i64) -> Workload {
        Workload {
            scenario,
            scale,
            clients,
            key_base,
            next_key: AtomicI64::new(key_base),
        }
    }

    fn fresh_key(&self) -> i64 {
        self.next_key.fetch_add(1, Ordering::Relaxed)
    }

    fn accounts(&self) -> i64 {
        100_000 * i64::from(self.scale)
    }

    fn customers(&self) -> i64 {
        10_000 * i64::from(self.scale)
    }

    /// Rows of `lt_sessions`, which each client partitions by `id % clients`.
    pub fn sessions(&self) -> i64 {
        10_000 * i64::from(self.scale)
    }
}

/// One client's generator state.
#[derive(Debug)]
pub struct ClientGen {
    rng: StdRng,
    client: u32,
    seq: u64,
}

impl ClientGen {
    pub fn new(seed: u64, client: u32) -> ClientGen {
        let mix = seed ^ (u64::from(client) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        ClientGen {
            rng: StdRng::seed_from_u64(mix),
            client,
            seq: 0,
        }
    }
}

/// Whether an operation's write took effect, as far as the client can know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Yes,
    No,
    Unknown,
}

/// The write an operation meant to make: a sum to add, or a key to create.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Effect {
    pub delta: i64,
    pub key: Option<i64>,
}

/// What one operation did.
#[derive(Debug)]
pub struct Step {
    /// `None` for reads.
    pub write: Option<(Effect, Applied)>,
    pub error: Option<OpError>,
}

impl Step {
    fn read(result: Result<(), OpError>) -> Step {
        Step {
            write: None,
            error: result.err(),
        }
    }

    fn write(effect: Effect, result: Result<(), OpError>) -> Step {
        let applied = match &result {
            Ok(()) => Applied::Yes,
            Err(e) if e.ambiguous => Applied::Unknown,
            Err(_) => Applied::No,
        };
        Step {
            write: Some((effect, applied)),
            error: result.err(),
        }
    }
}

const POINT_READ: Stmt = Stmt {
    sql: "SELECT balance FROM lt_accounts WHERE id = $1",
    types: &[Type::INT8],
    text_result: false,
};
const ACCOUNT_UPDATE: Stmt = Stmt {
    sql: "UPDATE lt_accounts SET balance = balance + $1 WHERE id = $2",
    types: &[Type::INT8, Type::INT8],
    text_result: false,
};
const JOIN_READ: Stmt = Stmt {
    sql: "SELECT c.name, o.id, o.total_cents, l.line, l.sku, l.qty \
          FROM lt_customers c \
          JOIN lt_orders o ON o.customer_id = c.id \
          JOIN lt_order_lines l ON l.order_id = o.id \
          WHERE c.id = $1 ORDER BY o.id, l.line",
    types: &[Type::INT8],
    text_result: false,
};
const BALANCE_UPDATE: Stmt = Stmt {
    sql: "UPDATE lt_balances SET balance = balance + $1 WHERE id = $2",
    types: &[Type::INT8, Type::INT8],
    text_result: false,
};
const EVENT_INSERT: Stmt = Stmt {
    sql: "INSERT INTO lt_events (id, account_id, kind, payload) VALUES ($1, $2, $3, $4)",
    types: &[Type::INT8, Type::INT8, Type::TEXT, Type::TEXT],
    text_result: false,
};
const COUNTER_INCREMENT: Stmt = Stmt {
    sql: "UPDATE lt_counters SET n = n + 1 WHERE id = $1",
    types: &[Type::INT8],
    text_result: false,
};
const BEGIN: Stmt = Stmt {
    sql: "BEGIN",
    types: &[],
    text_result: false,
};
const COMMIT: Stmt = Stmt {
    sql: "COMMIT",
    types: &[],
    text_result: false,
};
const ORDER_INSERT: Stmt = Stmt {
    sql: "INSERT INTO lt_orm_orders (id, customer_id, status, total_cents) VALUES ($1, $2, $3, $4)",
    types: &[Type::INT8, Type::INT8, Type::TEXT, Type::INT8],
    text_result: false,
};
const ITEM_INSERT: Stmt = Stmt {
    sql: "INSERT INTO lt_orm_items (order_id, line, sku, qty) VALUES ($1, $2, $3, $4)",
    types: &[Type::INT8, Type::INT4, Type::TEXT, Type::INT4],
    text_result: false,
};
const SESSION_WRITE: Stmt = Stmt {
    sql: "UPDATE lt_sessions SET data = $1, version = version + 1 WHERE id = $2",
    types: &[Type::TEXT, Type::INT8],
    text_result: false,
};
const SESSION_READ: Stmt = Stmt {
    sql: "SELECT data FROM lt_sessions WHERE id = $1",
    types: &[Type::INT8],
    text_result: true,
};

/// Runs one operation of the workload's scenario.
pub async fn step(w: &Workload, g: &mut ClientGen, s: &mut Session) -> Step {
    g.seq += 1;
    match w.scenario {
        Scenario::PointRead => point_read(w, g, s).await,
        Scenario::ReadMostly => {
            if g.rng.random_bool(0.05) {
                let delta = g.rng.random_range(1..=100);
                let id = g.rng.random_range(1..=w.accounts());
                let params = [Param::Int(delta), Param::Int(id)];
                let r = expect_rows(s, &ACCOUNT_UPDATE, &params, 1).await;
                Step::write(Effect { delta, key: None }, r)
            } else {
                point_read(w, g, s).await
            }
        }
        Scenario::JoinRead => {
            let id = g.rng.random_range(1..=w.customers());
            Step::read(expect_rows(s, &JOIN_READ, &[Param::Int(id)], 15).await)
        }
        Scenario::WriteUpdate => {
            let delta = g.rng.random_range(1..=100);
            let id = g.rng.random_range(1..=w.accounts());
            let params = [Param::Int(delta), Param::Int(id)];
            let r = expect_rows(s, &BALANCE_UPDATE, &params, 1).await;
            Step::write(Effect { delta, key: None }, r)
        }
        Scenario::WriteInsert => {
            let key = w.fresh_key();
            let params = [
                Param::Int(key),
                Param::Int(g.rng.random_range(1..=1000)),
                Param::Text("click".to_owned()),
                Param::Text(format!("client {} op {}", g.client, g.seq)),
            ];
            let r = expect_rows(s, &EVENT_INSERT, &params, 1).await;
            Step::write(
                Effect {
                    delta: 0,
                    key: Some(key),
                },
                r,
            )
        }
        Scenario::HotCounters => {
            let id = g.rng.random_range(1..=100);
            let r = expect_rows(s, &COUNTER_INCREMENT, &[Param::Int(id)], 1).await;
            Step::write(
                Effect {
                    delta: 1,
                    key: None,
                },
                r,
            )
        }
        Scenario::OrmTx => orm_tx(w, g, s).await,
        Scenario::MixedSession => mixed_session(w, g, s).await,
    }
}

async fn point_read(w: &Workload, g: &mut ClientGen, s: &mut Session) -> Step {
    let id = g.rng.random_range(1..=w.accounts());
    Step::read(expect_rows(s, &POINT_READ, &[Param::Int(id)], 1).await)
}

async fn orm_tx(w: &Workload, g: &mut ClientGen, s: &mut Session) -> Step {
    let key = w.fresh_key();
    let customer = g.rng.random_range(1..=w.customers());
    let total = g.rng.random_range(100..=100_000);
    let qty = g.rng.random_range(1..=5);
    let effect = Effect {
        delta: 0,
        key: Some(key),
    };
    let r: Result<(), OpError> = async {
        s.run(&BEGIN, &[]).await?;
        expect_rows(
            s,
            &ORDER_INSERT,
            &[
                Param::Int(key),
                Param::Int(customer),
                Param::Text("new".to_owned()),
                Param::Int(total),
            ],
            1,
        )
        .await?;
        expect_rows(
            s,
            &ITEM_INSERT,
            &[
                Param::Int(key),
                Param::Int4(1),
                Param::Text(format!("sku-{}", key % 1000)),
                Param::Int4(qty),
            ],
            1,
        )
        .await?;
        Ok(())
    }
    .await;
    match r {
        Ok(()) => {
            let commit = s.run(&COMMIT, &[]).await.map(|_| ());
            Step::write(effect, commit)
        }
        Err(e) => {
            // The transaction is aborted (or the connection gone): nothing committed,
            // unless the connection broke, which `ambiguous` already says.
            if !s.is_closed() {
                let _ = s.batch("ROLLBACK").await;
            }
            Step::write(effect, Err(e))
        }
    }
}

async fn mixed_session(w: &Workload, g: &mut ClientGen, s: &mut Session) -> Step {
    // Client c owns the rows with (id - 1) % clients == c.
    let per_client = (w.sessions() / i64::from(w.clients)).max(1);
    let id = 1 + i64::from(g.client) + i64::from(w.clients) * g.rng.random_range(0..per_client);
    let token = format!("c{}-{}", g.client, g.seq);
    let effect = Effect {
        delta: 1,
        key: None,
    };
    let write = expect_rows(
        s,
        &SESSION_WRITE,
        &[Param::Text(token.clone()), Param::Int(id)],
        1,
    )
    .await;
    if let Err(e) = write {
        return Step::write(effect, Err(e));
    }
    let read = match s.run(&SESSION_READ, &[Param::Int(id)]).await {
        Ok(out) if out.text.as_deref() == Some(token.as_str()) => Ok(()),
        Ok(out) => Err(OpError::check(
            "stale-read",
            format!(
                "lt_sessions row {id}: wrote {token:?}, read back {:?}",
                out.text
            ),
        )),
        Err(e) => Err(e),
    };
    // The write was acknowledged whatever the read found.
    Step {
        write: Some((effect, Applied::Yes)),
        error: read.err(),
    }
}

/// Runs `stmt` and insists on `rows` rows returned or affected.
async fn expect_rows(
    s: &mut Session,
    stmt: &Stmt,
    params: &[Param],
    rows: u64,
) -> Result<(), OpError> {
    let out = s.run(stmt, params).await?;
    if out.rows == rows {
        Ok(())
    } else {
        Err(OpError::check(
            "wrong-row-count",
            format!("expected {rows} rows, got {}: {}", out.rows, stmt.sql),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_draw_reproducible_and_distinct_sequences() {
        let draw = |seed, client| {
            let mut g = ClientGen::new(seed, client);
            (0..5)
                .map(|_| g.rng.random_range(0..1_000_000))
                .collect::<Vec<i64>>()
        };
        assert_eq!(draw(7, 0), draw(7, 0));
        assert_ne!(draw(7, 0), draw(7, 1));
        assert_ne!(draw(7, 0), draw(8, 0));
    }

    #[test]
    fn fresh_keys_are_unique_from_the_base() {
        let w = Workload::new(Scenario::WriteInsert, 1, 4, 10_001);
        assert_eq!(w.fresh_key(), 10_001);
        assert_eq!(w.fresh_key(), 10_002);
    }

    #[test]
    fn steps_classify_applied() {
        let e = Effect {
            delta: 1,
            key: None,
        };
        let ok = Step::write(e, Ok(()));
        assert_eq!(ok.write, Some((e, Applied::Yes)));
        let failed = Step::write(e, Err(OpError::check("40001", String::new())));
        assert_eq!(failed.write, Some((e, Applied::No)));
        let lost = Step::write(
            e,
            Err(OpError {
                code: "connection".to_owned(),
                message: String::new(),
                ambiguous: true,
            }),
        );
        assert_eq!(lost.write, Some((e, Applied::Unknown)));
    }
}
