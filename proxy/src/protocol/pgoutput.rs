//! PostgreSQL's logical replication messages (the `pgoutput` plugin, protocol
//! version 1), decoded without I/O (ADR 0024).
//!
//! Each message arrives whole: one row of `pg_logical_slot_peek_binary_changes`, or
//! one XLogData payload of a streaming replication connection. So the decoder takes a
//! whole message ([`decode`]) or, in the layer's usual shape, consumes a whole buffer
//! ([`parse`]); there is no "need more bytes" state. A message it does not need is
//! [`Message::Other`] (its tag kept for the log).
//!
//! Invariant: never panics, whatever the bytes: every read is bounds-checked and every
//! count is checked against the bytes left before anything is allocated for it (a
//! fuzz target feeds it arbitrary input).

use bytes::BytesMut;
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PgOutputError {
    #[error("pgoutput message truncated: {0}")]
    Truncated(&'static str),
    #[error("pgoutput message of tag {tag:?} has {left} unread bytes")]
    Trailing { tag: char, left: usize },
    #[error("pgoutput tuple column of unknown kind {0:?}")]
    ColumnKind(char),
    #[error("pgoutput {0} has an unexpected tuple marker {1:?}")]
    TupleMarker(&'static str, char),
    #[error("pgoutput string is not UTF-8")]
    Utf8,
    #[error("empty pgoutput message")]
    Empty,
}

/// One column of a row as pgoutput sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// A TOASTed value that did not change (not sent).
    Unchanged,
    /// The column's text output.
    Text(String),
    /// The column's binary output (protocol 2+ with `binary`; kept opaque).
    Binary(Vec<u8>),
}

/// A relation's description, sent before its first change in a session and again
/// after it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// `d` default (primary key), `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity (the key).
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
}

/// The old row of an UPDATE or DELETE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Old {
    /// `K`: the replica identity's columns only (others null).
    Key(Vec<Value>),
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Row(Vec<Value>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin {
        final_lsn: u64,
        /// Microseconds since 2000-01-01.
        commit_time: i64,
        xid: u32,
    },
    Commit {
        lsn: u64,
        end_lsn: u64,
        commit_time: i64,
    },
    Relation(Relation),
    Insert {
        rel: u32,
        new: Vec<Value>,
    },
    Update {
        rel: u32,
        old: Option<Old>,
        new: Vec<Value>,
    },
    Delete {
        rel: u32,
        old: Old,
    },
    Truncate {
        rels: Vec<u32>,
    },
    /// Origin, Type, logical decoding messages and anything newer: nothing to act on.
    Other(u8),
}

/// Decodes the whole buffer as one message and empties it.
pub fn parse(buf: &mut BytesMut) -> Result<Option<Message>, PgOutputError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let bytes = buf.split();
    decode(&bytes).map(Some)
}

/// Decodes one whole message.
pub fn decode(bytes: &[u8]) -> Result<Message, PgOutputError> {
    let (&tag, rest) = bytes.split_first().ok_or(PgOutputError::Empty)?;
    let mut r = Reader(rest);
    let msg = match tag {
        b'B' => Message::Begin {
            final_lsn: r.u64("begin lsn")?,
            commit_time: r.i64("begin time")?,
            xid: r.u32("begin xid")?,
        },
        b'C' => {
            r.u8("commit flags")?;
            Message::Commit {
                lsn: r.u64("commit lsn")?,
                end_lsn: r.u64("commit end lsn")?,
                commit_time: r.i64("commit time")?,
            }
        }
        b'R' => relation(&mut r)?,
        b'I' => {
            let rel = r.u32("insert relation")?;
            match r.u8("insert marker")? {
                b'N' => Message::Insert {
                    rel,
                    new: tuple(&mut r)?,
                },
                m => return Err(PgOutputError::TupleMarker("insert", char::from(m))),
            }
        }
        b'U' => {
            let rel = r.u32("update relation")?;
            let (old, marker) = match r.u8("update marker")? {
                b'K' => (Some(Old::Key(tuple(&mut r)?)), r.u8("update marker")?),
                b'O' => (Some(Old::Row(tuple(&mut r)?)), r.u8("update marker")?),
                m => (None, m),
            };
            if marker != b'N' {
                return Err(PgOutputError::TupleMarker("update", char::from(marker)));
            }
            Message::Update {
                rel,
                old,
                new: tuple(&mut r)?,
            }
        }
        b'D' => {
            let rel = r.u32("delete relation")?;
            let old = match r.u8("delete marker")? {
                b'K' => Old::Key(tuple(&mut r)?),
                b'O' => Old::Row(tuple(&mut r)?),
                m => return Err(PgOutputError::TupleMarker("delete", char::from(m))),
            };
            Message::Delete { rel, old }
        }
        b'T' => {
            let n = r.u32("truncate count")?;
            r.u8("truncate options")?;
            let n = r.count(n, 4, "truncate relations")?;
            let mut rels = Vec::with_capacity(n);
            for _ in 0..n {
                rels.push(r.u32("truncate relation")?);
            }
            Message::Truncate { rels }
        }
        other => return Ok(Message::Other(other)),
    };
    if !r.0.is_empty() {
        return Err(PgOutputError::Trailing {
            tag: char::from(tag),
            left: r.0.len(),
        });
    }
    Ok(msg)
}

fn relation(r: &mut Reader<'_>) -> Result<Message, PgOutputError> {
    let oid = r.u32("relation oid")?;
    let schema = r.cstr("relation schema")?;
    let name = r.cstr("relation name")?;
    let replica_identity = r.u8("replica identity")?;
    let n = r.u16("relation columns")?;
    // Each column takes at least 10 bytes (flags, an empty name, type, typmod).
    let n = r.count(u32::from(n), 10, "relation columns")?;
    let mut columns = Vec::with_capacity(n);
    for _ in 0..n {
        let flags = r.u8("column flags")?;
        let name = r.cstr("column name")?;
        let type_oid = r.u32("column type")?;
        r.u32("column typmod")?;
        columns.push(Column {
            key: flags & 1 == 1,
            name,
            type_oid,
        });
    }
    Ok(Message::Relation(Relation {
        oid,
        schema,
        name,
        replica_identity,
        columns,
    }))
}

fn tuple(r: &mut Reader<'_>) -> Result<Vec<Value>, PgOutputError> {
    let n = r.u16("tuple columns")?;
    let n = r.count(u32::from(n), 1, "tuple columns")?;
    let mut values = Vec::with_capacity(n);
    for _ in 0..n {
        values.push(match r.u8("column kind")? {
            b'n' => Value::Null,
            b'u' => Value::Unchanged,
            b't' => {
                let bytes = r.sized("text column")?;
                Value::Text(String::from_utf8(bytes.to_vec()).map_err(|_| PgOutputError::Utf8)?)
            }
            b'b' => Value::Binary(r.sized("binary column")?.to_vec()),
            k => return Err(PgOutputError::ColumnKind(char::from(k))),
        });
    }
    Ok(values)
}

/// Bounds-checked big-endian reads.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], PgOutputError> {
        if self.0.len() < n {
            return Err(PgOutputError::Truncated(what));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], PgOutputError> {
        let bytes = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, PgOutputError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, PgOutputError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, PgOutputError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, PgOutputError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, PgOutputError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    /// `n` items of at least `min` bytes each must fit in what is left.
    fn count(&self, n: u32, min: usize, what: &'static str) -> Result<usize, PgOutputError> {
        let n = usize::try_from(n).map_err(|_| PgOutputError::Truncated(what))?;
        if n.saturating_mul(min) > self.0.len() {
            return Err(PgOutputError::Truncated(what));
        }
        Ok(n)
    }

    fn sized(&mut self, what: &'static str) -> Result<&'a [u8], PgOutputError> {
        let len = self.u32(what)?;
        let len = usize::try_from(len).map_err(|_| PgOutputError::Truncated(what))?;
        self.take(len, what)
    }

    fn cstr(&mut self, what: &'static str) -> Result<String, PgOutputError> {
        let end = self
            .0
            .iter()
            .position(|&b| b == 0)
            .ok_or(PgOutputError::Truncated(what))?;
        let s = std::str::from_utf8(self.take(end, what)?).map_err(|_| PgOutputError::Utf8)?;
        self.take(1, what)?;
        Ok(s.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relation_bytes() -> Vec<u8> {
        let mut b = vec![b'R'];
        b.extend(16_384u32.to_be_bytes());
        b.extend(b"public\0items\0d");
        b.extend(2u16.to_be_bytes());
        b.push(1);
        b.extend(b"id\0");
        b.extend(23u32.to_be_bytes());
        b.extend((-1i32).to_be_bytes());
        b.push(0);
        b.extend(b"name\0");
        b.extend(25u32.to_be_bytes());
        b.extend((-1i32).to_be_bytes());
        b
    }

    fn tuple_bytes(values: &[Option<&str>]) -> Vec<u8> {
        let mut b = u16::try_from(values.len())
            .expect("test input")
            .to_be_bytes()
            .to_vec();
        for v in values {
            match v {
                None => b.push(b'n'),
                Some(s) => {
                    b.push(b't');
                    b.extend(u32::try_from(s.len()).expect("test input").to_be_bytes());
                    b.extend(s.as_bytes());
                }
            }
        }
        b
    }

    #[test]
    fn decodes_a_relation() {
        let Message::Relation(rel) = decode(&relation_bytes()).expect("test input") else {
            panic!("not a relation");
        };
        assert_eq!(rel.oid, 16_384);
        assert_eq!(
            (rel.schema.as_str(), rel.name.as_str()),
            ("public", "items")
        );
        assert_eq!(rel.replica_identity, b'd');
        assert!(rel.columns[0].key && !rel.columns[1].key);
        assert_eq!(rel.columns[1].name, "name");
    }

    #[test]
    fn decodes_row_changes() {
        let mut ins = vec![b'I'];
        ins.extend(7u32.to_be_bytes());
        ins.push(b'N');
        ins.extend(tuple_bytes(&[Some("1"), Some("a")]));
        assert_eq!(
            decode(&ins).expect("test input"),
            Message::Insert {
                rel: 7,
                new: vec![Value::Text("1".into()), Value::Text("a".into())]
            }
        );
        let mut upd = vec![b'U'];
        upd.extend(7u32.to_be_bytes());
        upd.push(b'K');
        upd.extend(tuple_bytes(&[Some("1"), None]));
        upd.push(b'N');
        upd.extend(tuple_bytes(&[Some("2"), Some("b")]));
        let Message::Update {
            old: Some(Old::Key(old)),
            new,
            ..
        } = decode(&upd).expect("test input")
        else {
            panic!("not an update with its old key");
        };
        assert_eq!(old[0], Value::Text("1".into()));
        assert_eq!(new[0], Value::Text("2".into()));
        let mut del = vec![b'D'];
        del.extend(7u32.to_be_bytes());
        del.push(b'K');
        del.extend(tuple_bytes(&[Some("2"), None]));
        assert!(matches!(
            decode(&del).expect("test input"),
            Message::Delete {
                rel: 7,
                old: Old::Key(_)
            }
        ));
        let mut tr = vec![b'T'];
        tr.extend(2u32.to_be_bytes());
        tr.push(0);
        tr.extend(7u32.to_be_bytes());
        tr.extend(8u32.to_be_bytes());
        assert_eq!(
            decode(&tr).expect("test input"),
            Message::Truncate { rels: vec![7, 8] }
        );
    }

    #[test]
    fn decodes_begin_and_commit() {
        let mut b = vec![b'B'];
        b.extend(100u64.to_be_bytes());
        b.extend(5i64.to_be_bytes());
        b.extend(9u32.to_be_bytes());
        assert_eq!(
            decode(&b).expect("test input"),
            Message::Begin {
                final_lsn: 100,
                commit_time: 5,
                xid: 9
            }
        );
        let mut c = vec![b'C', 0];
        c.extend(100u64.to_be_bytes());
        c.extend(120u64.to_be_bytes());
        c.extend(5i64.to_be_bytes());
        let mut buf = BytesMut::from(&c[..]);
        assert_eq!(
            parse(&mut buf).expect("test input"),
            Some(Message::Commit {
                lsn: 100,
                end_lsn: 120,
                commit_time: 5
            })
        );
        assert!(buf.is_empty());
        assert_eq!(parse(&mut buf).expect("test input"), None);
    }

    #[test]
    fn bad_input_is_an_error_never_a_panic() {
        let mut samples = vec![relation_bytes()];
        let mut upd = vec![b'U'];
        upd.extend(7u32.to_be_bytes());
        upd.push(b'O');
        upd.extend(tuple_bytes(&[Some("1"), None]));
        upd.push(b'N');
        upd.extend(tuple_bytes(&[Some("2"), Some("b")]));
        samples.push(upd);
        for sample in &samples {
            // Every truncation, and every single-byte corruption.
            for len in 0..sample.len() {
                assert!(decode(&sample[..len]).is_err() || len == 0 && sample.is_empty());
            }
            for i in 0..sample.len() {
                for byte in [0u8, 0x7f, 0xff] {
                    let mut bad = sample.clone();
                    bad[i] = byte;
                    let _ = decode(&bad);
                }
            }
        }
        // Huge counts with nothing behind them allocate nothing.
        let mut t = vec![b'T'];
        t.extend(u32::MAX.to_be_bytes());
        t.push(0);
        assert_eq!(
            decode(&t),
            Err(PgOutputError::Truncated("truncate relations"))
        );
        let mut i = vec![b'I'];
        i.extend(1u32.to_be_bytes());
        i.push(b'N');
        i.extend(u16::MAX.to_be_bytes());
        assert!(decode(&i).is_err());
        assert_eq!(decode(b"Yanything"), Ok(Message::Other(b'Y')));
    }
}
