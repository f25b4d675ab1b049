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
//!
//! Which values are known exactly, and their encodings, are `values.rs`'s.

use bytes::{Bytes, BytesMut};
use spillway_policies::writes::{AssignOp, RowOp};

use super::datetime::{Settings, TIMESTAMPTZ};
use super::fallbacks::Fallback;
use super::params::Bound;
use crate::protocol::backend::{self, Field};
use crate::read::classify::{Returned, WriteShape};
use spillway_policies::engine::{Column, DeferredTable};

mod values;

use values::Known;

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
    /// An upsert whose DO UPDATE leaves returned columns as stored (ADR 0038): the
    /// rows of the operations that take DO UPDATE, with the stored columns' places
    /// (`Stored::holes`) filled at acknowledgement from the engine's values.
    on_update: Option<Box<Stored>>,
}

/// The DO UPDATE answer of an upsert returning columns it leaves as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stored {
    /// Per row operation: the DO UPDATE row, its stored columns' places empty.
    rows: Vec<Vec<Option<Vec<u8>>>>,
    /// The stored columns, in the order the engine hands their values back
    /// (`Converted::stored`), and per field the index among them (`None`: supplied).
    columns: Vec<String>,
    holes: Vec<Option<usize>>,
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

    /// Whether some rows take values the engine decides (ADR 0038): only an
    /// autocommit statement's acknowledgement fills them ([`Self::fill_stored`]).
    pub fn needs_row(&self) -> bool {
        self.on_update.is_some()
    }

    /// The columns [`Self::fill_stored`] takes values for (`Converted::stored`).
    pub fn stored_columns(&self) -> Vec<String> {
        self.on_update
            .as_ref()
            .map_or_else(Vec::new, |s| s.columns.clone())
    }

    /// Rows of operations that took DO UPDATE: their stored columns' values (as the
    /// engine knows them, in [`Self::stored_columns`]' order) encoded in the Bind's
    /// formats. Values come in the spellings `guards::exact_spelling` admits, which
    /// [`Known`] encodes; anything else is an error (a defect: nothing is guessed).
    pub fn fill_stored(&mut self, stored: &[(usize, Vec<Option<String>>)]) -> Result<(), String> {
        if stored.is_empty() {
            return Ok(());
        }
        let on_update = self
            .on_update
            .as_ref()
            .ok_or("stored values without a DO UPDATE answer")?;
        // Only sessions with ISO dates in UTC reach here (`convert`): the text is
        // PostgreSQL's own output there.
        let settings = Settings {
            time_zone: Some("UTC"),
            date_style: Some("ISO"),
            now: std::time::UNIX_EPOCH,
            statement: std::time::UNIX_EPOCH,
        };
        for (op, values) in stored {
            let mut row = on_update
                .rows
                .get(*op)
                .cloned()
                .ok_or("a stored value for no row")?;
            for (ci, hole) in on_update.holes.iter().enumerate() {
                let Some(i) = hole else { continue };
                let ((_, c), format) = self
                    .fields
                    .iter()
                    .zip(&self.formats)
                    .nth(ci)
                    .ok_or("a stored value for no field")?;
                let value = values.get(*i).ok_or("too few stored values")?;
                row[ci] = match value {
                    None => None,
                    Some(text) => Some(
                        Known::of(text, c.type_oid, c.typmod, settings)
                            .and_then(|k| k.encode(c.type_oid, *format == 1))
                            .ok_or_else(|| format!("stored value {text:?} of {}", c.name))?,
                    ),
                };
            }
            *self.rows.get_mut(*op).ok_or("a stored value for no row")? = row;
        }
        Ok(())
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
    if table.row_changes.rewritten {
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
                // An enum's value is its label (a valid one: constant defaults, which
                // PostgreSQL checked, and values `convert` found among the labels).
                Some(text) if table.enum_types.contains_key(&c.type_oid) => Some(
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
        on_update: None,
    }))
}

/// Column types whose stored values an upsert's RETURNING may take from the engine
/// (ADR 0038): those `guards::exact_spelling` admits and [`Known`] encodes without the
/// zone's rules (a timestamptz only in a session with ISO dates in UTC).
fn storable(c: &Column, settings: Settings<'_>) -> bool {
    use super::params::{INT2, INT4, INT8, UUID};
    match c.type_oid {
        INT2 | INT4 | INT8 | UUID => true,
        TIMESTAMPTZ => matches!(c.typmod, -1 | 6) && settings.iso_dates() && settings.utc(),
        _ => false,
    }
}

/// An upsert's RETURNING when its DO UPDATE rows (`updates`, one per operation) leave
/// some returned columns as stored (ADR 0038): `answer` gets their rows with those
/// columns' places to fill, and the columns are returned (`Converted::stored`).
/// `None` when a column is not [`storable`], or the DO UPDATE rows cannot be
/// answered otherwise.
pub fn on_update(
    answer: &mut Returning,
    table: &DeferredTable,
    updates: &[RowOp],
    settings: Settings<'_>,
) -> Option<Vec<String>> {
    if table.row_changes.rewritten || updates.len() != answer.rows.len() {
        return None;
    }
    let mut columns: Vec<String> = Vec::new();
    let mut holes = Vec::with_capacity(answer.fields.len());
    let mut rows = Vec::with_capacity(updates.len());
    for op in updates {
        let supplied = supplied(op, table);
        let mut row = Vec::with_capacity(answer.fields.len());
        holes.clear();
        for ((_, c), format) in answer.fields.iter().zip(&answer.formats) {
            match supplied.iter().find(|(name, _)| *name == c.name) {
                Some((_, None)) => {
                    row.push(None);
                    holes.push(None);
                }
                Some((_, Some(text))) => {
                    let known = Known::of(text, c.type_oid, c.typmod, settings)?;
                    row.push(Some(known.encode(c.type_oid, *format == 1)?));
                    holes.push(None);
                }
                // A column the DO UPDATE assigns without a plain value (`n = t.n +
                // EXCLUDED.n`, a cast) is not left as stored: its value after the
                // update is not the engine's.
                None if storable(c, settings) && !assigns(op, &c.name) => {
                    let i = match columns.iter().position(|x| *x == c.name) {
                        Some(i) => i,
                        None => {
                            columns.push(c.name.clone());
                            columns.len() - 1
                        }
                    };
                    row.push(None);
                    holes.push(Some(i));
                }
                None => return None,
            }
        }
        rows.push(row);
    }
    if columns.is_empty() {
        return None;
    }
    answer.on_update = Some(Box::new(Stored {
        rows,
        columns: columns.clone(),
        holes,
    }));
    Some(columns)
}

/// Whether `op` assigns `column` in any way.
fn assigns(op: &RowOp, column: &str) -> bool {
    matches!(op, RowOp::Update { set, .. } if set.iter().any(|a| a.column == column))
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
impl Returning {
    /// One int4 column `id` (table OID 1, attnum 1) with Bind format `format`, and two
    /// rows, 1 and 2.
    pub(crate) fn for_tests(format: i16) -> Self {
        use super::params::INT4;
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
            on_update: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_formats_follow_the_bind_rules() {
        assert_eq!(formats(&[], 2), Some(vec![0, 0]));
        assert_eq!(formats(&[1], 3), Some(vec![1, 1, 1]));
        assert_eq!(formats(&[0, 1], 2), Some(vec![0, 1]));
        assert_eq!(formats(&[0, 1], 3), None);
        assert_eq!(formats(&[2], 1), None);
    }
}
