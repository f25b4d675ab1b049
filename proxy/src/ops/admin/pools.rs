//! `SHOW POOLS`: one row per transaction-mode pool (database, user): its size, server
//! connections open, idle and leased, and sessions waiting for one. `SHOW SERVERS`:
//! one row per pooled server connection (its backend pid, leased or idle, idle for
//! how long, its age, whether `RECONNECT` left it to close). Empty unless some database or user is in transaction mode
//! (`pool.mode`).

use super::Console;
use crate::protocol::backend::ColumnType;

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
