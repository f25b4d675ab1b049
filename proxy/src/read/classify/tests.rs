//! Table-driven tests of [`analyze`]: relations, kinds, functions and flags. The
//! transaction/SET cases live in `commands`, the memo's in `memo`.

use super::*;

/// The only statement of `sql`, which must be analysed.
pub(super) fn one(sql: &str) -> Statement {
    let analysis = analyze(sql);
    assert!(!analysis.unanalysed, "unanalysed: {sql}");
    match analysis.single() {
        Some(s) => s.clone(),
        None => panic!("expected one statement in {sql}: {analysis:?}"),
    }
}

fn names<T: ToString>(list: &[T]) -> Vec<String> {
    list.iter().map(T::to_string).collect()
}

const DDL: Kind = Kind::Ddl {
    temp: false,
    global: false,
};
const TEMP: Kind = Kind::Ddl {
    temp: true,
    global: false,
};
const GLOBAL: Kind = Kind::Ddl {
    temp: false,
    global: true,
};

#[test]
fn relations_read_and_written() {
    use Kind::{OtherRead, Select, Write};
    #[rustfmt::skip]
    let cases: &[(&str, Kind, &[&str], &[&str])] = &[
        // (sql, kind, reads, writes)
        ("SELECT a.x FROM a JOIN b ON a.id = b.id WHERE a.y IN (SELECT y FROM c)", Select, &["a", "b", "c"], &[]),
        ("WITH w AS (SELECT * FROM t) SELECT * FROM w", Select, &["t"], &[]),
        // A non-recursive CTE does not see itself: the inner `f` is the table.
        ("WITH f AS (SELECT * FROM f) SELECT * FROM f", Select, &["f"], &[]),
        // A CTE is visible only in its statement: the outer `w` is a table.
        ("SELECT * FROM (WITH w AS (SELECT 1) SELECT * FROM w) s, w", Select, &["w"], &[]),
        ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT * FROM r", Select, &[], &[]),
        ("WITH d AS (DELETE FROM q RETURNING *) SELECT * FROM d", Write, &[], &["q"]),
        ("WITH u AS (UPDATE t SET x = 1 RETURNING id) SELECT * FROM u JOIN s USING (id)", Write, &["s"], &["t"]),
        // The target of a write is never a CTE.
        ("WITH t AS (SELECT 1) DELETE FROM t", Write, &[], &["t"]),
        ("INSERT INTO dst (a) SELECT a FROM src WHERE a > 0", Write, &["src"], &["dst"]),
        ("INSERT INTO t VALUES (1), ((SELECT max(x) FROM m))", Write, &["m"], &["t"]),
        ("INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET n = (SELECT n FROM o)", Write, &["o"], &["t"]),
        ("UPDATE t SET x = s.x FROM s WHERE t.id = s.id", Write, &["s"], &["t"]),
        ("DELETE FROM t USING u WHERE t.id = u.id RETURNING (SELECT 1 FROM r)", Write, &["u", "r"], &["t"]),
        ("MERGE INTO tgt USING src ON tgt.id = src.id WHEN MATCHED THEN UPDATE SET v = src.v \
          WHEN NOT MATCHED THEN INSERT VALUES (src.id, src.v)", Write, &["src"], &["tgt"]),
        ("COPY t FROM STDIN", Write, &[], &["t"]),
        ("COPY t TO STDOUT", OtherRead, &["t"], &[]),
        ("COPY (SELECT * FROM v) TO STDOUT", OtherRead, &["v"], &[]),
        ("COPY (INSERT INTO t VALUES (1) RETURNING *) TO STDOUT", Write, &[], &["t"]),
        ("TRUNCATE a, b", Kind::Truncate { cascade: false }, &[], &["a", "b"]),
        ("TRUNCATE ONLY a CASCADE", Kind::Truncate { cascade: true }, &[], &["a"]),
        ("SELECT * FROM s1.t JOIN \"MixedCase\" m ON true JOIN Folded f ON true", Select, &["s1.t", "MixedCase", "folded"], &[]),
        ("SELECT * FROM cat.s.t", Select, &["s.t"], &[]),
        ("SELECT 1 FROM t LIMIT (SELECT n FROM lim)", Select, &["t", "lim"], &[]),
        ("SELECT * FROM t UNION SELECT * FROM u", Select, &["t", "u"], &[]),
        ("TABLE t", Select, &["t"], &[]),
        ("VALUES (1), (2)", Select, &[], &[]),
        ("EXPLAIN DELETE FROM t", OtherRead, &[], &[]),
        ("EXPLAIN ANALYZE DELETE FROM t", Write, &[], &["t"]),
        ("EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM t", OtherRead, &["t"], &[]),
        ("EXPLAIN (ANALYZE false) DELETE FROM t", OtherRead, &[], &[]),
        ("CREATE TABLE n AS SELECT * FROM o", DDL, &["o"], &[]),
        ("SELECT * INTO n FROM o", DDL, &["o"], &[]),
        ("DECLARE c CURSOR FOR SELECT * FROM t", OtherRead, &["t"], &[]),
        // Not run now: PREPARE's statement, a rule's actions, a BEGIN ATOMIC body.
        ("PREPARE p AS DELETE FROM t", Kind::Session(SessionCommand::Prepare { name: "p".into() }), &[], &[]),
        ("CREATE RULE r AS ON INSERT TO t DO ALSO DELETE FROM u", DDL, &[], &[]),
        ("CREATE FUNCTION f() RETURNS int BEGIN ATOMIC INSERT INTO t VALUES (1); SELECT 1; END", DDL, &[], &[]),
    ];
    for (sql, kind, reads, writes) in cases {
        let s = one(sql);
        assert_eq!(&s.kind, kind, "{sql}");
        assert_eq!(names(&s.reads), *reads, "reads of {sql}");
        assert_eq!(names(&s.writes), *writes, "writes of {sql}");
    }
}

#[test]
fn other_kinds() {
    use Kind::{OtherRead, Unknown};
    #[rustfmt::skip]
    let cases: &[(&str, Kind)] = &[
        ("EXECUTE p(1)", Unknown),
        ("DO $$ BEGIN PERFORM 1; END $$", Unknown),
        ("CALL proc(1)", Unknown),
        ("EXPLAIN ANALYZE EXECUTE p", Unknown),
        ("SHOW search_path", OtherRead),
        ("NOTIFY ch, 'x'", OtherRead),
        ("VACUUM ANALYZE t", OtherRead),
        ("LOCK TABLE t IN EXCLUSIVE MODE", OtherRead),
        ("FETCH 10 FROM c", OtherRead),
        ("CHECKPOINT", OtherRead),
        ("CREATE TEMP TABLE tt (a int)", TEMP),
        ("CREATE TABLE pg_temp.tt (a int)", TEMP),
        ("CREATE TEMPORARY VIEW v AS SELECT 1", TEMP),
        ("CREATE TEMP SEQUENCE s", TEMP),
        ("SELECT 1 INTO TEMP tt", TEMP),
        ("CREATE TEMP TABLE tt AS SELECT 1", TEMP),
        ("CREATE TABLE t (a int)", DDL),
        ("ALTER TABLE t ADD COLUMN b int", DDL),
        ("CREATE INDEX ON t (a)", DDL),
        ("DROP TABLE t", DDL),
        ("COMMENT ON TABLE t IS 'x'", DDL),
        ("GRANT SELECT ON t TO bob", DDL),
        ("REVOKE ALL ON SCHEMA s FROM bob", DDL),
        ("REFRESH MATERIALIZED VIEW mv", DDL),
        ("CREATE MATERIALIZED VIEW mv AS SELECT 1", DDL),
        ("CREATE EXTENSION hstore", DDL),
        ("ALTER ROLE bob SET work_mem = '1MB'", GLOBAL),
        ("CREATE ROLE bob", GLOBAL),
        ("GRANT admin TO bob", GLOBAL),
        ("ALTER DATABASE d RENAME TO e", GLOBAL),
        ("ALTER SYSTEM SET work_mem = '1MB'", GLOBAL),
        ("GRANT CONNECT ON DATABASE d TO bob", GLOBAL),
        ("CREATE TABLESPACE ts LOCATION '/x'", GLOBAL),
    ];
    for (sql, kind) in cases {
        assert_eq!(&one(sql).kind, kind, "{sql}");
    }
}

#[test]
fn ddl_targets() {
    #[rustfmt::skip]
    let cases: &[(&str, &[&str])] = &[
        ("CREATE TABLE s.t (a int REFERENCES p (id))", &["s.t", "p"]),
        ("CREATE TABLE n AS SELECT * FROM o", &["n"]),
        ("SELECT * INTO n FROM o", &["n"]),
        ("ALTER TABLE t RENAME TO u", &["t"]),
        ("DROP TABLE a, s.b CASCADE", &["a", "s.b"]),
        ("DROP VIEW v", &["v"]),
        ("DROP FUNCTION f(int)", &[]),
        ("CREATE VIEW v AS SELECT * FROM t", &["v"]),
        ("REFRESH MATERIALIZED VIEW mv", &["mv"]),
    ];
    for (sql, targets) in cases {
        assert_eq!(names(&one(sql).ddl_targets), *targets, "{sql}");
    }
    // The view's query is read, not defined.
    assert_eq!(names(&one("CREATE VIEW v AS SELECT * FROM t").reads), ["t"]);
}

#[test]
fn functions_and_flags() {
    #[rustfmt::skip]
    let cases: &[(&str, &[&str], bool, bool)] = &[
        // (sql, functions, sql_value_function, locking)
        ("SELECT now(), random(), nextval('s')", &["now", "random", "nextval"], false, false),
        ("SELECT count(*), rank() OVER (ORDER BY lower(x)) FROM t", &["count", "rank", "lower"], false, false),
        ("SELECT sum(x) FILTER (WHERE f(x)) FROM t GROUP BY g(y)", &["sum", "f", "g"], false, false),
        ("SELECT * FROM generate_series(1, 3) LIMIT abs(-1)", &["generate_series", "abs"], false, false),
        ("INSERT INTO t VALUES (gen_random_uuid()) RETURNING md5(x)", &["gen_random_uuid", "md5"], false, false),
        ("SELECT pg_catalog.lower('A'), s.f()", &["pg_catalog.lower", "s.f"], false, false),
        ("SELECT EXTRACT(year FROM d) FROM t", &["pg_catalog.extract"], false, false),
        ("SELECT * FROM t TABLESAMPLE BERNOULLI (10)", &["bernoulli"], false, false),
        ("SELECT CURRENT_TIMESTAMP", &[], true, false),
        ("SELECT 1 FROM t WHERE owner = CURRENT_USER", &[], true, false),
        ("VALUES (CURRENT_DATE)", &[], true, false),
        ("SELECT 'now'::timestamptz", &[], true, false),
        ("SELECT * FROM t WHERE d > 'today'", &[], true, false),
        ("SELECT 'snow'", &[], false, false),
        ("SELECT * FROM t FOR UPDATE", &[], false, true),
        ("SELECT * FROM t JOIN u ON true FOR SHARE OF t", &[], false, true),
        ("SELECT * FROM (SELECT * FROM t FOR KEY SHARE) s", &[], false, true),
        ("SELECT * FROM t FOR NO KEY UPDATE SKIP LOCKED", &[], false, true),
    ];
    for (sql, functions, svf, locking) in cases {
        let s = one(sql);
        assert_eq!(names(&s.functions), *functions, "functions of {sql}");
        assert_eq!(s.sql_value_function, *svf, "sql_value_function of {sql}");
        assert_eq!(s.locking, *locking, "locking of {sql}");
    }
    // `FOR SHARE OF x` names a FROM item, not another read.
    assert_eq!(
        names(&one("SELECT * FROM t AS x FOR SHARE OF x").reads),
        ["t"]
    );
}

#[test]
fn analysis_shapes() {
    for sql in ["", "  ", "-- just a comment", "/* c */ ;"] {
        let a = analyze(sql);
        assert!(!a.unanalysed, "{sql:?}");
        assert_eq!(a.single().map(|s| &s.kind), Some(&Kind::Empty), "{sql:?}");
        assert!(!a.is_cacheable_shape() && !a.writes_anything());
    }
    for broken in ["SELEC 1", "SELECT 1\0", "SELECT (1"] {
        let a = analyze(broken);
        assert!(a.unanalysed && a.statements.is_empty(), "{broken:?}");
        assert!(!a.is_cacheable_shape() && a.writes_anything());
    }

    let multi = analyze("BEGIN; UPDATE t SET x = 1 WHERE id = 2; COMMIT");
    let kinds: Vec<&Kind> = multi.statements.iter().map(|s| &s.kind).collect();
    let begin = Kind::Transaction(TxCommand::Begin {
        isolation: None,
        read_only: false,
    });
    assert_eq!(
        kinds,
        [
            &begin,
            &Kind::Write,
            &Kind::Transaction(TxCommand::Commit { chain: false })
        ]
    );
    assert_eq!(names(&multi.statements[1].writes), ["t"]);
    assert!(multi.single().is_none() && multi.writes_anything() && !multi.is_cacheable_shape());

    assert!(analyze("SELECT a FROM t WHERE id = $1").is_cacheable_shape());
    assert!(!analyze("SELECT 1; SELECT 2").is_cacheable_shape());
    assert!(!analyze("SELECT * FROM t FOR UPDATE").is_cacheable_shape());
    assert!(!analyze("SELECT now() - CURRENT_DATE").is_cacheable_shape());
    assert!(!analyze("WITH d AS (DELETE FROM t RETURNING 1) SELECT 1").is_cacheable_shape());
    assert!(!analyze("SELECT * FROM t").writes_anything());
    assert!(analyze("CREATE TABLE x (a int)").writes_anything());
    assert!(analyze("DO $$ BEGIN END $$").writes_anything());
    assert!(!analyze("SET x = 1; SHOW x").writes_anything());
}

/// pg_query decodes its tree with prost, which stops at 100 nested messages: a
/// chain of ~50 binary operators is too deep and comes back unanalysed (safe).
#[test]
fn deep_trees_are_unanalysed() {
    let shallow = format!("SELECT {}", ["x"; 20].join(" || "));
    assert!(analyze(&shallow).is_cacheable_shape());
    let deep = format!("SELECT {}", ["x"; 200].join(" || "));
    assert!(analyze(&deep).unanalysed);
    // Flat lists are not deep.
    let flat: Vec<String> = (0..500).map(|i| format!("a = {i}")).collect();
    assert!(!analyze(&format!("SELECT 1 FROM t WHERE {}", flat.join(" OR "))).unanalysed);
}

#[test]
fn statements_that_need_a_database_to_themselves_name_it() {
    assert_eq!(one("DROP DATABASE IF EXISTS scratch").vacated, ["scratch"]);
    assert_eq!(
        one("DROP DATABASE \"Mixed\" WITH (FORCE)").vacated,
        ["Mixed"]
    );
    assert_eq!(one("ALTER DATABASE a RENAME TO b").vacated, ["a"]);
    assert_eq!(one("CREATE DATABASE c TEMPLATE tmpl").vacated, ["tmpl"]);
    assert_eq!(
        one("CREATE DATABASE c WITH TEMPLATE = 'tmpl'").vacated,
        ["tmpl"]
    );
    assert_eq!(one("CREATE DATABASE c").vacated, ["template1"]);
    assert_eq!(
        one("CREATE DATABASE c TEMPLATE DEFAULT").vacated,
        ["template1"]
    );
    assert!(
        one("ALTER DATABASE a SET work_mem = '1MB'")
            .vacated
            .is_empty()
    );
    assert!(one("SELECT 1").vacated.is_empty());
}
