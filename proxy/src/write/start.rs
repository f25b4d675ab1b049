//! Bringing the deferred-write side up at startup and down at shutdown: schema
//! migrations, the deferred tables checked against the catalog, the journal opened
//! (recovery of the local journal, or of the NATS stream after this instance took its
//! ledger row over with a new epoch), the ledger claimed, the flush worker started, the key index's loader
//! started (it loads nothing until the change stream follows the database: serving
//! never waits for it), and the journal records the ledger does not hold replayed
//! before any session is served.

use std::sync::Arc;
use std::time::Duration;

use spillway_policies::JournalBackend;
use spillway_policies::journal::{Journal, JournalError, Record};
use sqlx::{Connection, PgConnection};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::ledger;
use super::log::JournalLog;
use super::nats::{self, NatsError, NatsLog};
use super::service::{StartError, WriteService};
use super::tables::{self, TableError};
use crate::config::Config;
use crate::read::cache::ReadCache;
use crate::write::schema::{self, SchemaError};

/// How long startup waits for the first catalog snapshot of the backend database.
const CATALOG_WAIT: Duration = Duration::from_secs(10);

/// The running deferred-write side.
pub struct Running {
    pub service: Arc<WriteService>,
    /// The database of `backend.url`: the one whose tables are deferred.
    pub database: String,
    stop: CancellationToken,
    /// Completes when the flush thread's worker returned.
    flusher: oneshot::Receiver<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum WritesStartError {
    #[error(
        "deferred policies need the read cache's statement classifier: set cache.enabled = true"
    )]
    CacheDisabled,
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error("connecting to the backend for the deferred tables: {0}")]
    Connect(sqlx::Error),
    #[error(transparent)]
    Tables(#[from] TableError),
    #[error("opening the journal in {dir}: {error}")]
    Journal { dir: String, error: JournalError },
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("invalid configuration: {0}")]
    Config(#[from] spillway_policies::config::ValidationError),
    #[error("opening the journal: {0}")]
    Task(String),
    #[error(transparent)]
    Nats(#[from] NatsError),
}

/// Starts the deferred-write side when some table has a deferred policy; returns once
/// the journal's unapplied records are applied upstream.
pub async fn start(
    config: &Config,
    cache: Option<&Arc<ReadCache>>,
) -> Result<Option<Running>, WritesStartError> {
    let policies = config.table_policies()?;
    if !policies.values().any(|t| t.policy.is_deferred()) {
        return Ok(None);
    }
    let Some(cache) = cache else {
        return Err(WritesStartError::CacheDisabled);
    };
    let url = config.backend.url.clone();
    schema::migrate(&url).await?;
    let mut conn = PgConnection::connect(&url)
        .await
        .map_err(WritesStartError::Connect)?;
    let deferred = tables::load(&mut conn, &policies).await?;
    let (journal, records) = match config.journal.backend {
        JournalBackend::Local => open_local(config, deferred.len()).await?,
        JournalBackend::Nats => open_nats(config, &mut conn).await?,
    };
    let service = WriteService::start(
        journal,
        records,
        deferred,
        config.flush.clone(),
        url.clone(),
        &mut conn,
    )
    .await?;
    if let Err(err) = conn.close().await {
        tracing::debug!(%err, "closing the startup connection");
    }
    let database = database_of(&url);
    service.configure_keys(&database, &config.key_index);
    let db = cache.database(&database);
    let stop = CancellationToken::new();
    // The flush worker runs on its own thread and runtime: its upstream I/O never
    // competes with sessions on their workers, and its futures need not be `Send`
    // (sqlx's borrowed query futures trip rustc's higher-ranked `Send` check).
    let (done, flusher) = oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| WritesStartError::Task(e.to_string()))?;
    let replication = cache.invalidation == spillway_policies::Invalidation::Replication;
    // Applied rows are in PostgreSQL now: cached reads of them refill from there.
    let on_applied = invalidator(&service, db.clone(), replication);
    // Another instance's write: cached reads of it are stale from now on.
    service.follow_others(invalidator(&service, db, replication));
    let (worker_service, worker_stop) = (service.clone(), stop.clone());
    std::thread::Builder::new()
        .name("spillway-flush".to_owned())
        .spawn(move || {
            // Built here, on its thread: the future never crosses threads.
            runtime.block_on(worker_service.run_flusher(worker_stop, on_applied));
            let _ = done.send(());
        })
        .map_err(|e| WritesStartError::Task(e.to_string()))?;
    // The key index's loader on a thread of its own too: a table's first load reads
    // every key, and neither sessions nor flushes wait for it.
    let loader = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| WritesStartError::Task(e.to_string()))?;
    let (loader_service, loader_stop) = (service.clone(), stop.clone());
    std::thread::Builder::new()
        .name("spillway-keys".to_owned())
        .spawn(move || loader.block_on(loader_service.run_key_loader(loader_stop)))
        .map_err(|e| WritesStartError::Task(e.to_string()))?;
    // The refiller of reserved key values, on a thread of its own like the loader; the
    // first blocks are asked for now so that the first INSERTs need not fall back.
    let refiller = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| WritesStartError::Task(e.to_string()))?;
    let (reservations, refiller_url, refiller_stop) =
        (service.reservations.clone(), url.clone(), stop.clone());
    std::thread::Builder::new()
        .name("spillway-sequences".to_owned())
        .spawn(move || refiller.block_on(reservations.run(refiller_url, refiller_stop)))
        .map_err(|e| WritesStartError::Task(e.to_string()))?;
    prefill(&service).await;
    // Deferral resolves table names with the cache's catalog snapshot; without it
    // every write would fall back to write-through, so the first is awaited here.
    let loading = std::time::Instant::now();
    let db_state = cache.database(&database);
    while db_state.catalog().is_none() && loading.elapsed() < CATALOG_WAIT {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if db_state.catalog().is_none() {
        tracing::warn!(
            database = %database,
            "catalog not loaded yet: writes to deferred tables run write-through until it is"
        );
    }
    let replay = service.highest();
    if replay > service.applied() {
        tracing::info!(through = replay, "replaying the journal before serving");
        if let Err(err) = service.wait_applied(replay).await {
            tracing::error!(%err, "journal replay failed");
        }
    }
    Ok(Some(Running {
        service,
        database,
        stop,
        flusher,
    }))
}

/// What invalidates the cached reads of rows a record writes: by the current set,
/// which still knows tables that left deferral by reload; rows with known keys
/// invalidate their keys, the other tables whole.
fn invalidator(
    service: &Arc<WriteService>,
    db: Arc<crate::read::cache::DbState>,
    replication: bool,
) -> impl Fn(&spillway_policies::engine::state::Applied) + Send + 'static {
    let known = service.clone();
    move |applied| {
        // By the current set, which still knows tables that left deferral by reload.
        // Rows with known keys invalidate their keys; the other tables whole.
        let set = known.tables();
        let unkeyed: Vec<u32> = applied
            .unkeyed
            .iter()
            .filter_map(|t| set.oid_of(t))
            .collect();
        db.versions.bump_tables(unkeyed.iter().copied());
        let mut rows = Vec::with_capacity(applied.keys.len());
        for (table, key) in &applied.keys {
            match set.oid_of(table) {
                Some(oid) => {
                    db.versions.bump_key(oid, key);
                    rows.push((oid, key.clone()));
                }
                None => db.versions.bump_all(),
            }
        }
        // A batch this instance flushed, invalidated after it committed: its echo
        // need not do it again (exactly these rows and tables, ADR 0036).
        if replication && let Some(xid) = applied.xid {
            db.echoes.flushed(xid, rows, unkeyed);
        }
    }
}

/// Asks for every key sequence's first block and waits (at most [`PREFILL_WAIT`]) for
/// the answers.
async fn prefill(service: &WriteService) {
    let set = service.tables();
    let sequences: Vec<(String, spillway_policies::engine::KeySequence)> = set
        .names()
        .filter_map(|name| {
            let seq = set.deferring(name)?.key_sequence?;
            Some((name.clone(), seq))
        })
        .collect();
    drop(set);
    for (name, seq) in &sequences {
        service.reservations.prefill(name, *seq);
    }
    let started = std::time::Instant::now();
    while started.elapsed() < PREFILL_WAIT
        && !sequences
            .iter()
            .all(|(name, _)| service.reservations.settled(name))
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How long startup waits for the first blocks of reserved key values.
const PREFILL_WAIT: Duration = Duration::from_secs(3);

/// The local journal in `journal.dir`, recovered.
async fn open_local(
    config: &Config,
    tables: usize,
) -> Result<(JournalLog, Vec<Record>), WritesStartError> {
    let journal_config = config.journal.clone();
    let opened = tokio::task::spawn_blocking(move || Journal::open(&journal_config))
        .await
        .map_err(|e| WritesStartError::Task(e.to_string()))?;
    let (journal, recovery) = opened.map_err(|error| WritesStartError::Journal {
        dir: config.journal.dir.display().to_string(),
        error,
    })?;
    if let Some(torn) = &recovery.torn {
        tracing::warn!(
            segment = %torn.segment.display(), offset = torn.offset, bytes = torn.bytes,
            "journal: cut off a torn tail (a write interrupted by a crash, never acknowledged)"
        );
    }
    tracing::info!(
        journal = %journal.id(), epoch = journal.epoch(), records = recovery.records.len(),
        tables, "journal opened"
    );
    Ok((JournalLog::Local(journal), recovery.records))
}

/// The NATS stream: this instance takes the stream's ledger row over (a new epoch,
/// fencing the previous owner) and reads what the ledger does not hold.
async fn open_nats(
    config: &Config,
    conn: &mut PgConnection,
) -> Result<(JournalLog, Vec<Record>), WritesStartError> {
    let nats = &config.journal.nats;
    let (epoch, applied) = ledger::take_over_ledger(conn, &NatsLog::journal_id(&nats.stream))
        .await
        .map_err(StartError::from)?;
    let (log, records) = nats::open(nats, epoch, applied).await?;
    tracing::info!(
        journal = %NatsLog::journal_id(&nats.stream), epoch, applied, records = records.len(),
        "journal opened"
    );
    Ok((JournalLog::Nats(Box::new(log)), records))
}

impl Running {
    /// The write side's change-stream sink (the key index): the replication task
    /// hands it every committed transaction of [`Running::database`].
    pub fn change_sink(&self) -> Arc<dyn spillway_policies::changes::ChangeSink> {
        self.service.key_index()
    }

    /// Stops the flush worker after it applied what it can within `deadline`; the rest
    /// stays journaled for the next start.
    pub async fn stop(self, deadline: Duration) {
        let pending = self
            .service
            .highest()
            .saturating_sub(self.service.applied());
        tracing::info!(pending, ?deadline, "draining deferred writes");
        self.stop.cancel();
        if tokio::time::timeout(deadline, self.flusher).await.is_err() {
            // The thread ends with the process; whatever it has not applied is
            // replayed from the journal at the next start.
            tracing::warn!(
                left = self
                    .service
                    .highest()
                    .saturating_sub(self.service.applied()),
                "drain deadline passed: the rest of the deferred writes stays journaled"
            );
        }
    }
}

/// The database a backend URL names (PostgreSQL's default: the user name).
pub fn database_of(url: &str) -> String {
    let Ok(u) = url::Url::parse(url) else {
        return String::new();
    };
    let path = u.path().trim_start_matches('/');
    if path.is_empty() {
        u.username().to_owned()
    } else {
        percent_decode(path)
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
