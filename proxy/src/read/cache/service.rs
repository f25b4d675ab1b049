//! One service connection per database the cache serves: it loads the catalog
//! snapshot, reloads it on request (DDL, unknown names) and periodically, and with
//! `cache.invalidation = "notify"` LISTENs on `spillway_invalidate`, bumping the
//! version of each table an external writer changed.
//!
//! Invariant: while the connection is down the database has no catalog (nothing is
//! served or stored), and in notify mode every entry of the database is invalidated on
//! loss, since notifications sent meanwhile are gone. Reconnects back off up to
//! [`MAX_BACKOFF`]; the task lives as long as the runtime it was spawned on.

use std::future::poll_fn;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use spillway_policies::Invalidation;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use super::{DbState, ReadCache};
use crate::net::upstream::Connector;
use crate::read::catalog::{self, Catalog};

/// Notification channel the triggers installed by `spillway install-triggers` use.
pub const CHANNEL: &str = "spillway_invalidate";
/// External DDL is not announced; a periodic reload bounds how long it goes unseen.
const RELOAD_EVERY: Duration = Duration::from_secs(60);
const MIN_RELOAD_GAP: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Notifications buffered between the connection task and the service loop; one that
/// does not fit invalidates the whole database instead.
const NOTIFY_QUEUE: usize = 4096;

pub struct Spawner {
    pub runtime: tokio::runtime::Handle,
    pub connector: Connector,
    pub url: String,
}

impl Spawner {
    pub fn spawn(&self, cache: Arc<ReadCache>, db: Arc<DbState>) {
        let connector = self.connector.clone();
        let url = self.url.clone();
        self.runtime
            .spawn(async move { run(cache, db, connector, url).await });
    }
}

async fn run(cache: Arc<ReadCache>, db: Arc<DbState>, connector: Connector, url: String) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match connect(&connector, &url, &db).await {
            Ok((client, notifications)) => {
                backoff = Duration::from_millis(100);
                let reason = serve(&cache, &db, &client, notifications).await;
                tracing::warn!(database = %db.name, %reason, "cache service connection lost; database served uncached until it is back");
            }
            Err(reason) => {
                tracing::warn!(database = %db.name, %reason, "cache service connection failed; retrying");
            }
        }
        db.set_catalog(None);
        if cache.invalidation == Invalidation::Notify {
            // Writes by others were not heard meanwhile.
            db.versions.bump_all();
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn connect(
    connector: &Connector,
    url: &str,
    db: &DbState,
) -> Result<(Client, mpsc::Receiver<String>), String> {
    let database = db.name.as_str();
    // A notification that does not fit the queue invalidates the whole database.
    let overflow = db.versions.clone();
    let mut config = tokio_postgres::Config::from_str(url).map_err(|e| e.to_string())?;
    // TLS, if any, is already negotiated by the connector.
    config.ssl_mode(tokio_postgres::config::SslMode::Disable);
    config.dbname(database);
    config.application_name("spillway cache service");
    let stream = connector.connect().await.map_err(|e| e.to_string())?;
    let (client, mut connection) = config
        .connect_raw(stream, NoTls)
        .await
        .map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::channel(NOTIFY_QUEUE);
    tokio::spawn(async move {
        while let Some(msg) = poll_fn(|cx| connection.poll_message(cx)).await {
            match msg {
                Ok(AsyncMessage::Notification(n)) => {
                    // Never wait here: the service loop may itself be waiting for a
                    // query answer that only this task can read.
                    match tx.try_send(n.payload().to_owned()) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => overflow.bump_all(),
                        Err(mpsc::error::TrySendError::Closed(_)) => return,
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::debug!(%err, "cache service connection ended");
                    return;
                }
            }
        }
    });
    Ok((client, rx))
}

/// Runs until the connection fails; returns why.
async fn serve(
    cache: &ReadCache,
    db: &DbState,
    client: &Client,
    mut notifications: mpsc::Receiver<String>,
) -> String {
    if cache.invalidation == Invalidation::Notify
        && let Err(err) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await
    {
        return err.to_string();
    }
    if let Err(err) = reload(db, client).await {
        return err.to_string();
    }
    loop {
        tokio::select! {
            payload = notifications.recv() => match payload {
                Some(payload) => match (payload.parse::<u32>(), db.catalog()) {
                    // The trigger names the table the statement targeted; its parents
                    // and partitions change with it.
                    (Ok(oid), Some(catalog)) => {
                        let mut tables = Vec::new();
                        catalog.write_targets_by_oid(oid, &mut tables);
                        db.versions.bump_tables(tables);
                    }
                    _ => db.versions.bump_all(),
                },
                None => return "connection closed".to_owned(),
            },
            () = db.refresh.notified() => {
                // A snapshot that exists but lacks a name is refreshed at most once
                // per interval (a client repeating a query on a missing table must not
                // turn into a reload loop); a discarded one (DDL) is reloaded now.
                if db.catalog().is_some() {
                    tokio::time::sleep(MIN_RELOAD_GAP).await;
                }
                if let Err(err) = reload(db, client).await {
                    return err.to_string();
                }
            }
            () = tokio::time::sleep(RELOAD_EVERY) => {
                if let Err(err) = reload(db, client).await {
                    return err.to_string();
                }
            }
        }
    }
}

async fn reload(db: &DbState, client: &Client) -> Result<(), tokio_postgres::Error> {
    loop {
        let generation = db.generation.load(Ordering::SeqCst);
        let catalog: Catalog = catalog::load::load(client).await?;
        let relations = catalog.relation_count();
        // DDL acknowledged while loading: this snapshot may predate it; load again.
        if db.install(Arc::new(catalog), generation) {
            tracing::debug!(database = %db.name, relations, "catalog loaded");
            return Ok(());
        }
    }
}
