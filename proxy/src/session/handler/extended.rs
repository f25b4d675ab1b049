//! The extended query protocol through the cache.
//!
//! Parse/Bind/Describe/Execute/Close are held until the Sync that ends their cycle.
//! At the Sync, if PostgreSQL owes nothing and every Execute in the cycle is a cache
//! hit on the unnamed portal, the whole cycle is answered locally (ParseComplete,
//! BindComplete, RowDescription, rows, CommandComplete, ReadyForQuery). Otherwise the
//! whole cycle goes upstream in order, with the client's unnamed statement parsed
//! there first if it was only ever answered locally, and misses are captured.
//!
//! A Flush or too many held bytes sends the cycle upstream at once (a client waiting
//! on a Flush must get its answers); the rest of that cycle then follows message by
//! message. A Close is held like the rest: PostgreSQL answers nothing before a Sync or
//! Flush either, so holding it changes no answer the client can see.
//!
//! Named statements are always prepared upstream (their names share PostgreSQL's
//! namespace with SQL PREPARE); only the unnamed one is answered locally, and it is
//! re-parsed upstream before any forwarded message uses it.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use spillway_policies::cache::{CachedResult, FillTicket, Lookup};
use tokio::sync::futures::OwnedNotified;

use super::tracker::{Expect, Fill, Prepared};
use super::{Caching, Disposition, Out, Stmt};
use crate::protocol::frontend;
use crate::read::cache::Effects;

/// Held messages beyond these bounds go upstream without waiting for their Sync.
const MAX_HELD_BYTES: usize = 256 * 1024;
const MAX_HELD: usize = 64;

enum Plan {
    Local {
        answers: BytesMut,
        unnamed: Option<Arc<Stmt>>,
        hits: u64,
    },
    Wait(OwnedNotified),
    /// Go upstream; a fill ticket already taken for the key of the first miss.
    Forward(Option<(Vec<u8>, FillTicket)>),
}

impl Caching {
    pub(super) fn on_extended(&mut self, tag: u8, msg: &[u8], out: &mut Out<'_>) -> Disposition {
        let forwarding_now = if self.cycle_upstream {
            tag == frontend::EXECUTE
        } else {
            self.would_forward(tag, msg.len())
        };
        if forwarding_now && let Some(d) = self.route_forwarding(tag, msg, out) {
            return d;
        }
        if self.cycle_upstream {
            out.state.on_frontend(tag);
            self.forward_extended(msg, out, false, &mut None);
            if tag == frontend::SYNC {
                self.cycle_upstream = false;
            }
            return Disposition::Consumed;
        }
        if tag == frontend::SYNC {
            return self.on_sync(msg, out);
        }
        out.state.on_frontend(tag);
        self.held.push(Bytes::copy_from_slice(msg));
        self.held_bytes += msg.len();
        if tag == frontend::FLUSH || self.held_bytes > MAX_HELD_BYTES || self.held.len() > MAX_HELD
        {
            self.forward_held(out);
        }
        Disposition::Consumed
    }

    /// Whether message `tag` of `len` bytes would go upstream at once instead of being
    /// held for its Sync.
    pub(super) fn would_forward(&self, tag: u8, len: usize) -> bool {
        tag == frontend::FLUSH
            || self.held_bytes + len > MAX_HELD_BYTES
            || self.held.len() >= MAX_HELD
    }

    /// Sends every held message upstream; the rest of the cycle follows directly.
    pub(super) fn forward_held(&mut self, out: &mut Out<'_>) {
        if self.held.is_empty() {
            return;
        }
        for m in std::mem::take(&mut self.held) {
            self.forward_extended(&m, out, false, &mut None);
        }
        self.held_bytes = 0;
        self.cycle_upstream = true;
    }

    fn on_sync(&mut self, msg: &[u8], out: &mut Out<'_>) -> Disposition {
        let started = std::time::Instant::now();
        let parsed = self.held.iter().filter(|m| m[0] == frontend::PARSE);
        let sqls = parsed.filter_map(|m| frontend::parse(frontend::body(m)).map(|p| p.sql));
        if let Some(closed) = self.cache.release_databases(sqls) {
            self.wait = Some(Box::pin(closed));
            return Disposition::Blocked;
        }
        if let Some(d) = self.route_cycle(out) {
            return d;
        }
        let quiet = self.tracker.is_quiet() && self.reads_allowed(out.state);
        let mut ticket = None;
        if quiet {
            match self.plan_local(out) {
                Plan::Local {
                    answers,
                    unnamed,
                    hits,
                } => {
                    out.state.on_frontend(frontend::SYNC);
                    out.client.extend_from_slice(&answers);
                    self.answer_ready(out);
                    if let Some(stmt) = unnamed {
                        self.unnamed_pending = !self
                            .unnamed_upstream
                            .as_ref()
                            .is_some_and(|u| u.same_as(&stmt));
                        self.unnamed_client = Some(stmt);
                    }
                    for _ in 0..hits {
                        self.cache.results.record_hit();
                        self.metrics.hit.record(started.elapsed());
                    }
                    self.held.clear();
                    self.held_bytes = 0;
                    self.waited = false;
                    self.barrier_passed = false;
                    self.no_defer = false;
                    return Disposition::Consumed;
                }
                Plan::Wait(notified) if !self.waited && out.state.tx_status == b'I' => {
                    self.block(notified);
                    return Disposition::Blocked;
                }
                Plan::Wait(_) => {}
                Plan::Forward(t) => ticket = t,
            }
        }
        self.waited = false;
        let path = if ticket.is_some() {
            super::Path::Miss
        } else {
            super::Path::Passthrough
        };
        self.time_request(std::time::Instant::now(), path);
        out.state.on_frontend(frontend::SYNC);
        for m in std::mem::take(&mut self.held) {
            self.forward_extended(&m, out, quiet, &mut ticket);
        }
        self.held_bytes = 0;
        self.forward_extended(msg, out, false, &mut None);
        Disposition::Consumed
    }

    /// Whether the held cycle can be answered from the cache alone.
    fn plan_local(&mut self, out: &mut Out<'_>) -> Plan {
        let mut answers = BytesMut::new();
        let mut unnamed = self.unnamed_client.clone();
        let mut unnamed_changed = false;
        let mut bound: Option<Arc<CachedResult>> = None;
        let mut hits = 0;
        let mut binds = 0;
        let held = std::mem::take(&mut self.held);
        let mut plan = None;
        for m in &held {
            let body = frontend::body(m);
            let ok = match m[0] {
                frontend::PARSE => match frontend::parse(body) {
                    Some(p) if p.name.is_empty() => {
                        unnamed = Some(self.statement(&p, m, unnamed.as_ref()));
                        unnamed_changed = true;
                        answers.extend_from_slice(frontend::PARSE_COMPLETE);
                        true
                    }
                    _ => false,
                },
                frontend::BIND => {
                    binds += 1;
                    match frontend::bind(body) {
                        Some(b) if b.portal.is_empty() => {
                            let stmt = if b.statement.is_empty() {
                                unnamed.clone()
                            } else {
                                self.named.get(b.statement).cloned()
                            };
                            let keyed = stmt.and_then(|s| {
                                let key = self.extended_key(&s, b.params_and_formats, out)?;
                                Some((s, key))
                            });
                            let hit = keyed.as_ref().and_then(|(_, k)| self.cache.results.get(k));
                            match (keyed, hit) {
                                (_, Some(hit)) => {
                                    bound = Some(hit);
                                    answers.extend_from_slice(frontend::BIND_COMPLETE);
                                    true
                                }
                                // A miss: only a cacheable statement may lead a fill.
                                (Some((s, _)), None)
                                    if self.decide(&s.analysis).cacheable.is_err() =>
                                {
                                    false
                                }
                                (Some((_, key)), None) => match self.cache.results.lookup(&key) {
                                    Lookup::Hit(hit) => {
                                        bound = Some(hit);
                                        answers.extend_from_slice(frontend::BIND_COMPLETE);
                                        true
                                    }
                                    Lookup::Lead(t) => {
                                        plan.get_or_insert(Plan::Forward(Some((key, t))));
                                        false
                                    }
                                    Lookup::Wait(n) => {
                                        plan.get_or_insert(Plan::Wait(n));
                                        false
                                    }
                                },
                                (None, None) => false,
                            }
                        }
                        _ => false,
                    }
                }
                frontend::DESCRIBE => match (frontend::target(body), &bound) {
                    (Some(t), Some(hit)) if t.kind == b'P' && t.name.is_empty() => {
                        match &hit.row_description {
                            Some(rd) => {
                                answers.extend_from_slice(rd);
                                true
                            }
                            None => false,
                        }
                    }
                    _ => false,
                },
                frontend::EXECUTE => match (frontend::execute(body), bound.take()) {
                    (Some(e), Some(hit)) if e.portal.is_empty() && e.max_rows == 0 => {
                        answers.extend_from_slice(&hit.body);
                        hits += 1;
                        true
                    }
                    _ => false,
                },
                _ => false,
            };
            if !ok {
                self.held = held;
                return match plan {
                    // Waiting only pays when this is the cycle's one query.
                    Some(Plan::Wait(_)) if binds > 1 => Plan::Forward(None),
                    Some(p) => p,
                    None => Plan::Forward(None),
                };
            }
        }
        self.held = held;
        if hits == 0 {
            // Nothing served from the cache: a lone Parse must be checked upstream.
            return Plan::Forward(None);
        }
        Plan::Local {
            answers,
            unnamed: unnamed_changed.then_some(unnamed).flatten(),
            hits,
        }
    }

    /// Forwards one extended-protocol message, keeping statements, portals and the
    /// tracker in step. `fills`: misses in this message's cycle may be captured.
    fn forward_extended(
        &mut self,
        msg: &[u8],
        out: &mut Out<'_>,
        fills: bool,
        ticket: &mut Option<(Vec<u8>, FillTicket)>,
    ) {
        let body = frontend::body(msg);
        let expect = match msg[0] {
            frontend::PARSE => match frontend::parse(body) {
                Some(p) => {
                    let stmt = self.statement(&p, msg, self.unnamed_client.as_ref());
                    if p.name.is_empty() {
                        self.unnamed_client = Some(stmt.clone());
                        self.unnamed_upstream = None;
                        self.unnamed_pending = false;
                        Expect::Parse {
                            swallow: false,
                            prepared: Some(Prepared::Unnamed(stmt)),
                        }
                    } else {
                        self.named.remove(p.name);
                        Expect::Parse {
                            swallow: false,
                            prepared: Some(Prepared::Named(p.name.to_owned(), stmt)),
                        }
                    }
                }
                None => Expect::Parse {
                    swallow: false,
                    prepared: None,
                },
            },
            frontend::BIND => {
                self.next_fill = None;
                if let Some(b) = frontend::bind(body) {
                    let stmt = if b.statement.is_empty() {
                        self.inject_unnamed(out);
                        self.unnamed_client.clone()
                    } else {
                        self.named.get(b.statement).cloned()
                    };
                    match &stmt {
                        Some(s) => {
                            self.portals.insert(b.portal.to_owned(), s.clone());
                        }
                        None => {
                            self.portals.remove(b.portal);
                        }
                    }
                    if fills
                        && b.portal.is_empty()
                        && let Some(stmt) = stmt
                    {
                        self.next_fill =
                            self.prepare_fill(&stmt, b.params_and_formats, out, ticket);
                    }
                }
                Expect::Bind
            }
            frontend::DESCRIBE => match frontend::target(body) {
                Some(t) if t.kind == b'S' => {
                    if t.name.is_empty() {
                        self.inject_unnamed(out);
                    }
                    Expect::DescribeStatement
                }
                Some(t) => Expect::DescribePortal {
                    capture: t.name.is_empty() && self.next_fill.is_some(),
                },
                None => Expect::DescribeStatement,
            },
            frontend::EXECUTE => {
                self.metrics.upstream_statements.increment(1);
                let exec = frontend::execute(body);
                let stmt = exec
                    .as_ref()
                    .and_then(|e| self.portals.get(e.portal).cloned());
                let certain = self.certain(out.state, 1);
                match &stmt {
                    // PostgreSQL skips it (an error earlier in this cycle): no effects.
                    _ if self.tracker.is_skipping() => {}
                    Some(s) => {
                        let decision = self.decide(&s.analysis);
                        self.statement_effects(&s.analysis.clone(), &decision, certain);
                    }
                    None => {
                        let effects = Effects::unknown(self.cache.settings().invalidate_on_unknown);
                        self.record_effects(&effects, certain);
                    }
                }
                let fill = match exec {
                    Some(e) if e.portal.is_empty() && e.max_rows == 0 => self.next_fill.take(),
                    _ => None,
                };
                self.next_fill = None;
                Expect::Execute { fill }
            }
            frontend::CLOSE => {
                match frontend::target(body) {
                    Some(t) if t.kind == b'S' && t.name.is_empty() => {
                        self.unnamed_client = None;
                        self.unnamed_upstream = None;
                        self.unnamed_pending = false;
                    }
                    Some(t) if t.kind == b'S' => {
                        self.named.remove(t.name);
                        self.tracker.forget_pending(t.name);
                    }
                    Some(t) => {
                        self.portals.remove(t.name);
                    }
                    None => {}
                }
                Expect::Close
            }
            frontend::SYNC => {
                // A Bind whose Execute never came: release its fill now.
                self.next_fill = None;
                Expect::Ready {
                    sync: true,
                    fill: None,
                    id: 0,
                }
            }
            // Flush: nothing to expect.
            _ => {
                out.upstream.extend_from_slice(msg);
                return;
            }
        };
        out.upstream.extend_from_slice(msg);
        self.tracker.push(expect);
    }

    /// Before a forwarded message uses the unnamed statement, make PostgreSQL's match
    /// the client's (its ParseComplete is not passed on: the client had it already).
    fn inject_unnamed(&mut self, out: &mut Out<'_>) {
        if !self.unnamed_pending {
            return;
        }
        self.unnamed_pending = false;
        if let Some(stmt) = self.unnamed_client.clone() {
            out.upstream.extend_from_slice(&stmt.parse_msg);
            self.unnamed_upstream = None;
            self.tracker.push(Expect::Parse {
                swallow: true,
                prepared: Some(Prepared::Unnamed(stmt)),
            });
        }
    }

    /// A fill for the Execute of the unnamed portal bound to `stmt`, if cacheable.
    fn prepare_fill(
        &mut self,
        stmt: &Stmt,
        params: &[u8],
        out: &mut Out<'_>,
        ticket: &mut Option<(Vec<u8>, FillTicket)>,
    ) -> Option<Box<Fill>> {
        let decision = self.decide(&stmt.analysis);
        let cacheable = decision.cacheable.ok()?;
        let key = self.extended_key(stmt, params, out)?;
        // The plan may already hold the ticket for this key.
        let ticket = match ticket.take_if(|(k, _)| *k == key) {
            Some((_, t)) => t,
            None => match self.cache.results.lookup(&key) {
                Lookup::Lead(t) => t,
                Lookup::Hit(_) | Lookup::Wait(_) => return None,
            },
        };
        Some(Fill::new(ticket, self.capture(&cacheable), cacheable.ttl))
    }

    /// The cache key of an Execute, or `None` if the statement is not cacheable.
    fn extended_key(&mut self, stmt: &Stmt, params: &[u8], out: &Out<'_>) -> Option<Vec<u8>> {
        if !stmt.analysis.is_cacheable_shape() {
            return None;
        }
        let prefix = self.key.prefix(&out.state.params);
        let mut key = Vec::with_capacity(prefix.len() + stmt.sql.len() + params.len() + 16);
        key.extend_from_slice(prefix);
        key.push(b'X');
        key.extend_from_slice(
            &u32::try_from(stmt.sql.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        key.extend_from_slice(stmt.sql.as_bytes());
        key.extend_from_slice(
            &u32::try_from(stmt.param_types.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        key.extend_from_slice(&stmt.param_types);
        key.extend_from_slice(params);
        Some(key)
    }

    /// The statement a Parse defines, reusing `previous` when it is the same text.
    pub(super) fn statement(
        &self,
        p: &frontend::Parse<'_>,
        msg: &[u8],
        previous: Option<&Arc<Stmt>>,
    ) -> Arc<Stmt> {
        if let Some(prev) = previous
            && prev.parse_msg[..] == *msg
        {
            return prev.clone();
        }
        Arc::new(Stmt {
            sql: p.sql.into(),
            param_types: p.param_types.into(),
            analysis: self.cache.classifier.classify(p.sql),
            parse_msg: Bytes::copy_from_slice(msg),
        })
    }
}
