//! Hot reload (SIGHUP and the admin console's `RELOAD`, SPEC §7): re-reads the config
//! sources spillway started with (the same file, the `SPILLWAY_*` environment),
//! validates the whole of it, and applies what can change while running: the
//! `[tables.*]` settings (policy, consistency, cache, ttl, back-pressure, staleness,
//! row counts), the cache TTL defaults, `[flush]` and `log.level`. Which keys those are
//! is `config::reload::applies`; a changed key that needs a restart is logged by name
//! and keeps its running value.
//!
//! Invariants:
//! - All or nothing: everything that can reject a reload (loading, validation, the
//!   catalog checks of tables moving onto a deferred policy, an unusable log filter)
//!   runs before anything is applied; a rejected reload leaves the running config
//!   untouched, logs an error naming the key and its source, and `RELOAD` answers it.
//! - A table leaving a deferred policy is flushed before its writes run write-through
//!   (see `writes/service/table_set.rs`); if that flush cannot finish (the flusher
//!   stopped), the previous table set is put back and the reload fails.
//! - One reload at a time (an async mutex); a `RELOAD` answers only when its reload
//!   finished, flush included.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use sqlx::Connection;

use crate::config::reload::{Applies, applies, changed_keys, effective};
use crate::config::{Config, ConfigError};
use crate::protocol::sqlstate::SqlState;
use crate::read::cache::ReadCache;
use crate::write::service::{DeferError, TablesChange, WriteService};
use crate::write::tables::{self, TableError};

/// Installs a new `log.level` filter in the running subscriber.
pub type LogLevelSetter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Where a reload reads the config from, and how it reaches the log filter; given by
/// `main`, which loaded the config and installed tracing.
pub struct ReloadSource {
    /// The `--config` file (`None`: `./spillway.toml` if present, as at start).
    pub path: Option<PathBuf>,
    /// `None` when the level cannot change (`RUST_LOG` set, or no reload handle).
    pub log_level: Option<LogLevelSetter>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("reload is not available: this spillway was not started from a config file")]
    Unavailable,
    #[error(transparent)]
    Load(#[from] ConfigError),
    #[error("{0}")]
    Invalid(#[from] spillway_policies::config::ValidationError),
    #[error("{key}: {problem}")]
    Refused { key: String, problem: String },
    #[error(transparent)]
    Table(#[from] TableError),
    #[error("connecting to the backend to check the tables moving onto a deferred policy: {0}")]
    Connect(sqlx::Error),
    #[error("flushing the tables that leave a deferred policy: {0}")]
    Flush(DeferError),
}

impl ReloadError {
    /// F0000 (config_file_error) for a config that is wrong; 08006 when the backend
    /// could not be asked; XX000 when the flush of a leaving table failed.
    pub fn sqlstate(&self) -> SqlState {
        match self {
            ReloadError::Connect(_) => SqlState::CONNECTION_FAILURE,
            ReloadError::Table(TableError::Query(_)) => SqlState::CONNECTION_FAILURE,
            ReloadError::Flush(_) => SqlState::INTERNAL_ERROR,
            _ => SqlState::CONFIG_FILE_ERROR,
        }
    }
}

/// What a reload changed: every key that differs, and whether it applies now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    pub changed: Vec<(String, Applies)>,
}

/// Owns the running config and applies reloads to the parts that hold it.
pub struct Reloader {
    source: Option<ReloadSource>,
    /// The config in force: the last reload's reloadable keys, the start's others.
    current: ArcSwap<Config>,
    /// Serializes reloads; held across the flush of leaving tables (async mutex).
    running: tokio::sync::Mutex<()>,
    cache: Option<Arc<ReadCache>>,
    writes: Option<Arc<WriteService>>,
}

impl Reloader {
    pub fn new(
        config: Config,
        source: Option<ReloadSource>,
        cache: Option<Arc<ReadCache>>,
        writes: Option<Arc<WriteService>>,
    ) -> Self {
        Self {
            source,
            current: ArcSwap::from_pointee(config),
            running: tokio::sync::Mutex::new(()),
            cache,
            writes,
        }
    }

    /// The config in force now.
    pub fn current(&self) -> Arc<Config> {
        self.current.load_full()
    }

    /// Reloads, logs the outcome (one line; an error names the key and its source),
    /// and returns it.
    pub async fn reload(&self) -> Result<Reloaded, ReloadError> {
        let _one = self.running.lock().await;
        let result = self.try_reload().await;
        match &result {
            Ok(done) => {
                for (key, _) in done.changed.iter().filter(|(_, a)| *a == Applies::Restart) {
                    tracing::warn!(
                        %key,
                        "config reload: {key} changed; it takes effect at restart, the running \
                         value stays"
                    );
                }
                let applied: Vec<&str> = done
                    .changed
                    .iter()
                    .filter(|(_, a)| *a == Applies::Reload)
                    .map(|(k, _)| k.as_str())
                    .collect();
                tracing::info!(?applied, "configuration reloaded");
            }
            Err(err) => tracing::error!(
                %err,
                "configuration reload rejected; the previous configuration stays in force: {err}"
            ),
        }
        result
    }

    async fn try_reload(&self) -> Result<Reloaded, ReloadError> {
        let source = self.source.as_ref().ok_or(ReloadError::Unavailable)?;
        let new = Config::load(source.path.as_deref())?;
        new.validate()?;
        let policies = new.table_policies()?;
        let old = self.current();
        let changed: Vec<(String, Applies)> = changed_keys(&old, &new)
            .into_iter()
            .map(|k| {
                let a = applies(&k);
                (k, a)
            })
            .collect();
        let level_changed = new.log.level != old.log.level;
        if level_changed {
            tracing_subscriber::EnvFilter::try_new(&new.log.level).map_err(|e| {
                ReloadError::Refused {
                    key: "log.level".to_owned(),
                    problem: format!("not a valid tracing filter: {e}"),
                }
            })?;
        }
        let next = effective(&old, new);

        // The write side: every check first, then the change.
        let deferred: BTreeMap<String, spillway_policies::TableConfig> = policies
            .iter()
            .filter(|(_, t)| t.policy.is_deferred())
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect();
        let change = match &self.writes {
            None => {
                if let Some(name) = deferred.keys().next() {
                    return Err(ReloadError::Refused {
                        key: format!("tables.\"{name}\".policy"),
                        problem: "no table was deferred when spillway started, so the journal \
                                  and the flush worker are not running; a first deferred \
                                  table takes effect at restart"
                            .to_owned(),
                    });
                }
                None
            }
            Some(w) => {
                let now: Vec<String> = w.deferred_names();
                // Write-back folds pending records as if each was valid when
                // acknowledged, which only exact row counts ensure.
                for (name, t) in &deferred {
                    let before = w.tables().deferring(name).map(|d| d.config.row_counts);
                    if t.policy == spillway_policies::Policy::WriteBack
                        && before == Some(spillway_policies::RowCounts::Assumed)
                    {
                        return Err(ReloadError::Refused {
                            key: format!("tables.\"{name}\".policy"),
                            problem: "write-back cannot take over pending writes acknowledged \
                                      with row_counts = \"assumed\"; move the table to \
                                      write-through first (its pending writes are applied), \
                                      then to write-back"
                                .to_owned(),
                        });
                    }
                }
                let entering: BTreeMap<_, _> = policies
                    .iter()
                    .filter(|(n, t)| t.policy.is_deferred() && !now.contains(&n.to_string()))
                    .map(|(n, t)| (n.clone(), t.clone()))
                    .collect();
                let entering = if entering.is_empty() {
                    HashMap::new()
                } else {
                    // The same checks as at start: exists, ordinary, primary key, no
                    // row security, no inheritance children.
                    let mut conn = sqlx::PgConnection::connect(&next.backend.url)
                        .await
                        .map_err(ReloadError::Connect)?;
                    let checked = tables::load(&mut conn, &entering).await;
                    let _ = conn.close().await;
                    checked?
                };
                Some((
                    w,
                    TablesChange {
                        configs: deferred.into_iter().collect(),
                        entering,
                    },
                ))
            }
        };

        // Nothing below rejects the config itself; only the flush can fail.
        if let Some((w, change)) = change {
            let (leaving, before) = w.begin_reload(change);
            if let Err(err) = w.drain_leaving(&leaving).await {
                w.restore(before);
                return Err(ReloadError::Flush(err));
            }
            w.finish_reload();
            w.set_flush(next.flush.clone());
            if !leaving.is_empty() {
                tracing::info!(tables = ?leaving, "reload: tables left their deferred policy; their pending writes are applied");
            }
        }
        if let Some(cache) = &self.cache
            && cache.reload(&next)
        {
            tracing::info!("reload: cache settings changed; entries stored before are dropped");
        }
        if level_changed {
            match &source.log_level {
                Some(set) => {
                    if let Err(err) = set(&next.log.level) {
                        tracing::warn!(%err, "reload: log.level not applied");
                    }
                }
                None => tracing::info!(
                    "reload: log.level changed, but RUST_LOG decides the log filter; unchanged"
                ),
            }
        }
        self.current.store(Arc::new(next));
        Ok(Reloaded { changed })
    }
}
