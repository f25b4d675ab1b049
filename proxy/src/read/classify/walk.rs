//! The exhaustive walk over one statement's [`Tree`]: which relations it reads,
//! writes or defines, which functions it calls, and whether it locks rows, uses a
//! SQL value function or contains a data-modifying statement.
//!
//! Invariants:
//! - Every node is visited (the tree mirrors every protobuf field) except the bodies
//!   that do not run when the statement runs: `CREATE RULE` actions and `BEGIN
//!   ATOMIC` function bodies. `FOR UPDATE OF name` lists are skipped too: they name
//!   FROM items (possibly aliases) that are already counted.
//! - A relation's role comes from where it sits: the target of INSERT/UPDATE/DELETE/
//!   MERGE is written, an `INTO` target is defined, anything inside a query is read,
//!   and anything outside a query takes the statement's `top_role` (TRUNCATE and COPY
//!   FROM write, DDL defines, the rest read).
//! - CTE names are scoped like PostgreSQL does: visible in the statement carrying the
//!   WITH, in later sibling CTEs, and in all of them when RECURSIVE. Only unqualified
//!   reads are matched against them; a real table is never dropped from `reads`
//!   because a CTE of the same name exists elsewhere.

use super::tree::{Tree, field};
use super::{FuncName, RelName};

/// What a relation found outside any query means for the statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RelRole {
    Read,
    Write,
    Define,
}

/// What the walk found; duplicates are dropped, first-seen order kept.
#[derive(Debug, Default)]
pub(super) struct Facts {
    pub reads: Vec<RelName>,
    pub writes: Vec<RelName>,
    pub ddl_targets: Vec<RelName>,
    pub functions: Vec<FuncName>,
    /// Per `set_config()` call: the setting it names, lowercase, when that is a
    /// string constant.
    pub set_config: Vec<Option<String>>,
    pub sql_value_function: bool,
    pub locking: bool,
    /// An INSERT/UPDATE/DELETE/MERGE appears somewhere (top level or nested).
    pub dml: bool,
}

/// Walks `tree` (one statement) and returns what it found.
pub(super) fn collect(tree: &Tree, top_role: RelRole) -> Facts {
    let mut walker = Walker {
        ctes: Vec::new(),
        in_query: false,
        top_role,
        facts: Facts::default(),
    };
    walker.walk(tree, None);
    walker.facts
}

struct Walker<'t> {
    /// CTE names visible at this point of the walk (a stack: truncated on leaving).
    ctes: Vec<&'t str>,
    /// Inside a SELECT/INSERT/UPDATE/DELETE/MERGE (whose relations are read unless
    /// they are its target).
    in_query: bool,
    top_role: RelRole,
    facts: Facts,
}

const QUERY_NODES: [&str; 5] = [
    "SelectStmt",
    "InsertStmt",
    "UpdateStmt",
    "DeleteStmt",
    "MergeStmt",
];
const DML_NODES: [&str; 4] = ["InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"];

/// String constants that date/time input turns into the current date or time.
const TIME_WORDS: [&str; 4] = ["now", "today", "tomorrow", "yesterday"];

impl<'t> Walker<'t> {
    /// `role` is set when the parent field says what a relation right here means.
    fn walk(&mut self, tree: &'t Tree, role: Option<RelRole>) {
        match tree {
            Tree::Seq(items) => items.iter().for_each(|item| self.walk(item, role)),
            Tree::Struct(name, fields) => self.walk_struct(name, fields, role),
            Tree::Str(_) | Tree::Bool(_) | Tree::Other => {}
        }
    }

    fn walk_struct(
        &mut self,
        name: &'static str,
        fields: &'t [(&'static str, Tree)],
        role: Option<RelRole>,
    ) {
        match name {
            "RangeVar" => return self.relation(fields, role),
            // Row locks name FROM items (maybe aliases) that are counted elsewhere.
            "LockingClause" => {
                self.facts.locking = true;
                return;
            }
            "FuncCall" => {
                self.function(field(fields, "funcname"));
                self.set_config(fields);
            }
            // TABLESAMPLE methods are functions too (BERNOULLI/SYSTEM are volatile).
            "RangeTableSample" => self.function(field(fields, "method")),
            "SqlValueFunction" => self.facts.sql_value_function = true,
            "AConst"
                if field(fields, "val")
                    .and_then(|v| v.field("sval"))
                    .and_then(Tree::as_str)
                    .is_some_and(is_time_word) =>
            {
                self.facts.sql_value_function = true;
            }
            _ => {}
        }
        let is_dml = DML_NODES.contains(&name);
        self.facts.dml |= is_dml;
        let outer_in_query = self.in_query;
        self.in_query |= QUERY_NODES.contains(&name);
        let outer_ctes = self.ctes.len();
        if let Some(with) = field(fields, "with_clause") {
            self.with_clause(with);
        }
        for (field_name, child) in fields {
            if *field_name == "with_clause" || not_run(name, field_name) {
                continue;
            }
            let child_role = match (*field_name, name) {
                ("relation", _) if is_dml => Some(RelRole::Write),
                ("rel", "IntoClause") => Some(RelRole::Define),
                _ => None,
            };
            self.walk(child, child_role);
        }
        self.ctes.truncate(outer_ctes);
        self.in_query = outer_in_query;
    }

    /// Pushes the WITH's CTE names (left on the stack for the statement's body; the
    /// caller truncates) and walks the CTE bodies, each seeing the names PostgreSQL
    /// lets it see.
    fn with_clause(&mut self, with: &'t Tree) {
        let recursive = matches!(with.field("recursive"), Some(Tree::Bool(true)));
        let Some(Tree::Seq(ctes)) = with.field("ctes") else {
            return self.walk(with, None);
        };
        let name_of = |cte: &'t Tree| cte.field("ctename").and_then(Tree::as_str);
        if recursive {
            self.ctes.extend(ctes.iter().filter_map(name_of));
        }
        for cte in ctes {
            self.walk(cte, None);
            if !recursive {
                self.ctes.extend(name_of(cte));
            }
        }
    }

    fn relation(&mut self, fields: &'t [(&'static str, Tree)], role: Option<RelRole>) {
        let text = |name| {
            field(fields, name)
                .and_then(Tree::as_str)
                .unwrap_or_default()
        };
        let (schema, name) = (text("schemaname"), text("relname"));
        if name.is_empty() {
            return;
        }
        let role = role.unwrap_or(if self.in_query {
            RelRole::Read
        } else {
            self.top_role
        });
        if role == RelRole::Read && schema.is_empty() && self.ctes.contains(&name) {
            return;
        }
        let list = match role {
            RelRole::Read => &mut self.facts.reads,
            RelRole::Write => &mut self.facts.writes,
            RelRole::Define => &mut self.facts.ddl_targets,
        };
        push_unique(list, RelName::new(Some(schema), name));
    }

    /// Records a function named by a list of `String` nodes (`[catalog.]schema.name`).
    /// A FuncCall that may be `set_config(name, …)`: notes the setting it names.
    fn set_config(&mut self, fields: &'t [(&'static str, Tree)]) {
        let names: Vec<&str> = match field(fields, "funcname") {
            Some(Tree::Seq(parts)) => parts
                .iter()
                .filter_map(|p| p.field("sval").and_then(Tree::as_str))
                .collect(),
            _ => return,
        };
        if !matches!(
            names.as_slice(),
            ["set_config"] | ["pg_catalog", "set_config"]
        ) {
            return;
        }
        let setting = match field(fields, "args") {
            Some(Tree::Seq(args)) => args
                .first()
                .and_then(|a| a.field("val"))
                .and_then(|v| v.field("sval"))
                .and_then(Tree::as_str)
                .map(str::to_ascii_lowercase),
            _ => None,
        };
        self.facts.set_config.push(setting);
    }

    fn function(&mut self, names: Option<&'t Tree>) {
        let Some(Tree::Seq(parts)) = names else {
            return;
        };
        let parts: Vec<&str> = parts
            .iter()
            .filter_map(|p| p.field("sval").and_then(Tree::as_str))
            .collect();
        let func = match parts.as_slice() {
            [] => return,
            [name] => FuncName::new(None, name),
            [.., schema, name] => FuncName::new(Some(schema), name),
        };
        push_unique(&mut self.facts.functions, func);
    }
}

/// Fields whose subtree does not run when the statement runs.
fn not_run(node: &str, field: &str) -> bool {
    matches!(
        (node, field),
        ("RuleStmt", "actions") | ("CreateFunctionStmt", "sql_body")
    )
}

/// `'now'`, `'today 12:00'`, `'tomorrow'` …: any alphabetic word of the literal is one
/// of the date/time input words that read the clock.
pub(super) fn is_time_word(literal: &str) -> bool {
    literal
        .split(|c: char| !c.is_ascii_alphabetic())
        .any(|word| TIME_WORDS.iter().any(|t| word.eq_ignore_ascii_case(t)))
}

pub(super) fn push_unique<T: PartialEq>(list: &mut Vec<T>, item: T) {
    if !list.contains(&item) {
        list.push(item);
    }
}
