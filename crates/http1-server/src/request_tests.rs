//! Body framing (RFC 9112 §6), decided from the head alone.

use super::*;

fn framed(headers: &str, version: &str) -> Result<(Framing, Option<u64>), u16> {
    let mut head = Head::new();
    let raw = format!("POST / HTTP/{version}{headers}");
    head.parse(raw.as_bytes()).map_err(|r| r.status)?;
    framing(&head).map_err(|r| r.status)
}

fn body(headers: &str) -> Result<(Framing, Option<u64>), u16> {
    framed(headers, "1.1")
}

#[test]
fn content_length_frames_a_body_of_that_length() {
    assert_eq!(
        body("\r\nContent-Length: 5"),
        Ok((Framing::Length(5), Some(5)))
    );
    assert_eq!(body("\r\nContent-Length: 0"), Ok((Framing::Done, Some(0))));
    assert_eq!(body(""), Ok((Framing::Done, None)));
    assert_eq!(
        body("\r\nContent-Length: 5\r\ncontent-length: 5"),
        Ok((Framing::Length(5), Some(5))),
        "repeats that agree"
    );
    // A number no one could send is only a bound: nothing is sized by it.
    assert_eq!(
        body("\r\nContent-Length: 1152921504606846976"),
        Ok((Framing::Length(1 << 60), Some(1 << 60)))
    );
}

#[test]
fn a_content_length_that_is_not_one_number_is_refused() {
    for bad in [
        "5, 5",
        "+5",
        "-5",
        "0x5",
        "5 5",
        "",
        "99999999999999999999999",
    ] {
        assert_eq!(
            body(&format!("\r\nContent-Length: {bad}")),
            Err(400),
            "{bad:?}"
        );
    }
    assert_eq!(body("\r\nContent-Length: 5\r\nContent-Length: 6"), Err(400));
}

#[test]
fn chunked_is_the_only_transfer_coding_and_never_beside_a_length() {
    assert_eq!(
        body("\r\nTransfer-Encoding: chunked"),
        Ok((Framing::ChunkSize, None))
    );
    assert_eq!(
        body("\r\nTransfer-Encoding: CHUNKED"),
        Ok((Framing::ChunkSize, None))
    );
    assert_eq!(
        body("\r\nTransfer-Encoding: chunked\r\nContent-Length: 5"),
        Err(400)
    );
    assert_eq!(
        body("\r\nContent-Length: 5\r\nTransfer-Encoding: chunked"),
        Err(400)
    );
    assert_eq!(body("\r\nTransfer-Encoding: chunked, chunked"), Err(400));
    assert_eq!(body("\r\nTransfer-Encoding: chunked, gzip"), Err(400));
    assert_eq!(body("\r\nTransfer-Encoding: gzip, chunked"), Err(501));
    assert_eq!(body("\r\nTransfer-Encoding: gzip"), Err(501));
    assert_eq!(body("\r\nTransfer-Encoding: xchunked"), Err(501));
    assert_eq!(
        body("\r\nTransfer-Encoding:"),
        Err(400),
        "empty still frames"
    );
    assert_eq!(body("\r\nTransfer-Encoding: ,"), Err(400));
    assert_eq!(
        framed("\r\nTransfer-Encoding: chunked", "1.0"),
        Err(400),
        "HTTP/1.0 has no chunked bodies"
    );
}

#[test]
fn chunk_size_lines_are_hex_without_leading_zeros() {
    let line = |n| {
        let mut out = [0u8; 18];
        let len = chunk_size_line(n, &mut out);
        String::from_utf8(out[..len].to_vec()).unwrap()
    };
    assert_eq!(line(0), "0\r\n");
    assert_eq!(line(10), "a\r\n");
    assert_eq!(line(0x1000), "1000\r\n");
    assert_eq!(line(usize::MAX), format!("{:x}\r\n", usize::MAX));
}
