//! SSE pass-through (DESIGN §8): a stream's first event is awaited before anything
//! reaches the client (so that a stream that never starts can be retried elsewhere);
//! then each event is sent as soon as it is complete (the server writes it as one HTTP
//! chunk), the usage chunk is read, and when the proxy asked for usage on the client's
//! behalf, the usage chunk and the `"usage": null` of every other chunk are removed, so
//! the client gets the stream it asked for. A stream cut or stalled after bytes went
//! out ends with an explicit SSE error event.

use super::transport;
use super::Usage;
use std::io::{self, Read};
use std::time::Instant;

/// Largest event the relay holds while waiting for its end; beyond it the upstream is
/// not speaking SSE and the stream is ended with an error.
const MAX_EVENT_BYTES: usize = 8 * 1024 * 1024;

/// Sends one piece of the stream to the client, now.
pub type Send<'a> = dyn FnMut(&[u8]) -> io::Result<()> + 'a;

#[derive(Debug, PartialEq)]
pub enum End {
    /// The upstream sent `[DONE]` and everything reached the client.
    Completed,
    /// Writing to the client failed; the upstream call was abandoned.
    ClientGone,
    /// The upstream broke off or stalled; the client got an SSE error event.
    UpstreamFailed(String),
}

#[derive(Debug)]
pub struct Summary {
    pub usage: Option<Usage>,
    pub end: End,
}

/// Index just past the first event separator (a blank line) in `buf`.
fn event_end(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// What one event means to the relay.
#[derive(Debug, PartialEq)]
enum Event {
    Done,
    /// A chunk that carries usage and no choices: the extra one `include_usage` adds.
    UsageOnly(Usage),
    Other(Option<Usage>),
}

fn classify(event: &[u8]) -> Event {
    #[derive(serde::Deserialize)]
    struct Chunk {
        #[serde(default)]
        choices: Vec<serde::de::IgnoredAny>,
        usage: Option<Usage>,
    }
    let mut usage = None;
    for line in event.split(|&b| b == b'\n') {
        let Some(data) = line.strip_prefix(b"data:") else {
            continue;
        };
        let data = data.trim_ascii();
        if data == b"[DONE]" {
            return Event::Done;
        }
        // Only chunks that mention usage are worth a parse.
        if data.windows(7).any(|w| w == b"\"usage\"") {
            if let Ok(chunk) = serde_json::from_slice::<Chunk>(data) {
                match chunk.usage {
                    Some(u) if chunk.choices.is_empty() => return Event::UsageOnly(u),
                    u => usage = usage.or(u),
                }
            }
        }
    }
    Event::Other(usage)
}

/// A chunk without its top-level `"usage": null`, which the upstream adds to every
/// chunk once it is asked for usage; `None` when it has none.
fn without_null_usage(event: &[u8]) -> Option<Vec<u8>> {
    let mut edited = false;
    let lines: Vec<Vec<u8>> = event
        .split_inclusive(|&b| b == b'\n')
        .map(|line| {
            let open = line
                .strip_prefix(b"data:")
                .and_then(|data| data.iter().position(|&b| b == b'{'))
                .map(|at| at + 5);
            match open.and_then(|open| crate::json::without_member(line, open, b"usage", b"null")) {
                Some(shorter) => {
                    edited = true;
                    shorter
                }
                None => line.to_vec(),
            }
        })
        .collect();
    edited.then(|| lines.concat())
}

/// Reads from a stream that has just started until its first event is complete, for up
/// to `by` (`routing.first_byte_timeout` from when the request was sent), whatever the
/// gap allowed between later reads. The bytes read are the start of the relay.
pub fn first_event(upstream: &mut dyn Read, by: Instant) -> io::Result<Vec<u8>> {
    let _limit = transport::reads_until(by);
    let mut first = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while event_end(&first).is_none() {
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
                "the first event is larger than 8 MiB",
            ));
        }
    }
    Ok(first)
}

pub fn error_event(message: &str) -> Vec<u8> {
    let body = serde_json::json!({"error": {"message": message, "type": "upstream_error",
                                              "param": null, "code": "stream_interrupted"}});
    format!("data: {body}\n\n").into_bytes()
}

/// Relays `upstream` to the client event by event until `[DONE]`, the upstream's end
/// or failure, or the client's disconnect. `strip_usage`: the proxy asked for usage on
/// the client's behalf, so the usage chunk and each chunk's `"usage": null` are not
/// passed on. The caller ends the response.
pub fn relay(upstream: &mut dyn Read, send: &mut Send<'_>, strip_usage: bool) -> Summary {
    // One small buffer, read into at its end: a held stream keeps it for its whole
    // life, and events are far smaller (it grows if one is not).
    const READ: usize = 4 * 1024;
    let mut pending: Vec<u8> = Vec::with_capacity(READ);
    let mut usage = None;
    let mut done = false;
    let failure = loop {
        let filled = pending.len();
        pending.resize(filled + READ, 0);
        let read = upstream.read(&mut pending[filled..]);
        pending.truncate(filled + *read.as_ref().unwrap_or(&0));
        match read {
            Ok(0) => {
                break (!done).then(|| "the upstream closed the stream before [DONE]".to_string())
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break Some(format!("the upstream stream failed: {e}")),
        }
        let mut start = 0;
        while let Some(len) = event_end(&pending[start..]) {
            let event = &pending[start..start + len];
            start += len;
            let edited;
            let forward = match classify(event) {
                Event::Done => {
                    done = true;
                    Some(event)
                }
                Event::UsageOnly(u) => {
                    usage = Some(u);
                    (!strip_usage).then_some(event)
                }
                Event::Other(u) => {
                    usage = u.or(usage);
                    edited = if strip_usage {
                        without_null_usage(event)
                    } else {
                        None
                    };
                    Some(edited.as_deref().unwrap_or(event))
                }
            };
            if forward.is_some_and(|event| send(event).is_err()) {
                return Summary {
                    usage,
                    end: End::ClientGone,
                };
            }
        }
        pending.drain(..start);
        if pending.len() > MAX_EVENT_BYTES {
            break Some("the upstream sent an event larger than 8 MiB".to_string());
        }
    };
    let end = match failure {
        // A partial event is dropped: glued to the error event it would corrupt both.
        Some(why) => {
            if send(&error_event(&why)).is_err() {
                return Summary {
                    usage,
                    end: End::ClientGone,
                };
            }
            End::UpstreamFailed(why)
        }
        None => {
            // Bytes after `[DONE]` without a separator: pass them on unchanged.
            if send(&pending).is_err() {
                return Summary {
                    usage,
                    end: End::ClientGone,
                };
            }
            End::Completed
        }
    };
    Summary { usage, end }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &[u8], strip: bool) -> (String, Summary) {
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
            strip,
        );
        // Each event went out as its own piece.
        for piece in &sent[..sent.len().saturating_sub(1)] {
            assert!(
                piece.ends_with(b"\n\n") || piece.ends_with(b"\r\n\r\n"),
                "{piece:?}"
            );
        }
        (String::from_utf8(sent.concat()).unwrap(), summary)
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
    fn a_cut_stream_ends_with_an_error_event() {
        let (body, s) = run(b"data: {\"choices\":[{}]}\n\ndata: {\"cho", true);
        assert!(matches!(s.end, End::UpstreamFailed(_)), "{:?}", s.end);
        let last = body.rsplit("\n\n").nth(1).unwrap();
        let err: serde_json::Value =
            serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(err["error"]["code"], "stream_interrupted");
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
            false,
        );
        assert_eq!((s.end, calls), (End::ClientGone, 1));
    }
}
