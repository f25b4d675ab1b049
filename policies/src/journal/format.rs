//! The journal's on-disk framing, without I/O: segment headers and commit frames.
//!
//! A segment file is a [`SEGMENT_HEADER_LEN`]-byte header followed by frames. A frame
//! is one **group commit**: every record the writer took from the queue in one go,
//! written with one `write` and made durable with one fsync. All integers are little
//! endian.
//!
//! ```text
//! segment header: magic "SPWJRNL1" (8) | first_seq u64 | crc32c of the previous 16 bytes u32
//! frame header:   magic u32 | body_len u32 | crc u32 | count u32 | first_seq u64
//! frame body:     count × (len u32 | payload)
//! ```
//!
//! The frame crc is CRC-32C over `body_len`, `count`, `first_seq` and the body, so a
//! damaged length or sequence number is caught like a damaged payload.
//!
//! Invariants:
//! - A frame holds at least one record and its records have consecutive sequence
//!   numbers starting at `first_seq`.
//! - [`decode_frame`] never panics and never trusts a length before checking it against
//!   the bytes it was given; anything it cannot fully verify is `Incomplete` or
//!   `Invalid`, never a frame.
//!
//! Why a frame is the unit of verification (not a record): a crash can tear only
//! the frame written after the last fsync, and with `fsync = "always"` a frame is
//! written only after the previous one was synced. So a valid frame *after* a bad one
//! proves the bad one is damage, not a torn write (see `segment::recover`). Records of
//! one frame share one write, so per-record checksums could not tell the two apart.

use std::ops::Range;

/// Magic at the start of every segment file; the digit is the format version.
pub const SEGMENT_MAGIC: [u8; 8] = *b"SPWJRNL1";
pub const SEGMENT_HEADER_LEN: usize = 20;

/// Magic at the start of every frame, so a scan for later frames after a damaged one
/// checks only plausible offsets.
pub const FRAME_MAGIC: [u8; 4] = *b"SPWF";
pub const FRAME_HEADER_LEN: usize = 24;
pub const RECORD_HEADER_LEN: usize = 4;

pub fn encode_segment_header(first_seq: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut out = [0u8; SEGMENT_HEADER_LEN];
    out[..8].copy_from_slice(&SEGMENT_MAGIC);
    out[8..16].copy_from_slice(&first_seq.to_le_bytes());
    let crc = crc32c::crc32c(&out[..16]);
    out[16..20].copy_from_slice(&crc.to_le_bytes());
    out
}

/// The header's `first_seq`, or `None` if the bytes are not a whole, intact header.
pub fn decode_segment_header(bytes: &[u8]) -> Option<u64> {
    let header = bytes.get(..SEGMENT_HEADER_LEN)?;
    if header[..8] != SEGMENT_MAGIC {
        return None;
    }
    if crc32c::crc32c(&header[..16]) != read_u32(header, 16)? {
        return None;
    }
    read_u64(header, 8)
}

/// Appends one frame holding `payloads` with sequence numbers from `first_seq`.
///
/// The caller guarantees at least one payload and that each fits in a `u32`
/// (`Journal::append` refuses larger ones before they reach the writer).
pub fn encode_frame<'a>(
    buf: &mut Vec<u8>,
    first_seq: u64,
    payloads: impl ExactSizeIterator<Item = &'a [u8]>,
) {
    let start = buf.len();
    let count = u32::try_from(payloads.len()).unwrap_or(u32::MAX);
    buf.extend_from_slice(&FRAME_MAGIC);
    buf.extend_from_slice(&[0u8; 8]); // body_len and crc, filled in below
    buf.extend_from_slice(&count.to_le_bytes());
    buf.extend_from_slice(&first_seq.to_le_bytes());
    for payload in payloads {
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(payload);
    }
    let body_len = buf.len() - start - FRAME_HEADER_LEN;
    let body_len = u32::try_from(body_len).unwrap_or(u32::MAX).to_le_bytes();
    buf[start + 4..start + 8].copy_from_slice(&body_len);
    let crc = frame_crc(&body_len, &buf[start + 12..]);
    buf[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
}

fn frame_crc(body_len: &[u8], count_seq_and_body: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(body_len), count_seq_and_body)
}

/// A verified frame: where its records' payloads are, relative to the frame start.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    pub first_seq: u64,
    /// Total bytes of the frame, header included.
    pub len: usize,
    pub payloads: Vec<Range<usize>>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Frame(Frame),
    /// The bytes end before the frame does (or before its header does).
    Incomplete,
    /// Not an intact frame: wrong magic, checksum mismatch or inconsistent body.
    Invalid(&'static str),
}

/// Decodes the frame at the start of `bytes`.
pub fn decode_frame(bytes: &[u8]) -> Decoded {
    let Some(header) = bytes.get(..FRAME_HEADER_LEN) else {
        return Decoded::Incomplete;
    };
    if header[..4] != FRAME_MAGIC {
        return Decoded::Invalid("bad frame magic");
    }
    let (Some(body_len), Some(crc), Some(count), Some(first_seq)) = (
        read_u32(header, 4),
        read_u32(header, 8),
        read_u32(header, 12),
        read_u64(header, 16),
    ) else {
        return Decoded::Incomplete;
    };
    let Some(len) = usize::try_from(body_len)
        .ok()
        .and_then(|b| b.checked_add(FRAME_HEADER_LEN))
    else {
        return Decoded::Invalid("frame length overflows");
    };
    let Some(frame) = bytes.get(..len) else {
        return Decoded::Incomplete;
    };
    if frame_crc(&header[4..8], &frame[12..]) != crc {
        return Decoded::Invalid("frame checksum mismatch");
    }
    // The checksum matched, so what follows fails only on a writer bug or a collision.
    if count == 0 {
        return Decoded::Invalid("frame without records");
    }
    let mut payloads = Vec::with_capacity(count.min(4096) as usize);
    let mut at = FRAME_HEADER_LEN;
    for _ in 0..count {
        let Some(record_len) = read_u32(frame, at) else {
            return Decoded::Invalid("record header past frame end");
        };
        let start = at + RECORD_HEADER_LEN;
        let Some(end) = start.checked_add(record_len as usize).filter(|&e| e <= len) else {
            return Decoded::Invalid("record past frame end");
        };
        payloads.push(start..end);
        at = end;
    }
    if at != len {
        return Decoded::Invalid("bytes after the last record of a frame");
    }
    Decoded::Frame(Frame {
        first_seq,
        len,
        payloads,
    })
}

/// Offset (in `bytes`) of the first intact frame at or after `from` whose first
/// sequence number is at least `min_seq`; used only after a damaged frame, to tell a
/// torn tail (nothing intact follows) from damage in the middle.
pub fn find_frame_after(bytes: &[u8], from: usize, min_seq: u64) -> Option<usize> {
    let tail = bytes.get(from..)?;
    tail.windows(FRAME_MAGIC.len())
        .enumerate()
        .filter(|(_, w)| *w == FRAME_MAGIC)
        .map(|(i, _)| from + i)
        .find(
            |&at| matches!(decode_frame(&bytes[at..]), Decoded::Frame(f) if f.first_seq >= min_seq),
        )
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let b = bytes.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Some(u64::from_le_bytes(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(first_seq: u64, payloads: &[&[u8]]) -> Vec<u8> {
        let mut buf = Vec::new();
        encode_frame(&mut buf, first_seq, payloads.iter().copied());
        buf
    }

    #[test]
    fn frame_round_trip() {
        let buf = frame(7, &[b"alpha", b"", b"gamma"]);
        let Decoded::Frame(f) = decode_frame(&buf) else {
            panic!("not a frame");
        };
        assert_eq!(f.first_seq, 7);
        assert_eq!(f.len, buf.len());
        let got: Vec<&[u8]> = f.payloads.iter().map(|r| &buf[r.clone()]).collect();
        assert_eq!(got, vec![&b"alpha"[..], b"", b"gamma"]);
    }

    #[test]
    fn every_truncation_is_incomplete_and_every_flip_is_caught() {
        let buf = frame(1, &[b"one", b"two"]);
        for cut in 0..buf.len() {
            assert_eq!(
                decode_frame(&buf[..cut]),
                Decoded::Incomplete,
                "cut at {cut}"
            );
        }
        for at in 0..buf.len() {
            for bit in 0..8 {
                let mut bad = buf.clone();
                bad[at] ^= 1 << bit;
                assert!(
                    !matches!(decode_frame(&bad), Decoded::Frame(_)),
                    "flip at {at} bit {bit} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn segment_header_round_trip_and_damage() {
        let h = encode_segment_header(42);
        assert_eq!(decode_segment_header(&h), Some(42));
        assert_eq!(decode_segment_header(&h[..19]), None);
        let mut bad = h;
        bad[9] ^= 1;
        assert_eq!(decode_segment_header(&bad), None);
    }

    #[test]
    fn finds_a_later_frame_only_when_intact_and_not_older() {
        let mut buf = frame(1, &[b"a"]);
        let second = buf.len();
        buf.extend(frame(2, &[b"b"]));
        assert_eq!(find_frame_after(&buf, 1, 2), Some(second));
        assert_eq!(find_frame_after(&buf, 1, 3), None);
        buf[second + 20] ^= 0xff; // damage the second frame's sequence number
        assert_eq!(find_frame_after(&buf, 1, 2), None);
    }
}
