//! A small HTTP/1.1 `GET` over plain TCP, enough to read a report from the API
//! (`http://` only; `Content-Length`, chunked or read-to-close bodies).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};

/// Largest response read; a report for thousands of addresses is far below it.
pub const RESPONSE_MAX_BYTES: u64 = 16 * 1024 * 1024;

/// Status and body of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The HTTP status code.
    pub status: u16,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

/// `http://host[:port]/path` split into the authority to connect to and the path to ask for.
fn split_url(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("{url}: only http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], &rest[slash..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        bail!("{url}: no host");
    }
    Ok((authority.to_string(), path.to_string()))
}

fn connect(authority: &str, timeout: Duration) -> anyhow::Result<TcpStream> {
    // Default port 80 unless the authority already ends in one (`host:port`, `[v6]:port`).
    let has_port = match authority.rfind(']') {
        Some(bracket) => authority[bracket..].contains(':'),
        None => authority.contains(':'),
    };
    let with_port = if has_port {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addrs: Vec<SocketAddr> = with_port
        .to_socket_addrs()
        .with_context(|| format!("resolving {authority}"))?
        .collect();
    let mut last_error = None;
    for addr in &addrs {
        match TcpStream::connect_timeout(addr, timeout) {
            Ok(stream) => return Ok(stream),
            Err(e) => last_error = Some(anyhow!("connecting to {addr}: {e}")),
        }
    }
    Err(last_error.unwrap_or_else(|| anyhow!("{authority} resolved to no address")))
}

/// `GET url`, waiting at most `timeout` for each step.
pub fn get(url: &str, timeout: Duration) -> anyhow::Result<Response> {
    let (authority, path) = split_url(url)?;
    let mut stream = connect(&authority, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: ipevent-test-client/{}\r\n\
         Accept: application/json\r\nConnection: close\r\n\r\n",
        ipevent_core::VERSION
    );
    stream
        .write_all(request.as_bytes())
        .with_context(|| format!("sending GET {url}"))?;
    let mut raw = Vec::new();
    (&mut stream)
        .take(RESPONSE_MAX_BYTES + 1)
        .read_to_end(&mut raw)
        .with_context(|| format!("reading the answer to GET {url}"))?;
    if raw.len() as u64 > RESPONSE_MAX_BYTES {
        bail!("GET {url}: answer larger than {RESPONSE_MAX_BYTES} bytes");
    }
    parse_response(&raw).with_context(|| format!("GET {url}"))
}

/// Parses a whole response read until the server closed the connection.
fn parse_response(raw: &[u8]) -> anyhow::Result<Response> {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("the answer has no complete header"))?;
    let head = std::str::from_utf8(&raw[..head_end]).context("the answer's header is not text")?;
    let body = &raw[head_end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .filter(|_| status_line.starts_with("HTTP/1."))
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse::<usize>()
                    .with_context(|| format!("bad Content-Length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            chunked = true;
        }
    }
    let body = if chunked {
        dechunk(body)?
    } else if let Some(len) = content_length {
        if body.len() < len {
            bail!("the body ended after {} of {len} bytes", body.len());
        }
        body[..len].to_vec()
    } else {
        body.to_vec()
    };
    Ok(Response { status, body })
}

/// Decodes a chunked body.
fn dechunk(mut body: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("a chunk size line is cut short"))?;
        let size_text = std::str::from_utf8(&body[..line_end]).context("chunk size is not text")?;
        let size_hex = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .with_context(|| format!("bad chunk size {size_hex:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size + 2 {
            bail!("a chunk of {size} bytes is cut short");
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn parses_length_chunked_and_close_delimited_bodies() {
        let plain =
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}trailing").unwrap();
        assert_eq!(
            plain,
            Response {
                status: 200,
                body: b"{}".to_vec()
            }
        );
        let chunked =
            parse_response(b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n")
                .unwrap();
        assert_eq!(
            chunked,
            Response {
                status: 404,
                body: b"abcde".to_vec()
            }
        );
        let closed = parse_response(b"HTTP/1.0 200 OK\r\n\r\nhello").unwrap();
        assert_eq!(closed.body, b"hello");
        assert!(parse_response(b"SSH-2.0\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc").is_err());
    }

    #[test]
    fn get_talks_http_over_a_real_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                let n = conn.read(&mut buf).unwrap();
                assert!(n > 0, "client closed early");
                request.extend_from_slice(&buf[..n]);
            }
            conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{\"a\":1}")
                .unwrap();
            String::from_utf8(request).unwrap()
        });
        let response = get(
            &format!("http://{addr}/events/abc"),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(
            response,
            Response {
                status: 200,
                body: b"{\"a\":1}".to_vec()
            }
        );
        let request = server.join().unwrap();
        assert!(
            request.starts_with("GET /events/abc HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(request.contains(&format!("Host: {addr}\r\n")), "{request}");
        assert!(split_url("https://x/").is_err());
    }
}
