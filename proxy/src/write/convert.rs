//! From a classified statement ([`WriteShape`]) and its bound parameters to the row
//! operations a journal record holds, checked against the deferred table: the key is
//! exactly the primary key, columns exist, arithmetic is on numeric columns, values
//! have a text form, casts are plain type names. Anything else is a fallback reason
//! (the statement then runs write-through after a barrier). A RETURNING list is
//! answered from the same values (`returning.rs`) or is a fallback reason too.

use spillway_policies::writes::{Assign as RecAssign, AssignOp, RowOp, Val};

use super::fallbacks::Fallback;
pub use super::params::Bound;
use super::params::{self, canonical_key, is_numeric};
use super::returning::{self, Returning};
use super::tables::DeferredTable;
use crate::read::classify::{Assign, Operand, Value, WriteShape};

pub use spillway_policies::engine::Verb;

/// A deferrable statement: its operations and, per operation, its canonical key; and
/// its RETURNING answer, which whoever acknowledges the statement must send (or not
/// defer it).
pub type Converted = spillway_policies::engine::Converted<Returning>;

/// Converts `shape` on `table` (already resolved) with `bound` parameters.
pub fn convert(
    shape: &WriteShape,
    table: &DeferredTable,
    bound: &Bound,
) -> Result<Converted, Fallback> {
    let mut converted = operations(shape, table, bound)?;
    converted.returning = returning::answer(shape, table, bound, &converted.ops)?;
    Ok(converted)
}

fn operations(
    shape: &WriteShape,
    table: &DeferredTable,
    bound: &Bound,
) -> Result<Converted, Fallback> {
    match shape {
        WriteShape::Insert { columns, rows, .. } => insert(columns, rows, table, bound),
        WriteShape::Update { set, key, .. } => update(set, key, table, bound),
        WriteShape::Delete { key, .. } => {
            let (key_vals, canon) = key_values(key, table, bound)?;
            Ok(Converted {
                verb: Verb::Delete,
                ops: vec![RowOp::Delete {
                    table: table.meta.name.clone(),
                    key: key_vals,
                }],
                keys: vec![canon],
                returning: None,
            })
        }
    }
}

/// `INSERT INTO t (columns) VALUES rows…`: one operation per row, each with its key.
fn insert(
    columns: &[String],
    rows: &[Vec<Value>],
    table: &DeferredTable,
    bound: &Bound,
) -> Result<Converted, Fallback> {
    for c in columns {
        if !table.meta.types.contains_key(c) {
            return Err(Fallback::UnknownColumn);
        }
    }
    if table.required.iter().any(|r| !columns.contains(r)) {
        return Err(Fallback::RequiredColumnMissing);
    }
    let mut ops = Vec::with_capacity(rows.len());
    let mut keys = Vec::with_capacity(rows.len());
    for row in rows {
        let mut values = Vec::with_capacity(row.len());
        for (c, v) in columns.iter().zip(row) {
            values.push(value(v, c, table, bound)?);
        }
        let mut key = Vec::with_capacity(table.meta.key.len());
        for k in &table.meta.key {
            let i = columns
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
            columns: columns.to_vec(),
            values,
        });
        keys.push(key);
    }
    Ok(Converted {
        verb: Verb::Insert,
        ops,
        keys,
        returning: None,
    })
}

/// `UPDATE t SET … WHERE key`: one operation.
fn update(
    set: &[(String, Assign)],
    key: &[(String, Value)],
    table: &DeferredTable,
    bound: &Bound,
) -> Result<Converted, Fallback> {
    let (key_vals, canon) = key_values(key, table, bound)?;
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
            value: value(v, column, table, bound)?,
        });
    }
    Ok(Converted {
        verb: Verb::Update,
        ops: vec![RowOp::Update {
            table: table.meta.name.clone(),
            key: key_vals,
            set: assigns,
        }],
        keys: vec![canon],
        returning: None,
    })
}

/// The WHERE's key equalities as the record's key values (canonical text, the
/// primary key's order) and the canonical key.
fn key_values(
    pairs: &[(String, Value)],
    table: &DeferredTable,
    bound: &Bound,
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
        let val = value(v, k, table, bound)?;
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

/// One value for `column`: a literal or a Bind parameter, as PostgreSQL text.
fn value(v: &Value, column: &str, table: &DeferredTable, bound: &Bound) -> Result<Val, Fallback> {
    // A client cast is an explicit conversion (it may truncate or round where the
    // column's assignment would refuse), and its result is not validated here: such
    // statements run write-through.
    if v.cast.is_some() {
        return Err(Fallback::Cast);
    }
    let column_oid = table.type_oids.get(column).copied().unwrap_or(0);
    // Text of dates, times and intervals depends on the session's TimeZone, DateStyle
    // and IntervalStyle, which the flusher's connection does not share.
    if params::is_datetime_type(column_oid) {
        return Err(Fallback::DatetimeValue);
    }
    let text = match &v.operand {
        Operand::Literal(t) => t.clone(),
        Operand::Param(n) => parameter(usize::from(*n), column_oid, bound)?,
    };
    // Values PostgreSQL would refuse run write-through, so the client gets
    // PostgreSQL's own error instead of an acknowledgement and a dead letter.
    if let Some(t) = &text {
        let typmod = table.typmods.get(column).copied().unwrap_or(-1);
        if !params::accepts(t, column_oid, typmod) {
            return Err(Fallback::InvalidValue);
        }
    }
    if text.is_none() && table.not_null.iter().any(|c| c == column) {
        return Err(Fallback::NullInNotNullColumn);
    }
    Ok(Val { text, cast: None })
}

/// Bind parameter `$n` as text for a column of type `column_oid`.
fn parameter(n: usize, column_oid: u32, bound: &Bound) -> Result<Option<String>, Fallback> {
    let bad = Fallback::Value(params::BAD_VALUE);
    let i = n.checked_sub(1).ok_or(bad)?;
    let raw = bound.values.get(i).ok_or(bad)?;
    let declared = bound.types.get(i).copied().unwrap_or(0);
    // An undeclared parameter used as a column's value takes the column's type
    // (PostgreSQL infers it so); a cast decides nothing here because the client sent
    // the value in the parameter's own type. A declared type other than the column's
    // would be converted by PostgreSQL's own rules (or refused at Parse): not deferred.
    if declared != 0 && declared != column_oid {
        return Err(Fallback::ParameterType);
    }
    let binary = bound.binary.get(i).copied().unwrap_or(false);
    let text = params::to_text(raw.as_deref(), binary, column_oid).map_err(Fallback::Value)?;
    // 'now', 'today'… read the clock when PostgreSQL converts them: at apply time, not
    // when the client wrote. Not deferrable.
    if params::is_clock_type(column_oid) && text.as_deref().is_some_and(params::is_clock_word) {
        return Err(Fallback::ClockLiteral);
    }
    Ok(text)
}
