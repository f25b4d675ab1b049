//! `k IN (…)` in an UPDATE's or DELETE's WHERE: one value is PostgreSQL's own `k = v`
//! (Django's `instance.delete()`), several are the rows of each value (ADR 0038).

use super::*;
use crate::read::classify::shape::reason as r;

#[test]
fn one_element_in_is_equality() {
    for (with_in, with_eq) in [
        (
            "DELETE FROM \"t\" WHERE \"t\".\"id\" IN ('s001') AND v > 2",
            "DELETE FROM t WHERE id = 's001' AND v > 2",
        ),
        (
            "UPDATE t SET v = $1 WHERE t.id IN ($2)",
            "UPDATE t SET v = $1 WHERE t.id = $2",
        ),
        (
            "DELETE FROM t WHERE id IN (now())",
            "DELETE FROM t WHERE id = now()",
        ),
        (
            "UPDATE t SET v = 1 WHERE id IN ($1::int8) AND version = $2",
            "UPDATE t SET v = 1 WHERE id = $1::int8 AND version = $2",
        ),
        (
            "DELETE FROM t WHERE id IN ((SELECT 1))",
            "DELETE FROM t WHERE id = (SELECT 1)",
        ),
    ] {
        assert_eq!(shape(with_in), shape(with_eq), "{with_in}");
    }
}

#[test]
fn several_values_are_one_of() {
    let any = |column: &str, values: Vec<Value>| Some((column.to_owned(), values));
    assert_eq!(
        shape("UPDATE t SET v = 'paid' WHERE t.id IN (1, $1, '3'::int8) AND k = 2"),
        Ok(WriteShape::Update {
            table: rel("t"),
            only: false,
            set: named(vec![("v", Assign::Set(lit("paid")))]),
            key: named(vec![("k", lit("2"))]),
            compared: Vec::new(),
            one_of: any("id", vec![lit("1"), param(1), cast(lit("3"), "int8")]),
            returning: Vec::new(),
        })
    );
    assert_eq!(
        shape("DELETE FROM s.t WHERE key IN ($1, $2, $3) RETURNING key"),
        Ok(WriteShape::Delete {
            table: rel("s.t"),
            only: false,
            key: Vec::new(),
            compared: Vec::new(),
            one_of: any("key", vec![param(1), param(2), param(3)]),
            returning: vec![Returned::Column {
                column: "key".into(),
                name: "key".into(),
            }],
        })
    );
}

#[test]
fn in_lists_that_are_not_a_set_of_keys() {
    for (sql, reason) in [
        (
            "DELETE FROM t WHERE id NOT IN (1)",
            r::WHERE_NOT_KEY_EQUALITY,
        ),
        (
            "DELETE FROM t WHERE id NOT IN (1, 2)",
            r::WHERE_NOT_KEY_EQUALITY,
        ),
        ("DELETE FROM t WHERE 1 IN (id)", r::WHERE_NOT_KEY_EQUALITY),
        (
            "DELETE FROM t WHERE 1 IN (id, v)",
            r::WHERE_NOT_KEY_EQUALITY,
        ),
        ("DELETE FROM t WHERE id IN (v)", r::WHERE_NOT_KEY_EQUALITY),
        (
            "DELETE FROM t WHERE id IN (1, v)",
            r::WHERE_NOT_KEY_EQUALITY,
        ),
        (
            "DELETE FROM t WHERE id IN (1 + 1)",
            r::WHERE_NOT_KEY_EQUALITY,
        ),
        (
            "DELETE FROM t WHERE id IN (1, 1 + 1)",
            r::WHERE_NOT_KEY_EQUALITY,
        ),
        ("DELETE FROM t WHERE id IN (NULL)", r::NULL_KEY),
        ("DELETE FROM t WHERE id IN (1, NULL)", r::NULL_KEY),
        ("DELETE FROM t WHERE id IN (1, random())", r::FUNCTION),
        ("DELETE FROM t WHERE id IN (1, (SELECT 2))", r::SUBQUERY),
        (
            "DELETE FROM t WHERE (id, k) IN ((1, 2), (3, 4))",
            r::WHERE_NOT_KEY_EQUALITY,
        ),
        (
            "DELETE FROM t WHERE id IN (1, 2) OR id = 3",
            r::WHERE_NOT_KEY_EQUALITY,
        ),
        (
            "DELETE FROM t WHERE id IN (1, 2) AND k IN (3, 4)",
            r::WHERE_NOT_KEY_EQUALITY,
        ),
        (
            "DELETE FROM t WHERE id IN (1, 2) AND id = 3",
            r::DUPLICATE_COLUMN,
        ),
        (
            "DELETE FROM t WHERE id = 3 AND id IN (1, 2)",
            r::DUPLICATE_COLUMN,
        ),
        ("DELETE FROM t WHERE u.id IN (1, 2)", r::COLUMN_REFERENCE),
        (
            "DELETE FROM t WHERE id = ANY($1)",
            r::WHERE_NOT_KEY_EQUALITY,
        ),
    ] {
        assert_eq!(shape(sql), Err(reason), "{sql}");
    }
}
