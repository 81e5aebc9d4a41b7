//! A stand-in for Azure OpenAI, so that a first call through the proxy works before
//! any Azure resource is set up: `cargo run --example fake-azure [PORT]` (default
//! 8081), then the proxy with `ENVIRONMENT=fake` (`config/fake.yaml` points it here).
//!
//! It speaks Azure's URLs (`/openai/deployments/{deployment}/chat/completions` and
//! `/embeddings` with `?api-version=`, and the v1 API's `/openai/v1/chat/completions`
//! and `/openai/v1/embeddings`), wants an `api-key` header (any value), and answers
//! with canned text: a chat completion, a streamed one (SSE, with the usage chunk when
//! `stream_options.include_usage` asks for it), or embeddings. No model is behind it.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The largest request body it reads; the proxy's own limit is larger, but a stand-in
/// needs no more.
const MAX_BODY: usize = 4 << 20;
/// The most header lines it reads before giving up on a request.
const MAX_HEADERS: usize = 100;
/// The pause between streamed chunks, so that a stream can be seen arriving.
const CHUNK_GAP: Duration = Duration::from_millis(30);

fn main() {
    let port: u16 = match std::env::args().nth(1).map(|p| p.parse()) {
        None => 8081,
        Some(Ok(p)) => p,
        Some(Err(_)) => {
            eprintln!("usage: fake-azure [PORT]   (default 8081; 0 picks a free port)");
            std::process::exit(2);
        }
    };
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap_or_else(|e| {
        eprintln!("fake-azure: cannot listen on 127.0.0.1:{port}: {e}");
        std::process::exit(1);
    });
    let addr = listener
        .local_addr()
        .expect("a bound socket has an address");
    println!(
        "fake-azure: a STAND-IN for Azure OpenAI, not Azure: canned answers, no model behind them"
    );
    println!("fake-azure: listening on http://{addr} (any api-key, any deployment name)");
    for conn in listener.incoming().flatten() {
        std::thread::spawn(move || serve(conn));
    }
}

/// A request as far as the stand-in cares.
struct Request {
    method: String,
    target: String,
    has_api_key: bool,
    body: Vec<u8>,
}

/// Answers the connection's requests until it closes or sends something unreadable.
fn serve(conn: TcpStream) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
    let Ok(write_half) = conn.try_clone() else {
        return;
    };
    let mut out = write_half;
    let mut reader = BufReader::new(conn);
    while let Some(request) = read_request(&mut reader) {
        let req = match request {
            Ok(req) => req,
            Err(status) => {
                // What is left of the request is not read: the connection ends here.
                let _ = send_json(&mut out, status, &error(status, "Bad request"));
                return;
            }
        };
        if answer(&mut out, &req).is_err() {
            return;
        }
    }
}

/// The next request, `None` at the connection's end, or the status to refuse it with.
fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Result<Request, u16>> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next()?.to_string(), parts.next()?.to_string());
    let (mut length, mut has_api_key) = (0usize, false);
    for _ in 0..MAX_HEADERS {
        line.clear();
        reader.read_line(&mut line).ok()?;
        let header = line.trim_end();
        if header.is_empty() {
            if length > MAX_BODY {
                return Some(Err(413));
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).ok()?;
            return Some(Ok(Request {
                method,
                target,
                has_api_key,
                body,
            }));
        }
        let (name, value) = header.split_once(':')?;
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().ok()?,
            "api-key" => has_api_key = !value.trim().is_empty(),
            "transfer-encoding" => return Some(Err(411)),
            _ => {}
        }
    }
    Some(Err(431))
}

/// The operation and deployment a path names, as Azure reads them.
fn route(target: &str) -> Option<(&str, String)> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if let Some(op) = path.strip_prefix("/openai/v1/") {
        // The v1 API takes the deployment from the body's `model`.
        return Some((op, String::new()));
    }
    let (deployment, op) = path.strip_prefix("/openai/deployments/")?.split_once('/')?;
    query
        .split('&')
        .any(|kv| kv.starts_with("api-version="))
        .then(|| (op, deployment.to_string()))
}

fn answer(out: &mut TcpStream, req: &Request) -> std::io::Result<()> {
    let Some((op, deployment)) = route(&req.target) else {
        return send_json(out, 404, &error(404, "Resource not found"));
    };
    if req.method != "POST" {
        return send_json(out, 405, &error(405, "Method not allowed"));
    }
    if !req.has_api_key {
        return send_json(
            out,
            401,
            &error(
                401,
                "Access denied due to invalid subscription key or wrong API endpoint.",
            ),
        );
    }
    let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
        return send_json(out, 400, &error(400, "The request body is not JSON."));
    };
    let deployment = if deployment.is_empty() {
        body["model"].as_str().unwrap_or("unnamed").to_string()
    } else {
        deployment
    };
    match op {
        "chat/completions" if body["stream"] == json!(true) => stream_chat(out, &deployment, &body),
        "chat/completions" => send_json(out, 200, &chat(&deployment, &body)),
        "embeddings" => send_json(out, 200, &embeddings(&deployment, &body)),
        _ => send_json(out, 404, &error(404, "Resource not found")),
    }
}

/// Azure's error shape.
fn error(status: u16, message: &str) -> Value {
    json!({"error": {"code": status.to_string(), "message": message}})
}

/// The canned reply's words, and a rough count of the prompt's tokens (4 bytes each).
fn reply_words(deployment: &str, body: &Value) -> (Vec<String>, u64) {
    let messages = body["messages"].as_array().map_or(0, Vec::len);
    let text = format!(
        "Hello from fake-azure, a stand-in for Azure OpenAI: deployment {deployment} got {messages} message(s)."
    );
    let words = text.split_inclusive(' ').map(str::to_string).collect();
    let prompt = (body["messages"].to_string().len() as u64).div_ceil(4);
    (words, prompt)
}

fn usage(prompt: u64, completion: u64) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn created() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn chat(deployment: &str, body: &Value) -> Value {
    let (words, prompt) = reply_words(deployment, body);
    json!({
        "id": "chatcmpl-fake", "object": "chat.completion", "created": created(), "model": deployment,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": words.concat()}}],
        "usage": usage(prompt, words.len() as u64),
    })
}

fn embeddings(deployment: &str, body: &Value) -> Value {
    let inputs = match &body["input"] {
        Value::Array(items) => items.len(),
        _ => 1,
    };
    let data: Vec<Value> = (0..inputs)
        .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.0125, -0.25, 0.5, i as f64]}))
        .collect();
    let prompt = (body["input"].to_string().len() as u64).div_ceil(4);
    json!({"object": "list", "model": deployment, "data": data,
           "usage": {"prompt_tokens": prompt, "total_tokens": prompt}})
}

/// A chat completion streamed as Azure streams it: a role chunk, a chunk per word, a
/// finishing chunk, the usage chunk when asked for, then `[DONE]`.
fn stream_chat(out: &mut TcpStream, deployment: &str, body: &Value) -> std::io::Result<()> {
    let (words, prompt) = reply_words(deployment, body);
    let with_usage = body["stream_options"]["include_usage"] == json!(true);
    let chunk = |delta: Value, finish: Value| {
        let mut c = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": created(),
            "model": deployment, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        if with_usage {
            c["usage"] = Value::Null;
        }
        format!("data: {c}\n\n")
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    events.extend(
        words
            .iter()
            .map(|w| chunk(json!({"content": w}), Value::Null)),
    );
    events.push(chunk(json!({}), json!("stop")));
    if with_usage {
        let last = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": created(),
            "model": deployment, "choices": [], "usage": usage(prompt, words.len() as u64)});
        events.push(format!("data: {last}\n\n"));
    }
    events.push("data: [DONE]\n\n".to_string());
    out.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
    )?;
    for event in events {
        write!(out, "{:x}\r\n{event}\r\n", event.len())?;
        std::thread::sleep(CHUNK_GAP);
    }
    out.write_all(b"0\r\n\r\n")
}

fn send_json(out: &mut TcpStream, status: u16, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Error",
    };
    write!(
        out,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         x-ratelimit-remaining-tokens: 100000\r\nx-ratelimit-remaining-requests: 1000\r\n\r\n{body}",
        body.len()
    )
}
