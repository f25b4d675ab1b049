//! Table-driven tests of [`WriteShape`]: accepted forms with the shape they give,
//! rejected forms with their reason.

use super::super::tests::one;
use super::super::*;

mod clocks;
mod in_lists;
mod upserts;

fn shape(sql: &str) -> Result<WriteShape, &'static str> {
    match one(sql).shape {
        Some(shape) => shape,
        None => panic!("no shape for {sql}"),
    }
}

fn rel(name: &str) -> RelName {
    match name.split_once('.') {
        Some((schema, name)) => RelName::new(Some(schema), name),
        None => RelName::new(None, name),
    }
}

fn lit(text: &str) -> Value {
    Value {
        operand: Operand::Literal(Some(text.to_owned())),
        cast: None,
    }
}

fn null() -> Value {
    Value {
        operand: Operand::Literal(None),
        cast: None,
    }
}

fn param(n: u16) -> Value {
    Value {
        operand: Operand::Param(n),
        cast: None,
    }
}

fn cast(value: Value, type_name: &str) -> Value {
    Value {
        cast: Some(type_name.to_owned()),
        ..value
    }
}

fn ins(table: &str, columns: &[&str], rows: Vec<Vec<Value>>) -> WriteShape {
    WriteShape::Insert {
        table: rel(table),
        columns: columns.iter().map(|c| (*c).to_owned()).collect(),
        rows,
        on_conflict: None,
        returning: Vec::new(),
    }
}

fn named<T>(list: Vec<(&str, T)>) -> Vec<(String, T)> {
    list.into_iter().map(|(c, v)| (c.to_owned(), v)).collect()
}

fn upd(table: &str, set: Vec<(&str, Assign)>, key: Vec<(&str, Value)>) -> WriteShape {
    WriteShape::Update {
        table: rel(table),
        only: false,
        set: named(set),
        key: named(key),
        compared: Vec::new(),
        one_of: None,
        returning: Vec::new(),
    }
}

fn del(table: &str, key: Vec<(&str, Value)>) -> WriteShape {
    WriteShape::Delete {
        table: rel(table),
        only: false,
        key: named(key),
        compared: Vec::new(),
        one_of: None,
        returning: Vec::new(),
    }
}

#[test]
fn accepted_inserts() {
    let cases: Vec<(&str, WriteShape)> = vec![
        (
            "INSERT INTO t (id, v) VALUES (1, 'x')",
            ins("t", &["id", "v"], vec![vec![lit("1"), lit("x")]]),
        ),
        (
            "INSERT INTO t (id, v) VALUES ($1, $2), ($3, $4)",
            ins(
                "t",
                &["id", "v"],
                vec![vec![param(1), param(2)], vec![param(3), param(4)]],
            ),
        ),
        (
            "insert into S.T (A, \"B\") values (-5, -1.5), (+7, - 2)",
            ins(
                "s.t",
                &["a", "B"],
                vec![vec![lit("-5"), lit("-1.5")], vec![lit("7"), lit("-2")]],
            ),
        ),
        (
            "INSERT INTO \"Odd Name\" (id, ok, gone, big) VALUES (1, true, NULL, 12345678901234567890)",
            ins(
                "Odd Name",
                &["id", "ok", "gone", "big"],
                vec![vec![
                    lit("1"),
                    lit("true"),
                    null(),
                    lit("12345678901234567890"),
                ]],
            ),
        ),
        (
            "INSERT INTO t (a, b, c, d) VALUES ($1::int, $2::timestamp with time zone, '1.5'::numeric(10,2), date '2024-01-01')",
            ins(
                "t",
                &["a", "b", "c", "d"],
                vec![vec![
                    cast(param(1), "int4"),
                    cast(param(2), "timestamptz"),
                    cast(lit("1.5"), "numeric(10,2)"),
                    cast(lit("2024-01-01"), "date"),
                ]],
            ),
        ),
        (
            "INSERT INTO t (a, b, c, d, e) VALUES ('{1,2}'::int[], 'x'::\"MyType\", 'y'::s.t, 'z'::\"char\", 'w'::char(3))",
            ins(
                "t",
                &["a", "b", "c", "d", "e"],
                vec![vec![
                    cast(lit("{1,2}"), "int4[]"),
                    cast(lit("x"), "\"MyType\""),
                    cast(lit("y"), "s.t"),
                    cast(lit("z"), "\"char\""),
                    cast(lit("w"), "bpchar(3)"),
                ]],
            ),
        ),
        (
            "INSERT INTO t (a, b, c, d, e) VALUES (-(-5), 0x1F, '1'::double precision, 1::bit, '{}'::varchar(3)[2])",
            ins(
                "t",
                &["a", "b", "c", "d", "e"],
                vec![vec![
                    lit("5"),
                    lit("31"),
                    cast(lit("1"), "float8"),
                    cast(lit("1"), "bit(1)"),
                    cast(lit("{}"), "varchar(3)[2]"),
                ]],
            ),
        ),
        (
            "INSERT INTO t (v, w) VALUES (E'it''s\\n', $$dollar$$)",
            ins("t", &["v", "w"], vec![vec![lit("it's\n"), lit("dollar")]]),
        ),
        (
            "INSERT INTO t (d, i) VALUES (interval '1 day', 'infinity')",
            ins(
                "t",
                &["d", "i"],
                vec![vec![cast(lit("1 day"), "interval"), lit("infinity")]],
            ),
        ),
        (
            "INSERT INTO t AS x (id) (VALUES (1))",
            ins("t", &["id"], vec![vec![lit("1")]]),
        ),
    ];
    for (sql, expected) in cases {
        assert_eq!(shape(sql), Ok(expected), "{sql}");
    }
}

#[test]
fn accepted_updates_and_deletes() {
    use Assign::{Add, Set, Sub};
    let cases: Vec<(&str, WriteShape)> = vec![
        (
            "UPDATE t SET v = 'x' WHERE id = 1",
            upd("t", vec![("v", Set(lit("x")))], vec![("id", lit("1"))]),
        ),
        (
            "UPDATE t SET v = $1 WHERE $2 = id",
            upd("t", vec![("v", Set(param(1)))], vec![("id", param(2))]),
        ),
        (
            "UPDATE s.t SET n = n + 1, m = m - $2, k = 1 + k, v = NULL WHERE a = $1::int8 AND (b = 'x' AND s.t.c = -3)",
            upd(
                "s.t",
                vec![
                    ("n", Add(lit("1"))),
                    ("m", Sub(param(2))),
                    ("k", Add(lit("1"))),
                    ("v", Set(null())),
                ],
                vec![
                    ("a", cast(param(1), "int8")),
                    ("b", lit("x")),
                    ("c", lit("-3")),
                ],
            ),
        ),
        (
            "UPDATE t AS x SET n = x.n + $1::numeric WHERE x.id = $2 AND k = false",
            upd(
                "t",
                vec![("n", Add(cast(param(1), "numeric")))],
                vec![("id", param(2)), ("k", lit("false"))],
            ),
        ),
        (
            "UPDATE \"T\" SET \"N\" = \"T\".\"N\" - 2.5 WHERE \"T\".id = 'a'",
            upd("T", vec![("N", Sub(lit("2.5")))], vec![("id", lit("a"))]),
        ),
        (
            "DELETE FROM t WHERE id = $1",
            del("t", vec![("id", param(1))]),
        ),
        (
            "DELETE FROM s.t AS x WHERE x.a = 1 AND b = $2::text",
            del("s.t", vec![("a", lit("1")), ("b", cast(param(2), "text"))]),
        ),
    ];
    for (sql, expected) in cases {
        assert_eq!(shape(sql), Ok(expected), "{sql}");
    }
    // ONLY is recorded: a rewritten statement must not reach inheritance children.
    assert_eq!(
        shape("UPDATE ONLY t SET v = 1 WHERE id = 2"),
        Ok(WriteShape::Update {
            table: rel("t"),
            only: true,
            set: named(vec![("v", Set(lit("1")))]),
            key: named(vec![("id", lit("2"))]),
            compared: Vec::new(),
            one_of: None,
            returning: Vec::new(),
        })
    );
    assert_eq!(
        shape("DELETE FROM ONLY t WHERE id = 2"),
        Ok(WriteShape::Delete {
            table: rel("t"),
            only: true,
            key: named(vec![("id", lit("2"))]),
            compared: Vec::new(),
            one_of: None,
            returning: Vec::new(),
        })
    );
}

/// Comparisons beyond equality are a write's guard (ADR 0035); whether their column
/// is a key column is the caller's to judge (`id > 5` is refused there).
#[test]
fn comparisons_in_where_are_kept_as_the_guard() {
    let compared = |sql: &str| match shape(sql) {
        Ok(WriteShape::Update { key, compared, .. } | WriteShape::Delete { key, compared, .. }) => {
            (key, compared)
        }
        other => panic!("{sql}: {other:?}"),
    };
    assert_eq!(
        compared("UPDATE t SET n = n - 1 WHERE id = $1 AND n > 0"),
        (
            named(vec![(
                "id",
                Value {
                    operand: Operand::Param(1),
                    cast: None
                }
            )]),
            vec![("n".to_owned(), Compare::Gt, lit("0"))]
        )
    );
    for (op, cmp) in [
        ("<", Compare::Lt),
        ("<=", Compare::Le),
        (">=", Compare::Ge),
        ("<>", Compare::Ne),
        ("!=", Compare::Ne),
    ] {
        let (_, c) = compared(&format!("DELETE FROM t WHERE n {op} 3 AND id = 1"));
        assert_eq!(c, vec![("n".to_owned(), cmp, lit("3"))], "{op}");
    }
    let (key, c) = compared("DELETE FROM t WHERE id > 5");
    assert!(key.is_empty());
    assert_eq!(c, vec![("id".to_owned(), Compare::Gt, lit("5"))]);
}

#[test]
fn returning_lists_of_plain_columns_are_kept() {
    let col = |column: &str, name: &str| Returned::Column {
        column: column.to_owned(),
        name: name.to_owned(),
    };
    let cases: Vec<(&str, Vec<Returned>)> = vec![
        (
            "INSERT INTO t (id, v) VALUES (1, 'a') RETURNING id, v AS w",
            vec![col("id", "id"), col("v", "w")],
        ),
        (
            "INSERT INTO t (id) VALUES (1) RETURNING *, t.id",
            vec![Returned::All, col("id", "id")],
        ),
        (
            "UPDATE s.t AS x SET v = 1 WHERE id = 2 RETURNING x.*, x.v",
            vec![Returned::All, col("v", "v")],
        ),
        (
            "DELETE FROM t WHERE id = 1 RETURNING \"Id\", id",
            vec![col("Id", "Id"), col("id", "id")],
        ),
    ];
    for (sql, expected) in cases {
        let got = shape(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert_eq!(got.returning(), expected.as_slice(), "{sql}");
    }
    // The rest of the shape is as without RETURNING.
    let mut with = ins("t", &["id"], vec![vec![lit("1")]]);
    if let WriteShape::Insert { returning, .. } = &mut with {
        returning.push(Returned::All);
    }
    assert_eq!(shape("INSERT INTO t (id) VALUES (1) RETURNING *"), Ok(with));
    // Clauses checked after RETURNING still disqualify.
    assert_eq!(
        shape("INSERT INTO t (id) VALUES (1) ON CONFLICT DO NOTHING RETURNING id"),
        Err(reason::ON_CONFLICT_TARGET)
    );
}

/// `DEFAULT` in every row of a column: the column is left out, as PostgreSQL treats
/// both alike; in only some rows it is still a reason.
#[test]
fn default_in_every_row_leaves_the_column_out() {
    assert_eq!(
        shape("INSERT INTO t (id, c, v) VALUES ($1, DEFAULT, $2)"),
        Ok(ins("t", &["id", "v"], vec![vec![param(1), param(2)]]))
    );
    assert_eq!(
        shape("INSERT INTO t (id, c) VALUES (1, DEFAULT), (2, DEFAULT)"),
        Ok(ins("t", &["id"], vec![vec![lit("1")], vec![lit("2")]]))
    );
    assert_eq!(
        shape("INSERT INTO t (id, c) VALUES (1, DEFAULT), (2, 3)"),
        Err(reason::DEFAULT_VALUE)
    );
    assert_eq!(
        shape("INSERT INTO t (c) VALUES (DEFAULT)"),
        Err(reason::DEFAULT_VALUE)
    );
}

#[test]
fn rejected_forms() {
    use reason as r;
    #[rustfmt::skip]
    let cases: &[(&str, &str)] = &[
        // Statement clauses.
        ("INSERT INTO t (id) VALUES (1) RETURNING id + 1", r::RETURNING),
        ("INSERT INTO t (id) VALUES (1) RETURNING now()", r::RETURNING),
        ("INSERT INTO t (id) VALUES (1) RETURNING id::text", r::RETURNING),
        ("INSERT INTO t (id) VALUES (1) RETURNING 1", r::RETURNING),
        ("INSERT INTO t (id) VALUES (1) RETURNING u.id", r::RETURNING),
        ("INSERT INTO t (id) VALUES (1) RETURNING u.*", r::RETURNING),
        ("INSERT INTO t AS x (id) VALUES (1) RETURNING t.id", r::RETURNING),
        ("UPDATE t SET v = 1 WHERE id = 1 RETURNING v[1]", r::RETURNING),
        ("UPDATE t SET v = 1 WHERE id = 1 RETURNING (SELECT 1)", r::RETURNING),
        ("UPDATE t SET v = 1 WHERE id = 1 RETURNING new.v", r::RETURNING),
        ("DELETE FROM t WHERE id = 1 RETURNING old.*", r::RETURNING),
        ("DELETE FROM t WHERE id = 1 RETURNING WITH (OLD AS o) id", r::RETURNING),
        // An unknown RETURNING outranks the clauses after it.
        ("INSERT INTO t (id) VALUES (1) ON CONFLICT DO NOTHING RETURNING f(id)", r::RETURNING),
        ("INSERT INTO t (id) VALUES (1) ON CONFLICT DO NOTHING", r::ON_CONFLICT_TARGET),
        ("INSERT INTO t (id) VALUES (1) ON CONFLICT (lower(id)) DO NOTHING", r::ON_CONFLICT_TARGET),
        ("INSERT INTO t (id) VALUES (1) ON CONFLICT (id COLLATE \"C\") DO NOTHING", r::ON_CONFLICT_TARGET),
        ("INSERT INTO t (id) VALUES (1) ON CONFLICT (id text_pattern_ops) DO NOTHING", r::ON_CONFLICT_TARGET),
        ("INSERT INTO t (id) VALUES (1) ON CONFLICT (id) WHERE id > 0 DO NOTHING", r::ON_CONFLICT_TARGET),
        ("INSERT INTO t (id) VALUES (1) ON CONFLICT (id, id) DO NOTHING", r::ON_CONFLICT_TARGET),
        ("INSERT INTO t (id, v) VALUES (1, 2) ON CONFLICT (id) DO UPDATE SET v = 3 WHERE t.v < 3", r::ON_CONFLICT_WHERE),
        ("INSERT INTO t (id, v) VALUES (1, 2) ON CONFLICT (id) DO UPDATE SET v = excluded.v * 2", r::ON_CONFLICT_SET),
        ("INSERT INTO t (id, v) VALUES (1, 2) ON CONFLICT (id) DO UPDATE SET v = excluded.v - t.v", r::ON_CONFLICT_SET),
        ("INSERT INTO t (id, v) VALUES (1, 2) ON CONFLICT (id) DO UPDATE SET v = t.w + excluded.v", r::ON_CONFLICT_SET),
        ("INSERT INTO t (id, v) VALUES (1, 2) ON CONFLICT (id) DO UPDATE SET v = u.v", r::ON_CONFLICT_SET),
        ("INSERT INTO t (id, v) VALUES (1, 2) ON CONFLICT (id) DO UPDATE SET v = random()", r::FUNCTION),
        ("INSERT INTO t (id, v) VALUES (1, 2) ON CONFLICT (id) DO UPDATE SET v = (SELECT 1)", r::SUBQUERY),
        ("INSERT INTO t (id, v) VALUES (1, 2) ON CONFLICT (id) DO UPDATE SET (v, w) = (1, 2)", r::MULTIPLE_ASSIGNMENT),
        ("INSERT INTO t (id, v) VALUES (1, 2) ON CONFLICT (id) DO UPDATE SET v = 1, v = 2", r::DUPLICATE_COLUMN),
        ("INSERT INTO excluded (id, v) VALUES (1, 2) ON CONFLICT (id) DO UPDATE SET v = excluded.v", r::ON_CONFLICT_SET),
        ("INSERT INTO t (id) OVERRIDING SYSTEM VALUE VALUES (1)", r::OVERRIDING),
        ("INSERT INTO t (id) SELECT 1", r::INSERT_SELECT),
        ("INSERT INTO t (id) SELECT id FROM u", r::INSERT_SELECT),
        ("INSERT INTO t SELECT * FROM u", r::INSERT_SELECT),
        ("INSERT INTO t (id) VALUES (1) UNION VALUES (2)", r::INSERT_SELECT),
        ("INSERT INTO t (id) VALUES (2), (1) ORDER BY 1", r::INSERT_SELECT),
        ("INSERT INTO t (id) VALUES (1) LIMIT 1", r::INSERT_SELECT),
        ("INSERT INTO t (id) WITH w AS (SELECT 1) SELECT * FROM w", r::INSERT_SELECT),
        ("INSERT INTO t DEFAULT VALUES", r::DEFAULT_VALUES),
        ("INSERT INTO t VALUES (1, 'x')", r::NO_COLUMN_LIST),
        ("WITH w AS (SELECT 1) INSERT INTO t (id) VALUES (1)", r::WITH_CLAUSE),
        ("WITH d AS (DELETE FROM u RETURNING id) UPDATE t SET v = 1 WHERE id = 1", r::WITH_CLAUSE),
        ("WITH w AS (SELECT 1) DELETE FROM t WHERE id = 1", r::WITH_CLAUSE),
        ("UPDATE t SET v = u.v FROM u WHERE t.id = u.id", r::FROM_OR_USING),
        ("DELETE FROM t USING u WHERE t.id = u.id", r::FROM_OR_USING),
        ("UPDATE t SET v = 1", r::NO_WHERE),
        ("DELETE FROM t", r::NO_WHERE),
        ("UPDATE t SET v = 1 WHERE CURRENT OF c", r::CURRENT_OF),
        ("DELETE FROM t WHERE CURRENT OF c", r::CURRENT_OF),
        // Columns and rows.
        ("INSERT INTO t (id, id) VALUES (1, 2)", r::DUPLICATE_COLUMN),
        ("INSERT INTO t (id, v) VALUES (1)", r::COLUMN_COUNT_MISMATCH),
        ("INSERT INTO t (id) VALUES (1, 2)", r::COLUMN_COUNT_MISMATCH),
        ("INSERT INTO t (id, v) VALUES (1, 2), (3)", r::COLUMN_COUNT_MISMATCH),
        ("INSERT INTO t (a[1]) VALUES (1)", r::INDIRECTION),
        ("INSERT INTO t (c.f) VALUES (1)", r::INDIRECTION),
        ("UPDATE t SET a[1] = 2 WHERE id = 1", r::INDIRECTION),
        // Values.
        ("INSERT INTO t (id, v) VALUES (1, DEFAULT), (2, 3)", r::DEFAULT_VALUE),
        ("UPDATE t SET v = DEFAULT WHERE id = 1", r::DEFAULT_VALUE),
        ("INSERT INTO t (id, at) VALUES (1, now(1))", r::FUNCTION),
        ("INSERT INTO t (id) VALUES (uuid_generate_v4())", r::FUNCTION),
        ("INSERT INTO t (id, at) VALUES (1, CURRENT_TIMESTAMP(3))", r::FUNCTION),
        ("INSERT INTO t (id, at) VALUES (1, public.now())", r::FUNCTION),
        ("INSERT INTO t (id, who) VALUES (1, CURRENT_USER)", r::FUNCTION),
        ("INSERT INTO t (id, at) VALUES (1, now() + interval '1 day')", r::FUNCTION),
        ("INSERT INTO t (id, v) VALUES (1, lower($1)::text)", r::FUNCTION),
        ("INSERT INTO t (id, v) VALUES (1, (SELECT max(v) FROM u))", r::SUBQUERY),
        ("INSERT INTO t (id, at) VALUES (1, 'now')", r::CLOCK_LITERAL),
        ("INSERT INTO t (id, at) VALUES (1, 'today'::date)", r::CLOCK_LITERAL),
        ("UPDATE t SET at = 'now'::timestamptz WHERE id = 1", r::CLOCK_LITERAL),
        ("DELETE FROM t WHERE d = 'yesterday'", r::CLOCK_LITERAL),
        ("INSERT INTO t (id, v) VALUES (1, 1 + 1)", r::EXPRESSION),
        ("INSERT INTO t (id, v) VALUES (1, ARRAY[1, 2])", r::EXPRESSION),
        ("INSERT INTO t (id, v) VALUES (1, ROW(1, 2))", r::EXPRESSION),
        ("INSERT INTO t (id, v) VALUES (1, $1::text::int)", r::EXPRESSION),
        ("INSERT INTO t (id, v) VALUES (1, 'x' COLLATE \"C\")", r::EXPRESSION),
        ("INSERT INTO t (id, v) VALUES (1, -$1)", r::EXPRESSION),
        ("INSERT INTO t (id, v) VALUES (1, $0)", r::EXPRESSION),
        ("INSERT INTO t (id, v) VALUES (1, $70000)", r::EXPRESSION),
        ("INSERT INTO t (id, v) VALUES (1, B'101')", r::EXPRESSION),
        ("INSERT INTO t (id, v) VALUES (1, interval '1' day)", r::EXPRESSION),
        ("INSERT INTO t (id, v) VALUES (1, v)", r::EXPRESSION),
        // SET.
        ("UPDATE t SET a = b WHERE id = 1", r::SET_EXPRESSION),
        ("UPDATE t SET n = n * 2 WHERE id = 1", r::SET_EXPRESSION),
        ("UPDATE t SET n = 1 - n WHERE id = 1", r::SET_EXPRESSION),
        ("UPDATE t SET n = m + 1 WHERE id = 1", r::SET_EXPRESSION),
        ("UPDATE t SET n = n + m WHERE id = 1", r::SET_EXPRESSION),
        ("UPDATE t SET n = n + 1 + 1 WHERE id = 1", r::SET_EXPRESSION),
        ("UPDATE t SET n = n || 'x' WHERE id = 1", r::SET_EXPRESSION),
        ("UPDATE t SET n = -n WHERE id = 1", r::SET_EXPRESSION),
        ("UPDATE t SET n = n + random() WHERE id = 1", r::FUNCTION),
        ("UPDATE t SET n = n + (SELECT 1) WHERE id = 1", r::SUBQUERY),
        ("UPDATE t SET (a, b) = (1, 2) WHERE id = 1", r::MULTIPLE_ASSIGNMENT),
        ("UPDATE t SET (a, b) = (SELECT 1, 2) WHERE id = 1", r::MULTIPLE_ASSIGNMENT),
        ("UPDATE t SET v = 1, v = 2 WHERE id = 1", r::DUPLICATE_COLUMN),
        ("UPDATE t AS x SET n = t.n + 1 WHERE id = 1", r::COLUMN_REFERENCE),
        ("UPDATE t SET n = u.n + 1 WHERE id = 1", r::COLUMN_REFERENCE),
        // WHERE.
        ("UPDATE t SET v = 1 WHERE id = 1 OR id = 2", r::WHERE_NOT_KEY_EQUALITY),
        ("DELETE FROM t WHERE id NOT IN (1)", r::WHERE_NOT_KEY_EQUALITY),
        ("DELETE FROM t WHERE 1 IN (id)", r::WHERE_NOT_KEY_EQUALITY),
        ("DELETE FROM t WHERE id IN (v)", r::WHERE_NOT_KEY_EQUALITY),
        ("DELETE FROM t WHERE id IN (1 + 1)", r::WHERE_NOT_KEY_EQUALITY),
        ("DELETE FROM t WHERE id IN (NULL)", r::NULL_KEY),
        ("DELETE FROM t WHERE id = ANY($1)", r::WHERE_NOT_KEY_EQUALITY),
        ("DELETE FROM t WHERE id IS NULL", r::WHERE_NOT_KEY_EQUALITY),
        ("DELETE FROM t WHERE id BETWEEN 1 AND 5", r::WHERE_NOT_KEY_EQUALITY),
        ("DELETE FROM t WHERE id = 1 AND 2 < v", r::WHERE_NOT_KEY_EQUALITY),
        ("DELETE FROM t WHERE id = 1 AND v < w", r::WHERE_NOT_KEY_EQUALITY),
        ("DELETE FROM t WHERE id = 1 AND v > NULL", r::WHERE_NOT_KEY_EQUALITY),
        ("DELETE FROM t WHERE id = 1 AND v > 1 + 1", r::WHERE_NOT_KEY_EQUALITY),
        ("DELETE FROM t WHERE NOT (id = 1)", r::WHERE_NOT_KEY_EQUALITY),
        ("DELETE FROM t WHERE id = 1 AND true", r::WHERE_NOT_KEY_EQUALITY),
        ("DELETE FROM t WHERE id IS NOT DISTINCT FROM 1", r::WHERE_NOT_KEY_EQUALITY),
        ("DELETE FROM t WHERE id = v", r::WHERE_NOT_KEY_EQUALITY),
        ("DELETE FROM t WHERE 1 = 1", r::WHERE_NOT_KEY_EQUALITY),
        ("DELETE FROM t WHERE id = 1 + 1", r::WHERE_NOT_KEY_EQUALITY),
        ("DELETE FROM t WHERE (a, b) = (1, 2)", r::WHERE_NOT_KEY_EQUALITY),
        ("DELETE FROM t WHERE id OPERATOR(pg_catalog.=) 1", r::WHERE_NOT_KEY_EQUALITY),
        ("DELETE FROM t WHERE lower(email) = 'x'", r::FUNCTION),
        ("DELETE FROM t WHERE id = 1 AND at < now()", r::FUNCTION),
        ("DELETE FROM t WHERE id = (SELECT max(id) FROM u)", r::SUBQUERY),
        ("DELETE FROM t WHERE id IN (SELECT id FROM u)", r::SUBQUERY),
        ("DELETE FROM t WHERE EXISTS (SELECT 1)", r::SUBQUERY),
        ("DELETE FROM t WHERE id = 1 AND id = 2", r::DUPLICATE_COLUMN),
        ("DELETE FROM t WHERE id = NULL", r::NULL_KEY),
        ("DELETE FROM t AS x WHERE t.id = 1", r::COLUMN_REFERENCE),
        ("DELETE FROM t WHERE u.id = 1", r::COLUMN_REFERENCE),
        ("DELETE FROM t WHERE other.t.id = 1", r::COLUMN_REFERENCE),
        ("DELETE FROM s.t WHERE other.t.id = 1", r::COLUMN_REFERENCE),
        // Precedence: statement clauses first, then SET, then WHERE.
        ("UPDATE t SET v = random() WHERE id > 1 RETURNING 1", r::RETURNING),
        ("UPDATE t SET v = random() WHERE id > 1", r::FUNCTION),
        ("UPDATE t SET v = 1 FROM u", r::FROM_OR_USING),
    ];
    for (sql, expected) in cases {
        assert!(
            reason::ALL.contains(expected),
            "{expected} not in reason::ALL"
        );
        assert_eq!(shape(sql), Err(*expected), "{sql}");
    }
}

#[test]
fn only_plain_top_level_writes_have_a_shape() {
    for sql in [
        "SELECT 1",
        "SELECT * FROM t WHERE id = 1",
        "WITH d AS (DELETE FROM t WHERE id = 1 RETURNING 1) SELECT 1",
        "MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN DELETE",
        "COPY t FROM STDIN",
        "EXPLAIN ANALYZE DELETE FROM t WHERE id = 1",
        "EXPLAIN DELETE FROM t WHERE id = 1",
        "PREPARE p AS DELETE FROM t WHERE id = $1",
        "CREATE RULE r AS ON INSERT TO t DO ALSO DELETE FROM u WHERE id = 1",
        "TRUNCATE t",
        "BEGIN",
        "",
    ] {
        let a = analyze(sql);
        assert!(
            a.statements.iter().all(|s| s.shape.is_none()),
            "{sql}: {a:?}"
        );
    }
}

#[test]
fn each_statement_has_its_own_shape() {
    let a = analyze(
        "BEGIN; INSERT INTO t (id) VALUES (1); UPDATE t SET n = n + 1 WHERE id = 1; \
         DELETE FROM t WHERE id = 1 OR id = 2; SELECT 1; COMMIT",
    );
    let shapes: Vec<_> = a.statements.iter().map(|s| s.shape.clone()).collect();
    assert_eq!(
        shapes,
        [
            None,
            Some(Ok(ins("t", &["id"], vec![vec![lit("1")]]))),
            Some(Ok(upd(
                "t",
                vec![("n", Assign::Add(lit("1")))],
                vec![("id", lit("1"))]
            ))),
            Some(Err(reason::WHERE_NOT_KEY_EQUALITY)),
            None,
            None,
        ]
    );
}

#[test]
fn other_fields_are_unchanged_by_the_shape() {
    let s = one("UPDATE s.t SET n = n + 1 WHERE id = $1");
    assert_eq!(s.kind, Kind::Write);
    assert_eq!(s.writes, [rel("s.t")]);
    assert!(s.reads.is_empty() && s.functions.is_empty());
    assert_eq!(
        s.shape.as_ref().map(|s| s.as_ref().map(WriteShape::table)),
        Some(Ok(&rel("s.t")))
    );
    // A clock literal still sets the walk's flag, as before.
    assert!(one("INSERT INTO t (at) VALUES ('now')").sql_value_function);
}

#[test]
fn shape_counts_in_the_memo_weight() {
    let small = analyze("DELETE FROM t WHERE id = 1").approx_bytes();
    let rows: Vec<String> = (0..100)
        .map(|i| format!("({i}, 'some text {i}')"))
        .collect();
    let big = analyze(&format!("INSERT INTO t (id, v) VALUES {}", rows.join(", ")));
    assert!(matches!(big.statements[0].shape, Some(Ok(_))));
    // 100 rows of two values, each a Value plus its text.
    assert!(big.approx_bytes() > small + 200 * size_of::<Value>());
    // A rejected shape holds no heap; the key of an accepted one does.
    let rejected = analyze("DELETE FROM t WHERE id > 1 OR id < 0").approx_bytes();
    assert!(rejected < small);
}
