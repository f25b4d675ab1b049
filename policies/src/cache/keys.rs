//! Cache keys, and how they are hashed without being built.
//!
//! A key is opaque bytes (the proxy's database, role, settings, statement, parameters,
//! formats). A hit must not build them: the proxy keeps the hash state of its key
//! prefix ([`KeyStream`], seeded by the cache's [`ResultCache::stream`]) and feeds it
//! the rest of the request as [`KeyParts`], whose bytes are compared in place. Only a
//! miss builds the key ([`Key`]) it leads a fill under.
//!
//! Invariants:
//! - A key's hash depends only on its bytes, never on how they were split into parts:
//!   [`KeyStream`] feeds the hasher whole 64-byte blocks whatever the part boundaries,
//!   then the rest and the length.
//! - Keys are equal only when their bytes are (the hash only finds candidates).
//! - The hasher is seeded at random per cache: clients choose statements and
//!   parameters, so bucket collisions must not be theirs to choose. It is aHash (ADR
//!   0029): keyed like SipHash, and cheaper on a hit's short parts.
//!
//! [`ResultCache::stream`]: super::ResultCache::stream

use std::borrow::Borrow;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};

use ahash::{AHasher, RandomState};

/// The hash state of a key's first bytes, to be continued with the rest. Cloning it
/// is how a session reuses its prefix's hash.
#[derive(Clone, Debug)]
pub struct KeyStream {
    hasher: AHasher,
    /// Bytes not yet hashed: the hasher is fed whole blocks only.
    block: [u8; BLOCK],
    pending: usize,
    len: u64,
}

const BLOCK: usize = 64;

impl KeyStream {
    pub(super) fn new(seed: &RandomState) -> Self {
        Self {
            hasher: seed.build_hasher(),
            block: [0; BLOCK],
            pending: 0,
            len: 0,
        }
    }

    pub fn write(&mut self, mut bytes: &[u8]) {
        self.len += bytes.len() as u64;
        while !bytes.is_empty() {
            let n = (BLOCK - self.pending).min(bytes.len());
            self.block[self.pending..self.pending + n].copy_from_slice(&bytes[..n]);
            self.pending += n;
            bytes = &bytes[n..];
            if self.pending == BLOCK {
                self.hasher.write(&self.block);
                self.pending = 0;
            }
        }
    }

    /// The hash of everything written.
    pub fn finish(&self) -> u64 {
        let mut h = self.hasher.clone();
        h.write(&self.block[..self.pending]);
        h.write_u64(self.len);
        h.finish()
    }
}

/// A key as the cache keeps it: its bytes and their hash.
#[derive(Debug, Clone)]
pub struct Key {
    hash: u64,
    bytes: Box<[u8]>,
}

impl Key {
    /// `bytes` hashed by a fresh `stream` of the cache's.
    pub fn new(mut stream: KeyStream, bytes: &[u8]) -> Self {
        stream.write(bytes);
        Self {
            hash: stream.finish(),
            bytes: bytes.into(),
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// A key not built: its hash and its bytes as consecutive parts.
pub struct KeyParts<'a> {
    hash: u64,
    parts: &'a [&'a [u8]],
}

impl<'a> KeyParts<'a> {
    /// `hash`: the stream that was fed exactly `parts`, finished.
    pub fn new(hash: u64, parts: &'a [&'a [u8]]) -> Self {
        Self { hash, parts }
    }

    /// The key's bytes, built (a miss leads a fill under them).
    pub fn to_vec(&self) -> Vec<u8> {
        self.parts.concat()
    }
}

/// Either kind of key, as the cache's map looks one up.
pub trait KeyLike {
    fn key_hash(&self) -> u64;
    /// The key's bytes when they are in one piece (a built key).
    fn contiguous(&self) -> Option<&[u8]>;
    /// Whether the key's bytes are `bytes`.
    fn is(&self, bytes: &[u8]) -> bool;
    /// Part `i` of the key's bytes (`None` past the last).
    fn part(&self, i: usize) -> Option<&[u8]>;
    fn key_len(&self) -> usize;
}

impl KeyLike for Key {
    fn key_hash(&self) -> u64 {
        self.hash
    }
    fn contiguous(&self) -> Option<&[u8]> {
        Some(&self.bytes)
    }
    fn is(&self, bytes: &[u8]) -> bool {
        self.bytes[..] == *bytes
    }
    fn part(&self, i: usize) -> Option<&[u8]> {
        (i == 0).then_some(&self.bytes[..])
    }
    fn key_len(&self) -> usize {
        self.bytes.len()
    }
}

impl KeyLike for KeyParts<'_> {
    fn key_hash(&self) -> u64 {
        self.hash
    }
    fn contiguous(&self) -> Option<&[u8]> {
        None
    }
    fn is(&self, mut bytes: &[u8]) -> bool {
        for p in self.parts {
            let Some((head, rest)) = bytes.split_at_checked(p.len()) else {
                return false;
            };
            if !same_slice(head, p) {
                return false;
            }
            bytes = rest;
        }
        bytes.is_empty()
    }
    fn part(&self, i: usize) -> Option<&[u8]> {
        self.parts.get(i).copied()
    }
    fn key_len(&self) -> usize {
        self.parts.iter().map(|p| p.len()).sum()
    }
}

/// `a == b` for slices of one length; the short parts of a key (a kind byte, a length)
/// compared in line, where a call to `memcmp` would cost more than the comparison.
fn same_slice(a: &[u8], b: &[u8]) -> bool {
    if a.len() <= 8 {
        a.iter().zip(b).all(|(x, y)| x == y)
    } else {
        a == b
    }
}

/// Whether two keys have the same bytes, compared part against part in place.
fn same_bytes(a: &dyn KeyLike, b: &dyn KeyLike) -> bool {
    if a.key_len() != b.key_len() {
        return false;
    }
    let (mut i, mut j) = (0, 0);
    let (mut x, mut y): (&[u8], &[u8]) = (&[], &[]);
    loop {
        while x.is_empty() {
            let Some(p) = a.part(i) else { break };
            x = p;
            i += 1;
        }
        while y.is_empty() {
            let Some(p) = b.part(j) else { break };
            y = p;
            j += 1;
        }
        if x.is_empty() || y.is_empty() {
            return x.is_empty() && y.is_empty();
        }
        let n = x.len().min(y.len());
        if x[..n] != y[..n] {
            return false;
        }
        x = &x[n..];
        y = &y[n..];
    }
}

impl Hash for dyn KeyLike + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.key_hash());
    }
}

impl PartialEq for dyn KeyLike + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.key_hash() == other.key_hash()
            && match (self.contiguous(), other.contiguous()) {
                (Some(a), _) => other.is(a),
                (None, Some(b)) => self.is(b),
                (None, None) => same_bytes(self, other),
            }
    }
}

impl Eq for dyn KeyLike + '_ {}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.bytes == other.bytes
    }
}

impl Eq for Key {}

impl<'a> Borrow<dyn KeyLike + 'a> for Key {
    fn borrow(&self) -> &(dyn KeyLike + 'a) {
        self
    }
}

/// The map's hasher: a key's hash is already a keyed hash of its bytes.
#[derive(Default)]
pub struct Prehashed(u64);

impl Hasher for Prehashed {
    fn write(&mut self, bytes: &[u8]) {
        // Not used by keys (they write one u64); kept total for any other caller.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

pub type BuildPrehashed = BuildHasherDefault<Prehashed>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_does_not_depend_on_the_parts() {
        let seed = RandomState::new();
        let bytes: Vec<u8> = (0..=255u8).cycle().take(300).collect();
        let whole = Key::new(KeyStream::new(&seed), &bytes);
        for cuts in [
            [0, 1],
            [3, 17],
            [8, 16],
            [63, 65],
            [64, 128],
            [7, 299],
            [150, 150],
            [0, 300],
        ] {
            let parts = [
                &bytes[..cuts[0]],
                &bytes[cuts[0]..cuts[1]],
                &bytes[cuts[1]..],
            ];
            let mut s = KeyStream::new(&seed);
            for p in parts {
                s.write(p);
            }
            let view = KeyParts::new(s.finish(), &parts);
            assert_eq!(view.key_hash(), whole.key_hash(), "cut at {cuts:?}");
            assert!(same_bytes(&view, &whole));
            assert!(view.is(&bytes) && whole.is(&bytes));
            let (a, b): (&dyn KeyLike, &dyn KeyLike) = (&view, &whole);
            assert!(a == b, "parts against a built key");
            assert!(b == a, "a built key against parts");
            assert_eq!(view.to_vec(), bytes);
        }
    }

    #[test]
    fn different_bytes_differ() {
        let seed = RandomState::new();
        let a = Key::new(KeyStream::new(&seed), b"abc");
        let b = Key::new(KeyStream::new(&seed), b"abd");
        let short = Key::new(KeyStream::new(&seed), b"ab");
        assert_ne!(a.key_hash(), b.key_hash());
        assert!(!same_bytes(&a, &b));
        assert!(!same_bytes(&a, &short));
        // A trailing zero byte is not nothing: the length is hashed too.
        let zero = Key::new(KeyStream::new(&seed), b"ab\0");
        assert_ne!(short.key_hash(), zero.key_hash());
        let parts: [&[u8]; 3] = [b"a", b"", b"bd"];
        assert!(!same_bytes(&KeyParts::new(0, &parts), &a));
        assert!(!KeyParts::new(0, &parts).is(b"abdd"));
        assert!(!KeyParts::new(0, &parts).is(b"ab"));
        assert!(same_bytes(&KeyParts::new(0, &parts), &b));
    }
}
