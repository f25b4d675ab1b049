//! `interval` values of deferred writes (ADR 0038): the forms ORMs send — psycopg's
//! `1 day 0:01:01` (Python's `timedelta` as text), its `+1 day +61 second +0
//! microsecond` under `IntervalStyle = sql_standard`, knex's `1 day 61 seconds` —
//! read as PostgreSQL reads them, into a canonical text without signs, `D days
//! HH:MM:SS.ffffff`, which PostgreSQL reads back as the same interval under every
//! IntervalStyle and DateStyle.
//!
//! Invariants: only what is certainly PostgreSQL's reading is converted: no sign but
//! `+` (a leading `-` applies to every field under `sql_standard` and to one under the
//! other styles), no months or years (their length is not fixed), each field at most
//! once (PostgreSQL refuses a repeated field), a clock field `H:MM[:SS[.f]]` only
//! without hour, minute or second units, minutes and seconds of a clock field below
//! 60, at most six fractional digits and only on seconds; sizes bounded well inside
//! PostgreSQL's. Anything else is `None`: the statement runs write-through and
//! PostgreSQL converts (or refuses) it.

const US_PER_SEC: i64 = 1_000_000;
/// Bounds well inside PostgreSQL's (its days are int32, its time int64 µs).
const MAX_DAYS: i64 = 1_000_000;
const MAX_US: i64 = 1_000_000_000 * US_PER_SEC;

/// The fields an interval input sets, as PostgreSQL refuses to see one twice.
#[derive(Default)]
struct Seen {
    day: bool,
    hour: bool,
    minute: bool,
    second: bool,
    micro: bool,
    milli: bool,
}

/// `text` as the canonical interval text, or `None`.
pub fn canonical(text: &str) -> Option<String> {
    let (days, us) = parse(text)?;
    Some(format!(
        "{days} days {:02}:{:02}:{:02}.{:06}",
        us / (3600 * US_PER_SEC),
        us / (60 * US_PER_SEC) % 60,
        us / US_PER_SEC % 60,
        us % US_PER_SEC
    ))
}

/// Days and microseconds, both non-negative.
fn parse(text: &str) -> Option<(i64, i64)> {
    let lower = text.trim().to_ascii_lowercase();
    let mut tokens = lower.split_ascii_whitespace().peekable();
    let mut seen = Seen::default();
    let (mut days, mut us) = (0i64, 0i64);
    let mut any = false;
    while let Some(token) = tokens.next() {
        any = true;
        let token = token.strip_prefix('+').unwrap_or(token);
        if token.contains(':') {
            if seen.hour || seen.minute || seen.second {
                return None;
            }
            // A clock field counts as hours, minutes and every part of a second.
            if seen.milli || seen.micro {
                return None;
            }
            (seen.hour, seen.minute, seen.second) = (true, true, true);
            (seen.milli, seen.micro) = (true, true);
            us = us.checked_add(clock(token)?)?;
            continue;
        }
        let (whole, frac) = number(token)?;
        let unit = tokens.next()?;
        let field = match unit {
            "day" | "days" => &mut seen.day,
            "hour" | "hours" => &mut seen.hour,
            "minute" | "minutes" | "min" | "mins" => &mut seen.minute,
            "second" | "seconds" | "sec" | "secs" => &mut seen.second,
            "millisecond" | "milliseconds" => &mut seen.milli,
            "microsecond" | "microseconds" => &mut seen.micro,
            _ => return None,
        };
        if *field {
            return None;
        }
        *field = true;
        let is_seconds = matches!(unit, "second" | "seconds" | "sec" | "secs");
        if frac.is_some() && !is_seconds {
            return None;
        }
        // Seconds with a fraction count as milliseconds and microseconds too.
        if frac.is_some() {
            if seen.milli || seen.micro {
                return None;
            }
            (seen.milli, seen.micro) = (true, true);
        }
        match unit {
            "day" | "days" => days = whole,
            "hour" | "hours" => us = us.checked_add(whole.checked_mul(3600 * US_PER_SEC)?)?,
            "millisecond" | "milliseconds" => us = us.checked_add(whole.checked_mul(1000)?)?,
            "microsecond" | "microseconds" => us = us.checked_add(whole)?,
            _ if is_seconds => {
                us = us.checked_add(whole.checked_mul(US_PER_SEC)?)?;
                us = us.checked_add(frac.unwrap_or(0))?;
            }
            _ => us = us.checked_add(whole.checked_mul(60 * US_PER_SEC)?)?,
        }
        if days > MAX_DAYS || us > MAX_US {
            return None;
        }
    }
    (any && days <= MAX_DAYS && us <= MAX_US).then_some((days, us))
}

/// Digits, with up to six fractional digits: the whole part and the fraction in
/// microseconds.
fn number(s: &str) -> Option<(i64, Option<i64>)> {
    let (whole, frac) = match s.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (s, None),
    };
    if whole.is_empty() || whole.len() > 12 || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let frac = match frac {
        None => None,
        Some(f) => Some(micros(f)?),
    };
    Some((whole.parse().ok()?, frac))
}

/// A fraction's digits (one to six) as microseconds.
fn micros(f: &str) -> Option<i64> {
    if f.is_empty() || f.len() > 6 || !f.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let v: i64 = f.parse().ok()?;
    Some(v * 10i64.pow(u32::try_from(6 - f.len()).ok()?))
}

/// `H:MM`, `H:MM:SS` or `H:MM:SS.f` (any number of hour digits, minutes and seconds
/// in two digits and below 60) in microseconds.
fn clock(s: &str) -> Option<i64> {
    let mut parts = s.split(':');
    let h = parts.next()?;
    let m = parts.next()?;
    let sec = parts.next();
    if parts.next().is_some() {
        return None;
    }
    let digits = |p: &str, max_len: usize| {
        (!p.is_empty() && p.len() <= max_len && p.bytes().all(|b| b.is_ascii_digit()))
            .then(|| p.parse::<i64>().ok())
            .flatten()
    };
    let h = digits(h, 9)?;
    if m.len() != 2 {
        return None;
    }
    let m = digits(m, 2).filter(|m| *m < 60)?;
    let (s_whole, s_frac) = match sec {
        None => (0, 0),
        Some(sec) => {
            let (w, f) = match sec.split_once('.') {
                Some((w, f)) => (w, micros(f)?),
                None => (sec, 0),
            };
            if w.len() != 2 {
                return None;
            }
            (digits(w, 2).filter(|s| *s < 60)?, f)
        }
    };
    let total = h
        .checked_mul(3600)?
        .checked_add(m * 60)?
        .checked_add(s_whole)?
        .checked_mul(US_PER_SEC)?;
    total.checked_add(s_frac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orm_spellings_read_as_postgres_reads_them() {
        let c = |t: &str| canonical(t);
        let is = |s: &str| Some(s.to_owned());
        // psycopg (str(timedelta) without its comma), its sql_standard form, knex.
        assert_eq!(c("1 day 0:01:01"), is("1 days 00:01:01.000000"));
        assert_eq!(c("2 days 3:04:05.000123"), is("2 days 03:04:05.000123"));
        assert_eq!(c("0:00:00"), is("0 days 00:00:00.000000"));
        assert_eq!(
            c("+1 day +61 second +250 microsecond"),
            is("1 days 00:01:01.000250")
        );
        assert_eq!(c("1 day 61 seconds"), is("1 days 00:01:01.000000"));
        assert_eq!(c(" 1 DAY 1:02 "), is("1 days 01:02:00.000000"));
        assert_eq!(c("100:00:00"), is("0 days 100:00:00.000000"));
        assert_eq!(
            c("3 hours 4 mins 1 secs 7 milliseconds"),
            is("0 days 03:04:01.007000")
        );
        assert_eq!(c("1.5 secs 2 days"), is("2 days 00:00:01.500000"));
    }

    #[test]
    fn anything_else_is_left_to_postgres() {
        for t in [
            "",
            "-1 day 23:59:59",
            "1 day -0:01:01",
            "1 day, 0:01:01",
            "1 mon",
            "1 year 2 days",
            "1 week",
            "@ 1 day",
            "1 day ago",
            "P1DT1S",
            "5",
            "1day",
            "1 day 2 days",
            "1:00:00 1 hour",
            "1 hour 0:01:00",
            "1.5 days",
            "1.5 hours",
            "1 second 1.0000001",
            // PostgreSQL refuses these: a fraction of a second, or a clock field,
            // counts as milliseconds and microseconds.
            "1.5 secs 7 milliseconds",
            "7 milliseconds 1.5 secs",
            "0:01:01 250 microseconds",
            "250 microseconds 0:01:01",
            "0:60:00",
            "0:00:60",
            "0:1:00",
            "0:01:1",
            "0:01:01.1234567",
            "1:2:3:4",
            "2000000 days",
            "1 fortnight",
            "infinity",
            "now",
        ] {
            assert_eq!(canonical(t), None, "{t}");
        }
    }
}
