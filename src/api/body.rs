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
#[path = "body_tests.rs"]
mod tests;
