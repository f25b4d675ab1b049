//! What the console shows of the pools (`SHOW POOLS`, `SHOW SERVERS`): snapshots
//! taken under the pools' locks, held only to copy.

use std::collections::HashMap;
use std::sync::PoisonError;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Pool, Pools};

impl Pools {
    /// Every pooled server connection, for the console (`SHOW SERVERS`), by database,
    /// user and pid.
    pub fn servers(&self) -> Vec<ServerRow> {
        let pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = Vec::new();
        for pool in pools.values() {
            // Leased is what is open and not idle (nothing is recorded per lease).
            let idle: HashMap<i32, Instant> = pool
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .map(|s| (s.key.pid, s.idle_since))
                .collect();
            let current = pool.control.generation.load(Ordering::SeqCst);
            let servers = pool.servers.lock().unwrap_or_else(PoisonError::into_inner);
            out.extend(servers.iter().map(|(pid, info)| {
                let idle_for = idle.get(pid).map(Instant::elapsed);
                ServerRow {
                    database: pool.database.clone(),
                    user: pool.user.clone(),
                    pid: *pid,
                    leased: idle_for.is_none(),
                    age: info.created.elapsed(),
                    idle_for,
                    close_needed: info.generation < current,
                }
            }));
        }
        out.sort_by(|a, b| (&a.database, &a.user, a.pid).cmp(&(&b.database, &b.user, b.pid)));
        out
    }

    /// A snapshot of every pool, for the console.
    pub fn stats(&self) -> Vec<PoolStats> {
        let pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<PoolStats> = pools.values().map(|p| p.stats()).collect();
        out.sort_by(|a, b| (&a.database, &a.user).cmp(&(&b.database, &b.user)));
        out
    }
}

impl Pool {
    fn stats(&self) -> PoolStats {
        PoolStats {
            database: self.database.clone(),
            user: self.user.clone(),
            size: self.limits.size,
            open: self.open.load(Ordering::Relaxed),
            idle: self
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len(),
            waiting: self.waiting.load(Ordering::Relaxed),
        }
    }
}

/// What `SHOW POOLS` shows of one pool.
#[derive(Debug, Clone)]
pub struct PoolStats {
    pub database: String,
    pub user: String,
    pub size: usize,
    pub open: usize,
    pub idle: usize,
    pub waiting: usize,
}

/// What `SHOW SERVERS` shows of one pooled server connection.
#[derive(Debug, Clone)]
pub struct ServerRow {
    pub database: String,
    pub user: String,
    /// PostgreSQL's backend pid.
    pub pid: i32,
    pub leased: bool,
    pub age: Duration,
    /// How long it has been idle (`None` while leased).
    pub idle_for: Option<Duration>,
    /// Opened before the last `RECONNECT`: closed when its lease ends.
    pub close_needed: bool,
}
