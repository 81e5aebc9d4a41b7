//! The head parser (RFC 9112 §2–5), on heads given whole.

use super::*;

fn parse(raw: &str) -> Result<Head, Refusal> {
    let mut head = Head::new();
    head.parse(raw.as_bytes()).map(|()| head)
}

fn status(raw: &str) -> u16 {
    parse(raw).err().map_or(0, |r| r.status)
}

#[test]
fn a_head_is_read_into_ranges_of_one_buffer() {
    let head =
        parse("POST /v1/chat?x=1 HTTP/1.1\r\nHost: a\r\nX-Empty:\r\nAuth:  \tk v \t").unwrap();
    assert_eq!(head.method, Method::Post);
    assert_eq!(head.get(&head.target), "/v1/chat?x=1");
    assert_eq!(head.version, HTTPVersion(1, 1));
    let headers: Vec<_> = head
        .headers
        .iter()
        .map(|(k, v)| (head.get(k), head.get(v)))
        .collect();
    assert_eq!(headers, [("Host", "a"), ("X-Empty", ""), ("Auth", "k v")]);
    assert_eq!(head.all("host").collect::<Vec<_>>(), ["a"]);
    let head = parse("GET / HTTP/1.0").unwrap();
    assert_eq!(head.version, HTTPVersion(1, 0));
    assert!(head.headers.is_empty());
}

#[test]
fn request_lines_are_strict() {
    for bad in [
        "",
        "GET",
        "GET /",
        "GET  / HTTP/1.1",
        "GET / HTTP/1.1 ",
        "G(T / HTTP/1.1",
        "GET / HTTP/1.2x",
        "GET / http/1.1",
        "GET / HTTP/0.9",
        "GET /a\tb HTTP/1.1",
        "GET /\u{e9} HTTP/1.1",
        "GET / HTTP/1.1\nHost: a",
    ] {
        assert_eq!(status(bad), 400, "{bad:?}");
    }
    assert_eq!(status("GET / HTTP/2.0"), 505);
    assert_eq!(status("GET / HTTP/3.0"), 505);
    assert_eq!(status("BREW /pot HTTP/1.1"), 0, "any token is a method");
}

#[test]
fn header_lines_are_strict() {
    for bad in [
        "Host : a",
        " Host: a",
        "Host a",
        ": a",
        "Ho(st: a",
        "X: a\x00b",
        "X: a\x7fb",
        "X: a\rb",
        "X: caf\u{e9}",
    ] {
        assert_eq!(status(&format!("GET / HTTP/1.1\r\n{bad}")), 400, "{bad:?}");
    }
    // An obs-fold (a continuation line) starts with a space: not a token.
    assert_eq!(status("GET / HTTP/1.1\r\nX: a\r\n b"), 400);
}

#[test]
fn heads_over_their_limits_get_431() {
    let long_line = format!("GET /{} HTTP/1.1", "a".repeat(MAX_HEAD_LINE));
    assert_eq!(status(&long_line), 431);
    let long_header = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD_LINE));
    assert_eq!(status(&long_header), 431);
    let many = format!("GET / HTTP/1.1{}", "\r\nX: a".repeat(MAX_HEADERS + 1));
    assert_eq!(status(&many), 431);
    let most = format!("GET / HTTP/1.1{}", "\r\nX: a".repeat(MAX_HEADERS));
    assert_eq!(status(&most), 0);
}

#[test]
fn a_reused_head_keeps_nothing_of_the_last_one() {
    let mut head = Head::new();
    head.parse(b"GET /first HTTP/1.1\r\nA: 1\r\nB: 2").unwrap();
    head.parse(b"PUT /second HTTP/1.0\r\nC: 3").unwrap();
    assert_eq!(head.get(&head.target), "/second");
    assert_eq!(head.method, Method::Put);
    assert_eq!(head.headers.len(), 1);
    assert_eq!(head.all("a").count(), 0);
}

#[test]
fn lines_end_with_crlf_only() {
    let lines: Vec<_> = crlf_lines(b"a\r\nb\nc\rd\r\n").collect();
    assert_eq!(
        lines,
        [(0, &b"a"[..]), (3, &b"b\nc\rd"[..]), (10, &b""[..])]
    );
}
