//! `SHOW POOLS`: one row per transaction-mode pool (database, user): its size, server
//! connections open, idle and leased, and sessions waiting for one. `SHOW SERVERS`:
//! one row per pooled server connection (its backend pid, leased or idle, idle for
//! how long, its age, whether `RECONNECT` left it to close). Empty unless some database or user is in transaction mode
//! (`pool.mode`). PAUSE, RESUME, RECONNECT and WAIT_CLOSE (`control`) act on them.

use super::Console;
use crate::protocol::backend::ColumnType;

/// The console's commands on transaction mode's pools, as PgBouncer's (ADR 0033).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolCommand {
    /// New transactions wait; answered once those in flight finished and the
    /// connections are closed.
    Pause,
    Resume,
    /// The connections open now are closed (idle ones at once, leased ones when their
    /// transaction ends).
    Reconnect,
    /// Answered once the connections a RECONNECT left to close are closed.
    WaitClose,
}

impl PoolCommand {
    /// The command a keyword (upper case) names.
    pub fn of(word: &str) -> Option<Self> {
        match word {
            "PAUSE" => Some(Self::Pause),
            "RESUME" => Some(Self::Resume),
            "RECONNECT" => Some(Self::Reconnect),
            "WAIT_CLOSE" => Some(Self::WaitClose),
            _ => None,
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Self::Pause => "PAUSE",
            Self::Resume => "RESUME",
            Self::Reconnect => "RECONNECT",
            Self::WaitClose => "WAIT_CLOSE",
        }
    }
}

/// Runs `command` on the pools of `database` (every pool's for `None`): its command
/// tag, or why it cannot run (the console answers 55000).
pub async fn control(
    shared: &Console,
    command: PoolCommand,
    database: Option<&str>,
) -> Result<&'static str, String> {
    let Some(pooling) = &shared.pooling else {
        return Err(
            "no database or user is in transaction mode (pool.mode): no pool to act on".to_owned(),
        );
    };
    let pools = &pooling.pools;
    match command {
        PoolCommand::Pause => pools.pause(database).await,
        PoolCommand::Resume => pools.resume(database)?,
        PoolCommand::Reconnect => pools.reconnect(database).await,
        PoolCommand::WaitClose => pools.wait_close(database).await,
    }
    Ok(command.tag())
}

/// The columns and rows (`commands.rs` makes them a reply).
#[allow(clippy::type_complexity)]
pub fn show(shared: &Console) -> (Vec<(&'static str, ColumnType)>, Vec<Vec<Option<String>>>) {
    let columns = vec![
        ("database", ColumnType::Text),
        ("user", ColumnType::Text),
        ("size", ColumnType::Int8),
        ("open", ColumnType::Int8),
        ("idle", ColumnType::Int8),
        ("leased", ColumnType::Int8),
        ("waiting", ColumnType::Int8),
    ];
    let rows = match &shared.pooling {
        Some(pooling) => pooling
            .pools
            .stats()
            .into_iter()
            .map(|p| {
                vec![
                    Some(p.database),
                    Some(p.user),
                    Some(p.size.to_string()),
                    Some(p.open.to_string()),
                    Some(p.idle.to_string()),
                    Some(p.open.saturating_sub(p.idle).to_string()),
                    Some(p.waiting.to_string()),
                ]
            })
            .collect(),
        None => Vec::new(),
    };
    (columns, rows)
}

/// `SHOW SERVERS`: the columns and rows.
#[allow(clippy::type_complexity)]
pub fn show_servers(
    shared: &Console,
) -> (Vec<(&'static str, ColumnType)>, Vec<Vec<Option<String>>>) {
    let columns = vec![
        ("database", ColumnType::Text),
        ("user", ColumnType::Text),
        ("pid", ColumnType::Int8),
        ("state", ColumnType::Text),
        ("idle_seconds", ColumnType::Int8),
        ("age_seconds", ColumnType::Int8),
        ("close_needed", ColumnType::Int8),
    ];
    let rows = match &shared.pooling {
        Some(pooling) => pooling
            .pools
            .servers()
            .into_iter()
            .map(|s| {
                vec![
                    Some(s.database),
                    Some(s.user),
                    Some(s.pid.to_string()),
                    Some(if s.leased { "leased" } else { "idle" }.to_owned()),
                    s.idle_for.map(|d| d.as_secs().to_string()),
                    Some(s.age.as_secs().to_string()),
                    Some(u8::from(s.close_needed).to_string()),
                ]
            })
            .collect(),
        None => Vec::new(),
    };
    (columns, rows)
}
