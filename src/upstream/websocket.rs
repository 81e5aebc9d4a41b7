//! The Realtime API's WebSocket connections (DESIGN §5.7): the upstream's handshake
//! (TCP, TLS on the rustls and Mozilla roots already in the tree, the WebSocket
//! upgrade, classified into an `Outcome` like any attempt), the relay of one session
//! (messages both ways as they come, one thread per direction, within its bounds,
//! both sides ended with a close frame), and the open sessions (`Sessions`): how many,
//! and ending them all at shutdown.

use crate::outcome::Outcome;
use crate::upstream::headers;
use parking_lot::Mutex;
use std::borrow::Borrow;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::HandshakeError;
use tungstenite::http::{HeaderName, HeaderValue};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocket, WebSocketConfig, WebSocketContext};
use tungstenite::{Error as WsError, Message};

/// Stack of a session's second thread (the upstream's reader): what a connection's
/// thread gets (see `http`), since it runs the same kind of frames.
const STACK_SIZE: usize = 512 * 1024;
/// Bytes read from the network at once; a message larger than this is read in steps.
const READ_BUFFER: usize = 16 * 1024;

/// A session's bounds and the upstream's timeouts.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The largest message (and frame) either side may send.
    pub max_message: usize,
    /// No message either way for this long ends the session.
    pub idle: Duration,
    /// The longest a session may last.
    pub max_length: Duration,
    /// Connecting to the upstream (TCP and TLS).
    pub connect: Duration,
    /// The upstream's answer to the handshake.
    pub handshake: Duration,
    /// One write to either side.
    pub write: Duration,
}

impl Limits {
    fn config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            .max_message_size(Some(self.max_message))
            .max_frame_size(Some(self.max_message))
            // A relayed message is at most `max_message`; a side that does not read
            // fails its writes by the write timeout, not by a growing buffer.
            .write_buffer_size(0)
            .max_write_buffer_size(self.max_message.saturating_mul(2).max(1 << 20))
    }

    /// How long a reader blocks before it looks at the clock (idle, length, an end
    /// asked from outside the session).
    fn tick(&self) -> Duration {
        (self.idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }
}

/// One side's connection, shared by the thread that reads it and the thread that
/// writes to it. Only one thread reads; each write is whole frames under a lock, so
/// the frames of the two threads never interleave.
trait Link: Send + Sync {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn write_all(&self, bytes: &[u8]) -> io::Result<()>;
    /// The TCP socket under it, for its timeouts and to wake its reader.
    fn socket(&self) -> &TcpStream;
}

/// A connection without TLS: the client's (borrowed from the server) or a `ws://`
/// upstream's (owned).
struct Plain<S> {
    socket: S,
    writing: Mutex<()>,
}

impl<S: Borrow<TcpStream> + Send + Sync> Link for Plain<S> {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut socket: &TcpStream = self.socket.borrow();
        socket.read(buf)
    }

    fn write_all(&self, bytes: &[u8]) -> io::Result<()> {
        let _turn = self.writing.lock();
        let mut socket: &TcpStream = self.socket.borrow();
        socket.write_all(bytes)
    }

    fn socket(&self) -> &TcpStream {
        self.socket.borrow()
    }
}

/// A `wss://` upstream. The TLS state is locked only to feed it or take from it, never
/// while the reader waits on the socket, so the other thread can write meanwhile.
struct Tls {
    conn: Mutex<rustls::ClientConnection>,
    socket: TcpStream,
}

impl Link for Tls {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut raw = [0u8; 8 * 1024];
        loop {
            match self.conn.lock().reader().read(buf) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                done => return done,
            }
            let n = (&self.socket).read(&mut raw)?;
            if n == 0 {
                return Ok(0);
            }
            let mut conn = self.conn.lock();
            let mut fed = &raw[..n];
            while !fed.is_empty() {
                conn.read_tls(&mut fed)?;
                let processed = conn.process_new_packets();
                // An alert (or a key update's answer) goes out before anything else.
                while conn.wants_write() {
                    conn.write_tls(&mut &self.socket)?;
                }
                processed.map_err(|e| io::Error::new(ErrorKind::InvalidData, e))?;
            }
        }
    }

    fn write_all(&self, bytes: &[u8]) -> io::Result<()> {
        let mut conn = self.conn.lock();
        conn.writer().write_all(bytes)?;
        while conn.wants_write() {
            conn.write_tls(&mut &self.socket)?;
        }
        Ok(())
    }

    fn socket(&self) -> &TcpStream {
        &self.socket
    }
}

/// A side's link as tungstenite's stream. A write goes out whole at once, and
/// tungstenite only ever writes whole frames, so one write never carries part of one.
struct Half<'a>(Arc<dyn Link + 'a>);

impl Read for Half<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Half<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the proxy sends an upstream in its handshake.
pub struct Handshake<'a> {
    /// `ws://` or `wss://`, from the instance's `Address`.
    pub url: &'a str,
    /// The credential and the client's headers that travel.
    pub headers: &'a [(&'a str, &'a str)],
    /// The client's subprotocols but those that carry a key, comma-separated.
    pub protocols: Option<&'a str>,
}

/// An upstream that accepted a session.
pub struct Upstream {
    link: Arc<dyn Link>,
    /// Holds what the upstream sent right after its handshake (e.g. `session.created`).
    reader: WebSocket<Half<'static>>,
    /// The subprotocol the upstream chose.
    pub protocol: Option<String>,
}

/// An upstream's answer other than `101`: what the client hears if no other instance
/// takes the session.
pub struct Refusal {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// One handshake with an upstream: its outcome, and the session or the refusal to pass
/// on when the upstream answered. `Err` when the request cannot be made at all (a URL or
/// header the WebSocket client refuses): no instance is to blame.
#[allow(clippy::type_complexity)]
pub fn connect(
    h: &Handshake,
    limits: &Limits,
) -> Result<(Outcome, Option<Result<Upstream, Refusal>>), String> {
    let mut request = h.url.into_client_request().map_err(|e| e.to_string())?;
    let pairs = h
        .headers
        .iter()
        .copied()
        .chain(h.protocols.map(|p| ("sec-websocket-protocol", p)));
    for (name, value) in pairs {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?;
        let value = HeaderValue::from_str(value).map_err(|e| e.to_string())?;
        request.headers_mut().append(name, value);
    }
    let uri = request.uri().clone();
    let tls = uri.scheme_str() == Some("wss");
    let host = uri.host().unwrap_or_default();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let socket = match open(host.trim_matches(['[', ']']), port, limits) {
        Ok(s) => s,
        Err(e) => {
            log::warn!("realtime upstream {host}:{port}: cannot connect: {e}");
            return Ok((unreachable(&e, false), None));
        }
    };
    let link: Arc<dyn Link> = if tls {
        match tls_link(host, socket) {
            Ok(link) => Arc::new(link),
            Err(e) => {
                log::warn!("realtime upstream {host}:{port}: TLS failed: {e}");
                return Ok((unreachable(&e, false), None));
            }
        }
    } else {
        Arc::new(Plain {
            socket,
            writing: Mutex::new(()),
        })
    };
    let config = limits.config();
    match tungstenite::client::client_with_config(request, Half(link.clone()), Some(config)) {
        Ok((reader, response)) => {
            let protocol = response
                .headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let outcome = Outcome::Answered {
                status: 101,
                remaining_tokens: None,
                remaining_requests: None,
            };
            let upstream = Upstream {
                link,
                reader,
                protocol,
            };
            Ok((outcome, Some(Ok(upstream))))
        }
        Err(HandshakeError::Failure(WsError::Http(response))) => {
            let status = response.status().as_u16();
            let header = |name: &str| {
                let v = response.headers().get(name)?.to_str().ok()?;
                Some(v.to_string())
            };
            let number = |name: &str| header(name)?.trim().parse::<u64>().ok();
            // A 2xx or 3xx is no session: a failure of the instance, not an answer.
            let outcome = if (200..400).contains(&status) {
                Outcome::Failed { status }
            } else {
                Outcome::of_status(
                    status,
                    || headers::retry_after(header, SystemTime::now()),
                    || {
                        (
                            number("x-ratelimit-remaining-tokens"),
                            number("x-ratelimit-remaining-requests"),
                        )
                    },
                )
            };
            let returned = response
                .headers()
                .iter()
                .filter(|(k, _)| headers::return_response_header(k.as_str()))
                .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_string())))
                .collect();
            let body = response.into_body().unwrap_or_default();
            let refusal = Refusal {
                status,
                headers: returned,
                body,
            };
            Ok((outcome, Some(Err(refusal))))
        }
        // A read timeout during the handshake leaves it half done.
        Err(HandshakeError::Interrupted(_)) => Ok((Outcome::TimedOut, None)),
        Err(HandshakeError::Failure(WsError::Io(e))) => {
            log::warn!("realtime upstream {host}:{port}: handshake failed: {e}");
            Ok((unreachable(&e, true), None))
        }
        Err(HandshakeError::Failure(e)) => {
            log::warn!("realtime upstream {host}:{port}: handshake failed: {e}");
            Ok((Outcome::Unreachable { arrived: true }, None))
        }
    }
}

fn unreachable(e: &io::Error, arrived: bool) -> Outcome {
    match e.kind() {
        ErrorKind::TimedOut | ErrorKind::WouldBlock if arrived => Outcome::TimedOut,
        _ => Outcome::Unreachable { arrived },
    }
}

/// A TCP connection to `host:port` within the connect timeout, with the handshake's
/// timeouts set.
fn open(host: &str, port: u16, limits: &Limits) -> io::Result<TcpStream> {
    let mut last = io::Error::new(ErrorKind::NotFound, "the host has no address");
    for addr in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, limits.connect) {
            Ok(socket) => {
                socket.set_nodelay(true)?;
                socket.set_read_timeout(Some(limits.handshake))?;
                socket.set_write_timeout(Some(limits.write))?;
                return Ok(socket);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// The TLS client configuration: ring and the Mozilla roots, as ureq's.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            // The upgrade is HTTP/1.1; without this a server might pick h2.
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(Arc::new(config))
        })
        .clone()
}

/// The TLS handshake with `host` over `socket`, within the socket's timeouts.
fn tls_link(host: &str, mut socket: TcpStream) -> io::Result<Tls> {
    let other = |e: String| io::Error::other(e);
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| other(e.to_string()))?;
    let mut conn = rustls::ClientConnection::new(tls_config().map_err(other)?, name)
        .map_err(|e| other(e.to_string()))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut socket)?;
    }
    Ok(Tls {
        conn: Mutex::new(conn),
        socket,
    })
}

/// How a session ended: counted in the statistics and written in its log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The client sent a close frame: relayed to the upstream.
    ClientClosed,
    /// The upstream sent a close frame: relayed to the client.
    UpstreamClosed,
    /// The client's connection failed or ended without a close frame.
    ClientGone,
    /// The upstream's connection failed or ended without a close frame.
    UpstreamGone,
    /// The client sent a message over `realtime.max_message_bytes`.
    ClientTooBig,
    /// The upstream sent a message over `realtime.max_message_bytes`.
    UpstreamTooBig,
    /// No message either way for `realtime.idle_timeout`.
    Idle,
    /// The session reached `realtime.max_session_seconds`.
    MaxLength,
    /// The proxy shut down with the session still open at the end of its grace period.
    Shutdown,
    /// No socket handle or thread could be had for the session.
    NoResources,
}

/// RFC 6455 §7.4.1: 1001 "going away" (a server going down; here also a session the
/// proxy ends for idling or length), 1009 "message too big", 1011 "unexpected
/// condition" (the client's session failed upstream).
const GOING_AWAY: u16 = 1001;
const TOO_BIG: u16 = 1009;
const UNEXPECTED: u16 = 1011;

impl Closed {
    pub const ALL: [Closed; 10] = [
        Closed::ClientClosed,
        Closed::UpstreamClosed,
        Closed::ClientGone,
        Closed::UpstreamGone,
        Closed::ClientTooBig,
        Closed::UpstreamTooBig,
        Closed::Idle,
        Closed::MaxLength,
        Closed::Shutdown,
        Closed::NoResources,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Closed::ClientClosed => "client_closed",
            Closed::UpstreamClosed => "upstream_closed",
            Closed::ClientGone => "client_gone",
            Closed::UpstreamGone => "upstream_gone",
            Closed::ClientTooBig => "client_message_too_big",
            Closed::UpstreamTooBig => "upstream_message_too_big",
            Closed::Idle => "idle",
            Closed::MaxLength => "max_length",
            Closed::Shutdown => "shutdown",
            Closed::NoResources => "no_resources",
        }
    }

    /// The close frames the proxy sends (to the client, to the upstream); none to a
    /// side that closed itself (its close is answered by the protocol) or is gone.
    fn frames(self) -> [Option<(u16, &'static str)>; 2] {
        let away = |why| Some((GOING_AWAY, why));
        match self {
            Closed::ClientClosed | Closed::UpstreamClosed => [None, None],
            Closed::ClientGone => [None, away("the client went away")],
            Closed::UpstreamGone => [
                Some((UNEXPECTED, "the upstream connection ended without a close")),
                None,
            ],
            Closed::ClientTooBig => [
                Some((TOO_BIG, "message over realtime.max_message_bytes")),
                away("the client sent a message too big to relay"),
            ],
            Closed::UpstreamTooBig => [
                Some((
                    UNEXPECTED,
                    "an upstream message was over realtime.max_message_bytes",
                )),
                Some((
                    TOO_BIG,
                    "message over the proxy's realtime.max_message_bytes",
                )),
            ],
            Closed::Idle => [away("idle for realtime.idle_timeout"); 2],
            Closed::MaxLength => [away("session reached realtime.max_session_seconds"); 2],
            Closed::Shutdown => [away("the proxy is shutting down"); 2],
            Closed::NoResources => [
                Some((UNEXPECTED, "the proxy has no resources for a session")),
                None,
            ],
        }
    }
}

/// What the open sessions share with the outside: why one is to end (set once), and
/// its sockets, shut for reading to wake its readers when it is ended from elsewhere.
pub struct Control {
    why: Mutex<Option<Closed>>,
    sockets: [TcpStream; 2],
}

impl Control {
    /// Ends the session for `why` (unless it is ending already): its readers wake, and
    /// one of them sends the close frames.
    pub fn end(&self, why: Closed) {
        self.why.lock().get_or_insert(why);
        for socket in &self.sockets {
            let _ = socket.shutdown(Shutdown::Read);
        }
    }
}

/// The Realtime API sessions open (or opening) at once.
#[derive(Default, Clone)]
pub struct Sessions(Arc<Mutex<Open>>);

#[derive(Default)]
struct Open {
    seats: usize,
    controls: Vec<Arc<Control>>,
    /// Set by `end_all`: a session that starts afterwards ends at once.
    ending: Option<Closed>,
}

/// A place among the open sessions, from the handshake to the session's end.
pub struct Seat {
    sessions: Sessions,
    control: Option<Arc<Control>>,
}

impl Sessions {
    /// A seat, unless `max` are taken.
    pub fn seat(&self, max: usize) -> Option<Seat> {
        let mut open = self.0.lock();
        if open.seats >= max {
            return None;
        }
        open.seats += 1;
        Some(Seat {
            sessions: self.clone(),
            control: None,
        })
    }

    /// Sessions open, and handshakes under way.
    pub fn open(&self) -> usize {
        self.0.lock().seats
    }

    /// Ends every open session for `why`, and every one that starts from now on.
    pub fn end_all(&self, why: Closed) {
        let controls = {
            let mut open = self.0.lock();
            open.ending = Some(why);
            open.controls.clone()
        };
        for control in controls {
            control.end(why);
        }
    }
}

impl Seat {
    fn hold(&mut self, control: Arc<Control>) {
        let ending = {
            let mut open = self.sessions.0.lock();
            open.controls.push(control.clone());
            open.ending
        };
        if let Some(why) = ending {
            control.end(why);
        }
        self.control = Some(control);
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        let mut open = self.sessions.0.lock();
        open.seats -= 1;
        if let Some(mine) = &self.control {
            open.controls.retain(|c| !Arc::ptr_eq(c, mine));
        }
    }
}

/// Which side a reader reads.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Side {
    Client,
    Upstream,
}

/// One side's writing half: its own protocol state, over the shared link.
struct Out<'a> {
    ctx: WebSocketContext,
    half: Half<'a>,
}

impl Out<'_> {
    fn send(&mut self, message: Message) -> tungstenite::Result<()> {
        self.ctx.write(&mut self.half, message)?;
        self.ctx.flush(&mut self.half)
    }
}

/// One session being relayed: what both of its threads share.
struct Session<'a> {
    outs: [Mutex<Out<'a>>; 2],
    control: &'a Control,
    started: Instant,
    /// Milliseconds from `started` to the last message either way.
    last: AtomicU64,
    /// The close frames went out (once, from whichever thread ended the session).
    closed: AtomicBool,
    limits: &'a Limits,
}

impl<'a> Session<'a> {
    fn out(&self, side: Side) -> &Mutex<Out<'a>> {
        &self.outs[side as usize]
    }

    /// Ends the session for `why`, or for the reason it is already ending for; the first
    /// call sends the close frames (`relayed`: the one a side sent, for the other).
    fn finish(&self, why: Closed, relayed: Option<(Side, Option<CloseFrame>)>) {
        let (why, first) = {
            let mut set = self.control.why.lock();
            match *set {
                Some(w) => (w, false),
                None => {
                    *set = Some(why);
                    (why, true)
                }
            }
        };
        if !self.closed.swap(true, Ordering::AcqRel) {
            let frames = why.frames();
            for side in [Side::Client, Side::Upstream] {
                let frame = match &relayed {
                    Some((from, frame)) if first && *from != side => frame.clone(),
                    _ => match frames[side as usize] {
                        Some((code, reason)) => Some(CloseFrame {
                            code: CloseCode::from(code),
                            reason: reason.into(),
                        }),
                        None => continue,
                    },
                };
                let _ = self.out(side).lock().send(Message::Close(frame));
            }
        }
        for socket in &self.control.sockets {
            let _ = socket.shutdown(Shutdown::Read);
        }
    }

    /// Why the session is to end by the clock, if it is.
    fn overdue(&self) -> Option<Closed> {
        let now = self.started.elapsed();
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        if now >= self.limits.max_length {
            Some(Closed::MaxLength)
        } else if now.saturating_sub(last) >= self.limits.idle {
            Some(Closed::Idle)
        } else {
            None
        }
    }

    /// Relays what `from` sends to the other side until the session ends.
    fn pump(&self, from: Side, reader: &mut WebSocket<Half<'_>>, on_text: &(dyn Fn(&str) + Sync)) {
        let to = match from {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        };
        let (closed, gone, too_big) = match from {
            Side::Client => (
                Closed::ClientClosed,
                Closed::ClientGone,
                Closed::ClientTooBig,
            ),
            Side::Upstream => (
                Closed::UpstreamClosed,
                Closed::UpstreamGone,
                Closed::UpstreamTooBig,
            ),
        };
        loop {
            if let Some(why) = *self.control.why.lock() {
                return self.finish(why, None);
            }
            match reader.read() {
                Ok(Message::Close(frame)) => {
                    // Sends the protocol's answer to this side's close.
                    let _ = reader.flush();
                    return self.finish(closed, Some((from, frame)));
                }
                Ok(Message::Frame(_)) => {}
                Ok(message) => {
                    let at = self.started.elapsed().as_millis() as u64;
                    self.last.fetch_max(at, Ordering::Relaxed);
                    if let Message::Text(text) = &message {
                        on_text(text.as_str());
                    }
                    if self.out(to).lock().send(message).is_err() {
                        let other_gone = match to {
                            Side::Client => Closed::ClientGone,
                            Side::Upstream => Closed::UpstreamGone,
                        };
                        return self.finish(other_gone, None);
                    }
                }
                Err(WsError::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    if let Some(why) = self.overdue() {
                        return self.finish(why, None);
                    }
                }
                Err(WsError::Capacity(_)) => return self.finish(too_big, None),
                Err(_) => return self.finish(gone, None),
            }
        }
    }
}

/// The sockets that wake a session's readers, for `Control`.
pub fn control(client: &TcpStream, upstream: &Upstream) -> io::Result<Control> {
    Ok(Control {
        why: Mutex::new(None),
        sockets: [client.try_clone()?, upstream.link.socket().try_clone()?],
    })
}

/// Relays a session between the client's upgraded connection and `upstream` until it
/// ends, and says how it ended. The client's messages are read on this thread, the
/// upstream's on a second one; each upstream text message is shown to `on_text` (for
/// its usage) before it is passed on. `seat` holds the session's place among the open
/// ones, and lets `Sessions::end_all` end it.
pub fn relay(
    client: tiny_http::Upgraded<'_>,
    mut upstream: Upstream,
    limits: &Limits,
    (seat, control): (&mut Seat, Arc<Control>),
    on_text: &(dyn Fn(&str) + Sync),
) -> Closed {
    let tick = Some(limits.tick());
    for socket in [client.stream, upstream.link.socket()] {
        let _ = socket.set_read_timeout(tick);
        let _ = socket.set_write_timeout(Some(limits.write));
    }
    seat.hold(control.clone());
    let client_link: Arc<dyn Link + '_> = Arc::new(Plain {
        socket: client.stream,
        writing: Mutex::new(()),
    });
    let config = Some(limits.config());
    let mut client_reader = WebSocket::from_partially_read(
        Half(client_link.clone()),
        client.buffered,
        Role::Server,
        config,
    );
    let session = Session {
        outs: [
            Mutex::new(Out {
                ctx: WebSocketContext::new(Role::Server, config),
                half: Half(client_link),
            }),
            Mutex::new(Out {
                ctx: WebSocketContext::new(Role::Client, config),
                half: Half(upstream.link.clone()),
            }),
        ],
        control: &control,
        started: Instant::now(),
        last: AtomicU64::new(0),
        closed: AtomicBool::new(false),
        limits,
    };
    std::thread::scope(|scope| {
        let upstream_reader = &mut upstream.reader;
        let session = &session;
        let spawned = std::thread::Builder::new()
            .name("realtime-upstream".into())
            .stack_size(STACK_SIZE)
            .spawn_scoped(scope, move || {
                session.pump(Side::Upstream, upstream_reader, on_text)
            });
        match spawned {
            Ok(_) => session.pump(Side::Client, &mut client_reader, &|_| {}),
            Err(e) => {
                log::warn!("no thread for a realtime session: {e}");
                session.finish(Closed::NoResources, None);
            }
        }
    });
    let why = *control.why.lock();
    why.unwrap_or(Closed::ClientGone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_end_names_its_frames_within_the_protocols_bounds() {
        for why in Closed::ALL {
            for (code, reason) in why.frames().into_iter().flatten() {
                // RFC 6455 §5.5: a control frame's payload (2 bytes of code and the
                // reason) is at most 125 bytes; 1005, 1006 and 1015 are never sent.
                assert!(reason.len() <= 123, "{why:?}: {reason}");
                assert!(![1005, 1006, 1015].contains(&code), "{why:?}");
            }
        }
        assert_eq!(Closed::ClientTooBig.frames()[0].map(|f| f.0), Some(1009));
        assert_eq!(Closed::Shutdown.frames()[0].map(|f| f.0), Some(1001));
    }

    #[test]
    fn seats_are_bounded_and_given_back() {
        let sessions = Sessions::default();
        let first = sessions.seat(2).unwrap();
        let second = sessions.seat(2).unwrap();
        assert!(sessions.seat(2).is_none(), "a third over the bound");
        drop(first);
        assert_eq!(sessions.open(), 1);
        assert!(sessions.seat(2).is_some());
        drop(second);
        assert_eq!(sessions.open(), 0);
    }
}
