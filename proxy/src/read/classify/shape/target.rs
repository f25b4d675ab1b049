//! The target relation of a write and what refers to it: its columns as a SET item
//! or a WHERE conjunct names them (plain, or qualified by the table, its alias or its
//! schema), `SET c = c ± v` deltas, and the key equalities of a WHERE clause.
//!
//! Invariant: a reference is the target's column only when PostgreSQL would resolve
//! it to that column without the catalog (an alias hides the table's name); anything
//! else is a [`super::reason`] label, never a guess.

use pg_query::NodeEnum;
use pg_query::protobuf::{AExpr, AExprKind, BoolExprType, ColumnRef, RangeVar};

use super::super::RelName;
use super::reason as r;
use super::value::{diagnose, node, value};
use super::{Assign, Compare, Operand, Value};

/// The target relation and the names its columns may be qualified with.
pub(super) struct Target<'a> {
    pub(super) table: RelName,
    /// `UPDATE t AS x`: then only `x.col` (or plain `col`) refers to it, as in
    /// PostgreSQL, where the alias hides the table's name.
    pub(super) alias: Option<&'a str>,
    schema: &'a str,
    pub(super) only: bool,
}

impl<'a> Target<'a> {
    pub(super) fn of(rel: Option<&'a RangeVar>) -> Result<Self, &'static str> {
        let rel = rel
            .filter(|r| !r.relname.is_empty())
            .ok_or(r::UNSUPPORTED)?;
        Ok(Self {
            table: RelName::new(Some(&rel.schemaname), &rel.relname),
            alias: rel
                .alias
                .as_ref()
                .map(|a| a.aliasname.as_str())
                .filter(|a| !a.is_empty()),
            schema: &rel.schemaname,
            only: !rel.inh,
        })
    }

    /// The column a reference names, if it names one of the target's columns.
    pub(super) fn column<'n>(&self, col: &'n ColumnRef) -> Result<&'n str, &'static str> {
        let mut parts = Vec::with_capacity(col.fields.len());
        for field in &col.fields {
            match field.node.as_ref() {
                Some(NodeEnum::String(s)) => parts.push(s.sval.as_str()),
                // `t.*` and anything else is not one column.
                _ => return Err(r::COLUMN_REFERENCE),
            }
        }
        let qualifier_ok = |q: &str| match self.alias {
            Some(alias) => q == alias,
            None => q == self.table.name,
        };
        match parts.as_slice() {
            [name] => Ok(name),
            [q, name] if qualifier_ok(q) => Ok(name),
            // `schema.table.col` only when the target was written with that schema:
            // matching an unqualified target would need the search_path.
            [s, q, name] if self.alias.is_none() && !self.schema.is_empty() => {
                if *s == self.schema && *q == self.table.name {
                    Ok(name)
                } else {
                    Err(r::COLUMN_REFERENCE)
                }
            }
            _ => Err(r::COLUMN_REFERENCE),
        }
    }

    /// `SET column = val`: a value, or the column plus/minus a value.
    pub(super) fn assign(
        &self,
        column: &str,
        val: Option<&NodeEnum>,
    ) -> Result<Assign, &'static str> {
        match value(val, r::SET_EXPRESSION) {
            Err(r::SET_EXPRESSION) => {}
            plain => return plain.map(Assign::Set),
        }
        let Some(NodeEnum::AExpr(e)) = val else {
            return Err(r::SET_EXPRESSION);
        };
        let (Some(op), Some(left), Some(right)) = (
            binary_operator(e),
            node(e.lexpr.as_deref()),
            node(e.rexpr.as_deref()),
        ) else {
            return Err(diagnose(val, r::SET_EXPRESSION));
        };
        let is_self = |n: &NodeEnum| -> Result<bool, &'static str> {
            match n {
                NodeEnum::ColumnRef(c) => Ok(self.column(c)? == column),
                _ => Ok(false),
            }
        };
        // `c - v`, `c + v` and `v + c`; never `v - c`, which is not a delta.
        let (delta, add) = match op {
            "+" if is_self(left)? => (right, true),
            "+" if is_self(right)? => (left, true),
            "-" if is_self(left)? => (right, false),
            _ => return Err(diagnose(val, r::SET_EXPRESSION)),
        };
        let delta = value(Some(delta), r::SET_EXPRESSION)?;
        Ok(if add {
            Assign::Add(delta)
        } else {
            Assign::Sub(delta)
        })
    }

    /// The key of `WHERE k1 = v AND k2 = v …` (ANDs nested any way, either side order),
    /// and the comparisons `c < v`, `c <= v`, `c > v`, `c >= v`, `c <> v` among the
    /// conjuncts (a guard, ADR 0035: whether `c` is a key column is the caller's).
    /// One conjunct may be `col IN (v1, v2, …)` with two values or more (`one_of`): the
    /// statement then writes the row of each value (whether `col` completes the key is
    /// the caller's).
    pub(super) fn key(&self, filter: &NodeEnum) -> Result<WhereParts, &'static str> {
        let mut conjuncts = Vec::new();
        flatten_and(filter, &mut conjuncts);
        let mut key: Vec<(String, Value)> = Vec::with_capacity(conjuncts.len());
        let mut compared: Vec<(String, Compare, Value)> = Vec::new();
        let mut one_of: Option<(String, Vec<Value>)> = None;
        for conjunct in conjuncts {
            if let Some(c) = self.comparison(conjunct)? {
                compared.push(c);
                continue;
            }
            if let Some((column, values)) = self.in_list(conjunct)? {
                if one_of.is_some() {
                    return Err(r::WHERE_NOT_KEY_EQUALITY);
                }
                one_of = Some((column.to_owned(), values));
                continue;
            }
            let (column, val) = self.equality(conjunct)?;
            if key.iter().any(|(c, _)| c == column) {
                return Err(r::DUPLICATE_COLUMN);
            }
            if val.operand == Operand::Literal(None) {
                return Err(r::NULL_KEY);
            }
            key.push((column.to_owned(), val));
        }
        if let Some((column, _)) = &one_of
            && key.iter().any(|(c, _)| c == column)
        {
            return Err(r::DUPLICATE_COLUMN);
        }
        Ok(WhereParts {
            key,
            compared,
            one_of,
        })
    }

    /// `col IN (v1, v2, …)` with at least two values, each a constant or a parameter
    /// (never NULL); `None` for any other conjunct. PostgreSQL reads it as `col = ANY
    /// (ARRAY[v1, v2, …])` with the elements' common type: for the key types spillway
    /// defers (integers, text, uuid; `convert` checks each value against the column)
    /// every element compares with the column as `col = vi` would.
    fn in_list<'n>(
        &self,
        conjunct: &'n NodeEnum,
    ) -> Result<Option<(&'n str, Vec<Value>)>, &'static str> {
        let NodeEnum::AExpr(e) = conjunct else {
            return Ok(None);
        };
        let Some(items) = in_items(e).filter(|items| items.len() >= 2) else {
            return Ok(None);
        };
        let Some(NodeEnum::ColumnRef(col)) = node(e.lexpr.as_deref()) else {
            return Err(r::WHERE_NOT_KEY_EQUALITY);
        };
        let column = self.column(col)?;
        let mut values = Vec::with_capacity(items.len());
        for item in items {
            let val = value(node(Some(item)), r::WHERE_NOT_KEY_EQUALITY)?;
            if val.operand == Operand::Literal(None) {
                return Err(r::NULL_KEY);
            }
            values.push(val);
        }
        Ok(Some((column, values)))
    }

    /// `col op value` with `op` one of `<`, `<=`, `>`, `>=`, `<>` (the column on the
    /// left: `v < c` is not taken), its value a constant or a parameter (never NULL, a
    /// clock, or an expression); `None` for any other conjunct.
    fn comparison(
        &self,
        conjunct: &NodeEnum,
    ) -> Result<Option<(String, Compare, Value)>, &'static str> {
        let NodeEnum::AExpr(e) = conjunct else {
            return Ok(None);
        };
        let cmp = match binary_operator(e) {
            Some("<") => Compare::Lt,
            Some("<=") => Compare::Le,
            Some(">") => Compare::Gt,
            Some(">=") => Compare::Ge,
            Some("<>") => Compare::Ne,
            _ => return Ok(None),
        };
        let (Some(NodeEnum::ColumnRef(col)), Some(other)) =
            (node(e.lexpr.as_deref()), node(e.rexpr.as_deref()))
        else {
            return Err(diagnose(Some(conjunct), r::WHERE_NOT_KEY_EQUALITY));
        };
        if matches!(other, NodeEnum::ColumnRef(_)) {
            return Err(r::WHERE_NOT_KEY_EQUALITY);
        }
        let column = self.column(col)?;
        let val = value(Some(other), r::WHERE_NOT_KEY_EQUALITY)?;
        match val.operand {
            Operand::Clock(_) => Err(r::FUNCTION),
            Operand::Literal(None) => Err(r::WHERE_NOT_KEY_EQUALITY),
            _ => Ok(Some((column.to_owned(), cmp, val))),
        }
    }

    /// One `col = value` (or `value = col`) conjunct, or `col IN (value)` with one
    /// value, which PostgreSQL's parser turns into that same `=` (`transformAExprIn`
    /// builds the operator of `col = value` for a lone element).
    pub(super) fn equality<'n>(
        &self,
        conjunct: &'n NodeEnum,
    ) -> Result<(&'n str, Value), &'static str> {
        let not_key = || diagnose(Some(conjunct), r::WHERE_NOT_KEY_EQUALITY);
        let NodeEnum::AExpr(e) = conjunct else {
            return Err(not_key());
        };
        if let Some(single) = in_one(e) {
            let Some(NodeEnum::ColumnRef(col)) = node(e.lexpr.as_deref()) else {
                return Err(not_key());
            };
            let column = self.column(col)?;
            let val = value(Some(single), r::WHERE_NOT_KEY_EQUALITY)?;
            return Ok((column, val));
        }
        let (Some("="), Some(left), Some(right)) = (
            binary_operator(e),
            node(e.lexpr.as_deref()),
            node(e.rexpr.as_deref()),
        ) else {
            return Err(not_key());
        };
        let (col, other) = match (left, right) {
            (NodeEnum::ColumnRef(_), NodeEnum::ColumnRef(_)) => return Err(not_key()),
            (NodeEnum::ColumnRef(c), other) | (other, NodeEnum::ColumnRef(c)) => (c, other),
            _ => return Err(not_key()),
        };
        let column = self.column(col)?;
        let val = value(Some(other), r::WHERE_NOT_KEY_EQUALITY)?;
        Ok((column, val))
    }
}

/// A WHERE's key equalities, its comparisons, and its `col IN (…)` list if any.
pub(super) struct WhereParts {
    pub(super) key: Vec<(String, Value)>,
    pub(super) compared: Vec<(String, Compare, Value)>,
    pub(super) one_of: Option<(String, Vec<Value>)>,
}

/// `c1 AND (c2 AND c3)` → `[c1, c2, c3]`; anything else is one conjunct.
pub(super) fn flatten_and<'n>(filter: &'n NodeEnum, out: &mut Vec<&'n NodeEnum>) {
    match filter {
        NodeEnum::BoolExpr(b) if b.boolop == BoolExprType::AndExpr as i32 => {
            for arg in &b.args {
                match arg.node.as_ref() {
                    Some(arg) => flatten_and(arg, out),
                    None => out.push(filter),
                }
            }
        }
        other => out.push(other),
    }
}

/// The one element of `l IN (element)` (not `NOT IN`, whose operator is `<>`).
fn in_one(e: &AExpr) -> Option<&NodeEnum> {
    match in_items(e)? {
        [item] => item.node.as_ref(),
        _ => None,
    }
}

/// The elements of `l IN (…)` (not `NOT IN`, whose operator is `<>`).
fn in_items(e: &AExpr) -> Option<&[pg_query::Node]> {
    if e.kind != AExprKind::AexprIn as i32 || e.lexpr.is_none() {
        return None;
    }
    let [only] = e.name.as_slice() else {
        return None;
    };
    if !matches!(only.node.as_ref(), Some(NodeEnum::String(s)) if s.sval == "=") {
        return None;
    }
    match node(e.rexpr.as_deref()) {
        Some(NodeEnum::List(list)) => Some(&list.items),
        _ => None,
    }
}

/// The operator of a plain binary `l op r` (unqualified, both operands present).
pub(super) fn binary_operator(e: &AExpr) -> Option<&str> {
    if e.kind != AExprKind::AexprOp as i32 || e.lexpr.is_none() || e.rexpr.is_none() {
        return None;
    }
    match e.name.as_slice() {
        [only] => match only.node.as_ref() {
            Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
            _ => None,
        },
        _ => None,
    }
}
