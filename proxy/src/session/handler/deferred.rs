//! Deferred tables in a session (SPEC §6): a deferrable autocommit statement on a
//! write-behind/write-back table is journaled and acknowledged by spillway; anything
//! else that touches such a table while it has pending writes first waits for them to
//! be applied upstream (a barrier), as its table's `consistency` requires. Which
//! deferred tables a statement touches is resolved through the catalog (views and
//! partitions to their base tables, foreign keys to the tables their actions reach),
//! or by name alone without one; whatever may touch anything touches every one
//! (`touch.rs`).
//!
//! Both are waits of the message ([`Wait`]): the journal's acknowledgement comes back
//! as a [`Resume::Ack`] and is answered here ([`Caching::acknowledged`]); a barrier
//! comes back as [`Resume::Passed`] and the message is routed on without another. This
//! is where a write enters the write service's facade: [`WriteService::defer`],
//! [`WriteService::wait_applied`].
//!
//! Invariants:
//! - A statement is deferred only alone in its request, in autocommit, with nothing
//!   outstanding upstream (a deferrable statement behind unanswered requests waits
//!   for their answers, then is decided), when spillway can resolve its table to
//!   exactly one deferred table and its values to text; everything else is a fallback
//!   (write-through after a barrier).
//! - A barrier is waited for once per routing of a message (`wait.rs`).
//! - The cache entries of a table are invalidated when a deferred write to it is
//!   acknowledged (and again when it is applied, by the flusher).

use std::sync::Arc;
use std::time::Instant;

use super::answer::{Reply, Single, refusal};
use super::statements::Unnamed;
use super::touch::{Touch, target, written};
use super::wait::{Ack, Resume, Wait};
use super::{Caching, Disposition};
use crate::protocol::frontend;
use crate::read::classify::TxCommand;
use crate::read::classify::{Analysis, Kind};
use crate::session::state::Outbox;
use crate::write::convert::{self, Bound, Converted};
use crate::write::datetime::Settings;
use crate::write::fallbacks::Fallback;
use crate::write::service::{DeferError, WriteService};

/// The deferred tables of the session's database, and what the session deferred.
pub struct Deferral {
    pub service: Arc<WriteService>,
    /// Sequence number of this session's latest deferred write (`consistency =
    /// "session"`, and read-your-writes: no hits or fills until it is applied).
    pub own_seq: u64,
    /// The session's role, for privilege checks of deferred writes.
    pub user: String,
}

impl Deferral {
    pub fn new(service: Arc<WriteService>, user: &str) -> Self {
        Self {
            service,
            own_seq: 0,
            user: user.to_owned(),
        }
    }
}

impl Caching {
    /// Routes a request with deferred tables in mind: `Some` when it is answered here
    /// or must first wait (the message is then Blocked), `None` to go on upstream.
    /// `single`: the request's only statement, with its bound parameters and answer;
    /// `read`: the Bind of a lone read going upstream before its Sync (an overlay's
    /// parameters and result formats).
    pub(super) fn route_writes(
        &mut self,
        analyses: &[&Analysis],
        single: Option<Single<'_>>,
        read: Option<&Bound>,
        out: &mut Outbox,
    ) -> Option<Disposition> {
        let w = self.writes.as_ref()?.service.clone();
        if self.tx.held.is_some() {
            return self.route_held(analyses, single, out);
        }
        let at_bind = single.is_none() && read.is_some();
        let bound = single.as_ref().map(|s| s.bound).or(read);
        let mut single = single;
        if let [a] = analyses
            && matches!(a.statements.as_slice(), [s] if matches!(s.kind, Kind::Transaction(TxCommand::Begin { .. })))
            && let Some(d) = self.try_hold(analyses, &mut single, out)
        {
            return Some(d);
        }
        let catalog = self.routing_catalog();
        let touch = Touch::of(&w.tables(), catalog.as_deref(), analyses);
        if touch.is_empty() {
            return None;
        }
        let mut full = false;
        if let (Some(single), [analysis]) = (single, analyses)
            && !self.wait.write_through()
        {
            // Pipelined behind requests still unanswered (a client's Close + Sync, say),
            // whether it runs in autocommit is not known yet: wait for their answers
            // rather than run write-through.
            if self.tracker.awaits_answers()
                && matches!(analysis.statements.as_slice(), [s] if matches!(s.shape, Some(Ok(_))))
            {
                self.wait = Wait::quiet(&self.quiet, self.wait.carry());
                return Some(Disposition::Blocked);
            }
            match self.deferrable(analysis, single.bound, out) {
                Ok((table, converted)) => return Some(self.defer(w, table, converted, single)),
                Err(reason) => {
                    full = reason == Fallback::Full;
                    // Counted once per message (a re-offer after the barrier is the
                    // same write).
                    if !self.wait.passed_barrier() {
                        for table in written(analysis, &touch.tables) {
                            note_fallback(&w, table, reason);
                        }
                    }
                }
            }
        }
        if self.wait.passed_barrier() {
            return None;
        }
        let target = self.barrier_target(&w, analyses, &touch)?;
        if self.link.detached {
            // The barrier would only precede a trip upstream that cannot happen.
            return Some(Disposition::NeedsUpstream);
        }
        // A read-your-writes point read goes upstream now, its row's pending writes
        // overlaid on PostgreSQL's answer (`overlay.rs`), when they allow it.
        if let [analysis] = analyses
            && !full
            && self.own_writes_pending(&w)
        {
            if self.try_overlay(&w, analysis, bound, &touch, at_bind, out) {
                return None;
            }
            if matches!(analysis.statements.as_slice(), [s] if matches!(s.kind, Kind::Select)) {
                super::overlay::counted("waited");
            }
        }
        let write_through = full || self.wait.write_through();
        Some(self.barrier(target, write_through))
    }

    /// Counts each write to a deferred table of an extended cycle with several
    /// Executes (a pipelined batch), once per cycle (not again when it is re-offered
    /// after its barrier).
    pub(super) fn note_pipelined(&self, analyses: &[&Analysis]) {
        let Some(w) = self.writes.as_ref().map(|d| &d.service) else {
            return;
        };
        if analyses.len() < 2 || self.wait.passed_barrier() {
            return;
        }
        let catalog = self.routing_catalog();
        let touch = Touch::of(&w.tables(), catalog.as_deref(), analyses);
        for analysis in analyses {
            for table in written(analysis, &touch.tables) {
                note_fallback(w, table, Fallback::Pipelined);
            }
        }
    }

    /// Counts each write to a deferred table that Executes forwarded upstream before
    /// their cycle's Sync run (a shape spillway cannot defer, a Flush, a named
    /// portal), with the statement's shape reason, once (not again when the message is
    /// re-offered after its barrier).
    pub(super) fn note_forwarded(&self, executed: &[&Analysis]) {
        let Some(w) = self.writes.as_ref().map(|d| &d.service) else {
            return;
        };
        if executed.is_empty() || self.wait.passed_barrier() {
            return;
        }
        let catalog = self.routing_catalog();
        let touch = Touch::of(&w.tables(), catalog.as_deref(), executed);
        for analysis in executed {
            let reason = match analysis.statements.as_slice() {
                [s] => match &s.shape {
                    Some(Err(reason)) => Fallback::Shape(reason),
                    _ if executed.len() > 1 => Fallback::Pipelined,
                    _ => Fallback::Forwarded,
                },
                _ => Fallback::MultipleStatements,
            };
            for table in written(analysis, &touch.tables) {
                note_fallback(w, table, reason);
            }
        }
    }

    /// The sequence number that must be applied before the request goes upstream,
    /// if one is not yet. Reads may skip the barrier as their tables' consistency
    /// allows; writes, DDL and anything unknown never do.
    pub(super) fn barrier_target(
        &self,
        w: &WriteService,
        analyses: &[&Analysis],
        touch: &Touch,
    ) -> Option<u64> {
        let read_only = analyses.iter().all(|a| {
            !a.unanalysed
                && a.statements
                    .iter()
                    .all(|s| matches!(s.kind, Kind::Select | Kind::OtherRead | Kind::Empty))
        });
        let set = w.tables();
        let names: Vec<String> = if touch.all || touch.linked_all {
            set.names().cloned().collect()
        } else {
            touch.tables.iter().chain(&touch.linked).cloned().collect()
        };
        let own_seq = self.writes.as_ref().map_or(0, |d| d.own_seq);
        w.barrier(names.iter().map(String::as_str), read_only, own_seq)
    }

    /// The session's own deferred writes are not all applied yet (read-your-writes).
    fn own_writes_pending(&self, w: &WriteService) -> bool {
        self.writes
            .as_ref()
            .is_some_and(|d| d.own_seq > w.applied())
    }

    /// Blocks the current message until `target` is applied upstream; then it goes
    /// on without another barrier (`write_through`: and is not deferred).
    pub(super) fn barrier(&mut self, target: u64, write_through: bool) -> Disposition {
        let Some(w) = self.writes.as_ref().map(|d| d.service.clone()) else {
            return Disposition::Consumed;
        };
        let filled = self.wait.filled();
        self.wait = Wait::on(async move {
            match w.wait_applied(target).await {
                Ok(()) => Resume::Passed {
                    filled,
                    write_through,
                },
                Err(e) => Resume::BarrierFailed(e),
            }
        });
        Disposition::Blocked
    }

    /// A barrier failed (the flusher stopped): the message is answered with the error.
    pub(super) fn barrier_failed(
        &mut self,
        tag: u8,
        err: &DeferError,
        out: &mut Outbox,
    ) -> Disposition {
        out.error(&refusal(err));
        if tag == frontend::SYNC {
            self.cycle.clear();
        }
        out.ready_now();
        Disposition::Consumed
    }

    /// Journals a deferrable statement: the message waits for the acknowledgement.
    fn defer(
        &mut self,
        w: Arc<WriteService>,
        table: String,
        mut converted: Converted,
        single: Single<'_>,
    ) -> Disposition {
        let mut answer = single.answer;
        answer.returning = converted.returning.take();
        let verb = converted.verb;
        let keys = if converted.keys.len() == converted.ops.len() {
            converted.keys.clone()
        } else {
            Vec::new()
        };
        let (oid, policy) = {
            let set = w.tables();
            let policy = set
                .deferring(&table)
                .map_or("write-behind", |t| t.config.policy.as_str());
            (set.oid_of(&table).unwrap_or(0), policy)
        };
        let user = self
            .writes
            .as_ref()
            .map(|d| d.user.clone())
            .unwrap_or_default();
        let started = Instant::now();
        self.wait = Wait::on(async move {
            let mut answer = answer;
            // RETURNING's timestamptz texts in the session's zone, from PostgreSQL,
            // before anything is journaled (ADR 0035's addendum).
            let resolved = match answer.returning.as_mut() {
                Some(r) => w.resolve_zoned(r).await,
                None => Ok(()),
            };
            let outcome = match resolved {
                Ok(()) => w.defer(&user, &table, converted).await,
                Err(e) => Err(e),
            };
            // An upsert's DO UPDATE rows returning columns it leaves as stored: the
            // values the engine decided them with (ADR 0038). They come in spellings
            // the answer encodes; one that does not is a defect, reported, never
            // guessed (the write is journaled: the client gets an internal error).
            let outcome = match (outcome, answer.returning.as_mut()) {
                (Ok(o), Some(r)) => match r.fill_stored(&o.stored) {
                    Ok(()) => Ok(o),
                    Err(e) => Err(crate::write::service::DeferError::Stopped(format!(
                        "RETURNING of stored values: {e}"
                    ))),
                },
                (other, _) => other,
            };
            Resume::Ack(Box::new(Ack {
                outcome,
                verb,
                table: oid,
                keys,
                table_name: table,
                policy,
                answer,
                started,
            }))
        });
        Disposition::Blocked
    }

    /// The journal's answer to a deferred write: acknowledged or refused here, or
    /// (`None`) the write runs write-through after all.
    pub(super) fn acknowledged(&mut self, ack: Ack, out: &mut Outbox) -> Option<Disposition> {
        let extended = ack.answer.extended;
        let unnamed = match ack.outcome {
            Ok(outcome) => {
                self.timing.metrics.deferred.record(ack.started.elapsed());
                metrics::counter!(
                    crate::metrics::CLIENT_WRITES,
                    "table" => ack.table_name,
                    "policy" => ack.policy
                )
                .increment(1);
                if let Some(seq) = outcome.seq {
                    if let Some(d) = self.writes.as_mut() {
                        d.own_seq = d.own_seq.max(seq);
                    }
                    if ack.keys.is_empty() {
                        self.db.versions.bump_tables([ack.table]);
                    }
                    for key in &ack.keys {
                        self.db.versions.bump_key(ack.table, key);
                    }
                }
                let tag = ack.verb.tag(outcome.rows);
                let unnamed = ack.answer.send(
                    Reply::Done {
                        tag: &tag,
                        rows: outcome.rows,
                    },
                    out.tx_status(),
                    out,
                );
                if !extended {
                    self.stmts.unnamed = Unnamed::NONE;
                }
                unnamed
            }
            // The role may not write it, or a reload took its table off deferral: it
            // runs write-through (after its barrier), and PostgreSQL answers it.
            Err(DeferError::NotPermitted { .. } | DeferError::NotDeferred(_)) => {
                self.wait = Wait::Resumed(Resume::WriteThrough);
                return None;
            }
            // A guarded write whose row spillway does not know exactly (ADR 0035):
            // PostgreSQL decides it, after its barrier.
            Err(DeferError::RowUnknown(table)) => {
                if let Some(w) = self.writes.as_ref() {
                    note_fallback(&w.service, &table, Fallback::RowUnknown);
                }
                note_row_unknown(&table);
                self.wait = Wait::Resumed(Resume::WriteThrough);
                return None;
            }
            // The journal (or its disk) is full and the table says `write-through`:
            // nothing was journaled, so PostgreSQL runs it after its barrier.
            Err(e) if e.journal_out_of_room() && self.overflows_upstream(&ack.table_name) => {
                self.wait = Wait::Resumed(Resume::WriteThrough);
                return None;
            }
            Err(e) => ack
                .answer
                .send(Reply::Error(&refusal(&e)), out.tx_status(), out),
        };
        if extended {
            self.finish_cycle(unnamed);
        }
        Some(Disposition::Consumed)
    }

    /// Whether `table` runs its writes write-through when full (`when_full`).
    pub(super) fn overflows_upstream(&self, table: &str) -> bool {
        self.writes.as_ref().is_some_and(|d| {
            d.service
                .tables()
                .deferring(table)
                .is_some_and(|t| t.config.when_full == spillway_policies::WhenFull::WriteThrough)
        })
    }

    /// The deferred table and row operations of `analysis`, or why it is not deferred.
    pub(super) fn deferrable(
        &self,
        analysis: &Analysis,
        bound: &Bound,
        out: &Outbox,
    ) -> Result<(String, Converted), Fallback> {
        let w = &self.writes.as_ref().ok_or(Fallback::NotDeferred)?.service;
        let [stmt] = analysis.statements.as_slice() else {
            return Err(Fallback::MultipleStatements);
        };
        // The statement's own reasons come first (the metrics say what would make it
        // deferrable, also when it moves a held transaction upstream); the session's
        // last.
        let params = &out.state().params;
        let param = |name: &str| params.get(name).map(String::as_str);
        let converted = self.convertible(stmt, w, bound, param("TimeZone"), param("DateStyle"))?;
        // A held transaction's statements are decided like autocommit ones (held/).
        if (out.tx_status() != b'I' && self.tx.held.is_none()) || !self.tracker.quiet {
            return Err(Fallback::InTransaction);
        }
        if self.key.bypass.is_some() || self.key.local_override {
            return Err(Fallback::SessionState);
        }
        // Literal text and bytes mean what the flusher's connection reads them as only
        // with these settings (UTF-8, backslashes literal in '…').
        if param("client_encoding") != Some("UTF8")
            || param("standard_conforming_strings") != Some("on")
        {
            return Err(Fallback::SessionSettings);
        }
        // PostgreSQL refuses the write (25006); it says so itself.
        if param("default_transaction_read_only") == Some("on") {
            return Err(Fallback::ReadOnly);
        }
        Ok(converted)
    }

    /// The statement's own part of [`Self::deferrable`]: its table resolved to one
    /// deferred table, its values converted.
    fn convertible(
        &self,
        stmt: &crate::read::classify::Statement,
        w: &WriteService,
        bound: &Bound,
        time_zone: Option<&str>,
        date_style: Option<&str>,
    ) -> Result<(String, Converted), Fallback> {
        let shape = match &stmt.shape {
            Some(Ok(shape)) => shape,
            Some(Err(reason)) => return Err(Fallback::Shape(reason)),
            None => return Err(Fallback::NotADeferrableWrite),
        };
        // A deferrable shape holds no function other than the clock and random ones
        // it reads as values (ADR 0030); a call of any other is the reason.
        if !stmt.functions.iter().all(is_clock_function) {
            return Err(Fallback::Function);
        }
        let catalog = self.routing_catalog().ok_or(Fallback::CatalogNotLoaded)?;
        let rel = shape.table();
        let set = w.tables();
        let name = target(&set, &catalog, rel.schema.as_deref(), &rel.name)?.to_owned();
        // Reads of other tables (none in a deferrable shape) would need their own rules.
        // A table a reload is moving off deferral runs write-through from now on.
        let table = set.deferring(&name).ok_or(Fallback::PolicyReloading)?;
        if table.config.when_full == spillway_policies::WhenFull::WriteThrough && w.is_full(&name) {
            return Err(Fallback::Full);
        }
        // An autocommit statement's transaction starts now, a pipelined cycle's when
        // its writes are decided; a held one's started at its BEGIN (ADR 0030).
        let statement = std::time::SystemTime::now();
        let began = match &self.tx.held {
            Some(h) => Some(h.began),
            None => self.tx.cycle_began,
        };
        let settings = Settings {
            time_zone,
            date_style,
            now: began.unwrap_or(statement),
            statement,
        };
        let converted = convert::convert(shape, table, bound, settings, &w.reservations)?;
        Ok((name, converted))
    }

    /// Whether `analysis` is a write spillway may answer itself, for an extended cycle
    /// deciding whether to wait for its Sync: a deferrable shape on a deferred table.
    pub(super) fn may_defer(&self, analysis: &Analysis) -> bool {
        let (Some(w), [stmt]) = (&self.writes, analysis.statements.as_slice()) else {
            return false;
        };
        let Some(Ok(shape)) = &stmt.shape else {
            return false;
        };
        let rel = shape.table();
        let set = w.service.tables();
        match self.routing_catalog() {
            Some(catalog) => target(&set, &catalog, rel.schema.as_deref(), &rel.name).is_ok(),
            None => !set.names_like(rel.schema.as_deref(), &rel.name).is_empty(),
        }
    }
}

/// Whether `f` is one of the functions a deferrable shape reads as a value
/// (`classify::Clock`): by its bare or `pg_catalog.` name.
fn is_clock_function(f: &crate::read::classify::FuncName) -> bool {
    f.schema.as_deref().is_none_or(|s| s == "pg_catalog")
        && matches!(
            f.name.as_str(),
            "now"
                | "transaction_timestamp"
                | "statement_timestamp"
                | "clock_timestamp"
                | "gen_random_uuid"
        )
}

/// The deferred tables `analysis` writes, for counting its fallbacks.
pub(super) fn written_tables(c: &Caching, w: &WriteService, analysis: &Analysis) -> Vec<String> {
    let catalog = c.routing_catalog();
    let touch = Touch::of(&w.tables(), catalog.as_deref(), &[analysis]);
    written(analysis, &touch.tables)
        .into_iter()
        .cloned()
        .collect()
}

/// Counts a guarded write (ADR 0035) that moved upstream, its own statement or its
/// held transaction, because spillway did not know its row exactly.
pub(super) fn note_row_unknown(table: &str) {
    metrics::counter!(
        crate::metrics::GUARDED_WRITES,
        "table" => table.to_owned(),
        "outcome" => "row_unknown"
    )
    .increment(1);
}

/// Counts a write that runs write-through instead of being deferred.
pub(super) fn note_fallback(w: &WriteService, table: &str, reason: Fallback) {
    w.fallbacks.note(table, reason);
    metrics::counter!(
        crate::metrics::FALLBACKS,
        "table" => table.to_owned(),
        "reason" => reason.label()
    )
    .increment(1);
    metrics::counter!(
        crate::metrics::CLIENT_WRITES,
        "table" => table.to_owned(),
        "policy" => "write-through"
    )
    .increment(1);
}
