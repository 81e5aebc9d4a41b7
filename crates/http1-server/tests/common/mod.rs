//! What the crate's tests share: a server on 127.0.0.1:0 whose handler reads the whole
//! body through a fixed buffer, one raw exchange with it, and the answers read back.

#![allow(dead_code)] // Each test file uses its own part.

use http1_server::{Limits, Method, Request, Server};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Requests the handler saw, and those whose target named `/smuggled`.
#[derive(Default)]
pub struct Seen {
    pub requests: AtomicUsize,
    pub smuggled: AtomicUsize,
}

/// Short limits, so that no case can wait long.
pub fn limits() -> Limits {
    Limits {
        idle: Duration::from_millis(500),
        head: Duration::from_secs(1),
        body: Duration::from_secs(1),
        write: Duration::from_secs(1),
        stack_size: 256 * 1024,
        max_connections: 64,
        max_connections_per_ip: 0,
        body_floor: 1024,
    }
}

/// A server whose handler reads the body and answers `{"read": n}` (a HEAD: 204), or
/// an OpenAI-shaped 400 when the body cannot be read; `/status/100`, `/status/204`
/// and `/status/304` answer that status, with a body the server must drop.
pub fn start(seen: Arc<Seen>) -> Server {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    Server::start(
        listener,
        limits(),
        Box::new(move |mut request: Request<'_>| {
            seen.requests.fetch_add(1, Ordering::SeqCst);
            if request.url().contains("smuggled") {
                seen.smuggled.fetch_add(1, Ordering::SeqCst);
            }
            let bodiless = ["/status/100", "/status/204", "/status/304"];
            if let Some(path) = bodiless.into_iter().find(|p| request.url() == *p) {
                let status = path["/status/".len()..].parse().unwrap_or(204);
                let _ = request.respond(status, &[("X-Kind", "bodiless")], b"dropped");
                return;
            }
            let mut buf = [0u8; 8192];
            let mut read = 0usize;
            let failed = loop {
                match request.read(&mut buf) {
                    Ok(0) => break None,
                    Ok(n) => read += n,
                    Err(e) => break Some(e),
                }
            };
            let _ = match failed {
                Some(e) => request.respond(
                    400,
                    &[("Content-Type", "application/json")],
                    format!(
                        r#"{{"error":{{"message":"{}","type":"invalid_request_error","param":null,"code":"bad_body"}}}}"#,
                        e.kind()
                    )
                    .as_bytes(),
                ),
                None if *request.method() == Method::Head => {
                    request.respond(204, &[("X-Read", "0")], b"")
                }
                None => request.respond(
                    200,
                    &[("Content-Type", "application/json")],
                    format!(r#"{{"read":{read}}}"#).as_bytes(),
                ),
            };
        }),
    )
    .unwrap()
}

/// Sends `bytes` on a new connection, closes the sending side, and returns all the
/// server wrote until it closed.
pub fn exchange(server: &Server, bytes: &[u8]) -> Vec<u8> {
    let mut c = TcpStream::connect(server.server_addr()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = c.write_all(bytes);
    let _ = c.shutdown(Shutdown::Write);
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    out
}

/// One answer as read off the wire.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// Names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The answers in `bytes`, bodies framed by Content-Length (none without it, nor in
/// 1xx, 204 and 304 answers), or an error naming what is not an answer.
pub fn answers(mut bytes: &[u8]) -> Result<Vec<Answer>, String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let end = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| format!("no end of head in {:?}", String::from_utf8_lossy(bytes)))?;
        let head = std::str::from_utf8(&bytes[..end]).map_err(|e| e.to_string())?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let rest = &bytes[end + 4..];
        let length = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .map_or(Ok(0), |(_, v)| {
                v.parse::<usize>().map_err(|e| e.to_string())
            })?;
        // RFC 9110 §6.4.1: these never have a body, whatever their Content-Length.
        let bodiless = matches!(status, 100..=199 | 204 | 304);
        let length = if bodiless { 0 } else { length.min(rest.len()) };
        out.push(Answer {
            status,
            headers,
            body: rest[..length].to_vec(),
        });
        bytes = &rest[length..];
    }
    Ok(out)
}

/// Whether `body` is `{"error":{"message","type","param","code"}}` with a message and
/// a type that are strings.
pub fn is_openai_error(body: &[u8]) -> bool {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return false;
    };
    let e = &value["error"];
    e["message"].is_string()
        && e["type"].is_string()
        && e.get("param").is_some()
        && e.get("code").is_some()
}
