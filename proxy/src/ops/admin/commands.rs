//! The console's commands: parsing a statement into a [`Command`] and answering it from
//! spillway's own state as a [`Reply`] (rows, a command tag, or an error). Nothing here
//! touches the wire; `admin::serve` encodes replies.

use std::time::Duration;

use super::Console;
pub use super::pools::PoolCommand;
use crate::protocol::backend::ColumnType;
use crate::protocol::sqlstate::SqlState;

/// The help text of an unknown command.
pub const USAGE: &str = "SHOW STATS | SHOW CACHE | SHOW TABLES | SHOW PENDING | SHOW CLIENTS | \
                         SHOW KEYS | SHOW REPLICATION | SHOW POOLS | SHOW SERVERS | PAUSE [db] | RESUME [db] | RECONNECT [db] | \
                         WAIT_CLOSE [db] | FLUSH [table] | INVALIDATE table | RELOAD";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    ShowStats,
    ShowCache,
    ShowTables,
    ShowPending,
    ShowClients,
    /// The key index and point reads per deferred table (`keys.rs`).
    ShowKeys,
    ShowReplication,
    ShowPools,
    /// Transaction mode's server connections, one row each.
    ShowServers,
    /// PAUSE, RESUME, RECONNECT, WAIT_CLOSE, of one database's pools or all (`pools.rs`).
    Pool(PoolCommand, Option<String>),
    /// Every deferred table, or one.
    Flush(Option<String>),
    Invalidate(String),
    Reload,
}

/// What a command answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Rows {
        columns: Vec<(&'static str, ColumnType)>,
        rows: Vec<Vec<Option<String>>>,
        tag: &'static str,
    },
    Done(&'static str),
    Error(SqlState, String),
}

/// Parses one statement (no trailing `;`), keywords in any case.
pub fn parse(statement: &str) -> Result<Command, String> {
    let words: Vec<&str> = statement.split_whitespace().collect();
    let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
    let upper: Vec<&str> = upper.iter().map(String::as_str).collect();
    match (upper.as_slice(), words.as_slice()) {
        (["SHOW", "STATS"], _) => Ok(Command::ShowStats),
        (["SHOW", "CACHE"], _) => Ok(Command::ShowCache),
        (["SHOW", "TABLES"], _) => Ok(Command::ShowTables),
        (["SHOW", "PENDING"], _) => Ok(Command::ShowPending),
        (["SHOW", "CLIENTS"], _) => Ok(Command::ShowClients),
        (["SHOW", "KEYS"], _) => Ok(Command::ShowKeys),
        (["SHOW", "REPLICATION"], _) => Ok(Command::ShowReplication),
        (["SHOW", "POOLS"], _) => Ok(Command::ShowPools),
        (["SHOW", "SERVERS"], _) => Ok(Command::ShowServers),
        (["FLUSH"], _) => Ok(Command::Flush(None)),
        (["FLUSH", _], [_, table]) => Ok(Command::Flush(Some(unquote(table)))),
        (["INVALIDATE", _], [_, table]) => Ok(Command::Invalidate(unquote(table))),
        (["RELOAD"], _) => Ok(Command::Reload),
        ([word] | [word, _], _) if let Some(command) = PoolCommand::of(word) => {
            Ok(Command::Pool(command, words.get(1).map(|db| unquote(db))))
        }
        _ => Err(format!(
            "unknown admin console command \"{statement}\"; the console understands {USAGE}"
        )),
    }
}

/// `"Sales"."Items"` → `Sales.Items`: names are matched as stored.
fn unquote(name: &str) -> String {
    name.replace('"', "")
}

/// Answers `command` from spillway's state.
pub async fn execute(command: Command, shared: &Console) -> Reply {
    match command {
        Command::ShowStats => show_stats(shared),
        Command::ShowCache => show_cache(shared),
        Command::ShowTables => show_tables(shared),
        Command::ShowPending => show_pending(shared),
        Command::ShowClients => show_clients(shared),
        Command::ShowReplication
        | Command::ShowPools
        | Command::ShowServers
        | Command::ShowKeys => {
            let (columns, rows) = match command {
                Command::ShowKeys => super::keys::show(shared),
                Command::ShowPools => super::pools::show(shared),
                Command::ShowServers => super::pools::show_servers(shared),
                _ => super::replication::show(shared),
            };
            Reply::Rows {
                columns,
                rows,
                tag: "SHOW",
            }
        }
        Command::Flush(table) => flush(shared, table.as_deref()).await,
        Command::Invalidate(table) => invalidate(shared, &table),
        Command::Reload => reload(shared).await,
        Command::Pool(command, db) => {
            match super::pools::control(shared, command, db.as_deref()).await {
                Ok(tag) => Reply::Done(tag),
                Err(message) => Reply::Error(SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, message),
            }
        }
    }
}

/// `RELOAD`: answers once the reload finished (tables leaving a deferred policy
/// flushed), with one row per changed key and when it takes effect; or the error that
/// rejected the whole reload.
async fn reload(shared: &Console) -> Reply {
    match shared.reload.reload().await {
        Ok(done) => Reply::Rows {
            columns: vec![
                ("key", ColumnType::Text),
                ("takes_effect", ColumnType::Text),
            ],
            rows: done
                .changed
                .into_iter()
                .map(|(key, applies)| {
                    let when = match applies {
                        crate::config::reload::Applies::Reload => "now",
                        crate::config::reload::Applies::Restart => "at restart",
                    };
                    vec![text(key), text(when)]
                })
                .collect(),
            tag: "RELOAD",
        },
        Err(err) => Reply::Error(err.sqlstate(), format!("reload rejected: {err}")),
    }
}

/// One sample of the Prometheus text format.
struct Sample {
    name: String,
    labels: String,
    value: f64,
}

/// Every sample `/metrics` would serve now (state gauges refreshed first); empty when
/// another metrics recorder is installed.
fn samples(shared: &Console) -> Vec<Sample> {
    let Some(handle) = crate::metrics::install() else {
        return Vec::new();
    };
    crate::ops::http::refresh(
        shared.cache.as_deref(),
        shared.writes.as_ref().map(|(w, _)| w.as_ref()),
    );
    handle
        .render()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            Some(Sample {
                name: name.to_owned(),
                labels: labels.to_owned(),
                value: value.parse().ok()?,
            })
        })
        .collect()
}

fn text(s: impl ToString) -> Option<String> {
    Some(s.to_string())
}

fn seconds(d: Duration) -> Option<String> {
    Some(format!("{:.3}", d.as_secs_f64()))
}

/// Every counter and gauge of `/metrics`, and each histogram's count and sum.
fn show_stats(shared: &Console) -> Reply {
    let rows = samples(shared)
        .into_iter()
        .filter(|s| !s.name.ends_with("_bucket"))
        .map(|s| vec![text(s.name), text(s.labels), text(s.value)])
        .collect();
    Reply::Rows {
        columns: vec![
            ("metric", ColumnType::Text),
            ("labels", ColumnType::Text),
            ("value", ColumnType::Float8),
        ],
        rows,
        tag: "SHOW",
    }
}

fn show_cache(shared: &Console) -> Reply {
    let columns = vec![
        ("enabled", ColumnType::Bool),
        ("entries", ColumnType::Int8),
        ("bytes", ColumnType::Int8),
        ("max_bytes", ColumnType::Int8),
        ("hits", ColumnType::Int8),
        ("misses", ColumnType::Int8),
        ("hit_ratio", ColumnType::Float8),
        ("evictions", ColumnType::Int8),
        ("ttl", ColumnType::Text),
        ("invalidation", ColumnType::Text),
        ("databases", ColumnType::Int8),
    ];
    let current = shared.reload.current();
    let config = &current.cache;
    let row = match &shared.cache {
        None => {
            let mut row = vec![text("f")];
            row.resize(columns.len(), None);
            row
        }
        Some(cache) => {
            let stats = cache.results.stats();
            let load =
                |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            let (hits, misses) = (load(&stats.hits), load(&stats.misses));
            #[allow(clippy::cast_precision_loss)]
            let ratio =
                (hits + misses > 0).then(|| format!("{:.4}", hits as f64 / (hits + misses) as f64));
            vec![
                text("t"),
                text(cache.results.entry_count()),
                text(cache.results.weighted_bytes()),
                text(config.max_bytes.as_u64()),
                text(hits),
                text(misses),
                ratio,
                text(load(&stats.evicted) + load(&stats.expired)),
                text(humantime::format_duration(config.ttl)),
                text(match cache.invalidation {
                    spillway_policies::Invalidation::Ttl => "ttl",
                    spillway_policies::Invalidation::Notify => "notify",
                    spillway_policies::Invalidation::Replication => "replication",
                }),
                text(cache.databases().len()),
            ]
        }
    };
    Reply::Rows {
        columns,
        rows: vec![row],
        tag: "SHOW",
    }
}

/// Pending count and oldest age per deferred table.
fn pending(shared: &Console) -> std::collections::HashMap<String, (usize, Option<Duration>)> {
    shared
        .writes
        .as_ref()
        .map(|(w, _)| {
            w.pending_by_table()
                .into_iter()
                .map(|(t, n, age)| (t, (n, age)))
                .collect()
        })
        .unwrap_or_default()
}

fn show_tables(shared: &Console) -> Reply {
    let pending = pending(shared);
    let samples = samples(shared);
    let fallbacks = |table: &str| -> f64 {
        let label = format!("table=\"{table}\"");
        samples
            .iter()
            .filter(|s| {
                s.name == crate::metrics::FALLBACKS && s.labels.split(',').any(|l| l == label)
            })
            .fold(0.0, |sum, s| sum + s.value)
    };
    let current = shared.reload.current();
    let rows = current
        .tables
        .iter()
        .map(|(name, t)| {
            let (count, age) = pending.get(name).copied().unwrap_or((0, None));
            let deferred = t.policy.is_deferred();
            vec![
                text(name),
                text(t.policy),
                text(consistency(t.consistency)),
                text(if t.cache { "t" } else { "f" }),
                text(humantime::format_duration(
                    t.ttl.unwrap_or(current.cache.ttl),
                )),
                deferred.then(|| count.to_string()),
                age.and_then(seconds),
                text(format!("{:.0}", fallbacks(name))),
            ]
        })
        .collect();
    Reply::Rows {
        columns: vec![
            ("table", ColumnType::Text),
            ("policy", ColumnType::Text),
            ("consistency", ColumnType::Text),
            ("cache", ColumnType::Bool),
            ("ttl", ColumnType::Text),
            ("pending", ColumnType::Int8),
            ("oldest_pending_age", ColumnType::Float8),
            ("fallbacks", ColumnType::Int8),
        ],
        rows,
        tag: "SHOW",
    }
}

/// As written in the config.
fn consistency(c: spillway_policies::Consistency) -> &'static str {
    match c {
        spillway_policies::Consistency::Strong => "strong",
        spillway_policies::Consistency::Session => "session",
        spillway_policies::Consistency::Bounded => "bounded",
    }
}

fn when_full(w: spillway_policies::WhenFull) -> &'static str {
    match w {
        spillway_policies::WhenFull::Block => "block",
        spillway_policies::WhenFull::Reject => "reject",
        spillway_policies::WhenFull::WriteThrough => "write-through",
    }
}

fn show_pending(shared: &Console) -> Reply {
    let columns = vec![
        ("table", ColumnType::Text),
        ("pending", ColumnType::Int8),
        ("oldest_pending_age", ColumnType::Float8),
        ("max_pending", ColumnType::Int8),
        ("when_full", ColumnType::Text),
        ("flusher", ColumnType::Text),
    ];
    let Some((writes, _)) = &shared.writes else {
        return Reply::Rows {
            columns,
            rows: Vec::new(),
            tag: "SHOW",
        };
    };
    let pending = pending(shared);
    let flusher = match writes.health() {
        Ok(()) => "running".to_owned(),
        Err(cause) => cause,
    };
    let current = shared.reload.current();
    let rows = current
        .tables
        .iter()
        .filter(|(_, t)| t.policy.is_deferred())
        .map(|(name, t)| {
            let (count, age) = pending.get(name).copied().unwrap_or((0, None));
            vec![
                text(name),
                text(count),
                age.and_then(seconds),
                text(t.max_pending),
                text(when_full(t.when_full)),
                text(&flusher),
            ]
        })
        .collect();
    Reply::Rows {
        columns,
        rows,
        tag: "SHOW",
    }
}

fn show_clients(shared: &Console) -> Reply {
    let rows = shared
        .clients
        .list()
        .into_iter()
        .map(|c| {
            let age = c.since.elapsed().unwrap_or_default();
            vec![
                text(c.id),
                text(c.user),
                text(c.database),
                text(c.application_name),
                text(c.peer),
                text(if c.tls { "t" } else { "f" }),
                text(humantime::format_rfc3339_seconds(c.since)),
                seconds(age),
            ]
        })
        .collect();
    Reply::Rows {
        columns: vec![
            ("id", ColumnType::Int8),
            ("user", ColumnType::Text),
            ("database", ColumnType::Text),
            ("application_name", ColumnType::Text),
            ("peer", ColumnType::Text),
            ("tls", ColumnType::Bool),
            ("connected_at", ColumnType::Text),
            ("age", ColumnType::Float8),
        ],
        rows,
        tag: "SHOW",
    }
}

/// Waits until every write acknowledged before it (of `table`, or of all deferred
/// tables) is applied, like `SPILLWAY FLUSH`.
async fn flush(shared: &Console, table: Option<&str>) -> Reply {
    let Some((writes, _)) = &shared.writes else {
        return match table {
            Some(t) => not_deferred(t),
            None => Reply::Done("FLUSH"),
        };
    };
    let target = match table {
        None => writes.highest(),
        Some(t) => {
            let name = match resolve_deferred(writes, t) {
                Ok(name) => name,
                Err(reply) => return reply,
            };
            writes
                .barrier_target([name.as_str()])
                .unwrap_or_else(|| writes.applied())
        }
    };
    match writes.wait_applied(target).await {
        Ok(()) => Reply::Done("FLUSH"),
        Err(err) => Reply::Error(SqlState::INTERNAL_ERROR, err.to_string()),
    }
}

fn not_deferred(table: &str) -> Reply {
    Reply::Error(
        SqlState::UNDEFINED_TABLE,
        format!("table \"{table}\" has no deferred policy (FLUSH takes a write-behind table)"),
    )
}

/// `schema.name` or a bare name that matches exactly one deferred table.
fn resolve_deferred(
    writes: &crate::write::service::WriteService,
    table: &str,
) -> Result<String, Reply> {
    let (schema, name) = match table.split_once('.') {
        Some((s, n)) => (Some(s), n),
        None => (None, table),
    };
    match writes.tables().names_like(schema, name).as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(not_deferred(table)),
        many => Err(Reply::Error(
            SqlState::AMBIGUOUS,
            format!("\"{table}\" matches {}; write schema.name", many.join(", ")),
        )),
    }
}

/// Drops cached results of `table` in every database the cache serves; a database
/// whose catalog is not loaded loses all its entries (the name cannot be resolved).
fn invalidate(shared: &Console, table: &str) -> Reply {
    let Some(cache) = &shared.cache else {
        return Reply::Error(
            SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
            "the read cache is disabled (cache.enabled = false)".to_owned(),
        );
    };
    let (schema, name) = match table.split_once('.') {
        Some((s, n)) => (Some(s), n),
        None => (None, table),
    };
    let mut rows = Vec::new();
    for db in cache.databases() {
        match db.catalog() {
            Some(catalog) => {
                let mut oids = Vec::new();
                for rel in catalog.resolve(schema, name) {
                    oids.push(rel.oid);
                    // A view's results depend on its base tables' versions.
                    let _ = catalog.read_dependencies(rel, &mut oids);
                    rows.push(vec![
                        text(&db.name),
                        text(format!("{}.{}", rel.schema, rel.name)),
                        text("table"),
                    ]);
                }
                db.versions.bump_tables(oids);
            }
            None => {
                db.versions.bump_all();
                rows.push(vec![
                    text(&db.name),
                    None,
                    text("database (catalog not loaded)"),
                ]);
            }
        }
    }
    if rows.is_empty() {
        return Reply::Error(
            SqlState::UNDEFINED_TABLE,
            format!("relation \"{table}\" is not known in any database spillway caches"),
        );
    }
    Reply::Rows {
        columns: vec![
            ("database", ColumnType::Text),
            ("relation", ColumnType::Text),
            ("invalidated", ColumnType::Text),
        ],
        rows,
        tag: "INVALIDATE",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_in_any_case() {
        assert_eq!(parse("show stats"), Ok(Command::ShowStats));
        assert_eq!(parse("SHOW  Tables"), Ok(Command::ShowTables));
        assert_eq!(parse("flush"), Ok(Command::Flush(None)));
        assert_eq!(
            parse("FLUSH public.Events"),
            Ok(Command::Flush(Some("public.Events".to_owned())))
        );
        assert_eq!(
            parse("invalidate \"Sales\".\"Items\""),
            Ok(Command::Invalidate("Sales.Items".to_owned()))
        );
        assert_eq!(parse("RELOAD"), Ok(Command::Reload));
        assert_eq!(parse("show keys"), Ok(Command::ShowKeys));
        let pool = |c, db: Option<&str>| Ok(Command::Pool(c, db.map(str::to_owned)));
        assert_eq!(parse("pause"), pool(PoolCommand::Pause, None));
        assert_eq!(
            parse("RESUME \"App\""),
            pool(PoolCommand::Resume, Some("App"))
        );
        assert_eq!(
            parse("reconnect app"),
            pool(PoolCommand::Reconnect, Some("app"))
        );
        assert_eq!(parse("Wait_Close"), pool(PoolCommand::WaitClose, None));
        assert!(parse("PAUSE a b").is_err());
    }

    #[test]
    fn unknown_commands_list_the_known_ones() {
        for bad in [
            "SELECT 1",
            "SHOW",
            "INVALIDATE",
            "FLUSH a b",
            "SHOW STATS x",
        ] {
            let err = parse(bad).expect_err(bad);
            assert!(err.contains("SHOW STATS"), "{err}");
        }
    }
}
