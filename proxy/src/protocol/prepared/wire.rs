//! The messages spillway writes for statements on a server connection, the
//! server-side names it gives them, and the queue they are written into (`Rewrite`).

use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::OnceLock;

use bytes::{BufMut, Bytes, BytesMut};

use super::super::frontend::PARSE;

/// Prefix of server-side statement names.
pub(super) const PREFIX: &str = "sw_";

/// A statement name that never exists on a server connection: closing it is a no-op
/// PostgreSQL answers with CloseComplete.
pub(super) const NOWHERE: &str = "sw_none";

/// The server-side name of a statement: `sw_` and a 128-bit hash of its text and
/// parameter types, keyed per process (a client cannot aim a collision at another's
/// statement).
pub fn server_name(sql: &str, param_types: &[u8]) -> String {
    static KEYS: OnceLock<(RandomState, RandomState)> = OnceLock::new();
    let (a, b) = KEYS.get_or_init(|| (RandomState::new(), RandomState::new()));
    let hash = |state: &RandomState| {
        let mut h = state.build_hasher();
        h.write(sql.as_bytes());
        h.write_u8(0xff);
        h.write(param_types);
        h.finish()
    };
    format!("{PREFIX}{:016x}{:016x}", hash(a), hash(b))
}

/// A Parse of `name` with `sql` and the raw parameter types.
pub(super) fn parse_message(name: &str, sql: &str, param_types: &[u8]) -> Bytes {
    let len = 4 + name.len() + 1 + sql.len() + 1 + 2 + param_types.len();
    let mut m = BytesMut::with_capacity(1 + len);
    m.put_u8(PARSE);
    m.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    put_cstr(&mut m, name);
    put_cstr(&mut m, sql);
    m.put_u16(u16::try_from(param_types.len() / 4).unwrap_or(u16::MAX));
    m.extend_from_slice(param_types);
    m.freeze()
}

/// A Describe or Close (`tag`) of `kind` (`S` or `P`) `name`.
pub(super) fn write_target(out: &mut BytesMut, tag: u8, kind: u8, name: &str) {
    out.put_u8(tag);
    out.put_u32(u32::try_from(4 + 1 + name.len() + 1).unwrap_or(u32::MAX));
    out.put_u8(kind);
    put_cstr(out, name);
}

pub(super) fn put_cstr(out: &mut BytesMut, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.put_u8(0);
}

/// A queue being translated (`Translator::translate`): the messages read so far,
/// and the rewritten queue once a message changed.
pub(super) struct Rewrite<'a> {
    /// The queue as the client's messages left it.
    pub(super) src: &'a [u8],
    /// The queue rewritten, up to `copied` of `src`; `None` while nothing changed.
    pub(super) out: Option<BytesMut>,
    /// The buffer `out` starts from.
    pub(super) spare: BytesMut,
    /// How much of `src` is in `out` (or is replaced there).
    pub(super) copied: usize,
    /// The message being translated starts here.
    pub(super) at: usize,
}

impl Rewrite<'_> {
    /// Where what replaces or precedes the current message is written: the
    /// rewritten queue, brought up to the current message first.
    pub(super) fn out(&mut self) -> &mut BytesMut {
        let out = self
            .out
            .get_or_insert_with(|| std::mem::take(&mut self.spare));
        out.extend_from_slice(&self.src[self.copied..self.at]);
        self.copied = self.at;
        out
    }
}
