//! Test harness: a mock Azure OpenAI upstream (a real HTTP/1.1 server on 127.0.0.1:0,
//! raw TCP so it can hang, cut streams and drop connections on purpose), a per-test
//! temp dir, and a proxy started in-process on port 0.
#![allow(dead_code)] // each test binary uses its own part of the harness

pub mod api2026;
pub mod entra;
pub mod stand_in;

use azure_openai_proxy::config::Source;
use azure_openai_proxy::Proxy;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// How the mock answers one request.
pub enum MockReply {
    Json {
        status: u16,
        headers: Vec<(String, String)>,
        body: Value,
    },
    /// The head at once, then SSE events (each `data: ...` payload): the first after
    /// `first_after`, the others `gap` apart; then how the stream ends.
    Sse {
        first_after: Duration,
        events: Vec<String>,
        gap: Duration,
        end: SseEnd,
    },
    /// A whole body of any type (audio, say).
    Bytes {
        content_type: &'static str,
        body: Vec<u8>,
    },
    /// Read the request, answer nothing, hold the connection for this long.
    Hang(Duration),
    /// Read the request and close the connection without a response.
    Close,
    /// Write these bytes as they are (a whole answer, head and framing included), each
    /// piece after its delay; then close the connection.
    Raw(Vec<(Duration, Vec<u8>)>),
    /// Read the request, then let the test write whatever it likes on the connection
    /// (raw bytes, pauses, a trickle); the connection closes when it returns.
    Script(Box<dyn FnOnce(&mut TcpStream) + Send>),
}

pub enum SseEnd {
    Done,
    /// End the stream without `data: [DONE]` (the Responses API's streams).
    Close,
    /// Stop mid-event and close the connection.
    Cut,
    /// Stop sending and hold the connection for this long.
    Stall(Duration),
}

pub type Behaviour = Arc<dyn Fn(&Recorded) -> MockReply + Send + Sync>;

pub struct Mock {
    pub url: String,
    requests: Arc<Mutex<Vec<Recorded>>>,
    /// SSE streams the mock stopped because writing to the proxy failed.
    pub aborted_streams: Arc<AtomicUsize>,
    /// Connections the mock accepted.
    pub connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Mock {
    pub fn start(behaviour: Behaviour) -> Mock {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let aborted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let (reqs, ab, st, accepted) = (
            requests.clone(),
            aborted.clone(),
            stop.clone(),
            connections.clone(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                accepted.fetch_add(1, Ordering::SeqCst);
                let (b, r, a, s) = (behaviour.clone(), reqs.clone(), ab.clone(), st.clone());
                std::thread::spawn(move || serve_conn(conn, b, r, a, s));
            }
        });
        Mock {
            url,
            requests,
            aborted_streams: aborted,
            connections,
            stop,
        }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.url.trim_start_matches("http://"));
    }
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Recorded> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some(Recorded {
        method,
        target,
        headers,
        body,
    })
}

/// Sleeps up to `d`, waking early when the mock is dropped.
fn hold(d: Duration, stop: &AtomicBool) {
    let until = Instant::now() + d;
    while Instant::now() < until && !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn serve_conn(
    conn: TcpStream,
    behaviour: Behaviour,
    requests: Arc<Mutex<Vec<Recorded>>>,
    aborted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) {
    let _ = conn.set_nodelay(true);
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    while let Some(req) = read_request(&mut reader) {
        requests.lock().unwrap().push(req.clone());
        match behaviour(&req) {
            MockReply::Json {
                status,
                headers,
                body,
            } => {
                let body = body.to_string();
                let mut head = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
                    body.len()
                );
                for (k, v) in headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                head.push_str(&body);
                if out.write_all(head.as_bytes()).is_err() {
                    return;
                }
            }
            MockReply::Sse {
                first_after,
                events,
                gap,
                end,
            } => {
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\napim-request-id: mock-sse\r\n\r\n";
                if out.write_all(head.as_bytes()).is_err() {
                    return;
                }
                for (i, e) in events.iter().enumerate() {
                    std::thread::sleep(if i == 0 { first_after } else { gap });
                    // A named event (`event: ...\ndata: ...`) is written as it is.
                    let ev = if e.starts_with("event: ") {
                        format!("{e}\n\n")
                    } else {
                        format!("data: {e}\n\n")
                    };
                    let chunk = format!("{:x}\r\n{ev}\r\n", ev.len());
                    if out
                        .write_all(chunk.as_bytes())
                        .and_then(|_| out.flush())
                        .is_err()
                    {
                        aborted.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                }
                match end {
                    SseEnd::Done => {
                        let done = "data: [DONE]\n\n";
                        let chunk = format!("{:x}\r\n{done}\r\n0\r\n\r\n", done.len());
                        if out.write_all(chunk.as_bytes()).is_err() {
                            aborted.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    }
                    SseEnd::Close => {
                        if out.write_all(b"0\r\n\r\n").is_err() {
                            aborted.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    }
                    SseEnd::Cut => {
                        let _ = out.write_all(b"20\r\ndata: {\"choices\":[{\"del");
                        return;
                    }
                    SseEnd::Stall(d) => {
                        hold(d, &stop);
                        return;
                    }
                }
            }
            MockReply::Bytes { content_type, body } => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                if out
                    .write_all(head.as_bytes())
                    .and_then(|_| out.write_all(&body))
                    .is_err()
                {
                    return;
                }
            }
            MockReply::Hang(d) => {
                hold(d, &stop);
                return;
            }
            MockReply::Close => return,
            MockReply::Raw(pieces) => {
                for (after, bytes) in pieces {
                    hold(after, &stop);
                    if out.write_all(&bytes).is_err() {
                        return;
                    }
                }
                return;
            }
            MockReply::Script(script) => {
                script(&mut out);
                return;
            }
        }
    }
}

pub fn json_reply(status: u16, body: Value) -> MockReply {
    MockReply::Json {
        status,
        headers: vec![],
        body,
    }
}

/// Builds the events of a streamed chat completion like Azure's: a prompt-filter chunk
/// with no choices, content chunks, and the usage-only chunk when asked for.
pub fn chat_events(model: &str, words: &[&str], include_usage: bool) -> Vec<String> {
    let mut events = vec![
        json!({"id": "", "object": "", "created": 0, "model": "", "choices": [],
                                  "prompt_filter_results": [{"prompt_index": 0}]})
        .to_string(),
    ];
    for w in words {
        let mut c = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": model,
                           "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": null}]});
        if include_usage {
            c["usage"] = Value::Null;
        }
        events.push(c.to_string());
    }
    if include_usage {
        events.push(
            json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": model, "choices": [],
                   "usage": {"prompt_tokens": 9, "completion_tokens": words.len(), "total_tokens": 9 + words.len()}})
            .to_string(),
        );
    }
    events
}

/// The deployment a request names in its body: JSON's `model`, or an upload's field.
fn body_model(req: &Recorded) -> String {
    match req.json()["model"].as_str() {
        Some(m) => m.to_string(),
        None => api2026::form_model(&req.body).unwrap_or_default(),
    }
}

/// An upstream that behaves like Azure OpenAI (`/openai/deployments/{dep}/{op}?api-version=`,
/// Azure's v1 API `/openai/v1/{op}` with no api-version or `preview`, the Responses API
/// at `/openai/responses?api-version=`, all with `api-key`) and like OpenAI
/// (`/v1/{op}`, `Authorization: Bearer`), checking `key`.
pub fn azure_like(key: &'static str) -> Behaviour {
    let stored = api2026::Stored::default();
    Arc::new(move |req: &Recorded| {
        let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
        let api_key = req.header("api-key") == Some(key);
        let (dep, op, authorised) = if let Some(op) = path.strip_prefix("/openai/v1/") {
            if !(query.is_empty() || query == "api-version=preview") {
                return json_reply(
                    400,
                    json!({"error": {"code": "BadRequest", "message": "API version not supported"}}),
                );
            }
            (body_model(req), op.to_string(), api_key)
        } else if let Some(op) = path
            .strip_prefix("/openai/")
            .filter(|op| op.starts_with("responses"))
        {
            // Azure serves the Responses API from 2025-03-01-preview on.
            let version = query.strip_prefix("api-version=").unwrap_or("");
            if version < "2025-03-01-preview" {
                return json_reply(
                    404,
                    json!({"error": {"code": "404", "message": "Resource not found"}}),
                );
            }
            (body_model(req), op.to_string(), api_key)
        } else if let Some(rest) = path.strip_prefix("/openai/deployments/") {
            let Some((dep, op)) = rest.split_once('/') else {
                return json_reply(
                    404,
                    json!({"error": {"code": "404", "message": "Resource not found"}}),
                );
            };
            if !query.starts_with("api-version=") {
                return json_reply(
                    404,
                    json!({"error": {"code": "404", "message": "Resource not found"}}),
                );
            }
            (dep.to_string(), op.to_string(), api_key)
        } else if let Some(op) = path.strip_prefix("/v1/") {
            (
                body_model(req),
                op.to_string(),
                req.header("authorization") == Some(&format!("Bearer {key}")),
            )
        } else {
            return json_reply(
                404,
                json!({"error": {"code": "404", "message": "Resource not found"}}),
            );
        };
        if !authorised {
            return json_reply(
                401,
                json!({"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong API endpoint."}}),
            );
        }
        if let Some(reply) = api2026::answer(&stored, req, &dep, &op) {
            return reply;
        }
        let body = req.json();
        let headers = vec![
            ("apim-request-id".to_string(), "mock-apim-1".to_string()),
            (
                "x-ratelimit-remaining-tokens".to_string(),
                "9000".to_string(),
            ),
            (
                "x-ratelimit-remaining-requests".to_string(),
                "99".to_string(),
            ),
        ];
        match op.as_str() {
            "chat/completions" if body["stream"] == json!(true) => MockReply::Sse {
                first_after: Duration::ZERO,
                events: chat_events(
                    &dep,
                    &["Hello", " world"],
                    body["stream_options"]["include_usage"] == json!(true),
                ),
                gap: Duration::from_millis(5),
                end: SseEnd::Done,
            },
            "chat/completions" => MockReply::Json {
                status: 200,
                headers,
                body: json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": dep,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("Hello from {dep}")},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}}),
            },
            "completions" => MockReply::Json {
                status: 200,
                headers,
                body: json!({"id": "cmpl-1", "object": "text_completion", "created": 0, "model": dep,
                    "choices": [{"index": 0, "text": "once upon a time", "finish_reason": "stop", "logprobs": null}],
                    "usage": {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}}),
            },
            "embeddings" => MockReply::Json {
                status: 200,
                headers,
                body: json!({"object": "list", "model": dep,
                    "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5, 0.125]}],
                    "usage": {"prompt_tokens": 4, "total_tokens": 4}}),
            },
            _ => json_reply(
                404,
                json!({"error": {"code": "404", "message": "Resource not found"}}),
            ),
        }
    })
}

/// A temp dir removed when dropped; unique per test even when tests run in parallel.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("aop-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn write(&self, name: &str, text: &str) {
        std::fs::write(self.0.join(name), text).unwrap();
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct TestProxy {
    pub url: String,
    proxy: Option<Proxy>,
    dir: TempDir,
}

impl TestProxy {
    /// Starts the proxy on 127.0.0.1:0 with `yaml` as its base.yaml.
    pub fn start(yaml: &str) -> TestProxy {
        let dir = TempDir::new();
        let source = Source {
            dir: Some(dir.0.clone()),
            ..Source::default()
        };
        dir.write("base.yaml", &Self::base(yaml));
        let loaded = source.load().unwrap_or_else(|e| panic!("{e}"));
        let proxy = Proxy::start(loaded.config, source).unwrap();
        let url = format!("http://{}", proxy.addr());
        TestProxy {
            url,
            proxy: Some(proxy),
            dir,
        }
    }

    /// `yaml` as a base.yaml of these tests: on a free loopback port.
    pub fn base(yaml: &str) -> String {
        format!("host: 127.0.0.1\nport: 0\n{yaml}")
    }

    /// The base.yaml this proxy reads on a reload.
    pub fn config_file(&self) -> PathBuf {
        self.dir.0.join("base.yaml")
    }

    /// Replaces base.yaml (for a reload).
    pub fn rewrite(&self, yaml: &str) {
        self.dir.write("base.yaml", &Self::base(yaml));
    }

    /// Takes the running proxy, e.g. to shut it down in a test.
    pub fn take(&mut self) -> Proxy {
        self.proxy.take().expect("already taken")
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(p) = self.proxy.take() {
            p.stop();
        }
    }
}

/// One azure instance entry for a test config.
pub fn azure_instance(name: &str, url: &str, key: &str, priority: u32, models: &str) -> String {
    format!(
        "  - {{name: {name}, provider_type: azure, api_key: {key}, api_base: '{url}', api_version: 2024-10-21, priority: {priority}, {models}}}\n"
    )
}

pub fn client() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// Asserts the status, showing the body when it is another.
    #[track_caller]
    pub fn assert_status(&self, status: u16) {
        status_is(self.status, &self.body, status);
    }

    /// Asserts the OpenAI error shape and returns the error object.
    pub fn openai_error(&self) -> Value {
        let v = self.json();
        let e = &v["error"];
        for key in ["message", "type", "param", "code"] {
            assert!(e.get(key).is_some(), "error without {key:?}: {v}");
        }
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        e.clone()
    }
}

#[track_caller]
fn status_is(status: u16, body: &[u8], expected: u16) {
    assert_eq!(status, expected, "{}", String::from_utf8_lossy(body));
}

pub fn send(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Answer {
    let agent = client();
    let mut req = ureq::http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let result = match body {
        Some(b) => agent.run(req.body(b.to_vec()).unwrap()),
        None => agent.run(req.body(()).unwrap()),
    };
    let mut resp = result.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let status = resp.status().as_u16();
    let body = resp.body_mut().read_to_vec().unwrap();
    Answer {
        status,
        headers,
        body,
    }
}

pub fn post_json(url: &str, body: &Value) -> Answer {
    send(
        "POST",
        url,
        &[("content-type", "application/json")],
        Some(body.to_string().as_bytes()),
    )
}

/// `/stats/instances`' entry for `name`.
pub fn instance_stats(proxy: &TestProxy, name: &str) -> Value {
    send("GET", &format!("{}/stats/instances", proxy.url), &[], None).json()["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no instance {name}"))
}

/// The value of the `/metrics` sample written exactly as `sample` (name and labels).
pub fn metric_sample(proxy: &TestProxy, sample: &str) -> Option<f64> {
    let text =
        String::from_utf8(send("GET", &format!("{}/metrics", proxy.url), &[], None).body).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
}

/// Polls `cond` every 10 ms until it holds or `within` passes.
pub fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `data:` payloads of an SSE body, in order.
pub fn sse_data(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter_map(|e| {
            e.lines()
                .find_map(|l| l.strip_prefix("data: "))
                .map(str::to_string)
        })
        .collect()
}

/// The URL of a port nothing listens on (bound, then released), so connecting is refused.
pub fn refused_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", l.local_addr().unwrap())
}

pub const BIN: &str = env!("CARGO_BIN_EXE_azure-openai-proxy");

/// The built binary running in the background, its stderr collected line by line.
pub struct Running {
    pub child: Child,
    pub addr: String,
    lines: Receiver<String>,
    seen: Vec<String>,
    /// The config directory, when `with_config` made it.
    pub dir: Option<TempDir>,
}

impl Running {
    /// Spawns `cmd` and waits for its "listening on" line.
    pub fn start(cmd: &mut Command) -> Running {
        let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut seen = Vec::new();
        let addr = loop {
            let line = lines
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("no 'listening on' line: {}", seen.join("\n")));
            seen.push(line.clone());
            if let Some(rest) = line.split("listening on http://").nth(1) {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        Running {
            child,
            addr,
            lines,
            seen,
            dir: None,
        }
    }

    /// Starts the binary, with an empty environment, on `yaml` as its base.yaml
    /// (listening on a free loopback port).
    pub fn with_config(yaml: &str) -> Running {
        let dir = TempDir::new();
        dir.write("base.yaml", &format!("host: 127.0.0.1\nport: 0\n{yaml}"));
        let mut running = Running::start(
            Command::new(BIN)
                .env_clear()
                .arg("--config-dir")
                .arg(&dir.0),
        );
        running.dir = Some(dir);
        running
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn signal(&self, name: &str) {
        let sent = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(sent.success());
    }

    /// Everything the process printed to stderr so far.
    pub fn stderr(&mut self) -> String {
        self.seen.extend(self.lines.try_iter());
        self.seen.join("\n")
    }

    pub fn exit_within(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        wait_until(within, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status
    }

    /// Asserts that the process is still running.
    pub fn assert_alive(&mut self) {
        let exited = self.child.try_wait().unwrap();
        assert!(
            exited.is_none(),
            "the proxy exited ({exited:?}): {}",
            self.stderr()
        );
    }

    /// A number from /proc/PID/status: `Threads`, or `VmRSS`/`VmHWM` in kB.
    pub fn status_field(&self, name: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc status"))
    }

    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .count()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A value from the proxy's `/metrics`.
pub fn metric(proxy: &Running, name: &str) -> f64 {
    let text = String::from_utf8(send("GET", &proxy.url("/metrics"), &[], None).body).unwrap();
    let prefix = format!("aoai_proxy_{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// Writes `bytes` on a new connection to `addr` and returns everything the peer sent
/// back until it closed the connection, or until `within` passed.
pub fn raw(addr: &str, bytes: &[u8], within: Duration) -> Vec<u8> {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(within)).unwrap();
    let _ = c.write_all(bytes);
    let mut answer = Vec::new();
    let _ = c.read_to_end(&mut answer);
    answer
}

/// One HTTP response read off a raw connection.
#[derive(Debug)]
pub struct RawAnswer {
    pub status: u16,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Asserts the status, showing the body when it is another.
    #[track_caller]
    pub fn assert_status(&self, status: u16) {
        status_is(self.status, &self.body, status);
    }

    /// Asserts the OpenAI error shape and returns the error object.
    pub fn openai_error(&self) -> Value {
        Answer {
            status: self.status,
            headers: self.headers.clone(),
            body: self.body.clone(),
        }
        .openai_error()
    }
}

/// The responses in `bytes`, in order, as far as they parse (bodies framed by
/// Content-Length; a chunked body is taken whole, up to its last chunk).
pub fn responses(mut bytes: &[u8]) -> Vec<RawAnswer> {
    let mut out = Vec::new();
    while let Some(head_end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&bytes[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let Some(status) = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
        else {
            break;
        };
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let rest = &bytes[head_end + 4..];
        let length = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok());
        let len = match length {
            Some(n) => n.min(rest.len()),
            None => rest.len(),
        };
        out.push(RawAnswer {
            status,
            headers,
            body: rest[..len].to_vec(),
        });
        bytes = &rest[len..];
    }
    out
}

/// xorshift64*: a reproducible stream of random numbers for fuzz tests.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A real `redis-server` of its own on a loopback port, in a temp dir, without
/// persistence; killed when dropped.
pub struct RedisServer {
    pub port: u16,
    password: Option<String>,
    /// TLS only: the CA that signed its certificate (for 127.0.0.1), a PEM file.
    pub ca: Option<PathBuf>,
    child: Option<Child>,
    dir: TempDir,
}

impl RedisServer {
    pub fn start(password: Option<&str>) -> RedisServer {
        Self::start_on(password, false)
    }

    /// A server that speaks TLS only, with a certificate for 127.0.0.1 from a CA of
    /// its own (made with the `openssl` command).
    pub fn start_tls() -> RedisServer {
        Self::start_on(None, true)
    }

    fn start_on(password: Option<&str>, tls: bool) -> RedisServer {
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let dir = TempDir::new();
            let ca = tls.then(|| make_certificates(&dir));
            let mut server = RedisServer {
                port,
                password: password.map(str::to_string),
                ca,
                child: None,
                dir,
            };
            // Another test may have taken the port in between: then try another.
            if server.restart() {
                return server;
            }
        }
        panic!("redis-server did not start");
    }

    /// Starts it again on the same port (after `kill`); whether it answers.
    pub fn restart(&mut self) -> bool {
        let mut cmd = Command::new("redis-server");
        let port = self.port.to_string();
        match &self.ca {
            None => cmd.args(["--port", &port]),
            Some(ca) => cmd
                .args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port,
                    "--tls-auth-clients",
                    "no",
                ])
                .arg("--tls-ca-cert-file")
                .arg(ca)
                .arg("--tls-cert-file")
                .arg(self.dir.0.join("server.crt"))
                .arg("--tls-key-file")
                .arg(self.dir.0.join("server.key")),
        };
        cmd.args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&self.dir.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        let mut child = cmd
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        let settled = wait_until(Duration::from_secs(10), || {
            child.try_wait().unwrap().is_some() || self.ping()
        });
        let up = settled && child.try_wait().unwrap().is_none();
        self.child = Some(child);
        up
    }

    fn ping(&self) -> bool {
        if let Some(ca) = &self.ca {
            let out = Command::new("redis-cli")
                .args([
                    "--tls",
                    "-p",
                    &self.port.to_string(),
                    "-h",
                    "127.0.0.1",
                    "--cacert",
                ])
                .arg(ca)
                .arg("ping")
                .output();
            return out.is_ok_and(|o| o.stdout.starts_with(b"PONG"));
        }
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let auth = self
            .password
            .as_ref()
            .map(|p| format!("AUTH {p}\r\n"))
            .unwrap_or_default();
        let _ = s.write_all(format!("{auth}PING\r\n").as_bytes());
        let mut got = Vec::new();
        let mut buf = [0; 64];
        while let Ok(n @ 1..) = s.read(&mut buf) {
            got.extend_from_slice(&buf[..n]);
            if got.ends_with(b"+PONG\r\n") {
                return true;
            }
        }
        false
    }

    pub fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "rediss" } else { "redis" };
        match &self.password {
            Some(p) => format!("{scheme}://:{p}@127.0.0.1:{}/0", self.port),
            None => format!("{scheme}://127.0.0.1:{}/0", self.port),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Runs `redis-cli` with `args` against this (plain, password-less) server.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) the server: connections are accepted by
    /// the kernel, but nothing answers while it is stopped.
    pub fn pause(&self, paused: bool) {
        let pid = self.pid();
        let signal = if paused { "-STOP" } else { "-CONT" };
        let sent = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A CA and a server certificate for 127.0.0.1 signed by it, in `dir`; the CA's path.
fn make_certificates(dir: &TempDir) -> PathBuf {
    let at = |f: &str| dir.0.join(f);
    std::fs::write(at("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let steps: [Vec<&str>; 3] = [
        [
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=test-ca",
            ],
        ]
        .concat(),
        [
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
        vec![
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    ];
    for args in steps {
        let done = Command::new("openssl")
            .args(&args)
            .current_dir(&dir.0)
            .output()
            .expect("openssl");
        assert!(
            done.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&done.stderr)
        );
    }
    at("ca.crt")
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
