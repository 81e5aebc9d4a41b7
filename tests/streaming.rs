//! Streaming (DESIGN §8) through the real server: events pass through as they arrive,
//! usage is captured without changing the client's stream, a client that leaves frees
//! its worker, and a broken upstream stream ends with an explicit error event.

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEY: &str = "k-stream";

fn slow_stream(gap: Duration, words: &'static [&'static str], end: fn() -> SseEnd) -> Behaviour {
    Arc::new(move |req: &Recorded| MockReply::Sse {
        first_after: Duration::ZERO,
        events: chat_events(
            "dep",
            words,
            req.json()["stream_options"]["include_usage"] == json!(true),
        ),
        gap,
        end: end(),
    })
}

fn proxy_for(mock: &Mock, extra: &str) -> TestProxy {
    TestProxy::start(&format!(
        "{extra}instances:\n{}",
        azure_instance("east", &mock.url, KEY, 1, "supported_models: [gpt-4o]")
    ))
}

/// Posts a streaming chat request and returns each SSE event with the time it arrived.
fn stream_events(url: &str, body: Value) -> (u16, Vec<(Duration, String)>) {
    let started = Instant::now();
    let resp = client()
        .post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .send(body.to_string())
        .unwrap();
    let status = resp.status().as_u16();
    let mut reader = resp.into_body().into_reader();
    let (mut pending, mut events, mut buf) = (String::new(), Vec::new(), [0u8; 4096]);
    loop {
        let n = reader.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        pending.push_str(std::str::from_utf8(&buf[..n]).unwrap());
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            events.push((
                started.elapsed(),
                event.trim_start_matches("data: ").trim_end().to_string(),
            ));
        }
    }
    (status, events)
}

#[test]
fn events_reach_the_client_as_they_are_sent() {
    let mock = Mock::start(slow_stream(
        Duration::from_millis(300),
        &["one", "two", "three"],
        || SseEnd::Done,
    ));
    let proxy = proxy_for(&mock, "");
    let (status, events) = stream_events(
        &proxy.url,
        json!({"model": "gpt-4o", "stream": true, "messages": []}),
    );
    assert_eq!(status, 200);
    let content: Vec<Duration> = events
        .iter()
        .filter(|(_, e)| e.contains("\"content\""))
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(content.len(), 3, "{events:?}");
    let end = events.last().unwrap().0;
    // Upstream sends the content events 300 ms apart; buffering would bunch them at the end.
    assert!(
        content[1] - content[0] >= Duration::from_millis(200),
        "{content:?}"
    );
    assert!(
        content[2] - content[1] >= Duration::from_millis(200),
        "{content:?}"
    );
    assert!(
        end - content[0] >= Duration::from_millis(400),
        "first event {content:?} vs end {end:?}"
    );
}

#[test]
fn usage_is_requested_upstream_and_its_chunk_hidden_from_the_client() {
    let mock = Mock::start(slow_stream(Duration::from_millis(1), &["a", "b"], || {
        SseEnd::Done
    }));
    let proxy = proxy_for(&mock, "");
    let (_, events) = stream_events(
        &proxy.url,
        json!({"model": "gpt-4o", "stream": true, "messages": []}),
    );
    let sent = mock.requests()[0].json();
    assert_eq!(
        sent["stream_options"]["include_usage"], true,
        "asked upstream"
    );
    assert_eq!(
        sent["messages"],
        json!([]),
        "the rest of the body is unchanged"
    );
    let data: Vec<&str> = events.iter().map(|(_, e)| e.as_str()).collect();
    assert_eq!(
        data.len(),
        4,
        "filter chunk, two content chunks, [DONE]: {data:?}"
    );
    assert!(
        !data.iter().any(|e| e.contains("prompt_tokens")),
        "{data:?}"
    );
    assert_eq!(*data.last().unwrap(), "[DONE]");
}

#[test]
fn a_client_that_asked_for_usage_gets_its_usage_chunk() {
    let mock = Mock::start(slow_stream(Duration::from_millis(1), &["a", "b"], || {
        SseEnd::Done
    }));
    let proxy = proxy_for(&mock, "");
    let (_, events) = stream_events(
        &proxy.url,
        json!({"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true}}),
    );
    let usage: Value = serde_json::from_str(&events[events.len() - 2].1).unwrap();
    assert_eq!(usage["usage"]["total_tokens"], 11);
    assert_eq!(usage["choices"], json!([]));
}

#[test]
fn a_client_leaving_mid_stream_frees_the_worker_and_the_upstream() {
    let words: &'static [&'static str] = &["w"; 200];
    let mock = Mock::start(slow_stream(Duration::from_millis(50), words, || {
        SseEnd::Done
    }));
    let proxy = proxy_for(&mock, "server: {workers: 1}\n");
    let addr = proxy.url.trim_start_matches("http://").to_string();
    let body = json!({"model": "gpt-4o", "stream": true}).to_string();
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        conn,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("\"content\"") {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended early");
        got.extend_from_slice(&buf[..n]);
    }
    drop(conn);
    // 200 events 50 ms apart would take 10 s; the proxy must give up on the upstream soon.
    assert!(
        wait_until(Duration::from_secs(5), || mock
            .aborted_streams
            .load(std::sync::atomic::Ordering::SeqCst)
            == 1),
        "the upstream stream was not closed"
    );
    // The only worker is free again.
    let started = Instant::now();
    let models = send("GET", &format!("{}/v1/models", proxy.url), &[], None);
    assert_eq!(models.status, 200);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn a_cut_upstream_stream_ends_with_an_error_event() {
    let mock = Mock::start(slow_stream(Duration::from_millis(1), &["a", "b"], || {
        SseEnd::Cut
    }));
    let proxy = proxy_for(&mock, "");
    let (status, events) = stream_events(&proxy.url, json!({"model": "gpt-4o", "stream": true}));
    assert_eq!(status, 200);
    assert!(
        events.iter().any(|(_, e)| e.contains("\"b\"")),
        "events before the cut arrive: {events:?}"
    );
    let last: Value = serde_json::from_str(&events.last().unwrap().1).unwrap();
    assert_eq!(last["error"]["code"], "stream_interrupted", "{events:?}");
    assert!(!events.iter().any(|(_, e)| e == "[DONE]"));
}

#[test]
fn a_stalled_upstream_stream_ends_with_an_error_event_after_the_timeout() {
    let mock = Mock::start(slow_stream(Duration::from_millis(1), &["a"], || {
        SseEnd::Stall(Duration::from_secs(20))
    }));
    let proxy = proxy_for(&mock, "routing: {timeout: 1}\n");
    let started = Instant::now();
    let (_, events) = stream_events(&proxy.url, json!({"model": "gpt-4o", "stream": true}));
    let took = started.elapsed();
    let last: Value = serde_json::from_str(&events.last().unwrap().1).unwrap();
    assert_eq!(last["error"]["code"], "stream_interrupted", "{events:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[test]
fn a_stream_is_retried_on_another_instance_before_its_first_byte() {
    let failing = Mock::start(Arc::new(|_: &Recorded| {
        json_reply(500, json!({"error": {"message": "down"}}))
    }));
    let good = Mock::start(slow_stream(Duration::from_millis(1), &["ok"], || {
        SseEnd::Done
    }));
    let proxy = TestProxy::start(&format!(
        "instances:\n{}{}",
        azure_instance("first", &failing.url, KEY, 1, "supported_models: [gpt-4o]"),
        azure_instance("second", &good.url, KEY, 2, "supported_models: [gpt-4o]"),
    ));
    let (status, events) = stream_events(&proxy.url, json!({"model": "gpt-4o", "stream": true}));
    assert_eq!(status, 200);
    assert!(events.iter().any(|(_, e)| e.contains("\"ok\"")));
    assert_eq!((failing.count(), good.count()), (1, 1));
}

#[test]
fn an_upstream_error_on_a_stream_request_is_a_plain_json_error() {
    let mock = Mock::start(Arc::new(|_: &Recorded| {
        json_reply(
            400,
            json!({"error": {"code": "context_length_exceeded", "message": "too long"}}),
        )
    }));
    let proxy = proxy_for(&mock, "");
    let a = post_json(
        &format!("{}/v1/chat/completions", proxy.url),
        &json!({"model": "gpt-4o", "stream": true}),
    );
    assert_eq!(a.status, 400);
    assert_eq!(a.json()["error"]["code"], "context_length_exceeded");
}

#[test]
fn a_burst_of_new_streams_all_start_while_earlier_ones_are_held() {
    // The server gives each connection a thread from a pool for the connection's life. A
    // burst of new connections must each get a thread, not queue behind busy ones.
    let mock = Mock::start(slow_stream(Duration::from_millis(1), &["a"], || {
        SseEnd::Stall(Duration::from_secs(20))
    }));
    let proxy = proxy_for(&mock, "server: {workers: 128}\nrouting: {timeout: 4}\n");
    // Served once first, so that the pool's threads are idle and waiting for the burst.
    assert_eq!(
        send("GET", &format!("{}/health", proxy.url), &[], None).status,
        200
    );
    let addr = proxy.url.trim_start_matches("http://");
    let burst = 100;
    let started = Instant::now();
    let go = Arc::new(std::sync::Barrier::new(burst));
    let (tx, rx) = std::sync::mpsc::channel();
    for _ in 0..burst {
        let (tx, go, addr) = (tx.clone(), go.clone(), addr.to_string());
        std::thread::spawn(move || {
            go.wait();
            let first_event = || -> std::io::Result<()> {
                let mut c = std::net::TcpStream::connect(&addr)?;
                c.set_read_timeout(Some(Duration::from_secs(10)))?;
                let body = r#"{"model":"gpt-4o","stream":true}"#;
                write!(c, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())?;
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                while !seen.windows(5).any(|w| w == b"data:") {
                    match c.read(&mut buf)? {
                        0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                        n => seen.extend_from_slice(&buf[..n]),
                    }
                }
                Ok(())
            };
            let _ = tx.send(first_event().map(|()| started.elapsed()));
        });
    }
    // Every stream is held by the upstream until `routing.timeout` (4 s) cuts it, so a
    // connection queued behind another would only start after that.
    for i in 0..burst {
        let took = rx
            .recv_timeout(Duration::from_secs(15))
            .expect("client thread");
        let took = took.unwrap_or_else(|e| panic!("stream {i}: {e}"));
        assert!(
            took < Duration::from_millis(3500),
            "stream {i} started after {took:?}"
        );
    }
}
