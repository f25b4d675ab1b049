//! An extended cycle answered from the cache: every Execute a hit on the unnamed
//! portal. The answers are gathered as the messages arrive ([`Caching::step_local`]):
//! Parse of the unnamed statement (ParseComplete), Bind of the unnamed portal to a
//! cacheable statement whose key is stored (BindComplete), Describe of that portal
//! (the stored RowDescription) or of the unnamed statement it runs (the stored
//! ParameterDescription and RowDescription, as PostgreSQL described it when the entry
//! was filled), Execute of it without a row limit (the stored rows and command tag). At the Sync they go out with ReadyForQuery ([`Caching::plan_at_sync`]).
//!
//! A Bind whose key is missing either waits for another session already filling it
//! (decided at the Sync: waiting pays only when it is the cycle's one query) or leads
//! the fill itself, and then the cycle goes upstream at once.
//!
//! Invariant: a cycle is answered here only with nothing outstanding upstream and reads
//! allowed, checked at every message; a plan built before a wait is built again after.

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use spillway_policies::cache::{CachedResult, FillTicket, Lookup};
use tokio::sync::futures::OwnedNotified;

use super::super::Caching;
use super::super::statements::Stmt;
use crate::protocol::frontend;
use crate::session::state::Outbox;

/// The cache's answers to the messages held so far.
pub struct Local {
    answers: BytesMut,
    /// The unnamed statement as the cycle left it (starting from the client's).
    unnamed: Option<Arc<Stmt>>,
    unnamed_changed: bool,
    /// The entry bound to the unnamed portal, for its Describe and Execute.
    bound: Option<Arc<CachedResult>>,
    /// The unnamed portal runs the unnamed statement as it is now: a Describe of the
    /// statement answers with the entry's description of it.
    bound_unnamed: bool,
    hits: u64,
    binds: u32,
    /// Another session is filling a key bound here, and how many Binds the cycle had
    /// up to that one.
    waiting: Option<(OwnedNotified, u32)>,
    /// Only hits count: a miss ends the plan without taking part in any fill (a whole
    /// cycle tried at once, which the message-by-message path then decides).
    probe: bool,
    /// When the plan began: entries expired by then are not served.
    now: Instant,
}

/// One message's part in the plan (small: it is returned for every message held;
/// the rare variants are boxed).
enum Step {
    Ok,
    /// Missing, another session fills it.
    Wait(Box<OwnedNotified>),
    /// Missing, and this session leads its fill (key, ticket).
    Lead(Box<(Vec<u8>, FillTicket)>),
    No,
}

/// What the Sync does with a held cycle.
pub enum AtSync {
    /// Answered from the cache.
    Answered,
    /// Waits for another session's fill, then plans again.
    Wait(OwnedNotified),
    /// Goes upstream, with the lead ticket of its first miss if it took one.
    Forward(Option<(Vec<u8>, FillTicket)>),
}

impl Local {
    /// A plan starting from the client's unnamed statement `unnamed`, in `spare` (the
    /// last plan's box and answer buffer, reused: starting a plan allocates nothing),
    /// begun at `now`.
    fn start(spare: Option<Box<Self>>, unnamed: Option<Arc<Stmt>>, now: Instant) -> Box<Self> {
        let mut plan = spare.unwrap_or_else(|| {
            Box::new(Self {
                answers: BytesMut::new(),
                unnamed: None,
                unnamed_changed: false,
                bound: None,
                bound_unnamed: false,
                hits: 0,
                binds: 0,
                waiting: None,
                probe: false,
                now,
            })
        });
        plan.unnamed = unnamed;
        plan.now = now;
        plan
    }

    /// Emptied for reuse by the next plan ([`Local::start`]).
    pub(super) fn reset(&mut self) {
        self.answers.clear();
        self.unnamed = None;
        self.unnamed_changed = false;
        self.bound = None;
        self.bound_unnamed = false;
        self.hits = 0;
        self.binds = 0;
        self.waiting = None;
        self.probe = false;
    }

    /// The unnamed statement as the cycle left it so far.
    pub fn unnamed(&self) -> Option<&Arc<Stmt>> {
        self.unnamed.as_ref()
    }

    /// A Bind in the plan bound a cacheable read (the cycle is no write of its own).
    pub fn binds_a_read(&self) -> bool {
        self.binds > 0
    }
}

impl Caching {
    /// Adds `msg` to the cycle's plan (`cycle.local`), in place: `None` there once the
    /// cycle cannot be answered from the cache. Returns the lead ticket of the miss that
    /// decided it, if any. `parsed`: the statement `msg` parses, if it is a Parse.
    pub(super) fn step_local(
        &mut self,
        msg: &[u8],
        parsed: Option<&(String, Arc<Stmt>)>,
        status: u8,
    ) -> Option<(Vec<u8>, FillTicket)> {
        if !(self.tracker.quiet && self.reads_allowed(status)) {
            self.cycle.drop_local();
            return None;
        }
        let mut plan = match self.cycle.local.take() {
            Some(p) => p,
            None if self.cycle.held.is_empty() => Local::start(
                self.cycle.spare.take(),
                self.stmts.client_unnamed().cloned(),
                Instant::now(),
            ),
            // An earlier message of the cycle already ruled the cache out.
            None => return None,
        };
        match self.step(&mut plan, msg, parsed.map(|(_, s)| s)) {
            Step::Ok => self.cycle.local = Some(plan),
            Step::Wait(notified) => {
                plan.waiting = Some((*notified, plan.binds));
                self.cycle.local = Some(plan);
            }
            Step::Lead(lead) => {
                self.cycle.recycle(plan);
                return Some(*lead);
            }
            Step::No => self.cycle.recycle(plan),
        }
        None
    }

    /// At the Sync of a held cycle, with nothing outstanding and reads allowed: the
    /// cycle answered from the cache, a wait for another session's fill, or upstream.
    pub(super) fn plan_at_sync(&mut self, out: &mut Outbox) -> AtSync {
        let started = Instant::now();
        let plan = match self.cycle.local.take() {
            // Built as the messages came, and nothing waited since.
            Some(plan) if !self.wait.filled() => plan,
            _ => match self.replan() {
                Ok(plan) => plan,
                Err(forward) => return forward,
            },
        };
        if let Some((notified, binds)) = plan.waiting {
            // Waiting only pays when this is the cycle's one query.
            if binds <= 1 && !self.wait.filled() && out.tx_status() == b'I' {
                return AtSync::Wait(notified);
            }
            return AtSync::Forward(None);
        }
        if plan.hits == 0 {
            // Nothing served from the cache: a lone Parse must be checked upstream.
            return AtSync::Forward(None);
        }
        self.answer_plan(plan, started, out);
        AtSync::Answered
    }

    /// At the Sync, before any write routing: a plan built as the messages came, every
    /// Execute a hit, nothing waited for, is answered now. A hit goes nowhere upstream,
    /// so no barrier applies to it (as to a simple Query's hit), and a cycle that binds
    /// a cacheable read is never a write spillway answers itself.
    pub(super) fn answer_planned(&mut self, out: &mut Outbox) -> bool {
        let started = Instant::now();
        let ready = self
            .cycle
            .local
            .as_ref()
            .is_some_and(|p| p.hits > 0 && p.waiting.is_none())
            && !self.wait.filled()
            && self.tracker.quiet
            && self.reads_allowed(out.tx_status());
        match self.cycle.local.take() {
            Some(plan) if ready => {
                self.answer_plan(plan, started, out);
                true
            }
            plan => {
                self.cycle.local = plan;
                false
            }
        }
    }

    /// A whole cycle at the front of the client's bytes (the relay framed it; the last
    /// message a Sync), answered at once when, offered message by message, it would be
    /// answered from the cache at its Sync: the same conditions as for its first
    /// message, every message's part decided by the same [`Caching::step`], nothing
    /// held first. Only Parses of the unnamed statement, Binds, Describes and Executes
    /// before the Sync, and only hits: anything else returns false with nothing changed
    /// (no fill led or waited for), and the messages go through `on_frontend` one by
    /// one.
    pub(in crate::session::handler) fn answer_cycle(
        &mut self,
        msgs: &[&[u8]],
        out: &mut Outbox,
    ) -> bool {
        let Some((sync, cycle)) = msgs.split_last() else {
            return false;
        };
        let status = out.tx_status();
        if !(sync[0] == frontend::SYNC
            && matches!(self.wait, super::super::wait::Wait::Fresh)
            && !self.link.detached
            && !self.tracker.desynced
            && self.tracker.quiet
            && self.tx.held.is_none()
            && self.cycle.held.is_empty()
            && !self.cycle.upstream
            && self.cycle.local.is_none()
            && self.cycle.named.is_empty()
            && self.reads_allowed(status))
        {
            return false;
        }
        let started = Instant::now();
        let mut plan = Local::start(
            self.cycle.spare.take(),
            self.stmts.client_unnamed().cloned(),
            started,
        );
        plan.probe = true;
        let answered = cycle.iter().all(|m| {
            matches!(
                m[0],
                frontend::PARSE | frontend::BIND | frontend::DESCRIBE | frontend::EXECUTE
            ) && matches!(self.step(&mut plan, m, None), Step::Ok)
        }) && plan.hits > 0
            && plan.waiting.is_none();
        if !answered {
            self.cycle.recycle(plan);
            return false;
        }
        for m in msgs {
            out.offer(m[0]);
            out.take();
        }
        self.answer_plan(plan, started, out);
        true
    }

    fn answer_plan(&mut self, mut plan: Box<Local>, started: Instant, out: &mut Outbox) {
        out.answer(&plan.answers);
        out.ready_now();
        if plan.unnamed_changed
            && let Some(stmt) = plan.unnamed.take()
        {
            self.stmts.parsed_locally(stmt);
        }
        for _ in 0..plan.hits {
            self.cache.results.record_hit();
            self.timing.metrics.hit.record(started.elapsed());
        }
        self.cycle.clear();
        self.cycle.recycle(plan);
    }

    /// The plan of the held messages from the start (after a wait, or when the
    /// messages were held for another reason); `Err` with the decision when it fails.
    fn replan(&mut self) -> Result<Box<Local>, AtSync> {
        let mut plan = Local::start(
            self.cycle.spare.take(),
            self.stmts.client_unnamed().cloned(),
            Instant::now(),
        );
        let held = std::mem::take(&mut self.cycle.held);
        let mut verdict = Ok(());
        for m in &held {
            match self.step(&mut plan, m, None) {
                Step::Ok => {}
                Step::Wait(notified) => {
                    plan.waiting = Some((*notified, plan.binds));
                    break;
                }
                Step::Lead(lead) => {
                    verdict = Err(AtSync::Forward(Some(*lead)));
                    break;
                }
                Step::No => {
                    verdict = Err(AtSync::Forward(None));
                    break;
                }
            }
        }
        self.cycle.held = held;
        verdict.map(|()| plan)
    }

    /// `msg`'s part in `plan`. After a wait began, only whether the message could
    /// still be answered from the cache counts (the plan is built again after it).
    fn step(&mut self, plan: &mut Local, msg: &[u8], parsed: Option<&Arc<Stmt>>) -> Step {
        let body = frontend::body(msg);
        let waiting = plan.waiting.is_some();
        let ok = match msg[0] {
            frontend::PARSE => match frontend::parse(body) {
                Some(p) if p.name.is_empty() => {
                    let stmt = match parsed {
                        Some(s) => s.clone(),
                        None => self.statement(&p, msg, plan.unnamed.as_ref()),
                    };
                    plan.unnamed = Some(stmt);
                    plan.unnamed_changed = true;
                    plan.bound_unnamed = false;
                    plan.answers.extend_from_slice(frontend::PARSE_COMPLETE);
                    true
                }
                _ => false,
            },
            frontend::BIND if waiting => frontend::bind(body).is_some_and(|b| {
                b.portal.is_empty()
                    && self
                        .bound_statement(plan, b.statement)
                        .is_some_and(|s| s.analysis.is_cacheable_shape())
            }),
            frontend::BIND => {
                plan.binds += 1;
                plan.bound_unnamed = false;
                return match frontend::bind(body) {
                    Some(b) if b.portal.is_empty() => {
                        self.bind_step(plan, b.statement, b.params_and_formats)
                    }
                    _ => Step::No,
                };
            }
            frontend::DESCRIBE if waiting => frontend::target(body).is_some_and(|t| {
                t.name.is_empty() && (t.kind == b'P' || (t.kind == b'S' && plan.bound_unnamed))
            }),
            frontend::DESCRIBE => {
                let described = match (frontend::target(body), &plan.bound) {
                    (Some(t), Some(hit)) if t.kind == b'P' && t.name.is_empty() => {
                        hit.row_description.as_ref()
                    }
                    (Some(t), Some(hit))
                        if t.kind == b'S' && t.name.is_empty() && plan.bound_unnamed =>
                    {
                        hit.statement.as_ref()
                    }
                    _ => None,
                };
                described.is_some_and(|d| {
                    plan.answers.extend_from_slice(d);
                    true
                })
            }
            frontend::EXECUTE if waiting => {
                frontend::execute(body).is_some_and(|e| e.portal.is_empty() && e.max_rows == 0)
            }
            frontend::EXECUTE => match (frontend::execute(body), plan.bound.take()) {
                (Some(e), Some(hit)) if e.portal.is_empty() && e.max_rows == 0 => {
                    plan.answers.extend_from_slice(&hit.body);
                    plan.hits += 1;
                    true
                }
                _ => false,
            },
            _ => false,
        };
        if ok { Step::Ok } else { Step::No }
    }

    /// A Bind of the unnamed portal to `statement`: a hit, or the miss that decides.
    fn bind_step(&mut self, plan: &mut Local, statement: &str, params: &[u8]) -> Step {
        let found = if statement.is_empty() {
            plan.unnamed.as_ref()
        } else {
            self.stmts.named(statement)
        };
        let Some(stmt) = found else {
            return Step::No;
        };
        if let Some(hit) = self.extended_get(stmt, params, plan.now) {
            plan.bound = Some(hit);
            plan.bound_unnamed = statement.is_empty();
            plan.answers.extend_from_slice(frontend::BIND_COMPLETE);
            return Step::Ok;
        }
        if plan.probe {
            return Step::No;
        }
        let Some(stmt) = self.bound_statement(plan, statement) else {
            return Step::No;
        };
        // A miss: only a cacheable statement may lead a fill, under the key built.
        if self.decide(&stmt.analysis).cacheable.is_err() {
            return Step::No;
        }
        let Some(key) = self.extended_key(&stmt, params) else {
            return Step::No;
        };
        match self.cache.results.lookup(&key) {
            Lookup::Hit(hit) => {
                plan.bound = Some(hit);
                plan.bound_unnamed = statement.is_empty();
                plan.answers.extend_from_slice(frontend::BIND_COMPLETE);
                Step::Ok
            }
            Lookup::Lead(ticket) => Step::Lead(Box::new((key, ticket))),
            Lookup::Wait(notified) => Step::Wait(Box::new(notified)),
        }
    }

    /// The statement a Bind in the cycle names: its unnamed one as the cycle left it,
    /// or one PostgreSQL confirmed.
    fn bound_statement(&self, plan: &Local, statement: &str) -> Option<Arc<Stmt>> {
        if statement.is_empty() {
            plan.unnamed.clone()
        } else {
            self.stmts.named(statement).cloned()
        }
    }
}
