//! Batched point reads: the keys every waiting session needs read from one table go to
//! PostgreSQL as one query ([`Checks::exists_many`]) per round trip, instead of one
//! query each. The first key to arrive while no read of its table is running starts a
//! reader task; keys that arrive while it runs wait for its next round, which takes
//! everything queued meanwhile (at most [`MAX_KEYS`] a query).
//!
//! Invariants:
//! - The reader runs in a task of its own: a session that stops waiting (its client
//!   went away) never cancels the read other sessions wait for.
//! - Every key queued gets an answer: the reader leaves only with the queue empty,
//!   checked under the same lock that queues keys.
//! - One key's bad value cannot fail the others: a query that PostgreSQL refuses
//!   (`CheckError::Failed`) is asked again key by key; a lost connection fails the
//!   whole round (each waiter gets `Unreachable`, retryable).

use std::collections::HashMap;
use std::mem;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use super::table::DeferredTable;
use super::{CheckError, Checks, Engine, Log};

/// Most keys one query reads.
pub const MAX_KEYS: usize = 1024;

type Answer = Result<bool, CheckError>;

/// The point-read queues of the engine's tables, and their counts.
#[derive(Default)]
pub struct PointReads {
    tables: Mutex<HashMap<String, Queue>>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<(Vec<String>, oneshot::Sender<Answer>)>,
    /// A reader task is running for the table.
    reading: bool,
    /// Keys read and queries sent so far.
    keys: u64,
    queries: u64,
}

impl PointReads {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Queue>> {
        match self.tables.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Keys read and queries sent, per table.
    pub fn counts(&self) -> Vec<(String, u64, u64)> {
        self.lock()
            .iter()
            .map(|(t, q)| (t.clone(), q.keys, q.queries))
            .collect()
    }
}

impl<C: Checks, L: Log> Engine<C, L> {
    /// Whether each of `keys` of `table` exists upstream now, read together with the
    /// keys other sessions wait for on the same table.
    pub(super) async fn read_keys(
        self: &Arc<Self>,
        table: &Arc<DeferredTable>,
        keys: &[Vec<String>],
    ) -> Vec<Answer> {
        let mut answers = Vec::with_capacity(keys.len());
        let start = {
            let mut tables = self.reads.lock();
            let queue = tables.entry(table.meta.name.clone()).or_default();
            for key in keys {
                let (tx, rx) = oneshot::channel();
                queue.waiting.push((key.clone(), tx));
                answers.push(rx);
            }
            !mem::replace(&mut queue.reading, true)
        };
        if start {
            tokio::spawn(self.clone().read_rounds(table.clone()));
        }
        let mut out = Vec::with_capacity(answers.len());
        for rx in answers {
            out.push(
                rx.await.unwrap_or_else(|_| {
                    Err(CheckError::Unreachable("point read ended".to_owned()))
                }),
            );
        }
        out
    }

    /// The reader of `table`: rounds until nothing is queued.
    async fn read_rounds(self: Arc<Self>, table: Arc<DeferredTable>) {
        loop {
            let round = {
                let mut tables = self.reads.lock();
                let Some(queue) = tables.get_mut(&table.meta.name) else {
                    return;
                };
                if queue.waiting.is_empty() {
                    queue.reading = false;
                    return;
                }
                let take = queue.waiting.len().min(MAX_KEYS);
                queue.waiting.drain(..take).collect::<Vec<_>>()
            };
            let mut keys: Vec<Vec<String>> = Vec::with_capacity(round.len());
            for (key, _) in &round {
                if !keys.contains(key) {
                    keys.push(key.clone());
                }
            }
            let (answers, queries) = self.read_once(&table, &keys).await;
            {
                let mut tables = self.reads.lock();
                let queue = tables.entry(table.meta.name.clone()).or_default();
                queue.keys += keys.len() as u64;
                queue.queries += queries;
            }
            for (key, tx) in round {
                let answer = keys
                    .iter()
                    .position(|k| *k == key)
                    .and_then(|i| answers.get(i).cloned())
                    .unwrap_or_else(|| Err(CheckError::Failed("no answer".to_owned())));
                // The session may have stopped waiting.
                let _ = tx.send(answer);
            }
        }
    }

    /// One query for `keys`, or one per key when PostgreSQL refuses the query; the
    /// answers and the number of queries.
    async fn read_once(&self, table: &DeferredTable, keys: &[Vec<String>]) -> (Vec<Answer>, u64) {
        match self.checks.exists_many(table, keys).await {
            Ok(found) if found.len() == keys.len() => (found.into_iter().map(Ok).collect(), 1),
            Err(CheckError::Failed(_)) if keys.len() > 1 => {
                let reads = keys
                    .iter()
                    .map(|k| self.checks.exists_many(table, std::slice::from_ref(k)));
                let each = futures_util::future::join_all(reads).await;
                let answers = each
                    .into_iter()
                    .map(|r| r.and_then(|v| single(&v)))
                    .collect();
                (answers, 1 + keys.len() as u64)
            }
            Ok(_) => (
                vec![
                    Err(CheckError::Failed(
                        "point read answered the wrong number of keys".to_owned()
                    ));
                    keys.len()
                ],
                1,
            ),
            Err(e) => (vec![Err(e); keys.len()], 1),
        }
    }
}

fn single(v: &[bool]) -> Answer {
    match v {
        [one] => Ok(*one),
        _ => Err(CheckError::Failed(
            "point read answered the wrong number of keys".to_owned(),
        )),
    }
}
