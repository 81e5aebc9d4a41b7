//! Unit tests of `api::body`: what is read from a body, the estimate, the edits.

use super::*;
use serde_json::{json, Value};

fn edited(body: &str, ask_usage: bool, model: Option<&str>) -> Value {
    let out = for_upstream(body.as_bytes(), ask_usage, model);
    serde_json::from_slice(&out)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out)))
}

#[test]
fn edits_touch_only_the_members_they_change() {
    let body = r#"{"model":"m","messages":[{"role":"user","content":"a,}\"{"}],"stream":true}"#;
    assert_eq!(for_upstream(body.as_bytes(), false, None), body.as_bytes());
    let out = for_upstream(body.as_bytes(), true, Some("dep"));
    assert_eq!(
        String::from_utf8(out).unwrap(),
        r#"{"stream_options":{"include_usage":true},"model":"dep","messages":[{"role":"user","content":"a,}\"{"}],"stream":true}"#
    );
    assert_eq!(
        edited(
            r#"{"model":"m","stream_options":{"other":1,"include_usage":false}}"#,
            true,
            None
        )["stream_options"],
        json!({"other": 1, "include_usage": true})
    );
    assert_eq!(
        edited(r#"{"model":"m","stream_options":{}}"#, true, None)["stream_options"],
        json!({"include_usage": true})
    );
    assert_eq!(
        edited(r#"{"model":"m","stream_options":null}"#, true, None)["stream_options"],
        json!({"include_usage": true})
    );
    assert_eq!(
        edited(r#"{ }"#, false, Some("d\"x")),
        json!({"model": "d\"x"})
    );
    assert_eq!(
        edited(
            r#"{"mod\u0065l":"m","x":[1,{"model":"inner"}]}"#,
            false,
            Some("dep")
        ),
        json!({"model": "dep", "x": [1, {"model": "inner"}]}),
        "an escaped key is still the model; nested ones are not"
    );
}

#[test]
fn broken_input_is_passed_on_not_a_panic() {
    // Only bodies `Meta::parse` accepted get here; these check it cannot panic anyway.
    for body in [
        &b"{\""[..],
        b"{",
        b"{\"a\"",
        b"{\"a\":",
        b"{\"stream_options\":",
        b"x",
    ] {
        for_upstream(body, true, Some("d"));
    }
}

#[test]
fn meta_needs_one_json_object() {
    assert!(Meta::parse(b"[1]").is_err());
    assert!(Meta::parse(b"{\"model\": 5}").is_err());
    assert!(Meta::parse(b"{\"model\": \"m\"} trailing").is_err());
    assert!(Meta::parse(b"{\"model\":\"a\",\"model\":\"b\"}").is_err());
    let m = Meta::parse(b" {\"model\":\"m\",\"stream\":true,\"extra\":{\"deep\":[1,2]}}").unwrap();
    assert_eq!((m.model.as_deref(), m.stream), (Some("m"), true));
    let m = Meta::parse(br#"{"stream_options":{"include_usage":true,"x":[1]}}"#).unwrap();
    assert!(m.include_usage && m.model.is_none());
}

#[test]
fn request_estimates_are_pinned() {
    let est = |body: &str, op| Meta::parse(body.as_bytes()).unwrap().estimate(op, 1000);
    // 2 messages: 2 × 4 framing + 3 reply + "Hello, world!" (4) + "你好" (2); reserve 50.
    let chat = r#"{"messages":[{"role":"system","content":"Hello, world!"},
                   {"role":"user","content":[{"type":"text","text":"你好"},
                    {"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}],
                   "max_tokens":50}"#;
    assert_eq!(est(chat, Op::Chat), 8 + 3 + 4 + 2 + 50);
    assert_eq!(
        est(r#"{"messages":[{"role":"user","content":null}]}"#, Op::Chat),
        4 + 3 + 1000,
        "default reserve"
    );
    assert_eq!(
        est(
            r#"{"prompt":"abcdefgh","max_tokens":10,"n":3,"best_of":2}"#,
            Op::Completions
        ),
        2 + 30
    );
    assert_eq!(
        est(
            r#"{"prompt":"abcd","max_completion_tokens":7,"max_tokens":99}"#,
            Op::Completions
        ),
        1 + 99,
        "the largest limit present"
    );
    assert_eq!(
        est(r#"{"max_output_tokens":1,"max_tokens":90000}"#, Op::Chat),
        90000,
        "a decoy cannot lower the reserve"
    );
    assert_eq!(
        est(
            r#"{"input":["abcd","efgh"],"max_tokens":10}"#,
            Op::Embeddings
        ),
        2,
        "inputs only"
    );
    assert_eq!(est(r#"{"input":[[1,2,3],[4]]}"#, Op::Embeddings), 4);
    assert_eq!(est(r#"{"input":[5,6,7]}"#, Op::Embeddings), 3);
    assert_eq!(
        est(r#"{"prompt":"abcd","max_tokens":100.0}"#, Op::Completions),
        101
    );
    assert_eq!(
        est(
            r#"{"prompt":"","max_tokens":1e300,"n":1e300}"#,
            Op::Completions
        ),
        u64::MAX,
        "saturates"
    );
    assert_eq!(est(r#"{"prompt":"","max_tokens":-5}"#, Op::Completions), 0);
}

#[test]
fn tools_schemas_and_calls_count_in_the_prompt() {
    let est = |body: &str, op| Meta::parse(body.as_bytes()).unwrap().estimate(op, 0);
    // A tool's schema: every key and string as text ("type" 1, "function" 2,
    // "function" 2, "name" 1, "get_weather" 3, "parameters" 3, "type" 1, "object" 2).
    let tools = r#"{"messages":[],"tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}],"parallel_tool_calls":true}"#;
    assert_eq!(est(tools, Op::Chat), 1 + 2 + 2 + 1 + 3 + 3 + 1 + 2);
    // A tool call's arguments and its result, in the messages.
    let calls = r#"{"messages":[{"role":"assistant","content":null,"tool_calls":[{"function":{"arguments":"{\"city\":\"Paris\"}"}}]},
                               {"role":"tool","content":"sunny"}]}"#;
    // "function" 2, "arguments" 3, the arguments 4; "sunny" 2.
    assert_eq!(est(calls, Op::Chat), 2 * 4 + 3 + (2 + 3 + 4) + 2);
    let format =
        r#"{"prompt":"","response_format":{"type":"json_schema","json_schema":{"name":"x"}}}"#;
    assert_eq!(est(format, Op::Completions), 1 + 3 + 3 + 1 + 1);
}

#[test]
fn responses_requests_count_input_instructions_and_output_reserve() {
    let est = |body: &str| {
        Meta::parse(body.as_bytes())
            .unwrap()
            .estimate(Op::Responses, 1000)
    };
    assert_eq!(
        est(r#"{"input":"Hello, world!","max_output_tokens":20}"#),
        4 + 20
    );
    assert_eq!(
        est(
            r#"{"instructions":"abcd","input":[{"role":"user","content":[{"type":"input_text","text":"abcdefgh"}]},
                {"type":"function_call_output","call_id":"c1","output":"abcd"}]}"#
        ),
        1 + 2 + 1 + 1000
    );
    let m = Meta::parse(br#"{"model":"m","previous_response_id":"resp_9","input":"x"}"#).unwrap();
    assert_eq!(m.previous_response_id.as_deref(), Some("resp_9"));
    assert_eq!(
        Meta::parse(br#"{"model":"dall-e-3","prompt":"a cat"}"#)
            .unwrap()
            .estimate(Op::Images, 1000),
        0,
        "images count as requests only"
    );
}

#[test]
fn wide_bodies_are_counted_not_built() {
    let mut body = br#"{"model":"m","messages":["#.to_vec();
    body.extend(b"{},".repeat(100_000));
    body.extend(b"{}]}");
    let m = Meta::parse(&body).unwrap();
    assert_eq!(m.messages, 100_001);
    assert_eq!(m.estimate(Op::Chat, 0), 100_001 * 4 + 3);
}
