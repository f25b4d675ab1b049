//! A raw wire client for sequences drivers do not produce: pipelines, Flush before
//! Sync, FunctionCall, malformed and oversized messages.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl Msg {
    /// The SQLSTATE of an ErrorResponse/NoticeResponse.
    pub fn code(&self) -> Option<String> {
        field(&self.body, b'C')
    }

    pub fn severity(&self) -> Option<String> {
        field(&self.body, b'V')
    }

    pub fn message(&self) -> Option<String> {
        field(&self.body, b'M')
    }
}

fn field(body: &[u8], kind: u8) -> Option<String> {
    let mut rest = body;
    while let Some((&k, tail)) = rest.split_first() {
        if k == 0 {
            break;
        }
        let end = tail.iter().position(|b| *b == 0)?;
        if k == kind {
            return Some(String::from_utf8_lossy(&tail[..end]).into_owned());
        }
        rest = &tail[end + 1..];
    }
    None
}

pub fn startup_packet(user: &str, db: &str) -> Vec<u8> {
    spillway::protocol::startup::StartupMessage::build(&[("user", user), ("database", db)]).to_vec()
}

pub fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(tag);
    out.put_i32(body.len() as i32 + 4);
    out.extend_from_slice(body);
    out
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

pub fn query(sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, sql);
    msg(b'Q', &b)
}

pub fn parse(name: &str, sql: &str) -> Vec<u8> {
    parse_typed(name, sql, &[])
}

/// Parse declaring the parameters' type OIDs.
pub fn parse_typed(name: &str, sql: &str, types: &[u32]) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, name);
    cstr(&mut b, sql);
    b.put_i16(types.len() as i16);
    for t in types {
        b.put_u32(*t);
    }
    msg(b'P', &b)
}

/// Bind with text-format parameters (`None` = NULL) and text results.
pub fn bind(portal: &str, stmt: &str, params: &[Option<&str>]) -> Vec<u8> {
    bind_formats(portal, stmt, params, &[])
}

/// Bind with text-format parameters and these result format codes.
pub fn bind_formats(portal: &str, stmt: &str, params: &[Option<&str>], results: &[i16]) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    cstr(&mut b, stmt);
    b.put_i16(0);
    b.put_i16(params.len() as i16);
    for p in params {
        match p {
            Some(v) => {
                b.put_i32(v.len() as i32);
                b.extend_from_slice(v.as_bytes());
            }
            None => b.put_i32(-1),
        }
    }
    b.put_i16(results.len() as i16);
    for r in results {
        b.put_i16(*r);
    }
    msg(b'B', &b)
}

pub fn describe_statement(name: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    cstr(&mut b, name);
    msg(b'D', &b)
}

pub fn describe_portal(portal: &str) -> Vec<u8> {
    let mut b = vec![b'P'];
    cstr(&mut b, portal);
    msg(b'D', &b)
}

pub fn execute(portal: &str, max_rows: i32) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    b.put_i32(max_rows);
    msg(b'E', &b)
}

pub fn sync() -> Vec<u8> {
    msg(b'S', &[])
}

pub fn flush() -> Vec<u8> {
    msg(b'H', &[])
}

pub fn terminate() -> Vec<u8> {
    msg(b'X', &[])
}

/// FunctionCall with binary int4 arguments and a binary result.
pub fn function_call(oid: i32, int4_args: &[i32]) -> Vec<u8> {
    let mut b = Vec::new();
    b.put_i32(oid);
    b.put_i16(1);
    b.put_i16(1);
    b.put_i16(int4_args.len() as i16);
    for a in int4_args {
        b.put_i32(4);
        b.put_i32(*a);
    }
    b.put_i16(1);
    msg(b'F', &b)
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).await.expect("tcp connect");
        stream.set_nodelay(true).expect("nodelay");
        Raw {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Connects and completes a trust-authenticated startup.
    pub async fn startup(addr: SocketAddr, user: &str, db: &str) -> Raw {
        let mut raw = Raw::connect(addr).await;
        raw.send(&startup_packet(user, db)).await;
        let msgs = raw.until(b'Z').await;
        assert!(
            msgs.iter().all(|m| m.tag != b'E'),
            "startup failed: {msgs:?}"
        );
        raw
    }

    /// The client side's address: spillway logs it as the session's `peer`.
    pub fn local_addr(&self) -> SocketAddr {
        self.stream.local_addr().expect("local address")
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    /// Sends, tolerating a peer that already closed.
    pub async fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// The next backend message, or `None` on EOF. Panics after 20 s.
    pub async fn recv(&mut self) -> Option<Msg> {
        self.recv_within(Duration::from_secs(20))
            .await
            .expect("timed out waiting for a backend message")
    }

    /// `Err(())` on timeout, `Ok(None)` on EOF.
    pub async fn recv_within(&mut self, timeout: Duration) -> Result<Option<Msg>, ()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
                let total = len as usize + 1;
                if self.buf.len() >= total {
                    let m = self.buf.split_to(total);
                    return Ok(Some(Msg {
                        tag: m[0],
                        body: m[5..].to_vec(),
                    }));
                }
            }
            self.buf.reserve(8192);
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Err(()),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Messages up to and including the first with `tag`. Panics on EOF.
    pub async fn until(&mut self, tag: u8) -> Vec<Msg> {
        let mut out = Vec::new();
        loop {
            let m = self
                .recv()
                .await
                .unwrap_or_else(|| panic!("EOF before {:?}; got {out:?}", tag as char));
            let done = m.tag == tag;
            out.push(m);
            if done {
                return out;
            }
        }
    }

    /// Reads until EOF (the server closed), returning what came before it.
    pub async fn until_eof(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        while let Some(m) = self.recv().await {
            out.push(m);
        }
        out
    }
}

pub fn tags(msgs: &[Msg]) -> String {
    msgs.iter().map(|m| m.tag as char).collect()
}
