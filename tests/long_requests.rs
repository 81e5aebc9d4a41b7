//! A request fails only itself, whatever its length or its upstream does: long
//! generations that time out are neither sent twice nor held against healthy
//! instances, outlandish numbers from an upstream are bounded, a panic gives back what
//! its request held, streams end honestly, counters saturate, and a request waiting
//! for room holds no permit. Through the real server, with scripted test upstreams.

mod common;
use common::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEY: &str = "k-long";

fn instance(name: &str, url: &str, priority: u32, models: &str) -> String {
    format!(
        "  - {{name: {name}, api_key: {KEY}, api_base: '{url}', api_version: 2024-10-21, priority: {priority}, supported_models: [{models}]}}\n"
    )
}

fn chat(proxy: &TestProxy, model: &str, max_tokens: u64) -> Answer {
    post_json(
        &format!("{}/v1/chat/completions", proxy.url),
        &json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}),
    )
}

fn stream(proxy: &TestProxy) -> Answer {
    post_json(
        &format!("{}/v1/chat/completions", proxy.url),
        &json!({"model": "m", "stream": true, "stream_options": {"include_usage": true},
                "messages": [{"role": "user", "content": "hi"}]}),
    )
}

fn get(proxy: &TestProxy, path: &str) -> Value {
    send("GET", &format!("{}{path}", proxy.url), &[], None).json()
}

/// A whole JSON answer as raw bytes.
fn json_bytes(status: u16, headers: &str, body: &Value) -> Vec<u8> {
    let body = body.to_string();
    format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{headers}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn completion(usage: u64) -> Value {
    json!({"id": "c", "object": "chat.completion",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
           "usage": {"prompt_tokens": usage, "completion_tokens": usage, "total_tokens": usage}})
}

/// An upstream that generates at `per_token` a `max_tokens` token: its answer comes
/// when the whole completion is done, as a non-streamed one does.
fn generating(per_token: Duration) -> Behaviour {
    Arc::new(move |r: &Recorded| {
        let tokens = r.json()["max_tokens"].as_u64().unwrap_or(1) as u32;
        MockReply::Raw(vec![(
            per_token * tokens,
            json_bytes(200, "", &completion(1)),
        )])
    })
}

fn long_requests_at(up: &Mock, max_tokens: u64) -> usize {
    up.requests()
        .iter()
        .filter(|r| r.json()["max_tokens"] == max_tokens)
        .count()
}

/// Three long generations beside a stream of small requests, on two healthy instances
/// that take 10 ms a token; `routing.timeout` is shorter than a long one takes. Returns
/// the long requests' answers and the small requests' statuses.
fn long_beside_small(proxy: &TestProxy) -> (Vec<Answer>, Vec<u16>) {
    std::thread::scope(|s| {
        let longs: Vec<_> = (0..3).map(|_| s.spawn(|| chat(proxy, "m", 150))).collect();
        let smalls = s.spawn(|| {
            let mut statuses = Vec::new();
            let started = Instant::now();
            while started.elapsed() < Duration::from_millis(1500) {
                statuses.push(chat(proxy, "m", 1).status);
            }
            statuses
        });
        let longs = longs.into_iter().map(|l| l.join().unwrap()).collect();
        (longs, smalls.join().unwrap())
    })
}

#[test]
fn a_long_generation_that_times_out_is_sent_once_and_opens_no_circuit() {
    let (a, b) = (
        Mock::start(generating(Duration::from_millis(10))),
        Mock::start(generating(Duration::from_millis(10))),
    );
    let proxy = TestProxy::start(&format!(
        "routing: {{timeout: 0.5, strategy: round_robin}}\ninstances:\n{}{}",
        instance("a", &a.url, 1, "m"),
        instance("b", &b.url, 1, "m"),
    ));
    let (longs, smalls) = long_beside_small(&proxy);
    assert_eq!(
        long_requests_at(&a, 150) + long_requests_at(&b, 150),
        3,
        "each long request reached one instance"
    );
    for long in &longs {
        long.assert_status(504);
        let error = long.openai_error();
        assert_eq!(error["code"], "upstream_timeout");
        let message = error["message"].as_str().unwrap();
        assert!(message.contains("routing.timeout (0.5 s"), "{message}");
    }
    assert!(
        !smalls.is_empty() && smalls.iter().all(|&s| s == 200),
        "{smalls:?}"
    );
    for name in ["a", "b"] {
        let stats = instance_stats(&proxy, name);
        assert_eq!(stats["status"], "healthy", "{stats}");
    }
    assert_eq!(chat(&proxy, "m", 1).status, 200);
}

#[test]
fn the_operator_may_ask_for_timed_out_requests_to_be_tried_elsewhere() {
    let (a, b) = (
        Mock::start(generating(Duration::from_millis(10))),
        Mock::start(generating(Duration::from_millis(10))),
    );
    let proxy = TestProxy::start(&format!(
        "routing: {{timeout: 0.3, retry_timeouts: true}}\ninstances:\n{}{}",
        instance("a", &a.url, 1, "m"),
        instance("b", &b.url, 2, "m"),
    ));
    chat(&proxy, "m", 100).assert_status(504);
    assert_eq!(
        (long_requests_at(&a, 100), long_requests_at(&b, 100)),
        (1, 1)
    );
}

#[test]
fn an_endless_retry_after_cools_the_instance_and_the_request_fails_over() {
    let refusing = Mock::start(Arc::new(|_: &Recorded| {
        MockReply::Raw(vec![(
            Duration::ZERO,
            json_bytes(
                429,
                "retry-after: 1e20\r\nretry-after-ms: 1e30\r\nx-ratelimit-reset-tokens: 9999999999999999999h\r\n",
                &json!({"error": {"code": "429", "message": "slow down"}}),
            ),
        )])
    }));
    let healthy = Mock::start(azure_like(KEY));
    let proxy = TestProxy::start(&format!(
        "routing: {{max_cooldown: 30}}\ninstances:\n{}{}",
        instance("a", &refusing.url, 1, "m"),
        instance("b", &healthy.url, 2, "m"),
    ));
    let answer = chat(&proxy, "m", 10);
    answer.assert_status(200);
    assert_eq!(answer.header("x-proxy-instance"), Some("b"));
    assert_eq!(instance_stats(&proxy, "a")["status"], "rate_limited");
    chat(&proxy, "m", 10).assert_status(200);
    assert_eq!(refusing.count(), 1, "cooling: not asked again");
}

#[cfg(debug_assertions)]
#[test]
fn a_panic_costs_its_request_and_nothing_else() {
    let up = Mock::start(azure_like(KEY));
    let proxy = TestProxy::start(&format!(
        "server: {{workers: 1}}\ninstances:\n  - {{name: a, api_key: {KEY}, api_base: '{}', api_version: 2024-10-21, max_tpm: 1000, supported_models: [m]}}\n",
        up.url
    ));
    let before = instance_stats(&proxy, "a")["current_tpm"].clone();
    let body =
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 700});
    for _ in 0..3 {
        let answer = send(
            "POST",
            &format!("{}/v1/chat/completions", proxy.url),
            &[
                ("content-type", "application/json"),
                ("x-proxy-test-panic", "1"),
            ],
            Some(body.to_string().as_bytes()),
        );
        answer.assert_status(500);
        assert_eq!(answer.openai_error()["code"], "internal_error");
    }
    assert_eq!(
        instance_stats(&proxy, "a")["current_tpm"],
        before,
        "windows as before"
    );
    assert_eq!(get(&proxy, "/stats")["metrics"]["total_panics"], 3);
    assert_eq!(metric_sample(&proxy, "aoai_proxy_panics_total"), Some(3.0));
    // The one permit and the window's room are free: a request that needs both gets them.
    let answer = post_json(&format!("{}/v1/chat/completions", proxy.url), &body);
    answer.assert_status(200);
    assert_eq!(up.count(), 1, "the panicking requests never went out");
}

/// A chunked SSE answer whose body is `body`, written as one chunk, then `end`.
fn sse_bytes(body: &str, end: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n{end}",
        body.len()
    )
    .into_bytes()
}

fn scripted(bytes: Vec<u8>) -> Mock {
    Mock::start(Arc::new(move |_: &Recorded| {
        MockReply::Raw(vec![(Duration::ZERO, bytes.clone())])
    }))
}

const CHUNK: &str = r#"{"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#;
const LAST: &str = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"content_filter"}]}"#;

/// The stream's answer through a proxy of one instance at `up`, and that instance's
/// errors.
fn streamed_through(up: &Mock) -> (Answer, Value) {
    let proxy = TestProxy::start(&format!(
        "routing: {{first_byte_timeout: 2}}\ninstances:\n{}",
        instance("a", &up.url, 1, "m")
    ));
    let answer = stream(&proxy);
    // The relay's end is counted once the answer is written: the request's record.
    assert!(wait_until(Duration::from_secs(5), || get(&proxy, "/stats")
        ["metrics"]["total_requests"]
        == 1));
    (
        answer,
        instance_stats(&proxy, "a")["errors_by_status"].clone(),
    )
}

#[test]
fn a_stream_ends_at_done_whatever_follows() {
    // `[DONE]`, then junk and a connection cut before the chunked body's end.
    let up = scripted(sse_bytes(
        &format!("data: {CHUNK}\n\ndata: [DONE]\n\ngarbage"),
        "5\r\nmore",
    ));
    let (answer, errors) = streamed_through(&up);
    answer.assert_status(200);
    let body = String::from_utf8_lossy(&answer.body).to_string();
    assert!(body.contains("[DONE]"), "{body}");
    assert!(!body.contains("stream_interrupted"), "{body}");
    assert_eq!(errors, json!({}), "no failure counted");
}

#[test]
fn a_finish_reason_then_a_clean_end_is_a_complete_stream() {
    let up = scripted(sse_bytes(
        &format!("data: {CHUNK}\n\ndata: {LAST}\n\n"),
        "0\r\n\r\n",
    ));
    let (answer, errors) = streamed_through(&up);
    let body = String::from_utf8_lossy(&answer.body).to_string();
    assert!(body.contains("content_filter"), "{body}");
    assert!(!body.contains("stream_interrupted"), "{body}");
    assert_eq!(errors, json!({}), "no failure counted");
}

#[test]
fn events_may_end_with_any_blank_line_the_sse_spec_allows() {
    for sep in ["\r\r", "\n\r\n", "\r\n\n"] {
        let up = scripted(sse_bytes(
            &format!("data: {CHUNK}{sep}data: {LAST}{sep}data: [DONE]{sep}"),
            "0\r\n\r\n",
        ));
        let (answer, errors) = streamed_through(&up);
        answer.assert_status(200);
        let body = String::from_utf8_lossy(&answer.body).to_string();
        assert!(
            body.contains("\"Hi\"") && body.contains("[DONE]"),
            "{sep:?}: {body}"
        );
        assert_eq!(errors, json!({}), "{sep:?}");
    }
}

#[test]
fn token_counters_saturate_and_never_run_backwards() {
    let huge = 1u64 << 62;
    let up = Mock::start(Arc::new(move |_: &Recorded| {
        MockReply::Raw(vec![(
            Duration::ZERO,
            json_bytes(200, "", &completion(huge)),
        )])
    }));
    let proxy = TestProxy::start(&format!("instances:\n{}", instance("a", &up.url, 1, "m")));
    let mut last = (0u64, 0.0f64);
    for _ in 0..5 {
        chat(&proxy, "m", 10).assert_status(200);
        let served = get(&proxy, "/stats")["metrics"]["total_tokens_served"]
            .as_u64()
            .unwrap();
        let exposed = metric_sample(
            &proxy,
            r#"aoai_proxy_tokens_total{instance="a",kind="prompt"}"#,
        )
        .unwrap();
        assert!(
            served >= last.0 && exposed >= last.1,
            "{served} {exposed} after {last:?}"
        );
        last = (served, exposed);
    }
    assert_eq!(last.0, u64::MAX);
    assert_eq!(
        instance_stats(&proxy, "a")["total_tokens_served"],
        json!(u64::MAX)
    );
}

/// An upstream that answers its first request 429 with `Retry-After: 2`, then 200s.
fn refuses_first() -> Mock {
    let seen = AtomicUsize::new(0);
    Mock::start(Arc::new(move |_: &Recorded| {
        if seen.fetch_add(1, Ordering::SeqCst) == 0 {
            MockReply::Raw(vec![(
                Duration::ZERO,
                json_bytes(
                    429,
                    "retry-after: 2\r\n",
                    &json!({"error": {"code": "429", "message": "later"}}),
                ),
            )])
        } else {
            MockReply::Raw(vec![(Duration::ZERO, json_bytes(200, "", &completion(1)))])
        }
    }))
}

#[test]
fn a_request_waiting_for_room_holds_no_permit() {
    let (a, b) = (refuses_first(), Mock::start(azure_like(KEY)));
    let proxy = TestProxy::start(&format!(
        "server: {{workers: 1}}\nrouting: {{queue_timeout: 5}}\ninstances:\n{}{}",
        instance("a", &a.url, 1, "m"),
        instance("b", &b.url, 1, "other"),
    ));
    chat(&proxy, "m", 10).assert_status(429);
    std::thread::scope(|s| {
        // Waits for a's cooldown (2 s), within its queue_timeout.
        let waiting = s.spawn(|| chat(&proxy, "m", 10));
        // Nothing outside shows a parked request: give it time to park.
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        chat(&proxy, "other", 10).assert_status(200);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "another model's request waited {:?} for the permit",
            started.elapsed()
        );
        waiting.join().unwrap().assert_status(200);
    });
}

#[test]
fn a_request_waits_queue_timeout_at_most_for_a_permit_and_room_together() {
    let a = refuses_first();
    let slow = Mock::start(Arc::new(|_: &Recorded| {
        MockReply::Raw(vec![(
            Duration::from_millis(1200),
            json_bytes(200, "", &completion(1)),
        )])
    }));
    let proxy = TestProxy::start(&format!(
        "server: {{workers: 1}}\nrouting: {{queue_timeout: 1.5}}\ninstances:\n{}{}",
        instance("a", &a.url, 1, "m"),
        instance("b", &slow.url, 1, "other"),
    ));
    // a cools down for 2 s: longer than a request may wait.
    chat(&proxy, "m", 10).assert_status(429);
    std::thread::scope(|s| {
        let holder = s.spawn(|| chat(&proxy, "other", 10));
        assert!(wait_until(Duration::from_secs(5), || slow.count() == 1));
        let started = Instant::now();
        let answer = chat(&proxy, "m", 10);
        let waited = started.elapsed();
        answer.assert_status(429);
        assert!(waited < Duration::from_millis(1500), "waited {waited:?}");
        holder.join().unwrap().assert_status(200);
    });
}
