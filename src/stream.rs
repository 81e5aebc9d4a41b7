//! SSE pass-through (DESIGN §8): each upstream event is written to the client as its
//! own HTTP chunk and flushed as soon as it is complete, the usage chunk is read (and
//! dropped when the proxy asked for it on the client's behalf), and a stream cut or
//! stalled after bytes went out ends with an explicit SSE error event.
//!
//! tiny_http's own chunked writer buffers until 8 KiB, which would hold events back,
//! so the response head and chunk framing are written here on the raw connection.

use crate::upstream::Usage;
use std::io::{self, Read, Write};

/// Largest event the relay holds while waiting for its end; beyond it the upstream is
/// not speaking SSE and the stream is ended with an error.
const MAX_EVENT_BYTES: usize = 8 * 1024 * 1024;

/// The client side of a streamed response.
pub struct ClientStream {
    out: Box<dyn Write + Send>,
    chunked: bool,
    frame: Vec<u8>,
}

impl ClientStream {
    /// Writes the status line and headers. HTTP/1.0 clients get the raw body, ended
    /// by closing the connection, since they cannot read chunked encoding.
    pub fn start(
        mut out: Box<dyn Write + Send>,
        http11: bool,
        status: u16,
        headers: &[(String, String)],
    ) -> io::Result<ClientStream> {
        let reason = tiny_http::StatusCode(status).default_reason_phrase();
        let mut head = format!("HTTP/1.{} {status} {reason}\r\n", u8::from(http11));
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("Cache-Control: no-cache\r\n");
        head.push_str(if http11 {
            "Transfer-Encoding: chunked\r\n\r\n"
        } else {
            "Connection: close\r\n\r\n"
        });
        out.write_all(head.as_bytes())?;
        out.flush()?;
        Ok(ClientStream {
            out,
            chunked: http11,
            frame: Vec::with_capacity(4096),
        })
    }

    /// Sends one piece and flushes it, so it reaches the client now.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.frame.clear();
        if self.chunked {
            self.frame
                .extend_from_slice(format!("{:x}\r\n", bytes.len()).as_bytes());
            self.frame.extend_from_slice(bytes);
            self.frame.extend_from_slice(b"\r\n");
        } else {
            self.frame.extend_from_slice(bytes);
        }
        self.out.write_all(&self.frame)?;
        self.out.flush()
    }

    pub fn finish(&mut self) -> io::Result<()> {
        if self.chunked {
            self.out.write_all(b"0\r\n\r\n")?;
        }
        self.out.flush()
    }
}

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

pub fn error_event(message: &str) -> Vec<u8> {
    let body = serde_json::json!({"error": {"message": message, "type": "upstream_error",
                                              "param": null, "code": "stream_interrupted"}});
    format!("data: {body}\n\n").into_bytes()
}

/// Relays `upstream` to `client` event by event until `[DONE]`, the upstream's end or
/// failure, or the client's disconnect.
pub fn relay(
    upstream: &mut dyn Read,
    client: &mut ClientStream,
    strip_usage_chunk: bool,
) -> Summary {
    // Small on purpose: a held stream keeps these for its whole life, and events are
    // far smaller (the pending buffer grows if one is not).
    let mut pending: Vec<u8> = Vec::with_capacity(4 * 1024);
    let mut buf = vec![0u8; 4 * 1024];
    let mut usage = None;
    let mut done = false;
    let failure = loop {
        let n = match upstream.read(&mut buf) {
            Ok(0) => {
                break (!done).then(|| "the upstream closed the stream before [DONE]".to_string())
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break Some(format!("the upstream stream failed: {e}")),
        };
        pending.extend_from_slice(&buf[..n]);
        let mut start = 0;
        while let Some(len) = event_end(&pending[start..]) {
            let event = &pending[start..start + len];
            start += len;
            let forward = match classify(event) {
                Event::Done => {
                    done = true;
                    true
                }
                Event::UsageOnly(u) => {
                    usage = Some(u);
                    !strip_usage_chunk
                }
                Event::Other(u) => {
                    usage = u.or(usage);
                    true
                }
            };
            if forward && client.send(event).is_err() {
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
            if client.send(&error_event(&why)).is_err() {
                return Summary {
                    usage,
                    end: End::ClientGone,
                };
            }
            End::UpstreamFailed(why)
        }
        None => {
            // Bytes after `[DONE]` without a separator: pass them on unchanged.
            if client.send(&pending).is_err() {
                return Summary {
                    usage,
                    end: End::ClientGone,
                };
            }
            End::Completed
        }
    };
    if client.finish().is_err() {
        return Summary {
            usage,
            end: End::ClientGone,
        };
    }
    Summary { usage, end }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A Write that appends to a shared buffer, and can be told to fail.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn run(input: &[u8], strip: bool) -> (String, Summary) {
        let sink = Sink::default();
        let mut client = ClientStream::start(Box::new(sink.clone()), false, 200, &[]).unwrap();
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
        let summary = relay(&mut Slow(input), &mut client, strip);
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let body = out.split_once("\r\n\r\n").unwrap().1.to_string();
        (body, summary)
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
        assert!(!body.contains("prompt_tokens"), "{body}");
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
    fn chunked_framing_is_one_chunk_per_event() {
        let sink = Sink::default();
        let mut c = ClientStream::start(
            Box::new(sink.clone()),
            true,
            200,
            &[("X-A".into(), "1".into())],
        )
        .unwrap();
        c.send(b"data: 1\n\n").unwrap();
        c.finish().unwrap();
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\nX-A: 1\r\n"), "{out}");
        assert!(
            out.ends_with("\r\n\r\n9\r\ndata: 1\n\n\r\n0\r\n\r\n"),
            "{out}"
        );
    }
}
