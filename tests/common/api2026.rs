//! The mock upstream's newer operations, shaped like Azure's answers and the OpenAI
//! SDK's types: the Responses API (a response object, its named-event stream, stored
//! responses), image generation, speech (binary audio) and transcription.

use super::{json_reply, MockReply, Recorded, SseEnd};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// The responses one upstream made, by id: only it can answer for them.
pub type Stored = Mutex<HashMap<String, Value>>;

/// Usage every response reports.
pub const RESPONSE_USAGE: (u64, u64) = (12, 5);

/// The audio bytes `audio/speech` answers: not UTF-8, with a NUL, as audio is.
pub const SPEECH: &[u8] = b"ID3\x04\x00\x00\xff\xfb\x90\x00binary\x00audio\xfe";

/// The model field of a `multipart/form-data` body (the v1 API's deployment).
pub fn form_model(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let at = text.find("name=\"model\"")?;
    let value = &text[at..];
    let start = value.find("\r\n\r\n")? + 4;
    let end = value[start..].find("\r\n")? + start;
    Some(value[start..end].to_string())
}

/// The answer to `op` (the path after the API's root) for deployment `dep`, if it is one
/// of the newer operations.
pub fn answer(stored: &Stored, req: &Recorded, dep: &str, op: &str) -> Option<MockReply> {
    if let Some(rest) = op.strip_prefix("responses/") {
        return Some(stored_response(stored, req, rest));
    }
    Some(match op {
        "responses" => create_response(stored, req, dep),
        "images/generations" => json_reply(
            200,
            json!({"created": 1764115200, "data": [{"url": format!("https://images.example/{dep}.png"),
                   "revised_prompt": req.json()["prompt"]}]}),
        ),
        "audio/speech" => MockReply::Bytes {
            content_type: "audio/mpeg",
            body: SPEECH.to_vec(),
        },
        "audio/transcriptions" | "audio/translations" => {
            json_reply(200, json!({"text": format!("transcribed by {dep}")}))
        }
        _ => return None,
    })
}

fn message(id: &str, text: &str) -> Value {
    json!({"id": format!("msg_{id}"), "type": "message", "status": "completed", "role": "assistant",
           "content": [{"type": "output_text", "text": text, "annotations": []}]})
}

fn response(id: &str, dep: &str, status: &str, output: Vec<Value>, previous: &Value) -> Value {
    let (input, output_tokens) = RESPONSE_USAGE;
    json!({"id": id, "object": "response", "created_at": 1764115200, "status": status,
           "model": dep, "output": output, "previous_response_id": previous,
           "parallel_tool_calls": true, "tool_choice": "auto", "tools": [], "metadata": {},
           "error": null, "incomplete_details": null, "instructions": null,
           "temperature": 1.0, "top_p": 1.0, "truncation": "disabled",
           "text": {"format": {"type": "text"}},
           "usage": if status == "completed" {
               json!({"input_tokens": input, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": input + output_tokens})
           } else { Value::Null }})
}

fn not_found(message: String, param: &str, code: &str) -> MockReply {
    json_reply(
        404,
        json!({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}),
    )
}

fn create_response(stored: &Stored, req: &Recorded, dep: &str) -> MockReply {
    static NEXT: AtomicUsize = AtomicUsize::new(1);
    let body = req.json();
    let previous = body["previous_response_id"].clone();
    if let Some(prev) = previous.as_str() {
        if !stored.lock().unwrap().contains_key(prev) {
            return not_found(
                format!("Previous response with id '{prev}' not found."),
                "previous_response_id",
                "previous_response_not_found",
            );
        }
    }
    let id = format!("resp_{:04}", NEXT.fetch_add(1, Ordering::SeqCst));
    let text = format!("Hello from {dep}");
    let done = response(&id, dep, "completed", vec![message(&id, &text)], &previous);
    stored.lock().unwrap().insert(id.clone(), done.clone());
    if body["stream"] != json!(true) {
        return json_reply(200, done);
    }
    let started = response(&id, dep, "in_progress", vec![], &previous);
    let item = format!("msg_{id}");
    let mut item_started = message(&id, "");
    item_started["status"] = json!("in_progress");
    item_started["content"] = json!([]);
    let part = |text: &str| json!({"type": "output_text", "text": text, "annotations": []});
    let mut events = vec![
        ("response.created", json!({"response": started})),
        ("response.in_progress", json!({"response": started})),
        (
            "response.output_item.added",
            json!({"output_index": 0, "item": item_started}),
        ),
        (
            "response.content_part.added",
            json!({"item_id": item, "output_index": 0, "content_index": 0, "part": part("")}),
        ),
    ];
    for delta in ["Hello", " from ", dep] {
        events.push((
            "response.output_text.delta",
            json!({"item_id": item, "output_index": 0, "content_index": 0, "delta": delta, "logprobs": []}),
        ));
    }
    events.extend([
        (
            "response.output_text.done",
            json!({"item_id": item, "output_index": 0, "content_index": 0, "text": text, "logprobs": []}),
        ),
        (
            "response.content_part.done",
            json!({"item_id": item, "output_index": 0, "content_index": 0, "part": part(&text)}),
        ),
        (
            "response.output_item.done",
            json!({"output_index": 0, "item": message(&id, &text)}),
        ),
        ("response.completed", json!({"response": done})),
    ]);
    let events = events
        .into_iter()
        .enumerate()
        .map(|(n, (kind, mut data))| {
            data["type"] = json!(kind);
            data["sequence_number"] = json!(n);
            format!("event: {kind}\ndata: {data}")
        })
        .collect();
    MockReply::Sse {
        first_after: Duration::ZERO,
        events,
        gap: Duration::from_millis(2),
        end: SseEnd::Close,
    }
}

/// `GET`/`DELETE responses/{id}`, `GET responses/{id}/input_items`,
/// `POST responses/{id}/cancel`.
fn stored_response(stored: &Stored, req: &Recorded, rest: &str) -> MockReply {
    let (id, what) = rest.split_once('/').unwrap_or((rest, ""));
    let mut responses = stored.lock().unwrap();
    let Some(found) = responses.get(id).cloned() else {
        return not_found(
            format!("Response with id '{id}' not found."),
            "response_id",
            "not_found",
        );
    };
    match (req.method.as_str(), what) {
        ("GET", "") => json_reply(200, found),
        ("DELETE", "") => {
            responses.remove(id);
            json_reply(
                200,
                json!({"id": id, "object": "response.deleted", "deleted": true}),
            )
        }
        ("GET", "input_items") => json_reply(
            200,
            json!({"object": "list", "data": [], "first_id": null, "last_id": null, "has_more": false}),
        ),
        ("POST", "cancel") => {
            let mut cancelled = found;
            cancelled["status"] = json!("cancelled");
            json_reply(200, cancelled)
        }
        _ => json_reply(
            405,
            json!({"error": {"message": "method not allowed", "type": "invalid_request_error", "param": null, "code": null}}),
        ),
    }
}
