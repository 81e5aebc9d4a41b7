//! One client connection, served by its own thread, request after request: the thread
//! that reads a request runs the handler that answers it. The head parser (RFC 9112
//! §2–5). Every read has a deadline and every buffer a cap.

use crate::common::{HTTPVersion, Method};
use crate::request::Request;
use crate::{Entry, Shared};
use std::cell::RefCell;
use std::io::{self, ErrorKind, IoSlice, Read, Write};
use std::net::Shutdown;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// A head line may be at most this long, a head at most this many header lines and
/// bytes. Over any of them: 431.
pub(crate) const MAX_HEAD_LINE: usize = 16 * 1024;
pub(crate) const MAX_HEADERS: usize = 128;
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// A connection's read buffer; it grows, up to `MAX_HEAD`, only for a long head.
pub(crate) const READ_BUFFER: usize = 4 * 1024;
/// A connection closed while the client may still be sending (an unread body) reads
/// and drops what comes for this long, or this much, so that the close does not reset
/// the connection under an answer the client has not read yet.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 1 << 20;
/// A socket read timeout may overshoot a deadline by this much before it is set again.
const TIMEOUT_SLACK: Duration = Duration::from_millis(50);

/// RFC 9110 §5.6.2 token characters.
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Why a request is refused before the handler sees it, as the client will read it.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) status: u16,
    pub(crate) code: &'static str,
    pub(crate) message: &'static str,
}

pub(crate) const fn refuse(status: u16, code: &'static str, message: &'static str) -> Refusal {
    Refusal {
        status,
        code,
        message,
    }
}

const MALFORMED: Refusal = refuse(
    400,
    "invalid_http_request",
    "The request line is malformed: expected `METHOD /path HTTP/1.1`.",
);
const HEAD_TOO_LARGE: Refusal = refuse(
    431,
    "request_header_fields_too_large",
    "The request head is too large: at most 16 KiB per line, 128 header lines and 64 KiB in all.",
);
const HEAD_TIMEOUT: Refusal = refuse(
    408,
    "request_timeout",
    "The request head did not arrive in time.",
);

/// The socket of a connection and its read buffer.
pub(crate) struct Io {
    pub(crate) entry: Arc<Entry>,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// SO_RCVTIMEO as last set here.
    read_timeout: Option<Duration>,
    /// SO_SNDTIMEO as last set here, and how long one answer's writes may take.
    write_timeout: Option<Duration>,
    pub(crate) write_limit: Duration,
    /// Set by the answer: the connection may carry another request.
    pub(crate) reusable: bool,
    /// Set when the connection is closed before all the client sent was read.
    pub(crate) unread_input: bool,
    /// Set once the current request has been answered (or its answer begun).
    pub(crate) answered: bool,
    /// Where an answer's head is put together, reused from one answer to the next.
    head_buffer: String,
}

impl Io {
    pub(crate) fn new(entry: Arc<Entry>, write_limit: Duration) -> Io {
        Io {
            entry,
            buf: vec![0; READ_BUFFER],
            start: 0,
            end: 0,
            read_timeout: None,
            write_timeout: Some(write_limit),
            write_limit,
            reusable: false,
            unread_input: false,
            answered: false,
            head_buffer: String::new(),
        }
    }

    pub(crate) fn take_head_buffer(&mut self) -> String {
        let mut head = std::mem::take(&mut self.head_buffer);
        head.clear();
        head
    }

    /// Keeps `head`'s allocation for the next answer (unless a long head grew it).
    pub(crate) fn give_back(&mut self, head: String) {
        if head.capacity() <= 4 * 1024 {
            self.head_buffer = head;
        }
    }

    pub(crate) fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub(crate) fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start >= self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads more from the socket into the buffer (which may grow up to `cap`),
    /// waiting until `deadline` at most. Returns how many bytes came; 0 means the
    /// client closed its side.
    pub(crate) fn fill(&mut self, deadline: Instant, cap: usize) -> io::Result<usize> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.buf.len() < cap {
                let grown = (self.buf.len() * 2).clamp(READ_BUFFER, cap);
                self.buf.resize(grown, 0);
            } else {
                return Err(io::Error::new(ErrorKind::InvalidData, "read buffer full"));
            }
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ErrorKind::TimedOut.into());
            }
            // The socket timeout bounds one read; set it only when it would overshoot
            // the deadline, so that a normal request costs no extra system call.
            if self.read_timeout.is_none_or(|t| t > left + TIMEOUT_SLACK) {
                let t = left.max(Duration::from_millis(1));
                self.entry.stream.set_read_timeout(Some(t))?;
                self.read_timeout = Some(t);
            }
            match (&self.entry.stream).read(&mut self.buf[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // The socket timeout was shorter than what is left (set for an earlier
                // deadline): set it again and go on waiting.
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    self.read_timeout = None;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The next byte of input, waiting until `deadline` for it.
    pub(crate) fn byte(&mut self, deadline: Instant) -> io::Result<u8> {
        if self.start == self.end && self.fill(deadline, READ_BUFFER)? == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        let b = self.buf[self.start];
        self.consume(1);
        Ok(b)
    }

    /// Writes every part, in as few system calls as the socket allows (one, usually),
    /// by `deadline` at most: a client that reads too slowly gets `TimedOut`.
    pub(crate) fn write_parts(&mut self, parts: &[&[u8]], deadline: Instant) -> io::Result<()> {
        let (mut i, mut off) = (0, 0);
        loop {
            while i < parts.len() && off >= parts[i].len() {
                i += 1;
                off = 0;
            }
            if i == parts.len() {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ErrorKind::TimedOut.into());
            }
            if self.write_timeout.is_none_or(|t| t > left + TIMEOUT_SLACK) {
                let t = left.max(Duration::from_millis(1));
                self.entry.stream.set_write_timeout(Some(t))?;
                self.write_timeout = Some(t);
            }
            let mut slices = [IoSlice::new(&[]); 4];
            let mut n = 0;
            for (k, part) in parts[i..].iter().take(slices.len()).enumerate() {
                slices[k] = IoSlice::new(if k == 0 { &part[off..] } else { part });
                n += 1;
            }
            match (&self.entry.stream).write_vectored(&slices[..n]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(mut written) => {
                    while written > 0 {
                        let left = parts[i].len() - off;
                        if written < left {
                            off += written;
                            break;
                        }
                        written -= left;
                        i += 1;
                        off = 0;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    self.write_timeout = None;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The deadline for one answer's writes.
    pub(crate) fn answer_deadline(&self) -> Instant {
        Instant::now() + self.write_limit
    }

    /// Answers with an OpenAI-shaped error and `Connection: close`.
    pub(crate) fn refuse(&mut self, r: &Refusal) {
        self.answered = true;
        let body = format!(
            r#"{{"error":{{"message":"{}","type":"invalid_request_error","param":null,"code":"{}"}}}}"#,
            r.message, r.code
        );
        let mut head = String::new();
        status_line(&mut head, r.status);
        head.push_str("Content-Type: application/json\r\nConnection: close\r\n");
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let deadline = self.answer_deadline();
        let _ = self.write_parts(&[head.as_bytes(), body.as_bytes()], deadline);
    }

    /// Ends the connection: see `LINGER`.
    pub(crate) fn close(&mut self) {
        let _ = self.entry.stream.shutdown(Shutdown::Write);
        if !self.unread_input {
            return;
        }
        let deadline = Instant::now() + LINGER;
        let mut seen = 0;
        while seen < LINGER_BYTES {
            self.start = 0;
            self.end = 0;
            match self.fill(deadline, READ_BUFFER) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen += n,
            }
        }
    }

    /// Frees the read buffer while nothing is buffered (a streamed answer reads nothing
    /// from the client); `fill` allocates it again when needed.
    pub(crate) fn release_buffer(&mut self) {
        if self.start == self.end {
            self.buf = Vec::new();
            self.start = 0;
            self.end = 0;
        }
    }

    /// Back to the normal buffer after a long head, once nothing is left in it.
    fn shrink(&mut self) {
        if self.buf.len() > READ_BUFFER && self.start == self.end {
            self.buf.truncate(READ_BUFFER);
            self.buf.shrink_to_fit();
            self.start = 0;
            self.end = 0;
        }
    }
}

/// `HTTP/1.1 {status} {reason}` and the `Date` header, the start of every answer.
pub(crate) fn status_line(head: &mut String, status: u16) {
    use std::fmt::Write as _;
    let _ = write!(head, "HTTP/1.1 {status} ");
    head.push_str(crate::StatusCode(status).default_reason_phrase());
    head.push_str("\r\nDate: ");
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        let now = SystemTime::now();
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |t| t.as_secs());
        if d.0 != secs {
            *d = (secs, httpdate::fmt_http_date(now));
        }
        head.push_str(&d.1);
    });
    head.push_str("\r\n");
}

thread_local! {
    /// The `Date` value, formatted once per second per thread.
    static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// A request head, kept in one buffer reused by every request of a connection.
pub(crate) struct Head {
    pub(crate) text: String,
    pub(crate) method: Method,
    pub(crate) target: Range<usize>,
    pub(crate) version: HTTPVersion,
    pub(crate) headers: Vec<(Range<usize>, Range<usize>)>,
}

impl Head {
    pub(crate) fn new() -> Head {
        Head {
            text: String::new(),
            method: Method::Get,
            target: 0..0,
            version: HTTPVersion(1, 1),
            headers: Vec::new(),
        }
    }

    pub(crate) fn get(&self, r: &Range<usize>) -> &str {
        &self.text[r.clone()]
    }

    /// Values of every header called `name`, in order.
    pub(crate) fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(k, _)| self.get(k).eq_ignore_ascii_case(name))
            .map(move |(_, v)| self.get(v))
    }

    /// Reads the next head off `io` into `self`. `Err(None)`: the client closed or the
    /// socket failed, so there is no one to answer.
    fn read(&mut self, io: &mut Io, deadline: Instant) -> Result<(), Option<Refusal>> {
        let mut scanned = 0;
        let len = loop {
            let buf = io.buffered();
            if let Some(at) = buf[scanned..].windows(4).position(|w| w == b"\r\n\r\n") {
                break scanned + at + 4;
            }
            if buf.len() >= MAX_HEAD {
                return Err(Some(HEAD_TOO_LARGE));
            }
            scanned = buf.len().saturating_sub(3);
            match io.fill(deadline, MAX_HEAD) {
                Ok(0) => return Err(None),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::TimedOut => return Err(Some(HEAD_TIMEOUT)),
                Err(_) => return Err(None),
            }
        };
        let result = self.parse(&io.buffered()[..len - 4]);
        io.consume(len);
        result.map_err(Some)
    }

    pub(crate) fn parse(&mut self, raw: &[u8]) -> Result<(), Refusal> {
        self.headers.clear();
        let mut lines = crlf_lines(raw);
        let (_, request_line) = lines.next().unwrap_or((0, &[]));
        if request_line.len() > MAX_HEAD_LINE {
            return Err(HEAD_TOO_LARGE);
        }
        let (method, target, version) = parse_request_line(request_line)?;
        for (start, line) in lines {
            if line.len() > MAX_HEAD_LINE || self.headers.len() >= MAX_HEADERS {
                return Err(HEAD_TOO_LARGE);
            }
            let (name, value) = parse_header(line)?;
            self.headers.push((
                start + name.start..start + name.end,
                start + value.start..start + value.end,
            ));
        }
        // Every line was checked above, so every byte is ASCII.
        let mut text = std::mem::take(&mut self.text).into_bytes();
        text.clear();
        text.extend_from_slice(raw);
        self.text = String::from_utf8(text).map_err(|_| MALFORMED)?;
        self.target = target;
        self.method = method;
        self.version = version;
        Ok(())
    }
}

/// The lines of a head (without its final empty line), each with its offset. Only
/// CRLF ends a line; a bare CR or LF stays inside it, where the checks refuse it.
fn crlf_lines(raw: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let mut at = 0;
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        let rest = &raw[at..];
        let start = at;
        match rest.windows(2).position(|w| w == b"\r\n") {
            Some(i) => {
                at += i + 2;
                Some((start, &rest[..i]))
            }
            None => {
                done = true;
                Some((start, rest))
            }
        }
    })
}

/// `METHOD SP request-target SP HTTP-version` (RFC 9112 §3).
fn parse_request_line(line: &[u8]) -> Result<(Method, Range<usize>, HTTPVersion), Refusal> {
    let mut parts = line.splitn(3, |&b| b == b' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(MALFORMED);
    };
    let method: Method = std::str::from_utf8(method)
        .ok()
        .and_then(|m| m.parse().ok())
        .ok_or(MALFORMED)?;
    if target.is_empty() || !target.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(refuse(
            400,
            "invalid_http_request",
            "The request target must be printable ASCII (percent-encode anything else).",
        ));
    }
    let version = match version {
        b"HTTP/1.1" => HTTPVersion(1, 1),
        b"HTTP/1.0" => HTTPVersion(1, 0),
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() && *major >= b'2' =>
        {
            return Err(refuse(
                505,
                "http_version_not_supported",
                "This server speaks HTTP/1.1 (and 1.0) only.",
            ))
        }
        _ => return Err(MALFORMED),
    };
    let start = method.as_str().len() + 1;
    Ok((method, start..start + target.len(), version))
}

/// `name ":" OWS value OWS` (RFC 9112 §5), name and value as ranges of `line`.
fn parse_header(line: &[u8]) -> Result<(Range<usize>, Range<usize>), Refusal> {
    let colon = line.iter().position(|&b| b == b':');
    let Some(colon) = colon.filter(|&c| c > 0 && line[..c].iter().all(|&b| is_tchar(b))) else {
        return Err(refuse(
            400,
            "invalid_http_request",
            "A header line is malformed: expected `Name: value` with a token as its name.",
        ));
    };
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let value = &line[colon + 1..];
    let lead = value.iter().take_while(|b| is_ows(b)).count();
    let trail = value[lead..].iter().rev().take_while(|b| is_ows(b)).count();
    let value_range = colon + 1 + lead..line.len() - trail;
    for &b in &line[value_range.clone()] {
        if b >= 0x80 {
            return Err(refuse(
                400,
                "invalid_http_request",
                "A header value contains non-ASCII bytes; header values must be ASCII.",
            ));
        }
        if b < 0x20 && b != b'\t' || b == 0x7f {
            return Err(refuse(
                400,
                "invalid_http_request",
                "A header value contains a control character.",
            ));
        }
    }
    Ok((0..colon, value_range))
}

/// Serves one connection until it closes: waits for a request, reads its head,
/// hands it to the handler, and keeps the connection if the answer allows it.
pub(crate) fn serve(entry: Arc<Entry>, shared: &Shared) {
    let mut io = Io::new(entry, shared.limits.write);
    let mut head = Head::new();
    loop {
        if shared.is_draining() {
            return io.close();
        }
        let idle_until = Instant::now() + shared.limits.idle;
        loop {
            // RFC 9112 §2.2: empty lines before a request line are ignored; a client
            // that sends one after a request is still idle.
            while io.buffered().starts_with(b"\r\n") {
                io.consume(2);
            }
            if !io.buffered().is_empty() && io.buffered() != b"\r" {
                break;
            }
            match io.fill(idle_until, READ_BUFFER) {
                Ok(n) if n > 0 => {}
                // The client closed, or the connection idled out: nothing to answer.
                _ => return,
            }
        }
        io.entry.set_reading_head(shared);
        match head.read(&mut io, Instant::now() + shared.limits.head) {
            Ok(()) => {}
            Err(None) => return,
            Err(Some(refusal)) => {
                io.refuse(&refusal);
                io.unread_input = true;
                return io.close();
            }
        }
        io.answered = false;
        io.reusable = false;
        let request = match Request::new(&mut io, &head, shared) {
            Ok(r) => r,
            Err(refusal) => {
                io.refuse(&refusal);
                io.unread_input = true;
                return io.close();
            }
        };
        let handled = catch_unwind(AssertUnwindSafe(|| (shared.handler)(request)));
        if !io.answered {
            io.refuse(&refuse(
                500,
                "internal_error",
                "The server failed while handling this request.",
            ));
            io.unread_input = true;
            return io.close();
        }
        if handled.is_err() || !io.reusable {
            return io.close();
        }
        io.shrink();
        io.entry.set_idle(shared);
    }
}

#[cfg(test)]
#[path = "conn_tests.rs"]
mod tests;
