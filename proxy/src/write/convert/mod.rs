//! From a classified statement ([`WriteShape`]) and its bound parameters to the row
//! operations a journal record holds, checked against the deferred table: the key is
//! exactly the primary key, columns exist, arithmetic is on numeric columns, values
//! have a text form, casts are plain type names. Anything else is a fallback reason
//! (the statement then runs write-through after a barrier). A RETURNING list is
//! answered from the same values (`returning/`) or is a fallback reason too.
//!
//! Each value's conversion (parameters, casts, clocks) is `value.rs`'s.

use spillway_policies::writes::{Assign as RecAssign, AssignOp, Cmp, Guard, RowOp, Val};

use super::datetime::Settings;
use super::fallbacks::Fallback;
pub use super::params::Bound;
use super::params::{self, canonical_key, is_numeric};
use super::returning::{self, Returning};
use super::sequences::Reservations;
use super::tables::DeferredTable;
use crate::read::classify::{
    Assign, Clock, Compare, ConflictSet, ConflictTarget, ConflictValue, OnConflict, Operand, Value,
    WriteShape, reason,
};
use spillway_policies::engine::IfExists;

pub use spillway_policies::engine::Verb;

mod replays;
mod value;

pub use replays::{replay, replay_told};
use value::{clock, value};

/// A deferrable statement: its operations and, per operation, its canonical key; and
/// its RETURNING answer, which whoever acknowledges the statement must send (or not
/// defer it).
pub type Converted = spillway_policies::engine::Converted<Returning>;

/// Converts `shape` on `table` (already resolved) with `bound` parameters.
pub fn convert(
    shape: &WriteShape,
    table: &DeferredTable,
    bound: &Bound,
    settings: Settings<'_>,
    reserved: &Reservations,
) -> Result<Converted, Fallback> {
    let mut converted = operations(shape, table, bound, settings, reserved)?;
    converted.returning = returning::answer(shape, table, bound, &converted.ops, settings)?;
    let mut stored = Vec::new();
    // An upsert's RETURNING is answered only when it is the same whichever way each
    // row goes: DO UPDATE rows return what the UPDATE supplies (the key, `c =
    // EXCLUDED.c`), and rows DO NOTHING skips leave no gap only in a one-row statement.
    if let (Some(alts), Some(answer)) = (&converted.if_exists, &converted.returning) {
        let updates: Vec<RowOp> = alts
            .iter()
            .filter_map(|a| match a {
                IfExists::Update(u) => Some(u.clone()),
                IfExists::Nothing => None,
            })
            .collect();
        let same = if updates.is_empty() {
            converted.ops.len() == 1
        } else {
            updates.len() == converted.ops.len()
                && returning::answer(shape, table, bound, &updates, settings)
                    .ok()
                    .flatten()
                    .as_ref()
                    == Some(answer)
        };
        // DO UPDATE rows returning columns it leaves as stored: their values come from
        // what the engine knows of each row (ADR 0038).
        if !same {
            let mut answer = answer.clone();
            stored = returning::on_update(&mut answer, table, &updates, settings)
                .ok_or(returning::UNKNOWN)?;
            converted.returning = Some(answer);
        }
    }
    converted.stored = stored;
    Ok(converted)
}

fn operations(
    shape: &WriteShape,
    table: &DeferredTable,
    bound: &Bound,
    settings: Settings<'_>,
    reserved: &Reservations,
) -> Result<Converted, Fallback> {
    match shape {
        WriteShape::Insert {
            columns,
            rows,
            on_conflict,
            ..
        } => {
            let mut converted = insert(columns, rows, table, bound, settings, reserved)?;
            if let Some(clause) = on_conflict {
                converted.if_exists = Some(if_exists(clause, &converted, table, bound, settings)?);
            }
            Ok(converted)
        }
        WriteShape::Update {
            set,
            key,
            compared,
            one_of,
            returning,
            ..
        } => each_key(key, one_of.as_ref(), returning, table, |key| {
            update(set, key, compared, table, bound, settings)
        }),
        WriteShape::Delete {
            key,
            compared,
            one_of,
            returning,
            ..
        } => each_key(key, one_of.as_ref(), returning, table, |key| {
            let (key, guard) = guarded(key, compared, table, bound, settings)?;
            let (key_vals, canon) = key_values(&key, table, bound, settings)?;
            Ok(Converted {
                verb: Verb::Delete,
                ops: vec![RowOp::Delete {
                    table: table.meta.name.clone(),
                    key: key_vals,
                    guard,
                }],
                keys: vec![canon],
                if_exists: None,
                returning: None,
                stored: Vec::new(),
                told: None,
            })
        }),
    }
}

/// An UPDATE or DELETE by `key`, or, with `WHERE … AND k IN (v1, v2, …)` (`one_of`, a
/// primary-key column), one operation per value's key, in the list's order, each
/// converted as `k = vi` would be; a key given twice is written once, as PostgreSQL
/// writes each row once (ADR 0038). Such a statement's RETURNING is not answered:
/// its rows are those of the operations that write, which [`Returning`] does not
/// select.
fn each_key(
    key: &[(String, Value)],
    one_of: Option<&(String, Vec<Value>)>,
    returning: &[crate::read::classify::Returned],
    table: &DeferredTable,
    one: impl Fn(&[(String, Value)]) -> Result<Converted, Fallback>,
) -> Result<Converted, Fallback> {
    let Some((column, values)) = one_of else {
        return one(key);
    };
    if !table.meta.key.contains(column) {
        return Err(Fallback::WhereNotPrimaryKey);
    }
    if !returning.is_empty() {
        return Err(returning::UNKNOWN);
    }
    let mut all: Option<Converted> = None;
    for v in values {
        let mut pairs = key.to_vec();
        pairs.push((column.clone(), v.clone()));
        let c = one(&pairs)?;
        match &mut all {
            None => all = Some(c),
            Some(all) => {
                for (op, k) in c.ops.into_iter().zip(c.keys) {
                    if !all.keys.contains(&k) {
                        all.ops.push(op);
                        all.keys.push(k);
                    }
                }
            }
        }
    }
    all.ok_or(Fallback::WhereNotPrimaryKey)
}

/// `INSERT INTO t (columns) VALUES rows…`: one operation per row, each with its key.
/// A `serial`/identity key left out gets a reserved value per row.
fn insert(
    columns: &[String],
    rows: &[Vec<Value>],
    table: &DeferredTable,
    bound: &Bound,
    settings: Settings<'_>,
    reserved: &Reservations,
) -> Result<Converted, Fallback> {
    for c in columns {
        if !table.meta.types.contains_key(c) {
            return Err(Fallback::UnknownColumn);
        }
        if table.generated_always.contains(c) {
            return Err(Fallback::GeneratedAlways);
        }
    }
    let sequence = match (table.key_sequence, table.meta.key.as_slice()) {
        (Some(seq), [k]) if !columns.contains(k) => Some((k, seq)),
        _ => None,
    };
    if table.required.iter().any(|r| !columns.contains(r)) {
        return Err(Fallback::RequiredColumnMissing);
    }
    // Columns left to a clock default (`now()`, `gen_random_uuid()` …) get its value
    // when the statement is decided, as PostgreSQL would have evaluated it then (not
    // the flush's time).
    let filled: Vec<(&String, Option<Clock>)> = table
        .defaults
        .clock
        .iter()
        .filter(|(c, _)| !columns.contains(c))
        .map(|(c, e)| (c, super::tables::clock_default(e)))
        .collect();
    let mut all_columns = columns.to_vec();
    all_columns.extend(filled.iter().map(|(c, _)| (*c).clone()));
    all_columns.extend(sequence.map(|(k, _)| k.clone()));
    let mut ops = Vec::with_capacity(rows.len());
    let mut keys = Vec::with_capacity(rows.len());
    for row in rows {
        let mut values = Vec::with_capacity(all_columns.len());
        for (c, v) in columns.iter().zip(row) {
            values.push(value(v, c, table, bound, settings)?);
        }
        for (c, f) in &filled {
            let oid = table.type_oids.get(*c).copied().unwrap_or(0);
            let typmod = table.typmods.get(*c).copied().unwrap_or(-1);
            values.push(Val {
                text: Some(
                    f.ok_or(Fallback::ClockDefault)
                        .and_then(|f| clock(f, oid, typmod, settings))
                        .map_err(|_| Fallback::ClockDefault)?,
                ),
                cast: None,
            });
        }
        if let Some((_, seq)) = sequence {
            let v = reserved
                .take(&table.meta.name, seq)
                .ok_or(Fallback::KeyReservation)?;
            values.push(Val {
                text: Some(v.to_string()),
                cast: None,
            });
        }
        let mut key = Vec::with_capacity(table.meta.key.len());
        for k in &table.meta.key {
            let i = all_columns
                .iter()
                .position(|c| c == k)
                .ok_or(Fallback::KeyNotGiven)?;
            let text = values
                .get(i)
                .and_then(|v| v.text.clone())
                .ok_or(Fallback::NullKey)?;
            let oid = table.type_oids.get(k).copied().unwrap_or(0);
            let canon = canonical_key(&text, oid).map_err(Fallback::Value)?;
            if let Some(v) = values.get_mut(i) {
                v.text = Some(canon.clone());
            }
            key.push(canon);
        }
        ops.push(RowOp::Insert {
            table: table.meta.name.clone(),
            columns: all_columns.clone(),
            values,
        });
        keys.push(key);
    }
    Ok(Converted {
        verb: Verb::Insert,
        ops,
        keys,
        if_exists: None,
        returning: None,
        stored: Vec::new(),
        told: None,
    })
}

/// `ON CONFLICT (primary key) DO NOTHING | DO UPDATE SET …` of the INSERT `converted`:
/// per row, what it does when its key exists (the engine decides which holds). The
/// arbiter must be exactly the primary key's columns or constraint: any other unique
/// constraint conflicts on rows spillway knows nothing of. A key given twice in one
/// statement falls back (PostgreSQL's answer then depends on the action: 21000 for
/// DO UPDATE).
fn if_exists(
    clause: &OnConflict,
    converted: &Converted,
    table: &DeferredTable,
    bound: &Bound,
    settings: Settings<'_>,
) -> Result<Vec<IfExists>, Fallback> {
    let key = &table.meta.key;
    let on_pk = match &clause.target {
        ConflictTarget::Columns(cols) => {
            cols.len() == key.len() && key.iter().all(|k| cols.contains(k))
        }
        ConflictTarget::Constraint(name) => *name == table.pkey_name,
    };
    if !on_pk {
        return Err(Fallback::ConflictNotPrimaryKey);
    }
    for (i, k) in converted.keys.iter().enumerate() {
        if converted.keys[..i].contains(k) {
            return Err(Fallback::ConflictRepeatedKey);
        }
    }
    let Some(set) = &clause.update else {
        return Ok(vec![IfExists::Nothing; converted.ops.len()]);
    };
    converted
        .ops
        .iter()
        .map(|op| {
            let RowOp::Insert {
                table: name,
                columns,
                values,
            } = op
            else {
                return Err(Fallback::Shape(reason::UNSUPPORTED));
            };
            let proposed = |c: &str| {
                columns
                    .iter()
                    .position(|x| x == c)
                    .and_then(|i| values.get(i))
            };
            let mut key_vals = Vec::with_capacity(key.len());
            for k in key {
                key_vals.push(proposed(k).cloned().ok_or(Fallback::KeyNotGiven)?);
            }
            let mut assigns = Vec::with_capacity(set.len());
            for (column, item) in set {
                let oid = *table.type_oids.get(column).ok_or(Fallback::UnknownColumn)?;
                if key.contains(column) {
                    return Err(Fallback::KeyUpdate);
                }
                let (op, v) = match item {
                    ConflictSet::Set(v) => (AssignOp::Set, v),
                    ConflictSet::Add(v) => (AssignOp::Add, v),
                    ConflictSet::Sub(v) => (AssignOp::Sub, v),
                };
                if op != AssignOp::Set && !is_numeric(oid) {
                    return Err(Fallback::ArithmeticOnNonNumeric);
                }
                let value = match v {
                    ConflictValue::Value(v) => value(v, column, table, bound, settings)?,
                    ConflictValue::Excluded(from) => {
                        // The proposed row's value, already converted to `from`'s
                        // type: it lands unchanged only in a column of that type.
                        let same_type = table.type_oids.get(from) == Some(&oid)
                            && table.typmods.get(from) == table.typmods.get(column);
                        if !same_type {
                            return Err(Fallback::Shape(reason::ON_CONFLICT_SET));
                        }
                        let v = proposed(from).cloned().ok_or(Fallback::ExcludedDefault)?;
                        if v.text.is_none() && table.not_null.iter().any(|c| c == column) {
                            return Err(Fallback::NullInNotNullColumn);
                        }
                        v
                    }
                };
                assigns.push(RecAssign {
                    column: column.clone(),
                    op,
                    value,
                });
            }
            Ok(IfExists::Update(RowOp::Update {
                table: name.clone(),
                key: key_vals,
                set: assigns,
                guard: Vec::new(),
            }))
        })
        .collect()
}

/// `UPDATE t SET … WHERE key`: one operation.
fn update(
    set: &[(String, Assign)],
    key: &[(String, Value)],
    compared: &[(String, Compare, Value)],
    table: &DeferredTable,
    bound: &Bound,
    settings: Settings<'_>,
) -> Result<Converted, Fallback> {
    let (key, guard) = guarded(key, compared, table, bound, settings)?;
    let (key_vals, canon) = key_values(&key, table, bound, settings)?;
    let mut assigns = Vec::with_capacity(set.len());
    for (column, a) in set {
        let oid = *table.type_oids.get(column).ok_or(Fallback::UnknownColumn)?;
        if table.meta.key.contains(column) {
            return Err(Fallback::KeyUpdate);
        }
        let (op, v) = match a {
            Assign::Set(v) => (AssignOp::Set, v),
            Assign::Add(v) => (AssignOp::Add, v),
            Assign::Sub(v) => (AssignOp::Sub, v),
        };
        if op != AssignOp::Set && !is_numeric(oid) {
            return Err(Fallback::ArithmeticOnNonNumeric);
        }
        assigns.push(RecAssign {
            column: column.clone(),
            op,
            value: value(v, column, table, bound, settings)?,
        });
    }
    Ok(Converted {
        verb: Verb::Update,
        ops: vec![RowOp::Update {
            table: table.meta.name.clone(),
            key: key_vals,
            set: assigns,
            guard,
        }],
        keys: vec![canon],
        if_exists: None,
        returning: None,
        stored: Vec::new(),
        told: None,
    })
}

/// A WHERE's `column = value` equalities.
type KeyPairs = Vec<(String, Value)>;

/// The WHERE's equalities split into the primary key's and the rest, the guard
/// (ADR 0035: `AND version = $2`), each converted as PostgreSQL would convert it for its
/// column. Guarded columns are integers only: their values compare exactly as numbers
/// whatever their spelling; any other column is [`Fallback::GuardColumn`].
fn guarded(
    pairs: &[(String, Value)],
    compared: &[(String, Compare, Value)],
    table: &DeferredTable,
    bound: &Bound,
    settings: Settings<'_>,
) -> Result<(KeyPairs, Vec<Guard>), Fallback> {
    let mut key = Vec::with_capacity(pairs.len());
    let mut guard = Vec::new();
    let equalities = pairs.iter().filter_map(|(column, v)| {
        if table.meta.key.contains(column) {
            key.push((column.clone(), v.clone()));
            None
        } else {
            Some((column, Cmp::Eq, v))
        }
    });
    let others = compared.iter().map(|(column, cmp, v)| {
        let cmp = match cmp {
            Compare::Lt => Cmp::Lt,
            Compare::Le => Cmp::Le,
            Compare::Gt => Cmp::Gt,
            Compare::Ge => Cmp::Ge,
            Compare::Ne => Cmp::Ne,
        };
        (column, cmp, v)
    });
    let conditions: Vec<(&String, Cmp, &Value)> = equalities.chain(others).collect();
    // Not a write of one key (a key column missing, or compared with `id > 5`): that
    // is the reason, whatever the other conditions are.
    let whole_key = table
        .meta
        .key
        .iter()
        .all(|k| key.iter().any(|(c, _)| c == k));
    if !whole_key
        || conditions
            .iter()
            .any(|(c, _, _)| table.meta.key.contains(c))
    {
        return Err(Fallback::WhereNotPrimaryKey);
    }
    for (column, cmp, v) in conditions {
        let oid = *table.type_oids.get(column).ok_or(Fallback::UnknownColumn)?;
        if !matches!(oid, params::INT2 | params::INT4 | params::INT8) {
            return Err(Fallback::GuardColumn);
        }
        if matches!(v.operand, Operand::Clock(_)) {
            return Err(Fallback::Function);
        }
        let value = match value(v, column, table, bound, settings) {
            // A NULL compared with a NOT NULL column: never true, as in PostgreSQL
            // (the column's constraint is an assignment's, not a comparison's).
            Err(Fallback::NullInNotNullColumn) => Val::plain(None),
            other => other?,
        };
        guard.push(Guard {
            column: column.clone(),
            cmp,
            value,
        });
    }
    Ok((key, guard))
}

/// The WHERE's key equalities as the record's key values (canonical text, the
/// primary key's order) and the canonical key.
fn key_values(
    pairs: &[(String, Value)],
    table: &DeferredTable,
    bound: &Bound,
    settings: Settings<'_>,
) -> Result<(Vec<Val>, Vec<String>), Fallback> {
    if pairs.len() != table.meta.key.len() {
        return Err(Fallback::WhereNotPrimaryKey);
    }
    let mut vals = Vec::with_capacity(pairs.len());
    let mut canon = Vec::with_capacity(pairs.len());
    for k in &table.meta.key {
        let (_, v) = pairs
            .iter()
            .find(|(c, _)| c == k)
            .ok_or(Fallback::WhereNotPrimaryKey)?;
        // `WHERE id = gen_random_uuid()` and the like: not a key spillway decides.
        if matches!(v.operand, Operand::Clock(_)) {
            return Err(Fallback::Function);
        }
        let val = value(v, k, table, bound, settings)?;
        let text = val.text.as_deref().ok_or(Fallback::NullKey)?;
        let oid = table.type_oids.get(k).copied().unwrap_or(0);
        let c = canonical_key(text, oid).map_err(Fallback::Value)?;
        canon.push(c.clone());
        // The canonical spelling goes into the record (the cast, if any, stays).
        vals.push(Val {
            text: Some(c),
            cast: val.cast,
        });
    }
    Ok((vals, canon))
}
