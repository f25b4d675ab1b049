//! Committed row changes, as the change stream reports them (PostgreSQL's logical
//! replication, `cache.invalidation = "replication"`), and who consumes them: the read
//! cache (per-row and per-table invalidation) and the write side's key index (which
//! primary keys exist). The proxy decodes the stream and hands each committed
//! transaction to every [`ChangeSink`]; this module is the contract between them and
//! knows nothing of the wire.
//!
//! Invariants:
//! - A [`Commit`] is delivered whole, in commit order, and only after PostgreSQL
//!   committed it; a sink never sees part of a transaction.
//! - Keys are canonical text ([`canonical_key`]: integers in decimal, uuids lower-case
//!   with dashes, text as is), one entry per primary-key column in key order. The
//!   write side's key overlay, the read cache's point reads and this stream use the
//!   same function (the stream's text is PostgreSQL's output form, which is already
//!   canonical for those types), so one row has one key whichever way it is named. A change
//!   whose key is not known (no replica identity, a column that was not sent) is
//!   [`Change::Table`]: consumers treat the whole table as changed.
//! - After [`ChangeSink::lost`], nothing a sink derived from the stream may be trusted
//!   until [`ChangeSink::resumed`]: the stream may have skipped changes.

/// A table as the stream names it: its OID and `schema.name` (unquoted, as in the
/// config's `[tables."schema.name"]`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableRef {
    pub oid: u32,
    pub name: String,
}

/// One change of a committed transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A row was inserted with this key.
    Insert { table: TableRef, key: Vec<String> },
    /// A row was updated; `old_key` when the update changed the key itself.
    Update {
        table: TableRef,
        key: Vec<String>,
        old_key: Option<Vec<String>>,
    },
    /// The row with this key was deleted.
    Delete { table: TableRef, key: Vec<String> },
    /// Rows of the table changed in ways whose keys are not known (TRUNCATE, a
    /// table without a usable replica identity, a relation whose shape changed).
    Table { table: TableRef },
}

impl Change {
    pub fn table(&self) -> &TableRef {
        match self {
            Change::Insert { table, .. }
            | Change::Update { table, .. }
            | Change::Delete { table, .. }
            | Change::Table { table } => table,
        }
    }
}

/// One committed transaction of one database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub database: String,
    /// The commit's end position in the WAL (the slot may be confirmed up to it once
    /// every sink has taken the commit).
    pub lsn: u64,
    /// The transaction's id as pgoutput's Begin carries it (the low 32 bits of its
    /// `xid8`): the read cache recognises spillway's own flushes by it (ADR 0036).
    pub xid: u32,
    /// The transaction was a flush of spillway's (it advanced spillway's flush
    /// ledger): the key index expects its changes.
    pub own: bool,
    pub changes: Vec<Change>,
}

/// A consumer of the change stream. Calls come from the stream's task, one at a
/// time per database; implementations must not block for long (they run before the
/// slot's position may advance).
pub trait ChangeSink: Send + Sync {
    /// A committed transaction.
    fn committed(&self, commit: &Commit);
    /// The stream of `database` stopped or fell behind its bound: changes may be
    /// missed from now on.
    fn lost(&self, database: &str);
    /// The stream of `database` is following again from a position after which no
    /// change was missed (everything derived before [`ChangeSink::lost`] must be
    /// rebuilt or dropped by the sink itself).
    fn resumed(&self, database: &str);
    /// The stream of `database` delivered every transaction that committed before
    /// WAL position `lsn`: an idle stream says so without a commit (a sink waiting
    /// for the stream to pass a position need not wait for unrelated traffic).
    fn passed(&self, database: &str, lsn: u64) {
        let _ = (database, lsn);
    }
}

/// Type OIDs of the primary-key columns whose keys have a canonical form.
pub mod key_types {
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const VARCHAR: u32 = 1043;
    pub const UUID: u32 = 2950;
}

/// A key value that is not a value of its type.
pub const BAD_KEY_VALUE: &str = "parameter_value";
/// Keys of this type have no canonical form spillway knows.
pub const KEY_TYPE: &str = "key_type";

/// The canonical text of a primary-key value of type `type_oid` given as text, or
/// `Err` when keys of that type have no canonical form spillway knows.
pub fn canonical_key(text: &str, type_oid: u32) -> Result<String, &'static str> {
    use key_types::{INT2, INT4, INT8, TEXT, UUID, VARCHAR};
    match type_oid {
        INT2 | INT4 | INT8 => text
            .trim()
            .parse::<i64>()
            .map(|v| v.to_string())
            .map_err(|_| BAD_KEY_VALUE),
        TEXT | VARCHAR => Ok(text.to_owned()),
        UUID => {
            let hex: String = text
                .trim()
                .trim_start_matches('{')
                .trim_end_matches('}')
                .chars()
                .filter(|c| *c != '-')
                .collect();
            if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(BAD_KEY_VALUE);
            }
            let bytes: Vec<u8> = (0..16)
                .filter_map(|i| u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok())
                .collect();
            Ok(uuid_text(&bytes))
        }
        _ => Err(KEY_TYPE),
    }
}

/// The canonical text of a key value sent in binary format as a value of type
/// `type_oid` (the parameter's type, which may differ from the column's: an int8
/// parameter compared with an int4 key).
pub fn canonical_binary_key(bytes: &[u8], type_oid: u32) -> Result<String, &'static str> {
    use key_types::{INT2, INT4, INT8, TEXT, UUID, VARCHAR};
    let int = |b: &[u8]| -> Option<i64> {
        Some(match b.len() {
            2 => i64::from(i16::from_be_bytes(b.try_into().ok()?)),
            4 => i64::from(i32::from_be_bytes(b.try_into().ok()?)),
            8 => i64::from_be_bytes(b.try_into().ok()?),
            _ => return None,
        })
    };
    let width = match type_oid {
        INT2 => 2,
        INT4 => 4,
        INT8 => 8,
        UUID => 16,
        TEXT | VARCHAR => {
            return std::str::from_utf8(bytes)
                .map(str::to_owned)
                .map_err(|_| BAD_KEY_VALUE);
        }
        _ => return Err(KEY_TYPE),
    };
    if bytes.len() != width {
        return Err(BAD_KEY_VALUE);
    }
    if type_oid == UUID {
        return Ok(uuid_text(bytes));
    }
    int(bytes).map(|v| v.to_string()).ok_or(BAD_KEY_VALUE)
}

fn uuid_text(b: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        let _ = write!(s, "{byte:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::key_types::*;
    use super::*;

    #[test]
    fn text_and_binary_spellings_of_one_key_agree() {
        assert_eq!(canonical_key(" 007", INT4), Ok("7".into()));
        assert_eq!(canonical_key("-0", INT8), Ok("0".into()));
        assert_eq!(canonical_key("+5", INT2), Ok("5".into()));
        assert!(canonical_key("1.5", INT4).is_err());
        assert!(canonical_key("5.0", INT4).is_err());
        assert_eq!(
            canonical_binary_key(&7i32.to_be_bytes(), INT4),
            Ok("7".into())
        );
        assert_eq!(
            canonical_binary_key(&7i64.to_be_bytes(), INT8),
            Ok("7".into())
        );
        assert_eq!(
            canonical_binary_key(&(-7i16).to_be_bytes(), INT2),
            Ok("-7".into())
        );
        assert!(canonical_binary_key(&7i32.to_be_bytes(), INT8).is_err());
        let u = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
        assert_eq!(
            canonical_key("{A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11}", UUID),
            Ok(u.into())
        );
        let raw: Vec<u8> = (0..16)
            .map(|i| u8::from_str_radix(&u.replace('-', "")[i * 2..i * 2 + 2], 16).expect("hex"))
            .collect();
        assert_eq!(canonical_binary_key(&raw, UUID), Ok(u.into()));
        assert_eq!(canonical_key("x ", TEXT), Ok("x ".into()));
        assert_eq!(canonical_binary_key(b"x ", VARCHAR), Ok("x ".into()));
        assert_eq!(canonical_key("1.0", 1700), Err(KEY_TYPE));
    }
}
