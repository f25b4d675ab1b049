//! The read cache as the proxy runs it: the shared result store and version counters
//! (from `spillway-policies`), the statement classifier, and per database the catalog
//! snapshot and its service connection. Sessions hold an `Arc<ReadCache>` and a
//! [`DbLease`] on their database's [`DbState`]; the per-session protocol work is in
//! `session::handler`.
//!
//! Invariant: a database whose catalog is not loaded (first use, after DDL, while its
//! service connection is down) stores nothing new: [`DbState::catalog`] is `None` and
//! every miss is passed through. Existing entries stay servable exactly as long as
//! their version counters say (DDL and a lost LISTEN connection bump the epoch).
//! Only deferred-write routing looks past a lost connection, at the last snapshot DDL
//! has not invalidated ([`DbState::last_trusted_catalog`]).
//!
//! A database's service connection lives while someone holds a [`DbLease`] on it
//! (each session on it, and the write side on the backend database), and a few
//! seconds more (`lease.rs`, `service.rs`); [`ReadCache::release_databases`] closes it before a
//! statement that needs the database to itself (`DROP DATABASE`, the template of
//! `CREATE DATABASE`) goes upstream.

pub mod decide;
pub mod echo;
mod lease;
pub mod point;
mod service;
pub mod stream;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use arc_swap::{ArcSwap, Guard};

use spillway_policies::cache::{DbVersions, Registry, ResultCache};
use spillway_policies::{CacheConfig, Invalidation};
use tokio::sync::Notify;

use crate::config::Config;
use crate::net::upstream::Connector;
use crate::read::catalog::Catalog;
use crate::read::classify::{Classifier, ClassifierLimits};
pub use decide::{Cacheable, Decision, Effects, TableSettings};
use lease::{Control, Want};
pub use lease::{DbLease, Released};
pub use point::{Params, PointKey};

pub struct ReadCache {
    pub results: Arc<ResultCache>,
    pub versions: Registry,
    pub classifier: Classifier,
    /// Per-table `cache`/`ttl` and the defaults; swapped whole by a reload, read with
    /// one atomic load per decision.
    tables: ArcSwap<TableSettings>,
    pub invalidation: Invalidation,
    /// `[replication]`, read by each database's service task in replication mode.
    pub replication: crate::config::ReplicationConfig,
    /// The change stream's consumers besides the cache ([`ReadCache::add_change_sink`]).
    pub sinks: stream::Sinks,
    dbs: Mutex<HashMap<String, Arc<DbState>>>,
    service: service::Spawner,
}

/// One database as the cache sees it.
pub struct DbState {
    pub name: String,
    pub versions: Arc<DbVersions>,
    /// The change stream's state (replication mode).
    pub stream: stream::Status,
    /// The stream's echoes of spillway's own writes (replication mode, ADR 0036).
    pub echoes: echo::Echoes,
    /// `None` while no trustworthy snapshot exists. Lock held only to clone the Arc.
    catalog: RwLock<Option<Arc<Catalog>>>,
    /// The latest snapshot installed, kept when the service connection is lost and
    /// dropped when DDL makes it stale: detached sessions route deferred writes with
    /// it while PostgreSQL is unreachable (`session/handler/detached.rs`). Lock held
    /// only to clone or replace the Arc.
    last_trusted: RwLock<Option<Arc<Catalog>>>,
    /// Asks the service task for a fresh catalog.
    refresh: Notify,
    /// Bumped whenever the catalog is known to have changed; a snapshot whose load
    /// began before the latest bump is discarded, not installed.
    generation: AtomicU64,
    /// Who uses the database, and what its service task is doing. Lock held only to
    /// read or update it, never across `.await`.
    control: Mutex<Control>,
    /// Tells the service task that `control` changed (leases, a release request).
    wake: Notify,
}

impl DbState {
    pub fn catalog(&self) -> Option<Arc<Catalog>> {
        self.catalog.read().ok().and_then(|c| c.clone())
    }

    fn set_catalog(&self, catalog: Option<Arc<Catalog>>) {
        match self.catalog.write() {
            Ok(mut c) => *c = catalog,
            Err(poisoned) => *poisoned.into_inner() = catalog,
        }
    }

    /// The last snapshot installed, unless DDL has made it stale since; also while
    /// the service connection is down.
    pub fn last_trusted_catalog(&self) -> Option<Arc<Catalog>> {
        self.last_trusted.read().ok().and_then(|c| c.clone())
    }

    fn set_last_trusted(&self, catalog: Option<Arc<Catalog>>) {
        match self.last_trusted.write() {
            Ok(mut c) => *c = catalog,
            Err(poisoned) => *poisoned.into_inner() = catalog,
        }
    }

    /// Installs a snapshot whose load began at `generation`, unless the catalog was
    /// declared changed since (checked under the lock, so a concurrent
    /// [`DbState::catalog_changed`] either wins or sees this snapshot and clears it).
    fn install(&self, catalog: Arc<Catalog>, generation: u64) -> bool {
        let mut slot = match self.catalog.write() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if self.generation.load(Ordering::SeqCst) != generation {
            return false;
        }
        *slot = Some(catalog.clone());
        // Under the catalog lock, so a concurrent `catalog_changed` (which clears both
        // after taking it) cannot be overtaken.
        self.set_last_trusted(Some(catalog));
        true
    }

    /// The catalog changed under us (DDL): stop trusting the snapshot, reload it.
    pub fn catalog_changed(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.set_catalog(None);
        self.set_last_trusted(None);
        self.refresh.notify_one();
    }

    /// A name the snapshot does not know: reload in the background, keep serving.
    pub fn catalog_behind(&self) {
        self.refresh.notify_one();
    }

    /// Applies what a statement (or an external writer) invalidated.
    pub fn invalidate(&self, effects: &Effects, all: &Registry) {
        if effects.everything {
            all.bump_everything();
        }
        if effects.database {
            self.versions.bump_all();
        }
        self.versions.bump_tables(effects.unkeyed_tables());
        for (oid, key) in &effects.keys {
            if effects.keyed_tables.contains(oid) {
                self.versions.bump_key(*oid, key);
            }
        }
        if effects.catalog_changed {
            self.catalog_changed();
        }
    }
}

impl ReadCache {
    /// `None` when the cache is disabled (`cache.enabled = false`).
    pub fn new(
        config: &Config,
        connector: Connector,
        runtime: tokio::runtime::Handle,
    ) -> Option<Arc<Self>> {
        let cache: &CacheConfig = &config.cache;
        if !cache.enabled {
            return None;
        }
        let tables = TableSettings::from_config(config);
        let limits = ClassifierLimits {
            max_parse_bytes: usize::try_from(config.server.max_parse_bytes.as_u64())
                .unwrap_or(usize::MAX),
            memo_entries: cache.memo_entries,
            memo_bytes: cache.memo_bytes.as_u64(),
        };
        Some(Arc::new(Self {
            results: ResultCache::new(cache.max_bytes.as_u64(), cache.max_entry_bytes.as_u64()),
            versions: Registry::with_row_stripes(spillway_policies::cache::row_stripes_for(
                cache.max_bytes.as_u64(),
            )),
            classifier: Classifier::new(limits),
            tables: ArcSwap::from_pointee(tables),
            invalidation: cache.invalidation,
            replication: config.replication.clone(),
            sinks: stream::Sinks::default(),
            dbs: Mutex::new(HashMap::new()),
            service: service::Spawner {
                runtime,
                connector,
                url: config.backend.url.clone(),
            },
        }))
    }

    /// Registers a consumer of the change stream (`cache.invalidation =
    /// "replication"`): every committed transaction of every database followed is
    /// handed to it after the cache applied it and before the slot's position moves
    /// past it; `lost`/`resumed` when a database's stream stops and follows again.
    /// Register before the first session (a sink added later misses earlier commits
    /// and is told nothing about them).
    ///
    /// A database whose stream already follows (the write side's start may have used
    /// it before its sink existed) is reported to the new sink as `resumed` at once:
    /// it takes every commit from here on, so nothing it derives from then on misses
    /// a change. This call may run beside the stream's own; a sink told `resumed`
    /// twice rebuilds twice.
    pub fn add_change_sink(&self, sink: Arc<dyn spillway_policies::changes::ChangeSink>) {
        self.sinks.add(sink.clone());
        for db in self.databases() {
            if db
                .stream
                .following
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                sink.resumed(&db.name);
            }
        }
    }

    /// The per-table cache settings now.
    pub fn settings(&self) -> Guard<Arc<TableSettings>> {
        self.tables.load()
    }

    /// Installs the cache settings of a reloaded `config`. When they changed, every
    /// entry stored so far stops being served (an epoch bump): an entry keeps the TTL it
    /// was stored with, and a table whose caching was turned off must not be answered
    /// from entries made before.
    pub fn reload(&self, config: &Config) -> bool {
        let next = TableSettings::from_config(config);
        if **self.tables.load() == next {
            return false;
        }
        self.tables.store(Arc::new(next));
        self.versions.bump_everything();
        true
    }

    /// Every database sessions have used so far (the admin console's INVALIDATE).
    pub fn databases(&self) -> Vec<Arc<DbState>> {
        self.dbs().values().cloned().collect()
    }

    fn dbs(&self) -> MutexGuard<'_, HashMap<String, Arc<DbState>>> {
        match self.dbs.lock() {
            Ok(d) => d,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// A lease on database `name`'s state (a session's); starts its service connection
    /// unless it runs.
    pub fn lease(self: &Arc<Self>, name: &str) -> DbLease {
        let db = {
            let mut dbs = self.dbs();
            dbs.entry(name.to_owned())
                .or_insert_with(|| {
                    Arc::new(DbState {
                        name: name.to_owned(),
                        versions: self.versions.database(name),
                        stream: stream::Status::default(),
                        echoes: echo::Echoes::default(),
                        catalog: RwLock::new(None),
                        last_trusted: RwLock::new(None),
                        refresh: Notify::new(),
                        generation: AtomicU64::new(0),
                        control: Mutex::new(Control::default()),
                        wake: Notify::new(),
                    })
                })
                .clone()
        };
        if db.lease() {
            self.service.spawn(self.clone(), db.clone());
        }
        DbLease { db }
    }

    /// The state of database `name`, served for the rest of the process: a lease that
    /// is never given back (the write side's backend database).
    pub fn database(self: &Arc<Self>, name: &str) -> Arc<DbState> {
        let lease = self.lease(name);
        let db = lease.db.clone();
        std::mem::forget(lease);
        db
    }

    /// Closes database `name`'s service connection; the returned future completes
    /// once it is closed. `None` when it has none open (or in the making). Afterwards
    /// it stays closed for a while unless a session takes a new lease (`service.rs`).
    pub fn release_database(&self, name: &str) -> Option<Released> {
        let db = self.dbs().get(name).cloned()?;
        let closed = db.request_release()?;
        Some(Released(vec![closed]))
    }

    /// Before the statements of `sqls` go upstream: closes the service connections of
    /// the databases they need to themselves (`DROP DATABASE`, the template of `CREATE
    /// DATABASE`, `ALTER DATABASE … RENAME`), which PostgreSQL would otherwise find
    /// in use. The future completes once they are closed; `None` when none is open.
    pub fn release_databases<'a>(
        &self,
        sqls: impl IntoIterator<Item = &'a str>,
    ) -> Option<Released> {
        let mut closing = Vec::new();
        for sql in sqls {
            // Cheap first: nearly every statement never says it.
            if !sql
                .as_bytes()
                .windows(8)
                .any(|w| w.eq_ignore_ascii_case(b"database"))
            {
                continue;
            }
            let analysis = self.classifier.classify(sql);
            for name in analysis.statements.iter().flat_map(|s| &s.vacated) {
                closing.extend(
                    self.release_database(name)
                        .map(|r| r.0)
                        .into_iter()
                        .flatten(),
                );
            }
        }
        (!closing.is_empty()).then_some(Released(closing))
    }
}
