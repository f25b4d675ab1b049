//! PAUSE, RESUME, RECONNECT and WAIT_CLOSE of the console on transaction mode's
//! pools (ADR 0033): a pool's `paused` flag, which new leases wait on in the pool's
//! queue (under `pool.queue_timeout`), and its generation, which connections opened
//! before a RECONNECT are closed by (when idle, or when they come back).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use super::{Pool, Pools, Server};

/// What the console paused: pools created meanwhile start paused.
#[derive(Default)]
pub(super) struct Paused {
    pub(super) all: bool,
    pub(super) databases: HashSet<String>,
}

/// A pool's side of PAUSE and RECONNECT.
pub(super) struct Control {
    /// `PAUSE`d: no new lease until `RESUME` (`resumed` wakes the waiting).
    pub(super) paused: AtomicBool,
    resumed: tokio::sync::Notify,
    /// Bumped by `RECONNECT`: connections opened before are closed when they come
    /// back, idle ones at once.
    pub(super) generation: AtomicU64,
}

impl Control {
    pub(super) fn new(paused: bool) -> Self {
        Self {
            paused: AtomicBool::new(paused),
            resumed: tokio::sync::Notify::new(),
            generation: AtomicU64::new(0),
        }
    }
}

impl Pools {
    /// `PAUSE [db]` (the console): new transactions of the database's pools (every
    /// pool's without one) wait, those in flight finish; done once no connection is
    /// leased, the idle ones then closed. Waiting sessions give up after
    /// `pool.queue_timeout` (53300), as in the pool's queue.
    pub async fn pause(&self, database: Option<&str>) {
        {
            let mut paused = self.paused.lock().unwrap_or_else(PoisonError::into_inner);
            match database {
                Some(db) => {
                    paused.databases.insert(db.to_owned());
                }
                None => paused.all = true,
            }
        }
        let pools = self.matching(database);
        for pool in &pools {
            pool.control.paused.store(true, Ordering::SeqCst);
        }
        for pool in &pools {
            pool.drain().await;
        }
    }

    /// `RESUME [db]`: the pools paused go on, their waiting sessions first. An error
    /// when a database is resumed while everything is paused.
    pub fn resume(&self, database: Option<&str>) -> Result<(), String> {
        {
            let mut paused = self.paused.lock().unwrap_or_else(PoisonError::into_inner);
            match database {
                Some(_) if paused.all => {
                    return Err(
                        "every database is paused: RESUME without a database name resumes them"
                            .to_owned(),
                    );
                }
                Some(db) => {
                    paused.databases.remove(db);
                }
                None => {
                    paused.all = false;
                    paused.databases.clear();
                }
            }
        }
        for pool in self.matching(database) {
            pool.control.paused.store(false, Ordering::SeqCst);
            pool.control.resumed.notify_waiters();
        }
        Ok(())
    }

    /// `RECONNECT [db]`: the pools' connections open now are closed (idle ones at
    /// once, leased ones when their transaction ends); new ones are opened as needed.
    pub async fn reconnect(&self, database: Option<&str>) {
        for pool in self.matching(database) {
            pool.reconnect().await;
        }
    }

    /// `WAIT_CLOSE [db]`: returns once the connections a `RECONNECT` left to close
    /// are closed.
    pub async fn wait_close(&self, database: Option<&str>) {
        for pool in self.matching(database) {
            pool.wait_close().await;
        }
    }

    /// The pools of `database` (every pool for `None`).
    fn matching(&self, database: Option<&str>) -> Vec<Arc<Pool>> {
        self.pools
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|p| database.is_none_or(|db| p.database == db))
            .cloned()
            .collect()
    }
}

impl Pool {
    /// Returns once the pool is not paused.
    pub(super) async fn until_resumed(&self) {
        loop {
            let resumed = self.control.resumed.notified();
            tokio::pin!(resumed);
            // Registered before the check: a RESUME in between is not missed.
            resumed.as_mut().enable();
            if !self.control.paused.load(Ordering::SeqCst) {
                return;
            }
            resumed.await;
        }
    }

    /// `RECONNECT`: every connection open now is closed, idle ones at once, leased
    /// ones when they come back; new leases get new connections.
    async fn reconnect(&self) {
        self.control.generation.fetch_add(1, Ordering::SeqCst);
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(PoisonError::into_inner));
        self.close_idle(idle).await;
    }

    /// `WAIT_CLOSE`: returns once no connection opened before the last `RECONNECT`
    /// is left.
    async fn wait_close(&self) {
        loop {
            let current = self.control.generation.load(Ordering::SeqCst);
            let old = self
                .servers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
                .any(|s| s.generation < current);
            if !old {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Closes connections taken from the idle stack, with a Terminate so PostgreSQL
    /// logs a clean end.
    #[allow(clippy::vec_box)]
    async fn close_idle(&self, idle: Vec<Box<Server>>) {
        for mut server in idle {
            self.open.fetch_sub(1, Ordering::Relaxed);
            let _ = tokio::time::timeout(Duration::from_secs(1), server.conn.send(b"X\0\0\0\x04"))
                .await;
        }
    }

    /// PAUSE's wait: until no connection is leased (every permit back, resets done),
    /// then the idle connections are closed. Returns at once if resumed meanwhile.
    async fn drain(&self) {
        while self.control.paused.load(Ordering::SeqCst)
            && self.permits.available_permits() < self.limits.size
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !self.control.paused.load(Ordering::SeqCst) {
            return;
        }
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(PoisonError::into_inner));
        self.close_idle(idle).await;
    }
}
