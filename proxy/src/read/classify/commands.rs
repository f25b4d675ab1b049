//! Decoding of transaction-control and SET/RESET statements into [`TxCommand`] and
//! [`SessionCommand`].
//!
//! Invariants: SET/RESET of `role` or `session_authorization` is always
//! [`SessionCommand::Role`]; SET TRANSACTION / SET SESSION CHARACTERISTICS are
//! transaction commands; anything not understood is [`Kind::Unknown`].

use pg_query::protobuf::{
    self, TransactionStmt, TransactionStmtKind, VariableSetKind, VariableSetStmt, a_const,
};
use pg_query::{NodeEnum, NodeRef};

use super::{Isolation, Kind, SessionCommand, TxCommand};

pub(super) fn transaction(stmt: &TransactionStmt) -> Kind {
    use TransactionStmtKind as K;
    let command = match TransactionStmtKind::try_from(stmt.kind) {
        Ok(K::TransStmtBegin | K::TransStmtStart) => TxCommand::Begin {
            isolation: isolation(&stmt.options),
            read_only: read_only(&stmt.options),
        },
        Ok(K::TransStmtCommit) => TxCommand::Commit { chain: stmt.chain },
        Ok(K::TransStmtRollback) => TxCommand::Rollback { chain: stmt.chain },
        Ok(K::TransStmtSavepoint) => TxCommand::Savepoint,
        Ok(K::TransStmtRelease) => TxCommand::Release,
        Ok(K::TransStmtRollbackTo) => TxCommand::RollbackTo,
        Ok(K::TransStmtPrepare) => TxCommand::PrepareTransaction,
        Ok(K::TransStmtCommitPrepared) => TxCommand::CommitPrepared,
        Ok(K::TransStmtRollbackPrepared) => TxCommand::RollbackPrepared,
        Ok(K::Undefined) | Err(_) => return Kind::Unknown,
    };
    Kind::Transaction(command)
}

pub(super) fn variable_set(stmt: &VariableSetStmt) -> Kind {
    use VariableSetKind as K;
    let name = stmt.name.to_ascii_lowercase();
    let kind = VariableSetKind::try_from(stmt.kind);
    let role = matches!(name.as_str(), "role" | "session_authorization");
    let command = match kind {
        Ok(K::VarSetMulti) => {
            let isolation = isolation(&stmt.args);
            return match name.as_str() {
                "transaction" => Kind::Transaction(TxCommand::SetTransaction { isolation }),
                "transaction snapshot" => {
                    Kind::Transaction(TxCommand::SetTransaction { isolation: None })
                }
                "session characteristics" => {
                    Kind::Transaction(TxCommand::SetSessionCharacteristics { isolation })
                }
                _ => Kind::Unknown,
            };
        }
        Ok(K::VarSetValue | K::VarSetDefault | K::VarReset) if role => SessionCommand::Role,
        Ok(K::VarSetValue) => match set_value(stmt) {
            Some(value) => SessionCommand::Set {
                name,
                value,
                local: stmt.is_local,
            },
            None => return Kind::Unknown,
        },
        Ok(K::VarSetDefault) => SessionCommand::Set {
            name,
            value: "DEFAULT".to_owned(),
            local: stmt.is_local,
        },
        Ok(K::VarSetCurrent) => SessionCommand::Other,
        Ok(K::VarReset) => SessionCommand::Reset { name },
        Ok(K::VarResetAll) => SessionCommand::ResetAll,
        Ok(K::Undefined) | Err(_) => return Kind::Unknown,
    };
    Kind::Session(command)
}

/// Canonical text of a SET value: constants joined with ", " (strings as SQL
/// literals), else the whole statement deparsed (e.g. `SET TIME ZONE INTERVAL …`).
fn set_value(stmt: &VariableSetStmt) -> Option<String> {
    let constants: Option<Vec<String>> = stmt
        .args
        .iter()
        .map(|arg| constant(arg.node.as_ref()?))
        .collect();
    match constants {
        Some(values) => Some(values.join(", ")),
        None => NodeRef::VariableSetStmt(stmt)
            .deparse(Default::default())
            .ok(),
    }
}

fn constant(node: &NodeEnum) -> Option<String> {
    let NodeEnum::AConst(c) = node else {
        return None;
    };
    Some(match c.val.as_ref()? {
        a_const::Val::Sval(s) => format!("'{}'", s.sval.replace('\'', "''")),
        a_const::Val::Ival(i) => i.ival.to_string(),
        a_const::Val::Fval(f) => f.fval.clone(),
        a_const::Val::Boolval(b) => b.boolval.to_string(),
        a_const::Val::Bsval(b) => b.bsval.clone(),
    })
}

/// The `transaction_isolation` option of BEGIN / SET TRANSACTION.
fn isolation(options: &[protobuf::Node]) -> Option<Isolation> {
    let level = option(options, "transaction_isolation")?;
    let NodeEnum::AConst(c) = level else {
        return None;
    };
    let Some(a_const::Val::Sval(s)) = &c.val else {
        return None;
    };
    match s.sval.to_ascii_lowercase().as_str() {
        "read uncommitted" => Some(Isolation::ReadUncommitted),
        "read committed" => Some(Isolation::ReadCommitted),
        "repeatable read" => Some(Isolation::RepeatableRead),
        "serializable" => Some(Isolation::Serializable),
        _ => None,
    }
}

/// The `transaction_read_only` option (READ ONLY is 1, READ WRITE is 0).
fn read_only(options: &[protobuf::Node]) -> bool {
    match option(options, "transaction_read_only") {
        Some(NodeEnum::AConst(c)) => match &c.val {
            Some(a_const::Val::Ival(i)) => i.ival != 0,
            Some(a_const::Val::Boolval(b)) => b.boolval,
            _ => false,
        },
        _ => false,
    }
}

/// The argument of the last `DefElem` called `name` (PostgreSQL rejects repeats).
pub(super) fn option<'a>(options: &'a [protobuf::Node], name: &str) -> Option<&'a NodeEnum> {
    options.iter().rev().find_map(|o| match o.node.as_ref()? {
        NodeEnum::DefElem(d) if d.defname == name => d.arg.as_ref()?.node.as_ref(),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::one;
    use super::super::{DiscardTarget, Isolation::*, Kind, SessionCommand as S, TxCommand as T};

    fn set(name: &str, value: &str, local: bool) -> Kind {
        Kind::Session(S::Set {
            name: name.into(),
            value: value.into(),
            local,
        })
    }

    fn begin(isolation: Option<super::Isolation>, read_only: bool) -> Kind {
        Kind::Transaction(T::Begin {
            isolation,
            read_only,
        })
    }

    #[test]
    fn transaction_and_session_commands() {
        let tx = Kind::Transaction;
        let session = Kind::Session;
        #[rustfmt::skip]
        let cases: Vec<(&str, Kind)> = vec![
            ("BEGIN", begin(None, false)),
            ("BEGIN ISOLATION LEVEL REPEATABLE READ", begin(Some(RepeatableRead), false)),
            ("START TRANSACTION READ ONLY", begin(None, true)),
            ("START TRANSACTION ISOLATION LEVEL READ COMMITTED, READ WRITE", begin(Some(ReadCommitted), false)),
            ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", tx(T::SetTransaction { isolation: Some(Serializable) })),
            ("SET TRANSACTION SNAPSHOT '00000003-0000001B-1'", tx(T::SetTransaction { isolation: None })),
            ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ UNCOMMITTED",
                tx(T::SetSessionCharacteristics { isolation: Some(ReadUncommitted) })),
            ("COMMIT", tx(T::Commit { chain: false })),
            ("END", tx(T::Commit { chain: false })),
            ("COMMIT AND CHAIN", tx(T::Commit { chain: true })),
            ("ROLLBACK", tx(T::Rollback { chain: false })),
            ("ABORT", tx(T::Rollback { chain: false })),
            ("SAVEPOINT s1", tx(T::Savepoint)),
            ("RELEASE SAVEPOINT s1", tx(T::Release)),
            ("ROLLBACK TO SAVEPOINT s1", tx(T::RollbackTo)),
            ("PREPARE TRANSACTION 'g'", tx(T::PrepareTransaction)),
            ("COMMIT PREPARED 'g'", tx(T::CommitPrepared)),
            ("ROLLBACK PREPARED 'g'", tx(T::RollbackPrepared)),
            ("SET search_path TO a, b", set("search_path", "'a', 'b'", false)),
            ("set Search_Path = 'a', 'b'", set("search_path", "'a', 'b'", false)),
            ("SET search_path = 'a, b'", set("search_path", "'a, b'", false)),
            ("SET LOCAL statement_timeout = 5", set("statement_timeout", "5", true)),
            ("SET SESSION DateStyle TO DEFAULT", set("datestyle", "DEFAULT", false)),
            ("SET TIME ZONE 'UTC'", set("timezone", "'UTC'", false)),
            ("SET TIME ZONE LOCAL", set("timezone", "DEFAULT", false)),
            ("SET TIME ZONE INTERVAL '+01:00' HOUR TO MINUTE",
                set("timezone", "SET TIME ZONE interval '+01:00' hour to minute", false)),
            ("SET extra_float_digits = 1.5", set("extra_float_digits", "1.5", false)),
            ("SET standard_conforming_strings = on", set("standard_conforming_strings", "'on'", false)),
            ("SET application_name = 'it''s'", set("application_name", "'it''s'", false)),
            ("SET x FROM CURRENT", session(S::Other)),
            ("RESET x", session(S::Reset { name: "x".into() })),
            ("RESET ALL", session(S::ResetAll)),
            ("SET ROLE admin", session(S::Role)),
            ("SET LOCAL ROLE NONE", session(S::Role)),
            ("RESET ROLE", session(S::Role)),
            ("SET SESSION AUTHORIZATION bob", session(S::Role)),
            ("SET SESSION AUTHORIZATION DEFAULT", session(S::Role)),
            ("RESET SESSION AUTHORIZATION", session(S::Role)),
            ("DISCARD ALL", session(S::Discard(DiscardTarget::All))),
            ("DISCARD PLANS", session(S::Discard(DiscardTarget::Plans))),
            ("DISCARD SEQUENCES", session(S::Discard(DiscardTarget::Sequences))),
            ("DISCARD TEMP", session(S::Discard(DiscardTarget::Temp))),
            ("PREPARE p (int) AS SELECT $1", session(S::Prepare { name: "p".into() })),
            ("DEALLOCATE p", session(S::Deallocate { name: Some("p".into()) })),
            ("DEALLOCATE PREPARE p", session(S::Deallocate { name: Some("p".into()) })),
            ("DEALLOCATE ALL", session(S::Deallocate { name: None })),
            ("LISTEN ch", session(S::Listen)),
            ("UNLISTEN *", session(S::Unlisten)),
            ("SET CONSTRAINTS ALL DEFERRED", session(S::Other)),
            ("LOAD 'auto_explain'", session(S::Other)),
            ("CLOSE c", session(S::Other)),
        ];
        for (sql, kind) in cases {
            assert_eq!(one(sql).kind, kind, "{sql}");
        }
    }
}
