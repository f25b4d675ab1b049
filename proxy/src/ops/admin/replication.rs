//! `SHOW REPLICATION`: one row per database the change stream follows (or tried to):
//! whether it follows, its slot, confirmed position, lag, retained WAL, commits and
//! resets. Empty unless `cache.invalidation = "replication"`.

use std::sync::atomic::Ordering;

use super::Console;
use crate::protocol::backend::ColumnType;
use crate::read::cache::stream::lsn_text;

/// The columns and rows (`commands.rs` makes them a reply).
#[allow(clippy::type_complexity)]
pub fn show(shared: &Console) -> (Vec<(&'static str, ColumnType)>, Vec<Vec<Option<String>>>) {
    let columns = vec![
        ("database", ColumnType::Text),
        ("following", ColumnType::Bool),
        ("slot", ColumnType::Text),
        ("confirmed_lsn", ColumnType::Text),
        ("lag_bytes", ColumnType::Int8),
        ("lag_seconds", ColumnType::Float8),
        ("retained_wal_bytes", ColumnType::Int8),
        ("commits", ColumnType::Int8),
        ("resets", ColumnType::Int8),
    ];
    let rows = match &shared.cache {
        Some(cache) if cache.invalidation == spillway_policies::Invalidation::Replication => cache
            .databases()
            .iter()
            .map(|db| {
                let s = &db.stream;
                let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
                #[allow(clippy::cast_precision_loss)]
                let lag = load(&s.lag_micros) as f64 / 1e6;
                vec![
                    Some(db.name.clone()),
                    Some(
                        if s.following.load(Ordering::Relaxed) {
                            "t"
                        } else {
                            "f"
                        }
                        .to_owned(),
                    ),
                    Some(cache.replication.slot_for(&db.name)),
                    Some(lsn_text(load(&s.confirmed_lsn))),
                    Some(load(&s.lag_bytes).to_string()),
                    Some(format!("{lag:.6}")),
                    Some(load(&s.retained_bytes).to_string()),
                    Some(load(&s.commits).to_string()),
                    Some(load(&s.resets).to_string()),
                ]
            })
            .collect(),
        _ => Vec::new(),
    };
    (columns, rows)
}
