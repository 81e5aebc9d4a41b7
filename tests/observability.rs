//! Statistics, health and metrics endpoints after known traffic: the numbers, not
//! only the keys. `/metrics` is checked by parsing the exposition format.

mod common;
use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

const KEY: &str = "k-obs";

fn setup(extra: &str) -> (Mock, Mock, TestProxy) {
    let good = Mock::start(azure_like(KEY));
    let bad = Mock::start(Arc::new(|_: &Recorded| {
        json_reply(500, json!({"error": {"message": "boom"}}))
    }));
    let proxy = TestProxy::start(&format!(
        "{extra}routing: {{circuit_failures: 50}}\ninstances:\n{}{}",
        azure_instance(
            "good",
            &good.url,
            KEY,
            1,
            "max_tpm: 5000, supported_models: [m, emb]"
        ),
        azure_instance("bad", &bad.url, KEY, 1, "supported_models: [broken]"),
    ));
    (good, bad, proxy)
}

/// 8 requests: 5 served (57 tokens), one unknown model, two upstream 500s.
fn known_traffic(proxy: &TestProxy) {
    let chat = format!("{}/v1/chat/completions", proxy.url);
    for _ in 0..3 {
        assert_eq!(
            post_json(&chat, &json!({"model": "m", "messages": []})).status,
            200
        ); // 14 tokens each
    }
    let emb = post_json(
        &format!("{}/v1/embeddings", proxy.url),
        &json!({"model": "emb", "input": "x"}),
    );
    assert_eq!(emb.status, 200); // 4 tokens
    assert_eq!(post_json(&chat, &json!({"model": "nope"})).status, 404);
    for _ in 0..2 {
        assert_eq!(post_json(&chat, &json!({"model": "broken"})).status, 500);
    }
    let streamed = post_json(&chat, &json!({"model": "m", "stream": true})); // 9 + 2 tokens
    assert_eq!(streamed.status, 200);
    // A stream is recorded once its end is written, which the client may read first:
    // wait for all eight requests to be counted.
    assert!(wait_until(Duration::from_secs(5), || {
        get(proxy, "/stats")["metrics"]["total_requests"] == 8
    }));
}

fn get(proxy: &TestProxy, path: &str) -> Value {
    let a = send("GET", &format!("{}{path}", proxy.url), &[], None);
    assert_eq!(
        a.status,
        200,
        "{path}: {}",
        String::from_utf8_lossy(&a.body)
    );
    let v = a.json();
    assert_eq!(v["status"], "success", "{path}");
    v
}

#[test]
fn stats_count_known_traffic() {
    let (_good, _bad, proxy) = setup("");
    known_traffic(&proxy);
    let m = &get(&proxy, "/stats?window=5")["metrics"];
    let expect = json!({
        "window_minutes": 5,
        "total_requests_in_window": 8,
        "successful_requests_in_window": 5,
        "failed_requests_in_window": 3,
        "total_tokens_in_window": 57,
        "prompt_tokens_in_window": 33 + 4 + 9,
        "completion_tokens_in_window": 9 + 2,
        "client_errors_500": 2,
        "client_errors_503": 0,
        "client_errors_other": 1,
        "upstream_errors_in_window": 2,
        "upstream_attempts_in_window": 7,
        "requests_per_minute": 1.6,
        "tokens_per_minute": 11.4,
        "success_rate": 62.5,
        "error_rate": 37.5,
        "upstream_error_rate": 28.57,
        "total_requests": 8,
        "total_successful_requests": 5,
        "total_client_errors": 3,
        "total_upstream_errors": 2,
        "total_tokens_served": 57,
        "models": {"m": 4, "emb": 1, "broken": 2, "other": 1},
        "status_codes": {"200": 5, "404": 1, "500": 2},
    });
    for (k, v) in expect.as_object().unwrap() {
        assert_eq!(&m[k], v, "{k} in {m}");
    }
    for p in ["p50", "p95", "p99"] {
        assert!(
            m["latency_ms"][p].as_f64().is_some_and(|x| x > 0.0),
            "{p}: {m}"
        );
    }

    let windows = &get(&proxy, "/stats/windows")["windows"];
    let names: Vec<&String> = windows.as_object().unwrap().keys().collect();
    assert_eq!(names.len(), 4);
    // In time order as sent (a parsed object sorts its keys, so the text is read).
    let raw = send("GET", &format!("{}/stats/windows", proxy.url), &[], None).body;
    let raw = String::from_utf8(raw).unwrap();
    let at: Vec<usize> = ["5min", "15min", "30min", "60min"]
        .iter()
        .map(|w| raw.find(&format!("\"{w}\":")).unwrap())
        .collect();
    assert!(at.windows(2).all(|p| p[0] < p[1]), "{raw}");
    assert_eq!(windows["60min"]["total_requests_in_window"], 8);
    assert_eq!(windows["60min"]["requests_per_minute"], 0.13);

    for bad in ["0", "61", "five"] {
        let a = send(
            "GET",
            &format!("{}/stats?window={bad}", proxy.url),
            &[],
            None,
        );
        assert_eq!(a.status, 400, "{bad}");
        assert_eq!(a.openai_error()["param"], "window");
    }
}

#[test]
fn instances_health_and_status_describe_each_instance() {
    let (_good, _bad, proxy) = setup("");
    known_traffic(&proxy);
    let list = get(&proxy, "/stats/instances")["instances"]
        .as_array()
        .unwrap()
        .clone();
    let by_name: HashMap<&str, &Value> = list
        .iter()
        .map(|i| (i["name"].as_str().unwrap(), i))
        .collect();
    let good = by_name["good"];
    assert_eq!(good["status"], "healthy");
    assert_eq!(good["total_tokens_served"], 57);
    assert_eq!(good["total_requests"], 5);
    assert_eq!(good["error_count"], 0);
    assert_eq!(good["max_tpm"], 5000);
    // Reservations: 3 chats and 1 stream × 1024 (no messages, default reserve), 1 embedding × 1.
    assert_eq!(good["current_tpm"], 4 * 1024 + 1);
    assert_eq!(good["current_rpm"], 5);
    assert_eq!(good["tpm_usage_percent"], 81.94);
    assert_eq!(good["supported_models"], json!(["m", "emb"]));
    assert!(good["last_used"].as_str().unwrap().ends_with('Z'));
    let bad = by_name["bad"];
    assert_eq!(bad["status"], "error");
    assert_eq!(bad["error_count"], 2);
    assert_eq!(bad["errors_by_status"], json!({"500": 2}));
    assert_eq!(bad["last_error"], "HTTP 500");
    assert_eq!(bad["max_tpm"], Value::Null);

    let h = &get(&proxy, "/stats/health")["health_status"];
    assert_eq!(
        (
            &h["total_instances"],
            &h["healthy_instances"],
            &h["error_instances"],
            &h["health_percentage"]
        ),
        (&json!(2), &json!(1), &json!(1), &json!(50.0))
    );
    assert_eq!(h["has_available_capacity"], true);
    let status = get(&proxy, "/stats/status")["instances"].clone();
    assert_eq!(status[1]["name"], "bad");
    assert_eq!(status[1]["status"], "error");
}

#[test]
fn health_is_503_only_when_no_instance_can_serve() {
    let bad = Mock::start(Arc::new(|_: &Recorded| {
        json_reply(502, json!({"error": {"message": "gateway"}}))
    }));
    let proxy = TestProxy::start(&format!(
        "routing: {{circuit_failures: 1, circuit_open_seconds: 60}}\ninstances:\n{}",
        azure_instance("only", &bad.url, KEY, 1, "supported_models: [m]")
    ));
    let before = send("GET", &format!("{}/health", proxy.url), &[], None);
    assert_eq!(before.status, 200);
    assert_eq!(before.json()["status"], "healthy");
    post_json(
        &format!("{}/v1/chat/completions", proxy.url),
        &json!({"model": "m"}),
    );
    let after = send("GET", &format!("{}/health", proxy.url), &[], None);
    assert_eq!(after.status, 503);
    assert_eq!(after.json()["available_instances"], 0);
    assert_eq!(
        get(&proxy, "/stats/instances")["instances"][0]["status"],
        "circuit_open"
    );
}

#[test]
fn reset_needs_the_admin_key_when_one_is_set() {
    let (_good, _bad, proxy) = setup("auth: {admin_key: adm-secret}\n");
    known_traffic(&proxy);
    let reset = format!("{}/stats/reset", proxy.url);
    assert_eq!(send("POST", &reset, &[], None).status, 401);
    assert_eq!(
        send("POST", &reset, &[("authorization", "Bearer wrong")], None).status,
        401
    );
    assert_eq!(
        send("GET", &reset, &[("api-key", "adm-secret")], None).status,
        405
    );
    assert_eq!(
        get(&proxy, "/stats")["metrics"]["total_requests"],
        8,
        "nothing was reset yet"
    );
    assert_eq!(
        send("POST", &reset, &[("api-key", "adm-secret")], None).status,
        200
    );
    let m = &get(&proxy, "/stats")["metrics"];
    assert_eq!(
        (&m["total_requests"], &m["total_requests_in_window"]),
        (&json!(0), &json!(0))
    );

    // Without an admin key, loopback clients (these tests) may reset.
    let (_g, _b, open) = setup("");
    known_traffic(&open);
    assert_eq!(
        send("POST", &format!("{}/stats/reset", open.url), &[], None).status,
        200
    );
    assert_eq!(get(&open, "/stats")["metrics"]["total_requests"], 0);
}

/// One sample of the exposition: metric name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A strict parser of the Prometheus text format 0.0.4: every line is a HELP, a TYPE or
/// a sample of a declared family, labels are well formed, values are numbers, and each
/// family's samples are contiguous.
fn parse_prometheus(text: &str) -> (HashMap<String, String>, Vec<Sample>) {
    let mut types = HashMap::new();
    let mut samples = Vec::new();
    let mut seen_families: Vec<String> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            assert!(rest.split_once(' ').is_some(), "HELP without text: {line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE without a type");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "TYPE twice: {line}"
            );
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.is_empty(),
            "unexpected line: {line:?}"
        );
        let (series, value) = line.rsplit_once(' ').expect("sample without value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("unclosed labels");
                let mut labels = BTreeMap::new();
                let mut rest = body;
                while !rest.is_empty() {
                    let (k, after) = rest.split_once("=\"").expect("label without =\"");
                    assert!(
                        k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                        "label name {k}"
                    );
                    let mut value = String::new();
                    let mut chars = after.char_indices();
                    let end = loop {
                        match chars.next().expect("unterminated label value") {
                            (i, '"') => break i,
                            (_, '\\') => value.push(chars.next().unwrap().1),
                            (_, c) => value.push(c),
                        }
                    };
                    labels.insert(k.to_string(), value);
                    rest = after[end + 1..]
                        .strip_prefix(',')
                        .unwrap_or(&after[end + 1..]);
                }
                (name.to_string(), labels)
            }
        };
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "metric name {name}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(&name)
            .to_string();
        assert!(
            types.contains_key(&family),
            "sample of undeclared family: {line}"
        );
        if seen_families.last() != Some(&family) {
            assert!(!seen_families.contains(&family), "family {family} is split");
            seen_families.push(family);
        }
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    (types, samples)
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
    found[0].value
}

#[test]
fn metrics_parse_and_count_known_traffic() {
    let (_good, _bad, proxy) = setup("");
    known_traffic(&proxy);
    let a = send("GET", &format!("{}/metrics", proxy.url), &[], None);
    assert_eq!(a.status, 200);
    assert_eq!(
        a.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = String::from_utf8(a.body.clone()).unwrap();
    let (types, samples) = parse_prometheus(&text);

    assert_eq!(types["aoai_proxy_requests_total"], "counter");
    assert_eq!(types["aoai_proxy_request_duration_seconds"], "histogram");
    let req = "aoai_proxy_requests_total";
    assert_eq!(
        value(
            &samples,
            req,
            &[("instance", "good"), ("model", "m"), ("status", "200")]
        ),
        4.0
    );
    assert_eq!(
        value(
            &samples,
            req,
            &[("instance", "bad"), ("model", "broken"), ("status", "500")]
        ),
        2.0
    );
    assert_eq!(
        value(
            &samples,
            req,
            &[("instance", "none"), ("model", "other"), ("status", "404")]
        ),
        1.0
    );
    let tokens = "aoai_proxy_tokens_total";
    assert_eq!(
        value(
            &samples,
            tokens,
            &[("instance", "good"), ("kind", "prompt")]
        ),
        46.0
    );
    assert_eq!(
        value(
            &samples,
            tokens,
            &[("instance", "good"), ("kind", "completion")]
        ),
        11.0
    );
    assert_eq!(
        value(
            &samples,
            "aoai_proxy_upstream_errors_total",
            &[("instance", "bad"), ("kind", "500")]
        ),
        2.0
    );
    assert_eq!(
        value(
            &samples,
            "aoai_proxy_instance_tpm_limit",
            &[("instance", "good")]
        ),
        5000.0
    );
    assert_eq!(
        value(
            &samples,
            "aoai_proxy_instance_tpm_used",
            &[("instance", "good")]
        ),
        4097.0
    );
    assert_eq!(
        value(
            &samples,
            "aoai_proxy_instance_state",
            &[("instance", "bad"), ("state", "error")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "aoai_proxy_instance_state",
            &[("instance", "bad"), ("state", "healthy")]
        ),
        0.0
    );
    assert_eq!(value(&samples, "aoai_proxy_retries_total", &[]), 0.0);

    // The request histogram: cumulative buckets ending in +Inf = count = 8 requests.
    let buckets: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == "aoai_proxy_request_duration_seconds_bucket")
        .collect();
    assert!(
        buckets.windows(2).all(|w| w[0].value <= w[1].value),
        "buckets must be cumulative"
    );
    assert_eq!(buckets.last().unwrap().labels["le"], "+Inf");
    assert_eq!(buckets.last().unwrap().value, 8.0);
    assert_eq!(
        value(&samples, "aoai_proxy_request_duration_seconds_count", &[]),
        8.0
    );
}
