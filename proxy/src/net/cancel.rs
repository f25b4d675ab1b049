//! The map from the BackendKeyData spillway issues to clients to the upstream key of
//! the session behind it, so a CancelRequest (which arrives on a fresh connection) can
//! be forwarded to the right PostgreSQL backend.
//!
//! Lock: one std `Mutex` around a `HashMap`; it is held only for an insert, remove or
//! lookup, never across `.await`. Invariant: an entry lives exactly as long as its
//! [`CancelKey`] guard, which the session owns.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use rand::Rng;

/// The upstream identity of a session: what PostgreSQL gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamKey {
    pub pid: i32,
    pub secret: Bytes,
}

#[derive(Default)]
pub struct CancelRegistry {
    /// Client pid → (client secret, upstream key; `None` once the session detached
    /// from its upstream connection: nothing left to cancel there).
    entries: Mutex<HashMap<i32, (Bytes, Option<UpstreamKey>)>>,
}

/// Removes its entry from the registry when dropped.
pub struct CancelKey {
    registry: Arc<CancelRegistry>,
    pub pid: i32,
    pub secret: Bytes,
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        self.registry
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.pid);
    }
}

impl CancelRegistry {
    /// Issues a fresh client-facing key for `upstream`. The secret has the same length
    /// as the upstream one, so it fits the protocol version the session negotiated.
    pub fn register(self: &Arc<Self>, upstream: UpstreamKey) -> CancelKey {
        let mut rng = rand::rng();
        let mut secret = vec![0u8; upstream.secret.len().max(4)];
        rng.fill(&mut secret[..]);
        let secret = Bytes::from(secret);
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let pid = loop {
            // Positive, like real backend pids, and unique among live sessions.
            let pid = rng.random_range(1..i32::MAX);
            if !entries.contains_key(&pid) {
                break pid;
            }
        };
        entries.insert(pid, (secret.clone(), Some(upstream)));
        drop(entries);
        CancelKey {
            registry: Arc::clone(self),
            pid,
            secret,
        }
    }

    /// The upstream key for a client's CancelRequest, if pid and secret both match.
    pub fn lookup(&self, pid: i32, secret: &[u8]) -> Option<UpstreamKey> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let (ours, upstream) = entries.get(&pid)?;
        if constant_time_eq(ours, secret) {
            upstream.clone()
        } else {
            None
        }
    }

    /// The session behind `pid` lost its upstream connection but lives on (detached):
    /// its cancel requests are ignored from now on, as for an unknown key (the
    /// upstream pid may belong to another backend after a restart). The entry, and so
    /// the pid, stays reserved until the session's [`CancelKey`] is dropped.
    pub fn detach(&self, pid: i32) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, upstream)) = entries.get_mut(&pid) {
            *upstream = None;
        }
    }

    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
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

    #[test]
    fn register_lookup_and_drop() {
        let reg = Arc::new(CancelRegistry::default());
        let up = UpstreamKey {
            pid: 99,
            secret: Bytes::from_static(&[1, 2, 3, 4]),
        };
        let key = reg.register(up.clone());
        assert_eq!(key.secret.len(), 4);
        assert_eq!(reg.lookup(key.pid, &key.secret), Some(up));
        assert_eq!(reg.lookup(key.pid, &[0, 0, 0, 0]), None);
        let pid = key.pid;
        drop(key);
        assert!(reg.is_empty());
        assert_eq!(reg.lookup(pid, &[1, 2, 3, 4]), None);
    }

    #[test]
    fn a_detached_session_keeps_its_pid_but_cancels_nothing() {
        let reg = Arc::new(CancelRegistry::default());
        let key = reg.register(UpstreamKey {
            pid: 7,
            secret: Bytes::from_static(&[1, 2, 3, 4]),
        });
        reg.detach(key.pid);
        assert_eq!(reg.lookup(key.pid, &key.secret), None);
        assert_eq!(reg.len(), 1, "the pid stays reserved");
        drop(key);
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
