//! The built binary: flags, `--check-config`, and starting on the example config.

mod common;
use common::{send, Running, TempDir, BIN};
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn example_config() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config"))
}

/// The binary with an empty environment (so no developer's keys leak into a test).
fn proxy_cmd() -> Command {
    let mut c = Command::new(BIN);
    c.env_clear();
    c
}

/// `--check-config` on the config directory `dir`, with an empty environment.
fn check_config(dir: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = proxy_cmd();
    c.args(["--check-config", "--config-dir"]).arg(dir);
    c
}

#[test]
fn version_help_and_unknown_flags() {
    let v = proxy_cmd().arg("--version").output().unwrap();
    assert!(v.status.success());
    assert_eq!(
        String::from_utf8_lossy(&v.stdout).trim(),
        format!("azure-openai-proxy {}", env!("CARGO_PKG_VERSION"))
    );
    let h = proxy_cmd().arg("--help").output().unwrap();
    assert!(h.status.success());
    let help = String::from_utf8_lossy(&h.stdout);
    for flag in ["--config-dir", "--check-config", "--version"] {
        assert!(help.contains(flag), "{help}");
    }
    let bad = proxy_cmd().arg("--frobnicate").output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--frobnicate"));
}

#[test]
fn check_config_accepts_the_example_and_names_what_is_wrong() {
    let ok = check_config(example_config()).output().unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("2 instance(s): east-us, west-us"));

    // Production takes keys from the environment only.
    let prod = check_config(example_config())
        .env("ENVIRONMENT", "production")
        .output()
        .unwrap();
    assert_eq!(prod.status.code(), Some(1));
    let err = String::from_utf8_lossy(&prod.stderr);
    assert!(
        err.contains("production.yaml") && err.contains("AZURE_OPENAI_KEY_EAST"),
        "{err}"
    );

    let dir = TempDir::new();
    dir.write(
        "base.yaml",
        "instances:\n  - {name: a, api_key: sk-hidden-value, api_base: 'https://a.example.com', api_version: v, max_tpm: 0, supported_models: [m]}\n",
    );
    let bad = proxy_cmd()
        .arg("--check-config")
        .arg(format!("--config-dir={}", dir.0.display()))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("base.yaml") && err.contains("instances[0].max_tpm"),
        "{err}"
    );
    assert!(!err.contains("sk-hidden-value"), "{err}");
}

#[test]
fn the_example_config_starts_with_placeholder_keys_and_serves_models() {
    let dir = TempDir::new();
    for f in ["base.yaml", "development.yaml"] {
        std::fs::copy(example_config().join(f), dir.0.join(f)).unwrap();
    }
    // Same example, on a free port so tests can run side by side.
    dir.write(
        "test.yaml",
        "host: 127.0.0.1\nport: 0\nserver: {workers: 4}\n",
    );
    let mut proxy = Running::start(
        proxy_cmd()
            .arg("--config-dir")
            .arg(&dir.0)
            .env("ENVIRONMENT", "test")
            // A terminal type, as in an operator's shell, while stderr is a pipe.
            .env("TERM", "xterm-256color")
            .env("AZURE_OPENAI_KEY_WEST", "sk-west-secret-123"),
    );
    let models = send("GET", &proxy.url("/v1/models"), &[], None);
    let unknown = send(
        "POST",
        &proxy.url("/v1/chat/completions"),
        &[],
        Some(b"{\"model\":\"x\"}"),
    );
    assert_eq!(models.status, 200);
    let ids: Vec<String> = models.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]);
    assert_eq!(unknown.status, 404);
    assert!(common::wait_until(Duration::from_secs(5), || proxy
        .stderr()
        .contains("status=404")));
    let log = proxy.stderr();
    assert!(
        log.contains("GET /v1/models"),
        "one access line per request: {log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "no colour codes off a terminal: {log:?}"
    );
    assert!(
        log.contains("auth.api_keys is not set"),
        "an open proxy says so: {log}"
    );
    assert!(
        !log.contains("sk-west-secret-123") && !log.contains("replace-me-east"),
        "{log}"
    );
}

#[test]
fn the_log_file_has_one_access_line_per_request_and_no_secret_or_prompt() {
    let upstream = common::Mock::start(common::azure_like("sk-upstream-secret-9"));
    let dir = TempDir::new();
    let log = dir.0.join("logs/app.log");
    dir.write(
        "base.yaml",
        &format!(
            "host: 127.0.0.1\nport: 0\nserver: {{workers: 2}}\nauth: {{api_keys: [client-secret-7], admin_key: admin-secret-5}}\n\
             logging: {{level: debug, file: '{}', max_size: 1MB, backup_count: 2, feishu_webhook: 'http://127.0.0.1:9/hook/token-secret-3'}}\n\
             instances:\n  - {{name: east, api_key: sk-upstream-secret-9, api_base: '{}', api_version: 2024-10-21, supported_models: [m]}}\n",
            log.display(),
            upstream.url
        ),
    );
    let mut proxy = Running::start(proxy_cmd().arg("--config-dir").arg(&dir.0));
    let auth = [
        ("authorization", "Bearer client-secret-7"),
        ("content-type", "application/json"),
    ];
    let body = br#"{"model":"m","messages":[{"role":"user","content":"PROMPT-MARKER-4242"}]}"#;
    for _ in 0..2 {
        let a = send(
            "POST",
            &proxy.url("/v1/chat/completions"),
            &auth,
            Some(body),
        );
        assert_eq!(a.status, 200);
    }
    let unauthorised = send("POST", &proxy.url("/v1/chat/completions"), &[], Some(body));
    assert_eq!(unauthorised.status, 401);
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let done = common::wait_until(Duration::from_secs(10), || read().contains("request=3 "));
    let text = read();
    assert!(done, "{text}");
    let access: Vec<&str> = text.lines().filter(|l| l.contains("request=")).collect();
    assert_eq!(access.len(), 3, "{text}");
    for (line, status) in access.iter().zip(["200", "200", "401"]) {
        assert!(line.contains(&format!("status={status}")), "{line}");
    }
    assert!(
        access[0].contains("model=m instance=east")
            && access[0].contains("tokens=11/3")
            && access[0].contains("attempts=1"),
        "{}",
        access[0]
    );
    let console = proxy.stderr();
    for secret in [
        "sk-upstream-secret-9",
        "client-secret-7",
        "admin-secret-5",
        "token-secret-3",
        "PROMPT-MARKER-4242",
    ] {
        assert!(!text.contains(secret), "{secret} in the log file:\n{text}");
        assert!(
            !console.contains(secret),
            "{secret} on the console:\n{console}"
        );
    }
}

fn write_instances(dir: &TempDir, upstream: &str, models: &str) {
    dir.write(
        "base.yaml",
        &format!(
            "host: 127.0.0.1\nport: 0\nserver: {{workers: 4, shutdown_grace_seconds: 10}}\n\
             instances:\n  - {{name: east, api_key: k, api_base: '{upstream}', api_version: 2024-10-21, supported_models: [{models}]}}\n"
        ),
    );
}

fn model_ids(proxy: &Running) -> Vec<String> {
    send("GET", &proxy.url("/v1/models"), &[], None).json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn sighup_reloads_and_a_broken_file_keeps_the_running_config() {
    let upstream = common::Mock::start(common::azure_like("k"));
    let dir = TempDir::new();
    write_instances(&dir, &upstream.url, "m");
    let mut proxy = Running::start(proxy_cmd().arg("--config-dir").arg(&dir.0));
    assert_eq!(model_ids(&proxy), ["m"]);

    write_instances(&dir, &upstream.url, "m, m2");
    proxy.signal("HUP");
    assert!(common::wait_until(Duration::from_secs(5), || model_ids(
        &proxy
    ) == [
        "m", "m2"
    ]));

    dir.write("base.yaml", "instances: [{name: east, api_key: k}]\n");
    proxy.signal("HUP");
    assert!(common::wait_until(Duration::from_secs(5), || proxy
        .stderr()
        .contains("reload failed")));
    assert!(
        proxy.stderr().contains("api_base"),
        "the message names what is missing: {}",
        proxy.stderr()
    );
    assert_eq!(
        model_ids(&proxy),
        ["m", "m2"],
        "still on the last good config"
    );
    assert_eq!(proxy.child.try_wait().unwrap(), None, "still running");
}

#[test]
fn sigterm_lets_a_stream_in_flight_finish_then_exits_0() {
    use std::io::Read;
    let upstream = common::Mock::start(std::sync::Arc::new(|_: &common::Recorded| {
        common::MockReply::Sse {
            first_after: Duration::ZERO,
            events: common::chat_events("d", &["a", "b", "c", "d", "e", "f", "g", "h"], true),
            gap: Duration::from_millis(150),
            end: common::SseEnd::Done,
        }
    }));
    let dir = TempDir::new();
    write_instances(&dir, &upstream.url, "m");
    let mut proxy = Running::start(proxy_cmd().arg("--config-dir").arg(&dir.0));
    let response = common::client()
        .post(proxy.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .send(r#"{"model":"m","stream":true}"#)
        .unwrap();
    let mut reader = response.into_body().into_reader();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\"a\"") {
        let n = reader.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    proxy.signal("TERM");
    reader.read_to_end(&mut got).unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.contains("\"h\"") && text.trim_end().ends_with("data: [DONE]"),
        "the stream finished: {text}"
    );
    let status = proxy
        .exit_within(Duration::from_secs(10))
        .expect("did not exit");
    assert_eq!(status.code(), Some(0));
    let log = proxy.stderr();
    assert!(log.contains("all requests finished"), "{log}");
}

#[test]
fn running_out_of_file_descriptors_does_not_stop_accepting() {
    let dir = TempDir::new();
    dir.write(
        "base.yaml",
        "host: 127.0.0.1\nport: 0\nserver: {workers: 2, client_timeout: 1}\ninstances:\n  - {name: a, api_key: k, api_base: 'http://127.0.0.1:9', api_version: v, supported_models: [m]}\n",
    );
    // A descriptor limit that the idle connections below use up.
    let mut cmd = Command::new("prlimit");
    cmd.args(["--nofile=64:64", BIN, "--config-dir"])
        .arg(&dir.0)
        .env_clear();
    let mut proxy = Running::start(&mut cmd);
    let held: Vec<_> = (0..100)
        .filter_map(|_| std::net::TcpStream::connect(&proxy.addr).ok())
        .collect();
    assert!(
        common::wait_until(Duration::from_secs(10), || proxy
            .stderr()
            .contains("accepting a connection failed")),
        "the descriptors did not run out: {}",
        proxy.stderr()
    );
    drop(held);
    let models = || -> std::io::Result<String> {
        let mut c = std::net::TcpStream::connect(&proxy.addr)?;
        c.set_read_timeout(Some(Duration::from_secs(2)))?;
        c.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut answer = String::new();
        c.read_to_string(&mut answer)?;
        Ok(answer)
    };
    assert!(
        common::wait_until(Duration::from_secs(15), || models()
            .is_ok_and(|a| a.starts_with("HTTP/1.1 200"))),
        "the proxy stopped accepting"
    );
}

#[test]
fn check_config_names_each_instances_sources_and_warns_without_values() {
    let base = example_config().join("base.yaml").display().to_string();
    let dev = example_config()
        .join("development.yaml")
        .display()
        .to_string();
    let example = check_config(example_config()).output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&example.stdout),
        String::from_utf8_lossy(&example.stderr),
    );
    assert!(
        stdout.contains(&format!("instance east-us from {base}\n")),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .filter(|l| l.starts_with("  instance "))
            .all(|l| !l.contains(&dev)),
        "development.yaml sets no instance: {stdout}"
    );
    for expected in [
        "warning: instance \"east-us\": its api_key (from",
        "warning: instance \"west-us\": its api_key (from",
    ] {
        assert!(stderr.contains(expected), "{expected:?} in {stderr}");
    }

    // The Python proxy's environment form, run from a checkout: the environment's
    // instance, not the examples beside it.
    let out = check_config(example_config())
        .envs([
            ("API_INSTANCES", "extra"),
            ("API_INSTANCE_EXTRA_API_KEY", "sk-extra-secret-1"),
            ("API_INSTANCE_EXTRA_API_BASE", "https://extra.example.com"),
            ("API_INSTANCE_EXTRA_SUPPORTED_MODELS", "gpt-4o"),
            (
                "API_INSTANCE_EXTRA_PROXY_URL",
                "http://user:pw-secret-2@proxy",
            ),
            ("API_KEY", "sk-single-secret-3"),
            ("API_BASE", "https://single.example.com"),
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("1 instance(s): extra\n"), "{stdout}");
    assert!(
        stdout.contains("instance extra from environment (API_INSTANCES, API_INSTANCE_EXTRA_API_BASE, API_INSTANCE_EXTRA_API_KEY, API_INSTANCE_EXTRA_SUPPORTED_MODELS)"),
        "{stdout}"
    );
    for expected in [
        "warning: the example instance(s) east-us, west-us of the config files (placeholder keys) are left out: API_INSTANCES defines the instances",
        "warning: environment variable API_INSTANCE_EXTRA_PROXY_URL is ignored",
        "warning: API_KEY/API_BASE are ignored: API_INSTANCES defines instances (extra)",
    ] {
        assert!(stderr.contains(expected), "{expected:?} in {stderr}");
    }
    for secret in [
        "sk-extra-secret-1",
        "pw-secret-2",
        "sk-single-secret-3",
        "replace-me",
    ] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{secret}: {stdout}{stderr}"
        );
    }
}

/// A config dir with one instance and `logging` as given.
fn with_logging(logging: &str) -> TempDir {
    let dir = TempDir::new();
    dir.write(
        "base.yaml",
        &format!(
            "logging: {logging}\ninstances:\n  - {{name: a, api_key: k, api_base: 'https://a.example.com', api_version: v, supported_models: [m]}}\n"
        ),
    );
    dir
}

#[test]
fn check_config_opens_the_log_file_and_takes_pythons_level_names() {
    let check = |dir: &TempDir| check_config(&dir.0).output().unwrap();
    let bad = with_logging("{file: /proc/no-such-dir/app.log}");
    let out = check(&bad);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "{}: logging.file: cannot create /proc/no-such-dir",
            bad.0.join("base.yaml").display()
        )),
        "{err}"
    );

    // Relative: from the config directory's parent, as the Python proxy's ../logs/app.log.
    let root = TempDir::new();
    let dir = root.0.join("app/config");
    std::fs::create_dir_all(&dir).unwrap();
    for level in ["WARNING", "CRITICAL", "Info"] {
        std::fs::write(
            dir.join("base.yaml"),
            format!("logging: {{level: {level}, file: ../logs/app.log}}\ninstances:\n  - {{name: a, api_key: k, api_base: 'https://a.example.com', api_version: v, supported_models: [m]}}\n"),
        )
        .unwrap();
        let out = check_config(&dir).output().unwrap();
        assert!(
            out.status.success(),
            "{level}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(root.0.join("logs/app.log").is_file(), "created beside app/");
    let out = check(&with_logging("{level: verbose}"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("logging.level"));
}

#[test]
fn flags_that_cannot_go_together_or_lack_a_value_are_refused() {
    for args in [
        &["--env-only", "--config-dir", "config"][..],
        &["--port", "http"],
        &["--env-file"],
        &["--check-config=yes"],
    ] {
        let out = proxy_cmd().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
    let help = proxy_cmd().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in ["--env-only", "--env-file", "--host", "--port"] {
        assert!(help.contains(flag), "{help}");
    }
}

#[test]
fn env_only_ignores_the_config_directory_in_the_working_directory() {
    let upstream = common::Mock::start(common::azure_like("sk-env-only-1"));
    // Started where `config/` holds the example's instances.
    let mut proxy = Running::start(
        proxy_cmd()
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["--env-only", "--host", "127.0.0.1", "--port", "0"])
            .env("API_KEY", "sk-env-only-1")
            .env("API_BASE", &upstream.url),
    );
    let a = common::post_json(
        &proxy.url("/v1/chat/completions"),
        &serde_json::json!({"model": "gpt-4o", "messages": []}),
    );
    assert_eq!(a.status, 200);
    assert_eq!(a.header("x-proxy-instance"), Some("default"));
    assert_eq!(upstream.count(), 1);
    let log = proxy.stderr();
    assert!(
        log.contains("configuration from environment variables; instances: default from environment (API_KEY/API_BASE)"),
        "{log}"
    );
    assert!(!log.contains("east-us"), "{log}");
}

#[test]
fn a_reload_reads_the_env_file_again_so_a_rotated_key_needs_no_restart() {
    let upstream = common::Mock::start(std::sync::Arc::new(|_: &common::Recorded| {
        common::json_reply(
            200,
            serde_json::json!({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}),
        )
    }));
    let dir = TempDir::new();
    dir.write(
        "base.yaml",
        &format!(
            "host: 127.0.0.1\nport: 0\ninstances:\n  - {{name: a, api_key: '${{KEY}}', api_base: '{}', api_version: v, supported_models: [m]}}\n",
            upstream.url
        ),
    );
    let env_file = dir.0.join("env");
    std::fs::write(&env_file, "# rotated by the operator\nKEY=sk-old-1\n").unwrap();
    let proxy = Running::start(
        proxy_cmd()
            .arg("--config-dir")
            .arg(&dir.0)
            .arg("--env-file")
            .arg(&env_file)
            // The file wins over the process environment.
            .env("KEY", "sk-process-0"),
    );
    let chat = || {
        let a = common::post_json(
            &proxy.url("/v1/chat/completions"),
            &serde_json::json!({"model": "m", "messages": []}),
        );
        assert_eq!(a.status, 200);
        upstream
            .requests()
            .last()
            .unwrap()
            .header("api-key")
            .unwrap()
            .to_string()
    };
    assert_eq!(chat(), "sk-old-1");
    std::fs::write(&env_file, "KEY=\"sk-new-2\"\n").unwrap();
    let reload = send("POST", &proxy.url("/config/reload"), &[], None);
    assert_eq!(reload.status, 200);
    let answer = reload.json();
    assert_eq!(
        answer["env_reread"],
        serde_json::json!([env_file.display().to_string()]),
        "{answer}"
    );
    assert!(!String::from_utf8_lossy(&reload.body).contains("sk-new-2"));
    assert_eq!(chat(), "sk-new-2");

    // A file that cannot be read fails the reload and keeps the running key.
    std::fs::write(&env_file, "not a variable\n").unwrap();
    let failed = send("POST", &proxy.url("/config/reload"), &[], None);
    assert_eq!(failed.status, 400);
    assert!(
        String::from_utf8_lossy(&failed.body).contains(":1 (--env-file)"),
        "{}",
        String::from_utf8_lossy(&failed.body)
    );
    assert_eq!(chat(), "sk-new-2");
}

#[test]
fn check_config_warns_of_instances_whose_api_version_gives_no_stream_usage() {
    let dir = TempDir::new();
    let inst = |name: &str, version: &str| {
        format!("  - {{name: {name}, api_key: k, api_base: 'https://{name}.example.com', api_version: '{version}', supported_models: [m]}}\n")
    };
    dir.write(
        "base.yaml",
        &format!(
            "instances:\n{}{}{}",
            inst("old", "2024-02-01"),
            inst("dated", "2024-10-21"),
            inst("ga", "v1")
        ),
    );
    let out = check_config(&dir.0).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let warned: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("takes no stream_options"))
        .collect();
    assert_eq!(warned.len(), 1, "{err}");
    assert!(
        warned[0].contains("instance \"old\": api_version 2024-02-01"),
        "{err}"
    );
}
