//! Point reads: a top-level SELECT from exactly one table whose WHERE has `col =
//! value` conjuncts (a constant or a bind parameter, maybe cast). Whether those
//! columns are the table's whole primary key, and whether the values have a canonical
//! key text, is for the caller, which has the catalog and the parameters.
//!
//! Invariant: a [`PointFilter`] is returned only when the statement's result can
//! depend on no row but those its equalities select: one FROM item, a plain table
//! reference, no set operation, no WITH, and (checked by the caller from the whole
//! tree: `analyze.rs`) no subquery and no second table reference anywhere. Conjuncts
//! that are not such equalities only narrow the result further and are ignored.

use pg_query::NodeEnum;

use super::super::RelName;
use super::target::{Target, flatten_and};
use super::value::node;
use super::{Operand, Value};

/// The table a point read reads and its `col = value` conjuncts (each column once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointFilter {
    pub table: RelName,
    pub equalities: Vec<(String, Value)>,
    /// The columns the result is, in order, when every output is a plain column of
    /// the table and nothing but the equalities decides whether the row is in it (no
    /// other conjunct, DISTINCT, GROUP BY, HAVING, window or locking clause): what an
    /// overlaid read maps its row's fields by (ADR 0039). `None` otherwise.
    pub outputs: Option<Vec<String>>,
}

impl PointFilter {
    /// Approximate heap bytes, for the classifier memo's weigher.
    pub(in super::super) fn heap_bytes(&self) -> usize {
        self.table.name.len()
            + self.table.schema.as_ref().map_or(0, String::len)
            + self
                .outputs
                .iter()
                .flatten()
                .map(|c| std::mem::size_of::<String>() + c.len())
                .sum::<usize>()
            + self
                .equalities
                .iter()
                .map(|(c, v)| std::mem::size_of::<(String, Value)>() + c.len() + v.heap_bytes())
                .sum::<usize>()
    }
}

/// The point filter of a SELECT statement's top node, if it has the form.
pub(in super::super) fn of(top: &NodeEnum) -> Option<PointFilter> {
    let NodeEnum::SelectStmt(s) = top else {
        return None;
    };
    if s.larg.is_some()
        || s.rarg.is_some()
        || s.with_clause.is_some()
        || s.into_clause.is_some()
        || !s.values_lists.is_empty()
    {
        return None;
    }
    let [from] = s.from_clause.as_slice() else {
        return None;
    };
    let Some(NodeEnum::RangeVar(rel)) = from.node.as_ref() else {
        return None;
    };
    let target = Target::of(Some(rel)).ok()?;
    let filter = node(s.where_clause.as_deref())?;
    let mut conjuncts = Vec::new();
    flatten_and(filter, &mut conjuncts);
    let mut equalities: Vec<(String, Value)> = Vec::new();
    let mut only_equalities = true;
    for conjunct in conjuncts {
        let Ok((column, value)) = target.equality(conjunct) else {
            only_equalities = false;
            continue;
        };
        // `col = NULL` selects nothing; a second equality on a column only narrows.
        // `col = now()` changes with the clock: not a key a read can be filed under.
        if value.operand == Operand::Literal(None)
            || matches!(value.operand, Operand::Clock(_))
            || equalities.iter().any(|(c, _)| c == column)
        {
            only_equalities = false;
            continue;
        }
        equalities.push((column.to_owned(), value));
    }
    let plain = only_equalities
        && s.distinct_clause.is_empty()
        && s.group_clause.is_empty()
        && s.having_clause.is_none()
        && s.window_clause.is_empty()
        && s.locking_clause.is_empty();
    let outputs = if plain { outputs(&target, s) } else { None };
    (!equalities.is_empty()).then_some(PointFilter {
        table: target.table,
        equalities,
        outputs,
    })
}

/// The target list as plain columns of `target`, if it is one.
fn outputs(target: &Target<'_>, s: &pg_query::protobuf::SelectStmt) -> Option<Vec<String>> {
    s.target_list
        .iter()
        .map(|t| match t.node.as_ref() {
            Some(NodeEnum::ResTarget(r)) => match r.val.as_ref().and_then(|v| v.node.as_ref()) {
                Some(NodeEnum::ColumnRef(c)) => target.column(c).ok().map(str::to_owned),
                _ => None,
            },
            _ => None,
        })
        .collect()
}
