//! A sub-millisecond timer for the link emulator. tokio's timer rounds every sleep up
//! to the next millisecond, which would turn a 0.2 ms round trip into 2 ms; this clock
//! keeps its deadlines in a heap on one thread of its own, which sleeps with
//! `park_timeout` (a futex wait with a nanosecond timeout) and wakes the tasks whose
//! deadline has passed.
//!
//! Invariants:
//! - A [`Sleep`] never completes before its deadline: the future itself compares the
//!   time when it is polled, so an early or spurious wake only re-registers it.
//! - The thread ends when the last [`Clock`] handle is dropped.
//!
//! The kernel adds its timer slack (50 µs by default) to every such sleep;
//! [`reduce_timer_slack`] asks for 1 ns for the threads started after it. The lateness
//! that remains is measured per delivered chunk by the link and reported.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::thread::{self, Thread};
use std::time::Instant;

struct Entry {
    at: Instant,
    seq: u64,
    waker: Waker,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

#[derive(Default)]
struct Heap {
    entries: BinaryHeap<Reverse<Entry>>,
    seq: u64,
}

struct Inner {
    heap: Mutex<Heap>,
    stop: AtomicBool,
    thread: Thread,
}

/// A handle to the clock thread; cheap to clone.
#[derive(Clone)]
pub struct Clock {
    inner: Arc<Inner>,
    _owner: Arc<Owner>,
}

/// Stops the thread when the last handle goes.
struct Owner(Arc<Inner>);

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::Release);
        self.0.thread.unpark();
    }
}

impl Clock {
    /// Starts the clock thread.
    pub fn start() -> std::io::Result<Clock> {
        let (tx, rx) = std::sync::mpsc::channel::<Arc<Inner>>();
        let handle = thread::Builder::new()
            .name("link-clock".to_owned())
            .spawn(move || {
                if let Ok(inner) = rx.recv() {
                    run(&inner);
                }
            })?;
        let inner = Arc::new(Inner {
            heap: Mutex::new(Heap::default()),
            stop: AtomicBool::new(false),
            thread: handle.thread().clone(),
        });
        // The thread cannot have ended: it is waiting for this.
        let _ = tx.send(Arc::clone(&inner));
        Ok(Clock {
            _owner: Arc::new(Owner(Arc::clone(&inner))),
            inner,
        })
    }

    /// A future that completes at `at` or later.
    pub fn sleep_until(&self, at: Instant) -> Sleep<'_> {
        Sleep { clock: self, at }
    }

    fn register(&self, at: Instant, waker: &Waker) {
        let earliest = {
            let mut heap = self
                .inner
                .heap
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let earliest = heap.entries.peek().is_none_or(|Reverse(e)| at < e.at);
            heap.seq += 1;
            let seq = heap.seq;
            heap.entries.push(Reverse(Entry {
                at,
                seq,
                waker: waker.clone(),
            }));
            earliest
        };
        // Only a new earliest deadline changes how long the thread must sleep.
        if earliest {
            self.inner.thread.unpark();
        }
    }
}

fn run(inner: &Inner) {
    let mut due: Vec<Waker> = Vec::new();
    while !inner.stop.load(Ordering::Acquire) {
        let next = {
            let mut heap = inner.heap.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            while heap.entries.peek().is_some_and(|Reverse(e)| e.at <= now) {
                if let Some(Reverse(e)) = heap.entries.pop() {
                    due.push(e.waker);
                }
            }
            heap.entries.peek().map(|Reverse(e)| e.at)
        };
        for w in due.drain(..) {
            w.wake();
        }
        match next {
            Some(at) => thread::park_timeout(at.saturating_duration_since(Instant::now())),
            None => thread::park(),
        }
    }
}

/// See [`Clock::sleep_until`].
pub struct Sleep<'a> {
    clock: &'a Clock,
    at: Instant,
}

impl Future for Sleep<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.at {
            return Poll::Ready(());
        }
        self.clock.register(self.at, cx.waker());
        Poll::Pending
    }
}

/// Asks the kernel for 1 ns of timer slack for this thread and the threads it starts
/// afterwards (default 50 µs, which every sub-millisecond sleep would pay). Best
/// effort: returns whether it worked.
pub fn reduce_timer_slack() -> bool {
    std::fs::write("/proc/self/timerslack_ns", "1").is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn never_completes_before_its_deadline_and_orders_deadlines() {
        let clock = Clock::start().expect("clock");
        let start = Instant::now();
        let mut handles = Vec::new();
        for ms in [7u64, 1, 4, 2] {
            let clock = clock.clone();
            handles.push(tokio::spawn(async move {
                let at = start + Duration::from_millis(ms);
                clock.sleep_until(at).await;
                (ms, Instant::now() >= at)
            }));
        }
        for h in handles {
            let (ms, after) = h.await.expect("task");
            assert!(after, "the {ms} ms sleep completed before its deadline");
        }
        clock.sleep_until(Instant::now()).await;
    }
}
