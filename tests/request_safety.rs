//! One body, one meaning, and only an instance's own faults against it, through the
//! real server: uploads with two models, dot segments and client queries that must not
//! reach the upstream as sent, a decoy limit that must not lower a reservation, a 404
//! about the request that must leave its instance alone, and round-robin that takes
//! turns per model.

mod common;
use common::*;
use serde_json::json;
use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;

const KEY: &str = "upstream-key";

/// Instance `name` on `url`, on `version`, with `extra` settings (its models at least).
fn instance(name: &str, url: &str, version: &str, extra: &str) -> String {
    format!("  - {{name: {name}, api_key: {KEY}, api_base: '{url}', api_version: '{version}', {extra}}}\n")
}

/// A proxy with `top` settings in front of one instance, `a`, serving `m` on `version`
/// (`extra`: more of its settings), on an upstream that behaves as `behaviour`.
fn one(top: &str, behaviour: Behaviour, version: &str, extra: &str) -> (Mock, TestProxy) {
    let up = Mock::start(behaviour);
    let a = instance(
        "a",
        &up.url,
        version,
        &format!("supported_models: [m]{extra}"),
    );
    (up, TestProxy::start(&format!("{top}instances:\n{a}")))
}

#[test]
fn an_upload_with_two_model_fields_gets_400_and_reaches_no_one() {
    let (up, proxy) = one("", azure_like(KEY), "2024-10-21", "");
    let boundary = "b0undary";
    let part = |name: &str, value: &str| {
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
        )
    };
    let body = [
        part("file", "RIFF"),
        part("model", "m"),
        part("model", "some-unrouted-deployment"),
        format!("--{boundary}--\r\n"),
    ]
    .concat();
    let content_type = format!("multipart/form-data; boundary={boundary}");
    let answer = send(
        "POST",
        &format!("{}/v1/audio/transcriptions", proxy.url),
        &[("content-type", &content_type)],
        Some(body.as_bytes()),
    );
    answer.assert_status(400);
    assert!(
        answer.openai_error()["message"]
            .as_str()
            .is_some_and(|m| m.contains("more than one model")),
        "{}",
        answer.json()
    );
    assert_eq!(up.count(), 0);
}

#[test]
fn dot_segments_never_reach_the_upstream_bare() {
    let up = Mock::start(azure_like(KEY));
    // The legacy single instance serves any model name a client sends.
    let proxy = Running::start(
        Command::new(BIN)
            .env_clear()
            .args(["--env-only", "--host", "127.0.0.1", "--port", "0"])
            .env("API_KEY", KEY)
            .env("API_BASE", &up.url),
    );
    let by_body = post_json(
        &proxy.url("/v1/chat/completions"),
        &json!({"model": "..", "messages": []}),
    );
    let by_path = post_json(
        &proxy.url("/openai/deployments/%2e%2e/chat/completions"),
        &json!({"messages": []}),
    );
    let dot = post_json(
        &proxy.url("/v1/chat/completions"),
        &json!({"model": ".", "messages": []}),
    );
    for answer in [&by_body, &by_path, &dot] {
        answer.assert_status(200);
    }
    let paths: Vec<String> = up
        .requests()
        .iter()
        .map(|r| r.target.split('?').next().unwrap().to_string())
        .collect();
    assert_eq!(
        paths,
        [
            "/openai/deployments/%2E%2E/chat/completions",
            "/openai/deployments/%2E%2E/chat/completions",
            "/openai/deployments/%2E/chat/completions",
        ]
    );
}

#[test]
fn the_proxy_alone_chooses_a_stored_response_calls_api_version() {
    let (up, proxy) = one("", azure_like(KEY), "2025-04-01-preview", "");
    let made = post_json(
        &format!("{}/v1/responses", proxy.url),
        &json!({"model": "m", "input": "hi"}),
    );
    made.assert_status(200);
    let id = made.json()["id"].as_str().unwrap().to_string();
    let listed = send(
        "GET",
        &format!(
            "{}/v1/responses/{id}/input_items?api-version=1999-01-01&limit=2&foo=bar",
            proxy.url
        ),
        &[],
        None,
    );
    listed.assert_status(200);
    let sent = up.requests();
    assert_eq!(
        sent.last().unwrap().target,
        format!("/openai/responses/{id}/input_items?api-version=2025-04-01-preview&limit=2")
    );
}

#[test]
fn a_decoy_limit_cannot_lower_the_reservation() {
    let (up, proxy) = one("", azure_like(KEY), "2024-10-21", ", max_tpm: 50000");
    let answer = post_json(
        &format!("{}/v1/chat/completions", proxy.url),
        &json!({"model": "m", "messages": [], "max_output_tokens": 1, "max_tokens": 90000}),
    );
    answer.assert_status(400);
    assert_eq!(answer.openai_error()["code"], "tokens_exceed_limit");
    assert_eq!(
        up.count(),
        0,
        "90,000 tokens fit no instance: none is asked"
    );
}

#[test]
fn a_404_about_the_request_goes_to_its_client_and_leaves_the_instance_in() {
    let azure = azure_like(KEY);
    let behaviour = Arc::new(move |r: &Recorded| {
        if String::from_utf8_lossy(&r.body).contains("msg_unknown") {
            json_reply(
                404,
                json!({"error": {"message": "Item with id 'msg_unknown' not found.",
                       "type": "invalid_request_error", "param": "input", "code": null}}),
            )
        } else {
            azure(r)
        }
    });
    let (up, proxy) = one("", behaviour, "2025-04-01-preview", "");
    let url = format!("{}/v1/responses", proxy.url);
    let unknown = post_json(
        &url,
        &json!({"model": "m", "input": [{"type": "item_reference", "id": "msg_unknown"}]}),
    );
    unknown.assert_status(404);
    assert_eq!(unknown.openai_error()["param"], "input");
    let other = post_json(&url, &json!({"model": "m", "input": "hi"}));
    other.assert_status(200);
    assert_eq!(up.count(), 2, "each asked once: no retry, nothing held out");
}

#[test]
fn round_robin_takes_turns_per_model() {
    let up = Mock::start(azure_like(KEY));
    let inst = |name, model| {
        instance(
            name,
            &up.url,
            "2024-10-21",
            &format!("supported_models: [{model}]"),
        )
    };
    let all = [("a", "m1"), ("b", "m1"), ("c", "m2"), ("d", "m2")].map(|(n, m)| inst(n, m));
    let proxy = TestProxy::start(&format!(
        "routing: {{strategy: round_robin}}\ninstances:\n{}",
        all.concat()
    ));
    let served: BTreeSet<String> = (0..8)
        .map(|k| {
            let model = if k % 2 == 0 { "m1" } else { "m2" };
            let answer = post_json(
                &format!("{}/v1/chat/completions", proxy.url),
                &json!({"model": model, "messages": []}),
            );
            answer.assert_status(200);
            answer.header("x-proxy-instance").unwrap().to_string()
        })
        .collect();
    assert_eq!(
        served,
        BTreeSet::from(["a", "b", "c", "d"].map(String::from))
    );
}

/// A request sent from `from` (a loopback address other than the proxy's own client's)
/// on a connection of its own.
fn send_from(from: &str, to: &str, request: &str) -> RawAnswer {
    use std::io::{Read, Write};
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let from: std::net::SocketAddr = format!("{from}:0").parse().unwrap();
    socket.bind(&from.into()).unwrap();
    let to: std::net::SocketAddr = to.parse().unwrap();
    socket.connect(&to.into()).unwrap();
    let mut c: std::net::TcpStream = socket.into();
    c.write_all(request.as_bytes()).unwrap();
    let mut bytes = Vec::new();
    c.read_to_end(&mut bytes).unwrap();
    responses(&bytes).into_iter().next().expect("an answer")
}

#[test]
fn repeated_wrong_keys_slow_their_address_and_no_other() {
    let (_up, proxy) = one(
        "auth: {api_keys: [good-key], admin_key: admin-key, max_failures: 5, failure_window_seconds: 10, failure_block_seconds: 60}\n",
        azure_like(KEY),
        "2024-10-21",
        "",
    );
    let chat = format!("{}/v1/chat/completions", proxy.url);
    let body = json!({"model": "m", "messages": []}).to_string();
    let with_key = |key: &str| {
        send(
            "POST",
            &chat,
            &[("content-type", "application/json"), ("api-key", key)],
            Some(body.as_bytes()),
        )
    };
    for guess in 0..4 {
        with_key(&format!("guess-{guess}")).assert_status(401);
    }
    // A wrong admin key is a guess too.
    send(
        "POST",
        &format!("{}/config/reload", proxy.url),
        &[("api-key", "admin-guess")],
        None,
    )
    .assert_status(401);
    let blocked = with_key("guess-5");
    blocked.assert_status(429);
    assert_eq!(blocked.openai_error()["code"], "too_many_key_failures");
    let retry: u64 = blocked.header("retry-after").unwrap().parse().unwrap();
    assert!((59..=60).contains(&retry), "Retry-After {retry}");
    // While blocked no key is compared: a hit would tell the guesser it had won.
    with_key("good-key").assert_status(429);
    // Another address is served as ever.
    let addr = proxy.url.strip_prefix("http://").unwrap();
    let other = send_from(
        "127.0.0.2",
        addr,
        &format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\napi-key: good-key\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    other.assert_status(200);
    let stats = send("GET", &format!("{}/stats", proxy.url), &[], None).json();
    assert_eq!(
        (
            &stats["metrics"]["auth_failures"],
            &stats["metrics"]["auth_refused"]
        ),
        (&json!(5), &json!(2)),
        "{stats}"
    );
    let metrics =
        String::from_utf8(send("GET", &format!("{}/metrics", proxy.url), &[], None).body).unwrap();
    for line in [
        "aoai_proxy_auth_failures_total 5",
        "aoai_proxy_auth_refused_total 2",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in\n{metrics}"
        );
    }
}
