//! The proxy core through its HTTP interface: endpoints, exact model mapping, provider
//! types, header hygiene, retries on another instance, and bad input.

mod common;
use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

const KEY: &str = "azure-key-east";

fn one_azure(mock: &Mock, extra: &str) -> TestProxy {
    TestProxy::start(&format!(
        "{extra}instances:\n{}",
        azure_instance(
            "east",
            &mock.url,
            KEY,
            1,
            "supported_models: [gpt-4o-2024-11-20, text-embedding-3-small, gpt-35-turbo-instruct], model_deployments: {gpt-4o-2024-11-20: gpt4o-prod}"
        )
    ))
}

#[test]
fn chat_completions_and_embeddings_reach_the_mapped_azure_deployment() {
    let mock = Mock::start(azure_like(KEY));
    let proxy = one_azure(&mock, "");

    let chat = post_json(
        &format!("{}/v1/chat/completions", proxy.url),
        &json!({"model": "gpt-4o-2024-11-20", "messages": [{"role": "user", "content": "hi"}]}),
    );
    chat.assert_status(200);
    assert_eq!(
        chat.json()["choices"][0]["message"]["content"],
        "Hello from gpt4o-prod"
    );
    assert_eq!(chat.header("x-proxy-instance"), Some("east"));
    assert_eq!(chat.header("apim-request-id"), Some("mock-apim-1"));
    assert_eq!(chat.header("x-ratelimit-remaining-tokens"), Some("9000"));

    let emb = post_json(
        &format!("{}/v1/embeddings", proxy.url),
        &json!({"model": "text-embedding-3-small", "input": "hello"}),
    );
    assert_eq!(emb.status, 200);
    assert_eq!(
        emb.json()["data"][0]["embedding"],
        json!([0.25, -0.5, 0.125])
    );

    let cmpl = post_json(
        &format!("{}/v1/completions", proxy.url),
        &json!({"model": "gpt-35-turbo-instruct", "prompt": "tell"}),
    );
    assert_eq!(cmpl.json()["choices"][0]["text"], "once upon a time");

    let seen: Vec<String> = mock.requests().iter().map(|r| r.target.clone()).collect();
    assert_eq!(
        seen,
        [
            "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21",
            "/openai/deployments/text-embedding-3-small/embeddings?api-version=2024-10-21",
            "/openai/deployments/gpt-35-turbo-instruct/completions?api-version=2024-10-21",
        ]
    );
    // The body the client sent arrives unchanged when no edit is needed.
    assert_eq!(
        mock.requests()[1].json(),
        json!({"model": "text-embedding-3-small", "input": "hello"})
    );
}

#[test]
fn azure_style_paths_work_for_azure_sdk_clients() {
    let mock = Mock::start(azure_like(KEY));
    let proxy = one_azure(&mock, "");
    let answer = post_json(
        &format!(
            "{}/openai/deployments/gpt-4o-2024-11-20/chat/completions?api-version=2024-02-01",
            proxy.url
        ),
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["model"], "gpt4o-prod");
    assert_eq!(
        mock.requests()[0].target,
        "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21",
        "the instance's api-version is used, not the client's"
    );
}

#[test]
fn model_matching_is_exact_and_unknown_models_get_404_without_secrets() {
    let mock = Mock::start(azure_like(KEY));
    let proxy = one_azure(&mock, "");
    for model in [
        "gpt-4o",
        "GPT-4O-2024-11-20",
        "gpt-4o-2024-11-20 ",
        "gpt4o-prod",
    ] {
        let a = post_json(
            &format!("{}/v1/chat/completions", proxy.url),
            &json!({"model": model, "messages": []}),
        );
        assert_eq!(a.status, 404, "{model}");
        let e = a.openai_error();
        assert_eq!(e["code"], "model_not_found");
        assert_eq!(e["param"], "model");
        let text = String::from_utf8_lossy(&a.body);
        assert!(!text.contains(KEY) && !text.contains(&mock.url), "{text}");
    }
    assert_eq!(mock.count(), 0, "nothing was forwarded");

    let models = send("GET", &format!("{}/v1/models", proxy.url), &[], None).json();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(models["object"], "list");
    assert_eq!(
        ids,
        [
            "gpt-35-turbo-instruct",
            "gpt-4o-2024-11-20",
            "text-embedding-3-small"
        ]
    );
}

#[test]
fn openai_provider_uses_bearer_auth_and_the_deployment_as_model() {
    let mock = Mock::start(azure_like("sk-upstream"));
    let proxy = TestProxy::start(&format!(
        "instances:\n  - {{name: oai, provider_type: openai, api_key: sk-upstream, api_base: '{}', model_deployments: {{fast: gpt-4o-mini}}}}\n",
        mock.url
    ));
    let a = post_json(
        &format!("{}/v1/chat/completions", proxy.url),
        &json!({"model": "fast", "messages": []}),
    );
    a.assert_status(200);
    let r = &mock.requests()[0];
    assert_eq!(r.target, "/v1/chat/completions");
    assert_eq!(r.header("authorization"), Some("Bearer sk-upstream"));
    assert_eq!(r.header("api-key"), None);
    assert_eq!(r.json()["model"], "gpt-4o-mini");
}

#[test]
fn client_credentials_and_hop_by_hop_headers_are_not_forwarded() {
    let mock = Mock::start(azure_like(KEY));
    let proxy = one_azure(&mock, "");
    let a = send(
        "POST",
        &format!("{}/v1/embeddings", proxy.url),
        &[
            ("content-type", "application/json"),
            ("authorization", "Bearer client-secret"),
            ("api-key", "client-api-key"),
            ("cookie", "session=client"),
            ("x-custom-trace", "abc"),
        ],
        Some(br#"{"model":"text-embedding-3-small","input":"x"}"#),
    );
    assert_eq!(a.status, 200);
    let r = &mock.requests()[0];
    assert_eq!(
        r.header("api-key"),
        Some(KEY),
        "the instance's key replaces the client's"
    );
    assert_eq!(r.header("authorization"), None);
    assert_eq!(r.header("cookie"), None);
    assert_eq!(
        r.header("x-custom-trace"),
        Some("abc"),
        "ordinary headers travel"
    );
    let host = r.header("host").unwrap();
    assert!(
        mock.url.ends_with(host),
        "Host names the upstream, not the proxy: {host}"
    );
}

#[test]
fn a_5xx_or_dead_instance_is_retried_on_the_next_one() {
    let good = Mock::start(azure_like(KEY));
    let failing = Mock::start(std::sync::Arc::new(|_: &Recorded| {
        json_reply(
            503,
            json!({"error": {"code": "ServiceUnavailable", "message": "busy"}}),
        )
    }));
    let closing = Mock::start(std::sync::Arc::new(|_: &Recorded| MockReply::Close));
    let refused = refused_url();
    let models = "supported_models: [gpt-4o]";
    let proxy = TestProxy::start(&format!(
        "instances:\n{}{}{}{}",
        azure_instance("a-refused", &refused, KEY, 1, models),
        azure_instance("b-503", &failing.url, KEY, 2, models),
        azure_instance("c-closes", &closing.url, KEY, 3, models),
        azure_instance("d-good", &good.url, KEY, 4, models),
    ));
    let a = post_json(
        &format!("{}/v1/chat/completions", proxy.url),
        &json!({"model": "gpt-4o", "messages": []}),
    );
    a.assert_status(200);
    assert_eq!(a.header("x-proxy-instance"), Some("d-good"));
    assert_eq!((failing.count(), closing.count(), good.count()), (1, 1, 1));
}

#[test]
fn retries_are_bounded_and_the_last_upstream_error_comes_back() {
    let mocks: Vec<Mock> = (0..3)
        .map(|_| {
            Mock::start(std::sync::Arc::new(|_: &Recorded| {
                json_reply(
                    500,
                    json!({"error": {"code": "InternalServerError", "message": "upstream broke"}}),
                )
            }))
        })
        .collect();
    let instances: String = mocks
        .iter()
        .enumerate()
        .map(|(i, m)| {
            azure_instance(
                &format!("i{i}"),
                &m.url,
                KEY,
                i as u32,
                "supported_models: [m]",
            )
        })
        .collect();
    let proxy = TestProxy::start(&format!("routing: {{retries: 1}}\ninstances:\n{instances}"));
    let a = post_json(
        &format!("{}/v1/chat/completions", proxy.url),
        &json!({"model": "m"}),
    );
    assert_eq!(a.status, 500);
    assert_eq!(
        a.json()["error"]["message"],
        "upstream broke",
        "the upstream body is kept"
    );
    assert_eq!(a.header("x-proxy-instance"), Some("i1"));
    let counts: Vec<usize> = mocks.iter().map(Mock::count).collect();
    assert_eq!(counts, [1, 1, 0], "one try plus one retry");
}

#[test]
fn unreachable_instances_give_a_502_in_openai_shape() {
    let refused = refused_url();
    let proxy = TestProxy::start(&format!(
        "instances:\n{}",
        azure_instance("gone", &refused, KEY, 1, "supported_models: [m]")
    ));
    let a = post_json(
        &format!("{}/v1/embeddings", proxy.url),
        &json!({"model": "m", "input": "x"}),
    );
    assert_eq!(a.status, 502);
    assert_eq!(a.openai_error()["code"], "upstream_unreachable");
}

#[test]
fn a_hanging_instance_is_abandoned_after_the_timeout() {
    let good = Mock::start(azure_like(KEY));
    let hanging = Mock::start(std::sync::Arc::new(|_: &Recorded| {
        MockReply::Hang(Duration::from_secs(20))
    }));
    // A request that timed out is tried elsewhere only when the operator asks: it may
    // still be generated where it was sent.
    let proxy = TestProxy::start(&format!(
        "routing: {{timeout: 1, retry_timeouts: true}}\ninstances:\n{}{}",
        azure_instance("hangs", &hanging.url, KEY, 1, "supported_models: [m]"),
        azure_instance("good", &good.url, KEY, 2, "supported_models: [m]"),
    ));
    let started = Instant::now();
    let a = post_json(
        &format!("{}/v1/chat/completions", proxy.url),
        &json!({"model": "m"}),
    );
    let took = started.elapsed();
    assert_eq!(a.status, 200);
    assert_eq!(a.header("x-proxy-instance"), Some("good"));
    assert!(
        took >= Duration::from_millis(900),
        "waited for the timeout: {took:?}"
    );
    assert!(
        took < Duration::from_secs(4),
        "but not much longer: {took:?}"
    );

    let only_hanging = TestProxy::start(&format!(
        "routing: {{timeout: 1}}\ninstances:\n{}",
        azure_instance("hangs", &hanging.url, KEY, 1, "supported_models: [m]"),
    ));
    let a = post_json(
        &format!("{}/v1/chat/completions", only_hanging.url),
        &json!({"model": "m"}),
    );
    assert_eq!(a.status, 504);
    assert_eq!(a.openai_error()["code"], "upstream_timeout");
}

#[test]
fn client_errors_return_as_they_are_and_instance_faults_move_on() {
    let bad_request = Mock::start(std::sync::Arc::new(|_: &Recorded| {
        json_reply(
            400,
            json!({"error": {"code": "content_filter", "message": "filtered", "param": "prompt"}}),
        )
    }));
    let wrong_key = Mock::start(azure_like("another-key"));
    let good = Mock::start(azure_like(KEY));
    let proxy = TestProxy::start(&format!(
        "instances:\n{}{}{}",
        azure_instance(
            "filter",
            &bad_request.url,
            KEY,
            1,
            "supported_models: [filtered]"
        ),
        azure_instance("badkey", &wrong_key.url, KEY, 1, "supported_models: [m]"),
        azure_instance("good", &good.url, KEY, 2, "supported_models: [m, filtered]"),
    ));
    let a = post_json(
        &format!("{}/v1/chat/completions", proxy.url),
        &json!({"model": "filtered"}),
    );
    assert_eq!(a.status, 400);
    assert_eq!(a.json()["error"]["code"], "content_filter");
    assert_eq!(good.count(), 0, "a 400 is not retried");

    let a = post_json(
        &format!("{}/v1/chat/completions", proxy.url),
        &json!({"model": "m"}),
    );
    assert_eq!(a.status, 200, "a 401 (bad instance key) moves on");
    assert_eq!(a.header("x-proxy-instance"), Some("good"));
    assert_eq!(wrong_key.count(), 1);
}

#[test]
fn bad_input_gets_openai_shaped_errors() {
    let mock = Mock::start(azure_like(KEY));
    let proxy = one_azure(&mock, "server: {max_body_bytes: 1024}\n");
    let chat = format!("{}/v1/chat/completions", proxy.url);
    let json_ct = [("content-type", "application/json")];

    let cases: Vec<(Answer, u16, Option<&str>)> = vec![
        (
            send("POST", &chat, &json_ct, Some(b"{\"model\": ")),
            400,
            None,
        ),
        (send("POST", &chat, &json_ct, Some(b"[1, 2]")), 400, None),
        (
            send("POST", &chat, &json_ct, Some(b"\xff\xfe{}")),
            400,
            None,
        ),
        (
            send("POST", &chat, &json_ct, Some(b"{\"messages\": []}")),
            400,
            None,
        ),
        (
            send("POST", &chat, &json_ct, Some(&[b' '; 2048])),
            413,
            Some("request_too_large"),
        ),
        (
            send(
                "POST",
                &format!("{}/v1/nothing", proxy.url),
                &json_ct,
                Some(b"{}"),
            ),
            404,
            Some("unknown_url"),
        ),
        (
            send("GET", &format!("{}/", proxy.url), &[], None),
            404,
            Some("unknown_url"),
        ),
        (
            send("GET", &chat, &[], None),
            405,
            Some("method_not_allowed"),
        ),
        (
            send("DELETE", &format!("{}/v1/models", proxy.url), &[], None),
            405,
            Some("method_not_allowed"),
        ),
    ];
    for (i, (answer, status, code)) in cases.iter().enumerate() {
        assert_eq!(
            answer.status,
            *status,
            "case {i}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        let e = answer.openai_error();
        if let Some(code) = code {
            assert_eq!(e["code"], *code, "case {i}");
        }
        assert_eq!(
            answer.header("content-type"),
            Some("application/json"),
            "case {i}"
        );
    }
    assert_eq!(cases[3].0.openai_error()["param"], "model");
    assert_eq!(mock.count(), 0);

    // The proxy is still serving.
    let ok = post_json(
        &format!("{}/v1/embeddings", proxy.url),
        &json!({"model": "text-embedding-3-small", "input": "x"}),
    );
    assert_eq!(ok.status, 200);
}

#[test]
fn deeply_nested_json_cannot_overflow_the_stack() {
    let mock = Mock::start(azure_like(KEY));
    let proxy = one_azure(&mock, "");
    let chat = format!("{}/v1/chat/completions", proxy.url);
    for depth in [200, 100_000] {
        for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
            // Inside an unknown field (skipped) and as the model (must be a string).
            let skipped = format!(
                "{{\"model\":\"none\",\"x\":{}1{}}}",
                open.repeat(depth),
                close.repeat(depth)
            );
            let as_model = format!(
                "{{\"model\":{}1{}}}",
                open.repeat(depth),
                close.repeat(depth)
            );
            let a = send("POST", &chat, &[], Some(skipped.as_bytes()));
            assert!(matches!(a.status, 400 | 404), "depth {depth}: {}", a.status);
            a.openai_error();
            let a = send("POST", &chat, &[], Some(as_model.as_bytes()));
            assert_eq!(a.status, 400, "depth {depth}");
            a.openai_error();
        }
    }
    assert_eq!(mock.count(), 0);
    let ok = post_json(
        &format!("{}/v1/embeddings", proxy.url),
        &json!({"model": "text-embedding-3-small", "input": "x"}),
    );
    assert_eq!(ok.status, 200, "still serving");
}

#[test]
fn configured_client_keys_are_required_on_api_endpoints() {
    let mock = Mock::start(azure_like(KEY));
    let proxy = one_azure(&mock, "auth: {api_keys: [client-one, client-two]}\n");
    let url = format!("{}/v1/embeddings", proxy.url);
    let body = br#"{"model":"text-embedding-3-small","input":"x"}"#;
    let cases: [(&[(&str, &str)], u16); 6] = [
        (&[], 401),
        (&[("authorization", "Bearer wrong")], 401),
        (&[("api-key", "client-on")], 401),
        (&[("authorization", "client-one")], 401),
        (&[("authorization", "Bearer client-two")], 200),
        (&[("api-key", "client-one")], 200),
    ];
    for (headers, status) in cases {
        let a = send("POST", &url, headers, Some(body));
        assert_eq!(a.status, status, "{headers:?}");
        if status == 401 {
            assert_eq!(a.openai_error()["code"], "invalid_api_key");
        }
    }
    let models = send("GET", &format!("{}/v1/models", proxy.url), &[], None);
    assert_eq!(models.status, 401, "the model list is protected too");
    assert_eq!(mock.count(), 2, "only authorised requests were forwarded");
    for r in mock.requests() {
        assert_eq!(
            r.header("api-key"),
            Some(KEY),
            "the client's key never travels upstream"
        );
    }
}

#[test]
fn upstream_response_heads_up_to_the_limit_pass_and_larger_ones_get_a_502() {
    // The proxy keeps its per-connection buffers small (8 KiB response head, as nginx).
    let mock = Mock::start(std::sync::Arc::new(|req: &Recorded| {
        let filler = if req.target.contains("big-dep") {
            9000
        } else {
            6000
        };
        MockReply::Json {
            status: 200,
            headers: vec![("x-filler".into(), "f".repeat(filler))],
            body: json!({"object": "list", "data": []}),
        }
    }));
    let instance = |name: &str, dep: &str| {
        azure_instance(
            name,
            &mock.url,
            KEY,
            1,
            &format!("supported_models: [{name}], model_deployments: {{{name}: {dep}}}"),
        )
    };
    let proxy = TestProxy::start(&format!(
        "routing: {{retries: 0}}\ninstances:\n{}{}",
        instance("small", "small-dep"),
        instance("large", "big-dep")
    ));
    let ask = |model: &str| {
        post_json(
            &format!("{}/v1/embeddings", proxy.url),
            &json!({"model": model, "input": "x"}),
        )
    };
    assert_eq!(ask("small").status, 200);
    let a = ask("large");
    assert_eq!(a.status, 502, "{:?}", String::from_utf8_lossy(&a.body));
    let message = a.openai_error()["message"].as_str().unwrap().to_string();
    assert!(message.contains("large"), "{message}");
}
