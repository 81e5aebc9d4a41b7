//! Hostile and buggy clients, through the real binary: each attack fails
//! alone, with an OpenAI-shaped answer where one can be given, and leaves the process,
//! its threads, descriptors, memory, instances and logs as they were.

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEY: &str = "sk-hostile-upstream-1234";
const SECRET: &str = "sk-pasted-by-mistake-5678";

fn instance(url: &str, extra: &str) -> String {
    format!(
        "instances:\n  - {{name: east, api_key: {KEY}, api_base: '{url}', api_version: 2024-10-21, supported_models: [m]{extra}}}\n"
    )
}

fn chat(proxy: &Running, headers: &[(&str, &str)]) -> Answer {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    send(
        "POST",
        &proxy.url("/v1/chat/completions"),
        &all,
        Some(br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#),
    )
}

fn one_answer(bytes: &[u8], what: &str) -> RawAnswer {
    let mut answers = responses(bytes);
    assert_eq!(
        answers.len(),
        1,
        "{what}: {:?}",
        String::from_utf8_lossy(bytes)
    );
    answers.remove(0)
}

/// Reads exactly one response (framed by Content-Length) off a kept-alive connection.
fn read_response(c: &mut TcpStream) -> RawAnswer {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let answers = responses(&got);
        if let Some(a) = answers.first() {
            let length: usize = a.header("content-length").unwrap().parse().unwrap();
            if a.body.len() == length {
                return answers.into_iter().next().unwrap();
            }
        }
        let n = c.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "closed mid-response: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
}

/// Item 1. Upstream tiny_http drained an unread body into a buffer of its declared
/// size: every early answer to a 100 TB declaration aborted the process.
#[test]
fn a_huge_declared_body_is_answered_without_being_allocated() {
    let up = Mock::start(azure_like(KEY));
    let mut proxy = Running::with_config(&format!(
        "auth: {{api_keys: [client-key]}}\n{}",
        instance(&up.url, "")
    ));
    let auth = "Authorization: Bearer client-key\r\n";
    for (method, path, auth, status) in [
        ("POST", "/v1/chat/completions", auth, 413),
        ("POST", "/v1/chat/completions", "", 401),
        ("POST", "/nothing-here", auth, 404),
        ("PUT", "/v1/chat/completions", auth, 405),
    ] {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 100000000000000\r\n\r\n{{\""
        );
        let got = raw(&proxy.addr, head.as_bytes(), Duration::from_secs(10));
        let answer = one_answer(&got, path);
        assert_eq!(answer.status, status, "{method} {path}");
        answer.openai_error();
        assert_eq!(
            answer.header("connection"),
            Some("close"),
            "the unread body is not drained"
        );
        proxy.assert_alive();
    }
    assert_eq!(
        chat(&proxy, &[("authorization", "Bearer client-key")]).status,
        200
    );
}

/// Item 2. The 505 answer waited for the request's own writer, which it still held:
/// each such connection kept a thread and two descriptors for ever.
#[test]
fn http2_request_lines_get_505_and_give_back_their_thread_and_descriptors() {
    let up = Mock::start(azure_like(KEY));
    let mut proxy = Running::with_config(&instance(&up.url, ""));
    let (fds, threads) = (proxy.open_fds(), proxy.status_field("Threads"));
    let mut conns: Vec<TcpStream> = (0..300)
        .map(|_| {
            let mut c = TcpStream::connect(&proxy.addr).unwrap();
            c.write_all(b"GET /health HTTP/2.0\r\n\r\n").unwrap();
            c
        })
        .collect();
    for c in &mut conns {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        let _ = c.read_to_end(&mut got);
        let answer = one_answer(&got, "HTTP/2.0");
        assert_eq!(answer.status, 505);
        answer.openai_error();
    }
    drop(conns);
    assert!(
        wait_until(Duration::from_secs(10), || proxy.open_fds() <= fds
            && proxy.status_field("Threads") <= threads),
        "descriptors {} (were {fds}), threads {} (were {threads})",
        proxy.open_fds(),
        proxy.status_field("Threads")
    );
    proxy.assert_alive();
    assert_eq!(chat(&proxy, &[]).status, 200);
}

/// Item 3. A header value that ureq refuses to send was counted as the instance's
/// failure: three such requests opened every circuit.
#[test]
fn control_bytes_in_a_header_are_the_clients_error_not_the_instances() {
    let up = Mock::start(azure_like(KEY));
    let proxy = Running::with_config(&instance(&up.url, ""));
    let body = br#"{"model":"m","messages":[]}"#;
    for value in [&b"a\x01b"[..], b"\x00", b"\x7f", b"a\x01b", b"\x00"] {
        let mut req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-A: ",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(value);
        req.extend_from_slice(b"\r\n\r\n");
        req.extend_from_slice(body);
        let got = raw(&proxy.addr, &req, Duration::from_secs(10));
        let answer = one_answer(&got, &format!("{value:?}"));
        assert_eq!(answer.status, 400, "{value:?}");
        answer.openai_error();
    }
    // A header too long for the upstream request's head (it may be up to 16 KiB here)
    // is refused too: ureq cannot send it, and that failed the instance.
    for _ in 0..4 {
        let long = "a".repeat(10_000);
        let answer = chat(&proxy, &[("x-long", &long)]);
        assert_eq!(answer.status, 431);
        answer.openai_error();
    }
    assert_eq!(up.count(), 0, "nothing reached the instance");
    let health = send("GET", &proxy.url("/health"), &[], None);
    assert_eq!(health.status, 200);
    let instances = send("GET", &proxy.url("/stats/instances"), &[], None).json();
    assert_eq!(instances["instances"][0]["status"], "healthy");
    assert_eq!(instances["instances"][0]["error_count"], 0);
    assert_eq!(chat(&proxy, &[]).status, 200);
}

/// Item 4. One request with `max_tokens: 10^15` reserved a whole idle window for a
/// minute: everyone else got 429.
#[test]
fn a_request_larger_than_every_window_gets_400_and_reserves_nothing() {
    let up = Mock::start(azure_like(KEY));
    let proxy = Running::with_config(&instance(&up.url, ", max_tpm: 1000"));
    let huge = post_json(
        &proxy.url("/v1/chat/completions"),
        &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 1_000_000_000_000_000u64}),
    );
    huge.assert_status(400);
    let message = huge.openai_error()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("1000000000000008") && message.contains("1000"),
        "names the estimate and the limit: {message}"
    );
    assert_eq!(up.count(), 0);
    assert_eq!(chat(&proxy, &[]).status, 200, "the window is still free");
}

/// Item 4, from review: an instance without `max_tpm` admits any estimate, so its
/// window must take a saturated one (it overflowed, and every later request got 500).
#[test]
fn absurd_estimates_on_an_instance_without_a_limit_break_nothing() {
    let up = Mock::start(azure_like(KEY));
    let proxy = Running::with_config(&instance(&up.url, ""));
    for _ in 0..3 {
        let a = post_json(
            &proxy.url("/v1/chat/completions"),
            &json!({"model": "m", "messages": [], "max_tokens": 1e300, "n": 1e300}),
        );
        a.assert_status(200);
    }
    assert_eq!(chat(&proxy, &[]).status, 200);
    let instances = send("GET", &proxy.url("/stats/instances"), &[], None).json();
    assert_eq!(instances["instances"][0]["current_tpm"], json!(u64::MAX));
}

/// Item 5. RFC 9112 §6: a Content-Length that is not a plain number, two that
/// disagree, or one next to Transfer-Encoding make the body's end ambiguous.
#[test]
fn ambiguous_framing_gets_400_and_the_connection_closed() {
    let up = Mock::start(azure_like(KEY));
    let proxy = Running::with_config(&instance(&up.url, ""));
    let smuggled = "GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
    for framing in [
        "Content-Length: abc\r\n",
        "Content-Length: -1\r\n",
        "Content-Length: 1e3\r\n",
        "Content-Length: +34\r\n",
        "Content-Length: 34\r\nContent-Length: 35\r\n",
        "Content-Length: 34, 34\r\n",
        "Content-Length: 34\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 34\r\n",
        "Transfer-Encoding: gzip\r\n",
        "Transfer-Encoding: chunked, gzip\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: \r\nContent-Length: 34\r\n",
        "Transfer-Encoding: ,\r\nContent-Length: 34\r\n",
    ] {
        let req = format!("POST /v1/models HTTP/1.1\r\nHost: x\r\n{framing}\r\n{smuggled}");
        let got = raw(&proxy.addr, req.as_bytes(), Duration::from_secs(10));
        let answer = one_answer(&got, framing);
        assert!(
            matches!(answer.status, 400 | 501),
            "{framing:?}: {}",
            answer.status
        );
        answer.openai_error();
        assert_eq!(answer.header("connection"), Some("close"), "{framing:?}");
    }
    // A chunk size is hex digits, then only spaces before an extension.
    let chunked = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1b 9\r\n{\"model\":\"m\",\"messages\":[]}\r\n0\r\n\r\n";
    let got = raw(&proxy.addr, chunked.as_bytes(), Duration::from_secs(10));
    let answer = one_answer(&got, "chunk size 1b 9");
    assert_eq!(answer.status, 400);
    answer.openai_error();
    assert_eq!(up.count(), 0);
    assert_eq!(
        send("GET", &proxy.url("/health"), &[], None).status,
        200,
        "still serving"
    );
}

/// Item 6. A 26 MB body of empty messages became a vector of 9 million entries (and
/// a second document when the body was edited for the upstream).
#[test]
fn four_maximum_size_bodies_at_once_stay_under_512_mb() {
    let up = Mock::start(Arc::new(|_: &Recorded| MockReply::Sse {
        first_after: Duration::ZERO,
        events: chat_events("d", &["ok"], false),
        gap: Duration::ZERO,
        end: SseEnd::Done,
    }));
    let proxy = Running::with_config(&instance(&up.url, ""));
    let (head, tail) = (
        &br#"{"model":"m","stream":true,"messages":["#[..],
        &b"{}]}"[..],
    );
    let n = ((32 << 20) - head.len() - tail.len()) / 3;
    let mut body = head.to_vec();
    body.extend(b"{},".repeat(n));
    body.extend_from_slice(tail);
    let body = Arc::new(body);
    let url = proxy.url("/v1/chat/completions");
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (body, url) = (body.clone(), url.clone());
            std::thread::spawn(move || send("POST", &url, &[], Some(&body)))
        })
        .collect();
    for c in clients {
        let answer = c.join().unwrap();
        answer.assert_status(200);
        assert!(String::from_utf8_lossy(&answer.body).contains("[DONE]"));
    }
    let peak_mb = proxy.status_field("VmHWM") / 1024;
    assert!(peak_mb < 512, "peak RSS {peak_mb} MB");
}

/// Sends a head declaring a 1 MiB body and 900 KiB of it, then holds the connection.
fn hold_a_big_body(addr: &str) -> TcpStream {
    let mut c = TcpStream::connect(addr).unwrap();
    let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n";
    c.write_all(head.as_bytes()).unwrap();
    c.write_all(&vec![b' '; 900 * 1024]).unwrap();
    c
}

/// Item 6, from review: each body stayed within `max_body_bytes`, but nothing bounded
/// them together: two dozen clients holding 31 MiB bodies took 773 MB.
#[test]
fn request_bodies_share_one_memory_budget() {
    let up = Mock::start(azure_like(KEY));
    let proxy = Running::with_config(&format!(
        "server: {{max_body_bytes: 1MiB, max_body_memory: 2.5MiB, body_timeout: 20}}\n{}",
        instance(&up.url, "")
    ));
    let held = [hold_a_big_body(&proxy.addr), hold_a_big_body(&proxy.addr)];
    assert!(
        wait_until(Duration::from_secs(10), || metric(
            &proxy,
            "request_body_bytes_held"
        ) >= 2.0 * 900.0 * 1024.0),
        "{}",
        metric(&proxy, "request_body_bytes_held")
    );
    let mut third = hold_a_big_body(&proxy.addr);
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    let _ = third.read_to_end(&mut got);
    let answer = one_answer(&got, "the third body");
    assert_eq!(answer.status, 503);
    assert_eq!(answer.openai_error()["code"], "server_busy");
    drop(held);
    assert!(
        wait_until(Duration::from_secs(10), || metric(
            &proxy,
            "request_body_bytes_held"
        ) == 0.0),
        "the held bodies were given back"
    );
    assert_eq!(chat(&proxy, &[]).status, 200);
}

/// A client socket with a 4 KiB receive buffer, so that it stops taking data soon
/// after it stops reading.
fn small_window_client(addr: &str) -> TcpStream {
    let addr: SocketAddr = addr.parse().unwrap();
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&addr.into()).unwrap();
    socket.into()
}

/// An upstream whose streams are 2,000 events of 8 kB, 1 ms apart: 16 MB, more than
/// the kernel's socket buffers can take for a client that stopped reading.
fn big_stream() -> Mock {
    let word: &'static str = Box::leak("x".repeat(8000).into_boxed_str());
    let words = vec![word; 2000];
    let plain = azure_like(KEY);
    Mock::start(Arc::new(move |r: &Recorded| {
        if r.json()["stream"] != json!(true) {
            return plain(r);
        }
        MockReply::Sse {
            first_after: Duration::ZERO,
            events: chat_events("d", &words, false),
            gap: Duration::from_millis(1),
            end: SseEnd::Done,
        }
    }))
}

fn start_stream(c: &mut TcpStream) {
    let body = br#"{"model":"m","stream":true,"messages":[]}"#;
    c.write_all(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    c.write_all(body).unwrap();
}

/// Item 7, from review: a stream to a client that reads a few bytes at a time held
/// its permit for as long as the client took.
#[test]
fn a_client_that_reads_a_stream_slowly_gives_its_permit_back() {
    let up = big_stream();
    let mut proxy = Running::with_config(&format!(
        "server: {{workers: 1, client_timeout: 1}}\nrouting: {{queue_timeout: 0.2}}\n{}",
        instance(&up.url, "")
    ));
    let mut slow = small_window_client(&proxy.addr);
    start_stream(&mut slow);
    // The stream holds the only permit before anyone else asks: otherwise a chat could
    // be served first, and the wait below would prove nothing.
    assert!(
        wait_until(Duration::from_secs(10), || up.count() == 1),
        "the stream never reached the upstream"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            slow.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut buf = [0u8; 100];
            while !stop.load(Ordering::SeqCst) {
                let _ = slow.read(&mut buf);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    // Meanwhile the only permit is taken, and other requests get 503.
    assert!(
        wait_until(Duration::from_secs(15), || chat(&proxy, &[]).status == 200),
        "the slow reader kept the permit"
    );
    // The stream was cut, not finished (its permit came back at its end, so its log
    // line follows; a loaded machine may take its time to write it).
    assert!(
        wait_until(Duration::from_secs(15), || proxy
            .stderr()
            .contains("stream=client_gone")),
        "{}",
        proxy.stderr()
    );
    stop.store(true, Ordering::SeqCst);
    reader.join().unwrap();
}

/// Item 10, from review: a cut waited for each stream's blocked writer, and then
/// blocked on its own write: clients that stopped reading delayed the exit by
/// `client_timeout` each.
#[test]
fn shutdown_does_not_wait_on_clients_that_stopped_reading() {
    let up = big_stream();
    let mut proxy = Running::with_config(&format!(
        "server: {{shutdown_grace_seconds: 1, client_timeout: 10}}\n{}",
        instance(&up.url, "")
    ));
    let stalled: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut c = small_window_client(&proxy.addr);
            start_stream(&mut c);
            let mut first = [0u8; 64];
            assert!(c.read(&mut first).unwrap() > 0);
            c
        })
        .collect();
    proxy.signal("TERM");
    let started = Instant::now();
    let status = proxy
        .exit_within(Duration::from_secs(8))
        .expect("did not exit");
    assert_eq!(status.code(), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "exited after {:?}",
        started.elapsed()
    );
    drop(stalled);
}

/// Starts a thread that sends a request head declaring a large body, then one body
/// byte every 100 ms until `stop`. Returns the connection's answer when it ends.
fn trickle(
    addr: &str,
    auth: &'static str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<u8>> {
    let mut c = TcpStream::connect(addr).unwrap();
    std::thread::spawn(move || {
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 100000\r\n\r\n"
        );
        c.write_all(head.as_bytes()).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !stop.load(Ordering::SeqCst) {
            match c.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
            if c.write_all(b" ").is_err() {
                break;
            }
        }
        got
    })
}

/// Item 7. A body trickling in held one of `server.workers` for as long as it
/// trickled, and a 401 waited for the whole body.
#[test]
fn slow_bodies_hold_no_permit_and_early_answers_do_not_wait_for_them() {
    let up = Mock::start(azure_like(KEY));
    let proxy = Running::with_config(&format!(
        "server: {{workers: 2, client_timeout: 10, body_timeout: 2}}\nauth: {{api_keys: [client-key]}}\n{}",
        instance(&up.url, "")
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let auth = "Authorization: Bearer client-key\r\n";
    let authorised: Vec<_> = (0..4)
        .map(|_| trickle(&proxy.addr, auth, stop.clone()))
        .collect();
    let anonymous: Vec<_> = (0..4)
        .map(|_| trickle(&proxy.addr, "", stop.clone()))
        .collect();
    // More bodies trickle in than there are permits; normal requests are still served.
    let quick: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(3)))
        .build()
        .into();
    for _ in 0..5 {
        let answer = quick
            .post(proxy.url("/v1/chat/completions"))
            .header("authorization", "Bearer client-key")
            .header("content-type", "application/json")
            .send(r#"{"model":"m","messages":[]}"#)
            .expect("a normal request was not served");
        assert_eq!(answer.status(), 200);
    }
    // The anonymous ones got their 401 without sending their bodies.
    for t in anonymous {
        let got = t.join().unwrap();
        let answer = one_answer(&got, "anonymous");
        assert_eq!(answer.status, 401);
        answer.openai_error();
    }
    // The authorised ones ran out of `body_timeout`: 408, connection closed.
    for t in authorised {
        let got = t.join().unwrap();
        let answer = one_answer(&got, "trickle");
        assert_eq!(answer.status, 408);
        answer.openai_error();
    }
    stop.store(true, Ordering::SeqCst);
    // A connection that goes silent after its head is dropped after `body_timeout`.
    let mut silent = TcpStream::connect(&proxy.addr).unwrap();
    silent
        .write_all(format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 1000\r\n\r\n").as_bytes())
        .unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(8)))
        .unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let _ = silent.read_to_end(&mut got);
    assert_eq!(one_answer(&got, "silent").status, 408);
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "held for {:?}",
        started.elapsed()
    );
}

/// Item 8. Client values (a model name, a path) reached the log as they were: a
/// newline forged an ERROR line, `%00` wrote NUL, 400 kB wrote a 400 kB line.
#[test]
fn client_values_in_the_log_are_escaped_and_cut() {
    let up = Mock::start(azure_like(KEY));
    let logs = TempDir::new();
    let file = logs.0.join("app.log");
    let mut proxy = Running::with_config(&format!(
        "logging: {{file: '{}'}}\n{}",
        file.display(),
        instance(&up.url, "")
    ));
    let chat_url = proxy.url("/v1/chat/completions");
    let forged = "gpt-4o\n12:00:00 [ERROR] FORGED";
    assert_eq!(post_json(&chat_url, &json!({"model": forged})).status, 404);
    let nul = send(
        "POST",
        &proxy.url("/openai/deployments/a%00b/chat/completions"),
        &[],
        Some(b"{}"),
    );
    assert_eq!(nul.status, 404);
    let long = "x".repeat(400_000);
    // Refused as too long (it was a 404 before model names were bounded); its access
    // line still names it, cut.
    assert_eq!(post_json(&chat_url, &json!({"model": long})).status, 400);
    let read = || std::fs::read(&file).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(10), || String::from_utf8_lossy(&read())
            .contains("request=3 ")),
        "{}",
        String::from_utf8_lossy(&read())
    );
    for (what, text) in [
        ("log file", read()),
        ("console", proxy.stderr().into_bytes()),
    ] {
        assert!(!text.contains(&0), "NUL in the {what}");
        let text = String::from_utf8_lossy(&text);
        for line in text.lines() {
            assert!(!line.starts_with("12:00:00 [ERROR]"), "forged: {line}");
            assert!(line.len() <= 1024, "a {} byte line", line.len());
        }
        assert!(text.contains(r"gpt-4o\n12:00:00"), "escaped: {text}");
        assert!(text.contains(r"a\u0000b"), "escaped: {text}");
    }
}

/// Item 9, responses. Upstream error bodies were scrubbed of the instance key, but
/// headers came back as they were.
#[test]
fn an_instance_key_echoed_in_response_headers_is_masked() {
    let echo = Mock::start(Arc::new(|r: &Recorded| {
        let key = r.header("api-key").unwrap_or("").to_string();
        MockReply::Json {
            status: 200,
            headers: vec![
                ("x-request-id".into(), format!("req-{key}")),
                ("apim-request-id".into(), key),
            ],
            body: json!({"id": "c", "object": "chat.completion", "choices": []}),
        }
    }));
    let proxy = Running::with_config(&instance(&echo.url, ""));
    let answer = chat(&proxy, &[]);
    assert_eq!(answer.status, 200);
    for (name, value) in &answer.headers {
        assert!(!value.contains(KEY), "{name}: {value}");
    }
    assert_eq!(answer.header("x-request-id"), Some("req-***redacted***"));
    assert_eq!(answer.header("apim-request-id"), Some("***redacted***"));
}

/// Item 9, configuration. A key pasted into the wrong field was quoted in full by the
/// error that names the field.
#[test]
fn configuration_errors_never_print_a_fields_value() {
    let up = Mock::start(azure_like(KEY));
    let good = instance(&up.url, "");
    for (find, replace) in [
        (
            "api_version: 2024-10-21",
            format!("api_version: 2024-10-21, priority: {SECRET}"),
        ),
        (
            &format!("api_base: '{}'", up.url),
            format!("api_base: {SECRET}"),
        ),
        (
            "api_version: 2024-10-21",
            format!("api_version: 2024-10-21, max_tpm: '{SECRET}'"),
        ),
        (
            "api_version: 2024-10-21",
            format!("api_version: 2024-10-21, provider_type: {SECRET}"),
        ),
        (
            "supported_models: [m]",
            format!("supported_models: {SECRET}"),
        ),
    ] {
        let dir = TempDir::new();
        dir.write("base.yaml", &good.replace(find, &replace));
        let out = std::process::Command::new(BIN)
            .env_clear()
            .arg("--check-config")
            .arg("--config-dir")
            .arg(&dir.0)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{replace}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("instances[0]"), "{err}");
        assert!(!err.contains(SECRET), "{err}");
    }
    // From a legacy variable.
    let dir = TempDir::new();
    dir.write("base.yaml", &good);
    let out = std::process::Command::new(BIN)
        .env_clear()
        .env("API_INSTANCE_EAST_WEIGHT", SECRET)
        .args(["--check-config", "--config-dir"])
        .arg(&dir.0)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("API_INSTANCE_EAST_WEIGHT") && !err.contains(SECRET),
        "{err}"
    );
    // On reload: not in the 400, nor on the console.
    let mut proxy = Running::with_config(&good);
    proxy.dir.as_ref().unwrap().write(
        "base.yaml",
        &format!(
            "host: 127.0.0.1\nport: 0\n{}",
            good.replace(
                "api_version: 2024-10-21",
                &format!("api_version: 2024-10-21, weight: {SECRET}")
            )
        ),
    );
    let reload = send("POST", &proxy.url("/config/reload"), &[], None);
    assert_eq!(reload.status, 400);
    let body = String::from_utf8_lossy(&reload.body).into_owned();
    assert!(
        body.contains("instances[0].weight") && !body.contains(SECRET),
        "{body}"
    );
    assert!(wait_until(Duration::from_secs(5), || proxy
        .stderr()
        .contains("reload")));
    assert!(!proxy.stderr().contains(SECRET), "{}", proxy.stderr());
}

/// Item 10. After SIGTERM the proxy kept accepting connections it never answered,
/// and a stream cut by the end of the grace period ended without the error event.
#[test]
fn sigterm_stops_accepting_at_once_and_cut_streams_end_with_an_error_event() {
    let words: Vec<&'static str> = vec!["w"; 40];
    let up = Mock::start(Arc::new(move |_: &Recorded| MockReply::Sse {
        first_after: Duration::ZERO,
        events: chat_events("d", &words, false),
        gap: Duration::from_millis(200),
        end: SseEnd::Done,
    }));
    let mut proxy = Running::with_config(&format!(
        "server: {{shutdown_grace_seconds: 3}}\n{}",
        instance(&up.url, "")
    ));
    // An idle kept-alive connection, one halfway through a /health head, and a stream.
    let mut idle = TcpStream::connect(&proxy.addr).unwrap();
    idle.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut idle).status, 200);
    let mut half = TcpStream::connect(&proxy.addr).unwrap();
    half.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut stream = TcpStream::connect(&proxy.addr).unwrap();
    let body = br#"{"model":"m","stream":true,"messages":[]}"#;
    stream
        .write_all(
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
    stream.write_all(body).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut streamed = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&streamed).contains("\"w\"") {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0);
        streamed.extend_from_slice(&buf[..n]);
    }

    proxy.signal("TERM");
    assert!(
        wait_until(Duration::from_secs(2), || TcpStream::connect(&proxy.addr)
            .is_err()),
        "new connections are still accepted"
    );
    proxy.assert_alive();
    idle.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert_eq!(
        idle.read(&mut buf)
            .expect("the idle connection was left open"),
        0,
        "closed without an answer"
    );
    half.write_all(b"\r\n").unwrap();
    half.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let _ = half.read_to_end(&mut got);
    let health = one_answer(&got, "health while draining");
    assert_eq!(health.status, 503);
    assert_eq!(health.header("connection"), Some("close"));

    let _ = stream.read_to_end(&mut streamed);
    let text = String::from_utf8_lossy(&streamed);
    assert!(text.contains("stream_interrupted"), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    assert!(
        text.ends_with("0\r\n\r\n"),
        "a complete chunked body: {text:?}"
    );
    let status = proxy
        .exit_within(Duration::from_secs(10))
        .expect("did not exit");
    assert_eq!(status.code(), Some(0));
    // The proxy cut it: the client had not left.
    assert!(
        wait_until(Duration::from_secs(5), || proxy
            .stderr()
            .contains("stream=shutdown")),
        "{}",
        proxy.stderr()
    );
    assert!(!proxy.stderr().contains("stream=client_gone"));
}

/// Item 11. tiny_http's own answers had empty bodies, some malformed heads got the
/// connection closed without one, and idle connections got an unsolicited 408.
#[test]
fn the_parsers_answers_are_openai_shaped_and_idle_connections_close_quietly() {
    let up = Mock::start(azure_like(KEY));
    let proxy = Running::with_config(&format!(
        "server: {{client_timeout: 1}}\n{}",
        instance(&up.url, "")
    ));
    let big = format!(
        "GET /health HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let cases: [(&[u8], u16); 8] = [
        (b"NONSENSE\r\n\r\n", 400),
        (big.as_bytes(), 431),
        (b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"GET /health HTTP/1.1\r\nX-Name: caf\xc3\xa9\r\n\r\n", 400),
        (b"GET /he\xffalth HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nBad Name: v\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nExpect: 200-ok\r\n\r\n", 417),
        (b"GET /health HTTP/1.1\r\nHost: x\r\n", 408),
    ];
    for (bytes, status) in cases {
        let what = String::from_utf8_lossy(bytes).into_owned();
        let got = raw(&proxy.addr, bytes, Duration::from_secs(5));
        let answer = one_answer(&got, &what);
        assert_eq!(answer.status, status, "{what:?}");
        answer.openai_error();
        assert_eq!(
            answer.header("content-type"),
            Some("application/json"),
            "{what:?}"
        );
    }
    // A stray CRLF after a request (RFC 9112 §2.2) leaves the connection idle.
    let mut idle = TcpStream::connect(&proxy.addr).unwrap();
    idle.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut idle).status, 200);
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    idle.read_to_end(&mut rest)
        .expect("closed after client_timeout");
    assert_eq!(
        String::from_utf8_lossy(&rest),
        "",
        "nothing unsolicited on an idle connection"
    );
}

/// One class of hostile input: the bytes each of its connections sends, and how.
struct Class {
    name: &'static str,
    requests: Vec<Vec<u8>>,
    /// Send in pieces this far apart (slow writers), instead of all at once.
    trickle: Option<Duration>,
}

fn classes(rng: &mut Rng) -> Vec<Class> {
    let mut pick = |items: &[&str]| items[rng.below(items.len())].to_string();
    let declared: Vec<Vec<u8>> = (0..60)
        .map(|_| {
            let length = pick(&[
                "0",
                "1",
                "1023",
                "1024",
                "1025",
                "1048576",
                "99999999999",
                "18446744073709551615",
                "18446744073709551621",
            ]);
            let sent = pick(&["", "{", "{\"model\":\"m\"}", &"x".repeat(5000)]);
            let path = pick(&["/v1/chat/completions", "/v1/embeddings", "/health", "/nope"]);
            format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n{sent}")
                .into_bytes()
        })
        .collect();
    let framing: Vec<Vec<u8>> = (0..60)
        .map(|_| {
            let a = pick(&[
                "Content-Length: 5",
                "Content-Length: x",
                "Transfer-Encoding: chunked",
                "Transfer-Encoding: identity",
                "Content-Length: 5, 6",
                "",
            ]);
            let b = pick(&[
                "Content-Length: 6",
                "Transfer-Encoding: chunked",
                "Transfer-Encoding: gzip",
                "",
            ]);
            let body = pick(&[
                "5\r\nhello\r\n0\r\n\r\n",
                "ffffffffffffffffffff\r\n",
                &format!("{}\r\n", "f".repeat(100_000)),
                "1;ext=\"\r\nx\r\n0\r\n\r\n",
                "hello",
            ]);
            format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{a}\r\n{b}\r\n\r\n{body}")
                .into_bytes()
        })
        .collect();
    let control: Vec<Vec<u8>> = (0..60)
        .map(|_| {
            let mut req = b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: ab\r\n\r\n".to_vec();
            for _ in 0..1 + rng.below(3) {
                let at = 4 + rng.below(req.len() - 8);
                let byte = [0u8, 1, 8, 9, 11, 12, 13, 10, 27, 127, 128, 255][rng.below(12)];
                req.insert(at, byte);
            }
            req
        })
        .collect();
    let json: Vec<Vec<u8>> = [
        format!("{{\"model\":\"m\",\"x\":{}1{}}}", "[".repeat(100_000), "]".repeat(100_000)),
        format!("{{\"model\":\"m\",\"messages\":[{}{{}}]}}", "{},".repeat(200_000)),
        format!("{{\"model\":\"m\",\"input\":[{}1]}}", "[1,2,3],".repeat(100_000)),
        format!("{{{}\"model\":\"m\"}}", "\"k\":1,".repeat(100_000)),
        format!("{{\"model\":\"m\",\"messages\":[{{\"content\":[{}{{}}]}}]}}", "{\"type\":\"text\",\"text\":\"a\"},".repeat(50_000)),
        format!("{{\"model\":\"m\",\"stream\":true,\"stream_options\":{},\"messages\":[]}}", "[".repeat(1000)),
    ]
    .into_iter()
    .map(|body| {
        let mut req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend(body.into_bytes());
        req
    })
    .collect();
    let slow: Vec<Vec<u8>> = (0..20)
        .map(|i| {
            if i % 2 == 0 {
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n{\"model\":\"m\",\"messages\":[]}".to_vec()
            } else {
                b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaa\r\n\r\n".to_vec()
            }
        })
        .collect();
    vec![
        Class {
            name: "declared sizes",
            requests: declared,
            trickle: None,
        },
        Class {
            name: "framing",
            requests: framing,
            trickle: None,
        },
        Class {
            name: "control bytes",
            requests: control,
            trickle: None,
        },
        Class {
            name: "deep and wide JSON",
            requests: json,
            trickle: None,
        },
        Class {
            name: "slow writers",
            requests: slow,
            trickle: Some(Duration::from_millis(60)),
        },
    ]
}

/// Sends one class's requests, all connections at once, and returns when each has
/// been answered or closed.
fn run_class(addr: &str, class: &Class) {
    let threads: Vec<_> = class
        .requests
        .iter()
        .cloned()
        .map(|req| {
            let (addr, trickle) = (addr.to_string(), class.trickle);
            std::thread::spawn(move || {
                let Ok(mut c) = TcpStream::connect(&addr) else {
                    return;
                };
                let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
                match trickle {
                    None => {
                        let _ = c.write_all(&req);
                    }
                    Some(gap) => {
                        for piece in req.chunks(4) {
                            if c.write_all(piece).is_err() {
                                break;
                            }
                            std::thread::sleep(gap);
                        }
                    }
                }
                let _ = c.shutdown(std::net::Shutdown::Write);
                let mut sink = Vec::new();
                let _ = c.read_to_end(&mut sink);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// The fuzz test of these classes. After each class: the process is alive, its
/// descriptors and threads are back where they were, its RSS is bounded, and a normal
/// request is served.
#[test]
fn hostile_byte_streams_leave_the_process_as_it_was() {
    let up = Mock::start(azure_like(KEY));
    let mut proxy = Running::with_config(&format!(
        "server: {{workers: 4, client_timeout: 1, body_timeout: 2, max_body_bytes: 4MiB}}\n{}",
        instance(&up.url, ", max_tpm: 100000")
    ));
    assert_eq!(chat(&proxy, &[]).status, 200);
    let (fds, threads) = (proxy.open_fds(), proxy.status_field("Threads"));
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    for class in classes(&mut rng) {
        run_class(&proxy.addr, &class);
        proxy.assert_alive();
        let settled = wait_until(Duration::from_secs(15), || {
            proxy.open_fds() <= fds && proxy.status_field("Threads") <= threads
        });
        assert!(
            settled,
            "{}: descriptors {} (were {fds}), threads {} (were {threads})",
            class.name,
            proxy.open_fds(),
            proxy.status_field("Threads")
        );
        let rss_mb = proxy.status_field("VmRSS") / 1024;
        assert!(rss_mb < 150, "{}: RSS {rss_mb} MB", class.name);
        let answer = chat(&proxy, &[]);
        assert_eq!(answer.status, 200, "{}: {:?}", class.name, answer.json());
        let health: Value = send("GET", &proxy.url("/health"), &[], None).json();
        assert_eq!(health["status"], "healthy", "{}", class.name);
    }
}

#[test]
fn a_model_name_longer_than_any_deployment_is_refused_before_it_is_kept_anywhere() {
    let up = Mock::start(azure_like(KEY));
    let proxy = TestProxy::start(&format!(
        "instances:\n{}",
        azure_instance("a", &up.url, KEY, 1, "supported_models: [m]")
    ));
    let long = "m".repeat(257);
    let answer = post_json(
        &format!("{}/v1/chat/completions", proxy.url),
        &json!({"model": long, "messages": []}),
    );
    answer.assert_status(400);
    assert_eq!(answer.openai_error()["param"], "model");
    assert_eq!(up.count(), 0);
}
