//! Deferred tables in a session (SPEC §6): a deferrable autocommit statement on a
//! write-behind/write-back table is journaled and acknowledged by spillway; anything
//! else that touches such a table while it has pending writes first waits for them to
//! be applied upstream (a barrier), as its table's `consistency` requires.
//!
//! Both waits use the handler's Blocked mechanism: the message stays with the relay,
//! the wait runs as the handler's future, and the re-offered message finds the result
//! here ([`Caching::resume`]). Nothing behind it is read meanwhile, so order holds.
//!
//! Invariants:
//! - A statement is deferred only alone in its request, in autocommit, with nothing
//!   outstanding upstream (a deferrable statement behind unanswered requests waits
//!   for their answers, then is decided), when spillway can resolve its table to
//!   exactly one deferred table and its values to text; everything else is a fallback
//!   (write-through after a barrier).
//! - A barrier is waited for once per message: the re-offered message goes on even if
//!   newer writes arrived meanwhile (they are concurrent with it), so a busy table
//!   cannot starve a reader.
//! - The cache entries of a table are invalidated when a deferred write to it is
//!   acknowledged (and again when it is applied, by the flusher).

use std::sync::{Arc, Mutex};

use bytes::BytesMut;

use super::{Caching, Disposition, Out, Stmt, returning};
use crate::protocol::backend::{self, Severity};
use crate::protocol::frontend;
use crate::protocol::sqlstate::SqlState;
use crate::read::classify::{Analysis, Kind};
use crate::write::convert::{self, Bound, Verb};
use crate::write::fallbacks::Fallback;
use crate::write::returning::Returning;
use crate::write::service::{DeferError, Outcome, WriteService};

pub(super) type Slot<T> = Arc<Mutex<Option<Result<T, DeferError>>>>;

/// A request's only statement, as far as deferring it goes.
pub(super) struct Single<'a> {
    pub bound: &'a Bound,
    /// Answers an extended cycle gives before the command tag.
    pub before: BytesMut,
    /// Answers it gives after the command tag (CloseComplete of the unnamed portal
    /// the cycle closes, as sqlx does).
    pub after: BytesMut,
    pub extended: bool,
    pub unnamed: Option<Arc<Stmt>>,
}

/// What a Blocked message is waiting for.
pub(super) enum Waiting {
    Ack {
        slot: Slot<Outcome>,
        verb: Verb,
        table: u32,
        /// Answers that precede the command tag (ParseComplete, BindComplete, NoData).
        before: BytesMut,
        /// Answers that follow it (CloseComplete).
        after: BytesMut,
        /// The statement came in an extended cycle (the held messages are answered).
        extended: bool,
        /// The unnamed statement that cycle parsed (answered locally).
        unnamed: Option<Arc<Stmt>>,
        /// For the `deferred` latency histogram and the write counter.
        started: std::time::Instant,
        table_name: String,
        policy: &'static str,
        /// Rows answered for RETURNING (see `returning.rs`).
        returning: Option<Returning>,
    },
    Barrier {
        slot: Slot<()>,
    },
    /// A held transaction's statement, COMMIT, or move upstream (`held.rs`).
    Held(super::held::Wait),
}

pub(super) fn take<T>(slot: &Slot<T>) -> Option<Result<T, DeferError>> {
    match slot.lock() {
        Ok(mut s) => s.take(),
        Err(poisoned) => poisoned.into_inner().take(),
    }
}

pub(super) fn put<T>(slot: &Slot<T>, value: Result<T, DeferError>) {
    match slot.lock() {
        Ok(mut s) => *s = Some(value),
        Err(poisoned) => *poisoned.into_inner() = Some(value),
    }
}

impl Caching {
    /// A re-offered message after a deferred ack or a barrier. `Some` when the message
    /// is answered here; `None` to process it normally (barrier passed, or the write
    /// must run write-through after all).
    pub(super) fn resume(&mut self, tag: u8, out: &mut Out<'_>) -> Option<Disposition> {
        match self.waiting.take()? {
            Waiting::Held(wait) => self.resume_held(wait, tag, out),
            Waiting::Barrier { slot } => match take(&slot) {
                Some(Ok(())) | None => {
                    self.barrier_passed = true;
                    None
                }
                Some(Err(e)) => {
                    self.barrier_passed = false;
                    Some(self.fail(tag, &e, BytesMut::new(), out))
                }
            },
            Waiting::Ack {
                slot,
                verb,
                table,
                before,
                after,
                extended,
                unnamed,
                started,
                table_name,
                policy,
                returning,
            } => match take(&slot) {
                Some(Ok(outcome)) => {
                    self.metrics.deferred.record(started.elapsed());
                    metrics::counter!(
                        crate::metrics::CLIENT_WRITES,
                        "table" => table_name,
                        "policy" => policy
                    )
                    .increment(1);
                    if let Some(seq) = outcome.seq {
                        self.own_seq = self.own_seq.max(seq);
                        self.db.versions.bump_tables([table]);
                    }
                    out.state.on_frontend(tag);
                    let before = returning::answers(
                        returning.as_ref(),
                        before,
                        extended,
                        Some(outcome.rows),
                    );
                    out.client.extend_from_slice(&before);
                    out.client
                        .extend_from_slice(&frontend::command_complete(&verb.tag(outcome.rows)));
                    out.client.extend_from_slice(&after);
                    self.answer_ready(out);
                    if extended {
                        self.finish_local_cycle(unnamed);
                    } else {
                        self.forget_unnamed();
                    }
                    Some(Disposition::Consumed)
                }
                Some(Err(DeferError::NotPermitted { .. } | DeferError::NotDeferred(_))) | None => {
                    // Run it write-through (after its barrier): PostgreSQL answers as
                    // it would directly.
                    self.no_defer = true;
                    None
                }
                Some(Err(e)) => {
                    let before = returning::answers(returning.as_ref(), before, extended, None);
                    let d = self.fail(tag, &e, before, out);
                    if extended {
                        self.finish_local_cycle(unnamed);
                    }
                    Some(d)
                }
            },
        }
    }

    /// An extended cycle answered here: its held messages are done; a Parse of the
    /// unnamed statement in it is now the client's (parsed upstream lazily).
    pub(super) fn finish_local_cycle(&mut self, unnamed: Option<Arc<Stmt>>) {
        self.held.clear();
        self.held_bytes = 0;
        self.portals.remove("");
        if let Some(stmt) = unnamed {
            self.unnamed_pending = !self
                .unnamed_upstream
                .as_ref()
                .is_some_and(|u| u.same_as(&stmt));
            self.unnamed_client = Some(stmt);
        }
    }

    /// Answers the re-offered request with `err` (after `before`) and ReadyForQuery.
    fn fail(
        &mut self,
        tag: u8,
        err: &DeferError,
        before: BytesMut,
        out: &mut Out<'_>,
    ) -> Disposition {
        out.state.on_frontend(tag);
        out.client.extend_from_slice(&before);
        let code = match err.sqlstate() {
            "53000" => SqlState::INSUFFICIENT_RESOURCES,
            "23505" => SqlState::UNIQUE_VIOLATION,
            "08006" => SqlState::CONNECTION_FAILURE,
            _ => SqlState::INTERNAL_ERROR,
        };
        let mut msg = backend::error_response(Severity::Error, code, &err.to_string()).to_vec();
        if let DeferError::Duplicate { detail, .. } = err {
            msg = backend::error_response_with_detail(
                Severity::Error,
                code,
                &err.to_string(),
                detail,
            )
            .to_vec();
        }
        out.client.extend_from_slice(&msg);
        if tag == frontend::SYNC {
            self.held.clear();
            self.held_bytes = 0;
        }
        self.answer_ready(out);
        Disposition::Consumed
    }

    /// Deferred tables a write in `analysis` reaches beyond its own tables: those a
    /// foreign key links a written table to (its checks and actions read and write
    /// them), and, with `true`, any table (a written table has triggers or rules).
    /// Only a write that runs upstream needs them applied first.
    fn linked(&self, analysis: &Analysis) -> (Vec<String>, bool) {
        let (Some(w), Some(catalog)) = (&self.writes, self.routing_catalog()) else {
            return (Vec::new(), false);
        };
        let mut out: Vec<String> = Vec::new();
        let mut all = false;
        for stmt in &analysis.statements {
            if !matches!(
                stmt.kind,
                Kind::Write | Kind::Truncate { .. } | Kind::Ddl { .. }
            ) {
                continue;
            }
            for rel in stmt.writes.iter().chain(&stmt.ddl_targets) {
                for r in catalog.resolve(rel.schema.as_deref(), &rel.name) {
                    all |= r.write_side_effects;
                    for oid in catalog.foreign_key_links(r.oid) {
                        if let Some(name) = w.tables().name_of(*oid)
                            && !out.iter().any(|n| n == name)
                        {
                            out.push(name.to_owned());
                        }
                    }
                }
            }
        }
        (out, all)
    }

    /// The deferred tables `analysis` touches (read, written, or altered), by name;
    /// `all` when it may touch anything (unanalysed, unknown side effects, DDL without
    /// named targets).
    fn touched(&self, analysis: &Analysis) -> (Vec<String>, bool) {
        let Some(w) = &self.writes else {
            return (Vec::new(), false);
        };
        if analysis.unanalysed {
            return (Vec::new(), true);
        }
        let catalog = self.routing_catalog();
        let mut out: Vec<String> = Vec::new();
        let mut all = false;
        for stmt in &analysis.statements {
            // A user-defined volatile function (or one spillway does not know) may
            // write any table; so may DO, CALL and the like.
            let may_write_anything = stmt.functions.iter().any(|f| {
                catalog
                    .as_ref()
                    .and_then(|c| c.function(&f.name))
                    .is_none_or(|info| info.user_volatile)
            });
            if matches!(stmt.kind, Kind::Unknown) || may_write_anything {
                all = true;
            }
            if matches!(stmt.kind, Kind::Ddl { .. }) && stmt.ddl_targets.is_empty() {
                all = true;
            }
            for rel in stmt
                .reads
                .iter()
                .chain(&stmt.writes)
                .chain(&stmt.ddl_targets)
            {
                match &catalog {
                    Some(c) => {
                        for r in c.resolve(rel.schema.as_deref(), &rel.name) {
                            let mut oids = vec![r.oid];
                            let _ = c.read_dependencies(r, &mut oids);
                            // Pending writes to a table one of these references change
                            // them when applied (ON DELETE / ON UPDATE actions).
                            let read = oids.clone();
                            for oid in read {
                                oids.extend_from_slice(c.foreign_key_parents(oid));
                            }
                            for oid in oids {
                                if let Some(name) = w.tables().name_of(oid)
                                    && !out.iter().any(|n| n == name)
                                {
                                    out.push(name.to_owned());
                                }
                            }
                        }
                    }
                    // No catalog: match deferred tables by name alone.
                    None => {
                        for name in w.tables().names_like(rel.schema.as_deref(), &rel.name) {
                            if !out.contains(&name) {
                                out.push(name);
                            }
                        }
                    }
                }
            }
        }
        (out, all)
    }

    /// Routes a request with deferred tables in mind: `Some` when it is deferred or
    /// must first wait for a barrier (the message is then Blocked), `None` to go on.
    /// `single`: the request's only statement, with its bound parameters, and the
    /// answers an extended cycle gives before its command tag.
    pub(super) fn route_writes(
        &mut self,
        analyses: &[&Analysis],
        single: Option<Single<'_>>,
        out: &mut Out<'_>,
    ) -> Option<Disposition> {
        let w = self.writes.clone()?;
        if self.held_tx.is_some() {
            return self.route_held(analyses, single, out);
        }
        let mut single = single;
        if let Some(d) = self.try_hold(analyses, &mut single, out) {
            return Some(d);
        }
        let mut touched = Vec::new();
        let mut all = false;
        for a in analyses {
            let (t, every) = self.touched(a);
            all |= every;
            for name in t {
                if !touched.contains(&name) {
                    touched.push(name);
                }
            }
        }
        let mut linked = Vec::new();
        let mut linked_all = false;
        for a in analyses {
            let (l, every) = self.linked(a);
            linked_all |= every;
            linked.extend(l);
        }
        if touched.is_empty() && !all && linked.is_empty() && !linked_all {
            return None;
        }
        if let (Some(single), [analysis]) = (single, analyses)
            && !self.no_defer
        {
            // Pipelined behind requests still unanswered (a client's Close + Sync, say),
            // whether it runs in autocommit is not known yet: wait for their answers
            // rather than run write-through.
            if self.tracker.awaits_answers()
                && matches!(analysis.statements.as_slice(), [s] if matches!(s.shape, Some(Ok(_))))
            {
                let quiet = self.quiet.clone();
                self.wait = Some(Box::pin(async move { quiet.notified().await }));
                return Some(Disposition::Blocked);
            }
            match self.deferrable(analysis, single.bound, out) {
                Ok((table, mut converted)) => {
                    let returning = converted.returning.take();
                    let slot: Slot<Outcome> = Arc::new(Mutex::new(None));
                    let verb = converted.verb;
                    let tables = w.tables();
                    let oid = tables.oid_of(&table).unwrap_or(0);
                    let policy = tables
                        .deferring(&table)
                        .map_or("write-behind", |t| t.config.policy.as_str());
                    drop(tables);
                    let fut_slot = slot.clone();
                    let user = self.user.clone();
                    let service = w.clone();
                    let table_name = table.clone();
                    self.wait = Some(Box::pin(async move {
                        let r = service.defer(&user, &table, converted).await;
                        put(&fut_slot, r);
                    }));
                    self.waiting = Some(Waiting::Ack {
                        slot,
                        verb,
                        table: oid,
                        before: single.before,
                        after: single.after,
                        extended: single.extended,
                        unnamed: single.unnamed,
                        started: std::time::Instant::now(),
                        table_name,
                        policy,
                        returning,
                    });
                    return Some(Disposition::Blocked);
                }
                Err(reason) => {
                    // `when_full = "write-through"`: the barrier below makes room, but
                    // the decision stands for this write.
                    if reason == Fallback::Full {
                        self.no_defer = true;
                    }
                    let writes_to: Vec<&String> = analysis
                        .statements
                        .iter()
                        .filter(|s| matches!(s.kind, Kind::Write | Kind::Truncate { .. }))
                        .flat_map(|s| s.writes.iter())
                        .filter_map(|rel| {
                            touched
                                .iter()
                                .find(|t| t.ends_with(&format!(".{}", rel.name)))
                        })
                        .collect();
                    // Counted once per message (a re-offer after the barrier is the
                    // same write).
                    if !self.barrier_passed {
                        for table in writes_to {
                            w.fallbacks.note(table, reason);
                            metrics::counter!(
                                crate::metrics::FALLBACKS,
                                "table" => table.clone(),
                                "reason" => reason.label()
                            )
                            .increment(1);
                            metrics::counter!(
                                crate::metrics::CLIENT_WRITES,
                                "table" => table.clone(),
                                "policy" => "write-through"
                            )
                            .increment(1);
                        }
                    }
                }
            }
        }
        if std::mem::take(&mut self.barrier_passed) {
            self.no_defer = false;
            return None;
        }
        // Reads may skip the barrier as the tables' consistency allows; writes, DDL
        // and anything unknown never do.
        let read_only = analyses.iter().all(|a| {
            !a.unanalysed
                && a.statements
                    .iter()
                    .all(|s| matches!(s.kind, Kind::Select | Kind::OtherRead | Kind::Empty))
        });
        let set = w.tables();
        let names: Vec<String> = if all || linked_all {
            set.names().cloned().collect()
        } else {
            touched.into_iter().chain(linked).collect()
        };
        let Some(target) = w.barrier(names.iter().map(String::as_str), read_only, self.own_seq)
        else {
            self.no_defer = false;
            return None;
        };
        if self.detached {
            // The barrier would only precede a trip upstream that cannot happen.
            return Some(Disposition::NeedsUpstream);
        }
        Some(self.barrier(w, target))
    }

    /// Blocks the current message until `target` is applied upstream.
    pub(super) fn barrier(&mut self, w: Arc<WriteService>, target: u64) -> Disposition {
        let slot: Slot<()> = Arc::new(Mutex::new(None));
        let fut_slot = slot.clone();
        self.wait = Some(Box::pin(async move {
            let r = w.wait_applied(target).await;
            put(&fut_slot, r);
        }));
        self.waiting = Some(Waiting::Barrier { slot });
        Disposition::Blocked
    }

    /// The deferred table and row operations of `analysis`, or why it is not deferred.
    pub(super) fn deferrable(
        &self,
        analysis: &Analysis,
        bound: &Bound,
        out: &Out<'_>,
    ) -> Result<(String, convert::Converted), Fallback> {
        let w = self.writes.as_ref().ok_or(Fallback::NotDeferred)?;
        let [stmt] = analysis.statements.as_slice() else {
            return Err(Fallback::MultipleStatements);
        };
        let shape = match &stmt.shape {
            Some(Ok(shape)) => shape,
            Some(Err(reason)) => return Err(Fallback::Shape(reason)),
            None => return Err(Fallback::NotADeferrableWrite),
        };
        // A held transaction's statements are decided like autocommit ones (held.rs).
        if (out.state.tx_status != b'I' && self.held_tx.is_none()) || !self.tracker.is_quiet() {
            return Err(Fallback::InTransaction);
        }
        if !self.key.usable() {
            return Err(Fallback::SessionState);
        }
        // Literal text and bytes mean what the flusher's connection reads them as only
        // with these settings (UTF-8, backslashes literal in '…').
        let param = |name: &str| out.state.params.get(name).map(String::as_str);
        if param("client_encoding") != Some("UTF8")
            || param("standard_conforming_strings") != Some("on")
        {
            return Err(Fallback::SessionSettings);
        }
        // PostgreSQL refuses the write (25006); it says so itself.
        if param("default_transaction_read_only") == Some("on") {
            return Err(Fallback::ReadOnly);
        }
        if !stmt.functions.is_empty() || stmt.sql_value_function {
            return Err(Fallback::Function);
        }
        let catalog = self.routing_catalog().ok_or(Fallback::CatalogNotLoaded)?;
        let rel = shape.table();
        let candidates = catalog.resolve(rel.schema.as_deref(), &rel.name);
        let [relation] = candidates.as_slice() else {
            return Err(Fallback::AmbiguousTable);
        };
        let set = w.tables();
        let name = set
            .name_of(relation.oid)
            .ok_or(Fallback::NotDeferred)?
            .to_owned();
        // Reads of other tables (none in a deferrable shape) would need their own rules.
        // A table a reload is moving off deferral runs write-through from now on.
        let table = set.deferring(&name).ok_or(Fallback::PolicyReloading)?;
        if table.config.when_full == spillway_policies::WhenFull::WriteThrough && w.is_full(&name) {
            return Err(Fallback::Full);
        }
        let converted = convert::convert(shape, table, bound)?;
        Ok((name, converted))
    }
}

impl Caching {
    /// At a Sync that ends a held cycle: defers the cycle when it is one deferrable
    /// statement ([Parse] Bind [Describe portal] Execute, unnamed), or holds it for a
    /// barrier when it touches deferred tables with pending writes.
    pub(super) fn route_cycle(&mut self, out: &mut Out<'_>) -> Option<Disposition> {
        self.writes.as_ref()?;
        let mut unnamed = self.unnamed_client.clone();
        let mut parsed = None;
        let mut before = BytesMut::new();
        let mut after = BytesMut::new();
        let mut named_here: Vec<(String, Arc<Stmt>)> = Vec::new();
        let mut bound: Option<(Arc<Stmt>, Bound)> = None;
        let mut executed: Vec<Arc<Stmt>> = Vec::new();
        let mut simple_shape = true;
        let mut described: Option<Arc<Stmt>> = None;
        let held = std::mem::take(&mut self.held);
        for m in &held {
            let body = frontend::body(m);
            match m[0] {
                frontend::PARSE => match frontend::parse(body) {
                    Some(p) if p.name.is_empty() => {
                        let stmt = self.statement(&p, m, unnamed.as_ref());
                        unnamed = Some(stmt.clone());
                        parsed = Some(stmt);
                        before.extend_from_slice(frontend::PARSE_COMPLETE);
                    }
                    // A named statement prepared and executed in one cycle (pgjdbc's
                    // first server-side run): not deferred, but what it executes must
                    // still get its barrier.
                    Some(p) => {
                        simple_shape = false;
                        let stmt = self.statement(&p, m, None);
                        named_here.push((p.name.to_owned(), stmt));
                    }
                    None => simple_shape = false,
                },
                frontend::BIND => match frontend::bind(body) {
                    Some(b) => {
                        let stmt = if b.statement.is_empty() {
                            unnamed.clone()
                        } else {
                            named_in(&named_here, b.statement)
                                .or_else(|| self.named.get(b.statement).cloned())
                        };
                        let params = frontend::bind_params(b.params_and_formats);
                        match (stmt, params) {
                            (Some(stmt), Some(params))
                                if b.portal.is_empty() && bound.is_none() =>
                            {
                                let types = frontend::param_type_oids(&stmt.param_types);
                                let (binary, values) = params
                                    .into_iter()
                                    .map(|(bin, v)| (bin, v.map(<[u8]>::to_vec)))
                                    .unzip();
                                before.extend_from_slice(frontend::BIND_COMPLETE);
                                bound = Some((
                                    stmt,
                                    Bound {
                                        values,
                                        binary,
                                        types,
                                        result_formats: b
                                            .result_formats
                                            .chunks_exact(2)
                                            .map(|c| i16::from_be_bytes([c[0], c[1]]))
                                            .collect(),
                                        max_rows: 0,
                                    },
                                ));
                            }
                            (Some(stmt), _) => {
                                simple_shape = false;
                                executed.push(stmt);
                            }
                            (None, _) => simple_shape = false,
                        }
                    }
                    None => simple_shape = false,
                },
                frontend::DESCRIBE => match frontend::target(body) {
                    Some(t) if t.kind == b'P' && t.name.is_empty() && bound.is_some() => {
                        before.extend_from_slice(frontend::NO_DATA);
                    }
                    // The unnamed statement with every parameter type declared
                    // (tokio-postgres's `query_typed`): PostgreSQL would describe
                    // exactly those types, provided Bind gives as many values (checked
                    // below), and a deferrable write returns no rows.
                    Some(t) if t.kind == b'S' && t.name.is_empty() => {
                        match unnamed
                            .as_ref()
                            .and_then(|s| frontend::parameter_description(&s.param_types))
                        {
                            Some(description) => {
                                before.extend_from_slice(&description);
                                before.extend_from_slice(frontend::NO_DATA);
                                described = unnamed.clone();
                            }
                            None => simple_shape = false,
                        }
                    }
                    _ => simple_shape = false,
                },
                frontend::EXECUTE => match frontend::execute(body) {
                    Some(e) if e.portal.is_empty() && bound.is_some() => {
                        if let Some((stmt, b)) = &mut bound {
                            b.max_rows = e.max_rows;
                            if executed.iter().any(|s| Arc::ptr_eq(s, stmt)) {
                                simple_shape = false;
                            }
                            executed.push(stmt.clone());
                        }
                    }
                    Some(e) => {
                        simple_shape = false;
                        if let Some(stmt) = self.portals.get(e.portal) {
                            executed.push(stmt.clone());
                        }
                    }
                    None => simple_shape = false,
                },
                // The unnamed portal closed after its Execute (sqlx): CloseComplete
                // follows the command tag.
                frontend::CLOSE => match frontend::target(body) {
                    Some(t) if t.kind == b'P' && t.name.is_empty() && !executed.is_empty() => {
                        after.extend_from_slice(frontend::CLOSE_COMPLETE);
                    }
                    _ => simple_shape = false,
                },
                _ => simple_shape = false,
            }
        }
        self.held = held;
        if let Some(d) = &described {
            // The statement described must be the one executed, with one value per
            // declared type (else PostgreSQL would answer differently, or refuse).
            let declared = d.param_types.len() / 4;
            if !bound
                .as_ref()
                .is_some_and(|(s, b)| Arc::ptr_eq(s, d) && b.values.len() == declared)
            {
                simple_shape = false;
            }
        }
        let analyses: Vec<Arc<Analysis>> = executed.iter().map(|s| s.analysis.clone()).collect();
        let refs: Vec<&Analysis> = analyses.iter().map(AsRef::as_ref).collect();
        let single = match (&bound, simple_shape && executed.len() == 1) {
            (Some((_, b)), true) => Some(Single {
                bound: b,
                before,
                after,
                extended: true,
                unnamed: parsed,
            }),
            _ => None,
        };
        // `SPILLWAY FLUSH` sent in the extended protocol: answered here, like the
        // simple Query (PostgreSQL would not parse it). Its unnamed statement exists
        // only here; executing it again without a new Parse gets PostgreSQL's error.
        let flush = match (&single, executed.as_slice()) {
            (Some(s), [stmt]) if s.bound.values.is_empty() => {
                super::flush::spillway_flush(&stmt.sql)
            }
            _ => None,
        };
        if let Some(table) = flush {
            return Some(self.flush_command(table.as_deref(), single, out));
        }
        self.route_writes(&refs, single, out)
    }

    /// Before extended-protocol messages go upstream without waiting for their Sync
    /// (a Flush or Close, too much held, or an Execute in a cycle already upstream):
    /// a barrier when what they execute touches deferred tables with pending writes.
    pub(super) fn route_forwarding(
        &mut self,
        tag: u8,
        msg: &[u8],
        out: &mut Out<'_>,
    ) -> Option<Disposition> {
        self.writes.as_ref()?;
        let mut executed: Vec<Arc<Stmt>> = Vec::new();
        let mut unnamed = self.unnamed_client.clone();
        let mut named_here: Vec<(String, Arc<Stmt>)> = Vec::new();
        let held = std::mem::take(&mut self.held);
        for m in held.iter().map(|b| &b[..]).chain(std::iter::once(msg)) {
            let body = frontend::body(m);
            match m[0] {
                frontend::PARSE => match frontend::parse(body) {
                    Some(p) if p.name.is_empty() => {
                        unnamed = Some(self.statement(&p, m, unnamed.as_ref()));
                    }
                    Some(p) => {
                        let stmt = self.statement(&p, m, None);
                        named_here.push((p.name.to_owned(), stmt));
                    }
                    None => {}
                },
                frontend::BIND => {
                    if let Some(b) = frontend::bind(body) {
                        let stmt = if b.statement.is_empty() {
                            unnamed.clone()
                        } else {
                            named_in(&named_here, b.statement)
                                .or_else(|| self.named.get(b.statement).cloned())
                        };
                        executed.extend(stmt);
                    }
                }
                frontend::EXECUTE if tag == frontend::EXECUTE && self.cycle_upstream => {
                    if let Some(stmt) =
                        frontend::execute(body).and_then(|e| self.portals.get(e.portal))
                    {
                        executed.push(stmt.clone());
                    }
                }
                _ => {}
            }
        }
        self.held = held;
        if executed.is_empty() {
            return None;
        }
        let analyses: Vec<Arc<Analysis>> = executed.iter().map(|s| s.analysis.clone()).collect();
        let refs: Vec<&Analysis> = analyses.iter().map(AsRef::as_ref).collect();
        self.route_writes(&refs, None, out)
    }
}

/// The statement a Parse earlier in the same cycle named `name` (the latest one).
fn named_in(parsed: &[(String, Arc<Stmt>)], name: &str) -> Option<Arc<Stmt>> {
    parsed
        .iter()
        .rev()
        .find(|(n, _)| n == name)
        .map(|(_, s)| s.clone())
}
