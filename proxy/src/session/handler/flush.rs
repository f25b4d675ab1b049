//! `SPILLWAY FLUSH [table]` (SPEC §6): answered by spillway in any session, once every
//! write acknowledged before it (to `table`, or to any table) is applied upstream.
//!
//! Invariant: answered only once the answers to earlier requests went out (the client
//! would read them in the wrong order otherwise).

use super::answer::{Answer, Reply};
use super::statements::Unnamed;
use super::wait::Wait;
use super::{Caching, Disposition};
use crate::session::state::Outbox;

impl Caching {
    /// `SPILLWAY FLUSH [table]`: answered once every write acknowledged before it (to
    /// `table`, or to any table) is applied upstream. `answer`: a simple Query's, or an
    /// extended cycle's (unnamed Parse, Bind, Execute, Sync) with its answers before and
    /// after the command tag.
    pub(super) fn flush_command(
        &mut self,
        table: Option<&str>,
        answer: Answer,
        out: &mut Outbox,
    ) -> Disposition {
        // Answered here: only once the answers to earlier requests (a pipelined Close
        // and Sync, say) went out, or the client would read them in the wrong order.
        if self.tracker.awaits_answers() {
            self.wait = Wait::quiet(&self.quiet, self.wait.carry());
            return Disposition::Blocked;
        }
        if !self.wait.passed_barrier()
            && let Some(w) = self.writes.as_ref().map(|d| d.service.clone())
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
                return self.barrier(target, false);
            }
        }
        let extended = answer.extended;
        let reply = Reply::Done {
            tag: "SPILLWAY FLUSH",
            rows: 0,
        };
        let unnamed = answer.send(reply, out.tx_status(), out);
        if extended {
            self.finish_cycle(unnamed);
        } else {
            self.stmts.unnamed = Unnamed::NONE;
        }
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

#[cfg(test)]
mod tests {
    use super::spillway_flush;
    use crate::read::classify::analyze;

    #[test]
    fn flush_commands_are_recognised_and_are_not_sql() {
        for (sql, table) in [
            ("SPILLWAY FLUSH", None),
            ("spillway flush public.t;", Some("public.t")),
            ("  SPILLWAY   FLUSH t ", Some("t")),
        ] {
            assert_eq!(spillway_flush(sql), Some(table.map(str::to_owned)), "{sql}");
            // The simple Query checks them only once the classifier refused the text.
            assert!(analyze(sql).unanalysed, "{sql}");
        }
        assert_eq!(spillway_flush("SELECT 1"), None);
        assert_eq!(spillway_flush("SPILLWAY FLUSH a b"), None);
    }
}
