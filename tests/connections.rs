//! How the proxy spends its threads and upstream permits, through the binary: each
//! connection has a thread, `server.max_connections` bounds them (connections that
//! give little, idle ones, half-sent heads, trickled bodies, give way to new ones),
//! `server.max_connections_per_ip` bounds one address's share, and `server.workers`
//! bounds upstream calls.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const KEY: &str = "sk-connections-1";

fn instance(url: &str) -> String {
    format!(
        "instances:\n  - {{name: east, api_key: {KEY}, api_base: '{url}', api_version: 2024-10-21, supported_models: [m]}}\n"
    )
}

fn chat(proxy: &Running) -> Answer {
    post_json(
        &proxy.url("/v1/chat/completions"),
        &serde_json::json!({"model": "m", "messages": []}),
    )
}

/// An upstream on which model `slow` hangs, so that its requests keep their
/// connections busy; model `m` is answered.
fn hanging_upstream() -> Mock {
    let ok = azure_like(KEY);
    Mock::start(std::sync::Arc::new(move |r: &Recorded| {
        if r.target.contains("/slow/") {
            MockReply::Hang(Duration::from_secs(20))
        } else {
            ok(r)
        }
    }))
}

/// `c` with a whole request for model `slow` sent: busy until its upstream call ends.
fn busy(mut c: TcpStream) -> TcpStream {
    let body = br#"{"model":"slow","messages":[]}"#;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes()).unwrap();
    c.write_all(body).unwrap();
    c
}

#[test]
fn a_full_server_closes_idle_connections_for_new_ones_and_refuses_when_all_are_busy() {
    let up = hanging_upstream();
    let proxy = Running::with_config(&format!(
        "server: {{max_connections: 4, max_connections_per_ip: 0}}\nrouting: {{timeout: 2}}\n{}",
        instance(&up.url).replace("[m]", "[m, slow]")
    ));
    // Four connections that said nothing: the server is full of idle ones.
    let before = proxy.open_fds();
    let mut idle: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(&proxy.addr).unwrap())
        .collect();
    assert!(
        wait_until(Duration::from_secs(5), || proxy.open_fds() >= before + 4),
        "the four were accepted"
    );
    // A new client is served: the connection idle the longest made room.
    assert_eq!(chat(&proxy).status, 200);
    let oldest = &mut idle[0];
    oldest
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    assert!(
        oldest.read_to_end(&mut rest).is_ok(),
        "closed, not left open"
    );
    assert!(rest.is_empty(), "closed without an answer");
    drop(idle);
    assert!(
        wait_until(Duration::from_secs(5), || metric(
            &proxy,
            "client_connections"
        ) <= 1.0),
        "the idle ones are gone (one left: the one asking)"
    );

    // Four connections with a request under way: nothing to give way.
    let before = up.count();
    let busy: Vec<TcpStream> = (0..4)
        .map(|_| busy(TcpStream::connect(&proxy.addr).unwrap()))
        .collect();
    assert!(
        wait_until(Duration::from_secs(10), || up.count() == before + 4),
        "the four requests reached the upstream"
    );
    let got = raw(
        &proxy.addr,
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    let answer = responses(&got).remove(0);
    assert_eq!(answer.status, 503);
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert_eq!(answer.openai_error()["code"], "server_busy");
    // Once their upstream calls time out (2 s), the busy ones are done.
    drop(busy);
    let models = || {
        let got = raw(
            &proxy.addr,
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        );
        responses(&got).first().is_some_and(|a| a.status == 200)
    };
    assert!(
        wait_until(Duration::from_secs(10), models),
        "served again once the busy ones left"
    );
}

#[test]
fn upstream_calls_beyond_server_workers_wait_then_get_503_with_retry_after() {
    // The upstream holds each request for 3 s: one permit is taken for that long.
    let up = Mock::start(std::sync::Arc::new(|_: &Recorded| {
        MockReply::Hang(Duration::from_secs(3))
    }));
    let proxy = Running::with_config(&format!(
        "server: {{workers: 1}}\nrouting: {{queue_timeout: 0.3, timeout: 2}}\n{}",
        instance(&up.url)
    ));
    let url = proxy.url("/v1/chat/completions");
    let holder = std::thread::spawn(move || {
        post_json(&url, &serde_json::json!({"model": "m", "messages": []})).status
    });
    assert!(wait_until(Duration::from_secs(5), || up.count() == 1));
    let busy = chat(&proxy);
    assert_eq!(busy.status, 503);
    assert_eq!(busy.header("retry-after"), Some("1"));
    assert_eq!(busy.openai_error()["code"], "server_busy");
    assert_eq!(
        up.count(),
        1,
        "the second request never reached the upstream"
    );
    assert_eq!(holder.join().unwrap(), 504, "the first timed out upstream");
}

/// The server-side sockets of `proxy` that hold a connection whose bytes the proxy has
/// read (receive queue empty), from /proc/net/tcp: a half-sent head counts once its
/// thread has read it, so that the test knows it is not merely idle.
fn read_connections(proxy: &Running) -> usize {
    let port = proxy
        .addr
        .rsplit(':')
        .next()
        .unwrap()
        .parse::<u16>()
        .unwrap();
    let local = format!(":{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local address, state 01 (established), tx_queue:rx_queue
            f.len() > 4 && f[1].ends_with(&local) && f[3] == "01" && f[4].ends_with(":00000000")
        })
        .count()
}

/// A connection to `proxy` from `source` (any 127.x.y.z address reaches loopback), so
/// that a test can be two clients.
fn connect_from(source: &str, proxy: &Running) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let from: std::net::SocketAddr = format!("{source}:0").parse().unwrap();
    socket.bind(&from.into()).unwrap();
    let to: std::net::SocketAddr = proxy.addr.parse().unwrap();
    socket.connect(&to.into()).unwrap();
    socket.into()
}

/// Opens `n` connections from `source` that each send part of a head, one after the
/// other once the proxy has read the last one's part, so that their age is their order.
fn partial_heads(proxy: &Running, source: &str, n: usize) -> Vec<TcpStream> {
    let before = read_connections(proxy);
    (0..n)
        .map(|i| {
            let mut c = connect_from(source, proxy);
            c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").unwrap();
            assert!(
                wait_until(Duration::from_secs(10), || read_connections(proxy)
                    > before + i),
                "the proxy read partial head {i}"
            );
            c
        })
        .collect()
}

/// One whole request from `source` on a new connection, and its answer.
fn ask_from(source: &str, proxy: &Running, request: &str) -> RawAnswer {
    let mut c = connect_from(source, proxy);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(request.as_bytes()).unwrap();
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    responses(&got)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no answer: {:?}", String::from_utf8_lossy(&got)))
}

const HEALTH: &str = "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
/// Answered 200 whatever the instances' state (busy ones may time out under load).
const MODELS: &str = "GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// Whether the peer closed `c` (end of stream, nothing sent) within 5 s.
fn closed_quietly(c: &mut TcpStream) -> bool {
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).is_ok() && rest.is_empty()
}

/// Whether `c` is still open: nothing to read, and no end of stream, for 200 ms.
fn still_open(c: &mut TcpStream) -> bool {
    c.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut byte = [0u8; 1];
    matches!(c.read(&mut byte), Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
}

#[test]
fn half_sent_heads_give_way_to_new_connections_oldest_first() {
    let up = Mock::start(azure_like(KEY));
    let proxy = Running::with_config(&format!(
        "server: {{max_connections: 64, max_connections_per_ip: 0}}\n{}",
        instance(&up.url)
    ));
    // One address fills the server with heads it never finishes.
    let mut held = partial_heads(&proxy, "127.0.0.1", 64);
    let health = ask_from("127.0.0.1", &proxy, HEALTH);
    health.assert_status(200);
    let body = br#"{"model":"m","messages":[]}"#;
    let chat = ask_from(
        "127.0.0.1",
        &proxy,
        &format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{}",
            body.len(),
            std::str::from_utf8(body).unwrap()
        ),
    );
    chat.assert_status(200);
    assert!(closed_quietly(&mut held[0]), "the oldest made room");
    assert!(still_open(&mut held[63]), "the newest was left alone");
}

#[test]
fn a_body_trickled_below_the_floor_gives_way_after_its_first_second() {
    let up = Mock::start(azure_like(KEY));
    let proxy = Running::with_config(&format!(
        "server: {{max_connections: 4, max_connections_per_ip: 0}}\n{}",
        instance(&up.url)
    ));
    let before = read_connections(&proxy);
    // Four requests whose bodies come a byte at a time (one byte here, then nothing).
    let mut trickling: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut c = connect_from("127.0.0.1", &proxy);
            c.write_all(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{",
            )
            .unwrap();
            c
        })
        .collect();
    assert!(wait_until(Duration::from_secs(10), || read_connections(
        &proxy
    ) >= before + 4));
    // Within its first second a body is not judged; after it, 1 byte is below the floor
    // (1 KiB/s). Far before `body_timeout` (60 s), which alone freed them before.
    let served = || {
        let mut c = connect_from("127.0.0.1", &proxy);
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(HEALTH.as_bytes()).unwrap();
        let mut got = Vec::new();
        let _ = c.read_to_end(&mut got);
        responses(&got).first().is_some_and(|a| a.status == 200)
    };
    assert!(
        wait_until(Duration::from_secs(5), served),
        "a new connection is served once a trickled body gave way"
    );
    let gave_way = trickling
        .iter_mut()
        .filter(|c| {
            c.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let mut rest = Vec::new();
            (&**c).read_to_end(&mut rest).is_ok()
        })
        .count();
    assert!(gave_way >= 1, "a trickling connection was closed");
}

#[test]
fn one_address_holds_at_most_its_share_and_its_own_half_heads_give_way() {
    let up = hanging_upstream();
    let proxy = Running::with_config(&format!(
        "server: {{max_connections: 64, max_connections_per_ip: 4}}\nrouting: {{timeout: 30}}\n{}",
        instance(&up.url).replace("[m]", "[m, slow]")
    ));
    // 127.0.0.1 holds its four with requests under way.
    let busy: Vec<TcpStream> = (0..4)
        .map(|_| busy(connect_from("127.0.0.1", &proxy)))
        .collect();
    assert!(
        wait_until(Duration::from_secs(10), || up.count() == 4),
        "the four requests reached the upstream"
    );
    let refused = ask_from("127.0.0.1", &proxy, MODELS);
    refused.assert_status(429);
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(refused.openai_error()["code"], "too_many_connections");
    // Another address is served while the first is at its share.
    ask_from("127.0.0.2", &proxy, MODELS).assert_status(200);
    // An address at its share with half-sent heads: its own oldest gives way to its new
    // connection.
    let mut held = partial_heads(&proxy, "127.0.0.3", 4);
    ask_from("127.0.0.3", &proxy, MODELS).assert_status(200);
    assert!(closed_quietly(&mut held[0]), "its oldest made room");
    assert!(still_open(&mut held[3]), "its newest was left alone");
    drop(busy);
}
