//! Canonical date and time texts: clock values, ISO input, and PostgreSQL's output.

use super::*;

const UTC: Settings<'static> = Settings {
    time_zone: Some("Etc/UTC"),
    date_style: Some("ISO, MDY"),
    now: std::time::UNIX_EPOCH,
    statement: std::time::UNIX_EPOCH,
};
const BERLIN: Settings<'static> = Settings {
    time_zone: Some("Europe/Berlin"),
    date_style: Some("ISO, DMY"),
    now: std::time::UNIX_EPOCH,
    statement: std::time::UNIX_EPOCH,
};

#[test]
fn clock_values_take_the_columns_type() {
    // 2024-03-30 23:15:00.250001 UTC.
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_711_840_500_250_001);
    let c = |natural, target, typmod, utc| from_clock(t, natural, target, typmod, utc);
    // An instant into timestamptz: the same whatever the session's zone.
    assert_eq!(
        c(TIMESTAMPTZ, TIMESTAMPTZ, -1, false).as_deref(),
        Ok("2024-03-30 23:15:00.250001+00")
    );
    assert_eq!(
        c(TIMESTAMPTZ, TIMESTAMP, -1, true).as_deref(),
        Ok("2024-03-30 23:15:00.250001")
    );
    assert_eq!(c(TIMESTAMPTZ, DATE, -1, true).as_deref(), Ok("2024-03-30"));
    assert_eq!(c(DATE, DATE, -1, true).as_deref(), Ok("2024-03-30"));
    assert_eq!(
        c(DATE, TIMESTAMPTZ, -1, true).as_deref(),
        Ok("2024-03-30 00:00:00.000000+00")
    );
    assert_eq!(c(TIMETZ, TIME, -1, true).as_deref(), Ok("23:15:00.250001"));
    // Local values need the zone's rules: only UTC is known.
    assert_eq!(
        c(TIMESTAMPTZ, TIMESTAMP, -1, false),
        Err(ClockError::TimeZone)
    );
    assert_eq!(c(DATE, DATE, -1, false), Err(ClockError::TimeZone));
    assert_eq!(
        c(TIMESTAMP, TIMESTAMPTZ, -1, false),
        Err(ClockError::TimeZone)
    );
    // No assignment, or one that rounds or formats.
    assert_eq!(c(DATE, TIME, -1, true), Err(ClockError::Type));
    assert_eq!(c(TIME, DATE, -1, true), Err(ClockError::Type));
    assert_eq!(c(TIMESTAMPTZ, TIMESTAMPTZ, 3, true), Err(ClockError::Type));
    assert_eq!(c(TIMESTAMPTZ, 25, -1, true), Err(ClockError::Type));
}

#[test]
fn canonical_text_as_binary_and_iso_output() {
    assert_eq!(canonical_to_binary("2000-01-02", DATE), Some(1));
    assert_eq!(canonical_to_binary("1999-12-31", DATE), Some(-1));
    assert_eq!(
        canonical_to_binary("2000-01-01 00:00:01.000002+00", TIMESTAMPTZ),
        Some(1_000_002)
    );
    assert_eq!(
        canonical_to_binary("2000-01-01 00:00:01.000002", TIMESTAMP),
        Some(1_000_002)
    );
    assert_eq!(
        canonical_to_binary("2000-01-01 00:00:01+02", TIMESTAMPTZ),
        None
    );
    assert_eq!(
        iso_output("2024-03-30 23:15:00.250000+00", TIMESTAMPTZ).as_deref(),
        Some("2024-03-30 23:15:00.25+00")
    );
    assert_eq!(
        iso_output("2024-03-30 23:15:00.000000", TIMESTAMP).as_deref(),
        Some("2024-03-30 23:15:00")
    );
}

#[test]
fn now_as_utc_text() {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_711_840_500_250_001);
    assert_eq!(
        utc_text(t).as_deref(),
        Some("2024-03-30 23:15:00.250001+00")
    );
}

#[test]
fn iso_values_get_one_spelling() {
    let c = |t, from, to, s| canonical(t, from, to, s);
    assert_eq!(
        c("2024-02-29", DATE, DATE, UTC).as_deref(),
        Some("2024-02-29")
    );
    assert_eq!(c("2023-02-29", DATE, DATE, UTC), None);
    assert_eq!(c("24-02-01", DATE, DATE, UTC), None);
    assert_eq!(
        c("09:30", TIME, TIME, UTC).as_deref(),
        Some("09:30:00.000000")
    );
    assert_eq!(c("23:59:60", TIME, TIME, UTC), None);
    // One hour digit, as PostgreSQL reads it (knex passes `9:30` on as written).
    assert_eq!(
        c("9:30", TIME, TIME, UTC).as_deref(),
        Some("09:30:00.000000")
    );
    assert_eq!(
        c("2024-03-31 9:05:01", TIMESTAMP, TIMESTAMP, UTC).as_deref(),
        Some("2024-03-31 09:05:01.000000")
    );
    assert_eq!(c("930", TIME, TIME, UTC), None);
    assert_eq!(c("123:30", TIME, TIME, UTC), None);
    assert_eq!(c(":30", TIME, TIME, UTC), None);
    assert_eq!(
        c(
            "2024-03-30 23:15:00.25+00:00",
            TIMESTAMPTZ,
            TIMESTAMPTZ,
            BERLIN
        )
        .as_deref(),
        Some("2024-03-30 23:15:00.250000+00")
    );
    assert_eq!(
        c("2024-03-31T04:15:00-05", TIMESTAMPTZ, TIMESTAMPTZ, BERLIN).as_deref(),
        Some("2024-03-31 09:15:00.000000+00")
    );
    assert_eq!(
        c(
            "2024-12-31 23:30:00-01:30",
            TIMESTAMPTZ,
            TIMESTAMPTZ,
            BERLIN
        )
        .as_deref(),
        Some("2025-01-01 01:00:00.000000+00")
    );
    // Without an offset the session's zone decides: only UTC is known here.
    assert_eq!(
        c("2024-03-31 01:00:00", TIMESTAMPTZ, TIMESTAMPTZ, BERLIN),
        None
    );
    assert_eq!(
        c("2024-03-31 01:00:00", TIMESTAMP, TIMESTAMPTZ, UTC).as_deref(),
        Some("2024-03-31 01:00:00.000000+00")
    );
    assert_eq!(
        c("2024-03-31 01:00:00+05", TIMESTAMP, TIMESTAMP, BERLIN).as_deref(),
        Some("2024-03-31 01:00:00.000000")
    );
    assert_eq!(
        c("2024-03-31 01:00:00.1234567", TIMESTAMP, TIMESTAMP, UTC),
        None
    );
    assert_eq!(c("now", TIMESTAMPTZ, TIMESTAMPTZ, UTC), None);
    assert_eq!(c("2024-03-31 25:00", TIMESTAMP, TIMESTAMP, UTC), None);
    assert_eq!(c("2024-03-31", DATE, TIMESTAMP, UTC), None);
}
