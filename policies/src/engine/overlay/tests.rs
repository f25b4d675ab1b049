//! The rule of which pending writes make an overlay valid (ADR 0039), and the
//! watches' hold of the flusher.

use std::sync::Arc;

use super::{Assigned, Needs, Refusal, Watch, Watches, overlay_of};
use crate::writes::{Assign, AssignOp, Cmp, Guard, Record, RowOp, Val};

const T: &str = "public.t";

fn key(k: &str) -> Vec<Val> {
    vec![Val::plain(Some(k))]
}

fn set(k: &str, assigns: &[(&str, Option<&str>)]) -> RowOp {
    RowOp::Update {
        table: T.to_owned(),
        key: key(k),
        set: assigns
            .iter()
            .map(|(c, v)| Assign {
                column: (*c).to_owned(),
                op: AssignOp::Set,
                value: Val::plain(*v),
            })
            .collect(),
        guard: Vec::new(),
    }
}

fn record(ops: Vec<RowOp>) -> Record {
    Record { ops }
}

/// Keys are the first value's text (an INSERT's first column), `None` for "?".
fn key_of(op: &RowOp) -> Option<Vec<String>> {
    let text = match op {
        RowOp::Insert { values, .. } => values.first()?.text.clone()?,
        RowOp::Update { key, .. } | RowOp::Delete { key, .. } => key.first()?.text.clone()?,
    };
    (text != "?").then_some(vec![text])
}

/// A read of `token` and `n` whose WHERE also compares `flag`.
fn needs() -> Needs {
    Needs {
        outputs: vec!["token".to_owned(), "n".to_owned()],
        filtered: vec!["flag".to_owned()],
    }
}

/// A fresh watch of row 1 for [`needs`].
fn watch_of_row_1() -> Watch {
    Watch {
        id: 1,
        table: T.to_owned(),
        key: vec!["1".to_owned()],
        needs: needs(),
        started: tokio::time::Instant::now(),
        records: Vec::new(),
        blocking: None,
        lapsed: false,
    }
}

fn overlay(records: &[Record], k: &str) -> Result<Assigned, Refusal> {
    overlay_of(records, T, &[k.to_owned()], &needs(), key_of)
}

fn assigned(pairs: &[(&str, Option<&str>)]) -> Assigned {
    pairs
        .iter()
        .map(|(c, v)| ((*c).to_owned(), v.map(str::to_owned)))
        .collect()
}

#[test]
fn constant_updates_of_every_session_fold_in_log_order() {
    let records = [
        record(vec![set("1", &[("token", Some("a")), ("n", Some("5"))])]),
        // Another row of the same table and another table: not this row's.
        record(vec![set("2", &[("token", Some("x"))])]),
        record(vec![RowOp::Delete {
            table: "public.other".to_owned(),
            key: key("1"),
            guard: Vec::new(),
        }]),
        record(vec![set("1", &[("token", Some("b"))])]),
        record(vec![set("1", &[("n", None)])]),
    ];
    assert_eq!(
        overlay(&records, "1"),
        Ok(assigned(&[("token", Some("b")), ("n", None)]))
    );
    assert_eq!(
        overlay(&records, "2"),
        Ok(assigned(&[("token", Some("x"))]))
    );
    // No pending write of the row: the base image as it is.
    assert_eq!(overlay(&records, "3"), Ok(Assigned::new()));
}

#[test]
fn writes_that_depend_on_or_decide_the_base_image_make_none() {
    let base = record(vec![set("1", &[("token", Some("a"))])]);
    let insert = RowOp::Insert {
        table: T.to_owned(),
        columns: vec!["id".to_owned(), "token".to_owned()],
        values: vec![Val::plain(Some("1")), Val::plain(Some("z"))],
    };
    let delete = RowOp::Delete {
        table: T.to_owned(),
        key: key("1"),
        guard: Vec::new(),
    };
    let mut add = set("1", &[("n", Some("1"))]);
    if let RowOp::Update { set, .. } = &mut add {
        set[0].op = AssignOp::Add;
    }
    let mut guarded = set("1", &[("token", Some("c"))]);
    if let RowOp::Update { guard, .. } = &mut guarded {
        guard.push(Guard {
            column: "n".to_owned(),
            cmp: Cmp::Eq,
            value: Val::plain(Some("3")),
        });
    }
    let mut cast = set("1", &[("n", Some("7"))]);
    if let RowOp::Update { set, .. } = &mut cast {
        set[0].value.cast = Some("int8".to_owned());
    }
    let filtered = set("1", &[("flag", Some("t"))]);
    let unknown = RowOp::Insert {
        table: T.to_owned(),
        columns: vec!["token".to_owned()],
        values: vec![Val::plain(Some("?"))],
    };
    for (op, refusal) in [
        (insert, Refusal::Insert),
        (delete, Refusal::Delete),
        (add, Refusal::Arithmetic),
        (guarded, Refusal::Guarded),
        (cast, Refusal::Cast),
        (filtered, Refusal::Filtered),
        (unknown, Refusal::UnknownKey),
    ] {
        // Before or after the constant update: either way the result depends on it.
        let after = [base.clone(), record(vec![op.clone()])];
        assert_eq!(overlay(&after, "1"), Err(refusal), "{op:?} after");
        let before = [record(vec![op.clone()]), base.clone()];
        assert_eq!(overlay(&before, "1"), Err(refusal), "{op:?} before");
    }
    // A write of another row with a known key does not matter, whatever it is.
    let other = record(vec![RowOp::Delete {
        table: T.to_owned(),
        key: key("2"),
        guard: Vec::new(),
    }]);
    assert_eq!(
        overlay(&[base, other], "1"),
        Ok(assigned(&[("token", Some("a"))]))
    );
}

#[test]
fn a_watch_keeps_later_writes_of_its_row_and_holds_the_first_it_cannot_overlay() {
    let mut watches = Watches::default();
    watches.list.push(watch_of_row_1());
    let update = Arc::new(record(vec![set("1", &[("token", Some("b"))])]));
    let other = Arc::new(record(vec![RowOp::Delete {
        table: T.to_owned(),
        key: key("2"),
        guard: Vec::new(),
    }]));
    let delete = Arc::new(record(vec![RowOp::Delete {
        table: T.to_owned(),
        key: key("1"),
        guard: Vec::new(),
    }]));
    watches.note(5, &update, key_of);
    watches.note(6, &other, key_of);
    assert!(!watches.holds(6), "constant updates and other rows flush");
    watches.note(7, &delete, key_of);
    watches.note(8, &update, key_of);
    assert!(!watches.holds(6));
    assert!(watches.holds(7), "the delete of the watched row waits");
    assert!(watches.holds(8), "and so does everything after it");
    assert_eq!(watches.list[0].records.len(), 3);
    assert_eq!(watches.list[0].blocking, Some(7));
}

/// A watch whose read never ends (a client that stops after its Bind) keeps no
/// records past `HOLD_LIMIT`: the first write of its row after it ends the keeping,
/// and the watch overlays nothing any more (review of ADR 0039: it kept every later
/// write of the row for as long as the session lived).
/// Mutation: `note` pushing records whatever the watch's age.
#[tokio::test(start_paused = true)]
async fn a_watch_past_its_limit_keeps_nothing() {
    let mut watches = Watches::default();
    watches.list.push(watch_of_row_1());
    let update = Arc::new(record(vec![set("1", &[("token", Some("b"))])]));
    watches.note(5, &update, key_of);
    assert_eq!(watches.list[0].records.len(), 1);
    tokio::time::advance(super::HOLD_LIMIT).await;
    for seq in 6..100 {
        watches.note(seq, &update, key_of);
    }
    assert!(watches.list[0].lapsed);
    assert!(
        watches.list[0].records.is_empty(),
        "nothing kept past the limit"
    );
    assert!(!watches.holds(99));
}

#[test]
fn pending_records_are_indexed_by_row_until_applied() {
    let mut watches = Watches::default();
    let one = Arc::new(record(vec![set("1", &[("token", Some("a"))])]));
    let both = Arc::new(record(vec![
        set("1", &[("token", Some("b"))]),
        set("2", &[("token", Some("c"))]),
    ]));
    watches.note(3, &one, key_of);
    watches.note(4, &both, key_of);
    let row = |w: &Watches, k: &str| w.row(T, &[k.to_owned()]);
    assert_eq!(row(&watches, "1"), Some(vec![3, 4]));
    assert_eq!(row(&watches, "2"), Some(vec![4]));
    assert_eq!(row(&watches, "9"), Some(Vec::new()));
    watches.applied(3, &one, key_of);
    assert_eq!(row(&watches, "1"), Some(vec![4]));
    // A pending write of the table whose key is not known: no row can be answered.
    let unknown = Arc::new(record(vec![RowOp::Insert {
        table: T.to_owned(),
        columns: vec!["token".to_owned()],
        values: vec![Val::plain(Some("?"))],
    }]));
    watches.note(5, &unknown, key_of);
    assert_eq!(row(&watches, "9"), None);
    watches.applied(5, &unknown, key_of);
    watches.applied(4, &both, key_of);
    assert_eq!(row(&watches, "1"), Some(Vec::new()));
    assert!(watches.rows.is_empty(), "nothing left behind");
}
