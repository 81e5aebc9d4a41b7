//! The TCP layer under ureq's upstream connections, in place of ureq's own (wired in by
//! `upstream::agent`, below its CONNECT-proxy and rustls layers). Measured per request
//! against a fast upstream, ureq's TCP transport made twelve system calls where five do:
//! - a request's head and body left in two sends (two TCP segments, two wake-ups of the
//!   upstream); here output is held until ureq waits for the answer, then sent at once
//!   (or as soon as `COALESCE` bytes are held, for a large body);
//! - each pooled connection was probed twice per request (taken and returned) with three
//!   calls each (non-blocking on, peek, off); here a probe is one non-blocking peek;
//! - the socket's read timeout was set before every read; here only when the one set
//!   would overshoot what ureq allows.
//!
//! It also lets a thread give its next reads a deadline of their own (`reads_until`) in
//! place of ureq's per-read timeout: a stream's first event may take longer than the
//! gap allowed between later events, and a non-streamed body has a total deadline. And
//! while a thread's client is watched (`watch_client`), its reads look at the client's
//! socket at least once a second and end when the client has left, so an upstream call
//! no one waits for gives its permit back.

use socket2::SockRef;
use std::cell::{Cell, RefCell};
use std::io::{self, ErrorKind, Read, Write};
use std::mem::MaybeUninit;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, Either, LazyBuffers, NextTimeout, ShutdownHandle,
    Transport,
};
use ureq::{Error, Timeout};

/// Output held before it is sent: a request head and a body of up to this much leave
/// together.
const COALESCE: usize = 16 * 1024;
/// A socket timeout may overshoot what ureq allows by this much before it is set again.
const SLACK: Duration = Duration::from_millis(50);
/// No address is given less than this to connect.
const MIN_PER_ADDRESS: Duration = Duration::from_millis(10);
/// How often a watched client's socket is looked at while its upstream call waits.
const CLIENT_CHECK: Duration = Duration::from_secs(1);

thread_local! {
    /// Set by `reads_until`: the deadline that replaces ureq's per-read timeout.
    static READS_UNTIL: Cell<Option<Instant>> = const { Cell::new(None) };
    /// Set by `watch_client`.
    static CLIENT: RefCell<Option<Watched>> = const { RefCell::new(None) };
}

/// The client of this thread's request, and when to look at it next.
struct Watched {
    socket: Box<dyn AsFd>,
    next_check: Instant,
    gone: bool,
}

/// While the returned guard lives, upstream reads on this thread wait until `deadline`
/// at most, instead of ureq's per-read timeout (ureq's other limits still apply).
pub fn reads_until(deadline: Instant) -> ReadDeadline {
    READS_UNTIL.set(Some(deadline));
    ReadDeadline(())
}

pub struct ReadDeadline(());

impl Drop for ReadDeadline {
    fn drop(&mut self) {
        READS_UNTIL.set(None);
    }
}

/// While the returned guard lives, upstream reads on this thread end with an error
/// within about a second of `client` closing its connection (seen as end of file or
/// an error on a peek; a client that only shut its sending side counts as gone).
pub fn watch_client(client: impl AsFd + 'static) -> ClientWatch {
    CLIENT.set(Some(Watched {
        socket: Box::new(client),
        next_check: Instant::now() + CLIENT_CHECK,
        gone: false,
    }));
    ClientWatch(())
}

pub struct ClientWatch(());

impl Drop for ClientWatch {
    fn drop(&mut self) {
        CLIENT.set(None);
    }
}

/// Whether this thread's watched client was seen to leave.
pub fn client_left() -> bool {
    CLIENT.with_borrow(|w| w.as_ref().is_some_and(|w| w.gone))
}

/// For a watched client: an error once it has left, else how long the next read may
/// wait before it is looked at again (`None`: no client is watched).
fn client_check() -> Result<Option<Duration>, Error> {
    CLIENT.with_borrow_mut(|watched| {
        let Some(w) = watched.as_mut() else {
            return Ok(None);
        };
        let now = Instant::now();
        if !w.gone && now >= w.next_check {
            w.gone = has_left(w.socket.as_fd());
            w.next_check = now + CLIENT_CHECK;
        }
        if w.gone {
            return Err(Error::Io(io::Error::new(
                ErrorKind::ConnectionAborted,
                "the client closed its connection",
            )));
        }
        Ok(Some(w.next_check - now))
    })
}

/// Whether a client's socket is closed: a peek finds its end (or an error). Bytes
/// waiting (a next request) mean it is still there.
fn has_left(socket: std::os::fd::BorrowedFd<'_>) -> bool {
    let mut byte = [MaybeUninit::<u8>::uninit()];
    let peeked =
        SockRef::from(&socket).recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT);
    match peeked {
        Ok(n) => n == 0,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock && e.kind() != ErrorKind::Interrupted,
    }
}

#[derive(Debug, Default)]
pub struct TcpConnector;

impl<In: Transport> Connector<In> for TcpConnector {
    type Out = Either<In, TcpTransport>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, Error> {
        if let Some(earlier) = chained {
            return Ok(Some(Either::A(earlier)));
        }
        let stream = connect(details)?;
        let config = details.config;
        let transport = TcpTransport::new(
            stream,
            LazyBuffers::new(config.input_buffer_size(), config.output_buffer_size()),
        );
        let handle = Arc::downgrade(&transport.stream) as Weak<dyn ShutdownHandle>;
        (details.register_shutdown)(handle)?;
        Ok(Some(Either::B(transport)))
    }
}

/// Tries each resolved address in turn, each with an equal share of what is left of the
/// connect timeout.
fn connect(details: &ConnectionDetails) -> Result<TcpStream, Error> {
    let budget = details.timeout.not_zero().map(|t| *t);
    let started = Instant::now();
    let mut last = None;
    let count = details.addrs.len();
    for (i, addr) in details.addrs.iter().enumerate() {
        let attempt = match budget {
            Some(total) => {
                let left = total.saturating_sub(started.elapsed());
                if left.is_zero() {
                    return Err(Error::Timeout(Timeout::Connect));
                }
                let share = left / u32::try_from(count - i).unwrap_or(1);
                TcpStream::connect_timeout(addr, share.max(MIN_PER_ADDRESS))
            }
            None => TcpStream::connect(addr),
        };
        match attempt {
            Ok(stream) => {
                if details.config.no_delay() {
                    stream.set_nodelay(true)?;
                }
                return Ok(stream);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
            Error::Timeout(Timeout::Connect)
        }
        Some(e) => Error::Io(e),
        None => Error::ConnectionFailed,
    })
}

#[derive(Debug)]
pub struct TcpTransport {
    stream: Arc<TcpStream>,
    buffers: LazyBuffers,
    /// Output not sent yet.
    pending: Vec<u8>,
    read_timeout: SocketTimeout,
    write_timeout: SocketTimeout,
}

/// A socket timeout as last set here (`Set(None)`: none), or `Stale` after it fired
/// before what ureq allows had passed (it was set for an earlier, longer wait).
#[derive(Debug, Clone, Copy, PartialEq)]
enum SocketTimeout {
    Set(Option<Duration>),
    Stale,
}

impl SocketTimeout {
    /// Whether it must be set again to respect `wanted` (`None`: no limit).
    fn must_change(self, wanted: Option<Duration>) -> bool {
        match (self, wanted) {
            (SocketTimeout::Stale, _) => true,
            (SocketTimeout::Set(None), None) => false,
            (SocketTimeout::Set(Some(set)), Some(wanted)) => set > wanted + SLACK,
            (SocketTimeout::Set(_), _) => true,
        }
    }
}

impl TcpTransport {
    fn new(stream: TcpStream, buffers: LazyBuffers) -> TcpTransport {
        TcpTransport {
            stream: Arc::new(stream),
            buffers,
            pending: Vec::new(),
            read_timeout: SocketTimeout::Set(None),
            write_timeout: SocketTimeout::Set(None),
        }
    }

    /// Sends what is held, within ureq's write timeout.
    fn flush(&mut self, timeout: NextTimeout) -> Result<(), Error> {
        let timeout = timeout.for_write();
        let budget = timeout.not_zero().map(|t| *t);
        let started = Instant::now();
        let mut sent = 0;
        while sent < self.pending.len() {
            let left = remaining(budget, started).ok_or(Error::Timeout(timeout.reason))?;
            if self.write_timeout.must_change(left) {
                self.stream.set_write_timeout(left)?;
                self.write_timeout = SocketTimeout::Set(left);
            }
            match (&*self.stream).write(&self.pending[sent..]) {
                Ok(0) => return Err(Error::Io(ErrorKind::WriteZero.into())),
                Ok(n) => sent += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    self.write_timeout = SocketTimeout::Stale;
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.pending.clear();
        Ok(())
    }
}

/// What is left of `budget` (`None`: no limit), or `None` inside `Some` when it is spent.
fn remaining(budget: Option<Duration>, started: Instant) -> Option<Option<Duration>> {
    match budget {
        None => Some(None),
        Some(total) => {
            let left = total.saturating_sub(started.elapsed());
            (!left.is_zero()).then_some(Some(left))
        }
    }
}

impl Transport for TcpTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), Error> {
        let output = &self.buffers.output()[..amount];
        self.pending.extend_from_slice(output);
        if self.pending.len() >= COALESCE {
            self.flush(timeout)?;
        }
        Ok(())
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, Error> {
        self.flush(timeout)?;
        let timeout = match READS_UNTIL.get() {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Error::Timeout(Timeout::PerRead));
                }
                NextTimeout {
                    per_read: Some(left.into()),
                    ..timeout
                }
            }
            None => timeout,
        }
        .for_read();
        let budget = timeout.not_zero().map(|t| *t);
        let started = Instant::now();
        loop {
            let left = remaining(budget, started).ok_or(Error::Timeout(timeout.reason))?;
            let left = match client_check()? {
                Some(check) => Some(left.map_or(check, |l| l.min(check))),
                None => left,
            };
            if self.read_timeout.must_change(left) {
                self.stream.set_read_timeout(left)?;
                self.read_timeout = SocketTimeout::Set(left);
            }
            let input = self.buffers.input_append_buf();
            match (&*self.stream).read(input) {
                Ok(n) => {
                    self.buffers.input_appended(n);
                    return Ok(n > 0);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    self.read_timeout = SocketTimeout::Stale;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Open, with nothing unread: the peek finds no data and would block. Closed (the
    /// peek reads 0), bytes the upstream should not have sent, or an error: not open.
    fn is_open(&mut self) -> bool {
        let mut byte = [MaybeUninit::<u8>::uninit()];
        let peeked = SockRef::from(&*self.stream)
            .recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT);
        matches!(peeked, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair() -> (TcpTransport, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (
            TcpTransport::new(client, LazyBuffers::new(10 * 1024, 4 * 1024)),
            server,
        )
    }

    fn timeout() -> NextTimeout {
        NextTimeout {
            after: Duration::from_secs(5).into(),
            reason: Timeout::Global,
            per_read: None,
            per_write: None,
        }
    }

    fn transmit(t: &mut TcpTransport, bytes: &[u8]) {
        t.buffers().output()[..bytes.len()].copy_from_slice(bytes);
        t.transmit_output(bytes.len(), timeout()).unwrap();
    }

    #[test]
    fn head_and_body_leave_together_when_the_answer_is_awaited() {
        let (mut t, mut server) = pair();
        transmit(&mut t, b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\n");
        transmit(&mut t, b"body");
        server.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 256];
        assert_eq!(
            server.read(&mut buf).unwrap_err().kind(),
            ErrorKind::WouldBlock,
            "nothing sent before the answer is awaited"
        );
        server.set_nonblocking(false).unwrap();
        std::thread::spawn(move || {
            let n = server.read(&mut buf).unwrap();
            assert!(buf[..n].ends_with(b"\r\n\r\nbody"), "one send");
            server.write_all(b"HTTP/1.1 200 OK\r\n").unwrap();
        });
        assert!(t.await_input(timeout()).unwrap());
        assert_eq!(t.buffers().input(), b"HTTP/1.1 200 OK\r\n");
    }

    #[test]
    fn a_probe_tells_open_from_closed_and_from_unexpected_bytes() {
        let (mut t, server) = pair();
        assert!(t.is_open(), "idle and open");
        drop(server);
        assert!(
            crate::testutil::wait_until(|| !t.is_open()),
            "closed by the upstream"
        );
        let (mut t, mut server) = pair();
        server.write_all(b"x").unwrap();
        assert!(
            crate::testutil::wait_until(|| !t.is_open()),
            "bytes nobody asked for"
        );
    }
}
