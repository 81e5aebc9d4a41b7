//! The quick start's first calls: `cargo run --example fake-azure` (the stand-in for
//! Azure OpenAI) and the proxy on `ENVIRONMENT=fake`, then a chat completion, a stream
//! and `/stats`, sent as the quick start writes them.

mod common;
use common::{send, sse_data, wait_until, Running, BIN};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The quick start's chat completion and stream, byte for byte.
const CHAT: &str = r#"{"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello"}]}"#;
const STREAM: &str = r#"{"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "Hello"}]}"#;
const JSON: (&str, &str) = ("Content-Type", "application/json");

/// The prefixes of the variables cargo sets for a test it runs.
const CARGO_SET: [&str; 7] = [
    "CARGO_MANIFEST_",
    "CARGO_PKG_",
    "CARGO_CRATE_",
    "CARGO_BIN_",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "CARGO_RUSTC_CURRENT_DIR",
];

/// The example's binary, built if it is not (`cargo test --test fake_azure` builds
/// only this test's targets). Examples land in `examples/` beside this test's `deps/`.
fn fake_azure_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    // Without the variables cargo set for this test: a dependency's build script that
    // watches one (ring's watches CARGO_MANIFEST_DIR) would be rebuilt, and again by
    // the next `cargo test`.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if CARGO_SET.iter().any(|p| name.starts_with(p)) {
            build.env_remove(&*name);
        }
    }
    let built = build
        .args(["build", "--quiet", "--example", "fake-azure"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    assert!(built.success(), "cargo build --example fake-azure failed");
    profile_dir.join("examples/fake-azure")
}

/// The stand-in running on a free port; killed when dropped.
struct FakeAzure {
    child: Child,
    url: String,
    banner: String,
}

impl FakeAzure {
    fn start() -> FakeAzure {
        let mut child = Command::new(fake_azure_bin())
            .arg("0")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut banner = String::new();
        let url = loop {
            let line = lines
                .next()
                .expect("fake-azure ended before listening")
                .unwrap();
            banner.push_str(&line);
            banner.push('\n');
            if let Some(rest) = line.split("listening on ").nth(1) {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        FakeAzure { child, url, banner }
    }
}

impl Drop for FakeAzure {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_quick_start_chat_stream_and_stats_go_through_the_stand_in() {
    let fake = FakeAzure::start();
    assert!(
        fake.banner.contains("STAND-IN for Azure OpenAI"),
        "it says what it is: {}",
        fake.banner
    );
    let proxy = Running::start(
        Command::new(BIN)
            .env_clear()
            .env("ENVIRONMENT", "fake")
            .env("FAKE_AZURE_URL", &fake.url)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["--port", "0"]),
    );

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
