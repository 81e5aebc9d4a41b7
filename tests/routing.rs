//! Routing, cooldowns, circuits and TPM/RPM limits (DESIGN §5.4–§7) through the real
//! server, with several mock upstreams.

mod common;
use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEY: &str = "k-route";

/// A chat request whose admission estimate is exactly 500 tokens:
/// 4 (message) + 3 (reply) + 1 ("hi") + 492 (max_tokens).
fn chat500() -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 492})
}

fn chat(proxy: &TestProxy) -> Answer {
    post_json(&format!("{}/v1/chat/completions", proxy.url), &chat500())
}

fn served_by(a: &Answer) -> String {
    a.header("x-proxy-instance").unwrap_or("-").to_string()
}

/// An Azure-like mock that first answers `first` for `times` requests.
fn first_then_ok(times: usize, first: fn() -> MockReply) -> Behaviour {
    let n = AtomicUsize::new(0);
    let ok = azure_like(KEY);
    Arc::new(move |r: &Recorded| {
        if n.fetch_add(1, Ordering::SeqCst) < times {
            first()
        } else {
            ok(r)
        }
    })
}

fn too_many(headers: &[(&str, &str)]) -> MockReply {
    MockReply::Json {
        status: 429,
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        body: json!({"error": {"code": "429", "message": "Requests to the ChatCompletions_Create Operation have exceeded the token rate limit."}}),
    }
}

fn instances(mocks: &[(&str, &Mock, &str)]) -> String {
    mocks
        .iter()
        .enumerate()
        .map(|(i, (name, m, extra))| {
            format!(
                "  - {{name: {name}, api_key: {KEY}, api_base: '{}', api_version: 2024-10-21, priority: {}, supported_models: [m] {extra}}}\n",
                m.url,
                i + 1
            )
        })
        .collect()
}

#[test]
fn a_429_with_retry_after_keeps_the_instance_out_for_the_whole_period() {
    let a = Mock::start(first_then_ok(1, || too_many(&[("retry-after", "30")])));
    let b = Mock::start(azure_like(KEY));
    let proxy = TestProxy::start(&format!(
        "instances:\n{}",
        instances(&[("a", &a, ""), ("b", &b, "")])
    ));
    for i in 0..20 {
        let answer = chat(&proxy);
        assert_eq!(answer.status, 200, "request {i}");
        assert_eq!(served_by(&answer), "b", "request {i}");
    }
    assert_eq!(a.count(), 1, "a got nothing after its 429");
}

#[test]
fn a_cooled_down_instance_comes_back_when_its_retry_after_ends() {
    let a = Mock::start(first_then_ok(1, || too_many(&[("retry-after-ms", "1500")])));
    let b = Mock::start(azure_like(KEY));
    let proxy = TestProxy::start(&format!(
        "instances:\n{}",
        instances(&[("a", &a, ""), ("b", &b, "")])
    ));
    let started = Instant::now();
    assert_eq!(
        served_by(&chat(&proxy)),
        "b",
        "a's 429 moved the first request on"
    );
    let mut back_at = None;
    assert!(wait_until(Duration::from_secs(5), || {
        let served = served_by(&chat(&proxy));
        if served == "a" {
            back_at = Some(started.elapsed());
        }
        served == "a"
    }));
    let back_at = back_at.unwrap();
    assert!(
        back_at >= Duration::from_millis(1400),
        "back too early: {back_at:?}"
    );
    assert!(
        back_at < Duration::from_millis(3000),
        "back too late: {back_at:?}"
    );
}

#[test]
fn round_robin_rotates_exactly() {
    let mocks: Vec<Mock> = (0..3).map(|_| Mock::start(azure_like(KEY))).collect();
    let proxy = TestProxy::start(&format!(
        "routing: {{strategy: round_robin}}\ninstances:\n{}",
        instances(&[
            ("a", &mocks[0], ""),
            ("b", &mocks[1], ""),
            ("c", &mocks[2], "")
        ])
    ));
    let order: Vec<String> = (0..9).map(|_| served_by(&chat(&proxy))).collect();
    assert_eq!(order, ["a", "b", "c", "a", "b", "c", "a", "b", "c"]);
}

#[test]
fn failover_takes_turns_among_equal_priorities() {
    let mocks: Vec<Mock> = (0..3).map(|_| Mock::start(azure_like(KEY))).collect();
    let list = instances(&[
        ("a", &mocks[0], ""),
        ("b", &mocks[1], ""),
        ("c", &mocks[2], ""),
    ])
    .replace("priority: 2", "priority: 1");
    let proxy = TestProxy::start(&format!("instances:\n{list}"));
    let order: Vec<String> = (0..4).map(|_| served_by(&chat(&proxy))).collect();
    assert_eq!(
        order,
        ["a", "b", "a", "b"],
        "c has a higher priority value and is never needed"
    );
}

#[test]
fn weighted_splits_by_weight() {
    let a = Mock::start(azure_like(KEY));
    let b = Mock::start(azure_like(KEY));
    let proxy = TestProxy::start(&format!(
        "routing: {{strategy: weighted}}\ninstances:\n{}",
        instances(&[("a", &a, ", weight: 3"), ("b", &b, ", weight: 1")])
    ));
    let n = 400;
    for _ in 0..n {
        assert_eq!(chat(&proxy).status, 200);
    }
    // Expected 300 / 100; the binomial standard deviation is about 8.7, so ±45 is over 5 sigma.
    assert!(
        (255..=345).contains(&a.count()),
        "a got {} of {n}",
        a.count()
    );
    assert_eq!(a.count() + b.count(), n);
}

#[test]
fn least_loaded_sends_to_the_emptiest_window() {
    let a = Mock::start(azure_like(KEY));
    let b = Mock::start(azure_like(KEY));
    let proxy = TestProxy::start(&format!(
        "routing: {{strategy: least_loaded}}\ninstances:\n{}",
        instances(&[("a", &a, ", max_tpm: 2000"), ("b", &b, ", max_tpm: 4000")])
    ));
    // a: 0/2000, b: 0/4000 → a (tie, priority); then a 25% vs b 0% → b; 25% vs 12.5% → b;
    // 25% vs 25% → a (priority); 50% vs 25% → b.
    let order: Vec<String> = (0..5).map(|_| served_by(&chat(&proxy))).collect();
    assert_eq!(order, ["a", "b", "b", "a", "b"]);
}

#[test]
fn full_tpm_windows_spill_over_and_then_answer_429_with_retry_after() {
    let a = Mock::start(azure_like(KEY));
    let b = Mock::start(azure_like(KEY));
    let proxy = TestProxy::start(&format!(
        "routing: {{queue_timeout: 0}}\ninstances:\n{}",
        instances(&[("a", &a, ", max_tpm: 1000"), ("b", &b, ", max_tpm: 1000")])
    ));
    let order: Vec<String> = (0..4).map(|_| served_by(&chat(&proxy))).collect();
    assert_eq!(order, ["a", "a", "b", "b"]);
    let refused = chat(&proxy);
    assert_eq!(refused.status, 429);
    assert_eq!(refused.openai_error()["code"], "rate_limit_exceeded");
    let after: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    let after_ms: u64 = refused.header("retry-after-ms").unwrap().parse().unwrap();
    assert!(
        (58..=60).contains(&after),
        "the first reservation leaves the window in ~60 s: {after}"
    );
    assert!((57_000..=60_000).contains(&after_ms), "{after_ms}");
    assert_eq!(
        (a.count(), b.count()),
        (2, 2),
        "the refused request reached no upstream"
    );
    // A small request still fits nowhere: both windows are exactly full.
    let small = post_json(
        &format!("{}/v1/chat/completions", proxy.url),
        &json!({"model": "m", "messages": [], "max_tokens": 1}),
    );
    assert_eq!(small.status, 429);
}

#[test]
fn full_rpm_windows_answer_429() {
    let a = Mock::start(azure_like(KEY));
    let proxy = TestProxy::start(&format!(
        "routing: {{queue_timeout: 0}}\ninstances:\n{}",
        instances(&[("a", &a, ", max_rpm: 3")])
    ));
    let statuses: Vec<u16> = (0..5).map(|_| chat(&proxy).status).collect();
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    assert_eq!(a.count(), 3);
}

#[test]
fn upstream_remaining_tokens_correct_the_local_window() {
    let a = Mock::start(Arc::new(|r: &Recorded| match azure_like(KEY)(r) {
        MockReply::Json {
            status,
            mut headers,
            body,
        } => {
            headers.retain(|(k, _)| k != "x-ratelimit-remaining-tokens");
            headers.push(("x-ratelimit-remaining-tokens".into(), "0".into()));
            MockReply::Json {
                status,
                headers,
                body,
            }
        }
        other => other,
    }));
    let b = Mock::start(azure_like(KEY));
    let proxy = TestProxy::start(&format!(
        "routing: {{queue_timeout: 0}}\ninstances:\n{}",
        instances(&[
            ("a", &a, ", max_tpm: 100000"),
            ("b", &b, ", max_tpm: 100000")
        ])
    ));
    assert_eq!(served_by(&chat(&proxy)), "a");
    assert_eq!(
        served_by(&chat(&proxy)),
        "b",
        "a said it has no tokens left, though 99,500 are free locally"
    );
}

#[test]
fn a_short_wait_for_room_is_taken_instead_of_a_429() {
    let a = Mock::start(first_then_ok(1, || too_many(&[("retry-after-ms", "600")])));
    let proxy = TestProxy::start(&format!(
        "routing: {{queue_timeout: 2}}\ninstances:\n{}",
        instances(&[("a", &a, "")])
    ));
    let first = chat(&proxy);
    assert_eq!(
        first.status, 429,
        "the only instance answered 429: that answer comes back"
    );
    assert_eq!(
        first.header("retry-after-ms"),
        Some("600"),
        "with the upstream's headers"
    );
    let started = Instant::now();
    let second = chat(&proxy);
    assert_eq!(second.status, 200, "waited for the cooldown to end");
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "{:?}",
        started.elapsed()
    );

    let too_long = Mock::start(first_then_ok(1, || too_many(&[("retry-after", "30")])));
    let proxy = TestProxy::start(&format!(
        "routing: {{queue_timeout: 1}}\ninstances:\n{}",
        instances(&[("a", &too_long, "")])
    ));
    chat(&proxy);
    let started = Instant::now();
    let refused = chat(&proxy);
    assert_eq!(refused.status, 429);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "no point waiting when room is 30 s away"
    );
    let after: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((29..=30).contains(&after), "{after}");
}

#[test]
fn a_failing_instance_opens_its_circuit_and_one_trial_closes_it() {
    let healthy = Arc::new(AtomicBool::new(false));
    let flag = healthy.clone();
    let ok = azure_like(KEY);
    let a = Mock::start(Arc::new(move |r: &Recorded| {
        if flag.load(Ordering::SeqCst) {
            ok(r)
        } else {
            json_reply(503, json!({"error": {"message": "down"}}))
        }
    }));
    let b = Mock::start(azure_like(KEY));
    let proxy = TestProxy::start(&format!(
        "routing: {{circuit_failures: 2, circuit_open_seconds: 1}}\ninstances:\n{}",
        instances(&[("a", &a, ""), ("b", &b, "")])
    ));
    // Two failures on a (each retried on b) open its circuit.
    for _ in 0..2 {
        assert_eq!(served_by(&chat(&proxy)), "b");
    }
    let opened = Instant::now();
    assert_eq!(a.count(), 2);
    for _ in 0..10 {
        assert_eq!(served_by(&chat(&proxy)), "b");
    }
    assert_eq!(a.count(), 2, "an open circuit gets no requests");

    healthy.store(true, Ordering::SeqCst);
    assert!(
        wait_until(Duration::from_secs(4), || served_by(&chat(&proxy)) == "a"),
        "the trial never came"
    );
    assert!(
        opened.elapsed() >= Duration::from_millis(700),
        "trial before the circuit time: {:?}",
        opened.elapsed()
    );
    assert_eq!(a.count(), 3, "exactly one trial");
    for _ in 0..3 {
        assert_eq!(
            served_by(&chat(&proxy)),
            "a",
            "closed again: a is preferred"
        );
    }
}

#[test]
fn every_instance_down_gives_503_with_retry_after() {
    let a = Mock::start(Arc::new(|_: &Recorded| {
        json_reply(500, json!({"error": {"message": "boom"}}))
    }));
    let proxy = TestProxy::start(&format!(
        "routing: {{circuit_failures: 1, circuit_open_seconds: 30}}\ninstances:\n{}",
        instances(&[("a", &a, "")])
    ));
    assert_eq!(
        chat(&proxy).status,
        500,
        "the first failure comes back as it is"
    );
    let down = chat(&proxy);
    assert_eq!(down.status, 503);
    assert_eq!(down.openai_error()["code"], "service_unavailable");
    let after: u64 = down.header("retry-after").unwrap().parse().unwrap();
    assert!((29..=30).contains(&after), "{after}");
    assert_eq!(a.count(), 1);
}

#[test]
fn concurrent_clients_lose_nothing_and_never_overfill_a_window() {
    let a = Mock::start(azure_like(KEY));
    let b = Mock::start(azure_like(KEY));
    // 500-token requests, 10 fit each window: 20 of the 400 can be served.
    let proxy = Arc::new(TestProxy::start(&format!(
        "routing: {{strategy: round_robin, queue_timeout: 0}}\nserver: {{workers: 16}}\ninstances:\n{}",
        instances(&[("a", &a, ", max_tpm: 5000"), ("b", &b, ", max_tpm: 5000")])
    )));
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let proxy = proxy.clone();
            std::thread::spawn(move || (0..25).map(|_| chat(&proxy).status).collect::<Vec<u16>>())
        })
        .collect();
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    for t in threads {
        for s in t.join().unwrap() {
            *statuses.entry(s).or_default() += 1;
        }
    }
    assert_eq!(
        statuses.values().sum::<usize>(),
        400,
        "every request was answered"
    );
    assert_eq!(statuses.get(&200), Some(&20), "{statuses:?}");
    assert_eq!(statuses.get(&429), Some(&380), "{statuses:?}");
    assert_eq!(
        (a.count(), b.count()),
        (10, 10),
        "no window took more than it holds"
    );
}

#[test]
fn requests_that_never_reached_an_upstream_give_their_reservation_back() {
    let refused = refused_url();
    // `.invalid` never resolves (RFC 2606).
    let proxy = TestProxy::start(&format!(
        "routing: {{retries: 1, circuit_failures: 100}}\ninstances:\n{}{}",
        azure_instance(
            "refused",
            &refused,
            KEY,
            1,
            "max_tpm: 100000, supported_models: [m]"
        ),
        azure_instance(
            "unresolvable",
            "http://no-such-host.invalid",
            KEY,
            2,
            "max_tpm: 100000, supported_models: [m]"
        ),
    ));
    for _ in 0..3 {
        assert_eq!(chat(&proxy).status, 502);
    }
    let instances = send("GET", &format!("{}/stats/instances", proxy.url), &[], None).json();
    let tpm: HashMap<String, u64> = instances["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap().to_string(),
                i["current_tpm"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(tpm["refused"], 0, "{instances}");
    assert_eq!(tpm["unresolvable"], 0, "{instances}");
}
