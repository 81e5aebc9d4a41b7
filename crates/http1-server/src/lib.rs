//! The proxy's HTTP/1.1 server (grown from tiny_http 0.12.0; HISTORY.md lists every
//! change): a server in which the thread that reads a request runs the
//! handler that answers it, and every size, count and wait a client controls is
//! bounded before it costs memory or a thread.
//!
//! ```no_run
//! let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
//! let server = http1_server::Server::start(
//!     listener,
//!     http1_server::Limits::default(),
//!     Box::new(|request: http1_server::Request<'_>| {
//!         let _ = request.respond(200, &[("Content-Type", "text/plain")], b"hello");
//!     }),
//! )
//! .unwrap();
//! ```

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

mod common;
mod conn;
mod request;

pub use common::{HTTPVersion, Method, StatusCode};
pub use request::{is_cut, ClientSocket, Request, ResponseWriter, Upgraded};

use std::collections::HashMap;
use std::io::{self, ErrorKind};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// What a server allows its clients.
#[derive(Debug, Clone)]
pub struct Limits {
    /// How long a kept-alive connection may wait for its next request.
    pub idle: Duration,
    /// How long a request head may take to arrive, from its first byte.
    pub head: Duration,
    /// How long a request body may take to arrive, from the end of its head.
    pub body: Duration,
    /// How long one write to a client may block.
    pub write: Duration,
    /// Stack size of each connection's thread.
    pub stack_size: usize,
    /// Most connections open at once (each has a thread). When a new one comes and the
    /// server is full, one that costs others the most for what it gives is closed to
    /// make room (see `evict`); if none can be, the new one gets a 503 and is closed.
    pub max_connections: usize,
    /// Most connections open at once from one client address (an IPv6 address counts
    /// by its /64); 0: no limit. Over it, the address's own connection that may be
    /// closed is, else the new one gets a 429.
    pub max_connections_per_ip: usize,
    /// Bytes per second below which a body being read, after its first second, may be
    /// closed to make room for a new connection.
    pub body_floor: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            idle: Duration::from_secs(30),
            head: Duration::from_secs(30),
            body: Duration::from_secs(60),
            write: Duration::from_secs(30),
            stack_size: 2 << 20,
            max_connections: 4096,
            max_connections_per_ip: 2048,
            body_floor: 1024,
        }
    }
}

/// What answers requests; it runs on the connection's own thread.
pub type Handler = dyn Fn(Request<'_>) + Send + Sync;

/// Connection states, for `evict` (which closes one that gives little to make room),
/// `drain` (which closes idle ones) and `cut_streams`.
const IDLE: u8 = 0;
const BUSY: u8 = 1;
const STREAMING: u8 = 2;
/// Chosen by `evict` and shut down; stays so until its thread removes it, so that it
/// is never chosen (and counted as room) twice.
const CLOSING: u8 = 3;
/// Its head's first byte came, not yet its last.
const HEAD: u8 = 4;
/// Its head came and its body is being read.
const BODY: u8 = 5;

/// States of a streamed answer, under `Entry::write`.
pub(crate) const STREAM_OPEN: u8 = 0;
pub(crate) const STREAM_FINISHED: u8 = 1;
pub(crate) const STREAM_CUT: u8 = 2;

/// One open connection, shared by its thread and the server.
pub(crate) struct Entry {
    pub(crate) stream: TcpStream,
    pub(crate) peer: SocketAddr,
    state: AtomicU8,
    /// Microseconds since the server started, when the connection entered its state
    /// (fine enough that connections a moment apart are told apart, oldest first).
    since: AtomicU64,
    /// Body bytes read since the state became `BODY`.
    body_read: AtomicU64,
    /// The client address, as counted for `Limits::max_connections_per_ip`.
    client: ClientKey,
    /// A streamed answer's state; its writes happen under this lock so that
    /// `cut_streams` never lands in the middle of one.
    pub(crate) write: Mutex<u8>,
    chunked: AtomicBool,
    /// A cut ends the stream with the server's last piece; else it only closes it.
    event_on_cut: AtomicBool,
    slot: usize,
}

impl Entry {
    pub(crate) fn set_idle(&self, shared: &Shared) {
        self.enter(shared, IDLE);
    }

    /// The first byte of a head came.
    pub(crate) fn set_reading_head(&self, shared: &Shared) {
        self.enter(shared, HEAD);
    }

    /// The head came; its body follows.
    pub(crate) fn set_reading_body(&self, shared: &Shared) {
        self.body_read.store(0, Ordering::Relaxed);
        self.enter(shared, BODY);
    }

    pub(crate) fn body_progress(&self, n: usize) {
        self.body_read.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn enter(&self, shared: &Shared, state: u8) {
        self.since.store(shared.now_us(), Ordering::Relaxed);
        self.set_state(state);
    }

    pub(crate) fn set_busy(&self) {
        self.set_state(BUSY);
    }

    pub(crate) fn set_streaming(&self, chunked: bool, event_on_cut: bool) {
        self.chunked.store(chunked, Ordering::Relaxed);
        self.event_on_cut.store(event_on_cut, Ordering::Relaxed);
        self.set_state(STREAMING);
    }

    /// Any state but `CLOSING`, which is final.
    fn set_state(&self, state: u8) {
        let _ = self
            .state
            .fetch_update(Ordering::Release, Ordering::Acquire, |s| {
                (s != CLOSING).then_some(state)
            });
    }
}

/// The open connections: a slab, so adding and removing one is O(1).
#[derive(Default)]
struct Registry {
    slots: Vec<Option<Arc<Entry>>>,
    free: Vec<usize>,
    open: usize,
    /// Open connections per client address; only addresses with one or more.
    per_client: HashMap<ClientKey, usize>,
}

/// A client address as one client: an IPv4 address, or an IPv6 address's /64 (what
/// one host is usually given, so that it cannot take a new address per connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ClientKey(u128);

impl ClientKey {
    fn of(ip: IpAddr) -> ClientKey {
        match ip {
            IpAddr::V4(v4) => ClientKey(u32::from(v4).into()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey(u32::from(v4).into()),
                // Above 2^32, so never equal to an IPv4 key.
                None => ClientKey(u128::from(v6) >> 64 | 1 << 64),
            },
        }
    }
}

/// Which connections `evict` may close, from the first it looks for to the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victim {
    /// Has not sent a whole head: a head under way, or nothing yet (idle).
    NoHead,
    /// Trickles its body slower than `Limits::body_floor`, after its first second.
    SlowBody,
}

pub(crate) struct Shared {
    pub(crate) limits: Limits,
    pub(crate) handler: Box<Handler>,
    draining: AtomicBool,
    started: Instant,
    registry: Mutex<Registry>,
    /// Signalled whenever a connection closes.
    closed: Condvar,
}

impl Shared {
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn entries(&self) -> Vec<Arc<Entry>> {
        self.registry().slots.iter().flatten().cloned().collect()
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn add(&self, stream: TcpStream, peer: SocketAddr) -> Arc<Entry> {
        let mut r = self.registry();
        let client = ClientKey::of(peer.ip());
        *r.per_client.entry(client).or_default() += 1;
        let slot = r.free.pop().unwrap_or_else(|| {
            r.slots.push(None);
            r.slots.len() - 1
        });
        let entry = Arc::new(Entry {
            stream,
            peer,
            // Idle from the moment it is accepted: a connection that has said nothing
            // gives way to a new one like a kept-alive one does.
            state: AtomicU8::new(IDLE),
            since: AtomicU64::new(self.now_us()),
            body_read: AtomicU64::new(0),
            client,
            write: Mutex::new(STREAM_FINISHED),
            chunked: AtomicBool::new(false),
            event_on_cut: AtomicBool::new(false),
            slot,
        });
        r.slots[slot] = Some(entry.clone());
        r.open += 1;
        entry
    }

    /// Whether a new connection from `peer` may be served, closing one to make room if
    /// it must: `Err` is the answer the new one gets instead.
    fn admit(&self, peer: IpAddr) -> Result<(), Refused> {
        let client = ClientKey::of(peer);
        let per_client = self.limits.max_connections_per_ip;
        let r = self.registry();
        if per_client > 0 && r.per_client.get(&client).copied().unwrap_or(0) >= per_client {
            // The address's own connection closed is this one's room in the table too.
            return if self.evict(&r, Some(client)) {
                Ok(())
            } else {
                Err(Refused::Client)
            };
        }
        if r.open >= self.limits.max_connections && !self.evict(&r, None) {
            return Err(Refused::Full);
        }
        Ok(())
    }

    /// Closes the connection that gives least for what it holds (of `client`, if
    /// given), to make room for a new one: oldest first, one that has not sent a whole
    /// head, else one whose body comes slower than `Limits::body_floor`. A connection
    /// busy with a request it has sent, or with its answer, is never closed. False when
    /// none may be.
    fn evict(&self, r: &Registry, client: Option<ClientKey>) -> bool {
        let now = self.now_us();
        for victim in [Victim::NoHead, Victim::SlowBody] {
            loop {
                let oldest = r
                    .slots
                    .iter()
                    .flatten()
                    .filter(|e| client.is_none_or(|c| e.client == c))
                    .filter(|e| self.is_victim(e, victim, now))
                    .min_by_key(|e| e.since.load(Ordering::Relaxed));
                let Some(entry) = oldest else { break };
                // Only if its state did not change meanwhile (its head may have just
                // ended): then it is never chosen, and counted as room, again.
                let state = entry.state.load(Ordering::Acquire);
                let closing = (self.is_victim(entry, victim, now) && state != CLOSING).then(|| {
                    entry.state.compare_exchange(
                        state,
                        CLOSING,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                });
                if let Some(Ok(_)) = closing {
                    let _ = entry.stream.shutdown(Shutdown::Both);
                    return true;
                }
            }
        }
        false
    }

    fn is_victim(&self, e: &Entry, victim: Victim, now: u64) -> bool {
        let state = e.state.load(Ordering::Acquire);
        match victim {
            Victim::NoHead => state == IDLE || state == HEAD,
            Victim::SlowBody => {
                let elapsed = now.saturating_sub(e.since.load(Ordering::Relaxed));
                state == BODY
                    && elapsed >= 1_000_000
                    && e.body_read
                        .load(Ordering::Relaxed)
                        .saturating_mul(1_000_000)
                        < self.limits.body_floor.saturating_mul(elapsed)
            }
        }
    }

    fn remove(&self, entry: &Entry) {
        let mut r = self.registry();
        if let Some(n) = r.per_client.get_mut(&entry.client) {
            *n -= 1;
            if *n == 0 {
                r.per_client.remove(&entry.client);
            }
        }
        r.slots[entry.slot] = None;
        r.free.push(entry.slot);
        r.open -= 1;
        self.closed.notify_all();
    }
}

/// Removes a connection from the registry when its thread ends, however it ends.
struct Registered<'a>(&'a Shared, Arc<Entry>);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.0.remove(&self.1);
    }
}

/// Reads how many connections a server has open (see `Server::connection_count`).
pub struct ConnectionCount(Arc<Shared>);

impl ConnectionCount {
    pub fn get(&self) -> usize {
        self.0.registry().open
    }
}

/// A running server: its accept thread, and a thread per open connection.
pub struct Server {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl Server {
    /// Serves `listener` with `handler`. The listener should have a receive timeout
    /// (a few hundred ms): the accept thread checks for `drain` between accepts.
    pub fn start(
        listener: TcpListener,
        limits: Limits,
        handler: Box<Handler>,
    ) -> io::Result<Server> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            limits,
            handler,
            draining: AtomicBool::new(false),
            started: Instant::now(),
            registry: Mutex::new(Registry::default()),
            closed: Condvar::new(),
        });
        let inside = shared.clone();
        let accept = thread::Builder::new()
            .name("accept".into())
            .spawn(move || accept_loop(&listener, &inside))?;
        Ok(Server {
            shared,
            addr,
            accept: Mutex::new(Some(accept)),
        })
    }

    pub fn server_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.shared.registry().open
    }

    /// A handle that reads `connections()` without the server itself.
    pub fn connection_count(&self) -> ConnectionCount {
        ConnectionCount(self.shared.clone())
    }

    /// Stops accepting (the listening socket is closed when this returns) and closes
    /// idle connections. Connections busy with a request close after answering it.
    pub fn drain(&self) {
        self.shared.draining.store(true, Ordering::Release);
        // Wakes the accept thread at once; its receive timeout is the fallback.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_millis(100));
        if let Some(accept) = self.accept.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = accept.join();
        }
        for entry in self.shared.entries() {
            if entry.state.load(Ordering::Acquire) == IDLE {
                let _ = entry.stream.shutdown(Shutdown::Both);
            }
        }
    }

    /// Waits until every connection has closed, or until `deadline`; says which.
    pub fn wait_closed(&self, deadline: Instant) -> bool {
        let mut r = self.shared.registry();
        while r.open > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            r = self
                .shared
                .closed
                .wait_timeout(r, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Ends every answer still being streamed with `last` as its final piece (a
    /// complete chunked body, so the client can tell how it ended), and closes those
    /// connections; a relayed body (`into_relay`) is closed without it, unfinished. Their writers fail from then on. It never waits on a client: a
    /// stream whose writer is blocked on one, or that cannot take `last` at once, is
    /// closed without it.
    pub fn cut_streams(&self, last: &[u8]) {
        for entry in self.shared.entries() {
            if entry.state.load(Ordering::Acquire) != STREAMING {
                continue;
            }
            let Ok(mut state) = entry.write.try_lock() else {
                let _ = entry.stream.shutdown(Shutdown::Both);
                continue;
            };
            if *state != STREAM_OPEN {
                continue;
            }
            *state = STREAM_CUT;
            if !entry.event_on_cut.load(Ordering::Relaxed) {
                let _ = entry.stream.shutdown(Shutdown::Both);
                continue;
            }
            let mut out = &entry.stream;
            let _ = out.set_write_timeout(Some(Duration::from_millis(50)));
            let _ = if entry.chunked.load(Ordering::Relaxed) {
                let mut size = [0u8; 18];
                let n = request::chunk_size_line(last.len(), &mut size);
                io::Write::write_all(&mut out, &[&size[..n], last, b"\r\n0\r\n\r\n"].concat())
            } else {
                io::Write::write_all(&mut out, last)
            };
            let _ = entry.stream.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.drain();
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    while !shared.is_draining() {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) => {
                match e.kind() {
                    ErrorKind::WouldBlock
                    | ErrorKind::TimedOut
                    | ErrorKind::Interrupted
                    | ErrorKind::ConnectionAborted => {}
                    _ => {
                        // Out of descriptors, say: transient. Under the proxy's log
                        // target, where its operator looks for it.
                        log::warn!(target: "azure_openai_proxy::accept", "accepting a connection failed: {e}");
                        thread::sleep(Duration::from_millis(50));
                    }
                }
                continue;
            }
        };
        if shared.is_draining() {
            break;
        }
        if let Err(refused) = shared.admit(peer.ip()) {
            refused.answer(stream);
            continue;
        }
        // Without TCP_NODELAY, a stream's next small event waits for the client's
        // (delayed) acknowledgement of the last one. Answers leave in one write anyway.
        let configured = stream
            .set_nodelay(true)
            .and_then(|()| stream.set_write_timeout(Some(shared.limits.write)));
        if let Err(e) = configured {
            log::warn!(target: "azure_openai_proxy::accept", "a new connection failed: {e}");
            continue;
        }
        let entry = shared.add(stream, peer);
        let inside = shared.clone();
        let spawned = thread::Builder::new()
            .stack_size(shared.limits.stack_size)
            .spawn({
                let entry = entry.clone();
                move || {
                    let _registered = Registered(&inside, entry.clone());
                    conn::serve(entry, &inside);
                }
            });
        if let Err(e) = spawned {
            log::warn!(target: "azure_openai_proxy::accept", "no thread for a new connection: {e}");
            shared.remove(&entry);
            // Running out of threads does not pass in a moment: no busy loop meanwhile.
            thread::sleep(Duration::from_millis(50));
        }
    }
    // The listener is dropped by the caller's return: new connections are refused.
}

/// Why a new connection was not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// The server is full of connections that may not be closed.
    Full,
    /// Its address holds its share already, none of which may be closed.
    Client,
}

impl Refused {
    /// One non-blocking write of the answer (OpenAI-shaped) and a close, so that the
    /// accept thread never waits on the client.
    fn answer(self, stream: TcpStream) {
        let (status, body) = match self {
            Refused::Full => (
                "503 Service Unavailable",
                r#"{"error":{"message":"The server has as many connections open as it allows (server.max_connections), all busy; retry shortly.","type":"server_error","param":null,"code":"server_busy"}}"#,
            ),
            Refused::Client => (
                "429 Too Many Requests",
                r#"{"error":{"message":"Your address has as many connections open as one address may (server.max_connections_per_ip), all busy; retry shortly.","type":"rate_limit_error","param":null,"code":"too_many_connections"}}"#,
            ),
        };
        let answer = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.set_nonblocking(true);
        let _ = io::Write::write_all(&mut &stream, answer.as_bytes());
        let _ = stream.shutdown(Shutdown::Write);
    }
}
