//! SSE pass-through (DESIGN §8): a stream's first event is awaited before anything
//! reaches the client (so that a stream that never starts can be retried elsewhere);
//! then each event is sent as soon as it is complete (the server writes it as one HTTP
//! chunk), the usage chunk is read, and when the proxy asked for usage on the client's
//! behalf, the usage chunk and the `"usage": null` of every other chunk are removed, so
//! the client gets the stream it asked for. A stream cut or stalled after bytes went
//! out ends with an explicit SSE error event.

use super::transport;
use super::Usage;
use crate::outcome::estimate_text;
use std::io::{self, Read};
use std::time::Instant;

/// Largest event the relay holds while waiting for its end; beyond it the upstream is
/// not speaking SSE and the stream is ended with an error.
const MAX_EVENT_BYTES: usize = 8 * 1024 * 1024;

/// Sends one piece of the stream to the client, now.
pub type Send<'a> = dyn FnMut(&[u8]) -> io::Result<()> + 'a;

#[derive(Debug, PartialEq)]
pub enum End {
    /// The upstream ended the stream (`[DONE]`, or the Responses API's last event) and
    /// everything reached the client.
    Completed,
    /// Writing to the client failed; the upstream call was abandoned.
    ClientGone,
    /// The proxy's shutdown cut the stream when its grace period ran out; the client
    /// got an SSE error event.
    Shutdown,
    /// The upstream broke off or stalled; the client got an SSE error event.
    UpstreamFailed(String),
}

/// How a relay treats the events it passes on.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// The proxy asked for usage on the client's behalf: the usage chunk and each
    /// chunk's `"usage": null` are not passed on.
    pub strip_usage: bool,
    /// The upstream reports no usage: count the tokens of the text it streams.
    pub count_text: bool,
}

#[derive(Debug)]
pub struct Summary {
    pub usage: Option<Usage>,
    /// Estimated tokens of the streamed text, when `Options::count_text`.
    pub text_tokens: u64,
    pub end: End,
}

/// Index just past the first event separator in `buf`: a blank line, with any of the
/// line ends the SSE spec allows (CRLF, LF, CR), mixed. A CR last in `buf` ends a line
/// without waiting for an LF that may follow (which then starts the next event, and
/// means nothing to it): an upstream that ends lines with CR alone must not have each
/// event held until the next arrives.
fn event_end(buf: &[u8]) -> Option<usize> {
    // The length of the line end at `i`, if one is there.
    let line_end = |i: usize| match buf.get(i) {
        Some(b'\n') => Some(1),
        Some(b'\r') if buf.get(i + 1) == Some(&b'\n') => Some(2),
        Some(b'\r') => Some(1),
        _ => None,
    };
    (0..buf.len()).find_map(|i| {
        let after = i + line_end(i)?;
        Some(after + line_end(after)?)
    })
}

/// The lines of an event, whatever their line ends (CRLF leaves empty lines between).
fn lines(event: &[u8]) -> impl Iterator<Item = &[u8]> {
    event.split(|&b| b == b'\n' || b == b'\r')
}

/// What one event means to the relay.
#[derive(Debug, PartialEq)]
enum Event {
    /// The stream's end: `[DONE]`, or the Responses API's `response.completed`
    /// (`.failed`, `.incomplete`), with the usage that one reports.
    Done(Option<Usage>),
    /// A chunk that carries usage and no choices: the extra one `include_usage` adds.
    UsageOnly(Usage),
    /// Any other event, the usage it carries, and the tokens of its text (counted only
    /// when asked).
    Other(Option<Usage>, u64),
}

/// The Responses API's events that end a stream.
const LAST_EVENTS: [&[u8]; 3] = [
    b"\"response.completed\"",
    b"\"response.failed\"",
    b"\"response.incomplete\"",
];

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn classify(event: &[u8], count_text: bool) -> Event {
    #[derive(serde::Deserialize)]
    struct Chunk {
        #[serde(default)]
        choices: Vec<serde::de::IgnoredAny>,
        usage: Option<Usage>,
    }
    #[derive(serde::Deserialize)]
    struct Last {
        response: Option<Chunk>,
    }
    let mut usage = None;
    let mut text = 0;
    for line in lines(event) {
        let Some(data) = line.strip_prefix(b"data:") else {
            continue;
        };
        let data = data.trim_ascii();
        if data == b"[DONE]" {
            return Event::Done(None);
        }
        if LAST_EVENTS.iter().any(|name| contains(data, name)) {
            let last = serde_json::from_slice::<Last>(data).ok();
            return Event::Done(last.and_then(|l| l.response?.usage));
        }
        // Only chunks that mention usage are worth a parse; not those with only the
        // `"usage":null` a usage request adds to every chunk.
        if contains(data, b"\"usage\"") && !contains(data, b"\"usage\":null") {
            if let Ok(chunk) = serde_json::from_slice::<Chunk>(data) {
                match chunk.usage {
                    Some(u) if chunk.choices.is_empty() => return Event::UsageOnly(u),
                    u => usage = usage.or(u),
                }
            }
        }
        if count_text {
            text += text_tokens(data);
        }
    }
    Event::Other(usage, text)
}

/// The tokens of the text a chunk streams: chat's `delta.content`, completions' `text`,
/// the Responses API's `delta`.
fn text_tokens(data: &[u8]) -> u64 {
    #[derive(serde::Deserialize, Default)]
    struct Delta {
        content: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Choice {
        #[serde(default)]
        delta: Delta,
        text: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Chunk {
        #[serde(default)]
        choices: Vec<Choice>,
        delta: Option<String>,
    }
    let Ok(chunk) = serde_json::from_slice::<Chunk>(data) else {
        return 0;
    };
    let mut tokens = chunk.delta.as_deref().map_or(0, estimate_text);
    for c in &chunk.choices {
        for text in [&c.delta.content, &c.text].into_iter().flatten() {
            tokens += estimate_text(text);
        }
    }
    tokens
}

/// A chunk without its top-level `"usage": null`, which the upstream adds to every
/// chunk once it is asked for usage; `None` when it has none.
fn without_null_usage(event: &[u8]) -> Option<Vec<u8>> {
    // One copy of the event, made at the first cut; `copied` bytes of it are in.
    let mut out: Option<Vec<u8>> = None;
    let (mut copied, mut line_start) = (0, 0);
    for line in event.split_inclusive(|&b| b == b'\n' || b == b'\r') {
        let cut = line
            .strip_prefix(b"data:")
            .and_then(|data| data.iter().position(|&b| b == b'{'))
            .and_then(|at| crate::json::member_cut(line, at + 5, b"usage", b"null"));
        if let Some(cut) = cut {
            let out = out.get_or_insert_with(|| Vec::with_capacity(event.len()));
            out.extend_from_slice(&event[copied..line_start + cut.start]);
            copied = line_start + cut.end;
        }
        line_start += line.len();
    }
    out.map(|mut out| {
        out.extend_from_slice(&event[copied..]);
        out
    })
}

/// Whether an event only announces the stream: Azure's prompt-filter chunk (no
/// choices yet), the Responses API's `response.created` and `response.in_progress`.
/// They come at once, before the model produces anything.
fn announces(event: &[u8]) -> bool {
    contains(event, b"\"choices\":[]")
        || contains(event, b"\"response.created\"")
        || contains(event, b"\"response.in_progress\"")
}

/// Reads from a stream that has just started until its first event with output (the
/// first byte of the answer, past the events that only announce it), for up to `by`
/// (`routing.first_byte_timeout` from when the request was sent), whatever the gap
/// allowed between later reads. The bytes read are the start of the relay.
pub fn first_event(upstream: &mut dyn Read, by: Instant) -> io::Result<Vec<u8>> {
    let _limit = transport::reads_until(by);
    let mut first = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    // Where the event being read starts, and how far it was searched for its end.
    let (mut event, mut searched) = (0, 0);
    loop {
        while let Some(len) = event_end(&first[searched..]).map(|l| l + searched - event) {
            if !announces(&first[event..event + len]) {
                return Ok(first);
            }
            event += len;
            searched = event;
        }
        searched = first.len().saturating_sub(3).max(event);
        match upstream.read(&mut buf) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the stream ended before its first event",
                ))
            }
            Ok(n) => first.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        if first.len() > MAX_EVENT_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the stream's start is larger than 8 MiB",
            ));
        }
    }
}

/// Whether a chunk ends a choice: a `finish_reason` that is not `null`.
fn finishes(event: &[u8]) -> bool {
    const KEY: &[u8] = b"\"finish_reason\"";
    let mut rest = event;
    while let Some(at) = rest.windows(KEY.len()).position(|w| w == KEY) {
        rest = &rest[at + KEY.len()..];
        let value = rest.trim_ascii_start().strip_prefix(b":");
        if value.is_some_and(|v| v.trim_ascii_start().starts_with(b"\"")) {
            return true;
        }
    }
    false
}

/// Whether `bytes` are the `data: [DONE]` line and nothing else.
fn is_done_line(bytes: &[u8]) -> bool {
    bytes
        .trim_ascii()
        .strip_prefix(b"data:")
        .is_some_and(|d| d.trim_ascii() == b"[DONE]")
}

pub fn error_event(message: &str) -> Vec<u8> {
    let body = serde_json::json!({"error": {"message": message, "type": "upstream_error",
                                              "param": null, "code": "stream_interrupted"}});
    format!("data: {body}\n\n").into_bytes()
}

/// Relays `upstream` to the client event by event until its last event, the
/// upstream's end or failure, or the client's disconnect. The caller ends the
/// response.
pub fn relay(upstream: &mut dyn Read, send: &mut Send<'_>, options: Options) -> Summary {
    // One small buffer, read into at its end: a held stream keeps it for its whole
    // life, and events are far smaller (it grows if one is not).
    const READ: usize = 4 * 1024;
    let mut pending: Vec<u8> = Vec::with_capacity(READ);
    let mut summary = Summary {
        usage: None,
        text_tokens: 0,
        end: End::Completed,
    };
    let mut done = false;
    // A chunk gave a `finish_reason`: a clean end after it is the stream's end (some
    // upstreams send no `[DONE]` after a content filter's).
    let mut finished = false;
    // `pending[..searched]` holds no event separator past the events already taken.
    let mut searched = 0;
    let failure = loop {
        let filled = pending.len();
        pending.resize(filled + READ, 0);
        let read = upstream.read(&mut pending[filled..]);
        pending.truncate(filled + *read.as_ref().unwrap_or(&0));
        match read {
            Ok(0) => {
                // Some upstreams end with `data: [DONE]` and one newline, not two: the
                // stream is complete all the same.
                let ended = done || finished || is_done_line(&pending);
                break (!ended)
                    .then(|| "the upstream closed the stream before its end".to_string());
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break Some(format!("the upstream stream failed: {e}")),
        }
        let mut start = 0;
        while let Some(offset) = event_end(&pending[searched..]) {
            let end = searched + offset;
            let event = &pending[start..end];
            (start, searched) = (end, end);
            let edited;
            let forward = match classify(event, options.count_text) {
                Event::Done(u) => {
                    done = true;
                    summary.usage = u.or(summary.usage);
                    Some(event)
                }
                Event::UsageOnly(u) => {
                    summary.usage = Some(u);
                    (!options.strip_usage).then_some(event)
                }
                Event::Other(u, text) => {
                    finished = finished || finishes(event);
                    summary.usage = u.or(summary.usage);
                    summary.text_tokens = summary.text_tokens.saturating_add(text);
                    edited = if options.strip_usage && contains(event, b"\"usage\"") {
                        without_null_usage(event)
                    } else {
                        None
                    };
                    Some(edited.as_deref().unwrap_or(event))
                }
            };
            if forward.is_some_and(|event| send(event).is_err()) {
                summary.end = End::ClientGone;
                return summary;
            }
        }
        pending.drain(..start);
        searched = pending.len().saturating_sub(3);
        if pending.len() > MAX_EVENT_BYTES {
            break Some("the upstream sent an event larger than 8 MiB".to_string());
        }
    };
    summary.end = match failure {
        // A partial event is dropped: glued to the error event it would corrupt both.
        // The upstream failed whether or not the client is still there to be told.
        Some(why) if !done => {
            let _ = send(&error_event(&why));
            End::UpstreamFailed(why)
        }
        // After the stream's last event nothing the upstream does is a failure, and
        // what it sent after is no event to pass on.
        Some(_) => End::Completed,
        // Bytes after the last event without a separator: pass them on unchanged.
        None => match send(&pending) {
            Ok(()) => End::Completed,
            Err(_) => End::ClientGone,
        },
    };
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &[u8], strip: bool) -> (String, Summary) {
        run_with(
            input,
            Options {
                strip_usage: strip,
                count_text: false,
            },
        )
    }

    fn run_with(input: &[u8], options: Options) -> (String, Summary) {
        let mut sent: Vec<Vec<u8>> = Vec::new();
        // Feed in 7-byte reads so events straddle read boundaries.
        struct Slow<'a>(&'a [u8]);
        impl Read for Slow<'_> {
            fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                let n = self.0.len().min(7).min(b.len());
                b[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let summary = relay(
            &mut Slow(input),
            &mut |piece| {
                sent.push(piece.to_vec());
                Ok(())
            },
            options,
        );
        // Each event went out as its own piece.
        for piece in &sent[..sent.len().saturating_sub(1)] {
            assert_eq!(event_end(piece), Some(piece.len()), "{piece:?}");
        }
        (String::from_utf8(sent.concat()).unwrap(), summary)
    }

    /// A connection that fails.
    struct Broken;
    impl Read for Broken {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::ErrorKind::ConnectionReset.into())
        }
    }

    const STREAM: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n\
data: [DONE]\n\n";

    #[test]
    fn strips_the_usage_only_chunk_and_keeps_its_numbers() {
        let (body, s) = run(STREAM.as_bytes(), true);
        assert_eq!(s.end, End::Completed);
        assert_eq!(
            s.usage,
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 2,
                total_tokens: 7
            })
        );
        assert!(!body.contains("usage"), "{body}");
        assert!(
            body.contains("\"Hi\"") && body.ends_with("data: [DONE]\n\n"),
            "{body}"
        );
    }

    #[test]
    fn keeps_the_usage_chunk_when_the_client_asked_for_it() {
        let (body, s) = run(STREAM.as_bytes(), false);
        assert_eq!(body, STREAM);
        assert_eq!(s.usage.map(|u| u.total_tokens), Some(7));
    }

    #[test]
    fn crlf_separators_and_comments_pass_unchanged() {
        let input = ": keep-alive\r\n\r\ndata: {\"choices\":[{}]}\r\n\r\ndata: [DONE]\r\n\r\n";
        let (body, s) = run(input.as_bytes(), true);
        assert_eq!(body, input);
        assert_eq!(s.end, End::Completed);
    }

    #[test]
    fn every_blank_line_the_sse_spec_allows_ends_an_event() {
        for sep in [
            "\n\n", "\r\n\r\n", "\r\r", "\n\r\n", "\r\n\n", "\r\r\n", "\n\r",
        ] {
            let event = format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"a\"}}}}]}}{sep}");
            assert_eq!(event_end(event.as_bytes()), Some(event.len()), "{sep:?}");
            let (body, s) = run(format!("{event}data: [DONE]{sep}").as_bytes(), false);
            assert_eq!(s.end, End::Completed, "{sep:?}");
            assert!(body.starts_with(&event), "{sep:?}");
        }
        // One line end is no blank line.
        for one in [
            "data: x\n",
            "data: x\r\n",
            "data: x\r",
            "data: x\r\ndata: y\n",
        ] {
            assert_eq!(event_end(one.as_bytes()), None, "{one:?}");
        }
    }

    #[test]
    fn a_finish_reason_then_a_clean_end_completes_and_anything_after_done_is_no_failure() {
        let filtered =
            "data: {\"choices\":[{\"delta\":{},\"finish_reason\" : \"content_filter\"}]}\n\n";
        assert_eq!(run(filtered.as_bytes(), false).1.end, End::Completed);
        let open =
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"},\"finish_reason\":null}]}\n\n";
        assert!(matches!(
            run(open.as_bytes(), false).1.end,
            End::UpstreamFailed(_)
        ));
        // `[DONE]`, then junk, then a read error.
        let junk = format!("{STREAM}junk");
        let mut sent = Vec::new();
        let s = relay(
            &mut junk.as_bytes().chain(Broken),
            &mut |piece| {
                sent.extend_from_slice(piece);
                Ok(())
            },
            Options::default(),
        );
        assert_eq!(s.end, End::Completed);
        assert_eq!(sent, STREAM.as_bytes(), "no error event after [DONE]");
    }

    #[test]
    fn a_cut_stream_ends_with_an_error_event() {
        let (body, s) = run(b"data: {\"choices\":[{}]}\n\ndata: {\"cho", true);
        assert!(matches!(s.end, End::UpstreamFailed(_)), "{:?}", s.end);
        let last = body.rsplit("\n\n").nth(1).unwrap();
        let err: serde_json::Value =
            serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(err["error"]["code"], "stream_interrupted");
    }

    #[test]
    fn a_last_done_without_its_blank_line_still_completes_the_stream() {
        let input = "data: {\"choices\":[{}]}\n\ndata: [DONE]\n";
        let (body, s) = run(input.as_bytes(), true);
        assert_eq!((body.as_str(), s.end), (input, End::Completed));
        // But a cut in the middle of an event is still a cut.
        let (_, s) = run(b"data: {\"choices\":[{}]}\n\ndata: [DO", true);
        assert!(matches!(s.end, End::UpstreamFailed(_)), "{:?}", s.end);
    }

    #[test]
    fn a_client_that_leaves_stops_the_relay() {
        let mut calls = 0;
        let s = relay(
            &mut STREAM.as_bytes(),
            &mut |_| {
                calls += 1;
                Err(io::ErrorKind::BrokenPipe.into())
            },
            Options::default(),
        );
        assert_eq!((s.end, calls), (End::ClientGone, 1));
    }

    const RESPONSES: &str = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"usage\":null}}\n\n\
event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hello there\"}\n\n\
event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"usage\":{\"input_tokens\":9,\"output_tokens\":3,\"total_tokens\":12}}}\n\n";

    #[test]
    fn a_responses_stream_ends_with_its_completed_event_and_reports_its_usage() {
        let (body, s) = run(RESPONSES.as_bytes(), false);
        assert_eq!(body, RESPONSES, "named events pass unchanged");
        assert_eq!(s.end, End::Completed, "no [DONE] in the Responses API");
        assert_eq!(
            s.usage,
            Some(Usage {
                prompt_tokens: 9,
                completion_tokens: 3,
                total_tokens: 12
            })
        );
        let cut = &RESPONSES[..RESPONSES.find("event: response.completed").unwrap()];
        let (_, s) = run(cut.as_bytes(), false);
        assert!(matches!(s.end, End::UpstreamFailed(_)), "{:?}", s.end);
    }

    #[test]
    fn streamed_text_is_counted_when_the_upstream_reports_no_usage() {
        let chat =
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hello, world!\"}}]}\n\ndata: [DONE]\n\n";
        let counting = Options {
            strip_usage: false,
            count_text: true,
        };
        let (_, s) = run_with(chat.as_bytes(), counting);
        assert_eq!((s.usage, s.text_tokens), (None, 4));
        let (_, s) = run_with(RESPONSES.as_bytes(), counting);
        assert_eq!(s.text_tokens, 3, "\"Hello there\"");
    }
}
