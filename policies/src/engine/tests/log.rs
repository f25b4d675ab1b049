//! [`MemoryLog`]: the engine's journal in memory for the tests, whose appends can be
//! held after taking their sequence number (a gap), stalled before taking one (so a
//! later append overtakes them), refused as full, or left not yet durable.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::engine::upstream::Log;
use crate::journal::JournalError;

/// A test mutex's guard, poisoned or not.
fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// A journal in memory: sequence numbers in append order, durable at once unless
/// `lag` is set; an append whose number is held completes only when released.
#[derive(Default)]
pub struct MemoryLog {
    next: AtomicU64,
    durable: AtomicU64,
    pub lag: AtomicBool,
    /// Appends fail with `Full` (`journal.max_bytes`) while set.
    pub full: AtomicBool,
    /// The next append fails with `Full`, once.
    pub refuse_next: AtomicBool,
    held: Mutex<HashMap<u64, Arc<Notify>>>,
    pub confirmed: AtomicU64,
    /// Set by [`Self::stall_next`]: the next append waits on it before it takes a
    /// sequence number.
    stall: Mutex<Option<Arc<Notify>>>,
    stalled: Mutex<Option<Arc<Notify>>>,
}

impl MemoryLog {
    /// The append that gets `seq` completes only after [`Self::release`].
    pub fn hold(&self, seq: u64) {
        self.gate(seq);
    }

    pub fn release(&self, seq: u64) {
        self.gate(seq).notify_one();
    }

    fn gate(&self, seq: u64) -> Arc<Notify> {
        let mut held = match self.held.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        held.entry(seq).or_default().clone()
    }

    fn gate_if_held(&self, seq: u64) -> Option<Arc<Notify>> {
        let held = match self.held.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        held.get(&seq).cloned()
    }

    /// The next append waits for [`Self::unstall`] before it takes its sequence
    /// number: a log whose submission is slow (a full queue to the writer, a publish
    /// in flight), so that a later append can overtake it.
    pub fn stall_next(&self) {
        *guard(&self.stall) = Some(Arc::new(Notify::new()));
    }

    pub fn unstall(&self) {
        if let Some(gate) = guard(&self.stalled).take() {
            gate.notify_one();
        }
    }

    /// The next append gets `seq + 1` (records recovered at start hold 1..=seq).
    pub fn start_at(&self, seq: u64) {
        self.next.store(seq, Ordering::SeqCst);
    }

    /// Everything appended so far becomes durable.
    pub fn sync(&self) {
        self.durable
            .fetch_max(self.next.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

impl Log for MemoryLog {
    async fn append(&self, _payload: Bytes) -> Result<u64, JournalError> {
        let stall = guard(&self.stall).take();
        if let Some(gate) = stall {
            *guard(&self.stalled) = Some(gate.clone());
            gate.notified().await;
        }
        if self.full.load(Ordering::SeqCst) || self.refuse_next.swap(false, Ordering::SeqCst) {
            return Err(JournalError::Full {
                bytes: 10,
                max_bytes: 10,
            });
        }
        let seq = self.next.fetch_add(1, Ordering::SeqCst) + 1;
        if !self.lag.load(Ordering::SeqCst) {
            self.durable.fetch_max(seq, Ordering::SeqCst);
        }
        if let Some(gate) = self.gate_if_held(seq) {
            gate.notified().await;
        }
        Ok(seq)
    }

    async fn confirm(&self, seq: u64) -> Result<(), JournalError> {
        self.confirmed.fetch_max(seq, Ordering::SeqCst);
        Ok(())
    }

    fn durable_seq(&self) -> u64 {
        self.durable.load(Ordering::SeqCst)
    }

    fn is_poisoned(&self) -> bool {
        false
    }

    fn id(&self) -> String {
        "test-journal".to_owned()
    }

    fn epoch(&self) -> u64 {
        1
    }
}
