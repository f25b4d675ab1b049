//! Parsing a query string with pg_query and mapping each of its statements to a
//! [`Statement`]: the [`Kind`] from the statement's top node (typed), the relations,
//! functions and flags from an exhaustive walk of its tree (`walk`).
//!
//! Invariants: a node type not listed here is [`Kind::Unknown`]; a `Select` or
//! `OtherRead` that turns out to contain INSERT/UPDATE/DELETE/MERGE becomes `Write`;
//! a parse failure — or any surprise while reading the tree — makes the whole string
//! `unanalysed`, never a partial analysis.

use pg_query::protobuf::{self, DiscardMode, DropBehavior, ObjectType, RangeVar};
use pg_query::{NodeEnum, ParserOptions};

use super::tree::{self, TreeError};
use super::walk::{self, RelRole, push_unique};
use super::{Analysis, DiscardTarget, Kind, RelName, SessionCommand, Statement, commands, shape};

/// Parses `sql` (which may hold several statements) and classifies each statement.
/// Never fails: what cannot be analysed is [`Analysis::unanalysed`].
pub fn analyze(sql: &str) -> Analysis {
    // pg_query's `ParseResult::new` post-processes the tree with panicking casts; a
    // surprise there must cost this query its analysis, not the session worker.
    let parsed = std::panic::catch_unwind(|| pg_query::parse(sql, ParserOptions::DEFAULT));
    let Ok(Ok(parsed)) = parsed else {
        return Analysis::unanalysed();
    };
    let raw = &parsed.protobuf.stmts;
    if raw.is_empty() {
        return Analysis {
            statements: vec![Statement::new(Kind::Empty)],
            unanalysed: false,
        };
    }
    let statements: Result<Vec<Statement>, TreeError> = raw
        .iter()
        .map(|r| match r.stmt.as_ref().and_then(|n| n.node.as_ref()) {
            Some(node) => statement(node),
            None => Ok(Statement::new(Kind::Unknown)),
        })
        .collect();
    match statements {
        Ok(statements) => Analysis {
            statements,
            unanalysed: false,
        },
        Err(_) => Analysis::unanalysed(),
    }
}

/// What the top node alone says about a statement.
struct Plan {
    kind: Kind,
    /// Whether to walk the tree for relations and functions (not for statements
    /// whose subtree does not run now, like PREPARE, or that have none, like SET).
    walk: bool,
    /// The role of relations found outside any query.
    top_role: RelRole,
    ddl_targets: Vec<RelName>,
}

impl Plan {
    fn new(kind: Kind, walk: bool, top_role: RelRole) -> Self {
        Self {
            kind,
            walk,
            top_role,
            ddl_targets: Vec::new(),
        }
    }

    fn read(kind: Kind) -> Self {
        Self::new(kind, true, RelRole::Read)
    }

    fn bare(kind: Kind) -> Self {
        Self::new(kind, false, RelRole::Read)
    }

    fn ddl(temp: bool, global: bool) -> Self {
        Self::new(Kind::Ddl { temp, global }, true, RelRole::Define)
    }
}

fn statement(node: &NodeEnum) -> Result<Statement, TreeError> {
    // EXPLAIN runs its statement only with ANALYZE; then it has that statement's
    // effects, except that its result is never a cacheable one.
    let (node, explain_analyze) = match node {
        NodeEnum::ExplainStmt(e) if !explain_analyzes(&e.options) => {
            return Ok(Statement::new(Kind::OtherRead));
        }
        NodeEnum::ExplainStmt(e) => match e.query.as_ref().and_then(|q| q.node.as_ref()) {
            Some(inner) => (inner, true),
            None => return Ok(Statement::new(Kind::Unknown)),
        },
        other => (other, false),
    };
    let plan = plan(node);
    let mut st = Statement::new(plan.kind);
    st.ddl_targets = plan.ddl_targets;
    if plan.walk {
        let tree = tree::of(node)?;
        let facts = walk::collect(&tree, plan.top_role);
        st.reads = facts.reads;
        st.writes = facts.writes;
        facts
            .ddl_targets
            .into_iter()
            .for_each(|t| push_unique(&mut st.ddl_targets, t));
        st.functions = facts.functions;
        st.sql_value_function = facts.sql_value_function;
        st.set_config = facts.set_config;
        st.locking = facts.locking;
        if facts.dml && matches!(st.kind, Kind::Select | Kind::OtherRead) {
            st.kind = Kind::Write;
        }
        // A point read names one table once and has no subquery (which could read
        // the same table's other rows).
        if st.kind == Kind::Select
            && !explain_analyze
            && count(&tree, "RangeVar") == 1
            && count(&tree, "SubLink") == 0
        {
            st.point = shape::point::of(node);
        }
    }
    if explain_analyze && st.kind == Kind::Select {
        st.kind = Kind::OtherRead;
    }
    // Only a statement run as itself can be journalled instead; EXPLAIN ANALYZE
    // answers with a plan, so it keeps no shape.
    if !explain_analyze {
        st.shape = shape::of(node);
    }
    st.vacated = vacated(node);
    Ok(st)
}

/// How many structs named `name` the tree holds.
fn count(tree: &tree::Tree, name: &str) -> usize {
    match tree {
        tree::Tree::Struct(n, fields) => {
            usize::from(*n == name) + fields.iter().map(|(_, t)| count(t, name)).sum::<usize>()
        }
        tree::Tree::Seq(items) => items.iter().map(|t| count(t, name)).sum(),
        _ => 0,
    }
}

/// The databases a statement needs no other session connected to (see
/// [`Statement::vacated`]).
fn vacated(node: &NodeEnum) -> Vec<String> {
    match node {
        NodeEnum::DropdbStmt(s) => vec![s.dbname.clone()],
        NodeEnum::RenameStmt(r) if r.rename_type == ObjectType::ObjectDatabase as i32 => {
            vec![r.subname.clone()]
        }
        NodeEnum::CreatedbStmt(s) => {
            let named = s.options.iter().find_map(|o| match o.node.as_ref()? {
                NodeEnum::DefElem(d) if d.defname == "template" => {
                    match d.arg.as_ref().and_then(|a| a.node.as_ref()) {
                        Some(NodeEnum::String(t)) => Some(t.sval.clone()),
                        _ => None,
                    }
                }
                _ => None,
            });
            // `TEMPLATE DEFAULT`, or none given: template1.
            vec![named.unwrap_or_else(|| "template1".to_owned())]
        }
        _ => Vec::new(),
    }
}

/// `ANALYZE` given and not explicitly false (`EXPLAIN (ANALYZE off)`). When unsure,
/// assume it runs: that only makes the statement less cacheable.
fn explain_analyzes(options: &[protobuf::Node]) -> bool {
    let analyze = options.iter().rev().find_map(|o| match o.node.as_ref()? {
        NodeEnum::DefElem(d) if d.defname == "analyze" => {
            Some(d.arg.as_ref().and_then(|a| a.node.as_ref()))
        }
        _ => None,
    });
    match analyze {
        None => false,
        Some(None) => true,
        Some(Some(NodeEnum::String(s))) => !matches!(
            s.sval.to_ascii_lowercase().as_str(),
            "false" | "off" | "no" | "0"
        ),
        Some(Some(NodeEnum::Integer(i))) => i.ival != 0,
        Some(Some(NodeEnum::Boolean(b))) => b.boolval,
        Some(Some(_)) => true,
    }
}

fn plan(node: &NodeEnum) -> Plan {
    use NodeEnum as N;
    match node {
        N::SelectStmt(s) => match &s.into_clause {
            Some(into) => Plan::ddl(creates_temp(into.rel.as_ref()), false),
            None => Plan::read(Kind::Select),
        },
        N::InsertStmt(_) | N::UpdateStmt(_) | N::DeleteStmt(_) | N::MergeStmt(_) => {
            Plan::read(Kind::Write)
        }
        N::CopyStmt(c) if c.is_from => Plan::new(Kind::Write, true, RelRole::Write),
        N::CopyStmt(_) => Plan::read(Kind::OtherRead),
        N::TruncateStmt(t) => Plan::new(
            Kind::Truncate {
                cascade: t.behavior == DropBehavior::DropCascade as i32,
            },
            true,
            RelRole::Write,
        ),
        N::TransactionStmt(t) => Plan::bare(commands::transaction(t)),
        N::VariableSetStmt(v) => Plan::bare(commands::variable_set(v)),
        N::DiscardStmt(d) => Plan::bare(match DiscardMode::try_from(d.target) {
            Ok(DiscardMode::DiscardAll) => {
                Kind::Session(SessionCommand::Discard(DiscardTarget::All))
            }
            Ok(DiscardMode::DiscardPlans) => {
                Kind::Session(SessionCommand::Discard(DiscardTarget::Plans))
            }
            Ok(DiscardMode::DiscardSequences) => {
                Kind::Session(SessionCommand::Discard(DiscardTarget::Sequences))
            }
            Ok(DiscardMode::DiscardTemp) => {
                Kind::Session(SessionCommand::Discard(DiscardTarget::Temp))
            }
            Ok(DiscardMode::Undefined) | Err(_) => Kind::Unknown,
        }),
        N::PrepareStmt(p) => Plan::bare(Kind::Session(SessionCommand::Prepare {
            name: p.name.clone(),
        })),
        N::DeallocateStmt(d) => Plan::bare(Kind::Session(SessionCommand::Deallocate {
            name: (!d.isall && !d.name.is_empty()).then(|| d.name.clone()),
        })),
        N::ListenStmt(_) => Plan::bare(Kind::Session(SessionCommand::Listen)),
        N::UnlistenStmt(_) => Plan::bare(Kind::Session(SessionCommand::Unlisten)),
        N::LoadStmt(_) | N::ConstraintsSetStmt(_) | N::ClosePortalStmt(_) => {
            Plan::bare(Kind::Session(SessionCommand::Other))
        }
        N::VariableShowStmt(_) | N::FetchStmt(_) | N::NotifyStmt(_) | N::CheckPointStmt(_) => {
            Plan::bare(Kind::OtherRead)
        }
        N::DeclareCursorStmt(_)
        | N::VacuumStmt(_)
        | N::LockStmt(_)
        | N::ClusterStmt(_)
        | N::ReindexStmt(_) => Plan::read(Kind::OtherRead),
        N::DropStmt(d) => {
            let mut plan = Plan::ddl(false, false);
            plan.ddl_targets = dropped_relations(d);
            plan
        }
        other => match ddl(other) {
            Some((temp, global)) => Plan::ddl(temp, global),
            // DO, CALL, EXECUTE and whatever this list does not know.
            None => Plan::read(Kind::Unknown),
        },
    }
}

/// `(temp, global)` for the DDL statements other than SELECT INTO and DROP.
fn ddl(node: &NodeEnum) -> Option<(bool, bool)> {
    use NodeEnum as N;
    let global_object = |t: i32| {
        matches!(
            ObjectType::try_from(t),
            Ok(ObjectType::ObjectRole
                | ObjectType::ObjectDatabase
                | ObjectType::ObjectTablespace
                | ObjectType::ObjectSubscription
                | ObjectType::ObjectParameterAcl)
        )
    };
    Some(match node {
        N::CreateStmt(s) => (creates_temp(s.relation.as_ref()), false),
        N::CreateTableAsStmt(s) => (
            creates_temp(s.into.as_ref().and_then(|i| i.rel.as_ref())),
            false,
        ),
        N::ViewStmt(s) => (creates_temp(s.view.as_ref()), false),
        N::CreateSeqStmt(s) => (creates_temp(s.sequence.as_ref()), false),
        N::CreateFunctionStmt(f) => {
            let schema = f
                .funcname
                .iter()
                .rev()
                .nth(1)
                .and_then(|n| match n.node.as_ref()? {
                    NodeEnum::String(s) => Some(s.sval.as_str()),
                    _ => None,
                });
            (schema.is_some_and(is_temp_schema), false)
        }
        N::GrantStmt(g) => (false, global_object(g.objtype)),
        N::RenameStmt(r) => (false, global_object(r.rename_type)),
        N::AlterOwnerStmt(a) => (false, global_object(a.object_type)),
        N::CommentStmt(c) => (false, global_object(c.objtype)),
        N::SecLabelStmt(s) => (false, global_object(s.objtype)),
        N::CreateRoleStmt(_)
        | N::AlterRoleStmt(_)
        | N::AlterRoleSetStmt(_)
        | N::DropRoleStmt(_)
        | N::GrantRoleStmt(_)
        | N::CreatedbStmt(_)
        | N::AlterDatabaseStmt(_)
        | N::AlterDatabaseRefreshCollStmt(_)
        | N::AlterDatabaseSetStmt(_)
        | N::DropdbStmt(_)
        | N::CreateTableSpaceStmt(_)
        | N::DropTableSpaceStmt(_)
        | N::AlterTableSpaceOptionsStmt(_)
        | N::AlterSystemStmt(_)
        | N::CreateSubscriptionStmt(_)
        | N::AlterSubscriptionStmt(_)
        | N::DropSubscriptionStmt(_)
        | N::DropOwnedStmt(_)
        | N::ReassignOwnedStmt(_) => (false, true),
        N::CreateSchemaStmt(_)
        | N::AlterTableStmt(_)
        | N::AlterCollationStmt(_)
        | N::AlterDomainStmt(_)
        | N::AlterDefaultPrivilegesStmt(_)
        | N::AlterTableMoveAllStmt(_)
        | N::CreateExtensionStmt(_)
        | N::AlterExtensionStmt(_)
        | N::AlterExtensionContentsStmt(_)
        | N::CreateFdwStmt(_)
        | N::AlterFdwStmt(_)
        | N::CreateForeignServerStmt(_)
        | N::AlterForeignServerStmt(_)
        | N::CreateForeignTableStmt(_)
        | N::CreateUserMappingStmt(_)
        | N::AlterUserMappingStmt(_)
        | N::DropUserMappingStmt(_)
        | N::ImportForeignSchemaStmt(_)
        | N::CreatePolicyStmt(_)
        | N::AlterPolicyStmt(_)
        | N::CreateAmStmt(_)
        | N::CreateTrigStmt(_)
        | N::CreateEventTrigStmt(_)
        | N::AlterEventTrigStmt(_)
        | N::CreatePlangStmt(_)
        | N::AlterSeqStmt(_)
        | N::DefineStmt(_)
        | N::CreateDomainStmt(_)
        | N::CreateOpClassStmt(_)
        | N::CreateOpFamilyStmt(_)
        | N::AlterOpFamilyStmt(_)
        | N::IndexStmt(_)
        | N::CreateStatsStmt(_)
        | N::AlterStatsStmt(_)
        | N::AlterFunctionStmt(_)
        | N::AlterObjectDependsStmt(_)
        | N::AlterObjectSchemaStmt(_)
        | N::AlterOperatorStmt(_)
        | N::AlterTypeStmt(_)
        | N::RuleStmt(_)
        | N::CompositeTypeStmt(_)
        | N::CreateEnumStmt(_)
        | N::CreateRangeStmt(_)
        | N::AlterEnumStmt(_)
        | N::RefreshMatViewStmt(_)
        | N::CreateConversionStmt(_)
        | N::CreateCastStmt(_)
        | N::CreateTransformStmt(_)
        | N::AlterTsdictionaryStmt(_)
        | N::AlterTsconfigurationStmt(_)
        | N::CreatePublicationStmt(_)
        | N::AlterPublicationStmt(_) => (false, false),
        _ => return None,
    })
}

/// TEMP/TEMPORARY, or an explicit `pg_temp.` schema (which PostgreSQL makes temporary).
fn creates_temp(rel: Option<&RangeVar>) -> bool {
    rel.is_some_and(|r| r.relpersistence == "t" || is_temp_schema(&r.schemaname))
}

fn is_temp_schema(schema: &str) -> bool {
    schema == "pg_temp" || schema.starts_with("pg_temp_")
}

/// The relations a DROP TABLE/VIEW/MATERIALIZED VIEW/SEQUENCE/INDEX/FOREIGN TABLE
/// names (each object is a list of name parts).
fn dropped_relations(stmt: &protobuf::DropStmt) -> Vec<RelName> {
    let relations = matches!(
        ObjectType::try_from(stmt.remove_type),
        Ok(ObjectType::ObjectTable
            | ObjectType::ObjectView
            | ObjectType::ObjectMatview
            | ObjectType::ObjectSequence
            | ObjectType::ObjectIndex
            | ObjectType::ObjectForeignTable)
    );
    if !relations {
        return Vec::new();
    }
    let mut names = Vec::new();
    for object in &stmt.objects {
        let Some(NodeEnum::List(list)) = object.node.as_ref() else {
            continue;
        };
        let parts: Vec<&str> = list
            .items
            .iter()
            .filter_map(|i| match i.node.as_ref()? {
                NodeEnum::String(s) => Some(s.sval.as_str()),
                _ => None,
            })
            .collect();
        let name = match parts.as_slice() {
            [] => continue,
            [name] => RelName::new(None, name),
            [.., schema, name] => RelName::new(Some(schema), name),
        };
        push_unique(&mut names, name);
    }
    names
}
