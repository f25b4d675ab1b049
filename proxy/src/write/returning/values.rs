//! The values spillway knows exactly as PostgreSQL outputs them, for RETURNING of a
//! deferred write (`super`): [`Known`] (a value of one column type as PostgreSQL
//! stores it) read from its input text, and encoded as PostgreSQL's output (text) or
//! send (binary) function gives it.
//!
//! Invariants:
//! - [`Known::of`] answers only for the types whose output spillway reproduces
//!   (int2/int4/int8, bool, uuid, text, varchar; date and timestamps in their
//!   canonical text; plain decimal numerics) and `None` for anything else, so the
//!   caller falls back rather than guess.
//! - Text that reads as a non-integer number is not known for text/varchar (PostgreSQL
//!   prints a number constant canonically), nor `1`/`0` for bool (an integer constant
//!   PostgreSQL refuses).
//! - A varchar(n) value is known only within n characters; a numeric only when it
//!   needs no rounding for its column's scale and precision.

use crate::write::datetime::{self, DATE, Settings, TIMESTAMP, TIMESTAMPTZ};
use crate::write::params::{BOOL, INT2, INT4, INT8, NUMERIC, TEXT, UUID, VARCHAR, canonical_key};

/// A value spillway knows exactly, as PostgreSQL stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Known {
    Int(i64),
    Bool(bool),
    Uuid([u8; 16]),
    Text(String),
    /// A date (days since 2000-01-01) or a timestamp (microseconds since then), with
    /// its text output when the session's DateStyle (and, for timestamptz, TimeZone)
    /// make it one spillway reproduces (ISO, UTC).
    Datetime {
        binary: i64,
        text: Option<String>,
    },
    /// A numeric's text output (its binary form is not produced here).
    Numeric(String),
}

impl Known {
    /// The value of input `text` for a column of `type_oid`, when spillway knows the
    /// type's output exactly; `None` otherwise. Date and time values are
    /// `datetime`'s canonical text (what `convert` journals).
    pub(super) fn of(
        text: &str,
        type_oid: u32,
        typmod: i32,
        settings: Settings<'_>,
    ) -> Option<Known> {
        let t = text.trim();
        match type_oid {
            NUMERIC => numeric_output(t, typmod).map(Known::Numeric),
            DATE => Some(Known::Datetime {
                binary: datetime::canonical_to_binary(t, DATE)?,
                text: settings.iso_dates().then(|| t.to_owned()),
            }),
            // A precision below microseconds rounds on the way in.
            TIMESTAMP | TIMESTAMPTZ if matches!(typmod, -1 | 6) => {
                let readable = settings.iso_dates() && (type_oid == TIMESTAMP || settings.utc());
                Some(Known::Datetime {
                    binary: datetime::canonical_to_binary(t, type_oid)?,
                    text: if readable {
                        Some(datetime::iso_output(t, type_oid)?)
                    } else {
                        None
                    },
                })
            }
            INT2 => t.parse::<i16>().ok().map(|v| Known::Int(v.into())),
            INT4 => t.parse::<i32>().ok().map(|v| Known::Int(v.into())),
            INT8 => t.parse::<i64>().ok().map(Known::Int),
            BOOL => match t.to_ascii_lowercase().as_str() {
                "t" | "true" | "y" | "yes" | "on" => Some(Known::Bool(true)),
                "f" | "false" | "n" | "no" | "off" => Some(Known::Bool(false)),
                _ => None,
            },
            UUID => {
                let canon = canonical_key(t, UUID).ok()?;
                let hex: Vec<u8> = canon.bytes().filter(|b| *b != b'-').collect();
                let mut out = [0u8; 16];
                for (i, byte) in out.iter_mut().enumerate() {
                    let pair = std::str::from_utf8(hex.get(i * 2..i * 2 + 2)?).ok()?;
                    *byte = u8::from_str_radix(pair, 16).ok()?;
                }
                Some(Known::Uuid(out))
            }
            _ if matches!(type_oid, TEXT | VARCHAR) && is_fractional_number(text) => None,
            TEXT => Some(Known::Text(text.to_owned())),
            // varchar(n) refuses longer values, except that it silently cuts trailing
            // spaces beyond n: only values within n are known.
            VARCHAR => {
                let fits = typmod <= 4
                    || usize::try_from(typmod - 4).is_ok_and(|max| text.chars().count() <= max);
                fits.then(|| Known::Text(text.to_owned()))
            }
            _ => None,
        }
    }

    /// The value as PostgreSQL's output (text) or send (binary) function gives it;
    /// `None` when its text is not known.
    pub(super) fn encode(&self, type_oid: u32, binary: bool) -> Option<Vec<u8>> {
        Some(match (self, binary) {
            (Known::Datetime { binary, .. }, true) if type_oid == DATE => {
                i32::try_from(*binary).ok()?.to_be_bytes().to_vec()
            }
            (Known::Datetime { binary, .. }, true) => binary.to_be_bytes().to_vec(),
            (Known::Datetime { text, .. }, false) => text.clone()?.into_bytes(),
            (Known::Numeric(_), true) => return None,
            (Known::Numeric(t), false) => t.clone().into_bytes(),
            (Known::Int(v), false) => v.to_string().into_bytes(),
            (Known::Int(v), true) => match type_oid {
                INT2 => i16::try_from(*v).unwrap_or_default().to_be_bytes().to_vec(),
                INT4 => i32::try_from(*v).unwrap_or_default().to_be_bytes().to_vec(),
                _ => v.to_be_bytes().to_vec(),
            },
            (Known::Bool(b), false) => if *b { "t" } else { "f" }.as_bytes().to_vec(),
            (Known::Bool(b), true) => vec![u8::from(*b)],
            (Known::Uuid(u), false) => uuid_text(u).into_bytes(),
            (Known::Uuid(u), true) => u.to_vec(),
            (Known::Text(s), _) => s.as_bytes().to_vec(),
        })
    }
}

/// A numeric's text output for input `t` in a column with `typmod`: for plain decimal
/// input (`-12`, `3.5`, `.5`, `+0.10`) only, with the column's scale (padded; a value
/// that needs rounding or has too many digits is not known) or, without a typmod,
/// the scale written; leading zeros dropped, `-0` as `0` (with its scale).
fn numeric_output(t: &str, typmod: i32) -> Option<String> {
    let (negative, body) = match t.as_bytes().first()? {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || !digits(frac) || (int.is_empty() && frac.is_empty()) {
        return None;
    }
    let mut frac = frac.to_owned();
    if typmod >= 4 {
        let m = typmod - 4;
        let (precision, scale) = (
            usize::try_from(m >> 16).ok()?,
            usize::try_from(m & 0xffff).ok()?,
        );
        // Digits beyond the scale would round: only zeros may go.
        if frac.len() > scale {
            if !frac[scale..].bytes().all(|b| b == b'0') {
                return None;
            }
            frac.truncate(scale);
        }
        while frac.len() < scale {
            frac.push('0');
        }
        let int_digits = int.trim_start_matches('0').len();
        if int_digits > precision.saturating_sub(scale) {
            return None;
        }
    }
    let int = match int.trim_start_matches('0') {
        "" => "0",
        i => i,
    };
    let zero = int == "0" && frac.bytes().all(|b| b == b'0');
    let sign = if negative && !zero { "-" } else { "" };
    Some(if frac.is_empty() {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    })
}

/// `[+-]digits.digits[e[+-]digits]`, `.5`, `5.`, `1e3`: what a numeric constant
/// other than an integer looks like (PostgreSQL would print it canonically).
fn is_fractional_number(text: &str) -> bool {
    let t = text.strip_prefix(['+', '-']).unwrap_or(text);
    let (mantissa, exp) = match t.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e)),
        None => (t, None),
    };
    let (int, frac) = match mantissa.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (mantissa, None),
    };
    let digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    let mantissa_ok = digits(int)
        && frac.is_none_or(digits)
        && !(int.is_empty() && frac.unwrap_or("").is_empty());
    let exp_ok = exp.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    mantissa_ok && exp_ok && (frac.is_some() || exp.is_some())
}

fn uuid_text(u: &[u8; 16]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(36);
    for (i, byte) in u.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        let _ = write!(s, "{byte:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: Settings<'static> = Settings {
        time_zone: Some("UTC"),
        date_style: Some("ISO, MDY"),
        now: std::time::UNIX_EPOCH,
        statement: std::time::UNIX_EPOCH,
    };

    #[test]
    fn numerics_are_known_in_text_with_the_columns_scale() {
        let n = |t: &str, typmod: i32| numeric_output(t, typmod);
        // numeric(12,2): typmod (12 << 16) + 2 + 4.
        let m = (12 << 16) + 2 + 4;
        assert_eq!(n("0", m).as_deref(), Some("0.00"));
        assert_eq!(n("-12.5", m).as_deref(), Some("-12.50"));
        assert_eq!(n("007.100", m).as_deref(), Some("7.10"));
        assert_eq!(n("-0", m).as_deref(), Some("0.00"));
        assert_eq!(n(".5", m).as_deref(), Some("0.50"));
        assert_eq!(n("1.005", m), None, "rounds");
        assert_eq!(n("12345678901", m), None, "too many digits");
        assert_eq!(n("1234567890", m).as_deref(), Some("1234567890.00"));
        assert_eq!(n("1.50", -1).as_deref(), Some("1.50"));
        assert_eq!(n("-0.0", -1).as_deref(), Some("0.0"));
        assert_eq!(n("1e3", -1), None);
        assert_eq!(n("NaN", -1), None);
        assert_eq!(n("", -1), None);
        assert_eq!(n("-", -1), None);
        // Text only: the binary form is not produced.
        assert_eq!(Known::Numeric("1".into()).encode(NUMERIC, true), None);
    }

    #[test]
    fn dates_and_timestamps_are_known_in_iso_and_binary() {
        let text = |v: &str, oid, s| {
            Known::of(v, oid, -1, s)
                .and_then(|k| k.encode(oid, false))
                .map(|b| String::from_utf8(b).expect("utf-8"))
        };
        let berlin = Settings {
            time_zone: Some("Europe/Berlin"),
            ..SETTINGS
        };
        let german = Settings {
            date_style: Some("German, DMY"),
            ..SETTINGS
        };
        let tz = "2024-03-30 23:15:00.250000+00";
        assert_eq!(
            text(tz, TIMESTAMPTZ, SETTINGS).as_deref(),
            Some("2024-03-30 23:15:00.25+00")
        );
        // The text needs the zone's offset; the binary value does not.
        assert_eq!(text(tz, TIMESTAMPTZ, berlin), None);
        let bin = Known::of(tz, TIMESTAMPTZ, -1, berlin).and_then(|k| k.encode(TIMESTAMPTZ, true));
        assert_eq!(bin, Some(765_155_700_250_000_i64.to_be_bytes().to_vec()));
        assert_eq!(
            text("2024-03-30 23:15:00.000000", TIMESTAMP, berlin).as_deref(),
            Some("2024-03-30 23:15:00")
        );
        assert_eq!(text("2024-03-30", DATE, german), None);
        assert_eq!(
            text("2024-03-30", DATE, berlin).as_deref(),
            Some("2024-03-30")
        );
        assert_eq!(Known::of(tz, TIMESTAMPTZ, 3, SETTINGS), None);
    }

    fn text(v: &str, oid: u32, typmod: i32) -> Option<String> {
        Known::of(v, oid, typmod, SETTINGS)
            .and_then(|k| k.encode(oid, false))
            .map(|b| String::from_utf8(b).expect("utf-8"))
    }

    #[test]
    fn values_are_answered_as_postgres_outputs_them() {
        assert_eq!(text(" +007 ", INT4, -1).as_deref(), Some("7"));
        assert_eq!(text("-0", INT8, -1).as_deref(), Some("0"));
        assert_eq!(text("32768", INT2, -1), None);
        assert_eq!(text("1_000", INT4, -1), None);
        assert_eq!(text("1.0", INT4, -1), None);
        assert_eq!(text(" Yes", BOOL, -1).as_deref(), Some("t"));
        assert_eq!(text("OFF", BOOL, -1).as_deref(), Some("f"));
        assert_eq!(text("n", BOOL, -1).as_deref(), Some("f"));
        // `1`/`0` may be integer constants, which PostgreSQL refuses for bool.
        assert_eq!(text("1", BOOL, -1), None);
        assert_eq!(text("0", BOOL, -1), None);
        assert_eq!(text("tru", BOOL, -1), None);
        assert_eq!(
            text("{A0EEBC99-9C0B4EF8-BB6D-6BB9BD380A11}", UUID, -1).as_deref(),
            Some("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        );
        assert_eq!(text("not-a-uuid", UUID, -1), None);
        // Text is kept byte for byte, spaces included.
        assert_eq!(text(" a b ", TEXT, -1).as_deref(), Some(" a b "));
        // varchar(3) (typmod 7): within the limit only.
        assert_eq!(text("héé", VARCHAR, 7).as_deref(), Some("héé"));
        assert_eq!(text("abc ", VARCHAR, 7), None);
        assert_eq!(text("abcdef", VARCHAR, -1).as_deref(), Some("abcdef"));
        // A number constant assigned to text is printed canonically by PostgreSQL.
        for number in ["1.50", ".5", "5.", "1e3", "-2.5E-1"] {
            assert_eq!(text(number, TEXT, -1), None, "{number}");
            assert_eq!(text(number, VARCHAR, -1), None, "{number}");
        }
        for plain in ["-5", "007", "1.2.3", "e3", ".", "1e", "v1.5"] {
            assert_eq!(text(plain, TEXT, -1).as_deref(), Some(plain), "{plain}");
        }
        // Types whose output spillway does not reproduce.
        assert_eq!(text("ab", 1042, 7), None);
        assert_eq!(text("1.50", 1700, -1).as_deref(), Some("1.50"));
        assert_eq!(text("1e3", 1700, -1), None);
        assert_eq!(text("2024-01-01 10:00", 1083, -1), None);
        // Dates are known in their canonical (ISO) form only.
        assert_eq!(text("2024-01-01", 1082, -1).as_deref(), Some("2024-01-01"));
        assert_eq!(text("01/02/2024", 1082, -1), None);
    }

    #[test]
    fn binary_values_are_postgres_send_format() {
        let bin = |v: &str, oid| Known::of(v, oid, -1, SETTINGS).and_then(|k| k.encode(oid, true));
        assert_eq!(bin("-2", INT2), Some(vec![0xff, 0xfe]));
        assert_eq!(bin("7", INT4), Some(vec![0, 0, 0, 7]));
        assert_eq!(bin("1", INT8), Some(vec![0, 0, 0, 0, 0, 0, 0, 1]));
        assert_eq!(bin("on", BOOL), Some(vec![1]));
        assert_eq!(
            bin("12121212-1212-1212-1212-121212121212", UUID),
            Some(vec![0x12; 16])
        );
        assert_eq!(bin("hé", TEXT), Some("hé".as_bytes().to_vec()));
    }
}
