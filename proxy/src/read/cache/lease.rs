//! Who uses a database, and what its service task may do about it: a [`DbLease`] per
//! session on the database (and one for the process's life on the write side's
//! backend database), release requests before statements that need the database to
//! themselves, and the task's state (`service.rs` reads [`Want`] and reports back).
//!
//! Invariants: `Control` changes only under its lock, never held across `.await`;
//! whoever finds the task `Stopped` when taking a lease starts a new one (the task
//! sets `Stopped` under the same lock only when no lease is held), so a leased
//! database always has a task; a release request is answered only after the
//! connection is closed.

use std::future::Future;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::{Arc, MutexGuard};
use std::task::{Context, Poll};

use tokio::sync::oneshot;

use super::DbState;

/// The service task's bookkeeping.
#[derive(Default)]
pub(super) struct Control {
    /// Leases held: sessions on the database, and the write side on its own.
    leases: usize,
    /// Leases taken so far: a new one ends the hold after a release.
    taken: u64,
    task: Task,
    /// Release requests waiting for the connection to close.
    releases: Vec<oneshot::Sender<()>>,
}

/// What the database's service task is doing.
#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Task {
    /// None runs; the next lease starts one.
    #[default]
    Stopped,
    /// Connected, or trying to be.
    Running,
    /// Its connection was released for a statement that needs the database to
    /// itself; it stays closed for a while unless a new lease comes.
    Released,
}

/// What the service task should do now (`service.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Want {
    Serve,
    /// Nobody holds a lease.
    Idle,
    /// A release is requested.
    Release,
}

/// A use of a database's state: while any lease is held its service connection stays
/// (see the module docs).
pub struct DbLease {
    pub(super) db: Arc<DbState>,
}

impl Deref for DbLease {
    type Target = DbState;

    fn deref(&self) -> &DbState {
        &self.db
    }
}

/// Completes once the service connections a release asked to close are closed.
pub struct Released(pub(super) Vec<oneshot::Receiver<()>>);

impl Future for Released {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        while let Some(closed) = self.0.last_mut() {
            match Pin::new(closed).poll(cx) {
                // Closed, or its task is gone (then so is the connection).
                Poll::Ready(_) => {
                    self.0.pop();
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(())
    }
}

impl Drop for DbLease {
    fn drop(&mut self) {
        let mut c = self.db.control();
        c.leases = c.leases.saturating_sub(1);
        let idle = c.leases == 0;
        drop(c);
        if idle {
            self.db.wake.notify_one();
        }
    }
}

impl DbState {
    fn control(&self) -> MutexGuard<'_, Control> {
        match self.control.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Takes a lease; true when no service task runs and the caller must start one.
    pub(super) fn lease(&self) -> bool {
        let mut c = self.control();
        c.leases += 1;
        c.taken += 1;
        match c.task {
            Task::Stopped => {
                c.task = Task::Running;
                true
            }
            Task::Released => {
                drop(c);
                self.wake.notify_one();
                false
            }
            Task::Running => false,
        }
    }

    /// Asks the running service task to close its connection; `None` when none runs.
    pub(super) fn request_release(&self) -> Option<oneshot::Receiver<()>> {
        let mut c = self.control();
        if c.task != Task::Running {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        c.releases.push(tx);
        drop(c);
        self.wake.notify_one();
        Some(rx)
    }

    /// What the service task should do now.
    pub(crate) fn want(&self) -> Want {
        let c = self.control();
        if !c.releases.is_empty() {
            Want::Release
        } else if c.leases == 0 {
            Want::Idle
        } else {
            Want::Serve
        }
    }

    /// The connection is closed: answers the release requests and holds it closed.
    /// Returns the leases taken so far (a later one ends the hold).
    pub(crate) fn released(&self) -> u64 {
        let mut c = self.control();
        c.task = Task::Released;
        for tx in c.releases.drain(..) {
            let _ = tx.send(());
        }
        c.taken
    }

    /// Leases taken so far.
    pub(crate) fn taken(&self) -> u64 {
        self.control().taken
    }

    /// The service task goes on (true), or ends because nobody holds a lease.
    pub(crate) fn carry_on(&self) -> bool {
        let mut c = self.control();
        if c.leases == 0 && c.releases.is_empty() {
            c.task = Task::Stopped;
            return false;
        }
        c.task = Task::Running;
        true
    }

    /// Waits until `control` changes.
    pub(crate) async fn changed(&self) {
        self.wake.notified().await;
    }
}
