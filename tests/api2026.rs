//! Through the real server: the Responses API (plain, streamed, stored
//! responses and their affinity), Azure's v1 API on both sides, images and audio, old
//! api-versions without stream usage, and the prompt estimate of tools and schemas.

mod common;
use common::api2026::{form_model, RESPONSE_USAGE, SPEECH};
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

const KEY: &str = "upstream-key";

fn instance(name: &str, url: &str, version: &str, extra: &str) -> String {
    format!(
        "  - {{name: {name}, api_key: {KEY}, api_base: '{url}', api_version: '{version}', {extra}}}\n"
    )
}

fn proxy(routing: &str, instances: &[String]) -> TestProxy {
    TestProxy::start(&format!("{routing}instances:\n{}", instances.concat()))
}

/// A proxy in front of one instance, `name` on a mock upstream of its own.
fn one(name: &str, version: &str, extra: &str) -> (Mock, TestProxy) {
    let up = Mock::start(azure_like(KEY));
    let proxy = proxy("", &[instance(name, &up.url, version, extra)]);
    (up, proxy)
}

fn get(proxy: &TestProxy, path: &str) -> Value {
    send("GET", &format!("{}{path}", proxy.url), &[], None).json()
}

fn post(proxy: &TestProxy, path: &str, body: &Value) -> Answer {
    post_json(&format!("{}{path}", proxy.url), body)
}

/// The statistics of the window once `requests` requests are in it (they are recorded
/// after the answer is out).
fn stats_after(proxy: &TestProxy, requests: u64) -> Value {
    let done = || get(proxy, "/stats")["metrics"]["total_requests_in_window"] == requests;
    assert!(
        wait_until(Duration::from_secs(5), done),
        "{}",
        get(proxy, "/stats")
    );
    get(proxy, "/stats")["metrics"].clone()
}

/// The `event:` names of an SSE body, in order.
fn event_names(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .lines()
        .filter_map(|l| l.strip_prefix("event: ").map(str::to_string))
        .collect()
}

fn output_text(response: &Value) -> &str {
    response["output"][0]["content"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no output text: {response}"))
}

#[test]
fn the_responses_api_plain_and_streamed_goes_to_the_mapped_deployment_and_counts_usage() {
    let (up, proxy) = one(
        "a",
        "2025-04-01-preview",
        "model_deployments: {gpt-4o: dep-4o}",
    );
    let plain = post(
        &proxy,
        "/v1/responses",
        &json!({"model": "gpt-4o", "input": "hi"}),
    );
    plain.assert_status(200);
    assert_eq!(output_text(&plain.json()), "Hello from dep-4o");
    // A dated api-version: the Responses API is not under a deployment; the body names it.
    let sent = &up.requests()[0];
    assert_eq!(
        sent.target,
        "/openai/responses?api-version=2025-04-01-preview"
    );
    assert_eq!(sent.json()["model"], "dep-4o");

    let streamed = post(
        &proxy,
        "/v1/responses",
        &json!({"model": "gpt-4o", "input": "hi", "stream": true}),
    );
    assert_eq!(streamed.status, 200);
    assert_eq!(streamed.header("content-type"), Some("text/event-stream"));
    let names = event_names(&streamed.body);
    assert_eq!(names.first().map(String::as_str), Some("response.created"));
    assert_eq!(names.last().map(String::as_str), Some("response.completed"));
    assert_eq!(
        names
            .iter()
            .filter(|n| *n == "response.output_text.delta")
            .count(),
        3,
        "{names:?}"
    );
    let data = sse_data(&streamed.body);
    assert!(!data.iter().any(|d| d == "[DONE]"), "no [DONE]: {data:?}");
    let deltas: String = data
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(deltas, "Hello from dep-4o");
    // The Responses API takes no stream_options: the proxy must not add one.
    assert_eq!(up.requests()[1].json().get("stream_options"), None);

    // Both reported usage (input_tokens, output_tokens), read into the statistics.
    let stats = stats_after(&proxy, 2);
    let (input, output) = RESPONSE_USAGE;
    assert_eq!(stats["prompt_tokens_in_window"], 2 * input, "{stats}");
    assert_eq!(stats["completion_tokens_in_window"], 2 * output, "{stats}");
    assert_eq!(stats["models"], json!({"gpt-4o": 2}), "{stats}");
}

#[test]
fn instances_on_azures_v1_api_are_called_at_its_urls_with_the_deployment_in_the_body() {
    let up = Mock::start(azure_like(KEY));
    let proxy = proxy(
        "routing: {strategy: round_robin}\n",
        &[
            instance("ga", &up.url, "v1", "model_deployments: {m: dep-ga}"),
            instance("pre", &up.url, "preview", "model_deployments: {n: dep-pre}"),
        ],
    );
    let chat = post(
        &proxy,
        "/v1/chat/completions",
        &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    );
    chat.assert_status(200);
    assert_eq!(chat.json()["model"], "dep-ga");
    let responses = post(
        &proxy,
        "/v1/responses",
        &json!({"model": "n", "input": "hi"}),
    );
    assert_eq!(responses.status, 200);
    assert_eq!(output_text(&responses.json()), "Hello from dep-pre");
    let streamed = post(
        &proxy,
        "/v1/chat/completions",
        &json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(
        sse_data(&streamed.body).last().map(String::as_str),
        Some("[DONE]")
    );

    let sent = up.requests();
    let targets: Vec<&str> = sent.iter().map(|r| r.target.as_str()).collect();
    assert_eq!(
        targets,
        [
            "/openai/v1/chat/completions",
            "/openai/v1/responses?api-version=preview",
            "/openai/v1/chat/completions",
        ]
    );
    assert_eq!(sent[0].json()["model"], "dep-ga");
    assert_eq!(sent[1].json()["model"], "dep-pre");
    // The v1 API accepts stream_options: usage is asked for, and counted.
    assert_eq!(sent[2].json()["stream_options"]["include_usage"], true);
    let stats = stats_after(&proxy, 3);
    assert_eq!(stats["completion_tokens_in_window"], 3 + 5 + 2, "{stats}");
}

#[test]
fn clients_whose_base_url_is_an_azure_v1_endpoint_are_served() {
    let (up, proxy) = one("a", "2024-10-21", "supported_models: [m]");
    let chat = post(
        &proxy,
        "/openai/v1/chat/completions",
        &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    );
    chat.assert_status(200);
    assert_eq!(
        chat.json()["choices"][0]["message"]["content"],
        "Hello from m"
    );
    let embeddings = post(
        &proxy,
        "/openai/v1/embeddings",
        &json!({"model": "m", "input": "x"}),
    );
    assert_eq!(embeddings.status, 200);
    let models = get(&proxy, "/openai/v1/models");
    assert_eq!(models["data"][0]["id"], "m", "{models}");
    assert_eq!(
        up.requests()
            .iter()
            .map(|r| r.target.as_str())
            .collect::<Vec<_>>(),
        [
            "/openai/deployments/m/chat/completions?api-version=2024-10-21",
            "/openai/deployments/m/embeddings?api-version=2024-10-21",
        ]
    );
}

#[test]
fn a_response_and_everything_that_refers_to_it_stay_on_the_instance_that_made_it() {
    let (a, b) = (Mock::start(azure_like(KEY)), Mock::start(azure_like(KEY)));
    // Round robin: without affinity, every other request would go to the other one.
    let proxy = proxy(
        "routing: {strategy: round_robin}\n",
        &[
            instance("a", &a.url, "2025-04-01-preview", "supported_models: [m]"),
            instance("b", &b.url, "2025-04-01-preview", "supported_models: [m]"),
        ],
    );
    let first = post(
        &proxy,
        "/v1/responses",
        &json!({"model": "m", "input": "hi"}),
    );
    assert_eq!(first.status, 200);
    let home = first.header("x-proxy-instance").unwrap().to_string();
    let mut id = first.json()["id"].as_str().unwrap().to_string();
    let mock = |name: &str| if name == "a" { &a } else { &b };
    // A conversation of follow-ups, streamed or not: each on the first one's instance.
    for stream in [false, true, false, true] {
        let next = post(
            &proxy,
            "/v1/responses",
            &json!({"model": "m", "input": "more", "previous_response_id": id, "stream": stream}),
        );
        next.assert_status(200);
        assert_eq!(next.header("x-proxy-instance"), Some(home.as_str()));
        let made = if stream {
            let completed = sse_data(&next.body)
                .iter()
                .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                .find(|e| e["type"] == "response.completed")
                .expect("response.completed");
            completed["response"]["id"].clone()
        } else {
            next.json()["id"].clone()
        };
        id = made.as_str().unwrap().to_string();
    }
    // The stored response, its input items, a cancel: all asked of its instance.
    let url = |rest: &str| format!("{}/v1/responses/{id}{rest}", proxy.url);
    let fetched = send("GET", &url(""), &[], None);
    assert_eq!(fetched.status, 200);
    assert_eq!(fetched.json()["id"], id.as_str());
    assert_eq!(
        send("GET", &url("/input_items"), &[], None).json()["object"],
        "list"
    );
    assert_eq!(
        send("POST", &url("/cancel"), &[], Some(b"")).json()["status"],
        "cancelled"
    );
    let deleted = send("DELETE", &url(""), &[], None);
    assert_eq!(deleted.json()["deleted"], true);
    let other = if home == "a" { &b } else { &a };
    assert_eq!(mock(&home).count(), 9, "every request went home");
    assert_eq!(other.count(), 0);

    // Deleted, it is forgotten: an id the proxy does not know, with two instances that
    // could hold it, is a 404 naming it, asked of no one.
    let gone = send("GET", &url(""), &[], None);
    assert_eq!(gone.status, 404);
    let error = gone.openai_error();
    assert!(error["message"].as_str().unwrap().contains(&id), "{error}");
    let unknown = post(
        &proxy,
        "/v1/responses",
        &json!({"model": "m", "input": "x", "previous_response_id": "resp_nobody_made"}),
    );
    assert_eq!(unknown.status, 404);
    assert!(unknown.openai_error()["message"]
        .as_str()
        .unwrap()
        .contains("resp_nobody_made"));
    assert_eq!(a.count() + b.count(), 9, "no upstream was asked");
}

#[test]
fn images_speech_and_uploads_are_routed_by_model_and_passed_through() {
    let up = Mock::start(azure_like(KEY));
    let v1 = Mock::start(azure_like(KEY));
    let proxy = proxy(
        "",
        &[
            instance(
                "dated",
                &up.url,
                "2025-04-01-preview",
                "model_deployments: {dall-e-3: images, tts: voice, whisper: ears}",
            ),
            instance(
                "v1",
                &v1.url,
                "v1",
                "model_deployments: {whisper-v1: ears-v1}",
            ),
        ],
    );
    let image = post(
        &proxy,
        "/v1/images/generations",
        &json!({"model": "dall-e-3", "prompt": "a cat", "n": 1}),
    );
    image.assert_status(200);
    assert_eq!(
        image.json()["data"][0]["url"],
        "https://images.example/images.png"
    );

    let speech = post(
        &proxy,
        "/v1/audio/speech",
        &json!({"model": "tts", "input": "hello", "voice": "alloy"}),
    );
    assert_eq!(speech.status, 200);
    assert_eq!(speech.header("content-type"), Some("audio/mpeg"));
    assert_eq!(speech.body, SPEECH, "binary audio passed through unchanged");

    let upload = |model: &str| {
        let boundary = "----proxytest7MA4YWxk";
        let mut body = Vec::new();
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.mp3\"\r\nContent-Type: audio/mpeg\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(SPEECH);
        body.extend_from_slice(
            format!("\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n--{boundary}--\r\n").as_bytes(),
        );
        let content_type = format!("multipart/form-data; boundary={boundary}");
        let answer = send(
            "POST",
            &format!("{}/v1/audio/transcriptions", proxy.url),
            &[("content-type", content_type.as_str())],
            Some(&body),
        );
        (answer, body)
    };
    let (dated, sent_body) = upload("whisper");
    dated.assert_status(200);
    assert_eq!(dated.json()["text"], "transcribed by ears");
    let (on_v1, _) = upload("whisper-v1");
    assert_eq!(on_v1.json()["text"], "transcribed by ears-v1");
    let (unknown, _) = upload("nobody-serves-this");
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.openai_error()["code"], "model_not_found");

    let dated_sent = up.requests();
    let targets: Vec<&str> = dated_sent.iter().map(|r| r.target.as_str()).collect();
    assert_eq!(
        targets,
        [
            "/openai/deployments/images/images/generations?api-version=2025-04-01-preview",
            "/openai/deployments/voice/audio/speech?api-version=2025-04-01-preview",
            "/openai/deployments/ears/audio/transcriptions?api-version=2025-04-01-preview",
        ]
    );
    // Under a deployment URL the upload goes out byte for byte.
    assert_eq!(dated_sent[2].body, sent_body);
    // On the v1 API the deployment is the form's model field.
    let v1_sent = v1.requests();
    assert_eq!(v1_sent[0].target, "/openai/v1/audio/transcriptions");
    assert_eq!(form_model(&v1_sent[0].body).as_deref(), Some("ears-v1"));
    assert!(v1_sent[0]
        .header("content-type")
        .is_some_and(|c| c.starts_with("multipart/form-data; boundary=")));

    // Each counted as a request of its model (a model no one serves as "other", so a
    // client cannot grow the statistics with names).
    let stats = stats_after(&proxy, 5);
    assert_eq!(
        stats["models"],
        json!({"dall-e-3": 1, "tts": 1, "whisper": 1, "whisper-v1": 1, "other": 1}),
        "{stats}"
    );
}

#[test]
fn an_api_version_without_stream_usage_gets_the_stream_as_it_is_and_usage_is_estimated() {
    let (up, proxy) = one("old", "2024-02-01", "supported_models: [m]");
    let streamed = post(
        &proxy,
        "/v1/chat/completions",
        &json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(streamed.status, 200);
    assert_eq!(
        sse_data(&streamed.body).last().map(String::as_str),
        Some("[DONE]")
    );
    assert_eq!(
        up.requests()[0].json().get("stream_options"),
        None,
        "2024-02-01 refuses stream_options"
    );
    // No usage came: the streamed text ("Hello world") and the prompt are estimated.
    let stats = stats_after(&proxy, 1);
    let completion = stats["completion_tokens_in_window"].as_u64().unwrap();
    assert!((1..=4).contains(&completion), "{stats}");
    assert!(
        stats["prompt_tokens_in_window"].as_u64().unwrap() > 0,
        "{stats}"
    );
}

#[test]
fn tool_schemas_count_in_the_estimate_and_a_whole_number_written_as_a_float_is_accepted() {
    let (up, proxy) = one("a", "2024-10-21", "supported_models: [m], max_tpm: 1500");
    let ask = |extra: Value| {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100.0});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        post(&proxy, "/v1/chat/completions", &body)
    };
    assert_eq!(ask(json!({})).status, 200, "max_tokens 100.0 is 100");
    // Reserved as 100 (and the prompt), not as the default 1024 of an unread number.
    let a = &get(&proxy, "/stats/instances")["instances"][0];
    assert!(a["current_tpm"].as_u64().unwrap() < 1024, "{a}");
    // A tool whose schema alone is thousands of tokens: more than max_tpm allows.
    let big: serde_json::Map<String, Value> = (0..400)
        .map(|i| {
            (
                format!("field_number_{i}"),
                json!({"type": "string", "description": "a property described in several plain English words"}),
            )
        })
        .collect();
    let tools = json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": big}}}]});
    let refused = ask(tools);
    refused.assert_status(400);
    assert_eq!(refused.openai_error()["code"], "tokens_exceed_limit");
    assert_eq!(up.count(), 1, "the refused request was not sent");
}

#[test]
fn images_and_speech_count_as_requests_against_rpm_not_as_tokens() {
    let up = Mock::start(azure_like(KEY));
    let proxy = proxy(
        "routing: {queue_timeout: 0}\n",
        &[instance(
            "a",
            &up.url,
            "2025-04-01-preview",
            "supported_models: [dall-e-3, tts], max_tpm: 10, max_rpm: 2",
        )],
    );
    let long_prompt = "a very detailed picture ".repeat(50);
    let image = || {
        post(
            &proxy,
            "/v1/images/generations",
            &json!({"model": "dall-e-3", "prompt": long_prompt}),
        )
    };
    // Hundreds of tokens of text pass a TPM limit of 10: images and speech are not
    // tokens.
    assert_eq!(image().status, 200);
    let speech = post(
        &proxy,
        "/v1/audio/speech",
        &json!({"model": "tts", "input": long_prompt, "voice": "alloy"}),
    );
    assert_eq!(speech.status, 200);
    let third = image();
    third.assert_status(429);
    assert_eq!(third.openai_error()["code"], "rate_limit_exceeded");
    assert_eq!(up.count(), 2);
}

#[test]
fn a_response_reserves_its_max_output_tokens_and_counts_its_instructions() {
    let (up, proxy) = one("a", "v1", "supported_models: [m], max_tpm: 1000");
    let ask = |body: Value| post(&proxy, "/v1/responses", &body);
    assert_eq!(
        ask(json!({"model": "m", "input": "hi", "max_output_tokens": 500})).status,
        200
    );
    let too_much_output = ask(json!({"model": "m", "input": "hi", "max_output_tokens": 5000}));
    assert_eq!(too_much_output.status, 400);
    assert_eq!(
        too_much_output.openai_error()["code"],
        "tokens_exceed_limit"
    );
    let long_instructions = ask(json!({"model": "m", "input": "hi", "max_output_tokens": 10,
        "instructions": "Answer in the style of a very long legal document. ".repeat(200)}));
    assert_eq!(long_instructions.status, 400);
    assert_eq!(up.count(), 1, "only the first was sent");
}

#[test]
fn an_api_version_without_the_responses_api_takes_out_only_responses_for_the_model() {
    let (up, proxy) = one("a", "2024-10-21", "supported_models: [m]");
    let responses = post(
        &proxy,
        "/v1/responses",
        &json!({"model": "m", "input": "hi"}),
    );
    assert_eq!(responses.status, 404, "Azure's answer, passed on");
    // Chat for the same model on the same deployment goes on.
    let chat = post(
        &proxy,
        "/v1/chat/completions",
        &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    );
    chat.assert_status(200);
    let again = post(
        &proxy,
        "/v1/responses",
        &json!({"model": "m", "input": "hi"}),
    );
    assert_eq!(again.status, 503, "out for responses a while");
    assert_eq!(up.count(), 2);
}

#[test]
fn azure_clients_reach_the_responses_api_and_the_model_list_outside_a_deployment() {
    let (_up, proxy) = one("a", "2025-04-01-preview", "supported_models: [m]");
    // What `AzureOpenAI(...).responses.create` and `.models.list()` send.
    let created = post(
        &proxy,
        "/openai/responses?api-version=2025-04-01-preview",
        &json!({"model": "m", "input": "hi"}),
    );
    created.assert_status(200);
    let id = created.json()["id"].as_str().unwrap().to_string();
    let fetched = send(
        "GET",
        &format!(
            "{}/openai/responses/{id}?api-version=2025-04-01-preview",
            proxy.url
        ),
        &[],
        None,
    );
    assert_eq!(fetched.json()["id"], id.as_str());
    let models = get(&proxy, "/openai/models?api-version=2025-04-01-preview");
    assert_eq!(models["data"][0]["id"], "m", "{models}");
}
