//! `INSERT … ON CONFLICT`: the arbiter and the DO NOTHING / DO UPDATE action as the
//! text gives them ([`OnConflict`]), or the [`super::reason`] label why not. Whether
//! the arbiter is the primary key is the caller's (it has the catalog).

use pg_query::NodeEnum;
use pg_query::protobuf::{OnConflictAction, OnConflictClause};

use super::reason as r;
use super::target::{self, Target};
use super::value::node;
use super::{Assign, ConflictSet, ConflictTarget, ConflictValue, OnConflict, set_list, size_of};

/// `ON CONFLICT (cols) | ON CONSTRAINT name` then `DO NOTHING` or `DO UPDATE SET …`
/// without WHERE. A clause without an arbiter (any unique constraint), with an
/// expression, collation, operator class or WHERE in the arbiter is
/// [`r::ON_CONFLICT_TARGET`]; a WHERE on DO UPDATE is [`r::ON_CONFLICT_WHERE`]; a SET
/// item other than a value, `EXCLUDED.c`, or `c ± either` is [`r::ON_CONFLICT_SET`]
/// (or the function's or subquery's reason).
pub(super) fn on_conflict(
    clause: &OnConflictClause,
    target: &Target<'_>,
) -> Result<OnConflict, &'static str> {
    let Some(infer) = clause.infer.as_deref() else {
        return Err(r::ON_CONFLICT_TARGET);
    };
    if infer.where_clause.is_some() {
        return Err(r::ON_CONFLICT_TARGET);
    }
    let arbiter = if infer.conname.is_empty() {
        let mut columns: Vec<String> = Vec::with_capacity(infer.index_elems.len());
        for elem in &infer.index_elems {
            let Some(NodeEnum::IndexElem(e)) = elem.node.as_ref() else {
                return Err(r::ON_CONFLICT_TARGET);
            };
            if e.name.is_empty()
                || e.expr.is_some()
                || !e.collation.is_empty()
                || !e.opclass.is_empty()
                || columns.contains(&e.name)
            {
                return Err(r::ON_CONFLICT_TARGET);
            }
            columns.push(e.name.clone());
        }
        if columns.is_empty() {
            return Err(r::ON_CONFLICT_TARGET);
        }
        ConflictTarget::Columns(columns)
    } else {
        ConflictTarget::Constraint(infer.conname.clone())
    };
    let update = match clause.action {
        a if a == OnConflictAction::OnconflictNothing as i32 => None,
        a if a == OnConflictAction::OnconflictUpdate as i32 => {
            if clause.where_clause.is_some() {
                return Err(r::ON_CONFLICT_WHERE);
            }
            // A target named (or aliased) `excluded` would make `excluded.c` ambiguous.
            if target.alias.unwrap_or(&target.table.name) == EXCLUDED {
                return Err(r::ON_CONFLICT_SET);
            }
            Some(set_list(&clause.target_list, |column, val| {
                conflict_set(target, column, val)
            })?)
        }
        _ => return Err(r::UNSUPPORTED),
    };
    Ok(OnConflict {
        target: arbiter,
        update,
    })
}

/// The name of the row proposed for insertion in `ON CONFLICT DO UPDATE`.
const EXCLUDED: &str = "excluded";

/// `EXCLUDED.c` as a value: the column `c`.
fn excluded(n: &NodeEnum) -> Option<String> {
    let NodeEnum::ColumnRef(col) = n else {
        return None;
    };
    match col.fields.as_slice() {
        [q, c] => match (q.node.as_ref(), c.node.as_ref()) {
            (Some(NodeEnum::String(q)), Some(NodeEnum::String(c))) if q.sval == EXCLUDED => {
                Some(c.sval.clone())
            }
            _ => None,
        },
        _ => None,
    }
}

/// One `SET column = …` of DO UPDATE.
fn conflict_set(
    target: &Target<'_>,
    column: &str,
    val: Option<&NodeEnum>,
) -> Result<ConflictSet, &'static str> {
    if let Some(c) = val.and_then(excluded) {
        return Ok(ConflictSet::Set(ConflictValue::Excluded(c)));
    }
    // `c ± EXCLUDED.d`: the delta is the proposed row's; else an ordinary SET item.
    if let Some(NodeEnum::AExpr(e)) = val
        && let (Some(l), Some(rt)) = (node(e.lexpr.as_deref()), node(e.rexpr.as_deref()))
        && (excluded(l).is_some() || excluded(rt).is_some())
    {
        let is_self = |n: &NodeEnum| match n {
            NodeEnum::ColumnRef(c) => target.column(c).is_ok_and(|c| c == column),
            _ => false,
        };
        let op = target::binary_operator(e);
        let delta = match op {
            Some("+") if is_self(l) => excluded(rt),
            Some("+") if is_self(rt) => excluded(l),
            Some("-") if is_self(l) => excluded(rt),
            _ => None,
        }
        .ok_or(r::ON_CONFLICT_SET)?;
        let delta = ConflictValue::Excluded(delta);
        return Ok(if op == Some("-") {
            ConflictSet::Sub(delta)
        } else {
            ConflictSet::Add(delta)
        });
    }
    match target.assign(column, val) {
        Ok(Assign::Set(v)) => Ok(ConflictSet::Set(ConflictValue::Value(v))),
        Ok(Assign::Add(v)) => Ok(ConflictSet::Add(ConflictValue::Value(v))),
        Ok(Assign::Sub(v)) => Ok(ConflictSet::Sub(ConflictValue::Value(v))),
        Err(r::SET_EXPRESSION | r::COLUMN_REFERENCE) => Err(r::ON_CONFLICT_SET),
        Err(other) => Err(other),
    }
}

impl OnConflict {
    pub(super) fn heap_bytes(&self) -> usize {
        let target = match &self.target {
            ConflictTarget::Columns(cols) => cols
                .iter()
                .map(|c| size_of::<String>() + c.len())
                .sum::<usize>(),
            ConflictTarget::Constraint(name) => name.len(),
        };
        let set = self.update.as_ref().map_or(0, |set| {
            set.iter()
                .map(|(c, a)| {
                    let (ConflictSet::Set(v) | ConflictSet::Add(v) | ConflictSet::Sub(v)) = a;
                    let v = match v {
                        ConflictValue::Value(v) => v.heap_bytes(),
                        ConflictValue::Excluded(c) => c.len(),
                    };
                    size_of::<(String, ConflictSet)>() + c.len() + v
                })
                .sum::<usize>()
        });
        target + set
    }
}
