//! Session workers: one single-threaded tokio runtime per core, each on its own OS
//! thread. A session is handed to one worker when accepted and stays there.
//!
//! Why not tokio's multi-thread runtime: a relayed session is a tight loop of small
//! reads and writes, and measurement showed the work-stealing scheduler's cross-thread
//! wake-ups costing ~25% more CPU per transaction than a single-threaded event loop
//! (PgBouncer's design). Pinning sessions to per-core event loops keeps that low cost
//! and still uses every core. See ADR 0007.
//!
//! Workers are pinned to cores by default (`server.pin_workers`): measured on a 2-core
//! machine shared with PostgreSQL, unpinned workers migrating between cores made
//! throughput swing by ±30% from run to run; pinned, the worst runs stayed at parity.
//!
//! Invariant: a socket is registered with exactly one worker's I/O driver — the
//! listener's runtime deregisters it (`into_std`) before the worker re-registers it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

pub struct Workers {
    handles: Vec<Handle>,
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
    next: AtomicUsize,
}

impl Workers {
    /// Starts `count` workers (at least one); `0` means one per available core. With
    /// `pin`, worker `i` is pinned to the `i`-th core this process may run on.
    pub fn start(count: usize, pin: bool) -> std::io::Result<Workers> {
        // The cores this process may use (its affinity mask), in order.
        let cores = if pin {
            core_affinity::get_core_ids().unwrap_or_default()
        } else {
            Vec::new()
        };
        let count = match count {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let mut workers = Workers {
            handles: Vec::with_capacity(count),
            stops: Vec::with_capacity(count),
            threads: Vec::with_capacity(count),
            next: AtomicUsize::new(0),
        };
        for i in 0..count {
            let rt = Builder::new_current_thread().enable_all().build()?;
            let (stop, stopped) = oneshot::channel::<()>();
            let cores = cores.clone();
            workers.handles.push(rt.handle().clone());
            workers.stops.push(stop);
            workers.threads.push(
                std::thread::Builder::new()
                    .name(format!("spillway-worker-{i}"))
                    .spawn(move || {
                        if pin && let Some(core) = cores.get(i % cores.len().max(1)) {
                            // Best effort: a refused pin leaves the thread floating.
                            if !core_affinity::set_for_current(*core) {
                                tracing::debug!(worker = i, "could not pin worker to a core");
                            }
                        }
                        // Drives every session spawned onto this worker until stopped.
                        let _ = rt.block_on(stopped);
                    })?,
            );
        }
        Ok(workers)
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// The session workers' runtimes and `main` (the listener's), whose tasks the
    /// `spillway_runtime_tasks` gauge counts.
    pub fn runtimes(&self, main: Handle) -> Runtimes {
        let mut handles = self.handles.clone();
        handles.push(main);
        Runtimes(handles)
    }

    /// The worker for the next session (round robin).
    pub fn pick(&self) -> &Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[i]
    }
}

/// The runtimes sessions, connections and the server's own tasks run on.
pub struct Runtimes(Vec<Handle>);

impl Runtimes {
    /// Tasks alive on all of them (each session is one, plus its upstream relays).
    pub fn alive_tasks(&self) -> usize {
        self.0.iter().map(|h| h.metrics().num_alive_tasks()).sum()
    }

    /// Sets `spillway_runtime_tasks` (before a scrape renders).
    pub fn export(&self) {
        #[allow(clippy::cast_precision_loss)]
        metrics::gauge!(crate::metrics::RUNTIME_TASKS).set(self.alive_tasks() as f64);
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
