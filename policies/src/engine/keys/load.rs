//! The key index's loader: one task (the proxy runs it on a thread of its own) that
//! reads the keys of each loading table in chunks ([`Checks::key_chunk`]: keyset
//! pagination, `chunk_rows` keys a short statement, so no lock is held for long and
//! sessions are served all along, with point reads for the table until it is ready).
//! After a table's last chunk it reads the WAL position ([`Checks::wal_position`]):
//! the table is ready once the change stream passed it (see the parent module).
//!
//! Invariants: one table at a time, one query at a time; a failed read is retried
//! after a back-off (doubling from [`MIN_RETRY`] to [`MAX_RETRY`]) from where it
//! stopped, and logged once per failing streak; a chunk read for a load that started
//! over (the stream was lost or a whole-table change came) is dropped.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Job;
use crate::engine::{CheckError, Checks, Engine, Log};

pub const MIN_RETRY: Duration = Duration::from_millis(200);
pub const MAX_RETRY: Duration = Duration::from_secs(30);

impl<C: Checks, L: Log> Engine<C, L> {
    /// Loads tables' key indexes as they need it, until `shutdown`.
    pub async fn run_key_loader(self: Arc<Self>, shutdown: CancellationToken) {
        let mut retry = MIN_RETRY;
        let mut failing = false;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let Some(job) = self.keys.next_job() else {
                tokio::select! {
                    () = self.keys.wanted() => {}
                    () = shutdown.cancelled() => return,
                }
                continue;
            };
            match self.load_step(&job).await {
                Ok(()) => {
                    retry = MIN_RETRY;
                    failing = false;
                }
                Err(err) => {
                    if !failing {
                        tracing::warn!(
                            table = %job.table, %err, ?retry,
                            "loading the key index failed; retrying (point reads meanwhile)"
                        );
                        failing = true;
                    }
                    tokio::select! {
                        () = tokio::time::sleep(retry) => {}
                        () = shutdown.cancelled() => return,
                    }
                    retry = (retry * 2).min(MAX_RETRY);
                }
            }
        }
    }

    /// One read for `job`: its next chunk, or the WAL position after its last.
    async fn load_step(&self, job: &Job) -> Result<(), String> {
        let Some(table) = self.tables.load().deferring(&job.table).cloned() else {
            self.keys.abandon(job);
            return Ok(());
        };
        let text = |e: CheckError| match e {
            CheckError::Unreachable(m) | CheckError::Failed(m) => m,
        };
        if job.finish {
            let lsn = self.checks.wal_position().await.map_err(text)?;
            self.keys.finished(job, lsn);
            return Ok(());
        }
        let chunk = self
            .checks
            .key_chunk(&table, job.kind, job.cursor.as_ref(), job.limit)
            .await
            .map_err(text)?;
        self.keys.chunk(job, chunk);
        Ok(())
    }
}
