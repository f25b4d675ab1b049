//! Reading a [`Value`] out of an expression: a constant (maybe negated) or `$n`,
//! maybe under one cast whose type is rendered back to SQL text — and, when an
//! expression is not one, the reason why (subquery, function, or the caller's).
//!
//! Invariants: a constant's text is what PostgreSQL's input function would get; a
//! string constant holding a clock word (`'now'`, `'today'` …) is never a value, since
//! what it means depends on when it is coerced; a cast is rendered only when it reads
//! back as the same type (else the expression is not a value).

use pg_query::NodeEnum;
use pg_query::protobuf::{AExprKind, FuncCall, Node, SqlValueFunctionOp, TypeName, a_const};

use super::super::tree::{self, Tree};
use super::super::walk::is_time_word;
use super::reason as r;
use super::{Clock, Operand, Value};

/// A constant or `$n`, maybe cast. `otherwise` is the reason when it is neither and
/// contains no function or subquery.
pub(super) fn value(n: Option<&NodeEnum>, otherwise: &'static str) -> Result<Value, &'static str> {
    let Some(n) = n else {
        return Err(r::UNSUPPORTED);
    };
    let found = match n {
        NodeEnum::TypeCast(c) => match (operand(node(c.arg.as_deref())), &c.type_name) {
            (Some(operand), Some(type_name)) => type_name_text(type_name).map(|cast| Value {
                operand,
                cast: Some(cast),
            }),
            _ => None,
        },
        other => operand(Some(other)).map(|operand| Value {
            operand,
            cast: None,
        }),
    };
    match found {
        Some(v) if is_string_constant(n) && is_clock_word(&v.operand) => Err(r::CLOCK_LITERAL),
        Some(v) => Ok(v),
        None if matches!(n, NodeEnum::SetToDefault(_)) => Err(r::DEFAULT_VALUE),
        None => Err(diagnose(Some(n), otherwise)),
    }
}

fn is_clock_word(operand: &Operand) -> bool {
    matches!(operand, Operand::Literal(Some(text)) if is_time_word(text))
}

/// Whether `n` is a string constant (maybe cast): only those can hold `'now'`.
fn is_string_constant(n: &NodeEnum) -> bool {
    let n = match n {
        NodeEnum::TypeCast(c) => node(c.arg.as_deref()),
        other => Some(other),
    };
    matches!(n, Some(NodeEnum::AConst(c)) if matches!(c.val, Some(a_const::Val::Sval(_))))
}

fn operand(n: Option<&NodeEnum>) -> Option<Operand> {
    match n? {
        NodeEnum::AConst(c) if c.isnull => Some(Operand::Literal(None)),
        NodeEnum::AConst(c) => constant_text(c.val.as_ref()?).map(|t| Operand::Literal(Some(t))),
        NodeEnum::ParamRef(p) => u16::try_from(p.number)
            .ok()
            .filter(|n| *n > 0)
            .map(Operand::Param),
        NodeEnum::FuncCall(f) => clock_call(f).map(Operand::Clock),
        NodeEnum::SqlvalueFunction(f) => {
            let clock = match SqlValueFunctionOp::try_from(f.op).ok()? {
                SqlValueFunctionOp::SvfopCurrentTimestamp => Clock::TransactionStart,
                SqlValueFunctionOp::SvfopLocaltimestamp => Clock::LocalTimestamp,
                SqlValueFunctionOp::SvfopCurrentDate => Clock::CurrentDate,
                SqlValueFunctionOp::SvfopCurrentTime => Clock::CurrentTime,
                SqlValueFunctionOp::SvfopLocaltime => Clock::LocalTime,
                // With a precision (rounded), or the session's user, role, schema…
                _ => return None,
            };
            Some(Operand::Clock(clock))
        }
        // The grammar already folds `-5` and `-1.5` into the constant; an explicit
        // unary minus or plus over a number can still reach here.
        NodeEnum::AExpr(e) if e.kind == AExprKind::AexprOp as i32 && e.lexpr.is_none() => {
            let sign = match e.name.as_slice() {
                [only] => match only.node.as_ref() {
                    Some(NodeEnum::String(s)) => s.sval.as_str(),
                    _ => return None,
                },
                _ => return None,
            };
            let Some(NodeEnum::AConst(c)) = node(e.rexpr.as_deref()) else {
                return None;
            };
            let text = match c.val.as_ref()? {
                a_const::Val::Ival(i) => i64::from(i.ival).to_string(),
                a_const::Val::Fval(f) => f.fval.clone(),
                _ => return None,
            };
            match sign {
                "+" => Some(text),
                "-" => Some(match text.strip_prefix('-') {
                    Some(positive) => positive.to_owned(),
                    None => format!("-{text}"),
                }),
                _ => None,
            }
            .map(|t| Operand::Literal(Some(t)))
        }
        _ => None,
    }
}

/// A call of one of the [`Clock`] functions without arguments, by its bare or
/// `pg_catalog.` name: plain call syntax only (no aggregate or window decoration).
fn clock_call(f: &FuncCall) -> Option<Clock> {
    if !f.args.is_empty()
        || !f.agg_order.is_empty()
        || f.agg_filter.is_some()
        || f.over.is_some()
        || f.agg_within_group
        || f.agg_star
        || f.agg_distinct
        || f.func_variadic
    {
        return None;
    }
    let names: Vec<&str> = f
        .funcname
        .iter()
        .map(|n| match n.node.as_ref() {
            Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let name = match names.as_slice() {
        [name] | ["pg_catalog", name] => *name,
        _ => return None,
    };
    Some(match name {
        "now" | "transaction_timestamp" => Clock::TransactionStart,
        "statement_timestamp" => Clock::StatementStart,
        "clock_timestamp" => Clock::Now,
        "gen_random_uuid" => Clock::RandomUuid,
        _ => return None,
    })
}

/// The text PostgreSQL's input function would get for a constant. Bit strings
/// (`B'101'`) are typed constants whose text depends on the target type: not handled.
fn constant_text(val: &a_const::Val) -> Option<String> {
    match val {
        a_const::Val::Ival(i) => Some(i.ival.to_string()),
        a_const::Val::Fval(f) => Some(f.fval.clone()),
        a_const::Val::Boolval(b) => Some(b.boolval.to_string()),
        a_const::Val::Sval(s) => Some(s.sval.clone()),
        a_const::Val::Bsval(_) => None,
    }
}

/// Type names that are keywords in the grammar's type syntax: written unquoted they
/// would name another type (`char` is `bpchar(1)`, `"char"` is the one-byte type), so
/// a user-level name spelled like one is kept quoted.
const TYPE_KEYWORDS: [&str; 22] = [
    "bigint",
    "bit",
    "boolean",
    "char",
    "character",
    "dec",
    "decimal",
    "double",
    "float",
    "int",
    "integer",
    "interval",
    "national",
    "nchar",
    "numeric",
    "precision",
    "real",
    "setof",
    "smallint",
    "time",
    "timestamp",
    "varchar",
];

/// The type of a cast as SQL text, or `None` for forms not rendered (SETOF, %TYPE,
/// interval field modifiers, non-integer type modifiers).
fn type_name_text(t: &TypeName) -> Option<String> {
    if t.setof || t.pct_type {
        return None;
    }
    let names: Vec<&str> = t
        .names
        .iter()
        .map(|n| match n.node.as_ref() {
            Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let mut text = match names.as_slice() {
        // pg_query spells the grammar's built-in types `pg_catalog.name`; the bare
        // internal name (int4, timestamptz, bpchar …) is what users know.
        ["pg_catalog", name] => {
            // `interval '1' day` carries a field mask, not a precision, as typmod.
            if *name == "interval" && !t.typmods.is_empty() {
                return None;
            }
            (*name).to_owned()
        }
        [] => return None,
        parts => parts
            .iter()
            .map(|p| quote_ident(p))
            .collect::<Vec<_>>()
            .join("."),
    };
    if !t.typmods.is_empty() {
        let mods: Vec<String> = t
            .typmods
            .iter()
            .map(|m| match m.node.as_ref() {
                Some(NodeEnum::AConst(c)) => match &c.val {
                    Some(a_const::Val::Ival(i)) => Some(i.ival.to_string()),
                    _ => None,
                },
                _ => None,
            })
            .collect::<Option<_>>()?;
        text.push('(');
        text.push_str(&mods.join(","));
        text.push(')');
    }
    for bound in &t.array_bounds {
        match bound.node.as_ref() {
            Some(NodeEnum::Integer(i)) if i.ival < 0 => text.push_str("[]"),
            Some(NodeEnum::Integer(i)) => text.push_str(&format!("[{}]", i.ival)),
            _ => return None,
        }
    }
    Some(text)
}

/// `name` as a SQL identifier: bare when it reads back as itself, else double-quoted.
fn quote_ident(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$')
        && !TYPE_KEYWORDS.contains(&name);
    if plain {
        name.to_owned()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// Why an expression is not a value: it holds a subquery, else a function call,
/// else `otherwise`.
pub(super) fn diagnose(n: Option<&NodeEnum>, otherwise: &'static str) -> &'static str {
    let Some(Ok(tree)) = n.map(tree::of) else {
        return otherwise;
    };
    if contains(&tree, &["SubLink"]) {
        r::SUBQUERY
    } else if contains(&tree, &["FuncCall", "SqlValueFunction"]) {
        r::FUNCTION
    } else {
        otherwise
    }
}

fn contains(tree: &Tree, names: &[&str]) -> bool {
    match tree {
        Tree::Struct(name, fields) => {
            names.contains(name) || fields.iter().any(|(_, child)| contains(child, names))
        }
        Tree::Seq(items) => items.iter().any(|child| contains(child, names)),
        Tree::Str(_) | Tree::Bool(_) | Tree::Other => false,
    }
}

pub(super) fn node(n: Option<&Node>) -> Option<&NodeEnum> {
    n.and_then(|n| n.node.as_ref())
}

impl Value {
    pub(super) fn heap_bytes(&self) -> usize {
        let literal = match &self.operand {
            Operand::Literal(Some(text)) => text.len(),
            Operand::Literal(None) | Operand::Param(_) | Operand::Clock(_) => 0,
        };
        literal + self.cast.as_ref().map_or(0, String::len)
    }
}
