//! Probes through the binary: `HEAD` wherever `GET` is answered, a CORS preflight
//! (`OPTIONS`) answered without a key, and `server.cors_origins`.

mod common;
use common::*;

const KEY: &str = "sk-probes-1";

fn proxy(extra: &str) -> (Mock, Running) {
    let up = Mock::start(azure_like(KEY));
    let proxy = Running::with_config(&format!(
        "auth: {{api_keys: [client-probe]}}\n{extra}instances:\n  - {{name: east, api_key: {KEY}, api_base: '{}', api_version: 2024-10-21, supported_models: [m]}}\n",
        up.url
    ));
    (up, proxy)
}

/// The answer to `method path` with `headers` on its own connection, and the bytes
/// that followed its head.
fn ask(proxy: &Running, method: &str, path: &str, headers: &[&str]) -> (RawAnswer, usize) {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let got = raw(
        &proxy.addr,
        head.as_bytes(),
        std::time::Duration::from_secs(5),
    );
    let end = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no answer: {:?}", String::from_utf8_lossy(&got)));
    let answer = responses(&got).remove(0);
    (answer, got.len() - end - 4)
}

/// The headers that say what the answer is (not when, nor which request).
fn describing(a: &RawAnswer) -> Vec<(String, String)> {
    let mut h: Vec<_> = a
        .headers
        .iter()
        .filter(|(k, _)| k != "date" && k != "x-proxy-request-id")
        .cloned()
        .collect();
    h.sort();
    h
}

#[test]
fn head_is_answered_wherever_get_is_with_its_headers_and_no_body() {
    let (_up, proxy) = proxy("");
    let key = "Authorization: Bearer client-probe";
    for (path, headers) in [("/health", vec![]), ("/v1/models", vec![key])] {
        let (get, get_rest) = ask(&proxy, "GET", path, &headers);
        let (head, head_rest) = ask(&proxy, "HEAD", path, &headers);
        get.assert_status(200);
        head.assert_status(200);
        assert!(get_rest > 0, "GET {path} has a body");
        assert_eq!(head_rest, 0, "HEAD {path} has none");
        assert_eq!(describing(&head), describing(&get), "HEAD {path}'s headers");
    }
    // Without a key, as GET: 401.
    let (head, rest) = ask(&proxy, "HEAD", "/v1/models", &[]);
    head.assert_status(401);
    assert_eq!(rest, 0);
    // Where only POST is answered, HEAD is not either.
    let (head, _) = ask(&proxy, "HEAD", "/v1/chat/completions", &[key]);
    head.assert_status(405);
}

#[test]
fn a_preflight_gets_204_without_a_key_and_no_cors_headers_by_default() {
    let (up, proxy) = proxy("");
    let (answer, rest) = ask(
        &proxy,
        "OPTIONS",
        "/v1/chat/completions",
        &[
            "Origin: https://app.example",
            "Access-Control-Request-Method: POST",
        ],
    );
    answer.assert_status(204);
    assert_eq!(rest, 0);
    assert_eq!(answer.header("content-length"), None, "204 has no length");
    assert!(
        answer
            .headers
            .iter()
            .all(|(k, _)| !k.starts_with("access-control-")),
        "no CORS headers: {:?}",
        answer.headers
    );
    assert_eq!(up.count(), 0, "nothing reached the upstream");
}

#[test]
fn cors_origins_allow_their_origins_in_preflights_and_answers_and_no_others() {
    let (_up, proxy) = proxy("server: {cors_origins: ['https://app.example']}\n");
    let preflight = |origin: &str| {
        ask(
            &proxy,
            "OPTIONS",
            "/v1/chat/completions",
            &[
                &format!("Origin: {origin}"),
                "Access-Control-Request-Method: POST",
                "Access-Control-Request-Headers: authorization, content-type, x-stainless-os",
            ],
        )
        .0
    };
    let allowed = preflight("https://app.example");
    allowed.assert_status(204);
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert!(allowed
        .header("access-control-allow-methods")
        .is_some_and(|m| m.contains("POST") && m.contains("GET")));
    assert_eq!(
        allowed.header("access-control-allow-headers"),
        Some("authorization, content-type, x-stainless-os")
    );
    assert_eq!(allowed.header("vary"), Some("Origin"));
    assert_eq!(allowed.header("content-length"), None);

    let other = preflight("https://evil.example");
    other.assert_status(204);
    assert_eq!(other.header("access-control-allow-origin"), None);

    // Answers to an allowed origin say so, errors included (so the page can read them).
    let key = "Authorization: Bearer client-probe";
    let (models, _) = ask(
        &proxy,
        "GET",
        "/v1/models",
        &[key, "Origin: https://app.example"],
    );
    models.assert_status(200);
    assert_eq!(
        models.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let (unauthorized, _) = ask(
        &proxy,
        "GET",
        "/v1/models",
        &["Origin: https://app.example"],
    );
    unauthorized.assert_status(401);
    assert_eq!(
        unauthorized.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let (elsewhere, _) = ask(
        &proxy,
        "GET",
        "/v1/models",
        &[key, "Origin: https://evil.example"],
    );
    elsewhere.assert_status(200);
    assert_eq!(elsewhere.header("access-control-allow-origin"), None);
}
