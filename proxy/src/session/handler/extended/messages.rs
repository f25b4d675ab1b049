//! The messages of an extended cycle held until its Sync decides where they go.
//!
//! One buffer of their bytes, reused cycle after cycle, and where each ends: holding a
//! message is one copy and no allocation once the buffer is large enough, and no
//! reference counts are taken or dropped per message.
//!
//! Invariant: `ends` is increasing and its last entry is `bytes.len()`; message `i`
//! is `bytes[ends[i - 1]..ends[i]]`, whole, as the client sent it.

/// A buffer that grew past this for one large message is given back once emptied.
const KEEP_BYTES: usize = 512 * 1024;

#[derive(Default)]
pub struct HeldMessages {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl HeldMessages {
    pub fn push(&mut self, msg: &[u8]) {
        self.bytes.extend_from_slice(msg);
        self.ends.push(self.bytes.len());
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// How many messages are held.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// How many bytes they take.
    pub fn bytes(&self) -> usize {
        self.bytes.len()
    }

    /// Forgets them; the buffer is kept unless one large message grew it.
    pub fn clear(&mut self) {
        self.ends.clear();
        if self.bytes.capacity() > KEEP_BYTES {
            self.bytes = Vec::new();
        } else {
            self.bytes.clear();
        }
    }

    /// The messages in the order they were held.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            bytes: &self.bytes,
            ends: self.ends.iter(),
            start: 0,
        }
    }
}

/// The held messages, each whole.
pub struct Iter<'a> {
    bytes: &'a [u8],
    ends: std::slice::Iter<'a, usize>,
    start: usize,
}

impl<'a> Iterator for Iter<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let end = *self.ends.next()?;
        let msg = &self.bytes[self.start..end];
        self.start = end;
        Some(msg)
    }
}

impl<'a> IntoIterator for &'a HeldMessages {
    type Item = &'a [u8];
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_come_back_whole_and_in_order_after_reuse() {
        let mut held = HeldMessages::default();
        held.push(b"P\0\0\0\x05a");
        held.push(b"S\0\0\0\x04");
        assert_eq!(held.len(), 2);
        assert_eq!(held.bytes(), 11);
        let got: Vec<&[u8]> = held.iter().collect();
        assert_eq!(got, vec![&b"P\0\0\0\x05a"[..], &b"S\0\0\0\x04"[..]]);
        held.clear();
        assert!(held.is_empty());
        held.push(b"E");
        assert_eq!(held.iter().collect::<Vec<_>>(), vec![&b"E"[..]]);
    }

    #[test]
    fn a_large_message_does_not_keep_its_buffer() {
        let mut held = HeldMessages::default();
        held.push(&vec![0u8; KEEP_BYTES + 1]);
        held.clear();
        assert_eq!(held.bytes.capacity(), 0);
        held.push(b"B");
        held.clear();
        assert!(held.bytes.capacity() > 0, "a small buffer is kept");
    }
}
