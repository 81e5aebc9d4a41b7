//! The Realtime API's WebSocket connections (DESIGN §5.7): the upstream's handshake
//! (TCP, TLS on the rustls and Mozilla roots already in the tree, the WebSocket
//! upgrade, classified into an `Outcome` like any attempt), and each side's link, which
//! the two threads of a session's relay (`relay.rs`) share.

use crate::outcome::Outcome;
use crate::upstream::headers;
use parking_lot::Mutex;
use std::borrow::Borrow;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::HandshakeError;
use tungstenite::http::{HeaderName, HeaderValue};
use tungstenite::protocol::{WebSocket, WebSocketConfig};
use tungstenite::Error as WsError;

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
    pub(super) fn config(&self) -> WebSocketConfig {
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
    pub(super) fn tick(&self) -> Duration {
        (self.idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }
}

/// One side's connection, shared by the thread that reads it and the thread that
/// writes to it. Only one thread reads; each write is whole frames under a lock, so
/// the frames of the two threads never interleave.
pub(super) trait Link: Send + Sync {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn write_all(&self, bytes: &[u8]) -> io::Result<()>;
    /// The TCP socket under it, for its timeouts and to wake its reader.
    fn socket(&self) -> &TcpStream;
}

/// A connection without TLS: the client's (borrowed from the server) or a `ws://`
/// upstream's (owned).
pub(super) struct Plain<S> {
    pub(super) socket: S,
    pub(super) writing: Mutex<()>,
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
pub(super) struct Half<'a>(pub(super) Arc<dyn Link + 'a>);

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
    pub(super) link: Arc<dyn Link>,
    /// Holds what the upstream sent right after its handshake (e.g. `session.created`).
    pub(super) reader: WebSocket<Half<'static>>,
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

pub use super::session::{control, relay, Closed, Control, Seat, Sessions};
