//! RETURNING answered by spillway for a deferred write (SPEC §6): the RowDescription
//! and DataRows PostgreSQL would send, built from the values the statement itself
//! supplies, so the write can still be journaled instead of run upstream.
//!
//! This module owns [`Returning`] (the answer, encoded in the formats the client asked
//! for) and the decision whether a statement's RETURNING can be answered at all.
//!
//! Invariants:
//! - A value is answered only when the statement supplies it and spillway knows the
//!   exact text PostgreSQL's output function gives for it: INSERT — the columns it
//!   lists (with the clock defaults `convert` filled in) and those it leaves to a
//!   constant default of the column's type; UPDATE — the key (from WHERE) and columns assigned `col = value` (never
//!   `col = col ± d`, whose result depends on the stored row); DELETE — the key only.
//!   And only for types whose output spillway reproduces exactly: int2/int4/int8,
//!   bool, uuid, text, varchar (and NULL of any type). Anything else is
//!   [`UNKNOWN`]: the statement runs write-through after its barrier.
//! - A table whose BEFORE ROW triggers or rules may change the stored row never has
//!   its RETURNING answered here.
//! - A value's text does not say whether the statement wrote it as a string or as a
//!   number (`1.50`, `1e3`), and PostgreSQL stores a number assigned to a text column
//!   in its canonical form (`1e3` → `1000`), and refuses an integer for a bool column:
//!   so text that reads as a non-integer number, and bool given as `1`/`0`, are not
//!   answered here either (a string written so falls back, which costs nothing but
//!   the trip).
//! - Binary result formats are encoded (int big-endian, bool one byte, uuid 16 bytes,
//!   text UTF-8), as PostgreSQL's send functions do.
//! - Rows are kept per row operation of the statement, in order; an INSERT writes all
//!   its rows or fails, an UPDATE/DELETE is one operation that writes 0 or 1 row, so
//!   the first `n` of them are the `n` written.

use bytes::{Bytes, BytesMut};
use spillway_policies::writes::{AssignOp, RowOp};

use super::datetime::{self, DATE, Settings, TIMESTAMP, TIMESTAMPTZ};
use super::fallbacks::Fallback;
use super::params::Bound;
use super::params::{BOOL, INT2, INT4, INT8, NUMERIC, TEXT, UUID, VARCHAR, canonical_key};
use crate::protocol::backend::{self, Field};
use crate::read::classify::{Returned, WriteShape};
use spillway_policies::engine::{Column, DeferredTable};

/// Fallback reason: a RETURNING value that is not supplied by the statement, or not
/// known exactly as PostgreSQL would output it.
pub const UNKNOWN: Fallback = Fallback::ReturningUnknown;
/// Fallback reason: Execute limits the rows below what the write returns (PostgreSQL
/// would suspend the portal).
pub const ROW_LIMIT: Fallback = Fallback::ReturningRowLimit;

/// A RETURNING answer: the columns, their result formats, and per row operation the
/// encoded values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Returning {
    fields: Vec<(String, Column)>,
    table_oid: u32,
    /// Per field: the format the Bind asked for (0 text, 1 binary).
    formats: Vec<i16>,
    /// Per row operation: the values as sent; `None` is NULL.
    rows: Vec<Vec<Option<Vec<u8>>>>,
    /// Values whose text needs the session's zone rules (a timestamptz in text format
    /// in a session whose TimeZone is not UTC): (row, field, canonical UTC text), and
    /// the zone. Their place in `rows` is empty until [`Self::resolve`] fills it with
    /// PostgreSQL's own output; the answer is not sent before.
    zoned: Vec<(usize, usize, String)>,
    zone: Option<String>,
}

impl Returning {
    /// RowDescription with the formats of the Bind (`bound`), or text for every
    /// column (a simple Query, or a Describe of the statement).
    pub fn row_description(&self, bound: bool) -> Bytes {
        let fields: Vec<Field<'_>> = self
            .fields
            .iter()
            .zip(&self.formats)
            .map(|((name, c), format)| Field {
                name,
                table_oid: self.table_oid,
                attnum: c.attnum,
                type_oid: c.type_oid,
                typlen: c.typlen,
                typmod: c.typmod,
                format: if bound { *format } else { 0 },
            })
            .collect();
        backend::row_description_of(&fields)
    }

    /// Whether some values still need the zone's rules ([`Self::zoned`]).
    pub fn needs_zone(&self) -> bool {
        !self.zoned.is_empty()
    }

    /// The zone and the canonical texts to ask PostgreSQL for, in order.
    pub fn zoned(&self) -> Option<(String, Vec<String>)> {
        if self.zoned.is_empty() {
            return None;
        }
        let zone = self.zone.clone()?;
        Some((zone, self.zoned.iter().map(|(_, _, t)| t.clone()).collect()))
    }

    /// Fills in PostgreSQL's texts for [`Self::zoned`], in its order.
    pub fn resolve(&mut self, texts: Vec<String>) -> Result<(), String> {
        if texts.len() != self.zoned.len() {
            return Err(format!(
                "{} timestamptz texts for {} values",
                texts.len(),
                self.zoned.len()
            ));
        }
        for ((r, c, _), text) in self.zoned.drain(..).zip(texts) {
            if let Some(v) = self.rows.get_mut(r).and_then(|row| row.get_mut(c)) {
                *v = Some(text.into_bytes());
            }
        }
        Ok(())
    }

    /// The DataRows of the first `written` row operations.
    pub fn data_rows(&self, written: usize) -> BytesMut {
        let mut out = BytesMut::new();
        for row in self.rows.iter().take(written) {
            let values: Vec<Option<&[u8]>> = row.iter().map(Option::as_deref).collect();
            out.extend_from_slice(&backend::data_row_raw(&values));
        }
        out
    }
}

#[cfg(test)]
impl Returning {
    /// One int4 column `id` (table OID 1, attnum 1) with Bind format `format`, and two
    /// rows, 1 and 2.
    pub(crate) fn for_tests(format: i16) -> Self {
        let column = Column {
            name: "id".into(),
            attnum: 1,
            type_oid: INT4,
            typlen: 4,
            typmod: -1,
        };
        let value = |v: i64| Known::Int(v).encode(INT4, format == 1);
        Self {
            fields: vec![("id".into(), column)],
            table_oid: 1,
            formats: vec![format],
            rows: vec![vec![value(1)], vec![value(2)]],
            zoned: Vec::new(),
            zone: None,
        }
    }
}

/// A value spillway knows exactly, as PostgreSQL stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Known {
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
    fn of(text: &str, type_oid: u32, typmod: i32, settings: Settings<'_>) -> Option<Known> {
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
    fn encode(&self, type_oid: u32, binary: bool) -> Option<Vec<u8>> {
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

/// The result formats of a Bind for `n` columns, as PostgreSQL reads them: none =
/// all text, one = for every column, else one per column (another count, or a code
/// other than 0/1, is an error PostgreSQL reports: not answered here).
fn formats(codes: &[i16], n: usize) -> Option<Vec<i16>> {
    let codes = match codes {
        [] => vec![0; n],
        [one] => vec![*one; n],
        many if many.len() == n => many.to_vec(),
        _ => return None,
    };
    codes.iter().all(|c| matches!(c, 0 | 1)).then_some(codes)
}

/// The RETURNING answer of `shape` on `table`, given the row operations `convert`
/// made of it: `Ok(None)` without RETURNING, `Err` when it cannot be answered here.
pub fn answer(
    shape: &WriteShape,
    table: &DeferredTable,
    bound: &Bound,
    ops: &[RowOp],
    settings: Settings<'_>,
) -> Result<Option<Returning>, Fallback> {
    let items = shape.returning();
    if items.is_empty() {
        return Ok(None);
    }
    if table.rewrites_rows {
        return Err(UNKNOWN);
    }
    if bound.max_rows > 0 && usize::try_from(bound.max_rows).is_ok_and(|max| max < ops.len()) {
        return Err(ROW_LIMIT);
    }
    let mut fields: Vec<(String, Column)> = Vec::new();
    for item in items {
        match item {
            Returned::All => {
                fields.extend(table.columns.iter().map(|c| (c.name.clone(), c.clone())));
            }
            Returned::Column { column, name } => {
                let c = table
                    .columns
                    .iter()
                    .find(|c| c.name == *column)
                    .ok_or(UNKNOWN)?;
                fields.push((name.clone(), c.clone()));
            }
        }
    }
    let formats = formats(&bound.result_formats, fields.len()).ok_or(UNKNOWN)?;
    let mut rows = Vec::with_capacity(ops.len());
    let mut zoned = Vec::new();
    // A timestamptz's text in a zone other than UTC needs the zone's rules: asked of
    // PostgreSQL before the answer is sent (`WriteService::resolve_zoned`).
    let zone = settings
        .time_zone
        .filter(|_| settings.iso_dates() && !settings.utc());
    for (ri, op) in ops.iter().enumerate() {
        let supplied = supplied(op, table);
        let mut row = Vec::with_capacity(fields.len());
        for (ci, ((_, c), format)) in fields.iter().zip(&formats).enumerate() {
            let (_, text) = supplied
                .iter()
                .find(|(name, _)| *name == c.name)
                .ok_or(UNKNOWN)?;
            let value = match text {
                None => None,
                // An enum's value is its label (a valid one: only constant defaults,
                // which PostgreSQL checked, reach here; `convert` refuses enum values).
                Some(text) if table.enum_types.contains(&c.type_oid) => Some(
                    Known::Text((*text).to_owned())
                        .encode(c.type_oid, *format == 1)
                        .ok_or(UNKNOWN)?,
                ),
                Some(text) => {
                    let known = Known::of(text, c.type_oid, c.typmod, settings).ok_or(UNKNOWN)?;
                    match known.encode(c.type_oid, *format == 1) {
                        Some(v) => Some(v),
                        None if c.type_oid == TIMESTAMPTZ && *format == 0 && zone.is_some() => {
                            zoned.push((ri, ci, text.trim().to_owned()));
                            Some(Vec::new())
                        }
                        None => return Err(UNKNOWN),
                    }
                }
            };
            row.push(value);
        }
        rows.push(row);
    }
    Ok(Some(Returning {
        fields,
        table_oid: table.oid,
        formats,
        rows,
        zone: zone.filter(|_| !zoned.is_empty()).map(str::to_owned),
        zoned,
    }))
}

/// The columns whose stored value `op` determines, with that value's input text
/// (`None` = NULL). A value with a cast is left out (`convert` refuses casts today;
/// this keeps the rule local).
fn supplied<'a>(op: &'a RowOp, table: &'a DeferredTable) -> Vec<(&'a str, Option<&'a str>)> {
    let plain = |v: &'a spillway_policies::writes::Val| v.cast.is_none();
    let key = |key: &'a [spillway_policies::writes::Val]| {
        table
            .meta
            .key
            .iter()
            .zip(key)
            .filter(|(_, v)| plain(v))
            .map(|(k, v)| (k.as_str(), v.text.as_deref()))
            .collect::<Vec<_>>()
    };
    match op {
        RowOp::Insert {
            columns, values, ..
        } => {
            let mut out: Vec<_> = columns
                .iter()
                .zip(values)
                .filter(|(_, v)| plain(v))
                .map(|(c, v)| (c.as_str(), v.text.as_deref()))
                .collect();
            // Columns left to a constant default store its value.
            out.extend(
                table
                    .defaults
                    .constant
                    .iter()
                    .filter(|(c, _)| !columns.contains(c))
                    .map(|(c, v)| (c.as_str(), v.as_deref())),
            );
            out
        }
        RowOp::Update { key: k, set, .. } => {
            let mut out = key(k);
            out.extend(
                set.iter()
                    .filter(|a| a.op == AssignOp::Set && plain(&a.value))
                    .map(|a| (a.column.as_str(), a.value.text.as_deref())),
            );
            out
        }
        RowOp::Delete { key: k, .. } => key(k),
    }
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

    #[test]
    fn result_formats_follow_the_bind_rules() {
        assert_eq!(formats(&[], 2), Some(vec![0, 0]));
        assert_eq!(formats(&[1], 3), Some(vec![1, 1, 1]));
        assert_eq!(formats(&[0, 1], 2), Some(vec![0, 1]));
        assert_eq!(formats(&[0, 1], 3), None);
        assert_eq!(formats(&[2], 1), None);
    }
}
