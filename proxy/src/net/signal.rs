//! Shutdown signalling that costs sessions no lock on the per-message path.
//!
//! The server moves one shared [`Phase`] forward (running → draining → terminating)
//! and wakes every subscribed session; a session reads the phase with one atomic load
//! each time its task is polled, after registering its waker.
//!
//! Ordering invariant: `set` stores the phase before waking, and `poll_phase` registers
//! the waker before loading the phase, so a session can never miss a transition (it
//! either sees the new phase or is woken after registering).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Context;

use atomic_waker::AtomicWaker;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running = 0,
    /// Idle sessions close with 57P01 at once, busy ones when they become idle.
    Draining = 1,
    /// The drain deadline passed: every session closes with 57P01 now.
    Terminating = 2,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Running,
            1 => Phase::Draining,
            _ => Phase::Terminating,
        }
    }
}

/// Owned by the server, shared with every session.
///
/// Lock: `sessions` is taken when a session subscribes or ends and when the phase
/// changes — never per message.
#[derive(Default)]
pub struct ShutdownSignals {
    phase: AtomicU8,
    next_id: AtomicU64,
    sessions: Mutex<HashMap<u64, Arc<AtomicWaker>>>,
}

impl ShutdownSignals {
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::SeqCst))
    }

    pub fn drain(&self) {
        self.advance(Phase::Draining);
    }

    pub fn terminate(&self) {
        self.advance(Phase::Terminating);
    }

    fn advance(&self, to: Phase) {
        self.phase.fetch_max(to as u8, Ordering::SeqCst);
        let sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        for waker in sessions.values() {
            waker.wake();
        }
    }

    /// Registers a session; it is unregistered when the subscription drops.
    pub fn subscribe(self: &Arc<Self>) -> Subscription {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let waker = Arc::new(AtomicWaker::new());
        self.sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, Arc::clone(&waker));
        Subscription {
            id,
            waker,
            signals: Arc::clone(self),
        }
    }
}

/// One session's view of the shutdown phase.
pub struct Subscription {
    id: u64,
    waker: Arc<AtomicWaker>,
    signals: Arc<ShutdownSignals>,
}

impl Subscription {
    /// The current phase; the task is woken when it changes.
    pub fn poll_phase(&self, cx: &mut Context<'_>) -> Phase {
        self.waker.register(cx.waker());
        self.signals.phase()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.signals
            .sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::task::Poll;

    #[tokio::test]
    async fn a_waiting_session_is_woken_by_each_phase() {
        let signals = Arc::new(ShutdownSignals::default());
        let sub = signals.subscribe();
        let waiter = tokio::spawn(async move {
            let mut seen = Vec::new();
            for want in [Phase::Draining, Phase::Terminating] {
                let p = poll_fn(|cx| match sub.poll_phase(cx) {
                    p if p >= want => Poll::Ready(p),
                    _ => Poll::Pending,
                })
                .await;
                seen.push(p);
            }
            seen
        });
        tokio::task::yield_now().await;
        signals.drain();
        tokio::task::yield_now().await;
        signals.terminate();
        let seen = waiter.await.expect("waiter");
        assert_eq!(seen, vec![Phase::Draining, Phase::Terminating]);
    }

    #[test]
    fn phase_never_goes_back_and_subscriptions_clean_up() {
        let signals = Arc::new(ShutdownSignals::default());
        let sub = signals.subscribe();
        signals.terminate();
        signals.drain();
        assert_eq!(signals.phase(), Phase::Terminating);
        drop(sub);
        assert!(signals.sessions.lock().expect("lock").is_empty());
    }
}
