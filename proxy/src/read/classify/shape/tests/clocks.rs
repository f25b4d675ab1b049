//! Clock and random functions as values of a write shape (ADR 0030), and the forms
//! of them that are still refused.

use super::*;

#[test]
fn clock_functions_are_values() {
    let clock = |c| Value {
        operand: Operand::Clock(c),
        cast: None,
    };
    let cases = [
        ("now()", Clock::TransactionStart),
        ("pg_catalog.now()", Clock::TransactionStart),
        ("CURRENT_TIMESTAMP", Clock::TransactionStart),
        ("transaction_timestamp()", Clock::TransactionStart),
        ("statement_timestamp()", Clock::StatementStart),
        ("clock_timestamp()", Clock::Now),
        ("LOCALTIMESTAMP", Clock::LocalTimestamp),
        ("CURRENT_DATE", Clock::CurrentDate),
        ("CURRENT_TIME", Clock::CurrentTime),
        ("LOCALTIME", Clock::LocalTime),
        ("gen_random_uuid()", Clock::RandomUuid),
    ];
    for (call, c) in cases {
        let sql = format!("INSERT INTO t (id, at) VALUES (1, {call})");
        assert_eq!(
            shape(&sql),
            Ok(ins("t", &["id", "at"], vec![vec![lit("1"), clock(c)]])),
            "{sql}"
        );
    }
    assert_eq!(
        shape("UPDATE t SET at = now()::timestamptz WHERE id = 1"),
        Ok(upd(
            "t",
            vec![(
                "at",
                Assign::Set(cast(clock(Clock::TransactionStart), "timestamptz"))
            )],
            vec![("id", lit("1"))]
        ))
    );
}
