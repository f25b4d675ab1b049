//! What forwarding a statement to PostgreSQL means for the session, decided before
//! it goes: the settings it changes (applied now when certain, else at its own
//! ReadyForQuery, else given up on), the transaction's isolation and writes, the
//! statements it deallocates, and the cache entries it invalidates.
//!
//! Invariant: a statement is *certain* (takes effect exactly when acknowledged) only
//! alone in its request, in autocommit, with nothing sent before it outstanding;
//! anything else that changes settings makes the session stop trusting its key rather
//! than guess.

use super::Caching;
use super::tx::EchoClaim;
use crate::read::cache::{Decision, Effects, Params};
use crate::read::classify::{Analysis, DiscardTarget, Isolation, Kind, SessionCommand, TxCommand};

impl Caching {
    /// A statement forwarded now takes effect exactly when acknowledged: it runs
    /// alone, in autocommit, with nothing before it outstanding.
    ///
    /// Called once per statement-carrying message forwarded (Query, Execute,
    /// FunctionCall): a session command waiting for its request's end now shares that
    /// request with another statement, so its ReadyForQuery can no longer tell whether
    /// it ran in autocommit.
    pub(super) fn certain(&mut self, status: u8, statements: usize) -> bool {
        self.key.shared_request(self.tracker.next_ready_index());
        statements == 1 && status == b'I' && !self.tracker.has_outstanding_statements()
    }

    /// Applies what forwarding `analysis` means for settings, transactions and the
    /// cache, before it goes upstream.
    pub(super) fn statement_effects(
        &mut self,
        analysis: &Analysis,
        decision: &Decision,
        params: &Params<'_>,
        certain: bool,
    ) {
        if analysis.unanalysed {
            self.key.lose_track("statement not analysed");
        }
        for stmt in &analysis.statements {
            match &stmt.kind {
                Kind::Transaction(TxCommand::Begin { isolation, .. }) => {
                    self.tx.snapshot |= match isolation {
                        Some(i) => snapshot(*i),
                        None => self.key.default_snapshot_isolation,
                    };
                }
                Kind::Transaction(TxCommand::SetTransaction { isolation }) => {
                    self.tx.snapshot |= isolation.is_some_and(snapshot);
                }
                Kind::Transaction(TxCommand::SetSessionCharacteristics { isolation: Some(i) }) => {
                    if certain {
                        self.key.default_snapshot_isolation = snapshot(*i);
                    } else {
                        self.key
                            .lose_track("isolation changed inside a transaction");
                    }
                }
                Kind::Session(cmd) => {
                    self.link.listened |= matches!(cmd, SessionCommand::Listen);
                    // Alone in its request but behind outstanding ones: decided at its
                    // own ReadyForQuery; until then the session is not quiet, so
                    // nothing is served or filled.
                    let behind = (!certain
                        && analysis.statements.len() == 1
                        && self.tracker.has_outstanding_statements())
                    .then(|| self.tracker.next_ready_index());
                    self.key.forwarded(cmd, certain, behind);
                    match cmd {
                        // SQL-level statements share the protocol's namespace.
                        SessionCommand::Deallocate { name: Some(name) }
                        | SessionCommand::Prepare { name } => self.stmts.forget_named(name),
                        SessionCommand::Deallocate { name: None }
                        | SessionCommand::Discard(DiscardTarget::All) => self.stmts.forget_all(),
                        _ => {}
                    }
                }
                // A temporary object shadows names for this session only.
                Kind::Ddl { temp: true, .. } => {
                    self.key.lose_track("temporary objects created");
                }
                _ => {}
            }
            // Settings PostgreSQL reports (ParameterStatus, also when a transaction
            // rolls them back) are followed exactly whoever changes them.
            let reported = |s: &Option<String>| {
                s.as_deref()
                    .is_some_and(|s| matches!(s, "timezone" | "datestyle" | "intervalstyle"))
            };
            let unseen = stmt.set_config.len()
                < stmt
                    .functions
                    .iter()
                    .filter(|f| f.name == "set_config")
                    .count();
            if unseen || !stmt.set_config.iter().all(reported) {
                self.key.lose_track("set_config() called");
            }
        }
        self.record_effects(&decision.effects_with(params), certain);
    }

    /// Invalidates what `effects` touch, now and again at the acknowledgement and the
    /// transaction's end; notes writes that may touch deferred tables outside the key
    /// overlay (held transactions read such keys again at COMMIT).
    pub(super) fn record_effects(&mut self, effects: &Effects, certain: bool) {
        if effects.hidden_session_changes {
            // DO, CALL, EXECUTE, FunctionCall, user-defined volatile functions: may
            // SET, SET ROLE or create temporary objects out of sight.
            self.key.lose_track("statement with unknown side effects");
        }
        if let Some(w) = &self.writes
            && (effects.hidden_session_changes || effects.database || effects.everything || {
                // The tables written, and those their foreign keys' actions reach.
                let set = w.service.tables();
                let catalog = self.routing_catalog();
                effects.tables.iter().any(|o| {
                    set.name_of(*o).is_some()
                        || catalog.as_ref().is_some_and(|c| {
                            c.foreign_key_links(*o)
                                .iter()
                                .any(|l| set.name_of(*l).is_some())
                        })
                })
            })
        {
            // Noted again when the write completes (`upstream.rs`), so a read that
            // overlapped it is too.
            w.service.note_outside_write();
            self.tx.outside = true;
        }
        if effects.is_empty() {
            return;
        }
        // Before it goes upstream: the one row it writes, if that is all it writes.
        let first = self.tx.effects.is_empty();
        self.tx.echo = match (&self.tx.echo, self.one_row(effects, certain)) {
            (EchoClaim::None, Some((table, key))) if first => EchoClaim::One {
                claim: self.db.echoes.claim(table, key),
                rows: None,
            },
            _ => EchoClaim::Spoiled,
        };
        self.db.invalidate(effects, &self.cache.versions);
        self.tx.effects.merge(effects);
        if !certain {
            self.tx.wrote = true;
        }
    }
}

impl Caching {
    /// The one row `effects` write, when a statement alone in autocommit writes only
    /// that row of a table, with a known key (replication mode only: its echo comes
    /// from the change stream).
    fn one_row<'e>(&self, effects: &'e Effects, certain: bool) -> Option<(u32, &'e [String])> {
        if !certain
            || self.cache.invalidation != spillway_policies::Invalidation::Replication
            || effects.database
            || effects.everything
            || effects.catalog_changed
            || effects.hidden_session_changes
        {
            return None;
        }
        match (
            &effects.tables[..],
            &effects.keyed_tables[..],
            &effects.keys[..],
        ) {
            ([t], [k], [(oid, key)]) if t == k && k == oid => Some((*oid, key)),
            _ => None,
        }
    }
}

fn snapshot(isolation: Isolation) -> bool {
    matches!(
        isolation,
        Isolation::RepeatableRead | Isolation::Serializable
    )
}
