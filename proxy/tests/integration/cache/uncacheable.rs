//! Reads that must never be served from memory (SPEC §5 "Cacheable"): non-immutable
//! functions (built-in or user-defined, also behind a view), SQL value functions and
//! clock literals, locking clauses, sequences, catalog tables, and tables with
//! row-level security.
//!
//! Each is read through spillway (a fill, if spillway wrongly took it for cacheable),
//! its data is changed directly, and the next read through spillway must show the
//! change. Only the first column is compared: the others read the clock or a random
//! generator.

use super::{ALL, BOTH, EXTERNAL, Rows, Via, cached, read, start};
use crate::context::Context;

const EXTRA: &str = "
    CREATE FUNCTION stable_fn(int) RETURNS int STABLE LANGUAGE sql AS $$ SELECT $1 $$;
    CREATE FUNCTION volatile_fn(int) RETURNS int VOLATILE LANGUAGE sql AS $$ SELECT $1 $$;
    CREATE VIEW clock_view AS SELECT id, v, clock_timestamp() AS at FROM t;
    CREATE SEQUENCE seq;
    CREATE TABLE secured (id int PRIMARY KEY, v text NOT NULL);
    INSERT INTO secured VALUES (1, 's');
    ALTER TABLE secured ENABLE ROW LEVEL SECURITY;";

const BUMP_T: &str = "UPDATE t SET v = v || '+' WHERE id = 1";

/// (statement, change; `{}` in the change is replaced by a counter)
const CASES: [(&str, &str); 12] = [
    ("SELECT v, random() FROM t WHERE id = 1", BUMP_T),
    ("SELECT v, now() FROM t WHERE id = 1", BUMP_T),
    ("SELECT v, stable_fn(id) FROM t WHERE id = 1", BUMP_T),
    ("SELECT v, volatile_fn(id) FROM t WHERE id = 1", BUMP_T),
    ("SELECT v, CURRENT_TIMESTAMP FROM t WHERE id = 1", BUMP_T),
    ("SELECT v, current_user FROM t WHERE id = 1", BUMP_T),
    ("SELECT v, 'now'::timestamptz FROM t WHERE id = 1", BUMP_T),
    ("SELECT v FROM t WHERE id = 1 FOR UPDATE", BUMP_T),
    ("SELECT v, at FROM clock_view WHERE id = 1", BUMP_T),
    ("SELECT last_value FROM seq", "SELECT nextval('seq')"),
    (
        "SELECT relname::text FROM pg_class WHERE relname LIKE 'made\\_%' ORDER BY 1",
        "CREATE TABLE made_{} (x int)",
    ),
    (
        "SELECT v FROM secured WHERE id = 1",
        "UPDATE secured SET v = v || '+'",
    ),
];

fn first_column(rows: Rows) -> Vec<Option<String>> {
    rows.into_iter().map(|mut r| r.swap_remove(0)).collect()
}

#[tokio::test]
async fn non_cacheable_reads_are_never_served_from_memory() {
    let (ctx, direct) = start(Context::builder(), EXTRA).await;
    let proxy = ctx.proxy_client().await;
    // The catalog is loaded and plain reads are cached.
    cached(&proxy, &direct, Via::Simple, ALL, EXTERNAL).await;
    let mut counter = 0;
    let mut failures = Vec::new();
    for (sql, change) in CASES {
        for round in 0..2 {
            for via in BOTH {
                read(&proxy, via, sql).await;
                counter += 1;
                let change = change.replace("{}", &counter.to_string());
                direct.batch_execute(&change).await.expect(&change);
                let got = first_column(read(&proxy, via, sql).await);
                let want = first_column(read(&direct, via, sql).await);
                if got != want {
                    failures.push(format!(
                        "{sql} ({via:?}, round {round}): spillway {got:?}, PostgreSQL {want:?}"
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "served from the cache:\n{}",
        failures.join("\n")
    );
}
