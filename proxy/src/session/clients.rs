//! Which clients are connected, for the admin console's `SHOW CLIENTS`.
//!
//! A session registers once its startup is done and is removed when its
//! [`Registration`] drops, so the list is exact whatever way the session ends.
//! Lock: `sessions` is taken once per session start and end and per `SHOW CLIENTS`,
//! never per message.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

/// One connected client as the console shows it.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub id: u64,
    pub peer: SocketAddr,
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub tls: bool,
    pub since: SystemTime,
}

#[derive(Default)]
pub struct Clients {
    next_id: AtomicU64,
    sessions: Mutex<BTreeMap<u64, ClientInfo>>,
}

impl Clients {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, ClientInfo>> {
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a session; it stays listed while the returned guard lives.
    pub fn register(
        self: &Arc<Self>,
        peer: SocketAddr,
        user: &str,
        database: &str,
        application_name: &str,
        tls: bool,
    ) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.lock().insert(
            id,
            ClientInfo {
                id,
                peer,
                user: user.to_owned(),
                database: database.to_owned(),
                application_name: application_name.to_owned(),
                tls,
                since: SystemTime::now(),
            },
        );
        Registration {
            clients: self.clone(),
            id,
        }
    }

    /// The connected clients, oldest first.
    pub fn list(&self) -> Vec<ClientInfo> {
        self.lock().values().cloned().collect()
    }
}

/// Removes its session from [`Clients`] on drop.
pub struct Registration {
    clients: Arc<Clients>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.clients.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_listed_while_registered() {
        let clients = Arc::new(Clients::default());
        let peer = SocketAddr::from(([127, 0, 0, 1], 5000));
        let a = clients.register(peer, "alice", "app", "psql", false);
        let b = clients.register(peer, "bob", "spillway", "", true);
        let names: Vec<String> = clients.list().into_iter().map(|c| c.user).collect();
        assert_eq!(names, ["alice", "bob"]);
        drop(a);
        assert_eq!(clients.list().len(), 1);
        drop(b);
        assert!(clients.list().is_empty());
    }
}
