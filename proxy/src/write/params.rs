//! Bind parameters as PostgreSQL text, the form journal records keep (see
//! `spillway_policies::writes`). Text-format parameters are taken as sent; binary ones
//! are decoded for the types whose text form is unambiguous. Anything else makes the
//! statement non-deferrable (it then runs write-through), never a guess.
//!
//! Also canonical key text: two spellings of one key (`'01'` and `1` for an integer)
//! must compare equal, or the flush planner could merge two updates of one row into one
//! set-based UPDATE, which applies only one of them.

use std::fmt::Write as _;

/// Bound parameters of one Execute (or none for a simple Query).
#[derive(Debug, Default, Clone)]
pub struct Bound {
    /// Wire values; `None` is NULL.
    pub values: Vec<Option<Vec<u8>>>,
    /// Per parameter: binary format.
    pub binary: Vec<bool>,
    /// Declared parameter types from Parse (0 = unspecified).
    pub types: Vec<u32>,
    /// Result format codes of the Bind, as sent (none = all text).
    pub result_formats: Vec<i16>,
    /// The Execute's row limit (0 = none).
    pub max_rows: i32,
}

pub const BOOL: u32 = 16;
pub const BYTEA: u32 = 17;
pub const NAME: u32 = 19;
pub const INT8: u32 = 20;
pub const INT2: u32 = 21;
pub const INT4: u32 = 23;
pub const TEXT: u32 = 25;
pub const JSON: u32 = 114;
pub const FLOAT4: u32 = 700;
pub const FLOAT8: u32 = 701;
pub const BPCHAR: u32 = 1042;
pub const VARCHAR: u32 = 1043;
pub const NUMERIC: u32 = 1700;
pub const UUID: u32 = 2950;
const DATE: u32 = super::datetime::DATE;
const TIME: u32 = super::datetime::TIME;
const TIMESTAMP: u32 = super::datetime::TIMESTAMP;
const TIMESTAMPTZ: u32 = super::datetime::TIMESTAMPTZ;
pub const JSONB: u32 = 3802;

/// Why a value cannot be journaled as text.
pub const BINARY_TYPE: &str = "binary_parameter_type";
pub const BAD_VALUE: &str = "parameter_value";

/// One parameter's text, from its wire form. `type_oid` is the parameter's type
/// (declared in Parse, or the column's when PostgreSQL infers it from there).
pub fn to_text(
    value: Option<&[u8]>,
    binary: bool,
    type_oid: u32,
) -> Result<Option<String>, &'static str> {
    let Some(bytes) = value else {
        return Ok(None);
    };
    if !binary {
        return std::str::from_utf8(bytes)
            .map(|s| Some(s.to_owned()))
            .map_err(|_| BAD_VALUE);
    }
    let fixed = |n: usize| -> Result<&[u8], &'static str> {
        if bytes.len() == n {
            Ok(bytes)
        } else {
            Err(BAD_VALUE)
        }
    };
    let text = match type_oid {
        BOOL => match fixed(1)?[0] {
            0 => "f".to_owned(),
            _ => "t".to_owned(),
        },
        INT2 => {
            let b = fixed(2)?;
            i16::from_be_bytes([b[0], b[1]]).to_string()
        }
        INT4 => {
            let b = fixed(4)?;
            i32::from_be_bytes([b[0], b[1], b[2], b[3]]).to_string()
        }
        INT8 => {
            let b = fixed(8)?;
            i64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]).to_string()
        }
        FLOAT4 => {
            let b = fixed(4)?;
            float_text(
                f64::from(f32::from_be_bytes([b[0], b[1], b[2], b[3]])),
                true,
            )
        }
        FLOAT8 => {
            let b = fixed(8)?;
            float_text(
                f64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
                false,
            )
        }
        TEXT | VARCHAR | BPCHAR | NAME | JSON => std::str::from_utf8(bytes)
            .map_err(|_| BAD_VALUE)?
            .to_owned(),
        JSONB => match bytes.split_first() {
            Some((1, rest)) => std::str::from_utf8(rest).map_err(|_| BAD_VALUE)?.to_owned(),
            _ => return Err(BAD_VALUE),
        },
        UUID => uuid_text(fixed(16)?),
        NUMERIC => numeric_text(bytes).ok_or(BAD_VALUE)?,
        // Microseconds or days since 2000-01-01, as the canonical text of
        // `datetime.rs` (infinities spelled out: not converted further).
        DATE => {
            let b = fixed(4)?;
            let days = i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            super::datetime::from_binary_date(days).ok_or(BAD_VALUE)?
        }
        TIME | TIMESTAMP | TIMESTAMPTZ => {
            let b = fixed(8)?;
            let us = i64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
            super::datetime::from_binary(us, type_oid).ok_or(BAD_VALUE)?
        }
        BYTEA => {
            let mut s = String::with_capacity(2 + bytes.len() * 2);
            s.push_str("\\x");
            for b in bytes {
                let _ = write!(s, "{b:02x}");
            }
            s
        }
        _ => return Err(BINARY_TYPE),
    };
    Ok(Some(text))
}

/// numeric's binary form (ndigits, weight, sign, dscale, base-10000 digits) as the
/// text numeric_out prints.
fn numeric_text(b: &[u8]) -> Option<String> {
    let word = |i: usize| -> Option<u16> { Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?])) };
    let ndigits = usize::from(word(0)?);
    let weight = i64::from(i16::from_be_bytes(word(2)?.to_be_bytes()));
    let sign = word(4)?;
    let dscale = usize::from(word(6)?);
    if b.len() != 8 + 2 * ndigits {
        return None;
    }
    match sign {
        0xC000 => return Some("NaN".to_owned()),
        0xD000 => return Some("Infinity".to_owned()),
        0xF000 => return Some("-Infinity".to_owned()),
        0x0000 | 0x4000 => {}
        _ => return None,
    }
    let digits: Vec<u16> = (0..ndigits)
        .map(|i| word(8 + 2 * i))
        .collect::<Option<_>>()?;
    if digits.iter().any(|d| *d > 9999) {
        return None;
    }
    // The digit of base-10000 exponent `e`.
    let at = |e: i64| -> u16 {
        usize::try_from(weight - e)
            .ok()
            .and_then(|i| digits.get(i).copied())
            .unwrap_or(0)
    };
    let mut s = String::new();
    if sign == 0x4000 && digits.iter().any(|d| *d != 0) {
        s.push('-');
    }
    if weight < 0 {
        s.push('0');
    } else {
        for e in (0..=weight).rev() {
            if e == weight {
                let _ = write!(s, "{}", at(e));
            } else {
                let _ = write!(s, "{:04}", at(e));
            }
        }
    }
    if dscale > 0 {
        let mut frac = String::new();
        let mut e = -1;
        while frac.len() < dscale {
            let _ = write!(frac, "{:04}", at(e));
            e -= 1;
        }
        frac.truncate(dscale);
        s.push('.');
        s.push_str(&frac);
    }
    Some(s)
}

/// Shortest text that reads back as the same value. A float4 is printed from its f32
/// so `0.1f32` stays "0.1", not the f64 expansion.
fn float_text(v: f64, single: bool) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "Infinity" } else { "-Infinity" }.to_owned()
    } else if single {
        #[allow(clippy::cast_possible_truncation)]
        let f = v as f32;
        f.to_string()
    } else {
        v.to_string()
    }
}

fn uuid_text(b: &[u8]) -> String {
    let mut s = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        let _ = write!(s, "{byte:02x}");
    }
    s
}

/// The canonical text of a primary-key value of type `type_oid`, or `Err` when keys of
/// that type have no canonical form spillway knows (the table's writes then run
/// write-through).
pub fn canonical_key(text: &str, type_oid: u32) -> Result<String, &'static str> {
    // One function for the write side, the read cache and the change stream.
    spillway_policies::changes::canonical_key(text, type_oid)
}

/// Whether PostgreSQL's input function for `type_oid` (with `typmod`) accepts `text`,
/// for the types where spillway can tell without asking: integers (with their range),
/// floats (their range), numeric (with its precision), bool, uuid, json/jsonb,
/// bytea, and the length of varchar/bpchar. Other types: true; only the types of
/// `types::validated` are deferred.
pub fn accepts(text: &str, type_oid: u32, typmod: i32) -> bool {
    let t = text.trim();
    match type_oid {
        INT2 => t.parse::<i16>().is_ok(),
        INT4 => t.parse::<i32>().is_ok(),
        INT8 => t.parse::<i64>().is_ok(),
        FLOAT4 | FLOAT8 => {
            let l = t.to_ascii_lowercase();
            t.parse::<f64>()
                .is_ok_and(|v| float_in_range(t, v, type_oid == FLOAT4))
                || matches!(
                    l.as_str(),
                    "nan" | "infinity" | "+infinity" | "-infinity" | "inf" | "+inf" | "-inf"
                )
        }
        NUMERIC if typmod > 4 => is_decimal(t) && fits_numeric(t, typmod),
        NUMERIC => {
            let l = t.to_ascii_lowercase();
            matches!(l.as_str(), "nan" | "infinity" | "+infinity" | "-infinity") || is_decimal(t)
        }
        BOOL => matches!(
            t.to_ascii_lowercase().as_str(),
            "t" | "true" | "y" | "yes" | "on" | "1" | "f" | "false" | "n" | "no" | "off" | "0"
        ),
        UUID => canonical_key(t, UUID).is_ok(),
        // PostgreSQL's JSON grammar is RFC 8259's; jsonb also refuses \u0000 and
        // numbers beyond numeric's range (serde_json refuses those beyond f64's:
        // such values fall back, PostgreSQL decides).
        JSON | JSONB => {
            serde_json::from_str::<serde_json::Value>(text).is_ok()
                && !(type_oid == JSONB && text.to_ascii_lowercase().contains("\\u0000"))
        }
        BYTEA => is_bytea(text),
        // typmod = max characters + 4 (VARHDRSZ); -1 when unlimited. bpchar pads.
        VARCHAR | BPCHAR if typmod > 4 => {
            let max = usize::try_from(typmod - 4).unwrap_or(usize::MAX);
            let s = if type_oid == BPCHAR {
                text.trim_end_matches(' ')
            } else {
                text
            };
            s.chars().count() <= max
        }
        _ => true,
    }
}

/// bytea's text input: `\x` and pairs of hex digits, or the escape format (a
/// backslash only doubled or before three octal digits).
fn is_bytea(text: &str) -> bool {
    if let Some(hex) = text.strip_prefix("\\x") {
        // PostgreSQL also skips whitespace between pairs; such text falls back.
        return hex.len() % 2 == 0 && hex.chars().all(|c| c.is_ascii_hexdigit());
    }
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            if b.get(i + 1) == Some(&b'\\') {
                i += 2;
            } else if matches!(
                b.get(i + 1..i + 4),
                Some([b'0'..=b'3', b'0'..=b'7', b'0'..=b'7'])
            ) {
                i += 4;
            } else {
                return false;
            }
        } else {
            i += 1;
        }
    }
    true
}

/// Whether a plain decimal (no exponent) fits numeric(p, s) after rounding to `s`
/// digits; conservative (a value that might carry into one more digit does not).
fn fits_numeric(t: &str, typmod: i32) -> bool {
    let Ok(m) = u32::try_from(typmod - 4) else {
        return false;
    };
    let (p, s) = ((m >> 16) as usize, (m & 0xffff) as usize);
    if t.contains(['e', 'E']) || s > p {
        return false;
    }
    let t = t.strip_prefix(['+', '-']).unwrap_or(t);
    let (int, frac) = t.split_once('.').unwrap_or((t, ""));
    let int = int.trim_start_matches('0');
    let room = p - s;
    if int.len() > room {
        return false;
    }
    // Rounding may carry into a new integer digit only when every kept digit is 9.
    let kept_nines = int.chars().chain(frac.chars().take(s)).all(|c| c == '9');
    let rounds_up = frac.chars().nth(s).is_some_and(|c| c >= '5');
    !(int.len() == room && kept_nines && rounds_up)
}

/// Whether PostgreSQL's float input keeps `v` (read from `t`): it refuses overflow
/// and underflow to zero; subnormal results are refused here too (conservatively).
fn float_in_range(t: &str, v: f64, single: bool) -> bool {
    let a = v.abs();
    if !v.is_finite() || (single && a > f64::from(f32::MAX)) {
        return false;
    }
    let min = if single {
        f64::from(f32::MIN_POSITIVE)
    } else {
        f64::MIN_POSITIVE
    };
    let zero_text = !t
        .split(['e', 'E'])
        .next()
        .unwrap_or("")
        .contains(['1', '2', '3', '4', '5', '6', '7', '8', '9']);
    if a == 0.0 { zero_text } else { a >= min }
}

/// `[+-]digits[.digits][e[+-]digits]` (also `.5`, `5.`).
fn is_decimal(t: &str) -> bool {
    let t = t.strip_prefix(['+', '-']).unwrap_or(t);
    let (mantissa, exp) = match t.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e)),
        None => (t, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    let mantissa_ok = digits(int) && digits(frac) && !(int.is_empty() && frac.is_empty());
    let exp_ok = exp.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    mantissa_ok && exp_ok
}

/// date, time, timestamp, timestamptz, timetz: types whose input reads the clock for
/// special words.
pub fn is_clock_type(type_oid: u32) -> bool {
    matches!(type_oid, 1082 | 1083 | 1114 | 1184 | 1266)
}

/// Date/time and interval types (their text depends on session settings).
pub fn is_datetime_type(type_oid: u32) -> bool {
    is_clock_type(type_oid) || type_oid == 1186
}

/// `now`, `today`, `tomorrow`, `yesterday` (any case, padded): date/time input turns
/// them into the current time.
pub fn is_clock_word(text: &str) -> bool {
    let t = text.trim().to_ascii_lowercase();
    ["now", "today", "tomorrow", "yesterday"]
        .iter()
        .any(|w| t.contains(w))
}

/// Whether `c = c ± v` is exact arithmetic spillway may defer for this column type.
pub fn is_numeric(type_oid: u32) -> bool {
    matches!(type_oid, INT2 | INT4 | INT8 | NUMERIC | FLOAT4 | FLOAT8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_values_become_postgres_text() {
        let t = |v: &[u8], oid| {
            to_text(Some(v), true, oid)
                .expect("decodes")
                .expect("not null")
        };
        assert_eq!(t(&[1], BOOL), "t");
        assert_eq!(t(&(-7i16).to_be_bytes(), INT2), "-7");
        assert_eq!(t(&42i32.to_be_bytes(), INT4), "42");
        assert_eq!(t(&i64::MIN.to_be_bytes(), INT8), i64::MIN.to_string());
        assert_eq!(t(&0.1f32.to_be_bytes(), FLOAT4), "0.1");
        assert_eq!(t(&0.1f64.to_be_bytes(), FLOAT8), "0.1");
        assert_eq!(t(&f64::NEG_INFINITY.to_be_bytes(), FLOAT8), "-Infinity");
        assert_eq!(t(b"h\xc3\xa9", TEXT), "hé");
        assert_eq!(t(b"\x01{\"a\":1}", JSONB), "{\"a\":1}");
        assert_eq!(t(&[0xde, 0xad], BYTEA), "\\xdead");
        assert_eq!(t(&[0x12; 16], UUID), "12121212-1212-1212-1212-121212121212");
        assert_eq!(to_text(None, true, INT4), Ok(None));
        assert_eq!(to_text(Some(b"12"), false, INT4), Ok(Some("12".into())));
        assert_eq!(t(&[0; 8], 1114), "2000-01-01 00:00:00.000000");
        assert_eq!(
            t(&(-1i64).to_be_bytes(), 1184),
            "1999-12-31 23:59:59.999999+00"
        );
        assert_eq!(t(&366i32.to_be_bytes(), 1082), "2001-01-01");
        // 1234.50: ndigits 2, weight 0, sign +, dscale 2, digits 1234 5000.
        let n = [0, 2, 0, 0, 0, 0, 0, 2, 0x04, 0xd2, 0x13, 0x88];
        assert_eq!(t(&n, NUMERIC), "1234.50");
        // -0.0012: ndigits 1, weight -1, sign -, dscale 4, digit 12.
        let n = [0, 1, 0xff, 0xff, 0x40, 0, 0, 4, 0, 12];
        assert_eq!(t(&n, NUMERIC), "-0.0012");
        // 20000 (dscale 0): ndigits 1, weight 1, digit 2.
        let n = [0, 1, 0, 1, 0, 0, 0, 0, 0, 2];
        assert_eq!(t(&n, NUMERIC), "20000");
        assert_eq!(to_text(Some(&[0; 8]), true, 1186), Err(BINARY_TYPE));
        assert_eq!(to_text(Some(&[0; 3]), true, INT4), Err(BAD_VALUE));
        assert_eq!(to_text(Some(b"\xff"), false, TEXT), Err(BAD_VALUE));
    }

    #[test]
    fn keys_have_one_spelling() {
        assert_eq!(canonical_key(" 007", INT4), Ok("7".into()));
        assert_eq!(canonical_key("-0", INT8), Ok("0".into()));
        assert!(canonical_key("1.5", INT4).is_err());
        assert_eq!(
            canonical_key("{A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11}", UUID),
            Ok("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11".into())
        );
        assert_eq!(canonical_key("x ", TEXT), Ok("x ".into()));
        assert_eq!(canonical_key("1.0", NUMERIC), Err("key_type"));
        assert!(is_numeric(NUMERIC) && !is_numeric(TEXT));
        assert!(is_clock_word(" NOW ") && is_clock_word("today") && !is_clock_word("2024-01-01"));
        assert!(is_clock_type(1184) && !is_clock_type(TEXT));
    }

    #[test]
    fn values_postgres_would_refuse_are_caught_for_simple_types() {
        assert!(accepts(" 42 ", INT4, -1) && !accepts("4.2", INT4, -1));
        assert!(!accepts("40000", INT2, -1) && accepts("-32768", INT2, -1));
        assert!(!accepts("9223372036854775808", INT8, -1));
        assert!(accepts("1e3", NUMERIC, -1) && accepts("-.5", NUMERIC, -1));
        assert!(
            !accepts("1,5", NUMERIC, -1)
                && !accepts(".", NUMERIC, -1)
                && !accepts("1e", NUMERIC, -1)
        );
        assert!(
            accepts("NaN", FLOAT8, -1)
                && accepts("-Infinity", FLOAT4, -1)
                && !accepts("x", FLOAT8, -1)
        );
        assert!(accepts("Yes", BOOL, -1) && !accepts("maybe", BOOL, -1));
        assert!(!accepts("not-a-uuid", UUID, -1));
        // varchar(3): typmod 7.
        assert!(accepts("héé", VARCHAR, 7) && !accepts("abcd", VARCHAR, 7));
        assert!(accepts("ab   ", BPCHAR, 7) && accepts("anything", TEXT, -1));
    }
}
