//! The Python proxy's README, read as its users have it: its YAML examples and its
//! environment variable examples, taken from the text at test time, drive the real
//! binary in front of mock Azure upstreams, and each model must reach the instance and
//! deployment the README says.
//!
//! `tests/data/python-proxy-README.md` is that README unchanged (the project's
//! reference copy, `shared/reference/python-proxy-README.md`). Where an example cannot
//! work as written, the test changes the least it can and says why where it does.

mod common;
use common::{azure_like, post_json, Mock, Running, TempDir, BIN};
use serde_json::json;
use std::collections::BTreeMap;
use std::process::Command;

const README: &str = include_str!("data/python-proxy-README.md");

/// The README's fenced blocks, in order. Its first YAML block has no closing fence: it
/// runs into the `### Version-Specific Model Mappings` heading and the prose under it,
/// so a heading ends a block too, as a reader would take it.
fn blocks() -> Vec<String> {
    let mut out = Vec::new();
    let mut open: Option<Vec<&str>> = None;
    for line in README.lines() {
        match open.as_mut() {
            Some(lines) if line.starts_with("```") || line.starts_with("### ") => {
                out.push(lines.join("\n"));
                open = None;
            }
            Some(lines) => lines.push(line),
            None if line.starts_with("```") => open = Some(Vec::new()),
            None => {}
        }
    }
    out
}

/// The one block that contains every one of `marks`.
fn block(marks: &[&str]) -> String {
    let found: Vec<String> = blocks()
        .into_iter()
        .filter(|b| marks.iter().all(|m| b.contains(m)))
        .collect();
    assert_eq!(found.len(), 1, "{marks:?} in {found:#?}");
    found.into_iter().next().unwrap()
}

/// `KEY=VALUE` lines of an environment block; comments (`# ... and so on`) skipped.
fn variables(block: &str) -> BTreeMap<String, String> {
    block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("a KEY=VALUE line");
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// Sends `model` to the proxy (chat, or embeddings for an embedding model) and returns
/// the instance that served it and the path and query the upstream received.
fn route(proxy: &Running, mocks: &[&Mock], model: &str) -> (String, String) {
    let before: Vec<usize> = mocks.iter().map(|m| m.count()).collect();
    let answer = if model.contains("embedding") {
        post_json(
            &proxy.url("/v1/embeddings"),
            &json!({"model": model, "input": "hi"}),
        )
    } else {
        post_json(
            &proxy.url("/v1/chat/completions"),
            &json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}),
        )
    };
    assert_eq!(
        answer.status,
        200,
        "{model}: {}",
        String::from_utf8_lossy(&answer.body)
    );
    let called: Vec<&Mock> = mocks
        .iter()
        .zip(before)
        .filter(|(m, n)| m.count() > *n)
        .map(|(m, _)| *m)
        .collect();
    assert_eq!(called.len(), 1, "{model}: one upstream called");
    let target = called[0].requests().last().unwrap().target.clone();
    (
        answer.header("x-proxy-instance").unwrap().to_string(),
        target,
    )
}

fn deployment_path(deployment: &str, op: &str) -> String {
    format!("/openai/deployments/{deployment}/{op}?api-version=2024-08-01-preview")
}

#[test]
fn the_yaml_examples_route_each_model_to_its_deployment() {
    let upstream = Mock::start(azure_like("sk-readme-key-1"));
    let root = TempDir::new();
    // As in the Python proxy's layout, `app/config`, so that its `../logs/app.log`
    // lands at `<root>/logs/app.log`, beside `app/`.
    let dir = root.0.join("app/config");
    std::fs::create_dir_all(&dir).unwrap();
    let base = block(&["name: \"Azure OpenAI Proxy\"", "instances:"]);
    // The one change to the text: `port: 3010` would make tests collide; a free
    // loopback port instead.
    assert!(base.contains("\nport: 3010\n"));
    let base = base.replace("\nport: 3010\n", "\nhost: 127.0.0.1\nport: 0\n");
    std::fs::write(dir.join("base.yaml"), base).unwrap();
    // The version-specific block, unchanged, as the environment's overlay: its
    // `# ... other configuration ...` is the base's instance, which it merges into.
    let versions = block(&["gpt4o-november", "instances:"]);
    std::fs::write(dir.join("production.yaml"), versions).unwrap();

    let mut proxy = Running::start(
        Command::new(BIN)
            .env_clear()
            .arg("--config-dir")
            .arg(&dir)
            .env("ENVIRONMENT", "production")
            .env("AZURE_API_KEY_1", "sk-readme-key-1")
            // The README's api_base is an example host; the variable the Python proxy
            // also read points the instance at the mock instead.
            .env("API_INSTANCE_INSTANCE1_API_BASE", &upstream.url),
    );
    for (model, deployment) in [
        ("gpt-4o-mini", "gpt4omini"),
        ("gpt-4o", "gpt4o"),
        ("gpt-4o-2024-11-20", "gpt4o-november"),
        ("gpt-4o-2024-08-06", "gpt4o-august"),
    ] {
        let (instance, target) = route(&proxy, &[&upstream], model);
        assert_eq!(instance, "instance1", "{model}");
        assert_eq!(
            target,
            deployment_path(deployment, "chat/completions"),
            "{model}"
        );
    }
    // "No normalization or fallback occurs".
    let other = post_json(
        &proxy.url("/v1/chat/completions"),
        &json!({"model": "gpt-4o-2024-05-13", "messages": []}),
    );
    assert_eq!(other.status, 404);

    let log = root.0.join("logs/app.log");
    assert!(
        common::wait_until(std::time::Duration::from_secs(10), || {
            std::fs::read_to_string(&log).is_ok_and(|t| t.contains("model=gpt-4o-2024-08-06"))
        }),
        "the README's ../logs/app.log is {}: {}",
        log.display(),
        proxy.stderr()
    );
}

#[test]
fn the_environment_variable_examples_route_each_model_to_its_deployment() {
    let first = Mock::start(azure_like("your-api-key"));
    let second = Mock::start(azure_like("your-api-key-2"));
    let mut env = variables(&block(&["API_INSTANCES=instance1,instance2"]));
    env.extend(variables(&block(&[
        "API_INSTANCE_INSTANCE1_MODEL_MAP_GPT-4O-2024-11-20",
    ])));
    // The README's hosts are examples: the mocks take their place.
    env.insert("API_INSTANCE_INSTANCE1_API_BASE".into(), first.url.clone());
    // Instance 2 stops at "# ... and so on": the rest of it, written the same way.
    env.insert("API_INSTANCE_INSTANCE2_API_BASE".into(), second.url.clone());
    env.insert(
        "API_INSTANCE_INSTANCE2_SUPPORTED_MODELS".into(),
        "text-embedding-3-small".into(),
    );
    let cwd = TempDir::new();
    let mut proxy = Running::start(
        Command::new(BIN)
            .env_clear()
            .current_dir(&cwd.0)
            .args(["--env-only", "--host", "127.0.0.1", "--port", "0"])
            .envs(&env),
    );
    for (model, deployment) in [
        ("gpt-4o-mini", "gpt4omini"),
        ("gpt-4o", "gpt4o"),
        ("gpt-4o-2024-11-20", "gpt4o-november"),
        ("gpt-4o-2024-08-06", "gpt4o-august"),
    ] {
        let (instance, target) = route(&proxy, &[&first, &second], model);
        assert_eq!(instance, "instance1", "{model}");
        assert_eq!(
            target,
            deployment_path(deployment, "chat/completions"),
            "{model}"
        );
    }
    let (instance, target) = route(&proxy, &[&first, &second], "text-embedding-3-small");
    assert_eq!(instance, "instance2");
    assert_eq!(
        target, "/openai/deployments/text-embedding-3-small/embeddings?api-version=2024-10-21",
        "no API_VERSION for instance 2: the default"
    );
    let log = proxy.stderr();
    assert!(
        log.contains("its api_key (from environment variable API_INSTANCE_INSTANCE1_API_KEY) is a placeholder"),
        "the README's your-api-key is flagged: {log}"
    );
    assert!(
        !log.contains("is ignored"),
        "every variable understood: {log}"
    );
}

#[test]
fn the_legacy_single_instance_example_serves_any_model_under_its_own_name() {
    let upstream = Mock::start(azure_like("your-api-key"));
    let mut env = variables(&block(&["API_BASE=https://your-instance"]));
    assert_eq!(env.len(), 3, "API_KEY, API_BASE, API_VERSION: {env:?}");
    // The README's host is an example: the mock takes its place.
    env.insert("API_BASE".into(), upstream.url.clone());
    let cwd = TempDir::new();
    let proxy = Running::start(
        Command::new(BIN)
            .env_clear()
            .current_dir(&cwd.0)
            .args(["--env-only", "--host", "127.0.0.1", "--port", "0"])
            .envs(&env),
    );
    for model in ["gpt-4o", "gpt-4o-2024-11-20"] {
        let (instance, target) = route(&proxy, &[&upstream], model);
        assert_eq!(instance, "default");
        assert_eq!(target, deployment_path(model, "chat/completions"));
    }
}
