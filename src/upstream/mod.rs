//! Talking to one upstream instance (DESIGN §5.3–§5.6): one call with the generation's
//! agent to an instance's address, its result classified once (`Outcome`), and the
//! answer to pass on when there is one. The agent and its TCP layer, the addresses,
//! the headers, the SSE relay and the relay of other answers are in this module's files.

mod address;
mod agent;
pub mod headers;
pub mod relay;
mod scan;
mod session;
pub mod stream;
mod transport;
pub mod websocket;

pub use address::{Address, Auth, Op};
pub use agent::{agent, head_line_fits};
pub use transport::{client_left, watch_client, ClientWatch};

use crate::config::{Instance, MASK};
use crate::error::Error;
use crate::observe::logging::Clean;
pub use crate::outcome::Usage;
use crate::outcome::{self, Outcome};
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
    /// For a stream, the longest wait from sending to its answer's head and first
    /// event (`routing.first_byte_timeout`).
    pub first_byte: Duration,
    /// The longest a non-streamed answer's body may take, in all, from its head
    /// (`routing.timeout`).
    pub body_within: Duration,
    /// A 404 means the stored response (or the one continued) is not there: the
    /// client's answer, not a missing deployment.
    pub not_found_is_answer: bool,
}

/// An upstream answer's body as the call returns it (`http::ReplyBody` is what the
/// client gets).
pub enum AnswerBody {
    Full(Vec<u8>),
    /// A 2xx event stream: its first event, read, and the rest, still to be read.
    Stream {
        first: Vec<u8>,
        rest: ureq::BodyReader<'static>,
    },
    /// An answer to pass on whose body is still to be read: relayed as it arrives.
    Relay(relay::Relay),
}

/// An upstream's answer as the client gets it: the headers that come back (the
/// instance's key masked wherever it appears), and `x-proxy-instance`.
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: AnswerBody,
    pub usage: Option<Usage>,
}

/// The largest body read whole: an answer with a Content-Length up to this, and of a
/// failure that another instance may retry, the first this many bytes (the rest is not
/// read). Every other answer is relayed as it arrives.
const WHOLE: u64 = 64 * 1024;

/// Sends `c` to `inst`. `Err` when the request cannot be put on the wire at all (a URL
/// or header the upstream client refuses): no instance would take it, none is to blame,
/// and the client hears why; or when the client left while it waited (`ClientGone`).
/// Otherwise the outcome, and the answer when the upstream gave one.
pub fn call(
    agent: &ureq::Agent,
    inst: &Instance,
    address: &Address,
    c: &Call,
) -> Result<(Outcome, Option<Answer>), Error> {
    let called = call_once(agent, inst, address, c);
    // Whatever the call's end looked like, it was the client's leaving: no instance's
    // failure, and nothing to retry.
    if client_left() {
        return Err(Error::ClientGone);
    }
    called
}

fn call_once(
    agent: &ureq::Agent,
    inst: &Instance,
    address: &Address,
    c: &Call,
) -> Result<(Outcome, Option<Answer>), Error> {
    if !head_line_fits(&[c.method, " ", &c.url, " HTTP/1.1"]) {
        return Err(Error::ModelTooLong);
    }
    let sent = Instant::now();
    // A stream's head, like its first event, has the first-byte limit; a non-streamed
    // answer's head comes when it is generated, within `routing.timeout`.
    let head_limit = c
        .stream
        .then(|| transport::reads_until(sent + c.first_byte));
    let sending = send_authorized(agent, c, &address.credential, &inst.name);
    drop(head_limit);
    let Some(sent_with) = sending else {
        log::warn!("instance {}: no Microsoft Entra ID token", inst.name);
        return Ok((Outcome::Unreachable { arrived: false }, None));
    };
    let response = match sent_with {
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
    let answered = || {
        let (remaining_tokens, remaining_requests) = remaining();
        Outcome::Answered {
            status,
            remaining_tokens,
            remaining_requests,
        }
    };
    let not_found = (status == 404).then(answered);
    let outcome = match not_found {
        Some(answer) if c.not_found_is_answer => answer,
        _ => Outcome::of_status(
            status,
            || headers::retry_after(|name| header(name).map(str::to_string), SystemTime::now()),
            remaining,
        ),
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
            body: AnswerBody::Stream { first, rest },
            usage: None,
        };
        return Ok((outcome, Some(answer)));
    }
    let length = number("content-length");
    // A coded body (gzip, say) is passed on with its header, unread.
    let plain =
        header("content-encoding").is_none_or(|e| e.trim().eq_ignore_ascii_case("identity"));
    let by = Instant::now() + c.body_within;
    let whole = outcome.retry_elsewhere()
        || matches!(status, 204 | 304)
        || length.is_some_and(|l| l <= WHOLE);
    if !whole {
        let relay = relay::Relay {
            rest: response.into_body().into_reader(),
            length,
            by,
            mask: !outcome.is_success(),
            scan: plain,
        };
        let answer = Answer {
            status,
            headers: returned,
            body: AnswerBody::Relay(relay),
            usage: None,
        };
        return Ok((outcome, Some(answer)));
    }
    // Sized by the upstream's Content-Length (within the bound), so a body is read
    // without growing and copying its buffer.
    let mut bytes = Vec::with_capacity(length.unwrap_or(0).min(WHOLE) as usize);
    let read = {
        let _deadline = transport::reads_until(by);
        response
            .into_body()
            .into_reader()
            .take(WHOLE)
            .read_to_end(&mut bytes)
    };
    if let Err(e) = read {
        let e = ureq::Error::from(e);
        log::warn!(
            "instance {}: reading the {status} response failed: {e}",
            inst.name
        );
        return Ok((broken(&e), None));
    }
    // Only the body tells a missing deployment from a request about something missing.
    let outcome = match not_found {
        Some(answer) if outcome::about_the_request(&bytes) => answer,
        _ => outcome,
    };
    let usage = if outcome.is_success() && plain {
        usage_of(&bytes)
    } else {
        // An error body could echo what it was sent; the instance's key must never
        // reach the client.
        bytes = scrub(bytes, key);
        None
    };
    if outcome.retry_elsewhere() {
        log::warn!(
            "instance {}: {} for {} answered {status} ({outcome})",
            inst.name,
            c.what.0,
            Clean(c.what.1)
        );
    }
    let answer = Answer {
        status,
        headers: returned,
        body: AnswerBody::Full(bytes),
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
            // A coded answer could not be read for its usage: ask for none.
            request
                .header("accept-encoding", "identity")
                .header(credential.0, credential.1)
        }};
    }
    match (c.method, c.body) {
        ("GET", _) => with_headers!(agent.get(&c.url)).call(),
        ("DELETE", _) => with_headers!(agent.delete(&c.url)).call(),
        (_, Some(body)) => with_headers!(agent.post(&c.url)).send(body),
        (_, None) => with_headers!(agent.post(&c.url)).send_empty(),
    }
}

/// Sends the request with the instance's credential. An Entra ID token the upstream
/// rejects (401) although it was thought valid is replaced by a fresh one, and the
/// request sent once more; a second 401 is the instance's fault as with a key.
/// `None`: the credential has no token.
fn send_authorized(
    agent: &ureq::Agent,
    c: &Call,
    auth: &Auth,
    instance: &str,
) -> Option<Result<ureq::http::Response<ureq::Body>, ureq::Error>> {
    let token = match auth {
        Auth::Key(name, value) => return Some(send(agent, c, (name, value))),
        Auth::Entra(token) => token,
    };
    let header = token.header()?;
    let first = send(agent, c, ("authorization", header.expose()));
    if !first.as_ref().is_ok_and(|r| r.status() == 401) {
        return Some(first);
    }
    match token.renewed(&header) {
        Some(fresh) => {
            log::info!("instance {instance}: its Entra ID token was refused (401); sending again with a fresh one");
            Some(send(agent, c, ("authorization", fresh.expose())))
        }
        None => Some(first),
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
