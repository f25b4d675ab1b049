//! A plain-HTTP GET of a metrics page, just enough for a Prometheus endpoint:
//! `Connection: close`, `Content-Length`, chunked or read-to-end bodies, bounded in
//! time ([`TIMEOUT`]) and size ([`MAX_BYTES`]). A full HTTP client stack (hyper,
//! reqwest, TLS) would dwarf the rest of the tool for one request a second.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const TIMEOUT: Duration = Duration::from_secs(3);
pub const MAX_BYTES: usize = 32 << 20;

/// Fetches `url` (http:// only) and returns the body of a 200 answer.
pub async fn get(url: &str) -> Result<String, String> {
    tokio::time::timeout(TIMEOUT, get_inner(url))
        .await
        .map_err(|_| format!("{url}: no answer within {}s", TIMEOUT.as_secs()))?
}

async fn get_inner(url: &str) -> Result<String, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("{url}: {e}"))?;
    if parsed.scheme() != "http" {
        return Err(format!("{url}: only http:// is supported"));
    }
    let host = parsed.host_str().ok_or_else(|| format!("{url}: no host"))?;
    let port = parsed.port_or_known_default().unwrap_or(80);
    let mut path = parsed.path().to_owned();
    if let Some(q) = parsed.query() {
        path.push('?');
        path.push_str(q);
    }
    let addr_host = host.trim_start_matches('[').trim_end_matches(']');
    let mut stream = TcpStream::connect((addr_host, port))
        .await
        .map_err(|e| format!("{url}: cannot connect: {e}"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/plain\r\n\
         User-Agent: spillway-loadtest\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if raw.len() > MAX_BYTES {
            return Err(format!("{url}: answer larger than {MAX_BYTES} bytes"));
        }
        if let Some(body) = complete_body(&raw)? {
            return decode(url, body);
        }
    }
    // The server closed the connection: what came is the whole answer.
    if let Some(body) = complete_body(&raw)? {
        return decode(url, body);
    }
    let (status, _, body) =
        split_response(&raw).ok_or_else(|| format!("{url}: not an HTTP answer"))?;
    decode(url, (status, body.to_vec()))
}

fn decode(url: &str, (status, body): (u16, Vec<u8>)) -> Result<String, String> {
    if status != 200 {
        return Err(format!("{url}: HTTP status {status}"));
    }
    String::from_utf8(body).map_err(|_| format!("{url}: body is not UTF-8"))
}

/// `(status, headers, body so far)` once the header block is complete.
fn split_response(raw: &[u8]) -> Option<(u16, String, &[u8])> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let status = head
        .lines()
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((status, head, &raw[end + 4..]))
}

/// The whole body once it is complete by `Content-Length` or the chunked terminator;
/// `None` while more is needed (or when only the connection's end can tell).
pub fn complete_body(raw: &[u8]) -> Result<Option<(u16, Vec<u8>)>, String> {
    let Some((status, head, body)) = split_response(raw) else {
        return Ok(None);
    };
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_ascii_lowercase())
        })
    };
    if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        return dechunk(body).map(|b| b.map(|b| (status, b)));
    }
    if let Some(len) = header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| format!("bad Content-Length {len:?}"))?;
        return Ok((body.len() >= len).then(|| (status, body[..len].to_vec())));
    }
    Ok(None)
}

/// Decodes a chunked body; `None` until the last chunk has arrived.
fn dechunk(mut body: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = body.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let size_line = String::from_utf8_lossy(&body[..eol]);
        let size_hex = size_line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| format!("bad chunk size {size_hex:?}"))?;
        body = &body[eol + 2..];
        if size == 0 {
            return Ok(Some(out));
        }
        if body.len() < size + 2 {
            return Ok(None);
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_bodies() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(complete_body(raw), Ok(Some((200, b"hello".to_vec()))));
        let partial = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhello";
        assert_eq!(complete_body(partial), Ok(None));
        assert_eq!(complete_body(b"HTTP/1.1 200 OK\r\nContent-"), Ok(None));
    }

    #[test]
    fn chunked_bodies() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        assert_eq!(complete_body(raw), Ok(Some((200, b"hello world".to_vec()))));
        let partial = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel";
        assert_eq!(complete_body(partial), Ok(None));
        let bad = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert!(complete_body(bad).is_err());
    }

    #[test]
    fn status_is_reported() {
        let raw = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
        let body = complete_body(raw).expect("valid").expect("complete");
        assert_eq!(decode("u", body), Err("u: HTTP status 404".to_owned()));
    }

    #[tokio::test]
    async fn unreachable_endpoint_is_an_error_not_a_panic() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let e = get(&format!("http://127.0.0.1:{port}/metrics"))
            .await
            .expect_err("nothing listens");
        assert!(e.contains("cannot connect"), "{e}");
        let e = get("https://127.0.0.1/metrics").await.expect_err("https");
        assert!(e.contains("only http://"), "{e}");
    }

    #[tokio::test]
    async fn reads_a_served_page() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.0 200 OK\r\n\r\nspillway_cache_hits_total 3\n")
                .await;
        });
        let body = get(&format!("http://127.0.0.1:{port}/metrics"))
            .await
            .expect("served");
        assert_eq!(body, "spillway_cache_hits_total 3\n");
    }
}
