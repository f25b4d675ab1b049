//! The wire answer of a deferred write with RETURNING (SPEC §6): where the
//! RowDescription and DataRows go among the answers an acknowledged statement gets.
//!
//! The extended cycle's answers before the command tag are built as if the
//! statement returned no rows (ParseComplete, BindComplete, ParameterDescription,
//! NoData); this module turns them into what PostgreSQL sends for a row-returning
//! statement, without knowing anything else of the cycle:
//! - a NoData right after a ParameterDescription answers Describe of the statement:
//!   RowDescription with every format 0 (PostgreSQL does not know the Bind yet);
//! - any other NoData answers Describe of the portal: RowDescription with the Bind's
//!   result formats;
//! - a simple Query gets a RowDescription first, even when no row is returned;
//! - the DataRows of the written rows come last, just before the command tag.
//!
//! On an error (a duplicate key), PostgreSQL has answered the Describes already but
//! sends no RowDescription for a simple Query: [`answers`] with `written = None`.

use bytes::BytesMut;

use crate::write::returning::Returning;

/// `before` (the answers preceding the command tag or error) for a statement whose
/// RETURNING is `returning`; `written`: the rows the write reported, or `None` when
/// it failed.
pub(super) fn answers(
    returning: &Returning,
    before: &[u8],
    extended: bool,
    written: Option<usize>,
) -> BytesMut {
    let mut out = BytesMut::with_capacity(before.len() + 64);
    if extended {
        let mut previous = 0u8;
        let mut rest = before;
        while let Some(msg) = next_message(rest) {
            rest = &rest[msg.len()..];
            match msg[0] {
                b'n' if previous == b't' => {
                    out.extend_from_slice(&returning.row_description(false));
                }
                b'n' => out.extend_from_slice(&returning.row_description(true)),
                _ => out.extend_from_slice(msg),
            }
            previous = msg[0];
        }
        // Not a sequence of messages: left as built (never the case for answers
        // the session builds).
        out.extend_from_slice(rest);
    } else {
        out.extend_from_slice(before);
        if written.is_some() {
            out.extend_from_slice(&returning.row_description(false));
        }
    }
    if let Some(n) = written {
        out.extend_from_slice(&returning.data_rows(n));
    }
    out
}

/// The first whole message of `buf` (a length below 4 is not one).
fn next_message(buf: &[u8]) -> Option<&[u8]> {
    let len = buf.get(1..5)?;
    let len = usize::try_from(i32::from_be_bytes([len[0], len[1], len[2], len[3]])).ok()?;
    if len < 4 {
        return None;
    }
    buf.get(..len + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frontend;

    /// The tags of `buf`'s messages, and the format code of its RowDescriptions.
    fn shape(buf: &[u8]) -> (String, Vec<u8>) {
        let mut tags = String::new();
        let mut formats = Vec::new();
        let mut rest = buf;
        while let Some(m) = next_message(rest) {
            tags.push(char::from(m[0]));
            if m[0] == b'T' {
                // One field: the format code is the last two bytes.
                formats.push(m[m.len() - 1]);
            }
            rest = &rest[m.len()..];
        }
        assert!(rest.is_empty(), "trailing bytes");
        (tags, formats)
    }

    fn before(parts: &[&[u8]]) -> BytesMut {
        BytesMut::from(parts.concat().as_slice())
    }

    #[test]
    fn answers_take_postgres_order() {
        let r = Returning::for_tests(1);
        let describe_statement: &[u8] = b"t\0\0\0\x06\0\0";
        // Describe of the portal: the Bind's (binary) format.
        let portal = before(&[
            frontend::PARSE_COMPLETE,
            frontend::BIND_COMPLETE,
            frontend::NO_DATA,
        ]);
        let out = answers(&r, &portal, true, Some(2));
        assert_eq!(shape(&out), ("12TDD".into(), vec![1]));
        // Describe of the statement: format 0, whatever the Bind says.
        let statement = before(&[
            frontend::PARSE_COMPLETE,
            describe_statement,
            frontend::NO_DATA,
            frontend::BIND_COMPLETE,
        ]);
        let out = answers(&r, &statement, true, Some(1));
        assert_eq!(shape(&out), ("1tT2D".into(), vec![0]));
        // No Describe: rows only; an error: the Describe answers only.
        let out = answers(&r, &before(&[frontend::BIND_COMPLETE]), true, Some(2));
        assert_eq!(shape(&out).0, "2DD");
        let out = answers(&r, &portal, true, None);
        assert_eq!(shape(&out), ("12T".into(), vec![1]));
        // Simple Query: RowDescription (text) even for no row; nothing on an error.
        assert_eq!(
            shape(&answers(&r, &[], false, Some(0))),
            ("T".into(), vec![0])
        );
        assert_eq!(shape(&answers(&r, &[], false, Some(2))).0, "TDD");
        assert!(answers(&r, &[], false, None).is_empty());
    }

    #[test]
    fn messages_are_split_by_their_length() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(frontend::PARSE_COMPLETE);
        buf.extend_from_slice(b"t\0\0\0\x06\0\0");
        buf.extend_from_slice(frontend::NO_DATA);
        let first = next_message(&buf).expect("one");
        assert_eq!(first, frontend::PARSE_COMPLETE);
        let second = next_message(&buf[5..]).expect("two");
        assert_eq!(second, b"t\0\0\0\x06\0\0");
        assert_eq!(next_message(&buf[12..]), Some(frontend::NO_DATA));
        assert_eq!(next_message(b"n\0\0"), None);
        assert_eq!(next_message(b"n\0\0\0\x09"), None);
        assert_eq!(next_message(b"n\0\0\0\x02"), None);
    }
}
