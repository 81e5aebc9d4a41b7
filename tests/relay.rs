//! Non-streamed answers through the real server: relayed to the client as they arrive
//! (never held whole), their usage and Responses API id read on the way, the instance's
//! key masked across reads; the total deadline of an answer's body; upstream calls whose
//! clients left ending within a second; coded answers passed on with their coding.

mod common;

use common::*;
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEY: &str = "sk-relay-test-key-0123456789";
const MASK: &str = "***redacted***";

/// Opened by the test once the client has the start of an answer; the upstream sends
/// the rest only then.
#[derive(Clone, Default)]
struct Gate(Arc<AtomicBool>);

impl Gate {
    fn open(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    fn wait(&self) -> bool {
        wait_until(Duration::from_secs(5), || self.0.load(Ordering::SeqCst))
    }
}

/// `bytes` as one chunk of a chunked body.
fn chunk(bytes: &[u8]) -> Vec<u8> {
    [format!("{:x}\r\n", bytes.len()).as_bytes(), bytes, b"\r\n"].concat()
}

/// An answer whose body is sent in two parts: the second only once `gate` opens (else
/// the connection closes without it). With `chunked`, the body is chunked; else it has
/// its Content-Length.
fn in_two_parts(status: u16, body: &[u8], split: usize, chunked: bool, gate: &Gate) -> MockReply {
    let (first, rest) = body.split_at(split);
    let (head, first, rest) = if chunked {
        (
            format!("HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"),
            chunk(first),
            [chunk(rest), b"0\r\n\r\n".to_vec()].concat(),
        )
    } else {
        (
            format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            ),
            first.to_vec(),
            rest.to_vec(),
        )
    };
    let gate = gate.clone();
    MockReply::Script(Box::new(move |out: &mut TcpStream| {
        let _ = out.write_all(&[head.as_bytes(), &first].concat());
        if gate.wait() {
            let _ = out.write_all(&rest);
        }
    }))
}

fn instance(name: &str, url: &str, models: &str) -> String {
    format!(
        "  - {{name: {name}, api_key: {KEY}, api_base: '{url}', api_version: 2025-04-01-preview, supported_models: [{models}]}}\n"
    )
}

/// Posts `body` to `path`, reads the first KiB of the answer, opens `gate`, and reads
/// the rest: the status, the headers and the whole body.
fn read_in_two_parts(
    proxy: &TestProxy,
    path: &str,
    body: &serde_json::Value,
    gate: &Gate,
) -> Answer {
    let mut resp = client()
        .post(format!("{}{path}", proxy.url))
        .header("content-type", "application/json")
        .send(body.to_string())
        .unwrap();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let mut reader = resp.body_mut().with_config().limit(u64::MAX).reader();
    let mut start = vec![0; 1024];
    let read = reader.read_exact(&mut start);
    gate.open();
    read.expect("the start of the answer before the upstream sent the rest");
    reader.read_to_end(&mut start).unwrap();
    Answer {
        status: resp.status().as_u16(),
        headers,
        body: start,
    }
}

/// The value of the `/metrics` sample written exactly as `sample` (name and labels).
fn metric(proxy: &TestProxy, sample: &str) -> Option<f64> {
    let text =
        String::from_utf8(send("GET", &format!("{}/metrics", proxy.url), &[], None).body).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
}

fn embeddings(values: usize, usage_first: bool) -> Vec<u8> {
    let usage = json!({"prompt_tokens": 7, "total_tokens": 7});
    let data = json!([{"object": "embedding", "index": 0, "embedding": vec![0.5; values]}]);
    let body = if usage_first {
        json!({"usage": usage, "object": "list", "data": data, "model": "m"})
    } else {
        json!({"object": "list", "data": data, "model": "m", "usage": usage})
    };
    serde_json::to_vec(&body).unwrap()
}

#[test]
fn a_large_answer_reaches_the_client_as_it_arrives_with_its_framing_and_usage() {
    for chunked in [false, true] {
        let body = embeddings(50_000, chunked);
        let gate = Gate::default();
        let (b, g) = (body.clone(), gate.clone());
        let mock = Mock::start(Arc::new(move |_: &Recorded| {
            in_two_parts(200, &b, b.len() / 2, chunked, &g)
        }));
        let proxy = TestProxy::start(&format!("instances:\n{}", instance("a", &mock.url, "m")));
        let answer = read_in_two_parts(
            &proxy,
            "/v1/embeddings",
            &json!({"model": "m", "input": "x"}),
            &gate,
        );
        answer.assert_status(200);
        assert!(
            answer.body == body,
            "the body passes unchanged (chunked: {chunked})"
        );
        if chunked {
            assert_eq!(answer.header("transfer-encoding"), Some("chunked"));
        } else {
            assert_eq!(
                answer.header("content-length"),
                Some(body.len().to_string().as_str())
            );
        }
        assert_eq!(answer.header("x-proxy-instance"), Some("a"));
        let prompt = r#"aoai_proxy_tokens_total{instance="a",kind="prompt"}"#;
        assert!(
            wait_until(Duration::from_secs(5), || metric(&proxy, prompt)
                == Some(7.0)),
            "usage read on the way (chunked: {chunked}): {:?}",
            metric(&proxy, prompt)
        );
    }
}

#[test]
fn a_relayed_responses_answer_is_remembered_by_its_top_level_id() {
    let gate = Gate::default();
    let text = "x".repeat(100_000);
    let made = serde_json::to_vec(&json!({
        "object": "response",
        "output": [{"type": "message", "id": "msg_inner", "content": [{"type": "output_text", "text": text}]}],
        "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5},
        "id": "resp_relayed"
    }))
    .unwrap();
    let behaviour = |gate: Gate, made: Vec<u8>| -> Behaviour {
        Arc::new(move |req: &Recorded| {
            if req.json()["previous_response_id"].is_string() {
                json_reply(
                    200,
                    json!({"id": "resp_next", "object": "response", "output": []}),
                )
            } else {
                in_two_parts(200, &made, 50_000, false, &gate)
            }
        })
    };
    let a = Mock::start(behaviour(gate.clone(), made.clone()));
    let b = Mock::start(behaviour(gate.clone(), made));
    let proxy = TestProxy::start(&format!(
        "instances:\n{}{}",
        instance("a", &a.url, "m"),
        instance("b", &b.url, "m")
    ));
    let first = read_in_two_parts(
        &proxy,
        "/v1/responses",
        &json!({"model": "m", "input": "hi"}),
        &gate,
    );
    first.assert_status(200);
    let made_on = first.header("x-proxy-instance").unwrap().to_string();
    // Two instances serve `m`: only a remembered id lets the follow-up through.
    let next = post_json(
        &format!("{}/v1/responses", proxy.url),
        &json!({"model": "m", "input": "more", "previous_response_id": "resp_relayed"}),
    );
    next.assert_status(200);
    assert_eq!(next.header("x-proxy-instance"), Some(made_on.as_str()));
}

#[test]
fn a_key_echoed_in_a_relayed_error_is_masked_where_two_reads_cut_it() {
    let gate = Gate::default();
    let message = format!("{} the key {KEY} was refused", "pad ".repeat(20_000));
    let body = serde_json::to_vec(&json!({"error": {"message": message, "code": "bad"}})).unwrap();
    // The upstream's first part ends in the middle of the key.
    let split = body
        .windows(KEY.len())
        .position(|w| w == KEY.as_bytes())
        .unwrap()
        + KEY.len() / 2;
    let (b, g) = (body.clone(), gate.clone());
    let mock = Mock::start(Arc::new(move |_: &Recorded| {
        in_two_parts(400, &b, split, false, &g)
    }));
    let proxy = TestProxy::start(&format!("instances:\n{}", instance("a", &mock.url, "m")));
    let answer = read_in_two_parts(
        &proxy,
        "/v1/chat/completions",
        &json!({"model": "m", "messages": []}),
        &gate,
    );
    answer.assert_status(400);
    let expected = String::from_utf8(body).unwrap().replace(KEY, MASK);
    assert_eq!(String::from_utf8(answer.body).unwrap(), expected);
}

/// An answer's head, then `first` bytes of its body at once, then one byte every
/// `every` until `length` bytes were sent or the proxy hung up.
fn trickle(length: usize, first: usize, every: Duration) -> MockReply {
    MockReply::Script(Box::new(move |out: &mut TcpStream| {
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n\r\n"
        );
        if out
            .write_all(&[head.as_bytes(), &vec![b' '; first]].concat())
            .is_err()
        {
            return;
        }
        for _ in first..length {
            std::thread::sleep(every);
            if out.write_all(b" ").is_err() {
                return;
            }
        }
    }))
}

#[test]
fn a_trickled_body_ends_at_its_total_deadline() {
    // Read whole (small), then relayed (large): each ends one `routing.timeout` after
    // its head, though no gap between its bytes is that long.
    for (length, first) in [(100, 0), (200_000, 100_000)] {
        let mock = Mock::start(Arc::new(move |_: &Recorded| {
            trickle(length, first, Duration::from_millis(300))
        }));
        let proxy = TestProxy::start(&format!(
            "routing: {{timeout: 1, retries: 0}}\ninstances:\n{}",
            instance("a", &mock.url, "m")
        ));
        let started = Instant::now();
        let resp = client()
            .post(format!("{}/v1/embeddings", proxy.url))
            .header("content-type", "application/json")
            .send(json!({"model": "m", "input": "x"}).to_string());
        let ended = match resp {
            Ok(r) if r.status() == 504 => true,
            Ok(mut r) => r
                .body_mut()
                .with_config()
                .limit(u64::MAX)
                .read_to_vec()
                .is_err(),
            Err(_) => true,
        };
        assert!(ended, "the answer of {length} bytes was cut short");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "ended after {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn upstream_calls_whose_clients_left_give_their_permits_back_within_a_second() {
    let trickling = Mock::start(Arc::new(|_: &Recorded| {
        trickle(100, 0, Duration::from_secs(2))
    }));
    let hanging = Mock::start(Arc::new(|_: &Recorded| {
        MockReply::Hang(Duration::from_secs(60))
    }));
    let fast = Mock::start(azure_like(KEY));
    let proxy = TestProxy::start(&format!(
        "server: {{workers: 16}}\nrouting: {{queue_timeout: 0.5}}\ninstances:\n{}{}{}",
        instance("trickling", &trickling.url, "m-trickle"),
        instance("hanging", &hanging.url, "m-hang"),
        instance("fast", &fast.url, "m-fast"),
    ));
    let addr = proxy.url.trim_start_matches("http://").to_string();
    let clients: Vec<TcpStream> = (0..16)
        .map(|i| {
            let model = if i % 2 == 0 { "m-trickle" } else { "m-hang" };
            let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}).to_string();
            let mut c = TcpStream::connect(&addr).unwrap();
            write!(
                c,
                "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            c
        })
        .collect();
    let in_use = r#"aoai_proxy_upstream_permits_in_use"#;
    assert!(
        wait_until(Duration::from_secs(10), || trickling.count() == 8
            && hanging.count() == 8
            && metric(&proxy, in_use) == Some(16.0)),
        "every permit taken: {:?}",
        metric(&proxy, in_use)
    );
    let busy = post_json(
        &format!("{}/v1/chat/completions", proxy.url),
        &json!({"model": "m-fast", "messages": []}),
    );
    assert_eq!(
        busy.status, 503,
        "no permit left while the calls are under way"
    );
    drop(clients);
    let left = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || metric(&proxy, in_use)
            == Some(0.0)),
        "permits still held: {:?}",
        metric(&proxy, in_use)
    );
    assert!(
        left.elapsed() < Duration::from_secs(3),
        "permits came back after {:?}",
        left.elapsed()
    );
    let served = post_json(
        &format!("{}/v1/chat/completions", proxy.url),
        &json!({"model": "m-fast", "messages": []}),
    );
    served.assert_status(200);
    // Leaving was the clients' doing: neither instance is blamed.
    let errors = r#"aoai_proxy_upstream_errors_total{instance="hanging""#;
    let text =
        String::from_utf8(send("GET", &format!("{}/metrics", proxy.url), &[], None).body).unwrap();
    assert!(!text.contains(errors), "{text}");
}

/// `{"id":"chatcmpl-gz","object":"chat.completion","usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}`, gzipped.
const GZIPPED: &str = "1f8b080000000000020345ca310e80201005d1bbfc1a4d2cb4e0320691208a2c91b5917077290cb66f26c3ad90d09b627d46dfd90702b4ec46f3c7bda61a0c3b0a35dd4959039911afca3c331d2624c851e0ff9a0e024cac7c83a99417928278ad72000000";

#[test]
fn an_upstream_is_asked_for_no_coding_and_a_coded_answer_keeps_its_label() {
    let gzipped: Vec<u8> = (0..GZIPPED.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&GZIPPED[i..i + 2], 16).unwrap())
        .collect();
    let g = gzipped.clone();
    let mock = Mock::start(Arc::new(move |_: &Recorded| {
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\ncontent-length: {}\r\n\r\n",
            g.len()
        );
        let answer = [head.as_bytes(), &g].concat();
        MockReply::Script(Box::new(move |out: &mut TcpStream| {
            let _ = out.write_all(&answer);
        }))
    }));
    let proxy = TestProxy::start(&format!("instances:\n{}", instance("a", &mock.url, "m")));
    let answer = send(
        "POST",
        &format!("{}/v1/chat/completions", proxy.url),
        &[
            ("content-type", "application/json"),
            ("accept-encoding", "gzip, br"),
        ],
        Some(json!({"model": "m", "messages": []}).to_string().as_bytes()),
    );
    answer.assert_status(200);
    assert_eq!(answer.header("content-encoding"), Some("gzip"));
    assert!(answer.body == gzipped, "the coded bytes pass unchanged");
    let asked = mock.requests();
    assert_eq!(asked[0].header("accept-encoding"), Some("identity"));
}

#[test]
fn a_relay_that_breaks_leaves_the_clients_body_unfinished() {
    let body = embeddings(20_000, false);
    let half = body[..body.len() / 2].to_vec();
    // No Content-Length: the client's body is chunked, and only its last chunk could
    // tell a whole answer from a broken one.
    let mock = Mock::start(Arc::new(move |_: &Recorded| {
        let first = half.clone();
        MockReply::Script(Box::new(move |out: &mut TcpStream| {
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
            let _ = out.write_all(&[head.as_bytes(), &chunk(&first)].concat());
        }))
    }));
    let proxy = TestProxy::start(&format!("instances:\n{}", instance("a", &mock.url, "m")));
    let mut resp = client()
        .post(format!("{}/v1/embeddings", proxy.url))
        .header("content-type", "application/json")
        .send(json!({"model": "m", "input": "x"}).to_string())
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut got = Vec::new();
    let read = resp
        .body_mut()
        .with_config()
        .limit(u64::MAX)
        .reader()
        .read_to_end(&mut got);
    assert!(
        read.is_err(),
        "a broken relay must not end like a whole body ({} bytes read)",
        got.len()
    );
}
