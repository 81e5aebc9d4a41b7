//! The log file survives an outside rotation (logrotate's `create` mode: the file is
//! renamed, then the proxy must write a new one): followed within a second, and at
//! once on SIGHUP.

mod common;
use common::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

const KEY: &str = "upstream-key";

/// The binary with `logging.file` in a directory of the test's own, on one healthy
/// upstream; the directory is removed when the test drops it.
fn logging_proxy(up: &Mock) -> (Running, TempDir, PathBuf) {
    let dir = TempDir::new();
    let log = dir.0.join("logs").join("app.log");
    let proxy = Running::with_config(&format!(
        "logging: {{file: '{}'}}\ninstances:\n{}",
        log.display(),
        azure_instance("a", &up.url, KEY, 1, "supported_models: [m]")
    ));
    (proxy, dir, log)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn chat(proxy: &Running) {
    post_json(
        &proxy.url("/v1/chat/completions"),
        &json!({"model": "m", "messages": []}),
    )
    .assert_status(200);
}

/// The number of access lines for a chat in `text`.
fn chats(text: &str) -> usize {
    text.lines()
        .filter(|l| l.contains("POST /v1/chat/completions") && l.contains("status=200"))
        .count()
}

#[test]
fn a_renamed_log_file_is_followed_by_a_new_one() {
    let up = Mock::start(azure_like(KEY));
    let (mut proxy, _dir, log) = logging_proxy(&up);
    chat(&proxy);
    assert!(wait_until(Duration::from_secs(5), || chats(&read(&log)) == 1));
    let rotated = log.with_extension("log.1");
    std::fs::rename(&log, &rotated).unwrap();
    // Requests go on; within about a second their lines land in a new file.
    let mut sent = 1;
    let followed = wait_until(Duration::from_secs(10), || {
        chat(&proxy);
        sent += 1;
        chats(&read(&log)) > 0
    });
    assert!(followed, "no new log file: {}", proxy.stderr());
    assert!(
        wait_until(Duration::from_secs(5), || chats(&read(&log))
            + chats(&read(&rotated))
            == sent),
        "every line is in one file or the other: {} + {} of {sent}",
        chats(&read(&log)),
        chats(&read(&rotated))
    );
    assert!(!proxy.stderr().contains("log file:"), "{}", proxy.stderr());
}

#[test]
fn sighup_reopens_a_deleted_log_file_at_once() {
    let up = Mock::start(azure_like(KEY));
    let (proxy, _dir, log) = logging_proxy(&up);
    chat(&proxy);
    assert!(wait_until(Duration::from_secs(5), || chats(&read(&log)) == 1));
    std::fs::remove_file(&log).unwrap();
    proxy.signal("HUP");
    // The reload's own line is written after the reopen.
    assert!(
        wait_until(Duration::from_secs(5), || read(&log)
            .contains("SIGHUP: reloaded")),
        "{}",
        read(&log)
    );
    chat(&proxy);
    assert!(wait_until(Duration::from_secs(5), || chats(&read(&log)) == 1));
}
