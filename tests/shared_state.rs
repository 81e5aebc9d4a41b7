//! Several proxies on one quota, sharing state in a real `redis-server`:
//! windows, cooldowns and affinity seen by all; the scripts themselves; Redis killed or
//! stopped and found again without a failed request; rediss:// with a private CA. The
//! simulation behind bench/results.md is the ignored test at the end.
#![cfg(feature = "redis")]

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An upstream that enforces its own TPM quota as Azure does: each request costs
/// `cost` tokens for 60 s; past `limit` it answers 429 with when room comes.
struct Quota {
    used: Mutex<VecDeque<Instant>>,
    refused: AtomicUsize,
    served: AtomicUsize,
}

fn limited(limit: u64, cost: u64) -> (Behaviour, Arc<Quota>) {
    let quota = Arc::new(Quota {
        used: Mutex::new(VecDeque::new()),
        refused: AtomicUsize::new(0),
        served: AtomicUsize::new(0),
    });
    let q = quota.clone();
    let behaviour: Behaviour = Arc::new(move |_req: &Recorded| {
        let now = Instant::now();
        let mut used = q.used.lock().unwrap();
        while used
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            used.pop_front();
        }
        if (used.len() as u64 + 1) * cost > limit {
            q.refused.fetch_add(1, Ordering::SeqCst);
            let wait = 60 - now.duration_since(used[0]).as_secs();
            return MockReply::Json {
                status: 429,
                headers: vec![("retry-after".into(), wait.to_string())],
                body: json!({"error": {"code": "429", "message": "Rate limit exceeded"}}),
            };
        }
        used.push_back(now);
        q.served.fetch_add(1, Ordering::SeqCst);
        json_reply(
            200,
            json!({"id": "chatcmpl-1", "object": "chat.completion", "model": "m",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}),
        )
    });
    (behaviour, quota)
}

/// An Azure-like upstream without a limit of its own: it sends no remaining-token
/// headers, which would (rightly) fill the proxies' windows under a long load.
fn unlimited() -> Behaviour {
    let azure = azure_like("k");
    Arc::new(move |req: &Recorded| match azure(req) {
        MockReply::Json {
            status,
            headers,
            body,
        } => MockReply::Json {
            status,
            headers: headers
                .into_iter()
                .filter(|(k, _)| !k.starts_with("x-ratelimit"))
                .collect(),
            body,
        },
        other => other,
    })
}

fn instance(name: &str, url: &str, priority: u32, extra: &str) -> String {
    azure_instance(
        name,
        url,
        "k",
        priority,
        &format!("supported_models: [m]{extra}"),
    )
}

fn redis_yaml(redis: &RedisServer, prefix: &str) -> String {
    format!("redis: {{url: '{}', prefix: {prefix}}}\n", redis.url())
}

/// A chat request the proxy estimates at 100 tokens of completion plus its prompt.
fn chat() -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100})
}

fn health(proxy: &TestProxy) -> Value {
    send("GET", &format!("{}/health", proxy.url), &[], None).json()
}

/// `n` proxies, and two clients per proxy (at least six in all), against one instance whose quota is 3,000 tokens
/// a minute (30 requests at the upstream's count; the proxies, counting 100 + the
/// prompt each, admit a few fewer), each client sending 12 requests as fast as it is
/// answered. Returns (refused by the upstream, served).
fn fleet_on_one_quota(n: usize, redis: Option<&RedisServer>) -> (usize, usize) {
    let (behaviour, quota) = limited(3000, 100);
    let upstream = Mock::start(behaviour);
    let yaml = format!(
        "routing: {{retries: 0, queue_timeout: 0}}\ninstances:\n{}{}",
        instance("a", &upstream.url, 1, ", max_tpm: 3000"),
        redis.map(|r| redis_yaml(r, "quota")).unwrap_or_default()
    );
    let proxies: Vec<TestProxy> = (0..n).map(|_| TestProxy::start(&yaml)).collect();
    let expected = if redis.is_some() { "shared" } else { "local" };
    for p in &proxies {
        assert_eq!(health(p)["shared_state"], expected);
    }
    let urls: Vec<String> = proxies
        .iter()
        .map(|p| format!("{}/v1/chat/completions", p.url))
        .collect();
    let statuses = Arc::new(Mutex::new(Vec::new()));
    std::thread::scope(|s| {
        for k in 0..(2 * n).max(6) {
            let (url, statuses) = (&urls[k % n], statuses.clone());
            s.spawn(move || {
                for _ in 0..12 {
                    let status = post_json(url, &chat()).status;
                    statuses.lock().unwrap().push(status);
                }
            });
        }
    });
    let statuses = statuses.lock().unwrap();
    let served = statuses.iter().filter(|&&s| s == 200).count();
    assert!(
        statuses.iter().all(|s| [200, 429].contains(s)),
        "{statuses:?}"
    );
    assert_eq!(served, quota.served.load(Ordering::SeqCst));
    let refused = quota.refused.load(Ordering::SeqCst);
    (refused, served)
}

#[test]
fn three_proxies_with_redis_spend_one_quota_as_one_proxy_would() {
    let redis = RedisServer::start(None);
    let (refused, served) = fleet_on_one_quota(3, Some(&redis));
    assert!(
        refused <= 1,
        "{refused} requests reached the upstream only to be refused"
    );
    assert!(served >= 20, "only {served} served");
}

#[test]
fn three_proxies_without_redis_overrun_the_quota() {
    let (refused, served) = fleet_on_one_quota(3, None);
    assert!(
        refused > 1,
        "each proxy on its own should send some requests only to be refused: {refused}"
    );
    assert!(served >= 20, "only {served} served");
}

#[test]
fn one_proxys_429_cools_the_instance_for_all() {
    let redis = RedisServer::start(Some("s3cret-pw"));
    let first = Arc::new(AtomicBool::new(true));
    let f = first.clone();
    let ok = azure_like("k");
    let a = Mock::start(Arc::new(move |req: &Recorded| {
        if f.swap(false, Ordering::SeqCst) {
            return MockReply::Json {
                status: 429,
                headers: vec![("retry-after".into(), "3".into())],
                body: json!({"error": {"code": "429", "message": "Rate limit exceeded"}}),
            };
        }
        ok(req)
    }));
    let b = Mock::start(azure_like("k"));
    let yaml = format!(
        "routing: {{strategy: failover, retries: 1}}\ninstances:\n{}{}{}",
        instance("a", &a.url, 1, ""),
        instance("b", &b.url, 2, ""),
        redis_yaml(&redis, "cool")
    );
    let proxies: Vec<TestProxy> = (0..3).map(|_| TestProxy::start(&yaml)).collect();
    let chat_at = |p: &TestProxy| post_json(&format!("{}/v1/chat/completions", p.url), &chat());

    // Before the request: the cooldown starts when its 429 comes, no earlier.
    let cooled = Instant::now();
    assert_eq!(chat_at(&proxies[0]).status, 200, "retried on b");
    assert_eq!((a.count(), b.count()), (1, 1));
    for p in &proxies[1..] {
        for _ in 0..3 {
            assert_eq!(chat_at(p).status, 200);
        }
    }
    assert!(
        cooled.elapsed() < Duration::from_millis(2800),
        "too slow to tell"
    );
    assert_eq!(
        a.count(),
        1,
        "the other proxies sent to a while it cooled down"
    );
    assert_eq!(b.count(), 7);
    // Once its Retry-After has passed, a takes requests again.
    assert!(wait_until(Duration::from_secs(5), || {
        chat_at(&proxies[1]).status == 200 && a.count() == 2
    }));
    assert!(
        cooled.elapsed() >= Duration::from_millis(2900),
        "a was back after {:?}",
        cooled.elapsed()
    );
    // The password is in the URL; /config shows none of it.
    let config = send("GET", &format!("{}/config", proxies[0].url), &[], None);
    assert_eq!(config.status, 200);
    let text = String::from_utf8_lossy(&config.body);
    assert!(!text.contains("s3cret-pw"), "{text}");
    assert_eq!(config.json()["config"]["redis"]["url"], "***redacted***");
}

#[test]
fn a_response_made_through_one_proxy_is_found_through_another() {
    let redis = RedisServer::start(None);
    let made = |name: &'static str| -> Behaviour {
        Arc::new(move |req: &Recorded| {
            json_reply(
                200,
                json!({"id": "resp_42", "object": "response", "model": "m", "status": "completed",
                       "output": [], "made_by": name, "method": req.method}),
            )
        })
    };
    let (a, b) = (Mock::start(made("a")), Mock::start(made("b")));
    let yaml = format!(
        "routing: {{strategy: round_robin}}\ninstances:\n{}{}{}",
        instance("a", &a.url, 1, ""),
        instance("b", &b.url, 1, ""),
        redis_yaml(&redis, "affinity")
    );
    let (one, two) = (TestProxy::start(&yaml), TestProxy::start(&yaml));
    let created = post_json(
        &format!("{}/v1/responses", one.url),
        &json!({"model": "m", "input": "hi"}),
    );
    assert_eq!(created.status, 200);
    let home = created.json()["made_by"].as_str().unwrap().to_string();
    for _ in 0..4 {
        let got = send(
            "GET",
            &format!("{}/v1/responses/resp_42", two.url),
            &[],
            None,
        );
        got.assert_status(200);
        assert_eq!(got.json()["made_by"], home.as_str());
        assert_eq!(got.json()["method"], "GET");
    }
}

#[test]
fn losing_redis_fails_no_request_and_finding_it_again_shares_again() {
    let mut redis = RedisServer::start(None);
    let upstream = Mock::start(unlimited());
    let hook = Mock::start(Arc::new(|_: &Recorded| {
        json_reply(200, json!({"code": 0, "msg": "success"}))
    }));
    // Its 404 gives each proxy a distinct, last alert to wait for.
    let missing = Mock::start(Arc::new(|_: &Recorded| {
        json_reply(
            404,
            json!({"error": {"code": "DeploymentNotFound", "message": "no"}}),
        )
    }));
    let yaml = format!(
        "logging: {{feishu_webhook: '{}/hook'}}\ninstances:\n{}{}{}",
        hook.url,
        instance("a", &upstream.url, 1, ", max_tpm: 100000000"),
        instance("gone", &missing.url, 2, "").replace("[m]", "[sentinel]"),
        redis_yaml(&redis, "outage")
    );
    let proxies: Vec<TestProxy> = (0..2).map(|_| TestProxy::start(&yaml)).collect();
    let state_of = |p: &TestProxy| health(p)["shared_state"].as_str().unwrap_or("").to_string();
    assert!(proxies.iter().all(|p| state_of(p) == "shared"));

    let stop = AtomicBool::new(false);
    let (served, failed) = (AtomicUsize::new(0), Mutex::new(Vec::new()));
    std::thread::scope(|s| {
        for k in 0..4 {
            let url = format!("{}/v1/chat/completions", proxies[k % 2].url);
            let (stop, served, failed) = (&stop, &served, &failed);
            s.spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let answer = post_json(&url, &chat());
                    if answer.status == 200 {
                        served.fetch_add(1, Ordering::SeqCst);
                    } else {
                        failed.lock().unwrap().push(answer.status);
                    }
                }
            });
        }
        let load = || served.load(Ordering::SeqCst);
        let before = load();
        assert!(wait_until(Duration::from_secs(5), || load() > before + 20));
        redis.kill();
        let degraded = wait_until(Duration::from_secs(5), || {
            proxies.iter().all(|p| state_of(p) == "degraded")
        });
        let during = load();
        let served_while_down = wait_until(Duration::from_secs(5), || load() > during + 20);
        let stats = send(
            "GET",
            &format!("{}/stats/health", proxies[0].url),
            &[],
            None,
        )
        .json();
        let metrics = send("GET", &format!("{}/metrics", proxies[1].url), &[], None);
        assert!(redis.restart(), "redis-server did not start again");
        let shared = wait_until(Duration::from_secs(10), || {
            proxies.iter().all(|p| state_of(p) == "shared")
        });
        let after = load();
        let served_after = wait_until(Duration::from_secs(5), || load() > after + 20);
        stop.store(true, Ordering::SeqCst);

        assert!(degraded, "/health did not say degraded");
        assert!(served_while_down, "nothing served while Redis was down");
        assert_eq!(
            stats["health_status"]["shared_state"], "degraded",
            "{stats}"
        );
        let text = String::from_utf8_lossy(&metrics.body);
        assert!(
            text.contains("aoai_proxy_shared_state{state=\"degraded\"} 1")
                && text.contains("aoai_proxy_shared_state{state=\"shared\"} 0"),
            "{text}"
        );
        assert!(shared, "/health did not say shared again");
        assert!(served_after, "nothing served after Redis came back");
    });
    assert_eq!(
        *failed.lock().unwrap(),
        Vec::<u16>::new(),
        "failed requests"
    );
    // One alert per proxy for the outage, however many requests met it. Alerts leave
    // each proxy in order: once both sentinels have come, every earlier alert has.
    for p in &proxies {
        let sentinel = json!({"model": "sentinel", "messages": []});
        post_json(&format!("{}/v1/chat/completions", p.url), &sentinel);
    }
    let alerts_with = |text: &str| {
        hook.requests()
            .iter()
            .filter(|r| {
                r.json()["content"]["text"]
                    .as_str()
                    .unwrap_or("")
                    .contains(text)
            })
            .count()
    };
    assert!(wait_until(Duration::from_secs(5), || alerts_with(
        "sentinel"
    ) == 2));
    assert_eq!(alerts_with("Redis"), 2, "{:?}", hook.requests());
}

#[test]
fn a_redis_that_stops_answering_delays_requests_by_its_timeout_only() {
    let redis = RedisServer::start(None);
    let upstream = Mock::start(unlimited());
    let yaml = format!(
        "instances:\n{}redis: {{url: '{}', prefix: slow, timeout_ms: 50}}\n",
        instance("a", &upstream.url, 1, ", max_tpm: 100000000"),
        redis.url()
    );
    let proxy = TestProxy::start(&yaml);
    let url = format!("{}/v1/chat/completions", proxy.url);
    assert_eq!(post_json(&url, &chat()).status, 200);
    redis.pause(true);
    // Should a request hang on the stopped Redis, the test fails rather than hangs;
    // once Redis is resumed, the watchdog signals nothing (the pid may be reused).
    let pid = redis.pid();
    let resumed = Arc::new(AtomicBool::new(false));
    let watched = resumed.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(15));
        if !watched.load(Ordering::SeqCst) {
            let _ = std::process::Command::new("kill")
                .args(["-CONT", &pid.to_string()])
                .status();
        }
    });
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let sent = Instant::now();
        let status = post_json(&url, &chat()).status;
        slowest = slowest.max(sent.elapsed());
        assert_eq!(status, 200);
    }
    let degraded = health(&proxy)["shared_state"] == "degraded";
    redis.pause(false);
    resumed.store(true, Ordering::SeqCst);
    assert!(degraded, "/health did not say degraded");
    // One request waits for the 50 ms timeout; the others do not ask Redis.
    assert!(
        slowest < Duration::from_secs(1),
        "a request took {slowest:?}"
    );
    assert!(wait_until(Duration::from_secs(10), || {
        health(&proxy)["shared_state"] == "shared"
    }));
    assert_eq!(post_json(&url, &chat()).status, 200);
}

#[test]
fn the_scripts_reserve_release_correct_and_cool_in_one_step_each() {
    use azure_openai_proxy::config::{Instance, Redis};
    use azure_openai_proxy::observe::alerts::Alerts;
    use azure_openai_proxy::shared::{Settle, Shared, Verdict};
    let redis = RedisServer::start(None);
    let config: Redis =
        serde_yaml::from_str(&format!("{{url: '{}', prefix: scripts}}", redis.url())).unwrap();
    let alerts = Arc::new(Alerts::disabled("test"));
    let shared = Shared::start(&config, "test", &alerts).unwrap();
    // Releases and corrections are applied after `settle` returns: each is awaited
    // before the admission that must see it.
    let flushed = || assert!(shared.flush(Duration::from_secs(5)), "not applied");
    let inst = |yaml: &str| -> Instance {
        serde_yaml::from_str(&format!(
            "{{api_key: k, api_base: 'http://x', supported_models: [m], {yaml}}}"
        ))
        .unwrap()
    };
    let (a, b, c) = (
        inst("name: a, max_tpm: 1000"),
        inst("name: b, max_rpm: 2"),
        inst("name: c"),
    );
    let admitted = |i: &Instance, need| match shared.admit(&alerts, i, need, None) {
        Some(Verdict::Admitted(id)) => Some(id),
        Some(_) => None,
        None => panic!("Redis did not answer"),
    };
    let full_for = |i: &Instance, need| match shared.admit(&alerts, i, need, None) {
        Some(Verdict::Full(wait)) => wait,
        other => panic!("{other:?}"),
    };

    let first = admitted(&a, 400).unwrap();
    assert!(admitted(&a, 400).is_some());
    // No room for 300 tokens: a verdict for that size (a smaller request may fit).
    let wait = match shared.admit(&alerts, &a, 300, None) {
        Some(Verdict::NoRoom(wait)) => wait,
        other => panic!("{other:?}"),
    };
    assert!(
        wait > Duration::from_secs(58) && wait <= Duration::from_secs(60),
        "{wait:?}: room when the first 400 leaves"
    );
    let release = Settle {
        release: Some((&first, 400)),
        ..Settle::default()
    };
    shared.settle(&alerts, &a, &release);
    shared.settle(&alerts, &a, &release); // twice takes nothing more back
    flushed();
    assert!(admitted(&a, 500).is_some(), "400 + 500 fit in 1000");
    assert!(admitted(&a, 200).is_none(), "1100 do not");
    // The upstream says 200 are left of 1000, where the window has 900: it has 800.
    // A larger remaining count never lowers it.
    let left = |n| {
        shared.settle(
            &alerts,
            &a,
            &Settle {
                remaining: (Some(n), None),
                ..Settle::default()
            },
        )
    };
    left(200);
    left(900);
    flushed();
    assert!(admitted(&a, 100).is_some(), "800 + 100");
    assert!(
        admitted(&a, 100).is_none(),
        "a correction raised the window"
    );

    assert!(admitted(&b, 5).is_some() && admitted(&b, 5).is_some());
    assert!(
        full_for(&b, 5) > Duration::from_secs(58),
        "two requests a minute"
    );

    let cool = |d| Settle {
        cooldown: Some(d),
        ..Settle::default()
    };
    shared.settle(&alerts, &c, &cool(Duration::from_secs(3)));
    shared.settle(&alerts, &c, &cool(Duration::from_secs(1)));
    let wait = full_for(&c, 1);
    assert!(
        wait > Duration::from_secs(2),
        "a cooldown only ever extends: {wait:?}"
    );
    let open = Settle {
        circuit: Some(Duration::from_secs(4)),
        ..Settle::default()
    };
    shared.settle(&alerts, &c, &open);
    match shared.admit(&alerts, &c, 1, None) {
        Some(Verdict::Down(wait)) => assert!(wait > Duration::from_secs(3), "{wait:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(shared.state(), "shared");
}

/// The table in bench/results.md ("Several proxies on one quota"): 1, 2, 4 and 8
/// proxies, with and without Redis. Run with
/// `cargo test --test shared_state -- --ignored --nocapture simulate`.
#[test]
#[ignore]
fn simulate_fleets_on_one_quota() {
    println!("| proxies | Redis | sent only to be refused | served | quota used |");
    println!("|---:|---|---:|---:|---:|");
    for n in [1, 2, 4, 8] {
        for shared in [false, true] {
            let redis = shared.then(|| RedisServer::start(None));
            let (refused, served) = fleet_on_one_quota(n, redis.as_ref());
            println!(
                "| {n} | {} | {refused} | {served} | {} % |",
                if shared { "yes" } else { "no" },
                served * 100 * 100 / 3000
            );
        }
    }
}

#[test]
fn rediss_with_the_servers_ca_is_shared_and_without_it_is_not() {
    let redis = RedisServer::start_tls();
    let ca = redis.ca.as_ref().unwrap().to_str().unwrap();
    let upstream = Mock::start(unlimited());
    let yaml = |ca_file: &str| {
        format!(
            "instances:\n{}redis: {{url: '{}', prefix: tls{ca_file}}}\n",
            instance("a", &upstream.url, 1, ", max_tpm: 100000"),
            redis.url()
        )
    };
    let trusted = TestProxy::start(&yaml(&format!(", ca_file: '{ca}'")));
    assert_eq!(health(&trusted)["shared_state"], "shared");
    let url = format!("{}/v1/chat/completions", trusted.url);
    assert_eq!(post_json(&url, &chat()).status, 200);
    let reserved = std::process::Command::new("redis-cli")
        .args(["--tls", "--cacert", ca, "-h", "127.0.0.1", "-p"])
        .arg(redis.port.to_string())
        .args(["zcard", "tls:i:{a}:tpm"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&reserved.stdout).trim(),
        "1",
        "the request's reservation, made over TLS"
    );
    // The compiled-in roots do not know this CA: the certificate is refused.
    let untrusting = TestProxy::start(&yaml(""));
    assert_eq!(health(&untrusting)["shared_state"], "degraded");
}

#[test]
fn a_redis_that_answers_but_refuses_writes_stays_degraded_until_it_takes_them() {
    let redis = RedisServer::start(None);
    let upstream = Mock::start(unlimited());
    let yaml = format!(
        "instances:\n{}{}",
        instance("a", &upstream.url, 1, ", max_tpm: 100000000"),
        redis_yaml(&redis, "oom")
    );
    let proxy = TestProxy::start(&yaml);
    let url = format!("{}/v1/chat/completions", proxy.url);
    assert_eq!(post_json(&url, &chat()).status, 200);
    // Out of memory: Redis answers every call, and refuses every write.
    assert_eq!(
        redis.cli(&["config", "set", "maxmemory-policy", "noeviction"]),
        "OK"
    );
    assert_eq!(redis.cli(&["config", "set", "maxmemory", "1"]), "OK");
    assert_eq!(
        post_json(&url, &chat()).status,
        200,
        "served on local state"
    );
    let state = || health(&proxy)["shared_state"].clone();
    assert!(wait_until(Duration::from_secs(5), || state() == "degraded"));
    // The reconnect thread's tries (at once, 0.1 s, 0.2 s, 0.4 s, ...) answer, but
    // cannot write: the proxy must not count Redis as back.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        assert_eq!(state(), "degraded");
        assert_eq!(post_json(&url, &chat()).status, 200);
    }
    assert_eq!(redis.cli(&["config", "set", "maxmemory", "0"]), "OK");
    assert!(wait_until(Duration::from_secs(10), || state() == "shared"));
    // Back, the proxy has its connections ready (8, and redis-cli's own): the requests
    // that follow do not each connect on their way.
    let clients = redis.cli(&["client", "list"]).lines().count();
    assert!(clients >= 9, "{clients} connections");
}
