//! Alerts to a Feishu webhook: de-duplicated under load, delivered in order, never a
//! key in them, and a dead webhook never slows requests.

mod common;
use common::*;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEY: &str = "sk-upstream-secret-alerts";

fn webhook() -> Mock {
    Mock::start(Arc::new(|_: &Recorded| {
        json_reply(200, json!({"code": 0, "msg": "success"}))
    }))
}

fn proxy_with(hook_url: &str, failing: &Mock, deployless: &Mock, flaky: &Mock) -> TestProxy {
    TestProxy::start(&format!(
        "name: alert-test\nlogging: {{feishu_webhook: '{hook_url}/open-apis/bot/v2/hook/token-abc'}}\nrouting: {{circuit_failures: 3, circuit_open_seconds: 60}}\ninstances:\n{}{}{}",
        azure_instance("badkey", &failing.url, KEY, 1, "supported_models: [m]"),
        azure_instance("nodep", &deployless.url, KEY, 1, "supported_models: [sentinel]"),
        azure_instance("flaky", &flaky.url, KEY, 1, "supported_models: [f]"),
    ))
}

fn failing_500() -> Mock {
    Mock::start(Arc::new(|_: &Recorded| {
        json_reply(500, json!({"error": {"message": "internal"}}))
    }))
}

fn texts(hook: &Mock) -> Vec<String> {
    hook.requests()
        .iter()
        .map(|r| {
            let body: Value = r.json();
            assert_eq!(body["msg_type"], "text", "{body}");
            body["content"]["text"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn a_failing_instance_under_load_sends_a_handful_of_alerts() {
    let hook = webhook();
    let failing = Mock::start(azure_like("a-different-key")); // answers 401 to the proxy's key
    let deployless = Mock::start(Arc::new(|_: &Recorded| {
        json_reply(
            404,
            json!({"error": {"code": "DeploymentNotFound", "message": "no such deployment"}}),
        )
    }));
    let flaky = failing_500();
    let proxy = proxy_with(&hook.url, &failing, &deployless, &flaky);
    let chat = format!("{}/v1/chat/completions", proxy.url);
    let mut statuses = std::collections::BTreeMap::new();
    for _ in 0..100 {
        *statuses
            .entry(post_json(&chat, &json!({"model": "m"})).status)
            .or_insert(0) += 1;
    }
    assert_eq!(
        statuses,
        [(401, 1), (503, 99)].into(),
        "one 401 takes the instance out for m"
    );
    for _ in 0..3 {
        assert_eq!(post_json(&chat, &json!({"model": "f"})).status, 500);
    }
    // A last, distinct event: alerts leave in order, so once it arrives all have.
    post_json(&chat, &json!({"model": "sentinel"}));
    assert!(wait_until(Duration::from_secs(10), || texts(&hook)
        .iter()
        .any(|t| t.contains("sentinel"))));

    let sent = texts(&hook);
    assert_eq!(sent.len(), 4, "{sent:#?}");
    assert!(
        sent[0].starts_with(
            "[alert-test] ERROR: instance badkey rejected the proxy's API key (HTTP 401)"
        ),
        "{sent:#?}"
    );
    assert!(
        sent[1].contains("every instance serving m is down"),
        "{sent:#?}"
    );
    assert!(
        sent[2].contains("instance flaky keeps failing; it is taken out for 60 s"),
        "{sent:#?}"
    );
    assert!(
        sent[3].contains("instance nodep has no deployment sentinel for model sentinel"),
        "{sent:#?}"
    );
    for r in hook.requests() {
        assert_eq!(r.target, "/open-apis/bot/v2/hook/token-abc");
        let body = String::from_utf8_lossy(&r.body);
        assert!(
            !body.contains(KEY) && !body.contains("a-different-key"),
            "{body}"
        );
    }
}

#[test]
fn a_dead_webhook_never_slows_requests() {
    let hook = Mock::start(Arc::new(|_: &Recorded| {
        MockReply::Hang(Duration::from_secs(30))
    }));
    let failing = Mock::start(azure_like("a-different-key"));
    let deployless = Mock::start(azure_like(KEY));
    let flaky = failing_500();
    let proxy = proxy_with(&hook.url, &failing, &deployless, &flaky);
    let chat = format!("{}/v1/chat/completions", proxy.url);
    let started = Instant::now();
    for _ in 0..100 {
        let status = post_json(&chat, &json!({"model": "m"})).status;
        assert!(status == 401 || status == 503, "{status}");
    }
    // Sending is bounded by a 5 s timeout per alert; three alerts waited for in line
    // would take 15 s.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert!(
        wait_until(Duration::from_secs(5), || hook.count() >= 1),
        "the first alert was attempted"
    );
    let ok = post_json(&chat, &json!({"model": "sentinel", "messages": []}));
    assert_eq!(ok.status, 200, "still serving");
}
