//! What the proxy reads from and changes in a request body (DESIGN §5.2). `Meta` is
//! read in one pass by serde visitors that count text as it goes by and skip the rest,
//! so no part of the document is ever built: a body of nine million empty messages
//! costs a counter, not nine million values. The edits the upstream needs (the
//! deployment as `model`, asking for stream usage) are spliced into the client's bytes.

use crate::error::Error;
use crate::json::{for_each_member, skip_space};
use crate::outcome::estimate_text;
use crate::upstream::Op;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use std::fmt;
use std::ops::Range;

/// What routing and the token estimate need from a body.
#[derive(Debug, Default, PartialEq)]
pub struct Meta {
    pub model: Option<String>,
    pub stream: bool,
    /// The client asked for `stream_options.include_usage`.
    pub include_usage: bool,
    /// The Responses API's `previous_response_id`: the conversation to continue.
    pub previous_response_id: Option<String>,
    /// Estimated tokens of the prompt: message, prompt, input and instructions text,
    /// tool-call arguments, and the tool, function and response-format schemas.
    text_tokens: u64,
    messages: u64,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
    n: Option<u64>,
    best_of: Option<u64>,
}

/// Per-message and per-reply framing tokens of the chat format.
const TOKENS_PER_MESSAGE: u64 = 4;
const TOKENS_PER_REPLY: u64 = 3;

impl Meta {
    /// Reads `body`, which must be one JSON object.
    #[inline(never)]
    pub fn parse(body: &[u8]) -> Result<Meta, Error> {
        if body.trim_ascii_start().first() != Some(&b'{') {
            return Err(Error::InvalidJson(
                "We could not parse the JSON body of your request: it must be a JSON object."
                    .into(),
            ));
        }
        let mut de = serde_json::Deserializer::from_slice(body);
        Meta::deserialize(&mut de)
            .and_then(|m| de.end().map(|()| m))
            .map_err(|e| {
                Error::InvalidJson(format!(
                    "We could not parse the JSON body of your request. ({e})"
                ))
            })
    }

    /// What an upload tells: its model only.
    pub fn of_model(model: String) -> Meta {
        Meta {
            model: Some(model),
            ..Meta::default()
        }
    }

    /// The prompt's estimated tokens, framing included.
    pub fn prompt_tokens(&self) -> u64 {
        let framing = if self.messages > 0 {
            self.messages
                .saturating_mul(TOKENS_PER_MESSAGE)
                .saturating_add(TOKENS_PER_REPLY)
        } else {
            0
        };
        self.text_tokens.saturating_add(framing)
    }

    /// The most tokens this request can use, as Azure's limiter counts it (DESIGN §7):
    /// prompt estimate + completion reserve × the number of completions; the prompt
    /// alone for embeddings; nothing for images and audio, which count only as
    /// requests. Saturates rather than wraps, so an absurd `max_tokens` stays absurd.
    /// The reserve is the largest of the three limits present: the upstream obeys the
    /// one its API reads, which the proxy cannot know, so a small decoy in another field
    /// cannot lower the reservation.
    pub fn estimate(&self, op: Op, default_completion: u64) -> u64 {
        if !op.counts_tokens() {
            return 0;
        }
        let prompt = self.prompt_tokens();
        if op == Op::Embeddings {
            return prompt;
        }
        let reserve = [
            self.max_completion_tokens,
            self.max_output_tokens,
            self.max_tokens,
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(default_completion);
        let copies = self.n.unwrap_or(1).max(self.best_of.unwrap_or(1)).max(1);
        prompt.saturating_add(reserve.saturating_mul(copies))
    }
}

/// The top-level keys `Meta` reads; anything else is skipped.
enum Key {
    Model,
    Stream,
    StreamOptions,
    Messages,
    /// Text the model reads: `prompt`, `input`, `instructions`.
    Text,
    /// Definitions the model reads, counted whole: `tools`, `functions`,
    /// `response_format`, the Responses API's `text` (its output format).
    Schema,
    MaxTokens,
    MaxCompletionTokens,
    MaxOutputTokens,
    N,
    BestOf,
    PreviousResponseId,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
                Ok(match key {
                    "model" => Key::Model,
                    "stream" => Key::Stream,
                    "stream_options" => Key::StreamOptions,
                    "messages" => Key::Messages,
                    "prompt" | "input" | "instructions" => Key::Text,
                    "tools" | "functions" | "response_format" | "text" => Key::Schema,
                    "max_tokens" => Key::MaxTokens,
                    "max_completion_tokens" => Key::MaxCompletionTokens,
                    "max_output_tokens" => Key::MaxOutputTokens,
                    "n" => Key::N,
                    "best_of" => Key::BestOf,
                    "previous_response_id" => Key::PreviousResponseId,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

impl<'de> Deserialize<'de> for Meta {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Meta, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Meta;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Meta, A::Error> {
                let mut meta = Meta::default();
                let mut seen_model = false;
                let add = |meta: &mut Meta, n: u64| {
                    meta.text_tokens = meta.text_tokens.saturating_add(n);
                };
                while let Some(key) = map.next_key::<Key>()? {
                    match key {
                        // Two models would let routing and the upstream read different ones.
                        Key::Model if seen_model => {
                            return Err(de::Error::custom("duplicate field `model`"))
                        }
                        Key::Model => {
                            seen_model = true;
                            meta.model = Some(map.next_value()?);
                        }
                        Key::Stream => {
                            meta.stream = map.next_value::<Option<bool>>()? == Some(true)
                        }
                        Key::StreamOptions => {
                            meta.include_usage = map
                                .next_value::<Option<StreamOptions>>()?
                                .and_then(|o| o.include_usage)
                                == Some(true)
                        }
                        Key::Messages => {
                            let m: Messages = map.next_value()?;
                            meta.messages = meta.messages.saturating_add(m.count);
                            add(&mut meta, m.tokens);
                        }
                        Key::Text => add(&mut meta, map.next_value::<Tokens>()?.0),
                        Key::Schema => add(&mut meta, map.next_value::<AllText>()?.0),
                        Key::MaxTokens => meta.max_tokens = map.next_value::<Count>()?.0,
                        Key::MaxCompletionTokens => {
                            meta.max_completion_tokens = map.next_value::<Count>()?.0
                        }
                        Key::MaxOutputTokens => {
                            meta.max_output_tokens = map.next_value::<Count>()?.0
                        }
                        Key::N => meta.n = map.next_value::<Count>()?.0,
                        Key::BestOf => meta.best_of = map.next_value::<Count>()?.0,
                        Key::PreviousResponseId => meta.previous_response_id = map.next_value()?,
                        Key::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(meta)
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// A count the client sets (`max_tokens`, `n`): an integer, or a number such as `100.0`
/// (read as its whole part); negative counts as 0; `null` as absent.
struct Count(Option<u64>);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Count, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number")
            }
            fn visit_u64<E>(self, n: u64) -> Result<Count, E> {
                Ok(Count(Some(n)))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Count, E> {
                Ok(Count(Some(n.max(0) as u64)))
            }
            fn visit_f64<E>(self, n: f64) -> Result<Count, E> {
                // `as` saturates: 1e300 reads as u64::MAX, -5.0 as 0.
                Ok(Count(Some(n as u64)))
            }
            fn visit_unit<E>(self) -> Result<Count, E> {
                Ok(Count(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// `messages`: how many, and the tokens of their text.
struct Messages {
    count: u64,
    tokens: u64,
}

impl<'de> Deserialize<'de> for Messages {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Messages, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Messages;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of messages")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Messages, A::Error> {
                let mut m = Messages {
                    count: 0,
                    tokens: 0,
                };
                while let Some(Message(tokens)) = seq.next_element()? {
                    m.count += 1;
                    m.tokens = m.tokens.saturating_add(tokens);
                }
                Ok(m)
            }
            fn visit_unit<E>(self) -> Result<Messages, E> {
                Ok(Messages {
                    count: 0,
                    tokens: 0,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// One message: the tokens of its `content` and of its tool calls (their names and
/// arguments); other fields are skipped.
struct Message(u64);

impl<'de> Deserialize<'de> for Message {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Message, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Message;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a message object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Message, A::Error> {
                let mut tokens = 0u64;
                while let Some(key) = map.next_key::<FieldName>()? {
                    let n = match key {
                        FieldName::Content => map.next_value::<Tokens>()?.0,
                        FieldName::Calls => map.next_value::<AllText>()?.0,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            0
                        }
                    };
                    tokens = tokens.saturating_add(n);
                }
                Ok(Message(tokens))
            }
        }
        d.deserialize_map(V)
    }
}

/// The keys of a message, an input item or a content part that hold what the model
/// reads.
enum FieldName {
    /// `content`: text, or a list of parts.
    Content,
    /// `text` (a part), `output` and `arguments` (a function call and its result).
    Text,
    /// `tool_calls`, `function_call`: names and arguments.
    Calls,
    Other,
}

impl<'de> Deserialize<'de> for FieldName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<FieldName, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = FieldName;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<FieldName, E> {
                Ok(match key {
                    "content" => FieldName::Content,
                    "text" | "output" | "arguments" => FieldName::Text,
                    "tool_calls" | "function_call" => FieldName::Calls,
                    _ => FieldName::Other,
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

/// The tokens of a text value: a string; a list of strings, token ids, token-id lists,
/// content parts or input items (only their text counts: an image's size is not in its
/// bytes). A token id, or anything else a list holds, counts as one token.
struct Tokens(u64);

impl<'de> Deserialize<'de> for Tokens {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Tokens, D::Error> {
        d.deserialize_any(TokensVisitor { nested: false })
    }
}

/// `nested`: inside a list, where a list is a token-id list and a number one token.
struct TokensVisitor {
    nested: bool,
}

impl<'de> Visitor<'de> for TokensVisitor {
    type Value = Tokens;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("text, a list, or a content part")
    }
    fn visit_str<E>(self, s: &str) -> Result<Tokens, E> {
        Ok(Tokens(estimate_text(s)))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Tokens, E> {
        Ok(Tokens(u64::from(self.nested)))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Tokens, E> {
        Ok(Tokens(u64::from(self.nested)))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Tokens, E> {
        Ok(Tokens(u64::from(self.nested)))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Tokens, E> {
        Ok(Tokens(u64::from(self.nested)))
    }
    fn visit_unit<E>(self) -> Result<Tokens, E> {
        Ok(Tokens(0))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Tokens, A::Error> {
        let mut total = 0u64;
        if self.nested {
            // A token-id list: one token per element, whatever it holds.
            while seq.next_element::<IgnoredAny>()?.is_some() {
                total = total.saturating_add(1);
            }
        } else {
            while let Some(Item(n)) = seq.next_element()? {
                total = total.saturating_add(n);
            }
        }
        Ok(Tokens(total))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Tokens, A::Error> {
        let mut total = 0u64;
        while let Some(key) = map.next_key::<FieldName>()? {
            let n = match key {
                FieldName::Text | FieldName::Content => map.next_value::<Tokens>()?.0,
                FieldName::Calls => map.next_value::<AllText>()?.0,
                FieldName::Other => {
                    map.next_value::<IgnoredAny>()?;
                    0
                }
            };
            total = total.saturating_add(n);
        }
        Ok(Tokens(total))
    }
}

/// One element of a text list.
struct Item(u64);

impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Item, D::Error> {
        d.deserialize_any(TokensVisitor { nested: true })
            .map(|t| Item(t.0))
    }
}

/// The tokens of a whole value as the model reads a definition: every key and string
/// as text, every other scalar as one token (a tool's JSON schema, call arguments).
struct AllText(u64);

impl<'de> Deserialize<'de> for AllText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<AllText, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = AllText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E>(self, s: &str) -> Result<AllText, E> {
                Ok(AllText(estimate_text(s)))
            }
            fn visit_u64<E>(self, _: u64) -> Result<AllText, E> {
                Ok(AllText(1))
            }
            fn visit_i64<E>(self, _: i64) -> Result<AllText, E> {
                Ok(AllText(1))
            }
            fn visit_f64<E>(self, _: f64) -> Result<AllText, E> {
                Ok(AllText(1))
            }
            fn visit_bool<E>(self, _: bool) -> Result<AllText, E> {
                Ok(AllText(1))
            }
            fn visit_unit<E>(self) -> Result<AllText, E> {
                Ok(AllText(0))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<AllText, A::Error> {
                let mut total = 0u64;
                while let Some(AllText(n)) = seq.next_element()? {
                    total = total.saturating_add(n);
                }
                Ok(AllText(total))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AllText, A::Error> {
                let mut total = 0u64;
                while let Some(AllText(k)) = map.next_key()? {
                    let AllText(v) = map.next_value()?;
                    total = total.saturating_add(k).saturating_add(v);
                }
                Ok(AllText(total))
            }
        }
        d.deserialize_any(V)
    }
}

/// The body an instance receives: the client's bytes, unless the proxy must ask for
/// stream usage or name the deployment as `model`. Then only those members are
/// replaced or added; the rest of the bytes are copied as they are. `body` must be a
/// JSON object that `Meta::parse` accepted.
pub fn for_upstream(body: &[u8], ask_usage: bool, set_model: Option<&str>) -> Vec<u8> {
    let Some(open) = body.iter().position(|&b| b == b'{') else {
        return body.to_vec();
    };
    let mut model = None;
    let mut options = None;
    for_each_member(body, open, |key, member, value| match key {
        b"model" => model = Some(member.start..value.end),
        b"stream_options" => options = Some(value),
        _ => {}
    });
    // Each edit: replace this range of the body with these bytes.
    let mut edits: Vec<(Range<usize>, Vec<u8>)> = Vec::new();
    // Members to add at the start of the object.
    let mut added: Vec<Vec<u8>> = Vec::new();
    if let Some(deployment) = set_model {
        let member =
            format!("\"model\":{}", serde_json::Value::String(deployment.into())).into_bytes();
        match model {
            Some(range) => edits.push((range, member)),
            None => added.push(member),
        }
    }
    if ask_usage {
        const ASK: &[u8] = b"\"include_usage\":true";
        match options {
            Some(value) if body.get(value.start) == Some(&b'{') => {
                let mut existing = None;
                for_each_member(body, value.start, |key, member, value| {
                    if key == b"include_usage" {
                        existing = Some(member.start..value.end);
                    }
                });
                match existing {
                    Some(range) => edits.push((range, ASK.to_vec())),
                    None => edits.push(insert_members(body, value.start, vec![ASK.to_vec()])),
                }
            }
            Some(value) => edits.push((value, [b"{", ASK, b"}"].concat())),
            None => added.push([b"\"stream_options\":{", ASK, b"}"].concat()),
        }
    }
    if !added.is_empty() {
        edits.push(insert_members(body, open, added));
    }
    edits.sort_by_key(|(range, _)| (range.start, range.end));
    let mut out = Vec::with_capacity(body.len() + 64);
    let mut at = 0;
    for (range, bytes) in edits {
        out.extend_from_slice(&body[at..range.start]);
        out.extend_from_slice(&bytes);
        at = range.end;
    }
    out.extend_from_slice(&body[at..]);
    out
}

/// The edit that adds `members` at the start of the object that opens at `open`.
fn insert_members(json: &[u8], open: usize, members: Vec<Vec<u8>>) -> (Range<usize>, Vec<u8>) {
    let mut bytes = members.join(&b","[..]);
    if json.get(skip_space(json, open + 1)) != Some(&b'}') {
        bytes.push(b',');
    }
    (open + 1..open + 1, bytes)
}

#[cfg(test)]
mod tests {
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
        let m =
            Meta::parse(b" {\"model\":\"m\",\"stream\":true,\"extra\":{\"deep\":[1,2]}}").unwrap();
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
        let m =
            Meta::parse(br#"{"model":"m","previous_response_id":"resp_9","input":"x"}"#).unwrap();
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
}
