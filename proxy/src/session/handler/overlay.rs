//! A read-your-writes read answered without waiting for the flush (ADR 0039): a point
//! read of a `consistency = "session"` table that would wait for the session's own
//! deferred writes goes upstream at once instead, under a watch of its row
//! (`spillway_policies::engine::overlay`), and the row PostgreSQL returns is sent with
//! the row's pending writes overlaid (`write/overlay.rs`).
//!
//! When ([`Caching::try_overlay`]): one plain SELECT in autocommit, no statement
//! outstanding upstream, settings followed (UTF8); its WHERE fixes the whole primary
//! key of one deferred table and nothing else decides whether the row is in the
//! result; its outputs are plain columns; the table has no BEFORE ROW trigger or rule
//! and no foreign key action that another table's writes could fire, and is on a
//! journal of this instance's own; and every pending write of the row is an UPDATE by
//! key that assigns the columns the read outputs only constants and the columns its
//! WHERE compares nothing. Anything else waits, as before.
//!
//! Invariants:
//! - Only the DataRows of the statement the overlay was armed for are rewritten: it
//!   is armed with no statement outstanding upstream, stops at that statement's end
//!   and ends at its request's ReadyForQuery.
//! - An overlaid answer is never a fill (the session's own writes are not applied, so
//!   reads are not cached: `reads_allowed`).
//! - A row that cannot be overlaid when it arrives (its watch ran out, a write since
//!   that no overlay can hold, a value spillway cannot write exactly) is answered with
//!   an error (40001), never with PostgreSQL's image alone; a row too large to hold
//!   ends the session (`may_stream`).

use bytes::Bytes;

use super::touch::Touch;
use super::{Caching, Delivery};
use crate::error::ClientError;
use crate::protocol::backend;
use crate::protocol::sqlstate::SqlState;
use crate::read::cache::Params;
use crate::read::classify::{Analysis, Kind};
use crate::session::state::Outbox;
use crate::write::convert::Bound;
use crate::write::overlay::{Fields, overlayable_type};
use crate::write::service::{Watched, WriteService};
use spillway_policies::engine::overlay::{Assigned, Needs};

/// Counts a read of a session-consistency table that its session's own pending
/// writes concern, by outcome: `overlay` (answered with the row's pending writes
/// overlaid), `overlay_failed` (answered with 40001), `waited` (waited for the flush).
pub(super) fn counted(outcome: &'static str) {
    metrics::counter!(crate::metrics::SESSION_READS, "outcome" => outcome).increment(1);
}

/// An overlaid read on its way: armed when the read is forwarded, ended at its
/// ReadyForQuery.
pub(super) struct Armed {
    /// The ready id of the request.
    id: u64,
    watched: Watched,
    fields: Fields,
    /// The row was answered with an error: the rest of the request is not the
    /// client's.
    failed: bool,
    /// A RowDescription that does not describe `fields`: the row is not answered.
    mismatch: bool,
    /// Armed at the Bind of the unnamed portal, whose Execute is still to come.
    at_bind: bool,
    /// The statement's result ended: later results of the same request are another
    /// statement's (a pipelined cycle) and pass as they are.
    done: bool,
}

impl Caching {
    /// Arms an overlay for `analysis`, about to be forwarded upstream instead of
    /// waiting for its barrier (`at_bind`: its Bind goes upstream ahead of its
    /// Execute); false when the read must wait.
    pub(super) fn try_overlay(
        &mut self,
        w: &WriteService,
        analysis: &Analysis,
        bound: Option<&Bound>,
        touch: &Touch,
        at_bind: bool,
        out: &Outbox,
    ) -> bool {
        let armed = match self.overlay_for(w, analysis, bound, touch, at_bind, out) {
            Ok(armed) => armed,
            Err(reason) => {
                tracing::debug!(reason, "read waits for the session's own writes");
                return false;
            }
        };
        self.overlay = Some(Box::new(armed));
        true
    }

    fn overlay_for(
        &self,
        w: &WriteService,
        analysis: &Analysis,
        bound: Option<&Bound>,
        touch: &Touch,
        read_bind: bool,
        out: &Outbox,
    ) -> Result<Armed, &'static str> {
        let [stmt] = analysis.statements.as_slice() else {
            return Err("statements");
        };
        if analysis.unanalysed
            || !matches!(stmt.kind, Kind::Select)
            || stmt.locking
            || stmt.sql_value_function
            || !stmt.functions.is_empty()
        {
            return Err("not_a_plain_select");
        }
        let point = stmt.point.as_ref().ok_or("not_a_point_read")?;
        let outputs = point.outputs.as_ref().ok_or("outputs")?;
        if out.tx_status() != b'I' || self.tx.held.is_some() {
            return Err("transaction");
        }
        // Parses of the same cycle may be upstream already; no statement may be.
        if self.tracker.has_outstanding_statements() || self.tracker.desynced {
            return Err("outstanding");
        }
        // An Execute of the same cycle ran before it: were the read answered with an
        // error, the client would take that statement as rolled back with the
        // implicit transaction, which PostgreSQL commits at the Sync.
        if out.state().executed {
            return Err("pipeline");
        }
        if self.key.bypass.is_some()
            || self.key.local_override
            || out
                .state()
                .params
                .get("client_encoding")
                .map(String::as_str)
                != Some("UTF8")
        {
            return Err("session_state");
        }
        let [name] = touch.tables.as_slice() else {
            return Err("tables");
        };
        if touch.all || touch.linked_all || !touch.linked.is_empty() {
            return Err("tables");
        }
        let set = w.tables();
        let table = set.deferring(name).ok_or("tables")?;
        if set.consistency(name) != spillway_policies::Consistency::Session
            || table.row_changes.rewritten
            || table.row_changes.by_parents
        {
            return Err("table");
        }
        let decision = self.decide(analysis);
        let point_key = decision.point.as_ref().ok_or("key:none")?;
        if point_key.table != table.oid || decision.cacheable.is_err() {
            return Err("key:table");
        }
        let values: Vec<(bool, Option<&[u8]>)> = bound
            .map(|b| {
                b.values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (b.binary.get(i).copied().unwrap_or(false), v.as_deref()))
                    .collect()
            })
            .unwrap_or_default();
        let params = Params {
            declared: bound.map_or(&[][..], |b| b.types.as_slice()),
            values: &values,
        };
        let key = point_key.resolve(&params).ok_or(if bound.is_none() {
            "key:unbound"
        } else {
            "key:params"
        })?;
        let formats = bound.map_or(&[][..], |b| b.result_formats.as_slice());
        let fields = Fields::of(table.oid, &table.columns, outputs, formats).ok_or("outputs")?;
        // A generated column follows the columns it is computed from.
        if fields.fields.iter().any(|f| {
            table.generated_always.contains(&f.column) && !table.meta.key.contains(&f.column)
        }) {
            return Err("generated_column");
        }
        // Columns no assignment of which the answer can take: those the WHERE compares,
        // and outputs of a type spillway does not write.
        let fixed = point.equalities.iter().map(|(c, _)| c.clone()).chain(
            fields
                .fields
                .iter()
                .filter(|f| !overlayable_type(f.type_oid))
                .map(|f| f.column.clone()),
        );
        let needs = Needs {
            outputs: outputs.clone(),
            filtered: fixed.collect(),
        };
        let watched = w
            .watch_row(name, &key, needs)
            .map_err(|_| "pending_writes")?;
        let armed = Armed {
            id: self.tracker.next_ready_index(),
            watched,
            fields,
            failed: false,
            mismatch: false,
            at_bind: read_bind,
            done: false,
        };
        // What is pending now must be writable already (later writes are checked
        // when the row arrives).
        armed.assigned()?;
        Ok(armed)
    }

    /// A backend message while an overlay is armed: its DataRow rewritten, or
    /// answered with an error; the overlay ends at its request's ReadyForQuery.
    pub(super) fn overlaid(
        &mut self,
        tag: u8,
        msg: Option<&[u8]>,
        ready_id: Option<u64>,
        delivery: Delivery,
    ) -> Delivery {
        let Some(armed) = self.overlay.as_mut() else {
            return delivery;
        };
        // Armed with no statement outstanding upstream: the first ReadyForQuery for
        // the client ends its request.
        if tag == backend::READY_FOR_QUERY
            && delivery != Delivery::Swallow
            && ready_id.is_none_or(|id| id >= armed.id)
        {
            counted(if armed.failed {
                "overlay_failed"
            } else {
                "overlay"
            });
            self.overlay = None;
            return delivery;
        }
        if delivery != Delivery::Pass {
            return delivery;
        }
        if armed.failed {
            // The client had an error in place of the row: nothing else of the request
            // is its own until the ReadyForQuery.
            return Delivery::Swallow;
        }
        if armed.done {
            return delivery;
        }
        match (tag, msg) {
            (b'T', Some(m)) => {
                if !armed.fields.matches_description(m) {
                    // Not the row the overlay was armed for (the table's definition
                    // changed meanwhile): its rows are not answered.
                    armed.mismatch = true;
                }
                delivery
            }
            (b'D', m) => {
                let row = match m {
                    Some(m) if !armed.mismatch && !self.tracker.desynced => armed.rewrite(m),
                    _ => Err("row"),
                };
                match row {
                    Ok(row) => Delivery::Replace(row),
                    Err(reason) => {
                        tracing::debug!(reason, "overlaid read answered with 40001");
                        armed.failed = true;
                        // Statements after it in the same cycle ran upstream while the
                        // client, told of an error, would take them as skipped; and
                        // before the cycle's Sync came, what the client sends next
                        // would not be skipped as after PostgreSQL's own error: the
                        // session ends instead (their outcome unknown, as at any loss).
                        if self.tracker.executes_queued() > 1 || !self.tracker.ready_queued() {
                            Delivery::End
                        } else {
                            Delivery::Replace(failure())
                        }
                    }
                }
            }
            (b'C' | b's' | b'I' | b'E', _) => {
                armed.done = true;
                delivery
            }
            _ => delivery,
        }
    }
}

impl Armed {
    /// The statement's result ended: later rows are another statement's.
    pub(super) fn is_done(&self) -> bool {
        self.done
    }

    /// The Execute of the portal whose Bind armed it arrives: true the first time.
    pub(super) fn take_execute(&mut self) -> bool {
        std::mem::take(&mut self.at_bind)
    }

    fn assigned(&self) -> Result<Assigned, &'static str> {
        let assigned = self.watched.overlay().map_err(|_| "refused")?;
        for (column, _) in &assigned {
            if let Some(f) = self.fields.fields.iter().find(|f| f.column == *column)
                && !overlayable_type(f.type_oid)
            {
                return Err("type");
            }
        }
        Ok(assigned)
    }

    fn rewrite(&self, msg: &[u8]) -> Result<Bytes, &'static str> {
        let assigned = self.assigned()?;
        self.fields.rewrite(msg, &assigned)
    }
}

/// The error a row that cannot be overlaid is answered with.
fn failure() -> Bytes {
    ClientError::error(
        SqlState::SERIALIZATION_FAILURE,
        "could not read the row with this session's pending writes",
    )
    .with_detail(
        "spillway could not overlay the row's pending writes on PostgreSQL's answer \
         exactly (ADR 0039); retry the read",
    )
    .encode()
}
