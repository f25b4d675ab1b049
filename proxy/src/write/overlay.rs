//! A row image with its pending writes overlaid (ADR 0039): which result fields are
//! which table columns ([`Fields`]), each overlaid value in the format the client
//! asked for ([`encode`]), and the DataRow rewritten with them ([`Fields::rewrite`]).
//! `session/handler/overlay.rs` decides when a read is answered this way.
//!
//! Invariants:
//! - A value is written only for a type whose text spillway produces exactly as
//!   PostgreSQL outputs it in any session (text, varchar, int2/4/8, bool, uuid), from
//!   the journaled text in its canonical form; any other type, or a text that is not
//!   a value of its type as spillway reads it, is refused (never guessed).
//! - A DataRow is rewritten only when it has exactly the fields the statement's
//!   outputs name; NULL is written as length -1.

use bytes::Bytes;
use spillway_policies::changes::canonical_key;
use spillway_policies::engine::overlay::Assigned;
use spillway_policies::engine::table::Column;

use crate::protocol::backend;
use crate::write::params::{BOOL, INT2, INT4, INT8, TEXT};

const VARCHAR: u32 = 1043;
const UUID: u32 = 2950;

/// One output field of an overlaid read: the table column it is, and its format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub column: String,
    pub attnum: i16,
    pub type_oid: u32,
    pub typmod: i32,
    pub binary: bool,
}

/// The output fields of an overlaid read of one table, in result order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fields {
    pub table_oid: u32,
    pub fields: Vec<Field>,
}

/// Why a row cannot be overlaid.
pub type Refused = &'static str;

impl Fields {
    /// The fields of `outputs` (column names in result order) of a table with
    /// `columns`, with the result format codes of a Bind (`formats`: none for all
    /// text, one for all, or one per field), or `None` when they do not describe one.
    pub fn of(
        table_oid: u32,
        columns: &[Column],
        outputs: &[String],
        formats: &[i16],
    ) -> Option<Self> {
        let fields = outputs
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let c = columns.iter().find(|c| c.name == *name)?;
                let format = match formats {
                    [] => 0,
                    [f] => *f,
                    fs if fs.len() == outputs.len() => fs[i],
                    _ => return None,
                };
                Some(Field {
                    column: c.name.clone(),
                    attnum: c.attnum,
                    type_oid: c.type_oid,
                    typmod: c.typmod,
                    binary: match format {
                        0 => false,
                        1 => true,
                        _ => return None,
                    },
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Self { table_oid, fields })
    }

    /// Whether a RowDescription (whole message) describes these fields: the same
    /// table columns, in order (its format codes are not read: a Describe of the
    /// statement says text whatever the Bind asked for).
    pub fn matches_description(&self, msg: &[u8]) -> bool {
        described(msg).is_some_and(|d| {
            d.len() == self.fields.len()
                && d.iter().zip(&self.fields).all(|((oid, attnum, ty), f)| {
                    *oid == self.table_oid && *attnum == f.attnum && *ty == f.type_oid
                })
        })
    }

    /// The DataRow (whole message) with the assigned columns' values in place of
    /// PostgreSQL's.
    pub fn rewrite(&self, msg: &[u8], assigned: &Assigned) -> Result<Bytes, Refused> {
        let values = data_row_values(msg).ok_or("malformed_row")?;
        if values.len() != self.fields.len() {
            return Err("field_count");
        }
        let mut encoded: Vec<Option<Vec<u8>>> = Vec::with_capacity(values.len());
        for (field, value) in self.fields.iter().zip(&values) {
            match assigned.iter().find(|(c, _)| *c == field.column) {
                Some((_, text)) => encoded.push(match text {
                    Some(t) => Some(encode(t, field)?),
                    None => None,
                }),
                None => encoded.push(value.map(<[u8]>::to_vec)),
            }
        }
        let refs: Vec<Option<&[u8]>> = encoded.iter().map(Option::as_deref).collect();
        Ok(backend::data_row_raw(&refs))
    }
}

/// Whether a value of `field`'s type can be overlaid at all.
pub fn overlayable_type(type_oid: u32) -> bool {
    matches!(type_oid, TEXT | VARCHAR | INT2 | INT4 | INT8 | BOOL | UUID)
}

/// The journaled text `text` of a value assigned to `field`, as PostgreSQL sends
/// it in the field's format.
pub fn encode(text: &str, field: &Field) -> Result<Vec<u8>, Refused> {
    match field.type_oid {
        TEXT | VARCHAR => {
            // varchar(n) cuts an over-long value's trailing blanks on assignment.
            if field.type_oid == VARCHAR
                && field.typmod >= 4
                && text.chars().count() > usize::try_from(field.typmod - 4).unwrap_or(0)
            {
                return Err("varchar_length");
            }
            Ok(text.as_bytes().to_vec())
        }
        INT2 | INT4 | INT8 => {
            let canonical = canonical_key(text, field.type_oid).map_err(|_| "integer")?;
            if !field.binary {
                return Ok(canonical.into_bytes());
            }
            let v: i64 = canonical.parse().map_err(|_| "integer")?;
            Ok(match field.type_oid {
                INT2 => i16::try_from(v)
                    .map_err(|_| "integer")?
                    .to_be_bytes()
                    .to_vec(),
                INT4 => i32::try_from(v)
                    .map_err(|_| "integer")?
                    .to_be_bytes()
                    .to_vec(),
                _ => v.to_be_bytes().to_vec(),
            })
        }
        BOOL => {
            let b = bool_value(text).ok_or("bool")?;
            Ok(match (field.binary, b) {
                (true, b) => vec![u8::from(b)],
                (false, true) => b"t".to_vec(),
                (false, false) => b"f".to_vec(),
            })
        }
        UUID => {
            let canonical = canonical_key(text, UUID).map_err(|_| "uuid")?;
            if !field.binary {
                return Ok(canonical.into_bytes());
            }
            let hex: String = canonical.chars().filter(|c| *c != '-').collect();
            (0..16)
                .map(|i| {
                    hex.get(i * 2..i * 2 + 2)
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                        .ok_or("uuid")
                })
                .collect()
        }
        _ => Err("type"),
    }
}

/// A boolean's input text as PostgreSQL reads it (`boolin`: a prefix of true, false,
/// yes, no; on, off; 1, 0; any case, blanks around).
fn bool_value(text: &str) -> Option<bool> {
    let t = text.trim().to_ascii_lowercase();
    let prefix_of = |word: &str, min: usize| t.len() >= min && word.starts_with(t.as_str());
    if prefix_of("true", 1) || prefix_of("yes", 1) || t == "on" || t == "1" {
        Some(true)
    } else if prefix_of("false", 1) || prefix_of("no", 1) || prefix_of("off", 2) || t == "0" {
        Some(false)
    } else {
        None
    }
}

/// The values of a DataRow (whole message); `None` is NULL.
fn data_row_values(msg: &[u8]) -> Option<Vec<Option<&[u8]>>> {
    let mut rest = msg.get(5..)?;
    let count = i16::from_be_bytes(rest.get(..2)?.try_into().ok()?);
    rest = rest.get(2..)?;
    let mut out = Vec::with_capacity(usize::try_from(count).ok()?);
    for _ in 0..count {
        let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
        rest = rest.get(4..)?;
        if len < 0 {
            out.push(None);
            continue;
        }
        let len = usize::try_from(len).ok()?;
        out.push(Some(rest.get(..len)?));
        rest = rest.get(len..)?;
    }
    rest.is_empty().then_some(out)
}

/// (table OID, attribute number, type OID) of each field of a RowDescription.
fn described(msg: &[u8]) -> Option<Vec<(u32, i16, u32)>> {
    let mut rest = msg.get(5..)?;
    let count = i16::from_be_bytes(rest.get(..2)?.try_into().ok()?);
    rest = rest.get(2..)?;
    let mut out = Vec::new();
    for _ in 0..count {
        let nul = rest.iter().position(|b| *b == 0)?;
        rest = rest.get(nul + 1..)?;
        let fixed = rest.get(..18)?;
        let oid = u32::from_be_bytes(fixed.get(..4)?.try_into().ok()?);
        let attnum = i16::from_be_bytes(fixed.get(4..6)?.try_into().ok()?);
        let ty = u32::from_be_bytes(fixed.get(6..10)?.try_into().ok()?);
        out.push((oid, attnum, ty));
        rest = rest.get(18..)?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(type_oid: u32, binary: bool) -> Field {
        Field {
            column: "c".to_owned(),
            attnum: 2,
            type_oid,
            typmod: -1,
            binary,
        }
    }

    #[test]
    fn values_are_written_as_postgresql_outputs_them() {
        assert_eq!(encode(" 007", &field(INT4, false)), Ok(b"7".to_vec()));
        assert_eq!(encode("-5", &field(INT2, true)), Ok(vec![0xff, 0xfb]));
        assert_eq!(encode("70000", &field(INT2, true)), Err("integer"));
        assert_eq!(
            encode("1", &field(INT8, true)),
            Ok(1i64.to_be_bytes().to_vec())
        );
        assert_eq!(encode("1_000", &field(INT4, false)), Err("integer"));
        assert_eq!(encode(" Yes", &field(BOOL, false)), Ok(b"t".to_vec()));
        assert_eq!(encode("of", &field(BOOL, true)), Ok(vec![0]));
        assert_eq!(encode("o", &field(BOOL, true)), Err("bool"));
        let u = "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11";
        assert_eq!(
            encode(u, &field(UUID, false)),
            Ok(b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11".to_vec())
        );
        assert_eq!(encode(u, &field(UUID, true)).map(|b| b.len()), Ok(16));
        assert_eq!(
            encode("héllo", &field(TEXT, true)),
            Ok("héllo".as_bytes().to_vec())
        );
        let mut short = field(VARCHAR, false);
        short.typmod = 4 + 3;
        assert_eq!(encode("abc", &short), Ok(b"abc".to_vec()));
        assert_eq!(encode("abc ", &short), Err("varchar_length"));
        assert_eq!(encode("1.5", &field(701, false)), Err("type"));
    }

    #[test]
    fn a_row_is_rewritten_field_by_field() {
        let fields = Fields {
            table_oid: 99,
            fields: vec![field(INT4, true), {
                let mut f = field(TEXT, false);
                f.column = "token".to_owned();
                f
            }],
        };
        let row = backend::data_row_raw(&[Some(&5i32.to_be_bytes()), Some(b"old")]);
        let assigned = vec![("token".to_owned(), Some("new".to_owned()))];
        let want = backend::data_row_raw(&[Some(&5i32.to_be_bytes()), Some(b"new")]);
        assert_eq!(fields.rewrite(&row, &assigned), Ok(want));
        let null = vec![("token".to_owned(), None)];
        let want = backend::data_row_raw(&[Some(&5i32.to_be_bytes()), None]);
        assert_eq!(fields.rewrite(&row, &null), Ok(want));
        let short = backend::data_row_raw(&[Some(b"x")]);
        assert_eq!(fields.rewrite(&short, &assigned), Err("field_count"));
    }
}
