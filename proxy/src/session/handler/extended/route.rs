//! Routing an extended cycle with deferred tables in mind.
//!
//! A cycle spillway may answer itself is one statement: [Parse] Bind [Describe]
//! Execute [Close], on the unnamed portal, of a deferrable write on a deferred table,
//! a `BEGIN` it may hold, or `SPILLWAY FLUSH`. [`Shape`] follows that as the messages
//! arrive, so a cycle that cannot be one goes upstream at once; at its Sync,
//! [`Caching::route_cycle`] builds the statement's parameters and answers and hands it
//! to the deferred-write routing (`deferred.rs`, `held/`, `flush.rs`). Messages that go
//! upstream before their Sync first get the barrier what they execute needs
//! ([`Caching::route_forwarding`]).
//!
//! Invariants: [`Shape`] says "possible" whenever `route_cycle` could answer the cycle
//! (it may say so of cycles that then go upstream at their Sync, never the reverse);
//! nothing a cycle executes reaches PostgreSQL before the barrier its tables need,
//! named statements parsed earlier in the cycle included.

use std::sync::Arc;

use bytes::BytesMut;

use super::super::answer::{Answer, Single};
use super::super::flush::spillway_flush;
use super::super::held::holdable;
use super::super::pipeline::{self, Routed};
use super::super::statements::Stmt;
use super::super::{Caching, Disposition};
use crate::protocol::frontend;
use crate::read::classify::Analysis;
use crate::session::state::Outbox;
use crate::write::convert::Bound;

/// Whether the held messages may still be one statement spillway answers itself.
#[derive(Default, Clone)]
pub struct Shape {
    impossible: bool,
    /// The unnamed statement as the cycle parsed it.
    parsed: Option<Arc<Stmt>>,
    /// The statement bound to the unnamed portal.
    bound: Option<Arc<Stmt>>,
    executed: bool,
}

impl Shape {
    pub fn impossible() -> Self {
        Self {
            impossible: true,
            ..Self::default()
        }
    }

    /// Whether the cycle so far may still be answered here (`possible` of `c`).
    pub fn possible(&self, c: &Caching) -> bool {
        if self.impossible || c.writes.is_none() {
            return false;
        }
        // The statement bound, else the one parsed, else the client's unnamed one (a
        // Describe of it may come first).
        match self
            .bound
            .as_ref()
            .or(self.parsed.as_ref())
            .or(c.stmts.client_unnamed())
        {
            Some(stmt) => c.answers_itself(&stmt.analysis, &stmt.sql),
            None => true,
        }
    }
}

impl Caching {
    /// A statement spillway may answer in an extended cycle of its own.
    fn answers_itself(&self, analysis: &Analysis, sql: &str) -> bool {
        self.may_defer(analysis) || holdable(analysis).is_some() || spillway_flush(sql).is_some()
    }

    /// The shape with `msg` added. `parsed`: the statement `msg` parses, if a Parse.
    pub(super) fn step_shape(&self, msg: &[u8], parsed: Option<&(String, Arc<Stmt>)>) -> Shape {
        if self.writes.is_none() {
            return Shape::impossible();
        }
        let mut s = if self.cycle.held.is_empty() {
            Shape::default()
        } else {
            self.cycle.shape.clone()
        };
        if s.impossible {
            return s;
        }
        let unnamed = |s: &Shape| {
            s.parsed
                .clone()
                .or_else(|| self.stmts.client_unnamed().cloned())
        };
        let body = frontend::body(msg);
        let ok = match msg[0] {
            frontend::PARSE => match parsed {
                Some((name, stmt)) if name.is_empty() => {
                    s.parsed = Some(stmt.clone());
                    true
                }
                _ => false,
            },
            frontend::BIND => match frontend::bind(body) {
                // A Bind after the portal's Execute: a pipelined cycle (`pipeline.rs`).
                Some(b)
                    if b.portal.is_empty()
                        && (s.bound.is_none() || s.executed)
                        && frontend::bind_params(b.params_and_formats).is_some() =>
                {
                    let stmt = if b.statement.is_empty() {
                        unnamed(&s)
                    } else {
                        // Maybe parsed ahead of this cycle, not confirmed yet.
                        self.stmts
                            .named(b.statement)
                            .cloned()
                            .or_else(|| named_in(&self.cycle.named, b.statement))
                    };
                    s.bound = stmt;
                    s.executed = false;
                    s.bound.is_some()
                }
                _ => false,
            },
            frontend::DESCRIBE => match frontend::target(body) {
                Some(t) if t.kind == b'P' && t.name.is_empty() => s.bound.is_some(),
                Some(t) if t.kind == b'S' && t.name.is_empty() => unnamed(&s)
                    .is_some_and(|st| frontend::parameter_description(&st.param_types).is_some()),
                _ => false,
            },
            frontend::EXECUTE => match frontend::execute(body) {
                Some(e) if e.portal.is_empty() && s.bound.is_some() && !s.executed => {
                    s.executed = true;
                    true
                }
                _ => false,
            },
            frontend::CLOSE => frontend::target(body)
                .is_some_and(|t| t.kind == b'P' && t.name.is_empty() && s.executed),
            _ => false,
        };
        if ok { s } else { Shape::impossible() }
    }

    /// At a Sync that ends a held cycle: defers the cycle when it is one deferrable
    /// statement ([Parse] Bind [Describe portal] Execute, unnamed), or holds it for a
    /// barrier when it touches deferred tables with pending writes.
    pub(in super::super) fn route_cycle(&mut self, out: &mut Outbox) -> Option<Disposition> {
        self.writes.as_ref()?;
        let mut unnamed = self.stmts.client_unnamed().cloned();
        let mut parsed = None;
        let mut before = BytesMut::new();
        let mut after = BytesMut::new();
        let mut named_here: Vec<(String, Arc<Stmt>)> = Vec::new();
        let mut bound: Option<(Arc<Stmt>, Bound)> = None;
        let mut executed: Vec<Arc<Stmt>> = Vec::new();
        // What each Execute runs (`executed` also has what the Binds bound), for the
        // fallback counters.
        let mut ran: Vec<Arc<Stmt>> = Vec::new();
        let mut last_bound: Option<Arc<Stmt>> = None;
        let mut simple_shape = true;
        let mut described: Option<Arc<Stmt>> = None;
        let mut pipe = pipeline::Builder::default();
        let held = std::mem::take(&mut self.cycle.held);
        for m in &held {
            let body = frontend::body(m);
            match m[0] {
                frontend::PARSE => match frontend::parse(body) {
                    Some(p) if p.name.is_empty() => {
                        let stmt = self.statement(&p, m, unnamed.as_ref());
                        unnamed = Some(stmt.clone());
                        parsed = Some(stmt);
                        before.extend_from_slice(frontend::PARSE_COMPLETE);
                        pipe.answer(frontend::PARSE_COMPLETE);
                    }
                    // A named statement prepared and executed in one cycle (pgjdbc's
                    // first server-side run): not deferred, but what it executes must
                    // still get its barrier.
                    Some(p) => {
                        simple_shape = false;
                        pipe.break_off();
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
                                .or_else(|| self.stmts.named(b.statement).cloned())
                        };
                        if b.portal.is_empty() {
                            last_bound.clone_from(&stmt);
                        }
                        let params = frontend::bind_params(b.params_and_formats);
                        let values = match (&stmt, params) {
                            (Some(stmt), Some(params)) if b.portal.is_empty() => {
                                Some(bound_of(stmt, params, b.result_formats))
                            }
                            _ => None,
                        };
                        match (stmt, values) {
                            (Some(stmt), Some(values)) if bound.is_none() => {
                                before.extend_from_slice(frontend::BIND_COMPLETE);
                                pipe.bind(stmt.clone(), values.clone(), frontend::BIND_COMPLETE);
                                bound = Some((stmt, values));
                            }
                            (Some(stmt), values) => {
                                simple_shape = false;
                                match values {
                                    Some(v) => {
                                        pipe.bind(stmt.clone(), v, frontend::BIND_COMPLETE);
                                    }
                                    None => pipe.break_off(),
                                }
                                executed.push(stmt);
                            }
                            (None, _) => {
                                simple_shape = false;
                                pipe.break_off();
                            }
                        }
                    }
                    None => {
                        simple_shape = false;
                        pipe.break_off();
                    }
                },
                frontend::DESCRIBE => match frontend::target(body) {
                    Some(t) if t.kind == b'P' && t.name.is_empty() && bound.is_some() => {
                        before.extend_from_slice(frontend::NO_DATA);
                        pipe.describe_portal(frontend::NO_DATA);
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
                                pipe.break_off();
                            }
                            None => simple_shape = false,
                        }
                    }
                    _ => {
                        simple_shape = false;
                        pipe.break_off();
                    }
                },
                frontend::EXECUTE => match frontend::execute(body) {
                    Some(e) if e.portal.is_empty() && bound.is_some() => {
                        pipe.execute(e.max_rows);
                        if let Some((stmt, b)) = &mut bound {
                            b.max_rows = e.max_rows;
                            if executed.iter().any(|s| Arc::ptr_eq(s, stmt)) {
                                simple_shape = false;
                            }
                            executed.push(stmt.clone());
                        }
                        ran.extend(last_bound.clone());
                    }
                    Some(e) => {
                        simple_shape = false;
                        pipe.break_off();
                        if let Some(stmt) = self.stmts.portal(e.portal) {
                            executed.push(stmt.clone());
                            ran.push(stmt.clone());
                        }
                    }
                    None => {
                        simple_shape = false;
                        pipe.break_off();
                    }
                },
                // The unnamed portal closed after its Execute (sqlx): CloseComplete
                // follows the command tag.
                frontend::CLOSE => match frontend::target(body) {
                    Some(t) if t.kind == b'P' && t.name.is_empty() && !executed.is_empty() => {
                        after.extend_from_slice(frontend::CLOSE_COMPLETE);
                        pipe.answer(frontend::CLOSE_COMPLETE);
                    }
                    _ => {
                        simple_shape = false;
                        pipe.break_off();
                    }
                },
                _ => {
                    simple_shape = false;
                    pipe.break_off();
                }
            }
        }
        let pipelined = pipe.finish(parsed.clone());
        self.cycle.held = held;
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
                answer: Answer {
                    before,
                    after,
                    extended: true,
                    unnamed: parsed,
                    returning: None,
                },
            }),
            _ => None,
        };
        // `SPILLWAY FLUSH` sent in the extended protocol: answered here, like the
        // simple Query (PostgreSQL would not parse it). Its unnamed statement exists
        // only here; executing it again without a new Parse gets PostgreSQL's error.
        let flush = match (&single, executed.as_slice()) {
            (Some(s), [stmt]) if s.bound.values.is_empty() => spillway_flush(&stmt.sql),
            _ => None,
        };
        match (flush, single) {
            (Some(table), Some(single)) => {
                Some(self.flush_command(table.as_deref(), single.answer, out))
            }
            (_, single) => {
                if single.is_none() {
                    let routed = match pipelined {
                        // In a held transaction: its statements join it.
                        Some(p) if self.tx.held.as_ref().is_some_and(|h| !h.failed) => {
                            return Some(self.hold_pipeline(p, out));
                        }
                        Some(p) => self.route_pipeline(p, out),
                        None => Routed::Elsewhere,
                    };
                    match routed {
                        Routed::Here(d) => return Some(d),
                        Routed::Counted => {}
                        Routed::Elsewhere if !self.cycle.counted => {
                            let ran: Vec<&Analysis> =
                                ran.iter().map(|s| s.analysis.as_ref()).collect();
                            self.note_pipelined(&ran);
                            self.cycle.counted = true;
                        }
                        Routed::Elsewhere => {}
                    }
                }
                self.route_writes(&refs, single, None, out)
            }
        }
    }

    /// At the Sync of a held cycle whose named Parses went upstream ahead of it
    /// (`on_extended`): PostgreSQL runs them in an implicit transaction. Once their
    /// answers are in, a Sync of spillway's own ends it, and the cycle is then decided
    /// as one of statements prepared before (`None` of the outer option: go on). If
    /// PostgreSQL refused a Parse it skips the rest of the cycle, as it would have: the
    /// held messages and the Sync go upstream (`Some(None)`), and a held transaction
    /// fails, as PostgreSQL's would have.
    pub(super) fn forwarded_parses(&mut self, out: &mut Outbox) -> Option<Option<Disposition>> {
        if self.cycle.named.is_empty() || self.cycle.upstream {
            return None;
        }
        if self.tracker.awaits_answers() {
            self.wait = super::super::wait::Wait::quiet(&self.quiet, self.wait.carry());
            return Some(Some(Disposition::Blocked));
        }
        if self.tracker.is_skipping() {
            if let Some(held) = self.tx.held.as_mut() {
                held.failed = true;
                self.tx
                    .held_cycles
                    .push_back(self.tracker.next_ready_index());
            }
            return Some(None);
        }
        self.cycle.named.clear();
        out.internal_query(frontend::SYNC_MESSAGE);
        self.tracker.push(super::super::tracker::Expect::OwnSync);
        self.wait = super::super::wait::Wait::quiet(&self.quiet, self.wait.carry());
        Some(Some(Disposition::Blocked))
    }

    /// Before extended-protocol messages go upstream without waiting for their Sync
    /// (a Flush, too much held, a message spillway cannot answer, or a Bind or Execute
    /// in a cycle already upstream): a barrier when what they execute touches deferred
    /// tables with pending writes.
    pub(super) fn route_forwarding(
        &mut self,
        tag: u8,
        msg: &[u8],
        out: &mut Outbox,
    ) -> Option<Disposition> {
        self.writes.as_ref()?;
        // The Execute of the unnamed portal whose Bind armed an overlay: it already
        // decided not to wait.
        if tag == frontend::EXECUTE
            && frontend::execute(frontend::body(msg)).is_some_and(|e| e.portal.is_empty())
            && self.overlay.as_mut().is_some_and(|o| o.take_execute())
        {
            return None;
        }
        let mut executed: Vec<Arc<Stmt>> = Vec::new();
        let mut unnamed = self.stmts.client_unnamed().cloned();
        // Those the cycle parsed upstream already, and those it still holds.
        let mut named_here: Vec<(String, Arc<Stmt>)> = self.cycle.named.clone();
        // What each Execute going upstream runs, for the fallback counters.
        let mut ran: Vec<Arc<Stmt>> = Vec::new();
        let mut bound_unnamed: Option<Arc<Stmt>> = None;
        let held = std::mem::take(&mut self.cycle.held);
        for m in held.iter().chain(std::iter::once(msg)) {
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
                                .or_else(|| self.stmts.named(b.statement).cloned())
                        };
                        if b.portal.is_empty() {
                            bound_unnamed.clone_from(&stmt);
                        }
                        executed.extend(stmt);
                    }
                }
                frontend::EXECUTE => {
                    let portal = frontend::execute(body).map(|e| e.portal);
                    let stmt = match portal {
                        Some("") if bound_unnamed.is_some() => bound_unnamed.clone(),
                        Some(p) => self.stmts.portal(p).cloned(),
                        None => None,
                    };
                    if let Some(stmt) = stmt {
                        if tag == frontend::EXECUTE && self.cycle.upstream {
                            executed.push(stmt.clone());
                        }
                        ran.push(stmt);
                    }
                }
                _ => {}
            }
        }
        self.cycle.held = held;
        if executed.is_empty() {
            return None;
        }
        let ran: Vec<&Analysis> = ran.iter().map(|s| s.analysis.as_ref()).collect();
        self.note_forwarded(&ran);
        let analyses: Vec<Arc<Analysis>> = executed.iter().map(|s| s.analysis.clone()).collect();
        let refs: Vec<&Analysis> = analyses.iter().map(AsRef::as_ref).collect();
        // A lone Bind of the unnamed portal (a cacheable read goes upstream at its
        // Bind): its parameters, for a read answered with an overlay.
        let read = match (tag, executed.as_slice()) {
            (frontend::BIND, [stmt]) => frontend::bind(frontend::body(msg))
                .filter(|b| b.portal.is_empty())
                .and_then(|b| {
                    let params = frontend::bind_params(b.params_and_formats)?;
                    Some(bound_of(stmt, params, b.result_formats))
                }),
            _ => None,
        };
        self.route_writes(&refs, None, read.as_ref(), out)
    }
}

/// A Bind's parameters and result formats, for a statement spillway may answer.
fn bound_of(stmt: &Stmt, params: Vec<(bool, Option<&[u8]>)>, result_formats: &[u8]) -> Bound {
    let types = frontend::param_type_oids(&stmt.param_types);
    let (binary, values) = params
        .into_iter()
        .map(|(bin, v)| (bin, v.map(<[u8]>::to_vec)))
        .unzip();
    Bound {
        values,
        binary,
        types,
        result_formats: result_formats
            .chunks_exact(2)
            .map(|c| i16::from_be_bytes([c[0], c[1]]))
            .collect(),
        max_rows: 0,
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
