//! `spillway-loadtest`: the bundled scenario runner (direct PostgreSQL vs spillway in
//! alternating rounds, with percentiles, progress and plots) is not built yet; it is
//! tracked as its own issue. Until then the pass-through comparison lives in
//! `loadtest/pgbench/compare.sh`, and this binary says so instead of pretending.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "spillway-loadtest: the scenario runner is not built yet.\n\
         For the pass-through comparison (direct PostgreSQL, spillway, PgBouncer) run:\n  \
         loadtest/pgbench/compare.sh [-T seconds] [-c clients] [-r rounds] [-s scale]"
    );
    ExitCode::from(2)
}
