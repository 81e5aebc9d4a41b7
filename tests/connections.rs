//! How the proxy spends its threads and upstream permits (issue 12), through the
//! binary: each connection has a thread, `server.max_connections` bounds them (idle
//! ones give way to new ones), and `server.workers` bounds upstream calls.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const KEY: &str = "sk-connections-1";

fn instance(url: &str) -> String {
    format!(
        "instances:\n  - {{name: east, api_key: {KEY}, api_base: '{url}', api_version: 2024-10-21, supported_models: [m]}}\n"
    )
}

fn chat(proxy: &Running) -> Answer {
    post_json(
        &proxy.url("/v1/chat/completions"),
        &serde_json::json!({"model": "m", "messages": []}),
    )
}

#[test]
fn a_full_server_closes_idle_connections_for_new_ones_and_refuses_when_all_are_busy() {
    // Model `slow` hangs upstream, so its requests keep their connections busy.
    let ok = azure_like(KEY);
    let up = Mock::start(std::sync::Arc::new(move |r: &Recorded| {
        if r.target.contains("/slow/") {
            MockReply::Hang(Duration::from_secs(20))
        } else {
            ok(r)
        }
    }));
    let proxy = Running::with_config(&format!(
        "server: {{max_connections: 4}}\nrouting: {{timeout: 2}}\n{}",
        instance(&up.url).replace("[m]", "[m, slow]")
    ));
    // Four connections that said nothing: the server is full of idle ones.
    let before = proxy.open_fds();
    let mut idle: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(&proxy.addr).unwrap())
        .collect();
    assert!(
        wait_until(Duration::from_secs(5), || proxy.open_fds() >= before + 4),
        "the four were accepted"
    );
    // A new client is served: the connection idle the longest made room.
    assert_eq!(chat(&proxy).status, 200);
    let oldest = &mut idle[0];
    oldest
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    assert!(
        oldest.read_to_end(&mut rest).is_ok(),
        "closed, not left open"
    );
    assert!(rest.is_empty(), "closed without an answer");
    drop(idle);
    assert!(
        wait_until(Duration::from_secs(5), || metric(
            &proxy,
            "client_connections"
        ) <= 1.0),
        "the idle ones are gone (one left: the one asking)"
    );

    // Four connections with a request under way: nothing to give way.
    let before = up.count();
    let busy: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut c = TcpStream::connect(&proxy.addr).unwrap();
            let body = br#"{"model":"slow","messages":[]}"#;
            let head = format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            c.write_all(head.as_bytes()).unwrap();
            c.write_all(body).unwrap();
            c
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(10), || up.count() == before + 4),
        "the four requests reached the upstream"
    );
    let got = raw(
        &proxy.addr,
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    let answer = responses(&got).remove(0);
    assert_eq!(answer.status, 503);
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert_eq!(answer.openai_error()["code"], "server_busy");
    // Once their upstream calls time out (2 s), the busy ones are done.
    drop(busy);
    let models = || {
        let got = raw(
            &proxy.addr,
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        );
        responses(&got).first().is_some_and(|a| a.status == 200)
    };
    assert!(
        wait_until(Duration::from_secs(10), models),
        "served again once the busy ones left"
    );
}

#[test]
fn upstream_calls_beyond_server_workers_wait_then_get_503_with_retry_after() {
    // The upstream holds each request for 3 s: one permit is taken for that long.
    let up = Mock::start(std::sync::Arc::new(|_: &Recorded| {
        MockReply::Hang(Duration::from_secs(3))
    }));
    let proxy = Running::with_config(&format!(
        "server: {{workers: 1}}\nrouting: {{queue_timeout: 0.3, timeout: 2}}\n{}",
        instance(&up.url)
    ));
    let url = proxy.url("/v1/chat/completions");
    let holder = std::thread::spawn(move || {
        post_json(&url, &serde_json::json!({"model": "m", "messages": []})).status
    });
    assert!(wait_until(Duration::from_secs(5), || up.count() == 1));
    let busy = chat(&proxy);
    assert_eq!(busy.status, 503);
    assert_eq!(busy.header("retry-after"), Some("1"));
    assert_eq!(busy.openai_error()["code"], "server_busy");
    assert_eq!(
        up.count(),
        1,
        "the second request never reached the upstream"
    );
    assert_eq!(holder.join().unwrap(), 504, "the first timed out upstream");
}
