//! One Realtime API session's relay (DESIGN §5.7): messages both ways as they come,
//! one thread per direction, within the session's bounds, both sides ended with a close
//! frame whose code says why; and the open sessions (`Sessions`): how many, and ending
//! them all at shutdown.

use super::websocket::{Half, Limits, Link, Plain, Upstream};
use parking_lot::Mutex;
use std::io::{self, ErrorKind};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocket, WebSocketContext};
use tungstenite::{Error as WsError, Message};

/// Stack of a session's second thread (the upstream's reader): what a connection's
/// thread gets (see `http`), since it runs the same kind of frames.
const STACK_SIZE: usize = 512 * 1024;

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
            // Read into a local first: a guard in an `if let` scrutinee would live
            // through `finish`, which takes the same lock.
            let ending = *self.control.why.lock();
            if let Some(why) = ending {
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
    client: http1_server::Upgraded<'_>,
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
