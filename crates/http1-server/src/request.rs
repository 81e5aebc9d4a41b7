//! A request borrows its connection for as long as the handler
//! runs. Its body is read through the connection's buffer with RFC 9112 §6 framing and
//! a total deadline; its answer leaves in one write; a streamed answer is written chunk
//! by chunk and can be ended by the server (`Server::cut_streams`).
//!
//! Nothing is ever sized by a number the client sent: a declared length only bounds
//! how much is read, chunk sizes only count down, and chunk lines and trailers are
//! capped like head lines.

use crate::common::{HTTPVersion, Method};
use crate::conn::{
    refuse, status_line, Head, Io, Refusal, MAX_HEAD, MAX_HEADERS, MAX_HEAD_LINE, READ_BUFFER,
};
use crate::{Shared, STREAM_CUT, STREAM_FINISHED, STREAM_OPEN};
use std::fmt::Write as _;
use std::io::{self, ErrorKind, Read};
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest chunk-size line (digits and extensions) a chunked body may use.
const MAX_CHUNK_LINE: usize = 4 * 1024;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Framing {
    /// No body, or all of it has been read.
    Done,
    /// Content-Length bytes still to come.
    Length(u64),
    /// Chunked: the next thing to read is a chunk-size line.
    ChunkSize,
    /// Chunked: bytes left in the current chunk.
    ChunkData(u64),
}

/// An HTTP request, with its connection, until the handler answers it.
pub struct Request<'c> {
    io: &'c mut Io,
    head: &'c Head,
    shared: &'c Shared,
    body: Framing,
    declared: Option<u64>,
    /// The client waits for `100 Continue` before it sends the body.
    continue_pending: bool,
    body_deadline: Instant,
    /// The client allows another request on this connection.
    persistent: bool,
}

impl<'c> Request<'c> {
    pub(crate) fn new(
        io: &'c mut Io,
        head: &'c Head,
        shared: &'c Shared,
    ) -> Result<Request<'c>, Refusal> {
        let http11 = head.version >= HTTPVersion(1, 1);
        let (body, declared) = framing(head)?;
        let mut continue_pending = false;
        if let Some(expect) = head.all("expect").next() {
            if !expect.eq_ignore_ascii_case("100-continue") {
                return Err(refuse(
                    417,
                    "expectation_failed",
                    "The only expectation this server meets is 100-continue.",
                ));
            }
            continue_pending = http11;
        }
        let (mut close, mut keep_alive) = (false, false);
        for token in head
            .all("connection")
            .flat_map(|v| v.split(','))
            .map(str::trim)
        {
            close |= token.eq_ignore_ascii_case("close");
            keep_alive |= token.eq_ignore_ascii_case("keep-alive");
        }
        // Until its body has come, a connection is one that may be closed if it
        // trickles (see `Shared::evict`).
        if body == Framing::Done {
            io.entry.set_busy();
        } else {
            io.entry.set_reading_body(shared);
        }
        Ok(Request {
            io,
            head,
            shared,
            body,
            declared,
            continue_pending: continue_pending && body != Framing::Done,
            body_deadline: Instant::now() + shared.limits.body,
            persistent: !close && (http11 || keep_alive),
        })
    }

    pub fn method(&self) -> &Method {
        &self.head.method
    }

    /// The request target as sent (path and query). Like the headers, it lives in the
    /// connection's head buffer, so it outlives the request's answer.
    pub fn url(&self) -> &'c str {
        self.head.get(&self.head.target)
    }

    pub fn http_version(&self) -> &HTTPVersion {
        &self.head.version
    }

    /// Every header as (name, value), in the order sent.
    pub fn headers(&self) -> impl Iterator<Item = (&'c str, &'c str)> + 'c {
        let head = self.head;
        head.headers
            .iter()
            .map(move |(k, v)| (head.get(k), head.get(v)))
    }

    /// The first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&'c str> {
        let head = self.head;
        head.headers
            .iter()
            .find(|(k, _)| head.get(k).eq_ignore_ascii_case(name))
            .map(|(_, v)| head.get(v))
    }

    pub fn remote_addr(&self) -> Option<SocketAddr> {
        Some(self.io.entry.peer)
    }

    /// The client's socket, to look at (never to read or write): whether the client
    /// is still there while the handler waits on something else.
    pub fn client_socket(&self) -> ClientSocket {
        ClientSocket(self.io.entry.clone())
    }

    /// The body's declared Content-Length, if it has one.
    pub fn body_length(&self) -> Option<u64> {
        self.declared
    }

    /// Whether the connection may carry another request after this answer, finishing
    /// the body if what is left of it is already buffered (never waiting for it).
    fn keep_alive(&mut self, close_asked: bool) -> bool {
        if let Framing::Length(left) = self.body {
            if left <= self.io.buffered().len() as u64 {
                self.io.consume(left as usize);
                self.body = Framing::Done;
            }
        }
        let body_read = self.body == Framing::Done;
        self.io.unread_input = !body_read;
        body_read && self.persistent && !close_asked && !self.shared.is_draining()
    }

    /// The status line, `Date`, the handler's headers and the framing headers, in the
    /// connection's reused head buffer (taken; give it back with `Io::give_back`).
    fn head_for<K: AsRef<str>, V: AsRef<str>>(
        &mut self,
        status: u16,
        headers: &[(K, V)],
        length: Option<u64>,
        keep: bool,
    ) -> String {
        let mut head = self.io.take_head_buffer();
        status_line(&mut head, status);
        push_headers(&mut head, headers);
        match length {
            // RFC 9110 §8.6: no Content-Length in a 1xx or 204 answer.
            Some(_) if matches!(status, 100..=199 | 204) => {}
            Some(n) => {
                let _ = write!(head, "Content-Length: {n}\r\n");
            }
            None if self.head.version >= HTTPVersion(1, 1) => {
                head.push_str("Transfer-Encoding: chunked\r\n")
            }
            None => {}
        }
        if !keep {
            head.push_str("Connection: close\r\n");
        } else if self.head.version < HTTPVersion(1, 1) {
            head.push_str("Connection: keep-alive\r\n");
        }
        head.push_str("\r\n");
        head
    }

    /// Answers with `status`, `headers` and `body`, in one write. A `Connection: close`
    /// header among `headers` closes the connection after the answer; so does a body
    /// the handler did not read (it is not drained).
    pub fn respond<K: AsRef<str>, V: AsRef<str>>(
        mut self,
        status: u16,
        headers: &[(K, V)],
        body: &[u8],
    ) -> io::Result<()> {
        self.io.answered = true;
        let close_asked = headers.iter().any(|(k, v)| {
            k.as_ref().eq_ignore_ascii_case("connection")
                && v.as_ref().to_ascii_lowercase().contains("close")
        });
        let keep = self.keep_alive(close_asked);
        let head = self.head_for(status, headers, Some(body.len() as u64), keep);
        let no_body = self.head.method == Method::Head || matches!(status, 100..=199 | 204 | 304);
        let body = if no_body { &[][..] } else { body };
        let deadline = self.io.answer_deadline();
        let written = self.io.write_parts(&[head.as_bytes(), body], deadline);
        self.io.give_back(head);
        self.io.reusable = keep && written.is_ok();
        written
    }

    /// Sends `status` and `headers` and returns a writer for the body, sent as it is
    /// written: chunked for HTTP/1.1 clients, ended by closing the connection for
    /// HTTP/1.0 ones.
    pub fn into_stream<K: AsRef<str>, V: AsRef<str>>(
        self,
        status: u16,
        headers: &[(K, V)],
    ) -> io::Result<ResponseWriter<'c>> {
        self.open_writer(status, headers, None, true)
    }

    /// Like `into_stream`, for a body that is not an event stream: with `length`, it
    /// is sent with that Content-Length (and the writer takes no more); a cut closes
    /// the connection without a last piece, so the client sees an unfinished body.
    pub fn into_relay<K: AsRef<str>, V: AsRef<str>>(
        self,
        status: u16,
        headers: &[(K, V)],
        length: Option<u64>,
    ) -> io::Result<ResponseWriter<'c>> {
        self.open_writer(status, headers, length, false)
    }

    fn open_writer<K: AsRef<str>, V: AsRef<str>>(
        mut self,
        status: u16,
        headers: &[(K, V)],
        length: Option<u64>,
        event_on_cut: bool,
    ) -> io::Result<ResponseWriter<'c>> {
        self.io.answered = true;
        let chunked = length.is_none() && self.head.version >= HTTPVersion(1, 1);
        let keep = self.keep_alive(false) && (chunked || length.is_some());
        let head = self.head_for(status, headers, length, keep);
        let no_body = self.head.method == Method::Head;
        let mut writer = ResponseWriter {
            blocked_left: self.io.write_limit,
            io: self.io,
            chunked,
            left: length,
            keep,
            no_body,
        };
        // The head goes out before the stream can be cut, so that a cut's last chunk
        // never lands before it.
        let entry = writer.io.entry.clone();
        let mut state = entry.write.lock().unwrap_or_else(|e| e.into_inner());
        let written = writer.write(&[head.as_bytes()]);
        writer.io.give_back(head);
        written?;
        if no_body {
            // Nothing follows the head: no stream for `cut_streams` to end.
            return Ok(writer);
        }
        // A held stream keeps its thread; it need not keep a read buffer too.
        writer.io.release_buffer();
        *state = STREAM_OPEN;
        entry.set_streaming(chunked, event_on_cut);
        drop(state);
        Ok(writer)
    }

    /// Answers `101 Switching Protocols` with `headers` (`Connection: Upgrade` is
    /// added) and hands over the connection for the rest of its life: its socket, and
    /// what the client sent after the request's head that is already buffered. The
    /// connection closes when the handler returns. Refused (`InvalidInput`) for a
    /// request with a body, whose end could not be told from the new protocol's bytes.
    pub fn upgrade<K: AsRef<str>, V: AsRef<str>>(
        self,
        headers: &[(K, V)],
    ) -> io::Result<Upgraded<'c>> {
        if self.body != Framing::Done {
            return Err(io::Error::new(
                ErrorKind::InvalidInput,
                "a request with a body cannot be upgraded",
            ));
        }
        let io = self.io;
        io.answered = true;
        io.reusable = false;
        let mut head = io.take_head_buffer();
        status_line(&mut head, 101);
        push_headers(&mut head, headers);
        head.push_str("Connection: Upgrade\r\n\r\n");
        let deadline = io.answer_deadline();
        let written = io.write_parts(&[head.as_bytes()], deadline);
        io.give_back(head);
        written?;
        let buffered = io.buffered().to_vec();
        io.consume(buffered.len());
        let io: &'c Io = io;
        Ok(Upgraded {
            stream: &io.entry.stream,
            buffered,
        })
    }

    fn read_chunk_size(&mut self) -> io::Result<u64> {
        let invalid = || io::Error::new(ErrorKind::InvalidData, "malformed chunk size line");
        // `1*HEXDIG [ BWS ";" extensions ]` (RFC 9112 §7.1.1): after the digits only
        // spaces, then `;`; after the `;` anything but control bytes.
        let (mut value, mut digits, mut len) = (0u64, 0, 0);
        let (mut after_digits, mut in_extension) = (false, false);
        loop {
            let b = self.io.byte(self.body_deadline)?;
            len += 1;
            if len > MAX_CHUNK_LINE {
                return Err(invalid());
            }
            match b {
                b'\r' => break,
                _ if in_extension => {
                    if b < 0x20 && b != b'\t' || b == 0x7f {
                        return Err(invalid());
                    }
                }
                b';' => in_extension = true,
                b' ' | b'\t' => after_digits = true,
                _ if after_digits => return Err(invalid()),
                _ => {
                    let d = (b as char).to_digit(16).ok_or_else(invalid)?;
                    digits += 1;
                    if digits > 16 {
                        return Err(invalid());
                    }
                    value = value << 4 | u64::from(d);
                }
            }
        }
        if digits == 0 || self.io.byte(self.body_deadline)? != b'\n' {
            return Err(invalid());
        }
        Ok(value)
    }

    /// The trailer section after the last chunk, bounded like a head, and dropped.
    fn skip_trailers(&mut self) -> io::Result<()> {
        let too_large = || io::Error::new(ErrorKind::InvalidData, "chunked trailers too large");
        let (mut lines, mut total, mut line) = (0, 0, 0);
        let mut prev = 0u8;
        loop {
            let b = self.io.byte(self.body_deadline)?;
            total += 1;
            if b == b'\n' && prev == b'\r' {
                if line == 1 {
                    return Ok(());
                }
                lines += 1;
                line = 0;
            } else {
                line += 1;
            }
            if total > MAX_HEAD || line > MAX_HEAD_LINE || lines > MAX_HEADERS {
                return Err(too_large());
            }
            prev = b;
        }
    }

    /// Up to `max` body bytes into `out`, from the buffer or, when it is empty, the
    /// socket (within the body's deadline).
    fn read_raw(&mut self, out: &mut [u8], max: u64) -> io::Result<usize> {
        if self.io.buffered().is_empty() && self.io.fill(self.body_deadline, READ_BUFFER)? == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        let buffered = self.io.buffered();
        let n = buffered
            .len()
            .min(out.len())
            .min(max.try_into().unwrap_or(usize::MAX));
        out[..n].copy_from_slice(&buffered[..n]);
        self.io.consume(n);
        Ok(n)
    }
}

/// How the request's body is framed (RFC 9112 §6), and its declared length: a
/// refusal for anything ambiguous, so that one request can never be read as two.
fn framing(head: &Head) -> Result<(Framing, Option<u64>), Refusal> {
    let http11 = head.version >= HTTPVersion(1, 1);
    let mut declared: Option<u64> = None;
    for value in head.all("content-length") {
        // RFC 9112 §6.3: 1*DIGIT, nothing else; repeats must agree.
        let n = Some(value)
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or(refuse(
                400,
                "invalid_content_length",
                "Content-Length must be one number of bytes.",
            ))?;
        if declared.is_some_and(|d| d != n) {
            return Err(refuse(
                400,
                "invalid_content_length",
                "The request has two different Content-Length values.",
            ));
        }
        declared = Some(n);
    }
    // Any Transfer-Encoding header, even an empty one, means the body is framed by
    // it (RFC 9112 §6.1): only exactly `chunked` is accepted.
    let chunked = head.all("transfer-encoding").next().is_some();
    let (mut codings, mut chunked_at, mut chunked_seen) = (0, None, 0);
    for coding in head
        .all("transfer-encoding")
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|c| !c.is_empty())
    {
        if coding.eq_ignore_ascii_case("chunked") {
            chunked_at = Some(codings);
            chunked_seen += 1;
        }
        codings += 1;
    }
    if chunked {
        if declared.is_some() || !http11 {
            return Err(refuse(
                400,
                "invalid_transfer_encoding",
                "A request may not have both Transfer-Encoding and Content-Length, nor Transfer-Encoding in HTTP/1.0.",
            ));
        }
        match chunked_at {
            Some(at) if at + 1 == codings && codings == 1 => {}
            Some(at) if at + 1 == codings && chunked_seen == 1 => {
                return Err(refuse(
                    501,
                    "unsupported_transfer_encoding",
                    "Only the chunked transfer coding is supported.",
                ))
            }
            Some(_) => {
                return Err(refuse(
                    400,
                    "invalid_transfer_encoding",
                    "chunked must be the last transfer coding, and appear once.",
                ))
            }
            None if codings == 0 => {
                return Err(refuse(
                    400,
                    "invalid_transfer_encoding",
                    "Transfer-Encoding is empty.",
                ))
            }
            None => {
                return Err(refuse(
                    501,
                    "unsupported_transfer_encoding",
                    "Only the chunked transfer coding is supported.",
                ))
            }
        }
    }
    let body = match (chunked, declared) {
        (true, _) => Framing::ChunkSize,
        (false, Some(n)) if n > 0 => Framing::Length(n),
        _ => Framing::Done,
    };
    Ok((body, declared))
}

/// The handler's headers, each on its line, but for the framing headers (the server
/// writes those) and any that could break the head.
fn push_headers<K: AsRef<str>, V: AsRef<str>>(head: &mut String, headers: &[(K, V)]) {
    for (k, v) in headers {
        let (k, v) = (k.as_ref(), v.as_ref());
        let framing = ["content-length", "transfer-encoding", "connection"]
            .iter()
            .any(|f| k.eq_ignore_ascii_case(f));
        if framing || k.contains(['\r', '\n', ':']) || v.contains(['\r', '\n']) {
            continue;
        }
        head.push_str(k);
        head.push_str(": ");
        head.push_str(v);
        head.push_str("\r\n");
    }
}

/// A connection taken over by `Request::upgrade`.
pub struct Upgraded<'c> {
    /// The client's socket. Its timeouts are the new owner's to set.
    pub stream: &'c std::net::TcpStream,
    /// Bytes the client sent after the request's head, already read from the socket.
    pub buffered: Vec<u8>,
}

/// The request body. Errors: `TimedOut` past `Limits::body`, `InvalidData` for broken
/// chunked framing, `UnexpectedEof` when the client closed early.
impl Read for Request<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.read_body(out)?;
        if self.body == Framing::Done {
            self.io.entry.set_busy();
        } else {
            self.io.entry.body_progress(n);
        }
        Ok(n)
    }
}

impl Request<'_> {
    fn read_body(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        if self.continue_pending {
            self.continue_pending = false;
            let deadline = self.io.answer_deadline();
            self.io
                .write_parts(&[b"HTTP/1.1 100 Continue\r\n\r\n"], deadline)?;
        }
        loop {
            match self.body {
                Framing::Done => return Ok(0),
                Framing::Length(left) => {
                    let n = self.read_raw(out, left)?;
                    self.body = match left - n as u64 {
                        0 => Framing::Done,
                        rest => Framing::Length(rest),
                    };
                    return Ok(n);
                }
                Framing::ChunkSize => match self.read_chunk_size()? {
                    0 => {
                        self.skip_trailers()?;
                        self.body = Framing::Done;
                    }
                    size => self.body = Framing::ChunkData(size),
                },
                Framing::ChunkData(0) => {
                    let crlf = [
                        self.io.byte(self.body_deadline)?,
                        self.io.byte(self.body_deadline)?,
                    ];
                    if crlf != *b"\r\n" {
                        return Err(io::Error::new(
                            ErrorKind::InvalidData,
                            "chunk not followed by CRLF",
                        ));
                    }
                    self.body = Framing::ChunkSize;
                }
                Framing::ChunkData(left) => {
                    let n = self.read_raw(out, left)?;
                    self.body = Framing::ChunkData(left - n as u64);
                    return Ok(n);
                }
            }
        }
    }
}

/// A response body being streamed. Each `send` leaves at once (one chunk, one write).
/// A writer dropped without `finish` leaves a truncated body and closes the connection,
/// so the client cannot take it for a complete one.
///
/// A stream may spend `Limits::write` in all waiting for the client to take its bytes
/// (a client that reads as fast as the stream is written costs nothing of it); past
/// that, sends fail with `TimedOut`, so that a client reading a few bytes at a time
/// cannot hold the stream, and what it holds upstream, for ever.
pub struct ResponseWriter<'c> {
    io: &'c mut Io,
    chunked: bool,
    /// With a Content-Length: the bytes still owed.
    left: Option<u64>,
    keep: bool,
    /// The answer to a `HEAD`: what is sent is dropped.
    no_body: bool,
    blocked_left: Duration,
}

impl ResponseWriter<'_> {
    /// Sends `bytes` now. Fails once the client is gone or too slow, or the server cut
    /// the stream.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() || self.no_body {
            return Ok(());
        }
        let entry = self.io.entry.clone();
        let state = entry.write.lock().unwrap_or_else(|e| e.into_inner());
        if *state != STREAM_OPEN {
            return Err(cut());
        }
        if let Some(left) = self.left {
            let rest = left.checked_sub(bytes.len() as u64).ok_or_else(|| {
                io::Error::new(ErrorKind::InvalidData, "more than the Content-Length")
            })?;
            self.left = Some(rest);
        }
        if self.chunked {
            let mut size = [0u8; 18];
            let len = chunk_size_line(bytes.len(), &mut size);
            self.write(&[&size[..len], bytes, b"\r\n"])
        } else {
            self.write(&[bytes])
        }
    }

    /// Ends the body; the connection may then carry another request.
    pub fn finish(mut self) -> io::Result<()> {
        if self.no_body {
            self.io.reusable = self.keep;
            return Ok(());
        }
        let entry = self.io.entry.clone();
        let mut state = entry.write.lock().unwrap_or_else(|e| e.into_inner());
        if *state != STREAM_OPEN {
            return Err(cut());
        }
        if self.left.is_some_and(|left| left > 0) {
            return Err(io::Error::new(
                ErrorKind::UnexpectedEof,
                "less than the Content-Length",
            ));
        }
        if self.chunked {
            self.write(&[b"0\r\n\r\n"])?;
        }
        *state = STREAM_FINISHED;
        self.io.reusable = self.keep;
        Ok(())
    }

    /// Writes within what is left of the stream's time for waiting on the client.
    fn write(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        let started = Instant::now();
        let written = self.io.write_parts(parts, started + self.blocked_left);
        self.blocked_left = self.blocked_left.saturating_sub(started.elapsed());
        written
    }
}

fn cut() -> io::Error {
    io::Error::new(ErrorKind::ConnectionAborted, Cut)
}

/// The error of a writer whose stream the server cut.
#[derive(Debug)]
struct Cut;

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the stream was cut")
    }
}

impl std::error::Error for Cut {}

/// Whether a `ResponseWriter`'s error is the server's cut (`Server::cut_streams`), not
/// a client that left.
pub fn is_cut(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Cut>())
}

impl Drop for ResponseWriter<'_> {
    fn drop(&mut self) {
        let mut state = self
            .io
            .entry
            .write
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if *state == STREAM_OPEN {
            *state = STREAM_CUT;
        }
        self.io.entry.set_busy();
    }
}

/// `{len:x}\r\n` into `out`, without allocating; returns its length.
pub(crate) fn chunk_size_line(len: usize, out: &mut [u8; 18]) -> usize {
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1) as usize;
    for (i, digit) in out[..digits].iter_mut().enumerate() {
        let nibble = (len >> (4 * (digits - 1 - i))) & 0xf;
        *digit = b"0123456789abcdef"[nibble];
    }
    out[digits] = b'\r';
    out[digits + 1] = b'\n';
    digits + 2
}

/// A client's connection, to look at while its request waits (`Request::client_socket`).
pub struct ClientSocket(Arc<crate::Entry>);

impl AsFd for ClientSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.stream.as_fd()
    }
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
