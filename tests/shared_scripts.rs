//! The shared state's scripts as Redis sees them, in a real `redis-server`: every key a
//! script touches is one it was passed (watched with MONITOR), and a reservation whose
//! reply was lost is given back once Redis answers again.
#![cfg(feature = "redis")]

mod common;

use common::*;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
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
