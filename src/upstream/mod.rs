//! Talking to one upstream instance (DESIGN §5.3–§5.6): one call with the generation's
//! agent to an instance's address, its result classified once (`Outcome`), and the
//! answer to pass on when there is one. The agent and its TCP layer, the addresses,
//! the headers and the SSE relay are in this module's files.

mod address;
mod agent;
pub mod headers;
mod relay;
pub mod stream;
mod transport;
pub mod websocket;

pub use address::{accepts_stream_usage, stream_usage_warnings, Address, Op, V1_VERSIONS};
pub use agent::{agent, head_line_fits};

use crate::config::{Instance, MASK};
use crate::error::Error;
use crate::observe::logging::Clean;
use crate::outcome::Outcome;
pub use crate::outcome::Usage;
use std::io::Read;
use std::time::{Duration, Instant, SystemTime};

/// One request as it is sent to an instance.
pub struct Call<'a> {
    /// `POST`, `GET` or `DELETE`.
    pub method: &'a str,
    /// From the instance's `Address`.
    pub url: String,
    /// What log lines call the request: the operation, and the model or response id.
    pub what: (&'a str, &'a str),
    /// The body as this instance gets it (`None`: no body).
    pub body: Option<&'a [u8]>,
    /// The client's headers that travel.
    pub headers: &'a [(&'a str, &'a str)],
    /// The client asked for a stream.
    pub stream: bool,
    /// The longest wait from sending to the answer's head, and for a stream to its
    /// first event (`routing.first_byte_timeout`).
    pub first_byte: Duration,
    /// A 404 means the stored response (or the one continued) is not there: the
    /// client's answer, not a missing deployment.
    pub not_found_is_answer: bool,
}

pub enum Body {
    Full(Vec<u8>),
    /// A 2xx event stream: its first event, read, and the rest, still to be read.
    Stream {
        first: Vec<u8>,
        rest: ureq::BodyReader<'static>,
    },
}

/// An upstream's answer as the client gets it: the headers that come back (the
/// instance's key masked wherever it appears), and `x-proxy-instance`.
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Body,
    pub usage: Option<Usage>,
}

/// The largest non-streamed upstream body the proxy buffers (a big embeddings batch is
/// tens of MB); a larger one counts as a broken answer.
const MAX_UPSTREAM_BODY: u64 = 256 * 1024 * 1024;

/// Sends `c` to `inst`. `Err` when the request cannot be put on the wire at all (a URL
/// or header the upstream client refuses): no instance would take it, none is to blame,
/// and the client hears why. Otherwise the outcome, and the answer when the upstream
/// gave one.
pub fn call(
    agent: &ureq::Agent,
    inst: &Instance,
    address: &Address,
    c: &Call,
) -> Result<(Outcome, Option<Answer>), Error> {
    if !head_line_fits(&[c.method, " ", &c.url, " HTTP/1.1"]) {
        return Err(Error::ModelTooLong);
    }
    let (name, value) = &address.credential;
    let sent = Instant::now();
    let response = match send(agent, c, (name, value)) {
        Ok(r) => r,
        Err(e @ (ureq::Error::Http(_) | ureq::Error::BadUri(_))) => {
            return Err(Error::NotForwardable(e.to_string()))
        }
        Err(e) => {
            log::warn!(
                "instance {}: {} for {} failed: {e}",
                inst.name,
                c.what.0,
                Clean(c.what.1)
            );
            return Ok((failure(&e), None));
        }
    };
    let status = response.status().as_u16();
    let upstream_headers = response.headers();
    let header = |name: &str| upstream_headers.get(name)?.to_str().ok();
    let number = |name: &str| header(name)?.trim().parse::<u64>().ok();
    let remaining = || {
        (
            number("x-ratelimit-remaining-tokens"),
            number("x-ratelimit-remaining-requests"),
        )
    };
    let outcome = if status == 404 && c.not_found_is_answer {
        let (remaining_tokens, remaining_requests) = remaining();
        Outcome::Answered {
            status,
            remaining_tokens,
            remaining_requests,
        }
    } else {
        Outcome::of_status(
            status,
            || headers::retry_after(|name| header(name).map(str::to_string), SystemTime::now()),
            remaining,
        )
    };
    // Like an error body, a header could echo what it was sent (some gateways echo
    // request ids built from it): the instance's key never reaches the client.
    let key = inst.api_key.expose();
    let mut returned: Vec<(String, String)> = upstream_headers
        .iter()
        .filter(|(k, _)| headers::return_response_header(k.as_str()))
        .filter_map(|(k, v)| {
            let v = v.to_str().ok()?;
            let v = if !key.is_empty() && v.contains(key) {
                v.replace(key, MASK)
            } else {
                v.to_string()
            };
            Some((k.as_str().to_string(), v))
        })
        .collect();
    returned.push(("x-proxy-instance".into(), inst.name.clone()));
    let is_sse = header("content-type").is_some_and(|ct| ct.starts_with("text/event-stream"));
    if outcome.is_success() && c.stream && is_sse {
        // Nothing has reached the client yet: a stream that does not start in time is
        // retried elsewhere.
        let mut rest = response.into_body().into_reader();
        let first = match stream::first_event(&mut rest, sent + c.first_byte) {
            Ok(mut first) => {
                first.shrink_to_fit();
                first
            }
            Err(e) => {
                let e = ureq::Error::from(e);
                log::warn!(
                    "instance {}: {} for {}: no first event: {e}",
                    inst.name,
                    c.what.0,
                    Clean(c.what.1)
                );
                return Ok((broken(&e), None));
            }
        };
        let answer = Answer {
            status,
            headers: returned,
            body: Body::Stream { first, rest },
            usage: None,
        };
        return Ok((outcome, Some(answer)));
    }
    // Sized by the upstream's Content-Length (within the limit), so a body is read
    // without growing and copying its buffer.
    let length = number("content-length").unwrap_or(0);
    let mut bytes = Vec::with_capacity(length.min(MAX_UPSTREAM_BODY) as usize);
    let read = response
        .into_body()
        .into_with_config()
        .limit(MAX_UPSTREAM_BODY)
        .reader()
        .read_to_end(&mut bytes);
    if let Err(e) = read {
        let e = ureq::Error::from(e);
        log::warn!(
            "instance {}: reading the {status} response failed: {e}",
            inst.name
        );
        return Ok((broken(&e), None));
    }
    let usage = if outcome.is_success() {
        usage_of(&bytes)
    } else {
        // An error body could echo what it was sent; the instance's key must never
        // reach the client.
        bytes = scrub(bytes, key);
        None
    };
    if outcome.retry_elsewhere() {
        log::warn!(
            "instance {}: {} for {} answered {status} ({outcome:?})",
            inst.name,
            c.what.0,
            Clean(c.what.1)
        );
    }
    let answer = Answer {
        status,
        headers: returned,
        body: Body::Full(bytes),
        usage,
    };
    Ok((outcome, Some(answer)))
}

/// Puts the request on the wire with the client's headers and `credential`.
fn send(
    agent: &ureq::Agent,
    c: &Call,
    credential: (&str, &str),
) -> Result<ureq::http::Response<ureq::Body>, ureq::Error> {
    macro_rules! with_headers {
        ($request:expr) => {{
            let mut request = $request;
            for &(name, value) in c.headers {
                request = request.header(name, value);
            }
            request.header(credential.0, credential.1)
        }};
    }
    match (c.method, c.body) {
        ("GET", _) => with_headers!(agent.get(&c.url)).call(),
        ("DELETE", _) => with_headers!(agent.delete(&c.url)).call(),
        (_, Some(body)) => with_headers!(agent.post(&c.url)).send(body),
        (_, None) => with_headers!(agent.post(&c.url)).send_empty(),
    }
}

/// The outcome of an answer that could not be read: too slow, or broken off.
fn broken(e: &ureq::Error) -> Outcome {
    match e {
        ureq::Error::Timeout(_) => Outcome::TimedOut,
        _ => Outcome::Broken,
    }
}

/// The outcome of a call that got no answer.
fn failure(e: &ureq::Error) -> Outcome {
    use ureq::Timeout as T;
    match e {
        ureq::Error::Timeout(T::Resolve | T::Connect) => Outcome::Unreachable { arrived: false },
        ureq::Error::Timeout(_) => Outcome::TimedOut,
        e => Outcome::Unreachable {
            arrived: !never_arrived(e),
        },
    }
}

/// Whether a connection error means the request never reached the upstream (so the
/// upstream cannot have counted it against its limit).
fn never_arrived(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => true,
        ureq::Error::Io(io) => {
            io.kind() == std::io::ErrorKind::ConnectionRefused
                // A failed name lookup comes from std as an uncategorised io::Error,
                // recognisable only by its fixed message.
                || io.to_string().starts_with("failed to lookup address information")
        }
        _ => false,
    }
}

/// `body` with every occurrence of `secret` replaced by the mask.
fn scrub(body: Vec<u8>, secret: &str) -> Vec<u8> {
    let secret = secret.as_bytes();
    if secret.is_empty() || !body.windows(secret.len()).any(|w| w == secret) {
        return body;
    }
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        if body[i..].starts_with(secret) {
            out.extend_from_slice(MASK.as_bytes());
            i += secret.len();
        } else {
            out.push(body[i]);
            i += 1;
        }
    }
    out
}

/// The `usage` of a complete JSON response body, if it has one.
pub fn usage_of(body: &[u8]) -> Option<Usage> {
    #[derive(serde::Deserialize)]
    struct WithUsage {
        usage: Option<Usage>,
    }
    serde_json::from_slice::<WithUsage>(body).ok()?.usage
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_masks_every_occurrence() {
        let out = scrub(b"key k3y and k3y again".to_vec(), "k3y");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "key ***redacted*** and ***redacted*** again"
        );
        assert_eq!(scrub(b"clean".to_vec(), "k3y"), b"clean");
    }
}
