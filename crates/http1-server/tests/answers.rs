//! What the server writes around a handler's answer: framing headers by status.

mod common;
use common::*;
use std::sync::Arc;

#[test]
fn no_content_answers_carry_no_content_length_and_no_body() {
    let server = start(Arc::new(Seen::default()));
    for status in [100, 204] {
        let got = exchange(
            &server,
            format!("GET /status/{status} HTTP/1.1\r\n\r\n").as_bytes(),
        );
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{text}");
        assert!(
            !text.to_ascii_lowercase().contains("content-length"),
            "{status} with a Content-Length: {text}"
        );
        assert!(text.ends_with("\r\n\r\n"), "{status} with a body: {text}");
        assert!(
            text.contains("X-Kind: bodiless"),
            "the handler's headers: {text}"
        );
    }
    // A 304 keeps the length of what it stands for, but not the body.
    let got = exchange(&server, b"GET /status/304 HTTP/1.1\r\n\r\n");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 304 "), "{text}");
    assert!(text.contains("Content-Length: 7\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\n"), "304 with a body: {text}");
}
