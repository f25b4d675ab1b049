//! Deferrable write shapes (SPEC §6): whether a top-level INSERT/UPDATE/DELETE is one
//! of the few forms the write-back / write-behind policies may journal instead of
//! running upstream, and if so its table, columns, values and key as the text gives
//! them — or, if not, one short stable reason why (a metric label).
//!
//! This module owns [`WriteShape`], its parts ([`Value`], [`Operand`], [`Assign`])
//! and the [`reason`] labels.
//!
//! Invariants:
//! - `Some(Ok)` only when every value comes from the statement text (a constant, maybe
//!   cast) or is a plain bind parameter `$n`; never a guess. Anything else — a
//!   function, a subquery, a column other than the target's own in `c = c ± v`, a
//!   date/time word such as `'now'` that reads the clock when coerced — is `Err`.
//! - A reason is always one of [`reason::ALL`]: a small fixed set, so metric labels
//!   stay bounded. When several things disqualify a statement, the first check wins:
//!   statement clauses (WITH, RETURNING, ON CONFLICT, OVERRIDING, DEFAULT VALUES,
//!   SELECT, FROM/USING, a missing WHERE, CURRENT OF), then the column list or SET
//!   list in order, then VALUES rows or WHERE conjuncts in order; inside one
//!   expression a subquery outranks a function, which outranks the structural reason.
//! - Purely textual: no catalog. Whether the key columns are the primary key, whether
//!   every key column is given, whether a SET touches a key column, and what the
//!   values' types are is for the caller, which has the catalog. Bind parameter
//!   values (which may be `'now'`, or NULL) are the caller's too.
//! - Names are as PostgreSQL folds them (pg_query already folds unquoted identifiers).
//! - A RETURNING list is accepted only when every item is a plain column of the
//!   target (optionally qualified by its name or alias, optionally renamed) or `*`;
//!   whether the statement supplies those columns' values is for the caller
//!   (`write/returning/`), which knows the table's columns.
//!
//! It is not: a validator. Statements PostgreSQL would reject (a VALUES row wider than
//! the column list, a column assigned twice) are `Err` here and left for PostgreSQL
//! to reject when the statement runs upstream.
//!
//! Layout: this file reads the statements, `target` what refers to the target table
//! (columns, deltas, key equalities), `value` reads values and casts, `reason` holds
//! the labels, `point` the equalities of a single-table SELECT (point reads).

use std::mem::size_of;

use pg_query::NodeEnum;
use pg_query::protobuf::{
    DeleteStmt, InsertStmt, Node, OverridingKind, RangeVar, ResTarget, ReturningClause, SelectStmt,
    UpdateStmt,
};

use super::RelName;
use target::Target;
use value::{node, value};

mod conflict;
pub mod point;
pub mod reason;
mod target;
mod value;

#[cfg(test)]
mod tests;

use reason as r;

/// A value the statement supplies: a constant or a bind parameter, optionally cast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value {
    pub operand: Operand,
    /// The cast's type as written, normalised the way pg_query spells it:
    /// `pg_catalog.` dropped from built-in names (`int` → "int4", `timestamp with time
    /// zone` → "timestamptz", `char(3)` → "bpchar(3)"), type modifiers and array
    /// bounds kept (`numeric(10,2)`, `int4[]`), other names quoted where SQL needs it.
    pub cast: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operand {
    /// A constant, as PostgreSQL's input function would receive it: integers, floats,
    /// strings and booleans as their text (`-5` → "-5", `1.5` → "1.5", `'x'` → "x",
    /// `true` → "true"); `None` = NULL.
    Literal(Option<String>),
    /// `$n`, 1-based.
    Param(u16),
    /// A call whose value the writer evaluates when it decides the statement, as
    /// PostgreSQL would have evaluated it then (`now()`, `CURRENT_DATE`,
    /// `gen_random_uuid()` …).
    Clock(Clock),
}

/// The clock and random-value functions a deferrable value may be (ADR 0030): each
/// without arguments or precision, called by its bare or `pg_catalog.` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    /// `now()`, `CURRENT_TIMESTAMP`, `transaction_timestamp()`: the transaction's start
    /// (timestamptz).
    TransactionStart,
    /// `statement_timestamp()`: the statement's start (timestamptz).
    StatementStart,
    /// `clock_timestamp()`: the moment it is evaluated (timestamptz).
    Now,
    /// `LOCALTIMESTAMP`: the transaction's start as a timestamp in the session's zone.
    LocalTimestamp,
    /// `CURRENT_DATE`: the transaction's start as a date in the session's zone.
    CurrentDate,
    /// `CURRENT_TIME` (timetz) and `LOCALTIME` (time): the transaction's start as a
    /// time of day in the session's zone.
    CurrentTime,
    LocalTime,
    /// `gen_random_uuid()`: a fresh version 4 uuid.
    RandomUuid,
}

/// What `SET col = …` does to the column. Add/Sub say nothing of the column's type:
/// whether deltas may be summed (numbers yes; `date + 1`, `ts + interval` …) is the
/// caller's to judge, as is a NULL delta (literal or parameter), which makes the
/// column NULL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assign {
    /// `col = v`.
    Set(Value),
    /// `col = col + v` or `col = v + col`.
    Add(Value),
    /// `col = col - v`.
    Sub(Value),
}

/// A comparison of a WHERE beyond equality (`stock > 0`), a write's guard (ADR 0035).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compare {
    Lt,
    Le,
    Gt,
    Ge,
    Ne,
}

/// The arbiter of `INSERT … ON CONFLICT`: a column list (`(a, b)`, plain columns, no
/// expression, collation, operator class or WHERE) or `ON CONSTRAINT name`. Whether it
/// is the primary key is for the caller, which has the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConflictTarget {
    Columns(Vec<String>),
    Constraint(String),
}

/// A value an `ON CONFLICT DO UPDATE SET` item reads: one the statement supplies, or
/// the row proposed for insertion (`EXCLUDED.c`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConflictValue {
    Value(Value),
    Excluded(String),
}

/// `ON CONFLICT … DO UPDATE SET col = …`: like [`Assign`], with `EXCLUDED.c` allowed
/// as the value or the delta (`c = t.c + EXCLUDED.c`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConflictSet {
    Set(ConflictValue),
    Add(ConflictValue),
    Sub(ConflictValue),
}

/// `INSERT … ON CONFLICT target DO NOTHING | DO UPDATE SET …` (no WHERE on either).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnConflict {
    pub target: ConflictTarget,
    /// `None`: DO NOTHING; else the SET list of DO UPDATE.
    pub update: Option<Vec<(String, ConflictSet)>>,
}

/// One item of an accepted RETURNING list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Returned {
    /// `*` (or `t.*`): every column of the table, in the table's order.
    All,
    /// A column of the target, answered under `name` (its alias, else the column's
    /// own name, as PostgreSQL names it).
    Column { column: String, name: String },
}

/// A deferrable INSERT/UPDATE/DELETE as its text gives it. `returning` is empty
/// without a RETURNING clause. An INSERT column given `DEFAULT` in every row is not in
/// `columns` (the same INSERT as one leaving it out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteShape {
    /// `INSERT INTO t (c1, c2, …) VALUES (…), (…) [ON CONFLICT …]`: every row as wide
    /// as `columns`.
    Insert {
        table: RelName,
        columns: Vec<String>,
        rows: Vec<Vec<Value>>,
        on_conflict: Option<OnConflict>,
        returning: Vec<Returned>,
    },
    /// `UPDATE [ONLY] t SET … WHERE k1 = v AND k2 = v`; `only` records `ONLY`
    /// (inheritance children untouched), which a rewritten statement must keep.
    /// `compared`: the WHERE's other comparisons (`AND stock > 0`); `one_of`: a
    /// conjunct `k IN (v1, v2, …)` (two values or more), the statement then writes the
    /// row of each value, `key` holding the other equalities (ADR 0038).
    Update {
        table: RelName,
        only: bool,
        set: Vec<(String, Assign)>,
        key: Vec<(String, Value)>,
        compared: Vec<(String, Compare, Value)>,
        one_of: Option<(String, Vec<Value>)>,
        returning: Vec<Returned>,
    },
    /// `DELETE FROM [ONLY] t WHERE k1 = v AND …` (`one_of` as for UPDATE).
    Delete {
        table: RelName,
        only: bool,
        key: Vec<(String, Value)>,
        compared: Vec<(String, Compare, Value)>,
        one_of: Option<(String, Vec<Value>)>,
        returning: Vec<Returned>,
    },
}

/// The shape of one top-level statement: `None` unless it is an INSERT, UPDATE or
/// DELETE.
pub(super) fn of(node: &NodeEnum) -> Option<Result<WriteShape, &'static str>> {
    match node {
        NodeEnum::InsertStmt(s) => Some(insert(s)),
        NodeEnum::UpdateStmt(s) => Some(update(s)),
        NodeEnum::DeleteStmt(s) => Some(delete(s)),
        _ => None,
    }
}

fn insert(s: &InsertStmt) -> Result<WriteShape, &'static str> {
    if s.with_clause.is_some() {
        return Err(r::WITH_CLAUSE);
    }
    let returning = returning(s.returning_clause.as_ref(), s.relation.as_ref())?;
    let target = Target::of(s.relation.as_ref())?;
    let on_conflict = match s.on_conflict_clause.as_deref() {
        None => None,
        Some(clause) => Some(conflict::on_conflict(clause, &target)?),
    };
    if s.r#override != OverridingKind::OverridingNotSet as i32 {
        return Err(r::OVERRIDING);
    }
    let select = match node(s.select_stmt.as_deref()) {
        None => return Err(r::DEFAULT_VALUES),
        Some(NodeEnum::SelectStmt(select)) if is_plain_values(select) => select,
        Some(_) => return Err(r::INSERT_SELECT),
    };
    if s.cols.is_empty() {
        return Err(r::NO_COLUMN_LIST);
    }
    let mut columns = Vec::with_capacity(s.cols.len());
    for col in &s.cols {
        let Some(NodeEnum::ResTarget(col)) = col.node.as_ref() else {
            return Err(r::UNSUPPORTED);
        };
        push_column(&mut columns, target_column(col)?)?;
    }
    let mut lists = Vec::with_capacity(select.values_lists.len());
    for row in &select.values_lists {
        let Some(NodeEnum::List(row)) = row.node.as_ref() else {
            return Err(r::UNSUPPORTED);
        };
        if row.items.len() != columns.len() {
            return Err(r::COLUMN_COUNT_MISMATCH);
        }
        lists.push(&row.items);
    }
    // A column given `DEFAULT` in every row is the same INSERT as one that leaves it
    // out (PostgreSQL fills both from the column's default): it is left out, and the
    // caller treats it as any omitted column. `DEFAULT` in only some rows is
    // [`r::DEFAULT_VALUE`].
    let is_default = |n: &Node| matches!(n.node.as_ref(), Some(NodeEnum::SetToDefault(_)));
    let keep: Vec<bool> = (0..columns.len())
        .map(|i| !lists.iter().all(|row| row.get(i).is_some_and(is_default)))
        .collect();
    let columns: Vec<String> = columns
        .into_iter()
        .zip(&keep)
        .filter_map(|(c, k)| k.then_some(c))
        .collect();
    if columns.is_empty() {
        return Err(r::DEFAULT_VALUE);
    }
    let mut rows = Vec::with_capacity(lists.len());
    for items in lists {
        let row = items
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(item, _)| value(node(Some(item)), r::EXPRESSION))
            .collect::<Result<Vec<_>, _>>()?;
        rows.push(row);
    }
    Ok(WriteShape::Insert {
        table: target.table,
        columns,
        rows,
        on_conflict,
        returning,
    })
}

fn update(s: &UpdateStmt) -> Result<WriteShape, &'static str> {
    if s.with_clause.is_some() {
        return Err(r::WITH_CLAUSE);
    }
    let returning = returning(s.returning_clause.as_ref(), s.relation.as_ref())?;
    if !s.from_clause.is_empty() {
        return Err(r::FROM_OR_USING);
    }
    let target = Target::of(s.relation.as_ref())?;
    let filter = filter(s.where_clause.as_deref())?;
    let set = set_list(&s.target_list, |column, val| target.assign(column, val))?;
    let w = target.key(filter)?;
    Ok(WriteShape::Update {
        only: target.only,
        table: target.table,
        set,
        key: w.key,
        compared: w.compared,
        one_of: w.one_of,
        returning,
    })
}

fn delete(s: &DeleteStmt) -> Result<WriteShape, &'static str> {
    if s.with_clause.is_some() {
        return Err(r::WITH_CLAUSE);
    }
    let returning = returning(s.returning_clause.as_ref(), s.relation.as_ref())?;
    if !s.using_clause.is_empty() {
        return Err(r::FROM_OR_USING);
    }
    let target = Target::of(s.relation.as_ref())?;
    let w = target.key(filter(s.where_clause.as_deref())?)?;
    Ok(WriteShape::Delete {
        only: target.only,
        table: target.table,
        key: w.key,
        compared: w.compared,
        one_of: w.one_of,
        returning,
    })
}

/// The items of a RETURNING clause, when each is `*` or a plain column of the target;
/// anything else (an expression, a function, `old.`/`new.` or `WITH (OLD AS …)`) is
/// [`r::RETURNING`].
fn returning(
    clause: Option<&ReturningClause>,
    rel: Option<&RangeVar>,
) -> Result<Vec<Returned>, &'static str> {
    let Some(clause) = clause else {
        return Ok(Vec::new());
    };
    if !clause.options.is_empty() || clause.exprs.is_empty() {
        return Err(r::RETURNING);
    }
    let target = Target::of(rel).map_err(|_| r::RETURNING)?;
    let mut out = Vec::with_capacity(clause.exprs.len());
    for item in &clause.exprs {
        let Some(NodeEnum::ResTarget(item)) = item.node.as_ref() else {
            return Err(r::RETURNING);
        };
        if !item.indirection.is_empty() {
            return Err(r::RETURNING);
        }
        let Some(NodeEnum::ColumnRef(col)) = node(item.val.as_deref()) else {
            return Err(r::RETURNING);
        };
        // `old` and `new` name the row before and after the write (PostgreSQL 18),
        // whatever the table is called.
        let qualified_old_new = col.fields.len() > 1
            && matches!(
                col.fields.first().and_then(|f| f.node.as_ref()),
                Some(NodeEnum::String(s)) if s.sval == "old" || s.sval == "new"
            );
        if qualified_old_new {
            return Err(r::RETURNING);
        }
        let star = matches!(
            col.fields.last().and_then(|f| f.node.as_ref()),
            Some(NodeEnum::AStar(_))
        );
        if star {
            let qualifier_ok = match col.fields.as_slice() {
                [_] => true,
                [q, _] => match (q.node.as_ref(), target.alias) {
                    (Some(NodeEnum::String(q)), Some(alias)) => q.sval == alias,
                    (Some(NodeEnum::String(q)), None) => q.sval == target.table.name,
                    _ => false,
                },
                _ => false,
            };
            if !qualifier_ok {
                return Err(r::RETURNING);
            }
            out.push(Returned::All);
            continue;
        }
        let column = target.column(col).map_err(|_| r::RETURNING)?;
        let name = if item.name.is_empty() {
            column.to_owned()
        } else {
            item.name.clone()
        };
        out.push(Returned::Column {
            column: column.to_owned(),
            name,
        });
    }
    Ok(out)
}

/// The WHERE of an UPDATE/DELETE, which must exist and not be `CURRENT OF`.
fn filter(where_clause: Option<&Node>) -> Result<&NodeEnum, &'static str> {
    match node(where_clause) {
        None => Err(r::NO_WHERE),
        Some(NodeEnum::CurrentOfExpr(_)) => Err(r::CURRENT_OF),
        Some(filter) => Ok(filter),
    }
}

/// The name of an INSERT column or SET target, which must be a plain column.
/// An UPDATE's (or a DO UPDATE's) SET list, each item made an assignment by `assign`
/// from its column and value: no multiple assignment, no column twice.
fn set_list<A>(
    list: &[pg_query::Node],
    mut assign: impl FnMut(&str, Option<&NodeEnum>) -> Result<A, &'static str>,
) -> Result<Vec<(String, A)>, &'static str> {
    let mut set: Vec<(String, A)> = Vec::with_capacity(list.len());
    for item in list {
        let Some(NodeEnum::ResTarget(item)) = item.node.as_ref() else {
            return Err(r::UNSUPPORTED);
        };
        let column = target_column(item)?;
        let val = node(item.val.as_deref());
        if matches!(val, Some(NodeEnum::MultiAssignRef(_))) {
            return Err(r::MULTIPLE_ASSIGNMENT);
        }
        let assigned = assign(&column, val)?;
        if set.iter().any(|(c, _)| *c == column) {
            return Err(r::DUPLICATE_COLUMN);
        }
        set.push((column, assigned));
    }
    Ok(set)
}

fn target_column(target: &ResTarget) -> Result<String, &'static str> {
    if !target.indirection.is_empty() {
        return Err(r::INDIRECTION);
    }
    if target.name.is_empty() {
        return Err(r::UNSUPPORTED);
    }
    Ok(target.name.clone())
}

fn push_column(columns: &mut Vec<String>, column: String) -> Result<(), &'static str> {
    if columns.contains(&column) {
        return Err(r::DUPLICATE_COLUMN);
    }
    columns.push(column);
    Ok(())
}

/// A SELECT that is only `VALUES (…), (…)`: no ORDER BY, LIMIT, set operation, WITH…
fn is_plain_values(s: &SelectStmt) -> bool {
    !s.values_lists.is_empty()
        && s.larg.is_none()
        && s.rarg.is_none()
        && s.with_clause.is_none()
        && s.into_clause.is_none()
        && s.sort_clause.is_empty()
        && s.limit_offset.is_none()
        && s.limit_count.is_none()
        && s.locking_clause.is_empty()
        && s.target_list.is_empty()
        && s.from_clause.is_empty()
        && s.where_clause.is_none()
        && s.group_clause.is_empty()
        && s.having_clause.is_none()
        && s.window_clause.is_empty()
        && s.distinct_clause.is_empty()
}

impl WriteShape {
    /// The RETURNING list (empty without one).
    pub fn returning(&self) -> &[Returned] {
        match self {
            Self::Insert { returning, .. }
            | Self::Update { returning, .. }
            | Self::Delete { returning, .. } => returning,
        }
    }

    pub fn table(&self) -> &RelName {
        match self {
            Self::Insert { table, .. }
            | Self::Update { table, .. }
            | Self::Delete { table, .. } => table,
        }
    }

    /// Approximate heap bytes (the inline part is counted by the owner), for the
    /// classifier memo's weigher.
    pub(super) fn heap_bytes(&self) -> usize {
        let rel = |t: &RelName| t.name.len() + t.schema.as_ref().map_or(0, String::len);
        let named = |list: &[(String, Value)]| {
            list.iter()
                .map(|(c, v)| size_of::<(String, Value)>() + c.len() + v.heap_bytes())
                .sum::<usize>()
        };
        let compared = |list: &[(String, Compare, Value)]| {
            list.iter()
                .map(|(c, _, v)| size_of::<(String, Compare, Value)>() + c.len() + v.heap_bytes())
                .sum::<usize>()
        };
        let one_of = |list: &Option<(String, Vec<Value>)>| {
            list.as_ref().map_or(0, |(c, values)| {
                c.len()
                    + values
                        .iter()
                        .map(|v| size_of::<Value>() + v.heap_bytes())
                        .sum::<usize>()
            })
        };
        let returned = |list: &[Returned]| {
            list.iter()
                .map(|item| {
                    size_of::<Returned>()
                        + match item {
                            Returned::All => 0,
                            Returned::Column { column, name } => column.len() + name.len(),
                        }
                })
                .sum::<usize>()
        };
        match self {
            Self::Insert {
                table,
                columns,
                rows,
                on_conflict,
                returning,
            } => {
                rel(table)
                    + returned(returning)
                    + on_conflict.as_ref().map_or(0, OnConflict::heap_bytes)
                    + columns
                        .iter()
                        .map(|c| size_of::<String>() + c.len())
                        .sum::<usize>()
                    + rows
                        .iter()
                        .map(|row| {
                            size_of::<Vec<Value>>()
                                + row
                                    .iter()
                                    .map(|v| size_of::<Value>() + v.heap_bytes())
                                    .sum::<usize>()
                        })
                        .sum::<usize>()
            }
            Self::Update {
                table,
                set,
                key,
                compared: cmp,
                one_of: any,
                returning,
                ..
            } => {
                rel(table)
                    + returned(returning)
                    + named(key)
                    + compared(cmp)
                    + one_of(any)
                    + set
                        .iter()
                        .map(|(c, a)| {
                            let (Assign::Set(v) | Assign::Add(v) | Assign::Sub(v)) = a;
                            size_of::<(String, Assign)>() + c.len() + v.heap_bytes()
                        })
                        .sum::<usize>()
            }
            Self::Delete {
                table,
                key,
                compared: cmp,
                one_of: any,
                returning,
                ..
            } => rel(table) + named(key) + compared(cmp) + one_of(any) + returned(returning),
        }
    }
}
