//! The shared state's scripts as Redis sees them, in a real `redis-server`: every key a
//! script touches is one it was passed (watched with MONITOR), a reservation whose
//! reply was lost and a release Redis did not take are given back once Redis answers
//! again; and when settlements land: after the client's answer, except a cooldown,
//! before a stopping proxy ends, on a Redis that lost the scripts.
#![cfg(feature = "redis")]

mod common;

use common::*;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn proxy(redis: &RedisServer, upstream: &Mock, prefix: &str) -> TestProxy {
    TestProxy::start(&format!(
        "instances:\n{}redis: {{url: '{}', prefix: {prefix}, timeout_ms: 50}}\n",
        azure_instance(
            "a",
            &upstream.url,
            "k",
            1,
            "supported_models: [m], max_tpm: 100000, max_rpm: 1000"
        ),
        redis.url()
    ))
}

fn chat(proxy: &TestProxy, content: &str) -> Answer {
    post_json(
        &format!("{}/v1/chat/completions", proxy.url),
        &json!({"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 100}),
    )
}

/// The quoted arguments of a MONITOR line, unescaped enough for key names.
fn arguments(line: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut chars = line.chars();
    while chars.by_ref().any(|c| c == '"') {
        let mut arg = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => arg.extend(chars.next()),
                '"' => break,
                c => arg.push(c),
            }
        }
        args.push(arg);
    }
    args
}

#[test]
fn every_key_a_script_touches_is_passed_in_keys() {
    let redis = RedisServer::start(None);
    let mut monitor = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &redis.port.to_string(), "monitor"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let seen = lines.clone();
    let out = monitor.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            seen.lock().unwrap().push(line);
        }
    });
    assert!(wait_until(Duration::from_secs(5), || lines
        .lock()
        .unwrap()
        .iter()
        .any(|l| l == "OK")));
    // A 200 with remaining counts (a correction), then a 429 (a release, a cooldown).
    let azure = azure_like("k");
    let upstream = Mock::start(Arc::new(move |r: &Recorded| {
        if String::from_utf8_lossy(&r.body).contains("cool") {
            json_reply(
                429,
                json!({"error": {"code": "429", "message": "Rate limit exceeded"}}),
            )
        } else {
            azure(r)
        }
    }));
    let proxy = proxy(&redis, &upstream, "declared");
    chat(&proxy, "hi").assert_status(200);
    chat(&proxy, "cool down").assert_status(429);
    assert!(
        wait_until(Duration::from_secs(5), || lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("[0 lua] \"ZREM\""))),
        "the release was not seen"
    );
    let _ = monitor.kill();
    let _ = monitor.wait();
    let lines = lines.lock().unwrap().clone();
    let mut declared: Vec<String> = Vec::new();
    let mut checked = Vec::new();
    for line in &lines {
        let args = arguments(line);
        let Some(command) = args.first() else {
            continue;
        };
        if !line.contains("[0 lua]") {
            if command.eq_ignore_ascii_case("evalsha") || command.eq_ignore_ascii_case("eval") {
                let n: usize = args[2].parse().unwrap();
                declared = args[3..3 + n].to_vec();
            }
            continue;
        }
        if command.eq_ignore_ascii_case("time") {
            continue;
        }
        let key = &args[1];
        assert!(
            declared.contains(key),
            "{command} {key} touches a key not in KEYS {declared:?}"
        );
        checked.push(key.clone());
    }
    assert!(
        checked.iter().any(|k| k == "declared:i:{a}:tpm:sum")
            && checked.iter().any(|k| k == "declared:i:{a}:rpm:sum"),
        "the totals were touched: {checked:?}"
    );
}

#[test]
fn a_reservation_whose_reply_was_lost_is_given_back_when_redis_answers_again() {
    let redis = RedisServer::start(None);
    let upstream = Mock::start(azure_like("k"));
    let proxy = proxy(&redis, &upstream, "lost");
    let health = || send("GET", &format!("{}/health", proxy.url), &[], None).json();
    assert_eq!(health()["shared_state"], "shared");
    // Stopped, Redis takes the admission into its socket buffer and runs it on resuming,
    // after the proxy gave up on the reply and went on with its own state.
    redis.pause(true);
    let answer = chat(&proxy, "hi");
    let degraded = health()["shared_state"] == "degraded";
    redis.pause(false);
    answer.assert_status(200);
    assert!(degraded, "the admission's reply was not lost");
    assert!(wait_until(Duration::from_secs(10), || health()
        ["shared_state"]
        == "shared"));
    let window = |what: &str| redis.cli(&["ZCARD", &format!("lost:i:{{a}}:{what}")]);
    assert!(
        wait_until(Duration::from_secs(5), || window("tpm") == "0"
            && window("rpm") == "0"),
        "the lost admission's reservation stands: tpm {}, rpm {}",
        window("tpm"),
        window("rpm")
    );
    assert_eq!(redis.cli(&["GET", "lost:i:{a}:tpm:sum"]), "0");
}

/// Between its admission and its answer (a 404: Azure cannot have counted it), Redis
/// asks for a password and drops every connection, so the release cannot be sent; it is
/// kept, and given back once Redis takes the proxy again.
#[test]
fn a_release_redis_did_not_take_is_given_back_when_it_answers_again() {
    let redis = RedisServer::start(None);
    let cli = |args: &[&str]| {
        let mut all = vec!["--no-auth-warning", "-a", "pw"];
        all.extend_from_slice(args);
        redis.cli(&all)
    };
    let port = redis.port.to_string();
    let upstream = Mock::start(Arc::new(move |_: &Recorded| {
        let cli = |args: &[&str]| {
            Command::new("redis-cli")
                .args([
                    "--no-auth-warning",
                    "-a",
                    "pw",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                ])
                .args(args)
                .output()
                .unwrap()
        };
        cli(&["CONFIG", "SET", "requirepass", "pw"]);
        cli(&["CLIENT", "KILL", "TYPE", "normal"]);
        json_reply(
            404,
            json!({"error": {"code": "DeploymentNotFound", "message": "no"}}),
        )
    }));
    let proxy = proxy(&redis, &upstream, "kept");
    let health = || send("GET", &format!("{}/health", proxy.url), &[], None).json();
    assert_eq!(health()["shared_state"], "shared");
    chat(&proxy, "hi").assert_status(404);
    let window = |what: &str| cli(&["ZCARD", &format!("kept:i:{{a}}:{what}")]);
    assert_eq!(window("tpm"), "1", "the admission was not made");
    assert!(wait_until(Duration::from_secs(5), || health()
        ["shared_state"]
        == "degraded"));
    assert_eq!(cli(&["CONFIG", "SET", "requirepass", ""]), "OK");
    assert!(wait_until(Duration::from_secs(10), || health()
        ["shared_state"]
        == "shared"));
    assert!(
        wait_until(Duration::from_secs(5), || window("tpm") == "0"
            && window("rpm") == "0"),
        "the release was lost: tpm {}, rpm {}",
        window("tpm"),
        window("rpm")
    );
}

/// A proxy whose upstream stops Redis (SIGSTOP) when asked, between a request's
/// admission and its settlement, then answers as `answer` (`azure_like`'s answers say
/// 9,000 of 10,000 tokens are left). Redis's timeout is long, so that a settlement on
/// the request path waits for Redis rather than gives up. Returns the upstream (to
/// keep) and what signals Redis ("-CONT" resumes it).
fn stopping_redis(
    redis: &RedisServer,
    prefix: &str,
    answer: Behaviour,
) -> (TestProxy, Mock, impl Fn(&str) + Clone + Send + 'static) {
    let pid = redis.pid().to_string();
    let signal = move |s: &str| {
        let sent = std::process::Command::new("kill")
            .args([s, &pid])
            .status()
            .unwrap();
        assert!(sent.success());
    };
    let stop = signal.clone();
    let upstream = Mock::start(Arc::new(move |req: &Recorded| {
        stop("-STOP");
        answer(req)
    }));
    let yaml = format!(
        "routing: {{retries: 0}}\ninstances:\n{}redis: {{url: '{}', prefix: {prefix}, timeout_ms: 8000}}\n",
        azure_instance(
            "a",
            &upstream.url,
            "k",
            1,
            "supported_models: [m], max_tpm: 10000, max_rpm: 100"
        ),
        redis.url()
    );
    (TestProxy::start(&yaml), upstream, signal)
}

#[test]
fn a_clients_answer_does_not_wait_for_its_settlement() {
    let redis = RedisServer::start(None);
    let (proxy, _upstream, signal) = stopping_redis(&redis, "later", azure_like("k"));
    // Should the answer wait for Redis, Redis is resumed after 3 s and the test fails
    // rather than hangs; whoever resumes it first does, once.
    let resumed = Arc::new(AtomicBool::new(false));
    let (watched, resume) = (resumed.clone(), signal.clone());
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        if !watched.swap(true, Ordering::SeqCst) {
            resume("-CONT");
        }
    });
    let answer = chat(&proxy, "hi");
    let before_redis = !resumed.swap(true, Ordering::SeqCst);
    if before_redis {
        signal("-CONT");
    }
    answer.assert_status(200);
    assert!(
        before_redis,
        "the answer waited for Redis to take its settlement"
    );
    // Once Redis answers, the settlement lands: the shared window counts the 1,000
    // tokens the upstream said were used.
    let used = || redis.cli(&["GET", "later:i:{a}:tpm:sum"]);
    assert!(
        wait_until(Duration::from_secs(10), || used() == "1000"),
        "the correction did not land: {}",
        used()
    );
    let health = send("GET", &format!("{}/health", proxy.url), &[], None).json();
    assert_eq!(health["shared_state"], "shared");
}

/// What keeps the other proxies from sending only to be refused is in Redis before the
/// client hears the 429 that started it.
#[test]
fn a_429s_cooldown_is_shared_before_its_client_hears_it() {
    let redis = RedisServer::start(None);
    let refuse: Behaviour = Arc::new(|_: &Recorded| MockReply::Json {
        status: 429,
        headers: vec![("retry-after".into(), "30".into())],
        body: json!({"error": {"code": "429", "message": "Rate limit exceeded"}}),
    });
    let (proxy, _upstream, signal) = stopping_redis(&redis, "first", refuse);
    // Redis answers again in 1 s; the 429 must not come before.
    let resumed = Arc::new(AtomicBool::new(false));
    let set = resumed.clone();
    let resumer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        set.store(true, Ordering::SeqCst);
        signal("-CONT");
    });
    let answer = chat(&proxy, "hi");
    let waited = resumed.load(Ordering::SeqCst);
    resumer.join().unwrap();
    answer.assert_status(429);
    assert!(waited, "the 429 was answered before Redis had its cooldown");
    let ttl: u64 = redis
        .cli(&["PTTL", "first:i:{a}:cooldown"])
        .parse()
        .unwrap_or(0);
    assert!(ttl > 25_000, "cooldown for {ttl} ms");
}

#[test]
fn a_stopping_proxy_waits_for_redis_to_take_its_last_settlements() {
    let redis = RedisServer::start(None);
    let (proxy, _upstream, signal) = stopping_redis(&redis, "last", azure_like("k"));
    chat(&proxy, "hi").assert_status(200);
    // Redis answers again in 2 s: longer than stopping takes otherwise, shorter than
    // the two timeouts (16 s) a stopping proxy gives it.
    let resumed = Arc::new(AtomicBool::new(false));
    let set = resumed.clone();
    let resumer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        set.store(true, Ordering::SeqCst);
        signal("-CONT");
    });
    drop(proxy);
    let waited = resumed.load(Ordering::SeqCst);
    resumer.join().unwrap();
    assert!(
        waited,
        "the proxy stopped before Redis took its last settlement"
    );
    assert_eq!(redis.cli(&["GET", "last:i:{a}:tpm:sum"]), "1000");
}

#[test]
fn a_settlement_lands_on_a_redis_that_lost_its_scripts() {
    use azure_openai_proxy::config::{Instance, Redis};
    use azure_openai_proxy::observe::alerts::Alerts;
    use azure_openai_proxy::shared::{Settle, Shared, Verdict};
    let redis = RedisServer::start(None);
    let config: Redis =
        serde_yaml::from_str(&format!("{{url: '{}', prefix: flushed}}", redis.url())).unwrap();
    let alerts = Arc::new(Alerts::disabled("test"));
    let shared = Shared::start(&config, "test", &alerts).unwrap();
    let a: Instance = serde_yaml::from_str(
        "{name: a, api_key: k, api_base: 'http://x', supported_models: [m], max_tpm: 1000}",
    )
    .unwrap();
    assert!(matches!(
        shared.admit(&alerts, &a, 400, None),
        Some(Verdict::Admitted(_))
    ));
    let used = || redis.cli(&["GET", "flushed:i:{a}:tpm:sum"]);
    assert_eq!(used(), "400");
    // As after a restart without persistence: the scripts loaded at connect are gone.
    assert_eq!(redis.cli(&["SCRIPT", "FLUSH"]), "OK");
    // A correction (unlike a release) is not kept when Redis fails it: it lands now or
    // never.
    let left = Settle {
        remaining: (Some(200), None),
        ..Settle::default()
    };
    shared.settle(&alerts, &a, &left);
    assert!(shared.flush(Duration::from_secs(5)), "not applied");
    assert_eq!(used(), "800", "the correction did not land");
    assert_eq!(shared.state(), "shared");
}
