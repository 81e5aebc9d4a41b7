//! The quick start's first calls: `cargo run --example fake-azure` (the stand-in for
//! Azure OpenAI) and the proxy on `ENVIRONMENT=fake`, then a chat completion, a stream
//! and `/stats`, sent as the quick start writes them.

mod common;
use common::stand_in::FakeAzure;
use common::{send, sse_data, wait_until};
use serde_json::Value;
use std::time::Duration;

/// The quick start's chat completion and stream, byte for byte.
const CHAT: &str = r#"{"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello"}]}"#;
const STREAM: &str = r#"{"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "Hello"}]}"#;
const JSON: (&str, &str) = ("Content-Type", "application/json");

#[test]
fn the_quick_start_chat_stream_and_stats_go_through_the_stand_in() {
    let fake = FakeAzure::start();
    assert!(
        fake.banner.contains("STAND-IN for Azure OpenAI"),
        "it says what it is: {}",
        fake.banner
    );
    let proxy = fake.proxy();

    let chat = send(
        "POST",
        &proxy.url("/v1/chat/completions"),
        &[JSON],
        Some(CHAT.as_bytes()),
    );
    chat.assert_status(200);
    let body = chat.json();
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.contains("stand-in for Azure OpenAI"), "{body}");
    assert!(
        body["usage"]["total_tokens"].as_u64().unwrap() > 0,
        "{body}"
    );

    let stream = send(
        "POST",
        &proxy.url("/v1/chat/completions"),
        &[JSON],
        Some(STREAM.as_bytes()),
    );
    stream.assert_status(200);
    assert_eq!(stream.header("content-type"), Some("text/event-stream"));
    let events = sse_data(&stream.body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(text.contains("stand-in for Azure OpenAI"), "{text}");
    let usage = &chunks.last().unwrap()["usage"];
    assert!(
        usage["completion_tokens"].as_u64().unwrap() > 0,
        "{events:?}"
    );

    let stats = || send("GET", &proxy.url("/stats"), &[], None).json();
    // The stream's statistics are written once its end is.
    assert!(
        wait_until(Duration::from_secs(5), || stats()["metrics"]
            ["successful_requests_in_window"]
            == 2),
        "{}",
        stats()
    );
    assert_eq!(stats()["metrics"]["models"]["gpt-4o"], 2);
}

#[test]
fn the_stand_in_speaks_azures_urls_and_wants_a_key() {
    let fake = FakeAzure::start();
    let at = |path: &str| format!("{}{path}", fake.url);
    let key = ("api-key", "anything");
    let deployment = "/openai/deployments/my-4o/chat/completions?api-version=2024-10-21";

    let no_key = send("POST", &at(deployment), &[JSON], Some(CHAT.as_bytes()));
    assert_eq!(no_key.status, 401);
    assert_eq!(no_key.json()["error"]["code"], "401");

    let chat = send("POST", &at(deployment), &[JSON, key], Some(CHAT.as_bytes()));
    chat.assert_status(200);
    assert_eq!(chat.json()["model"], "my-4o", "the deployment of the URL");

    let v1 = send(
        "POST",
        &at("/openai/v1/chat/completions"),
        &[JSON, key],
        Some(CHAT.as_bytes()),
    );
    v1.assert_status(200);
    assert_eq!(
        v1.json()["model"],
        "gpt-4o",
        "the v1 API's model is the body's"
    );

    let embeddings = send(
        "POST",
        &at("/openai/deployments/emb/embeddings?api-version=2024-10-21"),
        &[JSON, key],
        Some(br#"{"input": ["a", "b"]}"#),
    );
    embeddings.assert_status(200);
    assert_eq!(embeddings.json()["data"].as_array().unwrap().len(), 2);

    let no_version = send(
        "POST",
        &at("/openai/deployments/my-4o/chat/completions"),
        &[JSON, key],
        Some(CHAT.as_bytes()),
    );
    assert_eq!(no_version.status, 404, "Azure wants an api-version");
}
