//! One attempt, one outcome: what the client hears after several failed
//! attempts, when circuits open and close, what a deployment fault takes out, how long
//! a cooldown may be, how a stream that breaks is counted, the stream the client asked
//! for, and the time to a stream's first event. Through the real server, with mock
//! upstreams.

mod common;
use common::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEY: &str = "k-fail";

fn chat_for(proxy: &TestProxy, model: &str) -> Answer {
    post_json(
        &format!("{}/v1/chat/completions", proxy.url),
        &json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}),
    )
}

fn chat(proxy: &TestProxy) -> Answer {
    chat_for(proxy, "m")
}

fn stream(proxy: &TestProxy) -> Answer {
    post_json(
        &format!("{}/v1/chat/completions", proxy.url),
        &json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    )
}

fn served_by(a: &Answer) -> String {
    a.header("x-proxy-instance").unwrap_or("-").to_string()
}

fn instance(name: &str, url: &str, priority: u32, extra: &str) -> String {
    format!(
        "  - {{name: {name}, api_key: {KEY}, api_base: '{url}', api_version: 2024-10-21, priority: {priority}, supported_models: [m] {extra}}}\n"
    )
}

fn get(proxy: &TestProxy, path: &str) -> Value {
    send("GET", &format!("{}{path}", proxy.url), &[], None).json()
}

fn error_reply(status: u16) -> MockReply {
    json_reply(
        status,
        json!({"error": {"code": status.to_string(), "message": "no"}}),
    )
}

#[test]
fn a_429_from_one_instance_beats_a_refused_connection_on_the_next() {
    let a = Mock::start(Arc::new(|_: &Recorded| MockReply::Json {
        status: 429,
        headers: vec![("retry-after".into(), "20".into())],
        body: json!({"error": {"code": "429", "message": "rate limited"}}),
    }));
    let proxy = TestProxy::start(&format!(
        "instances:\n{}{}",
        instance("a", &a.url, 1, ""),
        instance("b", &refused_url(), 2, "")
    ));
    let answer = chat(&proxy);
    assert_eq!(
        answer.status,
        429,
        "the client can come back after Retry-After; a 502 would say nothing: {}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.header("retry-after"), Some("20"));
    assert_eq!(served_by(&answer), "a");
    // Statistics are recorded once the answer is out: wait for them.
    let attempts = || get(&proxy, "/stats")["metrics"]["upstream_attempts_in_window"].clone();
    assert!(
        wait_until(Duration::from_secs(5), || attempts() == 2),
        "both were tried: {}",
        attempts()
    );
}

#[test]
fn among_several_429s_the_client_hears_the_soonest_retry_after() {
    let refuse = |after: &'static str| {
        Mock::start(Arc::new(move |_: &Recorded| MockReply::Json {
            status: 429,
            headers: vec![("retry-after".into(), after.into())],
            body: json!({"error": {"code": "429", "message": "rate limited"}}),
        }))
    };
    let (a, b, c) = (refuse("40"), refuse("5"), refuse("20"));
    let proxy = TestProxy::start(&format!(
        "instances:\n{}{}{}",
        instance("a", &a.url, 1, ""),
        instance("b", &b.url, 2, ""),
        instance("c", &c.url, 3, "")
    ));
    let answer = chat(&proxy);
    assert_eq!(answer.status, 429);
    assert_eq!(answer.header("retry-after"), Some("5"));
    assert_eq!(served_by(&answer), "b");
}

#[test]
fn an_instance_that_fails_every_second_request_is_taken_out() {
    let n = AtomicUsize::new(0);
    let ok = azure_like(KEY);
    let a = Mock::start(Arc::new(move |r: &Recorded| {
        if n.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
            error_reply(500)
        } else {
            ok(r)
        }
    }));
    let b = Mock::start(azure_like(KEY));
    let proxy = TestProxy::start(&format!(
        "routing: {{circuit_open_seconds: 60}}\ninstances:\n{}{}",
        instance("a", &a.url, 1, ""),
        instance("b", &b.url, 2, "")
    ));
    for i in 0..20 {
        assert_eq!(chat(&proxy).status, 200, "request {i}");
    }
    // Failures at a's 1st, 3rd and 5th requests: 3 of 5 in the last minute.
    assert_eq!(a.count(), 5, "taken out after its third failure in five");
    assert_eq!(instance_stats(&proxy, "a")["status"], "circuit_open");
}

#[test]
fn a_missing_deployment_takes_the_instance_out_for_that_model_only() {
    let ok = azure_like(KEY);
    let a = Mock::start(Arc::new(move |r: &Recorded| {
        if r.target.contains("/deployments/m/") {
            json_reply(
                404,
                json!({"error": {"code": "DeploymentNotFound", "message": "The API deployment for this resource does not exist."}}),
            )
        } else {
            ok(r)
        }
    }));
    let b = Mock::start(azure_like(KEY));
    let proxy = TestProxy::start(&format!(
        "instances:\n{}{}",
        instance("a", &a.url, 1, ", model_deployments: {m2: m2}"),
        instance("b", &b.url, 2, ", model_deployments: {m2: m2}")
    ));
    for i in 0..5 {
        let answer = chat_for(&proxy, "m");
        assert_eq!(
            (answer.status, served_by(&answer)),
            (200, "b".into()),
            "m, request {i}"
        );
    }
    let m_on_a = |a: &Mock| {
        a.requests()
            .iter()
            .filter(|r| r.target.contains("/deployments/m/"))
            .count()
    };
    assert_eq!(m_on_a(&a), 1, "after one 404, m is not sent to a again");
    for i in 0..5 {
        let answer = chat_for(&proxy, "m2");
        assert_eq!(
            (answer.status, served_by(&answer)),
            (200, "a".into()),
            "m2 still goes to a, request {i}"
        );
    }
    assert_eq!(instance_stats(&proxy, "a")["status"], "healthy");
}

#[test]
fn a_late_success_does_not_close_a_circuit_that_opened_after_it_started() {
    let n = AtomicUsize::new(0);
    let ok = azure_like(KEY);
    let a = Mock::start(Arc::new(move |r: &Recorded| {
        if n.fetch_add(1, Ordering::SeqCst) == 0 {
            // The first request: slow, and in the end a success.
            std::thread::sleep(Duration::from_millis(800));
            ok(r)
        } else {
            error_reply(500)
        }
    }));
    let b = Mock::start(azure_like(KEY));
    let proxy = Arc::new(TestProxy::start(&format!(
        "routing: {{circuit_failures: 2, circuit_open_seconds: 60}}\ninstances:\n{}{}",
        instance("a", &a.url, 1, ""),
        instance("b", &b.url, 2, "")
    )));
    let slow = {
        let proxy = proxy.clone();
        std::thread::spawn(move || chat(&proxy))
    };
    assert!(wait_until(Duration::from_secs(5), || a.count() == 1));
    for _ in 0..2 {
        assert_eq!(served_by(&chat(&proxy)), "b", "a failed; b served");
    }
    assert_eq!(instance_stats(&proxy, "a")["status"], "circuit_open");
    let late = slow.join().unwrap();
    assert_eq!((late.status, served_by(&late)), (200, "a".into()));
    assert_eq!(
        instance_stats(&proxy, "a")["status"],
        "circuit_open",
        "only the trial closes a circuit"
    );
    assert_eq!(served_by(&chat(&proxy)), "b");
    assert_eq!(a.count(), 3);
}

#[test]
fn a_retry_after_of_a_day_is_capped_at_max_cooldown_and_logged() {
    let n = AtomicUsize::new(0);
    let ok = azure_like(KEY);
    let a = Mock::start(Arc::new(move |r: &Recorded| {
        if n.fetch_add(1, Ordering::SeqCst) == 0 {
            MockReply::Json {
                status: 429,
                headers: vec![("retry-after".into(), "86400".into())],
                body: json!({"error": {"code": "429", "message": "come back tomorrow"}}),
            }
        } else {
            ok(r)
        }
    }));
    let b = Mock::start(azure_like(KEY));
    let yaml = format!(
        "instances:\n{}{}",
        instance("a", &a.url, 1, ""),
        instance("b", &b.url, 2, "")
    );
    // The default cap: 300 s.
    let mut proxy = Running::with_config(&yaml);
    let answer = send(
        "POST",
        &proxy.url("/v1/chat/completions"),
        &[("content-type", "application/json")],
        Some(br#"{"model":"m","messages":[]}"#),
    );
    assert_eq!(served_by(&answer), "b");
    let stats = send("GET", &proxy.url("/stats/instances"), &[], None).json();
    let until = stats["instances"][0]["rate_limited_until"]
        .as_str()
        .unwrap()
        .to_string();
    let logged =
        "instance a asked for a cooldown of 86400 s; capped at routing.max_cooldown (300 s)";
    assert!(
        wait_until(Duration::from_secs(5), || proxy.stderr().contains(logged)),
        "{}",
        proxy.stderr()
    );
    // The cooldown ends within 300 s of now, not tomorrow.
    let secs = seconds_until(&until);
    assert!((295.0..=301.0).contains(&secs), "{until}: {secs} s away");

    // A shorter cap, and the instance back when it ends.
    let a2 = Mock::start(Arc::new({
        let n = AtomicUsize::new(0);
        let ok = azure_like(KEY);
        move |r: &Recorded| {
            if n.fetch_add(1, Ordering::SeqCst) == 0 {
                MockReply::Json {
                    status: 429,
                    headers: vec![("retry-after".into(), "86400".into())],
                    body: json!({"error": {"code": "429", "message": "come back tomorrow"}}),
                }
            } else {
                ok(r)
            }
        }
    }));
    let proxy = TestProxy::start(&format!(
        "routing: {{max_cooldown: 1}}\ninstances:\n{}{}",
        instance("a", &a2.url, 1, ""),
        instance("b", &b.url, 2, "")
    ));
    // Before the request: the 1 s cooldown starts when its 429 comes, no earlier.
    let started = Instant::now();
    assert_eq!(served_by(&chat(&proxy)), "b");
    assert!(wait_until(Duration::from_secs(5), || served_by(&chat(
        &proxy
    )) == "a"));
    assert!(started.elapsed() >= Duration::from_millis(800));
}

/// Seconds from now until an RFC 3339 UTC time as `/stats/instances` writes it.
fn seconds_until(rfc3339: &str) -> f64 {
    let (date, time) = rfc3339.trim_end_matches('Z').split_once('T').unwrap();
    let d: Vec<i64> = date.split('-').map(|p| p.parse().unwrap()).collect();
    let t: Vec<f64> = time.split(':').map(|p| p.parse().unwrap()).collect();
    // Days since 1970-01-01 (Howard Hinnant's algorithm).
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1])
    } else {
        (d[0], d[1])
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d[2] - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let at = days as f64 * 86_400.0 + t[0] * 3600.0 + t[1] * 60.0 + t[2];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    at - now
}

#[test]
fn a_stream_cut_after_its_first_event_counts_as_a_failure() {
    let a = Mock::start(Arc::new(|_: &Recorded| MockReply::Sse {
        first_after: Duration::ZERO,
        events: chat_events("m", &["Hel", "lo"], false),
        gap: Duration::from_millis(5),
        end: SseEnd::Cut,
    }));
    let proxy = TestProxy::start(&format!(
        "routing: {{circuit_failures: 1, circuit_open_seconds: 60}}\ninstances:\n{}",
        instance("a", &a.url, 1, "")
    ));
    let answer = stream(&proxy);
    assert_eq!(answer.status, 200, "the head had gone out");
    let events = sse_data(&answer.body);
    assert!(
        events.last().unwrap().contains("stream_interrupted"),
        "{events:?}"
    );
    // Statistics are recorded once the answer is out: wait for them.
    let counted = || get(&proxy, "/stats")["metrics"]["failed_requests_in_window"] == 1;
    assert!(wait_until(Duration::from_secs(5), counted));
    let stats = get(&proxy, "/stats")["metrics"].clone();
    assert_eq!(stats["successful_requests_in_window"], 0, "{stats}");
    assert_eq!(stats["failed_requests_in_window"], 1, "{stats}");
    assert_eq!(stats["upstream_errors_in_window"], 1, "{stats}");
    let a_stats = instance_stats(&proxy, "a");
    assert_eq!(
        a_stats["errors_by_status"],
        json!({"broken": 1}),
        "{a_stats}"
    );
    assert_eq!(a_stats["status"], "circuit_open", "{a_stats}");
    assert_eq!(
        metric_sample(
            &proxy,
            r#"aoai_proxy_upstream_errors_total{instance="a",kind="broken"}"#
        ),
        Some(1.0)
    );
}

#[test]
fn the_client_gets_no_usage_it_did_not_ask_for() {
    let up = Mock::start(azure_like(KEY));
    let proxy = TestProxy::start(&format!("instances:\n{}", instance("a", &up.url, 1, "")));
    let answer = stream(&proxy);
    assert_eq!(answer.status, 200);
    assert_eq!(
        up.requests()[0].json()["stream_options"]["include_usage"],
        true,
        "the proxy asked for usage upstream"
    );
    let events = sse_data(&answer.body);
    let chunks: Vec<Value> = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks.len() >= 3, "{events:?}");
    for chunk in &chunks {
        assert!(
            chunk.get("usage").is_none(),
            "the client did not ask for usage: {chunk}"
        );
    }
    assert_eq!(
        chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect::<String>(),
        "Hello world"
    );
    // A client that asked for usage gets every chunk as the upstream sent it.
    let asked = post_json(
        &format!("{}/v1/chat/completions", proxy.url),
        &json!({"model": "m", "stream": true, "stream_options": {"include_usage": true},
                "messages": [{"role": "user", "content": "hi"}]}),
    );
    asked.assert_status(200);
    let with_usage: Vec<Value> = sse_data(&asked.body)
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let content: Vec<&Value> = with_usage
        .iter()
        .filter(|c| !c["choices"].as_array().unwrap().is_empty())
        .collect();
    assert_eq!(content.len(), 2, "{with_usage:?}");
    assert!(content.iter().all(|c| c.get("usage") == Some(&Value::Null)));
}

fn late_stream(first_after: Duration, gap: Duration) -> Behaviour {
    Arc::new(move |_: &Recorded| MockReply::Sse {
        first_after,
        events: chat_events("m", &["a", "b", "c"], false),
        gap,
        end: SseEnd::Done,
    })
}

#[test]
fn time_to_first_event_has_its_own_limit_and_a_late_first_event_is_retried() {
    // The first event takes 1.5 s where 0.5 s is allowed: the stream is retried on b
    // before anything reached the client.
    let slow = Mock::start(late_stream(
        Duration::from_millis(1500),
        Duration::from_millis(5),
    ));
    let fast = Mock::start(late_stream(Duration::ZERO, Duration::from_millis(5)));
    let proxy = TestProxy::start(&format!(
        "routing: {{first_byte_timeout: 0.5, timeout: 5}}\ninstances:\n{}{}",
        instance("a", &slow.url, 1, ""),
        instance("b", &fast.url, 2, "")
    ));
    let started = Instant::now();
    let answer = stream(&proxy);
    assert_eq!((answer.status, served_by(&answer)), (200, "b".into()));
    assert!(
        started.elapsed() < Duration::from_millis(1400),
        "{:?}",
        started.elapsed()
    );
    assert!(wait_until(Duration::from_secs(5), || instance_stats(
        &proxy, "a"
    )["errors_by_status"]
        == json!({"timeout": 1})));

    // Azure's prompt-filter chunk comes at once, before the model wrote anything: it is
    // not the first byte of the answer.
    let filtered_then_slow = Mock::start(late_stream(Duration::ZERO, Duration::from_millis(1500)));
    let proxy = TestProxy::start(&format!(
        "routing: {{first_byte_timeout: 0.5, timeout: 5}}\ninstances:\n{}{}",
        instance("a", &filtered_then_slow.url, 1, ""),
        instance("b", &fast.url, 2, "")
    ));
    let answer = stream(&proxy);
    assert_eq!((answer.status, served_by(&answer)), (200, "b".into()));

    // The first event may take longer than the gap allowed between events.
    let thinking = Mock::start(late_stream(
        Duration::from_millis(1000),
        Duration::from_millis(5),
    ));
    let proxy = TestProxy::start(&format!(
        "routing: {{first_byte_timeout: 3, timeout: 0.5}}\ninstances:\n{}",
        instance("a", &thinking.url, 1, "")
    ));
    let answer = stream(&proxy);
    assert_eq!(answer.status, 200);
    let events = sse_data(&answer.body);
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );

    // And a gap longer than `timeout` after the first event cuts the stream.
    let stalls = Mock::start(late_stream(Duration::ZERO, Duration::from_millis(1500)));
    let proxy = TestProxy::start(&format!(
        "routing: {{first_byte_timeout: 3, timeout: 0.5}}\ninstances:\n{}",
        instance("a", &stalls.url, 1, "")
    ));
    let answer = stream(&proxy);
    let events = sse_data(&answer.body);
    assert!(
        events.last().unwrap().contains("stream_interrupted"),
        "{events:?}"
    );
}

#[test]
fn health_reports_the_configuration_version_next_to_the_binarys() {
    let up = Mock::start(azure_like(KEY));
    let proxy = TestProxy::start(&format!(
        "version: \"1.0.9\"\ninstances:\n{}",
        instance("a", &up.url, 1, "")
    ));
    let health = get(&proxy, "/health");
    assert_eq!(health["config_version"], "1.0.9", "{health}");
    assert_eq!(health["version"], env!("CARGO_PKG_VERSION"), "{health}");
    // Without one, none: the binary's version is not the configuration's.
    let unversioned = TestProxy::start(&format!("instances:\n{}", instance("a", &up.url, 1, "")));
    assert_eq!(get(&unversioned, "/health")["config_version"], Value::Null);
    // `/config` says the same: null, not an empty string.
    assert_eq!(get(&proxy, "/config")["config"]["version"], "1.0.9");
    assert_eq!(
        get(&unversioned, "/config")["config"]["version"],
        Value::Null
    );
}
