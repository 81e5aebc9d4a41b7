//! Reloading the configuration: two reloads at once take turns and the
//! newest file wins; settings read only at start are reported, the others applied; a
//! request that outlives its instance's removal leaves no state behind; and what a
//! reload does not change (pooled upstream connections, which alerts were just sent)
//! survives it.

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

const KEY: &str = "k-reload";

fn instance(name: &str, url: &str) -> String {
    format!(
        "  - {{name: {name}, api_key: {KEY}, api_base: '{url}', api_version: 2024-10-21, supported_models: [m]}}\n"
    )
}

fn reload(proxy_url: &str) -> Answer {
    send("POST", &format!("{proxy_url}/config/reload"), &[], None)
}

fn instance_names(proxy: &TestProxy) -> Vec<String> {
    let config = send("GET", &format!("{}/config", proxy.url), &[], None).json();
    config["config"]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect()
}

fn chat(proxy: &TestProxy) -> Answer {
    post_json(
        &format!("{}/v1/chat/completions", proxy.url),
        &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    )
}

#[test]
fn two_reloads_at_once_take_turns_and_the_newest_file_wins() {
    let up = Mock::start(azure_like(KEY));
    let proxy = TestProxy::start(&format!("instances:\n{}", instance("first", &up.url)));
    let file = proxy.config_file();
    // The first reload reads a file that is still being written: a FIFO it blocks on.
    std::fs::remove_file(&file).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&file)
        .status()
        .unwrap();
    assert!(made.success());
    let url = proxy.url.clone();
    let first = std::thread::spawn(move || reload(&url));
    // The FIFO opens for writing once the reload has opened it to read (without a
    // reader the open fails at once: a proxy that never reads it fails the test).
    let mut fifo = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            use std::os::unix::fs::OpenOptionsExt;
            fifo = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&file)
                .ok();
            fifo.is_some()
        }),
        "the first reload never opened its file"
    );
    let mut fifo = fifo.unwrap();
    fifo.write_all(TestProxy::base("instances:\n").as_bytes())
        .unwrap();
    // Meanwhile a newer file replaces it, and a second reload starts.
    let newer = file.with_extension("new");
    std::fs::write(
        &newer,
        TestProxy::base(&format!("instances:\n{}", instance("newest", &up.url))),
    )
    .unwrap();
    std::fs::rename(&newer, &file).unwrap();
    let url = proxy.url.clone();
    let second = std::thread::spawn(move || reload(&url));
    let overtook = wait_until(Duration::from_millis(500), || second.is_finished());
    // The first reload's file ends: an older configuration.
    fifo.write_all(instance("older", &up.url).as_bytes())
        .unwrap();
    drop(fifo);
    let (first, second) = (first.join().unwrap(), second.join().unwrap());
    first.assert_status(200);
    assert_eq!(first.json()["instances"], json!(["older"]));
    assert_eq!(second.json()["instances"], json!(["newest"]));
    assert!(!overtook, "the second reload waited for the first");
    assert_eq!(
        instance_names(&proxy),
        ["newest"],
        "the newest file is in force"
    );
}

#[test]
fn settings_read_only_at_start_are_reported_and_the_others_applied() {
    let up = Mock::start(azure_like(KEY));
    let dir = TempDir::new();
    let base = |extra: &str| format!("{extra}instances:\n{}", instance("a", &up.url));
    let proxy = TestProxy::start(&base(""));
    proxy.rewrite(&base(&format!(
        "logging: {{level: debug, file: '{}', max_size: 1MB, backup_count: 2}}\nserver: {{client_timeout: 5, body_timeout: 7, max_body_bytes: 1000, shutdown_grace_seconds: 3}}\n",
        dir.0.join("app.log").display()
    )));
    let mut proxy = proxy;
    let r = reload(&proxy.url);
    r.assert_status(200);
    assert_eq!(
        log::max_level(),
        log::LevelFilter::Debug,
        "logging.level applied"
    );
    assert_eq!(
        r.json()["restart_needed"],
        json!([
            "server.client_timeout",
            "server.body_timeout",
            "logging.file",
            "logging.max_size",
            "logging.backup_count"
        ])
    );
    // Applied at once: the body limit.
    let big = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(2000)
    );
    let refused = send(
        "POST",
        &format!("{}/v1/chat/completions", proxy.url),
        &[("content-type", "application/json")],
        Some(big.as_bytes()),
    );
    assert_eq!(refused.status, 413);
    // What runs is what /config says: the start's client_timeout, the new body limit.
    let config = send("GET", &format!("{}/config", proxy.url), &[], None).json();
    assert_eq!(
        config["config"]["server"]["client_timeout"], 30.0,
        "{config}"
    );
    assert_eq!(
        config["config"]["server"]["max_body_bytes"], 1000,
        "{config}"
    );
    // A later reload that changes something else still lists what is pending.
    proxy.rewrite(&base(&format!(
        "logging: {{level: debug, file: '{}', max_size: 1MB, backup_count: 2}}\nserver: {{client_timeout: 5, body_timeout: 7, max_body_bytes: 2000, shutdown_grace_seconds: 3}}\n",
        dir.0.join("app.log").display()
    )));
    let again = reload(&proxy.url);
    assert_eq!(again.json()["restart_needed"], r.json()["restart_needed"]);
    // And the shutdown grace, read when the proxy stops.
    assert_eq!(proxy.take().shutdown_grace(), Duration::from_secs(3));
}

#[test]
fn a_request_that_outlives_its_instances_removal_leaves_no_state_behind() {
    // x answers (a failure) only when the test says so, after the reload.
    let (answer_now, gate) = std::sync::mpsc::channel::<()>();
    let gate = std::sync::Mutex::new(gate);
    let slow_failure = Mock::start(Arc::new(move |_: &Recorded| {
        let _ = gate.lock().unwrap().recv_timeout(Duration::from_secs(10));
        json_reply(500, json!({"error": {"message": "late and broken"}}))
    }));
    let other = Mock::start(azure_like(KEY));
    let routing = "routing: {retries: 0, circuit_failures: 1, circuit_open_seconds: 60}\n";
    let with_x = format!(
        "{routing}instances:\n{}{}",
        instance("x", &slow_failure.url),
        instance("y", &other.url)
    );
    let proxy = Arc::new(TestProxy::start(&with_x));
    let in_flight = {
        let proxy = proxy.clone();
        std::thread::spawn(move || chat(&proxy))
    };
    assert!(wait_until(Duration::from_secs(5), || slow_failure.count() == 1));
    // x is removed while its request is under way...
    proxy.rewrite(&format!(
        "{routing}instances:\n{}",
        instance("y", &other.url)
    ));
    assert_eq!(reload(&proxy.url).status, 200);
    assert!(!in_flight.is_finished(), "the request is still under way");
    // ...and then that request fails.
    answer_now.send(()).unwrap();
    assert_eq!(in_flight.join().unwrap().status, 500);
    // x comes back: as new, not with the failure of a request from before.
    proxy.rewrite(&with_x);
    assert_eq!(reload(&proxy.url).status, 200);
    let stats = send("GET", &format!("{}/stats/instances", proxy.url), &[], None).json();
    let x = stats["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "x")
        .cloned()
        .unwrap();
    assert_eq!(x["status"], "healthy", "{x}");
    assert_eq!(x["last_error"], Value::Null, "{x}");
}

#[test]
fn a_reload_that_changes_neither_keeps_pooled_connections_and_alert_memory() {
    let up = Mock::start(azure_like(KEY));
    let hook = Mock::start(Arc::new(|_: &Recorded| json_reply(200, json!({"code": 0}))));
    let bad_key = Mock::start(azure_like("another-key"));
    let missing = Mock::start(Arc::new(|_: &Recorded| {
        json_reply(
            404,
            json!({"error": {"code": "DeploymentNotFound", "message": "none"}}),
        )
    }));
    let yaml = format!(
        "logging: {{feishu_webhook: '{}/hook'}}\ninstances:\n{}{}{}",
        hook.url,
        instance("up", &up.url),
        instance("bad", &bad_key.url).replace("[m]", "[k]"),
        instance("gone", &missing.url).replace("[m]", "[sentinel]"),
    );
    let proxy = TestProxy::start(&yaml);
    let k = || {
        post_json(
            &format!("{}/v1/chat/completions", proxy.url),
            &json!({"model": "k", "messages": []}),
        )
        .status
    };
    assert_eq!(chat(&proxy).status, 200);
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
    // The key is refused: that instance is out for k, and k's outage is alerted.
    assert_eq!(k(), 401);
    assert_eq!(k(), 503);

    // A reload that changes neither the webhook nor the upstream timeouts.
    proxy.rewrite(&yaml.replace("supported_models: [m]", "supported_models: [m], weight: 2"));
    assert_eq!(reload(&proxy.url).status, 200);
    assert_eq!(chat(&proxy).status, 200);
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        1,
        "the pooled connection served on"
    );
    for _ in 0..3 {
        assert_eq!(k(), 503);
    }
    // A distinct, last alert: alerts leave in order, so once it arrives all have.
    post_json(
        &format!("{}/v1/chat/completions", proxy.url),
        &json!({"model": "sentinel", "messages": []}),
    );
    let texts = || -> Vec<String> {
        hook.requests()
            .iter()
            .map(|r| r.json()["content"]["text"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(wait_until(Duration::from_secs(5), || texts()
        .iter()
        .any(|t| t.contains("sentinel"))));
    let outage_alerts = texts()
        .iter()
        .filter(|t| t.contains("every instance serving k is down"))
        .count();
    assert_eq!(
        outage_alerts,
        1,
        "alerted once before the reload, not again after: {:#?}",
        texts()
    );
}
