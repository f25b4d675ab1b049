//! The compact sets the key index keeps per deferred table, one form per kind of
//! primary key: a roaring bitmap for one integer column (a dense serial key costs a
//! few bits per key), a sorted vector of 16-byte values for one uuid column (with small
//! hash sets of changes since it was last merged), and a hash set of the canonical
//! text for every other key spillway has a canonical form for (several columns, text,
//! varchar).
//!
//! Invariants:
//! - A [`Key`] is built only from the canonical text of a key (`changes.rs`): two
//!   spellings of one key are one [`Key`], so a set never holds a key twice.
//! - In [`SortedSet`], `added` and `base` are disjoint and `removed` is a subset of
//!   `base`; `base` is sorted and has no duplicates.
//! - [`KeySet::bytes`] is an estimate of the heap the set holds (capacity, not length),
//!   never below what it holds; the bound of `key_index.max_bytes` is checked on it.

use std::collections::HashSet;

use roaring::RoaringTreemap;

use crate::engine::DeferredTable;

pub const INT8: u32 = 20;
pub const INT2: u32 = 21;
pub const INT4: u32 = 23;
pub const TEXT: u32 = 25;
pub const VARCHAR: u32 = 1043;
pub const UUID: u32 = 2950;

/// The form a table's keys take in the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// One int2/int4/int8 column.
    Int,
    /// One uuid column.
    Uuid,
    /// Any number of int, uuid, text or varchar columns, as their canonical text.
    Text,
}

impl KeyKind {
    /// The kind of `table`'s primary key, or `None` when one of its columns has a type
    /// without a canonical form (its exact counts stay point reads).
    pub fn of(table: &DeferredTable) -> Option<KeyKind> {
        let oids: Option<Vec<u32>> = table
            .meta
            .key
            .iter()
            .map(|c| table.type_oids.get(c).copied())
            .collect();
        match oids?.as_slice() {
            [INT2 | INT4 | INT8] => Some(KeyKind::Int),
            [UUID] => Some(KeyKind::Uuid),
            cols if !cols.is_empty()
                && cols
                    .iter()
                    .all(|o| matches!(*o, INT2 | INT4 | INT8 | UUID | TEXT | VARCHAR)) =>
            {
                Some(KeyKind::Text)
            }
            _ => None,
        }
    }
}

/// One primary key in the form of its table's [`KeyKind`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    Int(i64),
    Uuid(u128),
    /// The canonical text of each column, joined by NUL (which no PostgreSQL text value
    /// contains).
    Text(Box<str>),
}

impl Key {
    /// The key whose canonical text is `key` (one entry per key column), or `None`
    /// when it does not fit `kind`.
    pub fn parse(kind: KeyKind, key: &[String]) -> Option<Key> {
        match (kind, key) {
            (KeyKind::Int, [k]) => k.parse().ok().map(Key::Int),
            (KeyKind::Uuid, [k]) => parse_uuid(k).map(Key::Uuid),
            (KeyKind::Text, cols) if !cols.is_empty() && !cols.iter().any(|c| c.contains('\0')) => {
                Some(Key::Text(cols.join("\0").into_boxed_str()))
            }
            _ => None,
        }
    }
}

/// A uuid in canonical text (or any spelling of 32 hex digits and dashes) as the
/// 128-bit number whose order is PostgreSQL's (bytes compared in order).
pub fn parse_uuid(text: &str) -> Option<u128> {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(&hex, 16).ok()
}

/// Where loading stopped: the last key read (keyset pagination goes on after it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cursor {
    Int(i64),
    Uuid(u128),
    /// The canonical text of each key column.
    Text(Vec<String>),
}

/// Keys read by one loading query, in key order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    Int(Vec<i64>),
    Uuid(Vec<u128>),
    Text(Vec<Vec<String>>),
}

impl Chunk {
    pub fn len(&self) -> usize {
        match self {
            Chunk::Int(v) => v.len(),
            Chunk::Uuid(v) => v.len(),
            Chunk::Text(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cursor after this chunk, if it has keys.
    pub fn last(&self) -> Option<Cursor> {
        match self {
            Chunk::Int(v) => v.last().copied().map(Cursor::Int),
            Chunk::Uuid(v) => v.last().copied().map(Cursor::Uuid),
            Chunk::Text(v) => v.last().cloned().map(Cursor::Text),
        }
    }

    /// The chunk's keys as [`Key`]s of `kind` (those that do not fit are left out).
    pub fn keys(self, kind: KeyKind) -> Vec<Key> {
        match self {
            Chunk::Int(v) => v.into_iter().map(Key::Int).collect(),
            Chunk::Uuid(v) => v.into_iter().map(Key::Uuid).collect(),
            Chunk::Text(v) => v.iter().filter_map(|k| Key::parse(kind, k)).collect(),
        }
    }
}

/// An `i64` in the order-preserving `u64` a roaring bitmap holds.
fn int_slot(v: i64) -> u64 {
    v.cast_unsigned() ^ (1 << 63)
}

/// The keys of one table.
pub enum KeySet {
    Int(RoaringTreemap),
    Uuid(SortedSet),
    Text(TextSet),
}

impl KeySet {
    pub fn new(kind: KeyKind) -> Self {
        match kind {
            KeyKind::Int => KeySet::Int(RoaringTreemap::new()),
            KeyKind::Uuid => KeySet::Uuid(SortedSet::default()),
            KeyKind::Text => KeySet::Text(TextSet::default()),
        }
    }

    pub fn contains(&self, key: &Key) -> bool {
        match (self, key) {
            (KeySet::Int(s), Key::Int(v)) => s.contains(int_slot(*v)),
            (KeySet::Uuid(s), Key::Uuid(v)) => s.contains(*v),
            (KeySet::Text(s), Key::Text(v)) => s.keys.contains(v),
            _ => false,
        }
    }

    pub fn insert(&mut self, key: Key) {
        match (self, key) {
            (KeySet::Int(s), Key::Int(v)) => {
                s.insert(int_slot(v));
            }
            (KeySet::Uuid(s), Key::Uuid(v)) => s.insert(v),
            (KeySet::Text(s), Key::Text(v)) => s.insert(v),
            _ => {}
        }
    }

    pub fn remove(&mut self, key: &Key) {
        match (self, key) {
            (KeySet::Int(s), Key::Int(v)) => {
                s.remove(int_slot(*v));
            }
            (KeySet::Uuid(s), Key::Uuid(v)) => s.remove(*v),
            (KeySet::Text(s), Key::Text(v)) => s.remove(v),
            _ => {}
        }
    }

    pub fn len(&self) -> u64 {
        match self {
            KeySet::Int(s) => s.len(),
            KeySet::Uuid(s) => s.len() as u64,
            KeySet::Text(s) => s.keys.len() as u64,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Estimated heap bytes.
    pub fn bytes(&self) -> usize {
        match self {
            // The serialized form is the containers' own size plus a few bytes each;
            // in memory every container also has a small header.
            KeySet::Int(s) => s.serialized_size() + 64,
            KeySet::Uuid(s) => s.bytes(),
            KeySet::Text(s) => s.bytes(),
        }
    }

    /// Loading is done: let go of spare capacity (and turn runs of an integer key into
    /// run containers).
    pub fn shrink(&mut self) {
        match self {
            KeySet::Int(s) => {
                s.optimize();
            }
            KeySet::Uuid(s) => s.compact(),
            KeySet::Text(s) => s.keys.shrink_to_fit(),
        }
    }
}

/// Bytes one entry of a `HashSet<T>` costs: the value and one control byte, at the
/// table's capacity.
const fn hashed<T>() -> usize {
    std::mem::size_of::<T>() + 1
}

/// 128-bit values: a sorted vector (16 bytes a key) and the changes since it was last
/// merged.
#[derive(Default)]
pub struct SortedSet {
    base: Vec<u128>,
    added: HashSet<u128>,
    removed: HashSet<u128>,
}

impl SortedSet {
    fn in_base(&self, v: u128) -> bool {
        self.base.binary_search(&v).is_ok()
    }

    pub fn contains(&self, v: u128) -> bool {
        self.added.contains(&v) || (self.in_base(v) && !self.removed.contains(&v))
    }

    pub fn insert(&mut self, v: u128) {
        // Loading reads keys in order: they go to the end of `base` directly.
        if self.base.last().is_none_or(|last| *last < v) && !self.added.contains(&v) {
            self.base.push(v);
            return;
        }
        if self.in_base(v) {
            self.removed.remove(&v);
        } else {
            self.added.insert(v);
            self.maybe_compact();
        }
    }

    pub fn remove(&mut self, v: u128) {
        if !self.added.remove(&v) && self.in_base(v) {
            self.removed.insert(v);
            self.maybe_compact();
        }
    }

    pub fn len(&self) -> usize {
        self.base.len() - self.removed.len() + self.added.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn bytes(&self) -> usize {
        self.base.capacity() * 16
            + (self.added.capacity() + self.removed.capacity()) * hashed::<u128>()
    }

    /// Merges the changes into `base` once they are a sixteenth of it (at least 4096):
    /// lookups stay a binary search and two hash probes, and a merge's cost is spread
    /// over the changes that made it due.
    fn maybe_compact(&mut self) {
        if self.added.len() + self.removed.len() > (self.base.len() / 16).max(4096) {
            self.compact();
        }
    }

    fn compact(&mut self) {
        let mut added: Vec<u128> = self.added.drain().collect();
        added.sort_unstable();
        let removed = std::mem::take(&mut self.removed);
        let old = std::mem::take(&mut self.base);
        let mut merged = Vec::with_capacity(old.len() - removed.len() + added.len());
        let mut add = added.into_iter().peekable();
        for v in old.into_iter().filter(|v| !removed.contains(v)) {
            while let Some(a) = add.next_if(|a| *a < v) {
                merged.push(a);
            }
            merged.push(v);
        }
        merged.extend(add);
        self.base = merged;
        self.added = HashSet::new();
    }
}

/// Canonical text keys, with the bytes their strings hold.
#[derive(Default)]
pub struct TextSet {
    keys: HashSet<Box<str>>,
    /// Heap bytes of the strings (length plus an allocator's overhead).
    strings: usize,
}

impl TextSet {
    fn insert(&mut self, v: Box<str>) {
        let len = v.len();
        if self.keys.insert(v) {
            self.strings += len + 16;
        }
    }

    fn remove(&mut self, v: &str) {
        if self.keys.remove(v) {
            self.strings = self.strings.saturating_sub(v.len() + 16);
        }
    }

    fn bytes(&self) -> usize {
        self.keys.capacity() * hashed::<Box<str>>() + self.strings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uuid(n: u128) -> Key {
        Key::Uuid(n)
    }

    /// Integer keys keep their order and sign in the bitmap.
    /// Mutation: `int_slot` without the sign flip (negative keys collide with large
    /// positive ones after the cast).
    #[test]
    fn integer_keys_of_either_sign() {
        let mut s = KeySet::new(KeyKind::Int);
        for v in [-5_i64, 0, 7, i64::MIN, i64::MAX] {
            s.insert(Key::Int(v));
        }
        assert!(s.contains(&Key::Int(-5)) && s.contains(&Key::Int(i64::MIN)));
        assert!(!s.contains(&Key::Int(5)));
        s.remove(&Key::Int(-5));
        assert!(!s.contains(&Key::Int(-5)));
        assert_eq!(s.len(), 4);
        assert!(int_slot(-1) < int_slot(0) && int_slot(i64::MIN) < int_slot(-1));
    }

    /// The sorted uuid set answers the same as a plain set through appends, inserts in
    /// the middle, removals and merges.
    /// Mutation: `compact` dropping `added` (or keeping `removed` keys).
    #[test]
    fn sorted_set_is_a_set() {
        let mut s = KeySet::new(KeyKind::Uuid);
        let mut model = HashSet::new();
        // A deterministic mix: appends in order, then inserts and removals anywhere.
        for i in 0..20_000_u128 {
            s.insert(uuid(i * 3));
            model.insert(i * 3);
        }
        let mut x: u128 = 12345;
        for _ in 0..40_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407)
                % 70_000;
            if x % 3 == 1 {
                s.remove(&uuid(x));
                model.remove(&x);
            } else {
                s.insert(uuid(x));
                model.insert(x);
            }
        }
        assert_eq!(s.len(), model.len() as u64);
        for v in 0..70_000 {
            assert_eq!(s.contains(&uuid(v)), model.contains(&v), "{v}");
        }
        s.shrink();
        for v in 0..70_000 {
            assert_eq!(s.contains(&uuid(v)), model.contains(&v), "{v}");
        }
        assert!(s.bytes() >= model.len() * 16);
    }

    /// Canonical uuid text parses to the number whose order is PostgreSQL's.
    #[test]
    fn uuids_parse_in_byte_order() {
        let a = parse_uuid("00000000-0000-0000-0000-0000000000ff");
        let b = parse_uuid("01000000-0000-0000-0000-000000000000");
        assert!(a.is_some() && a < b);
        assert_eq!(parse_uuid("not-a-uuid"), None);
    }

    /// Composite and text keys are one key per canonical spelling, columns kept apart.
    #[test]
    fn text_keys_keep_columns_apart() {
        let k = |cols: &[&str]| {
            Key::parse(
                KeyKind::Text,
                &cols.iter().map(|c| (*c).to_owned()).collect::<Vec<_>>(),
            )
        };
        assert_ne!(k(&["a", "bc"]), k(&["ab", "c"]));
        let mut s = KeySet::new(KeyKind::Text);
        if let Some(key) = k(&["a", "bc"]) {
            s.insert(key);
        }
        assert!(k(&["a", "bc"]).is_some_and(|key| s.contains(&key)));
        assert!(!k(&["ab", "c"]).is_some_and(|key| s.contains(&key)));
        assert_eq!(k(&["a\0b"]), None);
    }
}
