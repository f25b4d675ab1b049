//! Date and time values of deferred writes in a canonical form whose meaning does not
//! depend on the session that applies it: `date` as ISO `YYYY-MM-DD`, `time` as
//! `HH:MM:SS.ffffff`, `timestamp` as `YYYY-MM-DD HH:MM:SS.ffffff`, `timestamptz` as
//! the instant in UTC with an explicit `+00` offset. The flusher's connection reads
//! each back as the same value whatever its TimeZone or DateStyle.
//!
//! Invariants: only input spelled in ISO 8601's unambiguous forms is converted (a
//! four-digit year first, so DateStyle cannot reorder it), every field checked as
//! PostgreSQL checks it (calendar days, leap years, hours 0–24 with 24:00:00 only);
//! a `timestamptz` without an offset is converted only when the session's TimeZone is
//! UTC by name (no time-zone database is consulted, so nothing is guessed); fractions
//! beyond microseconds (which PostgreSQL rounds) are not converted. Anything else is
//! `None`: the statement runs write-through and PostgreSQL converts (or refuses) it.

/// The session settings a conversion reads, and the statement's clock.
#[derive(Debug, Clone, Copy)]
pub struct Settings<'a> {
    /// `TimeZone` as PostgreSQL reported it (ParameterStatus).
    pub time_zone: Option<&'a str>,
    /// `DateStyle` as PostgreSQL reported it: the text form of RETURNING's dates.
    pub date_style: Option<&'a str>,
    /// `now()` of the statement's transaction (ADR 0030): a held transaction's BEGIN,
    /// an autocommit statement's own start, on spillway's clock.
    pub now: SystemTime,
    /// `statement_timestamp()`: when spillway decides the statement.
    pub statement: SystemTime,
}

impl Settings<'_> {
    /// Whether the session's TimeZone is UTC by name (local times are then UTC's).
    pub fn utc(&self) -> bool {
        self.time_zone.is_some_and(is_utc)
    }

    /// Whether dates print as ISO (`YYYY-MM-DD`), as `DateStyle = ISO, …` does.
    pub fn iso_dates(&self) -> bool {
        self.date_style
            .is_some_and(|d| d.trim().to_ascii_uppercase().starts_with("ISO"))
    }
}

/// Why a clock value could not be given its column's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockError {
    /// A local date or time is needed and the session's TimeZone is not UTC (spillway
    /// consults no time-zone database).
    TimeZone,
    /// PostgreSQL has no assignment from the function's type to the column's, or
    /// spillway does not carry it out (text, a precision that rounds …).
    Type,
}

/// The clock reading `t`, a value of type `natural` (timestamptz, timestamp, date,
/// time or timetz), assigned to a column of type `target` (with `typmod`): the
/// canonical text of the target type, as PostgreSQL's assignment would give it in a
/// session whose zone is UTC when `utc`. A timestamptz into a timestamptz column does
/// not depend on the zone.
pub fn from_clock(
    t: SystemTime,
    natural: u32,
    target: u32,
    typmod: i32,
    utc: bool,
) -> Result<String, ClockError> {
    if !matches!(target, TIMESTAMPTZ | TIMESTAMP | DATE | TIME) {
        return Err(ClockError::Type);
    }
    // A precision below microseconds rounds: not carried out here.
    if target != DATE && !matches!(typmod, -1 | 6) {
        return Err(ClockError::Type);
    }
    let assignable = match natural {
        TIMESTAMPTZ | TIMESTAMP => true,
        DATE => matches!(target, TIMESTAMPTZ | TIMESTAMP | DATE),
        TIME | TIMETZ => target == TIME,
        _ => false,
    };
    if !assignable {
        return Err(ClockError::Type);
    }
    if natural == TIMESTAMPTZ && target == TIMESTAMPTZ {
        return utc_text(t).ok_or(ClockError::Type);
    }
    if !utc {
        return Err(ClockError::TimeZone);
    }
    let (date, mut tm) = utc_parts(t).ok_or(ClockError::Type)?;
    if natural == DATE {
        tm = Time {
            h: 0,
            mi: 0,
            s: 0,
            us: 0,
        };
    }
    Ok(match target {
        TIMESTAMPTZ => format!("{} {}+00", date.text(), tm.text()),
        TIMESTAMP => format!("{} {}", date.text(), tm.text()),
        DATE => date.text(),
        _ => tm.text(),
    })
}

/// `t` in UTC as a date and a time of day (microseconds).
fn utc_parts(t: SystemTime) -> Option<(Date, Time)> {
    let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    let secs = i64::try_from(d.as_secs()).ok()?;
    let date = civil_from_days(secs.div_euclid(86_400))?;
    let rem = u32::try_from(secs.rem_euclid(86_400)).ok()?;
    let tm = Time {
        h: rem / 3600,
        mi: rem / 60 % 60,
        s: rem % 60,
        us: d.subsec_micros(),
    };
    Some((date, tm))
}

/// A canonical `date`, `timestamp` or `timestamptz` text (this module's own output)
/// as PostgreSQL's binary value: days since 2000-01-01 for a date, microseconds since
/// 2000-01-01 (UTC for timestamptz) for the others.
pub fn canonical_to_binary(text: &str, type_oid: u32) -> Option<i64> {
    match type_oid {
        DATE => {
            let (d, rest) = date(text)?;
            rest.is_empty().then(|| days_from_civil(d) - PG_EPOCH_DAYS)
        }
        TIMESTAMP | TIMESTAMPTZ => {
            let (d, tm, offset) = timestamp(text)?;
            let want = if type_oid == TIMESTAMPTZ {
                Some(0)
            } else {
                None
            };
            if offset != want {
                return None;
            }
            let secs = (days_from_civil(d) - PG_EPOCH_DAYS) * 86_400
                + i64::from(tm.h * 3600 + tm.mi * 60 + tm.s);
            Some(secs * 1_000_000 + i64::from(tm.us))
        }
        _ => None,
    }
}

/// A canonical `timestamp` or `timestamptz` (UTC) text as PostgreSQL's output gives
/// it with `DateStyle = ISO` (and TimeZone UTC for timestamptz): the fraction without
/// trailing zeros, none when whole.
pub fn iso_output(text: &str, type_oid: u32) -> Option<String> {
    let (d, tm, _) = timestamp(text)?;
    let mut frac = String::new();
    if tm.us != 0 {
        frac = format!(".{:06}", tm.us).trim_end_matches('0').to_owned();
    }
    let zone = if type_oid == TIMESTAMPTZ { "+00" } else { "" };
    Some(format!(
        "{} {:02}:{:02}:{:02}{frac}{zone}",
        d.text(),
        tm.h,
        tm.mi,
        tm.s
    ))
}

use std::time::SystemTime;

/// PostgreSQL's epoch (2000-01-01) in days since 1970-01-01.
const PG_EPOCH_DAYS: i64 = 10_957;

/// A binary date (days since 2000-01-01) as canonical text.
pub fn from_binary_date(days: i32) -> Option<String> {
    match days {
        i32::MAX => Some("infinity".to_owned()),
        i32::MIN => Some("-infinity".to_owned()),
        d => Some(civil_from_days(i64::from(d) + PG_EPOCH_DAYS)?.text()),
    }
}

/// A binary time, timestamp or timestamptz (microseconds; since 2000-01-01 UTC for
/// the last two) as canonical text.
pub fn from_binary(us: i64, type_oid: u32) -> Option<String> {
    if type_oid == TIME {
        let us = u64::try_from(us).ok().filter(|u| *u <= 86_400_000_000)?;
        let secs = u32::try_from(us / 1_000_000).ok()?;
        let tm = Time {
            h: secs / 3600,
            mi: secs / 60 % 60,
            s: secs % 60,
            us: u32::try_from(us % 1_000_000).ok()?,
        };
        return Some(tm.text());
    }
    match us {
        i64::MAX => return Some("infinity".to_owned()),
        i64::MIN => return Some("-infinity".to_owned()),
        _ => {}
    }
    let secs = us.div_euclid(1_000_000);
    let micros = u32::try_from(us.rem_euclid(1_000_000)).ok()?;
    let date = civil_from_days(secs.div_euclid(86_400) + PG_EPOCH_DAYS)?;
    let rem = u32::try_from(secs.rem_euclid(86_400)).ok()?;
    let tm = Time {
        h: rem / 3600,
        mi: rem / 60 % 60,
        s: rem % 60,
        us: micros,
    };
    let zone = if type_oid == TIMESTAMPTZ { "+00" } else { "" };
    Some(format!("{} {}{zone}", date.text(), tm.text()))
}

/// `t` as canonical timestamptz text (UTC, microseconds, `+00`).
pub fn utc_text(t: SystemTime) -> Option<String> {
    let (date, tm) = utc_parts(t)?;
    Some(format!("{} {}+00", date.text(), tm.text()))
}

pub const DATE: u32 = 1082;
pub const TIME: u32 = 1083;
pub const TIMESTAMP: u32 = 1114;
pub const TIMESTAMPTZ: u32 = 1184;
pub const TIMETZ: u32 = 1266;
pub const INTERVAL: u32 = 1186;

/// `text` of type `from` (the parameter's or literal's type: one of the four above,
/// or the column's) as the canonical text of column type `to`, or `None`.
pub fn canonical(text: &str, from: u32, to: u32, settings: Settings<'_>) -> Option<String> {
    let t = text.trim();
    match to {
        DATE if from == DATE => {
            let (d, rest) = date(t)?;
            rest.is_empty().then(|| d.text())
        }
        TIME if from == TIME => {
            let (tm, rest) = time(t)?;
            rest.is_empty().then(|| tm.text())
        }
        TIMESTAMP if from == TIMESTAMP => {
            // timestamp input ignores an offset.
            let (d, tm, _) = timestamp(t)?;
            Some(format!("{} {}", d.text(), tm.text()))
        }
        TIMESTAMPTZ if matches!(from, TIMESTAMP | TIMESTAMPTZ) => {
            let (d, tm, offset) = timestamp(t)?;
            // A timestamp (no zone) is read in the session's TimeZone; so is a
            // timestamptz written without an offset.
            let offset = match (from, offset) {
                (TIMESTAMPTZ, Some(secs)) => secs,
                _ if is_utc(settings.time_zone?) => 0,
                _ => return None,
            };
            let (d, tm) = shift(d, tm, offset)?;
            Some(format!("{} {}+00", d.text(), tm.text()))
        }
        INTERVAL if from == INTERVAL => interval::canonical(t),
        _ => None,
    }
}

/// TimeZone names that are UTC with no rules (PostgreSQL's own spellings).
fn is_utc(zone: &str) -> bool {
    matches!(
        zone.to_ascii_lowercase().as_str(),
        "utc" | "etc/utc" | "gmt" | "etc/gmt" | "zulu" | "etc/zulu" | "uct" | "etc/uct"
    )
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Date {
    y: i32,
    m: u32,
    d: u32,
}

impl Date {
    fn text(self) -> String {
        format!("{:04}-{:02}-{:02}", self.y, self.m, self.d)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Time {
    h: u32,
    mi: u32,
    s: u32,
    us: u32,
}

impl Time {
    fn text(self) -> String {
        format!("{:02}:{:02}:{:02}.{:06}", self.h, self.mi, self.s, self.us)
    }
}

fn digits(s: &str, n: usize) -> Option<(u32, &str)> {
    let head = s.get(..n)?;
    if !head.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((head.parse().ok()?, &s[n..]))
}

fn leap(y: i32) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in(y: i32, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if leap(y) => 29,
        _ => 28,
    }
}

/// `YYYY-MM-DD` (year 1–9999) and what follows.
fn date(s: &str) -> Option<(Date, &str)> {
    let (y, s) = digits(s, 4)?;
    let s = s.strip_prefix('-')?;
    let (m, s) = digits(s, 2)?;
    let s = s.strip_prefix('-')?;
    let (d, s) = digits(s, 2)?;
    // A fifth year digit would make it another date.
    if s.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let y = i32::try_from(y).ok()?;
    if y == 0 || !(1..=12).contains(&m) || d == 0 || d > days_in(y, m) {
        return None;
    }
    Some((Date { y, m, d }, s))
}

/// `HH:MM[:SS[.f{1,6}]]` and what follows; 24:00:00 is allowed, as PostgreSQL does.
fn time(s: &str) -> Option<(Time, &str)> {
    // The hour in one digit or two (`9:30`, as knex passes a JavaScript string on),
    // which PostgreSQL reads as the same hour.
    let hour_digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if !matches!(hour_digits, 1 | 2) {
        return None;
    }
    let (h, s) = digits(s, hour_digits)?;
    let s = s.strip_prefix(':')?;
    let (mi, mut s) = digits(s, 2)?;
    let (mut sec, mut us) = (0, 0);
    if let Some(rest) = s.strip_prefix(':') {
        let (v, rest) = digits(rest, 2)?;
        sec = v;
        s = rest;
        if let Some(rest) = s.strip_prefix('.') {
            let n = rest.bytes().take_while(u8::is_ascii_digit).count();
            if n == 0 || n > 6 {
                return None;
            }
            let (v, rest) = digits(rest, n)?;
            us = v * 10u32.pow(u32::try_from(6 - n).ok()?);
            s = rest;
        }
    }
    if s.starts_with(|c: char| c.is_ascii_digit()) || mi > 59 || sec > 59 {
        return None;
    }
    if h > 24 || (h == 24 && (mi, sec, us) != (0, 0, 0)) {
        return None;
    }
    Some((Time { h, mi, s: sec, us }, s))
}

/// `date[ T]time[offset]`: the offset in seconds east of UTC (`Z`, `±HH`, `±HH:MM`,
/// `±HHMM`).
fn timestamp(s: &str) -> Option<(Date, Time, Option<i64>)> {
    let (d, rest) = date(s)?;
    let rest = rest.strip_prefix([' ', 'T'])?;
    let (tm, rest) = time(rest)?;
    let rest = rest.trim_start();
    let offset = match rest {
        "" => None,
        "Z" | "z" => Some(0),
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let body = &rest[1..];
            let (h, body) = digits(body, 2)?;
            let body = body.strip_prefix(':').unwrap_or(body);
            let (m, body) = if body.is_empty() {
                (0, body)
            } else {
                digits(body, 2)?
            };
            if !body.is_empty() || h > 15 || m > 59 {
                return None;
            }
            Some(sign * i64::from(h * 3600 + m * 60))
        }
    };
    // 24:00:00 rolls into the next day; not converted here.
    if tm.h == 24 {
        return None;
    }
    Some((d, tm, offset))
}

/// Days since 1970-01-01 (proleptic Gregorian).
fn days_from_civil(d: Date) -> i64 {
    let y = i64::from(d.y) - i64::from(d.m <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(d.m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d.d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> Option<Date> {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let date = Date {
        y: i32::try_from(y).ok()?,
        m: u32::try_from(m).ok()?,
        d: u32::try_from(d).ok()?,
    };
    (1..=9999).contains(&date.y).then_some(date)
}

/// The local date and time `d tm` at `offset` seconds east of UTC, in UTC.
fn shift(d: Date, tm: Time, offset: i64) -> Option<(Date, Time)> {
    let secs = days_from_civil(d) * 86_400 + i64::from(tm.h * 3600 + tm.mi * 60 + tm.s) - offset;
    let day = secs.div_euclid(86_400);
    let rem = u32::try_from(secs.rem_euclid(86_400)).ok()?;
    Some((
        civil_from_days(day)?,
        Time {
            h: rem / 3600,
            mi: rem / 60 % 60,
            s: rem % 60,
            us: tm.us,
        },
    ))
}

mod interval;

#[cfg(test)]
mod tests;
