//! `SHOW KEYS`: each deferred table's key index (its state, keys and estimated bytes,
//! why it is off) and its point reads so far (keys read, and the queries that read
//! them: fewer queries than keys is batching at work).
//!
//! Invariant: read-only; one row per deferred table the write side knows, none
//! without deferred tables.

use std::collections::HashMap;

use super::Console;
use super::commands::Reply;
use crate::protocol::backend::ColumnType;

pub(super) fn show_keys(shared: &Console) -> Reply {
    let rows = shared
        .writes
        .as_ref()
        .map(|(w, _)| {
            let reads: HashMap<String, (u64, u64)> = w
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
    Reply::Rows {
        columns: vec![
            ("table", ColumnType::Text),
            ("state", ColumnType::Text),
            ("keys", ColumnType::Int8),
            ("bytes", ColumnType::Int8),
            ("point_reads", ColumnType::Int8),
            ("point_read_queries", ColumnType::Int8),
            ("off_because", ColumnType::Text),
        ],
        rows,
        tag: "SHOW",
    }
}
