//! Key values reserved from PostgreSQL's sequences, so that an INSERT leaving a
//! `serial` or identity key out can be deferred and its `RETURNING id` answered: per
//! deferred table a block of values taken with `nextval` ahead of need, one handed
//! out per row; the record carries the value, so the flush inserts exactly that key.
//!
//! Invariants:
//! - Every value comes from the table's own sequence through `nextval`, so no value is
//!   handed out twice, across sessions, spillway processes and restarts; values
//!   reserved and never used (a restart, a statement that falls back after taking its
//!   value) are gaps, as PostgreSQL's own sequence caches leave.
//! - Taking a value never waits: a block is refilled by the refiller task (its own
//!   connection, [`SEQUENCES_APP`]) once it is half used, so in steady state a write
//!   adds no round trip; an empty block (PostgreSQL unreachable, or a burst larger
//!   than the block) makes the write fall back (`key_reservation`) and doubles the
//!   table's block size, up to [`MAX_BLOCK`].
//! - At most one refill per table is outstanding, and after a failed one the next
//!   waits [`RETRY_AFTER`]; the std `Mutex` is held only to move values, never across
//!   `.await`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spillway_policies::engine::KeySequence;
use sqlx::PgConnection;
use sqlx::postgres::types::Oid;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::apply::connect_as;

/// `application_name` of the refiller's connection.
pub const SEQUENCES_APP: &str = "spillway sequences";

/// A table's first block.
const FIRST_BLOCK: usize = 32;

/// The largest block a burst grows a table's block to.
pub const MAX_BLOCK: usize = 4096;

/// How long after a failed refill the next may be asked for.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How long opening the refiller's connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// One reservation query: `count` values of `sequence` for `table`.
struct Request {
    table: String,
    sequence: u32,
    count: usize,
}

/// A table's reserved values.
struct Pool {
    sequence: u32,
    values: VecDeque<i64>,
    /// How many values a refill asks for.
    block: usize,
    /// A refill is outstanding.
    asked: bool,
    /// When the last refill failed.
    failed: Option<Instant>,
}

impl Pool {
    fn new(sequence: u32) -> Self {
        Self {
            sequence,
            values: VecDeque::new(),
            block: FIRST_BLOCK,
            asked: false,
            failed: None,
        }
    }
}

/// The reserved key values of every deferred table with a key sequence.
pub struct Reservations {
    pools: Mutex<HashMap<String, Pool>>,
    requests: mpsc::UnboundedSender<Request>,
    /// Taken once by [`Reservations::run`].
    receiver: Mutex<Option<mpsc::UnboundedReceiver<Request>>>,
}

impl Default for Reservations {
    fn default() -> Self {
        let (requests, receiver) = mpsc::unbounded_channel();
        Self {
            pools: Mutex::new(HashMap::new()),
            requests,
            receiver: Mutex::new(Some(receiver)),
        }
    }
}

impl Reservations {
    /// One reserved value for `table`'s key, if its block has one; asks for a refill
    /// when the block is half used (or empty, with a doubled block).
    pub fn take(&self, table: &str, sequence: KeySequence) -> Option<i64> {
        let mut pools = self.pools.lock().ok()?;
        let pool = pools
            .entry(table.to_owned())
            .or_insert_with(|| Pool::new(sequence.oid));
        if pool.sequence != sequence.oid {
            // A reload pointed the table at another sequence.
            *pool = Pool::new(sequence.oid);
        }
        let value = pool.values.pop_front();
        if value.is_none() {
            pool.block = (pool.block * 2).min(MAX_BLOCK);
        }
        if pool.values.len() < pool.block / 2 {
            self.ask(table, pool);
        }
        value.filter(|v| in_range(*v, sequence.type_oid))
    }

    /// Asks for a block for `table` now (at startup, so its first INSERTs need not fall
    /// back).
    pub fn prefill(&self, table: &str, sequence: KeySequence) {
        let Ok(mut pools) = self.pools.lock() else {
            return;
        };
        let pool = pools
            .entry(table.to_owned())
            .or_insert_with(|| Pool::new(sequence.oid));
        self.ask(table, pool);
    }

    /// Whether `table` has no refill outstanding (its block filled, or the refill
    /// failed).
    pub fn settled(&self, table: &str) -> bool {
        self.pools
            .lock()
            .map(|p| p.get(table).is_none_or(|pool| !pool.asked))
            .unwrap_or(true)
    }

    /// How many values `table` holds now.
    pub fn available(&self, table: &str) -> usize {
        self.pools
            .lock()
            .map(|p| p.get(table).map_or(0, |pool| pool.values.len()))
            .unwrap_or(0)
    }

    fn ask(&self, table: &str, pool: &mut Pool) {
        if pool.asked || pool.failed.is_some_and(|at| at.elapsed() < RETRY_AFTER) {
            return;
        }
        let request = Request {
            table: table.to_owned(),
            sequence: pool.sequence,
            count: pool.block,
        };
        // Without a refiller (shut down) the table's writes fall back.
        pool.asked = self.requests.send(request).is_ok();
    }

    /// A refill's outcome: the values join the table's block (unless a reload moved
    /// the table to another sequence meanwhile).
    fn fill(&self, table: &str, sequence: u32, values: Option<Vec<i64>>) {
        let Ok(mut pools) = self.pools.lock() else {
            return;
        };
        let Some(pool) = pools.get_mut(table) else {
            return;
        };
        if pool.sequence != sequence {
            return;
        }
        pool.asked = false;
        match values {
            Some(values) => {
                pool.failed = None;
                pool.values.extend(values);
            }
            None => pool.failed = Some(Instant::now()),
        }
    }

    /// The refiller: answers refill requests on its own connection until `shutdown`.
    pub async fn run(self: Arc<Self>, url: String, shutdown: CancellationToken) {
        let Some(mut receiver) = self.receiver.lock().ok().and_then(|mut r| r.take()) else {
            return;
        };
        let mut conn: Option<PgConnection> = None;
        loop {
            let request = tokio::select! {
                () = shutdown.cancelled() => return,
                r = receiver.recv() => match r {
                    Some(r) => r,
                    None => return,
                },
            };
            let values = reserve(&mut conn, &url, request.sequence, request.count).await;
            self.fill(&request.table, request.sequence, values);
        }
    }
}

/// `count` values of `sequence`, in one query; `None` if PostgreSQL is unreachable or
/// refuses (the connection is then dropped and opened again next time).
async fn reserve(
    conn: &mut Option<PgConnection>,
    url: &str,
    sequence: u32,
    count: usize,
) -> Option<Vec<i64>> {
    if conn.is_none() {
        match tokio::time::timeout(CONNECT_TIMEOUT, connect_as(url, SEQUENCES_APP)).await {
            Ok(Ok(c)) => *conn = Some(c),
            Ok(Err(err)) => {
                tracing::warn!(%err, "reserving key values: cannot connect");
                return None;
            }
            Err(_) => {
                tracing::warn!("reserving key values: no connection within {CONNECT_TIMEOUT:?}");
                return None;
            }
        }
    }
    let c = conn.as_mut()?;
    let count = i64::try_from(count).unwrap_or(i64::MAX);
    let values = async {
        // `regclass`'s output is the quoted, qualified-if-needed name.
        let name: String = sqlx::query_scalar("SELECT $1::oid::regclass::text")
            .bind(Oid(sequence))
            .fetch_one(&mut *c)
            .await?;
        sqlx::query_scalar::<_, i64>(&reserve_sql(&name))
            .bind(Oid(sequence))
            .bind(count)
            .fetch_all(&mut *c)
            .await
    }
    .await;
    match values {
        // None left before the sequence's end: as a failure, retried later.
        Ok(values) if values.is_empty() => None,
        Ok(values) => Some(values),
        Err(err) => {
            tracing::warn!(%err, sequence, "reserving key values refused");
            *conn = None;
            None
        }
    }
}

/// The reservation query for the sequence named `name` (`$1` its OID, `$2` how many):
/// never past a non-cycling sequence's end, since `nextval` past it fails after it
/// has used up the last values, and the INSERTs PostgreSQL would still have served
/// with them would get 2200H. (A writer bypassing spillway between the subquery and
/// the `nextval`s can still move the end closer.)
fn reserve_sql(name: &str) -> String {
    format!(
        "SELECT pg_catalog.nextval($1::oid::regclass) FROM pg_catalog.generate_series(1, \
           (SELECT LEAST($2::numeric, CASE \
              WHEN p.seqcycle THEN $2::numeric \
              WHEN p.seqincrement > 0 THEN \
                floor((p.seqmax::numeric - n.next) / p.seqincrement) + 1 \
              ELSE floor((n.next - p.seqmin::numeric) / (-p.seqincrement)) + 1 END)::bigint \
            FROM pg_catalog.pg_sequence p, \
              (SELECT CASE WHEN s.is_called THEN s.last_value::numeric + \
                 (SELECT seqincrement FROM pg_catalog.pg_sequence WHERE seqrelid = $1) \
                 ELSE s.last_value::numeric END AS next FROM {name} s) n \
            WHERE p.seqrelid = $1))"
    )
}

/// Whether `v` fits the key column's integer type.
fn in_range(v: i64, type_oid: u32) -> bool {
    match type_oid {
        21 => i16::try_from(v).is_ok(),
        23 => i32::try_from(v).is_ok(),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEQ: KeySequence = KeySequence {
        oid: 7,
        type_oid: 20,
    };

    fn answer(r: &Reservations, rx: &mut mpsc::UnboundedReceiver<Request>, from: i64) -> usize {
        let req = rx.try_recv().expect("a refill was asked for");
        let n = i64::try_from(req.count).expect("small");
        r.fill(&req.table, req.sequence, Some((from..from + n).collect()));
        req.count
    }

    #[test]
    fn values_are_handed_out_once_and_refilled_at_half_a_block() {
        // Mutations caught: a value handed out twice; no refill before the block runs
        // dry (each block's first write after that would fall back); several refills
        // outstanding for one table.
        let r = Reservations::default();
        let mut rx = r.receiver.lock().expect("lock").take().expect("receiver");
        r.prefill("public.t", SEQ);
        r.prefill("public.t", SEQ);
        assert!(!r.settled("public.t"));
        assert_eq!(answer(&r, &mut rx, 1), FIRST_BLOCK);
        assert!(rx.try_recv().is_err(), "one refill outstanding at a time");
        assert!(r.settled("public.t"));
        let mut seen = Vec::new();
        for _ in 0..=FIRST_BLOCK / 2 {
            seen.push(r.take("public.t", SEQ).expect("reserved"));
        }
        // Past half used: the refill is asked for, and values keep coming meanwhile.
        let more = answer(&r, &mut rx, 1000);
        for _ in 0..FIRST_BLOCK / 2 - 1 + more {
            seen.push(r.take("public.t", SEQ).expect("reserved"));
        }
        let n = seen.len();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), n, "no value twice");
    }

    #[test]
    fn an_empty_block_falls_back_grows_and_a_failure_waits_before_asking_again() {
        // Mutations caught: an empty block answered with a made-up value; the block
        // never growing (a burst larger than it falls back at every refill); a failed
        // refill asked again at every write while PostgreSQL is down.
        let r = Reservations::default();
        let mut rx = r.receiver.lock().expect("lock").take().expect("receiver");
        assert_eq!(r.take("public.t", SEQ), None);
        let req = rx.try_recv().expect("asked");
        assert_eq!(req.count, FIRST_BLOCK * 2);
        r.fill("public.t", SEQ.oid, None);
        assert_eq!(r.take("public.t", SEQ), None);
        assert!(
            rx.try_recv().is_err(),
            "no new refill right after a failure"
        );
        assert!(r.available("public.t") == 0);
    }

    #[test]
    fn values_outside_the_key_type_are_not_handed_out() {
        let r = Reservations::default();
        let mut rx = r.receiver.lock().expect("lock").take().expect("receiver");
        r.prefill("public.s", SEQ);
        let req = rx.try_recv().expect("asked");
        r.fill(&req.table, req.sequence, Some(vec![32_767, 32_768]));
        let small = KeySequence {
            oid: 7,
            type_oid: 21,
        };
        assert_eq!(r.take("public.s", small), Some(32_767));
        assert_eq!(r.take("public.s", small), None);
    }

    #[test]
    fn a_table_moved_to_another_sequence_starts_afresh() {
        let r = Reservations::default();
        let mut rx = r.receiver.lock().expect("lock").take().expect("receiver");
        r.prefill("public.t", SEQ);
        answer(&r, &mut rx, 1);
        let other = KeySequence {
            oid: 8,
            type_oid: 20,
        };
        assert_eq!(r.take("public.t", other), None, "the old sequence's values");
        let req = rx.try_recv().expect("asked");
        assert_eq!(req.sequence, 8);
    }
}
