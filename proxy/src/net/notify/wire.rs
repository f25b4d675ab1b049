//! The messages the hub writes to clients: a NotificationResponse read from the
//! listener connection, re-encoded with the sender's client pid, and the WARNING that
//! tells a client notifications for it were dropped; and the quoting of a channel
//! name in the LISTEN the listener runs. No I/O.

use bytes::{BufMut, Bytes, BytesMut};

/// NotificationResponse's message type.
pub(super) const NOTIFICATION_RESPONSE: u8 = b'A';

/// `"channel"`, with embedded quotes doubled.
pub(super) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A NotificationResponse's fields.
pub(super) struct Notification<'a> {
    pub pid: i32,
    pub channel: &'a str,
    pub payload: &'a [u8],
}

impl<'a> Notification<'a> {
    pub fn parse(body: &'a [u8]) -> Option<Self> {
        let pid = i32::from_be_bytes(body.get(..4)?.try_into().ok()?);
        let rest = &body[4..];
        let end = rest.iter().position(|&b| b == 0)?;
        let channel = std::str::from_utf8(&rest[..end]).ok()?;
        let rest = &rest[end + 1..];
        let end = rest.iter().position(|&b| b == 0)?;
        Some(Self {
            pid,
            channel,
            payload: &rest[..end],
        })
    }

    /// The message for a client, with `pid` as the sender's.
    pub fn encode(&self, pid: i32) -> Bytes {
        let len = 4 + 4 + self.channel.len() + 1 + self.payload.len() + 1;
        let mut m = BytesMut::with_capacity(1 + len);
        m.put_u8(NOTIFICATION_RESPONSE);
        m.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
        m.put_i32(pid);
        m.put_slice(self.channel.as_bytes());
        m.put_u8(0);
        m.put_slice(self.payload);
        m.put_u8(0);
        m.freeze()
    }
}

/// A NoticeResponse (WARNING, 01000) telling the client `dropped` notifications for it
/// were dropped.
pub(super) fn dropped_notice(dropped: u64) -> Bytes {
    let fields: [(u8, String); 4] = [
        (b'S', "WARNING".to_owned()),
        (b'V', "WARNING".to_owned()),
        (b'C', "01000".to_owned()),
        (
            b'M',
            format!(
                "spillway dropped {dropped} notification(s) for this session: more arrived \
                 than it read (pool.notify_queue)"
            ),
        ),
    ];
    let len = 4 + fields.iter().map(|(_, v)| 1 + v.len() + 1).sum::<usize>() + 1;
    let mut m = BytesMut::with_capacity(1 + len);
    m.put_u8(b'N');
    m.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    for (code, value) in &fields {
        m.put_u8(*code);
        m.put_slice(value.as_bytes());
        m.put_u8(0);
    }
    m.put_u8(0);
    m.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notification_is_reencoded_with_another_pid() {
        let mut body = Vec::new();
        body.extend_from_slice(&42i32.to_be_bytes());
        body.extend_from_slice(b"chan\0pay load\0");
        let note = Notification::parse(&body).expect("parses");
        assert_eq!(
            (note.pid, note.channel, note.payload),
            (42, "chan", &b"pay load"[..])
        );
        let msg = note.encode(7);
        assert_eq!(msg[0], b'A');
        assert_eq!(
            u32::from_be_bytes(msg[1..5].try_into().expect("four bytes")) as usize,
            msg.len() - 1
        );
        let again = Notification::parse(&msg[5..]).expect("parses");
        assert_eq!(
            (again.pid, again.channel, again.payload),
            (7, "chan", &b"pay load"[..])
        );
    }

    #[test]
    fn a_truncated_notification_is_ignored() {
        assert!(Notification::parse(b"\0\0\0\x01chan").is_none());
        assert!(Notification::parse(b"\0\0").is_none());
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
