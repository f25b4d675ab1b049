//! `SPILLWAY FLUSH [table]` (SPEC §6): answered by spillway in any session, once every
//! write acknowledged before it (to `table`, or to any table) is applied upstream.
//!
//! Invariant: answered only once the answers to earlier requests went out (the client
//! would read them in the wrong order otherwise).

use super::deferred::Single;
use super::{Caching, Disposition, Out};
use crate::protocol::frontend;

impl Caching {
    /// `SPILLWAY FLUSH [table]`: returns once every write acknowledged before it (to
    /// `table`, or to any table) is applied upstream. `cycle`: sent as an extended
    /// cycle (unnamed Parse, Bind, Execute, Sync), with its answers before and after the
    /// command tag; `None` for a simple Query.
    pub(super) fn flush_command(
        &mut self,
        table: Option<&str>,
        cycle: Option<Single<'_>>,
        out: &mut Out<'_>,
    ) -> Disposition {
        // Answered here: only once the answers to earlier requests (a pipelined Close
        // and Sync, say) went out, or the client would read them in the wrong order.
        if self.tracker.awaits_answers() {
            let quiet = self.quiet.clone();
            self.wait = Some(Box::pin(async move { quiet.notified().await }));
            return Disposition::Blocked;
        }
        if !std::mem::take(&mut self.barrier_passed)
            && let Some(w) = self.writes.clone()
        {
            let target = match table {
                Some(t) => {
                    let name = if t.contains('.') {
                        t.to_owned()
                    } else {
                        format!("public.{t}")
                    };
                    w.barrier_target([name.as_str()])
                }
                None => Some(w.highest()),
            };
            if let Some(target) = target.filter(|t| *t > w.applied()) {
                return self.barrier(w, target);
            }
        }
        let complete = frontend::command_complete("SPILLWAY FLUSH");
        match cycle {
            None => {
                out.state.on_frontend(frontend::QUERY);
                out.client.extend_from_slice(&complete);
                self.answer_ready(out);
                self.forget_unnamed();
            }
            Some(c) => {
                out.state.on_frontend(frontend::SYNC);
                out.client.extend_from_slice(&c.before);
                out.client.extend_from_slice(&complete);
                out.client.extend_from_slice(&c.after);
                self.answer_ready(out);
                self.finish_local_cycle(c.unnamed);
            }
        }
        self.no_defer = false;
        Disposition::Consumed
    }
}

/// `SPILLWAY FLUSH [table]` (case-insensitive, optional semicolon): `Some(None)` for
/// every table, `Some(Some(name))` for one.
pub(super) fn spillway_flush(sql: &str) -> Option<Option<String>> {
    let mut words = sql.trim().trim_end_matches(';').split_whitespace();
    let first = words.next()?;
    let second = words.next()?;
    if !first.eq_ignore_ascii_case("spillway") || !second.eq_ignore_ascii_case("flush") {
        return None;
    }
    let table = words.next().map(str::to_owned);
    if words.next().is_some() {
        return None;
    }
    Some(table)
}
