//! The map from the BackendKeyData spillway gives clients to the upstream key of the
//! session behind it, so a CancelRequest (which arrives on a fresh connection) can be
//! forwarded to the right PostgreSQL backend.
//!
//! The pid a client sees is PostgreSQL's own (so `pg_stat_activity`,
//! `pg_terminate_backend` and the pid in a NotificationResponse mean what they say);
//! only the secret is spillway's, so a cancel can reach PostgreSQL only through
//! spillway's check. Pids are not unique here: a detached session keeps the pid of a
//! backend that is gone, which PostgreSQL may hand to a new one, so a pid holds a list
//! of entries and a CancelRequest must match one of them by secret.
//!
//! Lock: one std `Mutex` around a `HashMap`; it is held only for an insert, remove or
//! lookup, never across `.await`. A pooled session's upstream key changes with every
//! lease: it lives in the session's own [`LeaseSlot`] (an uncontended lock the
//! registry reads only for a CancelRequest), so leasing takes no global lock. Invariant: an entry lives exactly as long as its
//! [`CancelKey`] guard, which the session owns.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use rand::Rng;

/// The upstream identity of a session: what PostgreSQL gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamKey {
    pub pid: i32,
    pub secret: Bytes,
}

/// One registered session, among those that share its pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryId(u64);

struct Entry {
    id: EntryId,
    /// The secret the client was given.
    secret: Bytes,
    upstream: Upstream,
}

/// Where a session's cancel requests go.
enum Upstream {
    /// Session mode: the connection's key; `None` once the session detached from it,
    /// nothing left to cancel there.
    Fixed(Option<UpstreamKey>),
    /// Transaction mode: the key of whatever connection the session leases now.
    Pooled(Arc<LeaseSlot>),
}

/// A pooled session's upstream key of the moment (`None` between leases), set by the
/// session's lease and read for a CancelRequest.
#[derive(Default)]
pub struct LeaseSlot(Mutex<Option<UpstreamKey>>);

impl LeaseSlot {
    /// The session leased a connection (`Some`, its key) or returned it (`None`).
    pub fn set(&self, key: Option<UpstreamKey>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = key;
    }

    fn get(&self) -> Option<UpstreamKey> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Client-facing pids of pooled sessions: `POOLED_PID_BASE` up to `+ POOLED_PIDS`.
const POOLED_PID_BASE: u64 = 1 << 30;
const POOLED_PIDS: u64 = 1 << 30;

#[derive(Default)]
pub struct CancelRegistry {
    /// Client-facing (= upstream) pid → the live sessions with that pid.
    entries: Mutex<HashMap<i32, Vec<Entry>>>,
    next_id: AtomicU64,
}

/// Removes its entry from the registry when dropped.
pub struct CancelKey {
    registry: Arc<CancelRegistry>,
    pub id: EntryId,
    pub pid: i32,
    pub secret: Bytes,
    /// Transaction mode: the slot the lease keeps the upstream key in.
    pub slot: Option<Arc<LeaseSlot>>,
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        let mut entries = self
            .registry
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(list) = entries.get_mut(&self.pid) {
            list.retain(|e| e.id != self.id);
            if list.is_empty() {
                entries.remove(&self.pid);
            }
        }
    }
}

impl CancelRegistry {
    /// Issues the client-facing key for `upstream`: PostgreSQL's pid and a fresh random
    /// secret of the upstream secret's length, so it fits the protocol version the
    /// session negotiated.
    pub fn register(self: &Arc<Self>, upstream: UpstreamKey) -> CancelKey {
        let mut secret = vec![0u8; upstream.secret.len().max(4)];
        rand::rng().fill(&mut secret[..]);
        let secret = Bytes::from(secret);
        let id = EntryId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let pid = upstream.pid;
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(pid)
            .or_default()
            .push(Entry {
                id,
                secret: secret.clone(),
                upstream: Upstream::Fixed(Some(upstream)),
            });
        CancelKey {
            registry: Arc::clone(self),
            id,
            pid,
            secret,
            slot: None,
        }
    }

    /// Issues a client-facing key for a pooled session (transaction mode), which has no
    /// server connection of its own: a pid of spillway's (above any Linux pid), a
    /// random 4-byte secret, and no upstream key until its lease sets one in the key's
    /// [`LeaseSlot`].
    pub fn register_pooled(self: &Arc<Self>) -> CancelKey {
        let mut secret = vec![0u8; 4];
        rand::rng().fill(&mut secret[..]);
        let secret = Bytes::from(secret);
        let id = EntryId(self.next_id.fetch_add(1, Ordering::Relaxed));
        // Pids of 2^30 and above: Linux's pid_max is at most 2^22.
        let pid = i32::try_from(POOLED_PID_BASE + id.0 % POOLED_PIDS).unwrap_or(i32::MAX);
        let slot = Arc::new(LeaseSlot::default());
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(pid)
            .or_default()
            .push(Entry {
                id,
                secret: secret.clone(),
                upstream: Upstream::Pooled(slot.clone()),
            });
        CancelKey {
            registry: Arc::clone(self),
            id,
            pid,
            secret,
            slot: Some(slot),
        }
    }

    /// The upstream key for a client's CancelRequest, if pid and secret both match a
    /// session that still has its upstream connection.
    pub fn lookup(&self, pid: i32, secret: &[u8]) -> Option<UpstreamKey> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        // Every entry is compared, so the time taken does not tell which one matched.
        let mut found = None;
        for entry in entries.get(&pid)? {
            if constant_time_eq(&entry.secret, secret) {
                found = match &entry.upstream {
                    Upstream::Fixed(key) => key.clone(),
                    Upstream::Pooled(slot) => slot.get(),
                };
            }
        }
        found
    }

    /// The session behind `id` lost its upstream connection but lives on (detached):
    /// its cancel requests are ignored from now on, as for an unknown key (the
    /// upstream pid may belong to another backend after a restart). The entry stays
    /// until the session's [`CancelKey`] is dropped.
    pub fn detach(&self, pid: i32, id: EntryId) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = entries
            .get_mut(&pid)
            .and_then(|list| list.iter_mut().find(|e| e.id == id))
        {
            match &entry.upstream {
                Upstream::Fixed(_) => entry.upstream = Upstream::Fixed(None),
                Upstream::Pooled(slot) => slot.set(None),
            }
        }
    }

    /// Live sessions registered.
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(Vec::len)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(pid: i32, secret: &'static [u8]) -> UpstreamKey {
        UpstreamKey {
            pid,
            secret: Bytes::from_static(secret),
        }
    }

    #[test]
    fn register_lookup_and_drop() {
        let reg = Arc::new(CancelRegistry::default());
        let up = upstream(99, &[1, 2, 3, 4]);
        let key = reg.register(up.clone());
        assert_eq!(key.pid, 99, "the client sees PostgreSQL's pid");
        assert_eq!(key.secret.len(), 4);
        assert_ne!(key.secret, up.secret, "but never PostgreSQL's secret");
        assert_eq!(reg.lookup(key.pid, &key.secret), Some(up.clone()));
        assert_eq!(reg.lookup(key.pid, &up.secret), None);
        assert_eq!(reg.lookup(key.pid, &[0, 0, 0, 0]), None);
        let pid = key.pid;
        let secret = key.secret.clone();
        drop(key);
        assert!(reg.is_empty());
        assert_eq!(reg.lookup(pid, &secret), None);
    }

    #[test]
    fn a_detached_session_keeps_its_entry_but_cancels_nothing() {
        let reg = Arc::new(CancelRegistry::default());
        let key = reg.register(upstream(7, &[1, 2, 3, 4]));
        reg.detach(key.pid, key.id);
        assert_eq!(reg.lookup(key.pid, &key.secret), None);
        assert_eq!(reg.len(), 1, "the entry stays until the session ends");
        drop(key);
        assert!(reg.is_empty());
    }

    #[test]
    fn sessions_sharing_a_pid_are_told_apart_by_secret() {
        // A detached session keeps the pid of a backend PostgreSQL has since reused.
        let reg = Arc::new(CancelRegistry::default());
        let old = reg.register(upstream(42, &[1, 1, 1, 1]));
        reg.detach(old.pid, old.id);
        let new_up = upstream(42, &[2, 2, 2, 2]);
        let new = reg.register(new_up.clone());
        assert_eq!(reg.lookup(42, &new.secret), Some(new_up.clone()));
        assert_eq!(reg.lookup(42, &old.secret), None);
        drop(old);
        assert_eq!(reg.lookup(42, &new.secret), Some(new_up));
        assert_eq!(reg.len(), 1);
        drop(new);
        assert!(reg.is_empty());
    }

    #[test]
    fn long_keys_keep_their_length() {
        let reg = Arc::new(CancelRegistry::default());
        let key = reg.register(UpstreamKey {
            pid: 1,
            secret: Bytes::from(vec![7u8; 32]),
        });
        assert_eq!(key.secret.len(), 32);
    }
}
