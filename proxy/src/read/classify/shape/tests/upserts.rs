//! Upserts: the arbiters, actions and assignments `ON CONFLICT` may have and still
//! be a write shape (ADR 0027).

use super::*;

/// `ON CONFLICT (cols) | ON CONSTRAINT c` with DO NOTHING or DO UPDATE SET of values,
/// `EXCLUDED.c` and `c ± either`, the target qualified by its name or alias.
#[test]
fn accepted_upserts() {
    let excl = |c: &str| ConflictValue::Excluded(c.to_owned());
    let with = |target: ConflictTarget, update: Option<Vec<(&str, ConflictSet)>>| {
        let mut s = ins("t", &["id", "v"], vec![vec![param(1), param(2)]]);
        if let WriteShape::Insert { on_conflict, .. } = &mut s {
            *on_conflict = Some(OnConflict {
                target,
                update: update.map(named),
            });
        }
        s
    };
    let cols = |c: &[&str]| ConflictTarget::Columns(c.iter().map(|c| (*c).to_owned()).collect());
    let cases = [
        (
            "INSERT INTO t (id, v) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
            with(cols(&["id"]), None),
        ),
        (
            "INSERT INTO t (id, v) VALUES ($1, $2) ON CONFLICT ON CONSTRAINT t_pkey DO NOTHING",
            with(ConflictTarget::Constraint("t_pkey".to_owned()), None),
        ),
        (
            "INSERT INTO t (id, v) VALUES ($1, $2) ON CONFLICT (a, b) DO UPDATE SET v = EXCLUDED.v",
            with(
                cols(&["a", "b"]),
                Some(vec![("v", ConflictSet::Set(excl("v")))]),
            ),
        ),
        (
            "INSERT INTO t (id, v) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE \
             SET v = t.v + excluded.v, w = excluded.v + w, x = x - excluded.y, y = 5, z = z + $3",
            with(
                cols(&["id"]),
                Some(vec![
                    ("v", ConflictSet::Add(excl("v"))),
                    ("w", ConflictSet::Add(excl("v"))),
                    ("x", ConflictSet::Sub(excl("y"))),
                    ("y", ConflictSet::Set(ConflictValue::Value(lit("5")))),
                    ("z", ConflictSet::Add(ConflictValue::Value(param(3)))),
                ]),
            ),
        ),
    ];
    for (sql, expected) in cases {
        assert_eq!(shape(sql), Ok(expected), "{sql}");
    }
    // An alias qualifies the existing row.
    let aliased = shape(
        "INSERT INTO t AS c (id, v) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET v = c.v + EXCLUDED.v",
    );
    assert!(
        matches!(&aliased, Ok(WriteShape::Insert { on_conflict: Some(OnConflict { update: Some(set), .. }), .. })
            if set == &named(vec![("v", ConflictSet::Add(excl("v")))])),
        "{aliased:?}"
    );
}
