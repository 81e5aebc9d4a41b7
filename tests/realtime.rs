//! The Realtime API through the real server: WebSocket sessions routed at the
//! handshake, relayed both ways, bounded (message size, idle time, shutdown) and
//! counted, against a test upstream that speaks the Realtime protocol.

mod common;

use common::*;
use serde_json::{json, Value};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

/// What the test upstream saw of a handshake.
#[derive(Debug, Clone)]
struct Seen {
    target: String,
    api_key: Option<String>,
    protocols: Option<String>,
}

/// A Realtime API upstream on 127.0.0.1: it refuses every handshake with 429 when
/// `refuse`, else answers `session.created`, `session.updated`, commits audio and
/// answers `response.create` with a `response.done` carrying usage.
struct Upstream {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    fn start(refuse: bool) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let log = log.clone();
                std::thread::spawn(move || serve(stream, refuse, &log));
            }
        });
        Upstream { url, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

// The handshake callback's error type is tungstenite's (an HTTP response), not ours.
#[allow(clippy::result_large_err)]
fn serve(stream: TcpStream, refuse: bool, log: &Mutex<Vec<Seen>>) {
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let header = |n: &str| {
            req.headers()
                .get(n)
                .map(|v| v.to_str().unwrap().to_string())
        };
        log.lock().unwrap().push(Seen {
            target: req.uri().to_string(),
            api_key: header("api-key"),
            protocols: header("sec-websocket-protocol"),
        });
        if refuse {
            let mut e = ErrorResponse::new(Some(
                r#"{"error":{"code":"429","message":"Rate limit reached"}}"#.into(),
            ));
            *e.status_mut() = tungstenite::http::StatusCode::TOO_MANY_REQUESTS;
            e.headers_mut().insert("retry-after", "30".parse().unwrap());
            return Err(e);
        }
        if header("sec-websocket-protocol").is_some() {
            resp.headers_mut()
                .insert("sec-websocket-protocol", "realtime".parse().unwrap());
        }
        Ok(resp)
    };
    let Ok(mut ws) = tungstenite::accept_hdr(stream, callback) else {
        return;
    };
    let send = |ws: &mut WebSocket<TcpStream>, v: Value| ws.send(Message::text(v.to_string()));
    if send(
        &mut ws,
        json!({"type": "session.created", "session": {"id": "s1"}}),
    )
    .is_err()
    {
        return;
    }
    while let Ok(message) = ws.read() {
        let Message::Text(text) = message else {
            continue;
        };
        let event: Value = serde_json::from_str(text.as_str()).unwrap_or_default();
        let answer = match event["type"].as_str() {
            Some("session.update") => {
                json!({"type": "session.updated", "session": event["session"]})
            }
            Some("input_audio_buffer.append") => json!({
                "type": "input_audio_buffer.appended",
                "bytes": event["audio"].as_str().map_or(0, str::len)
            }),
            Some("response.create") => json!({"type": "response.done", "response": {
                "id": "r1", "status": "completed",
                "usage": {"total_tokens": 300, "input_tokens": 120, "output_tokens": 180}}}),
            _ => continue,
        };
        if send(&mut ws, answer).is_err() {
            return;
        }
    }
}

type Client = WebSocket<TcpStream>;
type ClientResponse = tungstenite::handshake::client::Response;

/// Opens a session through the proxy at `addr` (host:port) on `path`, with `headers`.
fn connect(addr: &str, path: &str, headers: &[(&str, &str)]) -> (Client, ClientResponse) {
    let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
    for (k, v) in headers {
        let name = tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap();
        request.headers_mut().insert(name, v.parse().unwrap());
    }
    let socket = TcpStream::connect(addr).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    tungstenite::client(request, socket).expect("the handshake succeeds")
}

fn next_json(ws: &mut Client) -> Value {
    loop {
        match ws.read().expect("a message") {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => {}
        }
    }
}

/// Reads until the proxy's close frame, and returns its code.
fn close_code(ws: &mut Client) -> CloseCode {
    loop {
        match ws.read() {
            Ok(Message::Close(Some(frame))) => return frame.code,
            Ok(Message::Close(None)) => panic!("a close without a code"),
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    }
}

fn addr(url: &str) -> &str {
    url.strip_prefix("http://").unwrap()
}

fn v1_instance(name: &str, url: &str) -> String {
    format!(
        "  - {{name: {name}, api_key: upstream-key, api_base: '{url}', api_version: v1, max_tpm: 100000, model_deployments: {{gpt-rt: rt-dep}}}}\n"
    )
}

/// A test upstream, and the proxy in front of it with `settings` and one v1 instance.
fn start(settings: &str) -> (Upstream, TestProxy) {
    let up = Upstream::start(false);
    let proxy = TestProxy::start(&format!(
        "{settings}\ninstances:\n{}",
        v1_instance("a", &up.url)
    ));
    (up, proxy)
}

#[test]
fn a_session_is_relayed_both_ways_its_usage_counted_and_the_key_protocol_kept_back() {
    let (up, proxy) = start("auth: {api_keys: [client-key]}");
    let (mut ws, answer) = connect(
        addr(&proxy.url),
        "/openai/v1/realtime?model=gpt-rt",
        &[(
            "sec-websocket-protocol",
            "realtime, openai-insecure-api-key.client-key, openai-beta.realtime-v1",
        )],
    );
    assert_eq!(
        answer.headers().get("x-proxy-instance").unwrap(),
        "a",
        "the instance is named"
    );
    assert_eq!(
        answer.headers().get("sec-websocket-protocol").unwrap(),
        "realtime"
    );
    assert_eq!(next_json(&mut ws)["type"], "session.created");
    ws.send(Message::text(
        json!({"type": "session.update", "session": {"voice": "alloy"}}).to_string(),
    ))
    .unwrap();
    let updated = next_json(&mut ws);
    assert_eq!(updated["type"], "session.updated");
    assert_eq!(updated["session"]["voice"], "alloy");
    let audio = "A".repeat(40_000);
    ws.send(Message::text(
        json!({"type": "input_audio_buffer.append", "audio": audio}).to_string(),
    ))
    .unwrap();
    assert_eq!(next_json(&mut ws)["bytes"], 40_000);
    ws.send(Message::text(
        json!({"type": "response.create"}).to_string(),
    ))
    .unwrap();
    assert_eq!(next_json(&mut ws)["type"], "response.done");

    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].target, "/openai/v1/realtime?model=rt-dep");
    assert_eq!(seen[0].api_key.as_deref(), Some("upstream-key"));
    assert_eq!(
        seen[0].protocols.as_deref(),
        Some("realtime, openai-beta.realtime-v1"),
        "the subprotocol carrying the client's key is not forwarded"
    );

    // Counted while the session is open: the statistics and the instance's window.
    let stats = send("GET", &format!("{}/stats", proxy.url), &[], None).json();
    assert_eq!(stats["metrics"]["total_tokens_served"], 300, "{stats}");
    assert_eq!(stats["metrics"]["realtime_sessions"]["open"], 1);
    let instances = send("GET", &format!("{}/stats/instances", proxy.url), &[], None).json();
    let tpm = instances.to_string();
    assert!(tpm.contains("\"current_tpm\":300"), "{tpm}");

    ws.close(None).unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        let s = send("GET", &format!("{}/stats", proxy.url), &[], None).json();
        s["metrics"]["realtime_sessions"]["closed"]["client_closed"] == 1
            && s["metrics"]["realtime_sessions"]["open"] == 0
    }));
    let metrics = send("GET", &format!("{}/metrics", proxy.url), &[], None);
    let text = String::from_utf8_lossy(&metrics.body).to_string();
    assert!(
        text.contains("realtime_sessions_closed_total{reason=\"client_closed\"} 1"),
        "{text}"
    );
}

#[test]
fn a_wrong_key_in_the_subprotocol_is_refused_before_any_upstream() {
    let (up, proxy) = start("auth: {api_keys: [client-key]}");
    let mut request = format!("ws://{}/v1/realtime?model=gpt-rt", addr(&proxy.url))
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "realtime, openai-insecure-api-key.wrong".parse().unwrap(),
    );
    let socket = TcpStream::connect(addr(&proxy.url)).unwrap();
    match tungstenite::client(request, socket) {
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
            assert_eq!(r.status(), 401)
        }
        other => panic!("expected a 401, got {:?}", other.map(|_| ())),
    }
    assert!(up.seen().is_empty());
}

#[test]
fn an_address_blocked_for_guessing_keys_gets_no_session_and_its_realtime_guesses_count() {
    let (up, proxy) = start("auth: {api_keys: [client-key], max_failures: 2}");
    let guess = |key: &str| {
        let mut request = format!("ws://{}/v1/realtime?model=gpt-rt", addr(&proxy.url))
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("api-key", key.parse().unwrap());
        let socket = TcpStream::connect(addr(&proxy.url)).unwrap();
        match tungstenite::client(request, socket) {
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
                r.status().as_u16()
            }
            other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
        }
    };
    // Two wrong guesses on the Realtime path block the address: the right key is then
    // not even compared there.
    assert_eq!(guess("wrong-1"), 401);
    assert_eq!(guess("wrong-2"), 401);
    assert_eq!(guess("client-key"), 429);
    assert!(up.seen().is_empty());
}

#[test]
fn a_refused_handshake_fails_over_to_the_next_instance_on_the_dated_url() {
    let refusing = Upstream::start(true);
    let up = Upstream::start(false);
    let proxy = TestProxy::start(&format!(
        "instances:\n{}{}",
        azure_instance(
            "first",
            &refusing.url,
            "k1",
            1,
            "model_deployments: {gpt-rt: d1}"
        ),
        azure_instance(
            "second",
            &up.url,
            "k2",
            2,
            "model_deployments: {gpt-rt: d2}"
        ),
    ));
    let (mut ws, answer) = connect(addr(&proxy.url), "/v1/realtime?model=gpt-rt", &[]);
    assert_eq!(answer.headers().get("x-proxy-instance").unwrap(), "second");
    assert_eq!(next_json(&mut ws)["type"], "session.created");
    assert_eq!(refusing.seen().len(), 1, "the first was tried");
    assert_eq!(
        up.seen()[0].target,
        "/openai/realtime?api-version=2024-10-21&deployment=d2"
    );
    assert_eq!(up.seen()[0].api_key.as_deref(), Some("k2"));
    // The 429's cooldown keeps the next session off the first instance.
    let (_ws, again) = connect(addr(&proxy.url), "/v1/realtime?model=gpt-rt", &[]);
    assert_eq!(again.headers().get("x-proxy-instance").unwrap(), "second");
    assert_eq!(refusing.seen().len(), 1, "cooling down");
}

#[test]
fn an_oversized_message_closes_with_1009_and_an_idle_session_with_1001() {
    let (_up, proxy) = start("realtime: {max_message_bytes: 1024, idle_timeout: 0.5}");
    let (mut ws, _) = connect(addr(&proxy.url), "/v1/realtime?model=gpt-rt", &[]);
    assert_eq!(next_json(&mut ws)["type"], "session.created");
    ws.send(Message::text("x".repeat(2000))).unwrap();
    assert_eq!(close_code(&mut ws), CloseCode::Size);

    let (mut idle, _) = connect(addr(&proxy.url), "/v1/realtime?model=gpt-rt", &[]);
    assert_eq!(next_json(&mut idle)["type"], "session.created");
    assert_eq!(close_code(&mut idle), CloseCode::Away);
    assert!(wait_until(Duration::from_secs(10), || {
        let s = send("GET", &format!("{}/stats", proxy.url), &[], None).json();
        let closed = &s["metrics"]["realtime_sessions"]["closed"];
        closed["client_message_too_big"] == 1 && closed["idle"] == 1
    }));
}

#[test]
fn a_reload_keeps_an_open_session_on_its_instance() {
    let (up, proxy) = start("");
    let (mut ws, _) = connect(addr(&proxy.url), "/v1/realtime?model=gpt-rt", &[]);
    assert_eq!(next_json(&mut ws)["type"], "session.created");
    let other = Upstream::start(false);
    proxy.rewrite(&format!("instances:\n{}", v1_instance("b", &other.url)));
    send("POST", &format!("{}/config/reload", proxy.url), &[], None).assert_status(200);
    ws.send(Message::text(
        json!({"type": "response.create"}).to_string(),
    ))
    .unwrap();
    assert_eq!(next_json(&mut ws)["type"], "response.done");
    assert_eq!(up.seen().len(), 1);
    assert!(other.seen().is_empty(), "the session stayed where it began");
    let (_new, answer) = connect(addr(&proxy.url), "/v1/realtime?model=gpt-rt", &[]);
    assert_eq!(answer.headers().get("x-proxy-instance").unwrap(), "b");
}

#[test]
fn sessions_over_the_limit_get_503() {
    let (_up, proxy) = start("server: {max_realtime_sessions: 1}");
    let (_held, _) = connect(addr(&proxy.url), "/v1/realtime?model=gpt-rt", &[]);
    let request = format!("ws://{}/v1/realtime?model=gpt-rt", addr(&proxy.url))
        .into_client_request()
        .unwrap();
    let socket = TcpStream::connect(addr(&proxy.url)).unwrap();
    match tungstenite::client(request, socket) {
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
            assert_eq!(r.status(), 503)
        }
        other => panic!("expected a 503, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn sigterm_closes_open_sessions_with_1001_at_the_end_of_the_grace_period() {
    let up = Upstream::start(false);
    let mut proxy = Running::with_config(&format!(
        "server: {{shutdown_grace_seconds: 0.5}}\ninstances:\n{}",
        v1_instance("a", &up.url)
    ));
    let (mut ws, _) = connect(&proxy.addr, "/v1/realtime?model=gpt-rt", &[]);
    assert_eq!(next_json(&mut ws)["type"], "session.created");
    proxy.signal("TERM");
    assert_eq!(close_code(&mut ws), CloseCode::Away);
    assert!(proxy.exit_within(Duration::from_secs(10)).is_some());
}
