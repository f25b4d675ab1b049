//! `SHOW KEYS`: each deferred table's key index and its point reads (split from
//! `commands.rs`).

use super::Console;
use crate::protocol::backend::ColumnType;

/// `SHOW KEYS`: each deferred table's key index (state, keys, estimated bytes, why
/// it is off) and its point reads so far (keys read, and the queries that read them:
/// fewer queries than keys is batching at work).
#[allow(clippy::type_complexity)]
pub fn show(shared: &Console) -> (Vec<(&'static str, ColumnType)>, Vec<Vec<Option<String>>>) {
    let rows = shared
        .writes
        .as_ref()
        .map(|(w, _)| {
            let reads: std::collections::HashMap<String, (u64, u64)> = w
                .point_read_counts()
                .into_iter()
                .map(|(t, keys, queries)| (t, (keys, queries)))
                .collect();
            w.key_stats()
                .into_iter()
                .map(|s| {
                    let (keys, queries) = reads.get(&s.table).copied().unwrap_or((0, 0));
                    vec![
                        Some(s.table),
                        Some(s.phase.as_str().to_owned()),
                        Some(s.keys.to_string()),
                        Some(s.bytes.to_string()),
                        Some(keys.to_string()),
                        Some(queries.to_string()),
                        s.off.map(str::to_owned),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    let columns = vec![
        ("table", ColumnType::Text),
        ("state", ColumnType::Text),
        ("keys", ColumnType::Int8),
        ("bytes", ColumnType::Int8),
        ("point_reads", ColumnType::Int8),
        ("point_read_queries", ColumnType::Int8),
        ("off_because", ColumnType::Text),
    ];
    (columns, rows)
}
