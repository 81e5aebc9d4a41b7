//! Several teams on one proxy: named clients (`auth.clients`) with their own keys,
//! limits, day budgets and models, through the real server; with Redis, their limits
//! and budgets shared by the fleet.

mod common;

use common::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Barrier;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One instance serving `models`, with `clients` under `auth`, and `extra` lines.
fn config(url: &str, models: &str, clients: &str, extra: &str) -> String {
    format!(
        "routing: {{retries: 0}}\nauth:\n  api_keys: [plain-key]\n  clients:\n{clients}{extra}instances:\n{}",
        azure_instance("a", url, "k", 1, &format!("supported_models: [{models}]"))
    )
}

/// A chat request the proxy estimates at about 101 tokens; the mock reports 14 used.
fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100})
}

fn chat_as(proxy: &str, key: &str, model: &str) -> Answer {
    send(
        "POST",
        &format!("{proxy}/v1/chat/completions"),
        &[("content-type", "application/json"), ("api-key", key)],
        Some(chat(model).to_string().as_bytes()),
    )
}

fn get_as(proxy: &str, path: &str, key: &str) -> Answer {
    send(
        "GET",
        &format!("{proxy}{path}"),
        &[("authorization", &format!("Bearer {key}"))],
        None,
    )
}

/// `/stats/clients` once `client` has `budget_used_today` of at least `tokens` (a
/// request's usage is counted once its answer is written).
fn stats_once_spent(proxy: &str, client: &str, tokens: u64) -> Value {
    let mut stats = Value::Null;
    let spent = wait_until(Duration::from_secs(10), || {
        stats = send("GET", &format!("{proxy}/stats/clients"), &[], None).json();
        stats["clients"][client]["budget_used_today"].as_u64() >= Some(tokens)
    });
    assert!(spent, "{client} never spent {tokens}: {stats}");
    stats
}

/// The client's own 429 (not the instances'), and its wait in ms.
#[track_caller]
fn own_429(answer: &Answer, code: &str, client: &str) -> u64 {
    answer.assert_status(429);
    let e = answer.openai_error();
    assert_eq!(e["code"], code);
    let message = e["message"].as_str().unwrap();
    assert!(message.contains(&format!("`{client}`")), "{message}");
    let ms: u64 = answer.header("retry-after-ms").unwrap().parse().unwrap();
    let secs: u64 = answer.header("retry-after").unwrap().parse().unwrap();
    assert_eq!(
        secs,
        ms.div_ceil(1000),
        "Retry-After is retry-after-ms rounded up"
    );
    ms
}

#[test]
fn a_client_over_its_tpm_gets_its_own_429_while_another_is_served() {
    let upstream = Mock::start(azure_like("k"));
    let clients = "    - {name: batch, key: kb, tpm: 250}\n    - {name: web, key: kw}\n";
    let proxy = TestProxy::start(&config(&upstream.url, "m", clients, ""));
    chat_as(&proxy.url, "kb", "m").assert_status(200);
    chat_as(&proxy.url, "kb", "m").assert_status(200);
    let refused = chat_as(&proxy.url, "kb", "m");
    let wait = own_429(&refused, "rate_limit_exceeded", "batch");
    let message = refused.openai_error()["message"].to_string();
    assert!(message.contains("own tpm limit (250 tokens"), "{message}");
    // Its window has room when its first request is a minute old.
    assert!((55_000..=60_000).contains(&wait), "{wait} ms");
    assert_eq!(upstream.count(), 2, "the refused request asked no instance");
    // The other client, and an unnamed key, are served meanwhile.
    chat_as(&proxy.url, "kw", "m").assert_status(200);
    chat_as(&proxy.url, "plain-key", "m").assert_status(200);
    assert_eq!(upstream.count(), 4);
}

#[test]
fn a_client_over_its_rpm_gets_its_own_429() {
    let upstream = Mock::start(azure_like("k"));
    let clients = "    - {name: tiny, key: kt, rpm: 2}\n    - {name: other, key: ko, rpm: 2}\n";
    let proxy = TestProxy::start(&config(&upstream.url, "m", clients, ""));
    for _ in 0..2 {
        chat_as(&proxy.url, "kt", "m").assert_status(200);
    }
    let refused = chat_as(&proxy.url, "kt", "m");
    own_429(&refused, "rate_limit_exceeded", "tiny");
    assert!(refused.openai_error()["message"]
        .as_str()
        .unwrap()
        .contains("own rpm limit (2 requests a minute)"));
    chat_as(&proxy.url, "ko", "m").assert_status(200);
    assert_eq!(upstream.count(), 3);
}

/// Milliseconds until the next 00:00 UTC.
fn ms_to_midnight() -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    86_400_000 - (now.as_millis() % 86_400_000) as u64
}

#[test]
fn a_spent_day_budget_is_refused_with_insufficient_quota_until_midnight_utc() {
    let upstream = Mock::start(azure_like("k"));
    // Each answer reports 14 tokens: the second request takes the day past 20.
    let clients = "    - {name: daily, key: kd, tokens_per_day: 20}\n    - {name: free, key: kf}\n";
    let proxy = TestProxy::start(&config(&upstream.url, "m", clients, ""));
    chat_as(&proxy.url, "kd", "m").assert_status(200);
    chat_as(&proxy.url, "kd", "m").assert_status(200);
    stats_once_spent(&proxy.url, "daily", 28);
    let refused = chat_as(&proxy.url, "kd", "m");
    let wait = own_429(&refused, "insufficient_quota", "daily");
    assert_eq!(refused.openai_error()["type"], "insufficient_quota");
    let midnight = ms_to_midnight();
    assert!(
        wait.abs_diff(midnight) < 5_000,
        "{wait} ms, midnight in {midnight} ms"
    );
    assert_eq!(upstream.count(), 2);
    chat_as(&proxy.url, "kf", "m").assert_status(200);
}

#[test]
fn without_redis_the_day_budget_resets_on_restart_and_the_start_says_so() {
    let upstream = Mock::start(azure_like("k"));
    let clients = "    - {name: daily, key: kd, tokens_per_day: 10}\n";
    let yaml = config(&upstream.url, "m", clients, "");
    let mut first = Running::with_config(&yaml);
    let url = first.url("");
    chat_as(&url, "kd", "m").assert_status(200);
    stats_once_spent(&url, "daily", 14);
    own_429(&chat_as(&url, "kd", "m"), "insufficient_quota", "daily");
    let said = "a restart starts the day's count afresh";
    assert!(first.stderr().contains(said), "{}", first.stderr());
    // The access log names the client.
    assert!(
        wait_until(Duration::from_secs(5), || first
            .stderr()
            .contains("/v1/chat/completions client=daily model=m")),
        "{}",
        first.stderr()
    );
    drop(first);
    let second = Running::with_config(&yaml);
    chat_as(&second.url(""), "kd", "m").assert_status(200);
}

#[test]
fn models_outside_a_clients_list_are_not_found_and_not_listed() {
    let upstream = Mock::start(azure_like("k"));
    let clients = "    - {name: cheap, key: kc, models: [small]}\n";
    let proxy = TestProxy::start(&config(&upstream.url, "small, large", clients, ""));
    let refused = chat_as(&proxy.url, "kc", "large");
    refused.assert_status(404);
    let e = refused.openai_error();
    assert_eq!(e["code"], "model_not_found");
    assert_eq!(
        e["message"],
        "The model `large` does not exist or you do not have access to it."
    );
    assert_eq!(upstream.count(), 0);
    chat_as(&proxy.url, "kc", "small").assert_status(200);
    let ids = |key| -> Vec<String> {
        let list = get_as(&proxy.url, "/v1/models", key);
        list.assert_status(200);
        list.json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids("kc"), ["small"]);
    assert_eq!(
        ids("plain-key"),
        ["large", "small"],
        "an unnamed key sees all"
    );
    // An unserved model's 404 names only the client's models.
    let clients = "    - {name: cheap, key: kc, models: [small, gone]}\n";
    let proxy = TestProxy::start(&config(&upstream.url, "small, large", clients, ""));
    let message = chat_as(&proxy.url, "kc", "gone").openai_error()["message"].to_string();
    assert!(message.contains("Served models: small."), "{message}");
}

#[test]
fn a_client_known_by_the_sha256_of_its_key() {
    use sha2::Digest;
    let hex: String = sha2::Sha256::digest(b"team-secret-1")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let upstream = Mock::start(azure_like("k"));
    let clients = format!("    - {{name: hashed, key_sha256: {hex}, rpm: 1}}\n");
    let proxy = TestProxy::start(&config(&upstream.url, "m", &clients, ""));
    let auth = [("authorization", "Bearer team-secret-1")];
    let chat = |headers: &[(&str, &str)]| {
        let mut headers = headers.to_vec();
        headers.push(("content-type", "application/json"));
        send(
            "POST",
            &format!("{}/v1/chat/completions", proxy.url),
            &headers,
            Some(chat("m").to_string().as_bytes()),
        )
    };
    chat(&auth).assert_status(200);
    own_429(&chat(&auth), "rate_limit_exceeded", "hashed");
    chat(&[("authorization", "Bearer team-secret-2")]).assert_status(401);
    chat(&[("authorization", &format!("Bearer {hex}"))]).assert_status(401);
}

/// Takes a minute: room in a full window comes only as its reservations age out (and
/// a reservation given back early is not waited for: the line waits only for room it
/// can foresee).
#[test]
fn a_client_sending_ten_times_more_into_a_full_instance_gets_a_comparable_share() {
    let upstream = Mock::start(azure_like("k"));
    let clients = "    - {name: heavy, key: kh}\n    - {name: light, key: kl}\n";
    let yaml = format!(
        "routing: {{retries: 0, queue_timeout: 30}}\nauth:\n  api_keys: [plain-key]\n  clients:\n{clients}instances:\n{}",
        azure_instance("a", &upstream.url, "k", 1, "supported_models: [m], max_rpm: 8")
    );
    let proxy = TestProxy::start(&yaml);
    // The window filled by 8 requests 50 ms apart: from a minute on, room for one
    // request comes every 50 ms. Both clients start waiting 31 s in, so that the line
    // (30 s) holds their first requests until then, and refuses at once those sent
    // again after the 8 places were taken (their room is a minute later).
    for _ in 0..8 {
        chat_as(&proxy.url, "plain-key", "m").assert_status(200);
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(31));
    let url = format!("{}/v1/chat/completions", proxy.url);
    // 20 senders for heavy, 2 for light, each sending again as soon as it is served,
    // until the proxy refuses it (the 8 places taken again, none frees in its wait).
    let start = Barrier::new(22);
    let served = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for k in 0..22 {
            let (key, user) = if k < 20 {
                ("kh", "heavy")
            } else {
                ("kl", "light")
            };
            let (url, start, served) = (&url, &start, &served);
            s.spawn(move || {
                let body = json!({"model": "m", "user": user, "messages": [{"role": "user", "content": "hi"}]});
                start.wait();
                // Waits longer than `send` would: the line's 30 s and more.
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(90)))
                    .build()
                    .into();
                loop {
                    let mut answer = agent
                        .post(url)
                        .header("api-key", key)
                        .header("content-type", "application/json")
                        .send(body.to_string())
                        .unwrap();
                    if answer.status() != 200 {
                        // The instances' 429, not the client's own.
                        let e: Value =
                            serde_json::from_slice(&answer.body_mut().read_to_vec().unwrap())
                                .unwrap();
                        let message = e["error"]["message"].as_str().unwrap_or_default();
                        assert!(message.starts_with("Every instance"), "{e}");
                        break;
                    }
                    served.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    let users: Vec<Value> = upstream.requests()[8..]
        .iter()
        .map(|r| r.json()["user"].clone())
        .collect();
    let light = users.iter().filter(|u| *u == "light").count();
    assert_eq!(users.len(), 8, "{users:?}");
    assert_eq!(served.load(Ordering::SeqCst), 8);
    // Served in turn, light gets about half of the 8; first come, first served gives
    // it at most its 2 first requests (those it sends again queue behind heavy's 18).
    // The bound: at least 3.
    assert!(light >= 3, "light got {light} of {users:?}");
}

#[test]
fn stats_clients_and_the_metrics_client_label() {
    let upstream = Mock::start(azure_like("k"));
    let clients = "    - {name: team-a, key: secret-key-a, rpm: 1, tokens_per_day: 1000}\n    - {name: team-b, key: kb}\n";
    let proxy = TestProxy::start(&config(&upstream.url, "m", clients, ""));
    chat_as(&proxy.url, "secret-key-a", "m").assert_status(200);
    chat_as(&proxy.url, "secret-key-a", "m").assert_status(429);
    chat_as(&proxy.url, "plain-key", "m").assert_status(200);
    let mut stats = stats_once_spent(&proxy.url, "team-a", 14);
    assert!(wait_until(Duration::from_secs(10), || {
        stats = send("GET", &format!("{}/stats/clients", proxy.url), &[], None).json();
        stats["clients"]["team-a"]["total"]["requests"] == 2
    }));
    let all = &stats["clients"];
    let a = &all["team-a"];
    assert_eq!(
        a["total"],
        json!({"requests": 2, "prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14,
               "rate_limited_by_own_limits": 1})
    );
    assert_eq!(a["windows"]["5min"], a["total"]);
    assert_eq!(a["windows"]["60min"]["requests"], 2);
    assert_eq!(a["budget_used_today"], 14);
    assert_eq!(a["budget_left_today"], 986);
    assert_eq!(a["rpm_used"], 1);
    assert_eq!(a["limits"]["rpm"], 1);
    assert_eq!(all["team-b"]["total"]["requests"], 0);
    assert_eq!(all.as_object().unwrap().len(), 2, "named clients only");

    let text =
        String::from_utf8(send("GET", &format!("{}/metrics", proxy.url), &[], None).body).unwrap();
    for line in [
        r#"aoai_proxy_requests_total{instance="a",model="m",status="200",client="team-a"} 1"#,
        r#"aoai_proxy_requests_total{instance="none",model="m",status="429",client="team-a"} 1"#,
        r#"aoai_proxy_requests_total{instance="a",model="m",status="200"} 1"#,
        r#"aoai_proxy_tokens_total{instance="a",kind="prompt",client="team-a"} 11"#,
        r#"aoai_proxy_tokens_total{instance="a",kind="prompt"} 11"#,
    ] {
        assert!(text.lines().any(|l| l == line), "no {line} in:\n{text}");
    }
    assert!(!text.contains("secret-key"), "no key in the metrics");
}

#[test]
fn a_reload_changes_clients_and_keeps_the_others_windows() {
    let upstream = Mock::start(azure_like("k"));
    let before = "    - {name: a, key: ka, rpm: 3}\n    - {name: b, key: kb}\n";
    let proxy = TestProxy::start(&config(&upstream.url, "m", before, ""));
    chat_as(&proxy.url, "ka", "m").assert_status(200);
    chat_as(&proxy.url, "ka", "m").assert_status(200);
    chat_as(&proxy.url, "kb", "m").assert_status(200);
    // a's limit lowered to its two requests of this minute, b removed, c added.
    let after = "    - {name: a, key: ka, rpm: 2}\n    - {name: c, key: kc}\n";
    proxy.rewrite(&config(&upstream.url, "m", after, ""));
    send("POST", &format!("{}/config/reload", proxy.url), &[], None).assert_status(200);
    own_429(&chat_as(&proxy.url, "ka", "m"), "rate_limit_exceeded", "a");
    chat_as(&proxy.url, "kb", "m").assert_status(401);
    chat_as(&proxy.url, "kc", "m").assert_status(200);
    let stats = send("GET", &format!("{}/stats/clients", proxy.url), &[], None).json();
    assert_eq!(
        stats["clients"]["a"]["rpm_used"], 2,
        "kept across the reload"
    );
    assert!(stats["clients"].get("b").is_none());
}

#[cfg(feature = "redis")]
fn with_redis(url: &str, clients: &str, redis: &RedisServer, prefix: &str) -> String {
    let redis = format!("redis: {{url: '{}', prefix: {prefix}}}\n", redis.url());
    config(url, "m", clients, &redis)
}

#[cfg(feature = "redis")]
#[test]
fn with_redis_a_spent_budget_holds_across_proxies_and_a_restart() {
    let redis = RedisServer::start(None);
    let upstream = Mock::start(azure_like("k"));
    let clients = "    - {name: daily, key: kd, tokens_per_day: 20}\n";
    let yaml = with_redis(&upstream.url, clients, &redis, "budget");
    let one = TestProxy::start(&yaml);
    let mut two = TestProxy::start(&yaml);
    chat_as(&one.url, "kd", "m").assert_status(200);
    stats_once_spent(&two.url, "daily", 14);
    chat_as(&two.url, "kd", "m").assert_status(200);
    // Each proxy saw 14 tokens; the fleet spent 28.
    stats_once_spent(&one.url, "daily", 28);
    own_429(&chat_as(&one.url, "kd", "m"), "insufficient_quota", "daily");
    own_429(&chat_as(&two.url, "kd", "m"), "insufficient_quota", "daily");
    two.take().stop();
    let three = TestProxy::start(&yaml);
    own_429(
        &chat_as(&three.url, "kd", "m"),
        "insufficient_quota",
        "daily",
    );
    assert_eq!(upstream.count(), 2);
}

#[cfg(feature = "redis")]
#[test]
fn with_redis_a_clients_rpm_holds_across_proxies() {
    let redis = RedisServer::start(None);
    let upstream = Mock::start(azure_like("k"));
    let clients = "    - {name: fleet, key: kf, rpm: 2}\n";
    let yaml = with_redis(&upstream.url, clients, &redis, "rpm");
    let one = TestProxy::start(&yaml);
    let two = TestProxy::start(&yaml);
    chat_as(&one.url, "kf", "m").assert_status(200);
    chat_as(&two.url, "kf", "m").assert_status(200);
    // Proxy one admitted one request itself: the refusal is the fleet's count.
    let refused = chat_as(&one.url, "kf", "m");
    let wait = own_429(&refused, "rate_limit_exceeded", "fleet");
    assert!((50_000..=60_000).contains(&wait), "{wait} ms");
    assert_eq!(upstream.count(), 2);
    // One key in Redis per client window and day, beside the instance's.
    let keys = redis.cli(&["--scan", "--pattern", "rpm:c:fleet:*"]);
    assert!(keys.contains("rpm:c:fleet:rpm"), "{keys}");
}
