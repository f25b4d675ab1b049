//! The SQL that replays a held statement upstream when its transaction moves there
//! (`session/handler/held/replay.rs`): one statement per row operation, an upsert's
//! rows as upserts; a held upsert whose RETURNING gave stored values only over the
//! values given (ADR 0038).

use spillway_policies::engine::IfExists;
use spillway_policies::writes::{Cmp, Guard, RowOp, TableMeta, Val, replay};

use super::Converted;

/// The statements that replay `converted` upstream, one per operation, when its held
/// transaction moves there (`spillway_policies::writes::replay`): an upsert's rows as
/// upserts. `None` when one cannot be rendered.
pub fn replay(converted: &Converted, meta: &TableMeta) -> Option<Vec<String>> {
    converted
        .ops
        .iter()
        .enumerate()
        .map(|(i, op)| match &converted.if_exists {
            None => replay::statement(op, meta).ok(),
            Some(alts) => {
                let update = match alts.get(i)? {
                    IfExists::Nothing => None,
                    IfExists::Update(u) => Some(u),
                };
                replay::upsert(op, update, meta).ok()
            }
        })
        .collect()
}

/// [`replay`] of a held upsert whose RETURNING gave stored values (`told`, per
/// operation that took DO UPDATE, in `converted.stored`'s order; ADR 0038): each such
/// row's DO UPDATE only where those columns still hold the values given, so a replay
/// over a row changed since updates nothing and its count differs (40001). `None`
/// when one cannot be rendered.
pub fn replay_told(
    converted: &Converted,
    told: &[(usize, Vec<Option<String>>)],
    meta: &TableMeta,
) -> Option<Vec<String>> {
    let alts = converted.if_exists.as_ref()?;
    converted
        .ops
        .iter()
        .enumerate()
        .map(|(i, op)| {
            let update = match alts.get(i)? {
                IfExists::Nothing => None,
                IfExists::Update(RowOp::Update {
                    table, key, set, ..
                }) => {
                    let guard = match told.iter().find(|(o, _)| *o == i) {
                        Some((_, values)) => converted
                            .stored
                            .iter()
                            .zip(values)
                            .map(|(column, v)| Guard {
                                column: column.clone(),
                                cmp: Cmp::Eq,
                                value: Val::plain(v.as_deref()),
                            })
                            .collect(),
                        None => Vec::new(),
                    };
                    Some(RowOp::Update {
                        table: table.clone(),
                        key: key.clone(),
                        set: set.clone(),
                        guard,
                    })
                }
                IfExists::Update(_) => return None,
            };
            replay::upsert(op, update.as_ref(), meta).ok()
        })
        .collect()
}
