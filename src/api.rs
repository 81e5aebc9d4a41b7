//! The OpenAI-compatible endpoints: `/v1/models`, and forwarding of completions, chat
//! and embeddings (DESIGN §5): admission against the instances' windows, attempts on
//! instances not yet tried, and the answer when none can serve. Produces a `Reply`;
//! the server writes it.

use crate::body::{self, Meta};
use crate::capacity::{BodyHold, BodyMemory, Permit};
use crate::config::{Config, Provider};
use crate::error::ApiError;
use crate::instances::{Admission, Blocked, Report};
use crate::logging::Clean;
use crate::ratelimit;
use crate::router;
use crate::server::{Generation, State};
use crate::stats::{Attempt, AttemptEnd};
use crate::upstream::{self, Outcome, Usage};
use serde_json::{json, Value};
use std::io::{ErrorKind, Read};
use std::time::{Duration, Instant, SystemTime};

/// What the access log and the statistics learn about a request.
#[derive(Debug, Default)]
pub struct Trace {
    /// A forwarding endpoint was called (the statistics count only these).
    pub api: bool,
    pub model: Option<String>,
    /// The instance that gave the final answer, or was tried last.
    pub instance: Option<String>,
    pub attempts: Vec<Attempt>,
    pub usage: Option<Usage>,
}

pub enum Body {
    Full(Vec<u8>),
    /// A 2xx SSE response still to be relayed; `strip_usage` when the proxy asked for
    /// the usage chunk on the client's behalf. It holds its permit until it ends.
    Stream {
        upstream: ureq::Body,
        strip_usage: bool,
        permit: Option<Permit>,
    },
}

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Body,
    pub trace: Trace,
}

impl Reply {
    /// A 2xx event stream to relay; the request's permit is attached by `forward`.
    fn stream(
        status: u16,
        headers: Vec<(String, String)>,
        upstream: ureq::Body,
        strip_usage: bool,
    ) -> Reply {
        Reply {
            status,
            headers,
            body: Body::Stream {
                upstream,
                strip_usage,
                permit: None,
            },
            trace: Trace::default(),
        }
    }

    pub fn json(status: u16, value: &Value) -> Reply {
        Reply {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: Body::Full(value.to_string().into_bytes()),
            trace: Trace::default(),
        }
    }
}

impl From<ApiError> for Reply {
    fn from(e: ApiError) -> Reply {
        let mut headers = vec![("Content-Type".to_string(), "application/json".to_string())];
        headers.extend(e.headers.iter().map(|(k, v)| (k.to_string(), v.clone())));
        Reply {
            status: e.status,
            headers,
            body: Body::Full(e.body()),
            trace: Trace::default(),
        }
    }
}

/// Every model at least one instance names, sorted, once each.
fn served_models(config: &Config) -> Vec<&str> {
    let mut ids: Vec<&str> = config.instances.iter().flat_map(|i| i.models()).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// `GET /v1/models`: every model at least one instance names, in OpenAI's list shape.
pub fn models(g: &Generation) -> Reply {
    let data: Vec<Value> = served_models(&g.config)
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "azure-openai-proxy"}))
        .collect();
    Reply::json(200, &json!({"object": "list", "data": data}))
}

/// The request body, up to `limit` bytes, read within the body deadline. The buffer
/// grows with what arrives (never by a declared length): from 4 KiB (a typical body
/// fits, and needs no `mmap`), by half again each time, and each growth is reserved
/// from `memory` first: when the process holds as much body data as it allows, the
/// request gets 503 instead.
#[inline(never)]
fn read_body<'m>(
    req: &mut tiny_http::Request<'_>,
    limit: u64,
    memory: &'m BodyMemory,
) -> Result<(Vec<u8>, BodyHold<'m>), ApiError> {
    const FIRST: usize = 4 * 1024;
    let too_large = || {
        ApiError::new(
            413,
            "invalid_request_error",
            format!("The request body is larger than the limit of {limit} bytes"),
        )
        .code("request_too_large")
        .header("Connection", "close")
    };
    if req.body_length().is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut hold = memory.hold();
    let mut body = Vec::new();
    loop {
        let room = (limit + 1).saturating_sub(body.len() as u64);
        let step = FIRST
            .max(body.len() / 2)
            .min(usize::try_from(room).unwrap_or(usize::MAX));
        if !hold.grow_to((body.len() + step) as u64) {
            return Err(ApiError::new(
                503,
                "server_error",
                format!(
                    "The proxy holds as much request body data as it allows at once (server.max_body_memory, {} bytes); retry shortly.",
                    memory.limit()
                ),
            )
            .code("server_busy")
            .header("Retry-After", "1")
            .header("Connection", "close"));
        }
        body.reserve_exact(step);
        match req.take(step as u64).read_to_end(&mut body) {
            Ok(n) if n < step => break,
            Ok(_) if body.len() as u64 > limit => return Err(too_large()),
            Ok(_) => {}
            Err(e) => {
                return Err(match e.kind() {
                    ErrorKind::TimedOut => ApiError::new(
                        408,
                        "invalid_request_error",
                        "The request body did not arrive within server.body_timeout.",
                    )
                    .code("request_timeout"),
                    _ => ApiError::invalid_request(format!("Could not read the request body: {e}")),
                }
                .header("Connection", "close"))
            }
        }
    }
    if body.len() as u64 > limit {
        return Err(too_large());
    }
    Ok((body, hold))
}

/// Why an attempt produced no answer to pass on.
enum Failed {
    /// The upstream answered with a status worth retrying elsewhere; kept to return if
    /// no other instance does better.
    Answer(Reply),
    Timeout,
    Unreachable,
}

/// The largest non-streamed upstream body the proxy buffers (a big embeddings batch is
/// tens of MB); a larger one counts as a failed attempt.
const MAX_UPSTREAM_BODY: u64 = 256 * 1024 * 1024;

/// One request as it is sent to every instance it tries.
struct Outgoing<'a> {
    op: &'a str,
    model: &'a str,
    body_model: Option<&'a str>,
    body: &'a [u8],
    /// The client's headers that travel, borrowed from its request.
    headers: Vec<(&'a str, &'a str)>,
    stream: bool,
    ask_usage: bool,
}

/// Whether a connection error means the request never reached the upstream (so the
/// upstream cannot have counted it against its limit).
fn never_arrived(e: &ureq::Error) -> bool {
    use ureq::Timeout as T;
    match e {
        ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => true,
        ureq::Error::Timeout(t) => matches!(t, T::Resolve | T::Connect),
        ureq::Error::Io(io) => {
            io.kind() == std::io::ErrorKind::ConnectionRefused
                // A failed name lookup comes from std as an uncategorised io::Error,
                // recognisable only by its fixed message.
                || io.to_string().starts_with("failed to lookup address information")
        }
        _ => false,
    }
}

fn header_u64(headers: &ureq::http::HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// A request that failed below HTTP; `refused`: the upstream never saw it.
fn transport_failure(e: &ureq::Error, refused: bool) -> (Report, Result<Reply, Failed>) {
    let failed = if matches!(e, ureq::Error::Timeout(_)) {
        Failed::Timeout
    } else {
        Failed::Unreachable
    };
    let why = e.to_string();
    (Report::Failed { why, refused }, Err(failed))
}

/// Sends `out` to instance `i` and says what happened: the report for the instance
/// table, and either the reply to give the client or the failure to fall back on.
fn attempt(g: &Generation, i: usize, out: &Outgoing) -> (Report, Result<Reply, Failed>) {
    let inst = &g.config.instances[i];
    let deployment = inst.deployment(out.model);
    let rename = inst.provider_type == Provider::Openai && out.body_model != Some(deployment);
    let edited;
    let payload = if out.ask_usage || rename {
        edited = body::for_upstream(out.body, out.ask_usage, rename.then_some(deployment));
        &edited[..]
    } else {
        out.body
    };
    let address = &g.addresses[i];
    let url = address.url(deployment, out.op);
    if !upstream::head_line_fits(&["POST ", &url, " HTTP/1.1"]) {
        let reply = ApiError::invalid_request(
            "The model name is too long to be sent to an upstream as a deployment.",
        )
        .param("model")
        .into();
        return (Report::NotSent, Ok(reply));
    }
    let mut call = g.agent.post(url);
    for &(name, value) in &out.headers {
        call = call.header(name, value);
    }
    let (name, value) = &address.credential;
    let response = match call.header(*name, value).send(payload) {
        Ok(r) => r,
        // The request itself could not be put on the wire (a header ureq refuses): no
        // instance would take it, and none is to blame.
        Err(e @ (ureq::Error::Http(_) | ureq::Error::BadUri(_))) => {
            let reply =
                ApiError::invalid_request(format!("The request could not be forwarded: {e}"))
                    .into();
            return (Report::NotSent, Ok(reply));
        }
        Err(e) => {
            log::warn!(
                "instance {}: {} for {} failed: {e}",
                inst.name,
                out.op,
                Clean(out.model)
            );
            return transport_failure(&e, never_arrived(&e));
        }
    };
    let status = response.status().as_u16();
    let outcome = Outcome::of(status);
    let upstream_headers = response.headers();
    let report = match outcome {
        Outcome::Success | Outcome::ClientError => Report::Healthy {
            remaining_tokens: header_u64(upstream_headers, "x-ratelimit-remaining-tokens"),
            remaining_requests: header_u64(upstream_headers, "x-ratelimit-remaining-requests"),
        },
        Outcome::RateLimited => Report::RateLimited(ratelimit::retry_after(
            |name| Some(upstream_headers.get(name)?.to_str().ok()?.to_string()),
            SystemTime::now(),
        )),
        Outcome::Failure => Report::Failed {
            why: format!("HTTP {status}"),
            refused: false,
        },
        // A wrong key or deployment is refused before Azure counts anything.
        Outcome::InstanceFault => Report::Failed {
            why: format!("HTTP {status}"),
            refused: true,
        },
    };
    // Like an error body, a header could echo what it was sent (some gateways echo
    // request ids built from it): the instance's key never reaches the client.
    let key = inst.api_key.expose();
    let mut headers: Vec<(String, String)> = upstream_headers
        .iter()
        .filter(|(k, _)| upstream::return_response_header(k.as_str()))
        .filter_map(|(k, v)| {
            let v = v.to_str().ok()?;
            let v = if !key.is_empty() && v.contains(key) {
                v.replace(key, crate::config::MASK)
            } else {
                v.to_string()
            };
            Some((k.as_str().to_string(), v))
        })
        .collect();
    headers.push(("x-proxy-instance".into(), inst.name.clone()));
    let is_sse = upstream_headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    if outcome == Outcome::Success && out.stream && is_sse {
        return (
            report,
            Ok(Reply::stream(
                status,
                headers,
                response.into_body(),
                out.ask_usage,
            )),
        );
    }
    // Sized by the upstream's Content-Length (within the limit), so a body is read
    // without growing and copying its buffer.
    let length = header_u64(upstream_headers, "content-length").unwrap_or(0);
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
        return transport_failure(&e, false);
    }
    // An error body could echo what it was sent; the instance's key must never reach
    // the client.
    let bytes = if outcome == Outcome::Success {
        bytes
    } else {
        scrub(bytes, inst.api_key.expose())
    };
    let usage = if outcome == Outcome::Success {
        upstream::usage_of(&bytes)
    } else {
        None
    };
    let reply = Reply {
        status,
        headers,
        body: Body::Full(bytes),
        trace: Trace {
            usage,
            ..Trace::default()
        },
    };
    if outcome.retry_elsewhere() {
        log::warn!(
            "instance {}: {} for {} answered {status} ({outcome:?})",
            inst.name,
            out.op,
            Clean(out.model)
        );
        (report, Err(Failed::Answer(reply)))
    } else {
        (report, Ok(reply))
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
            out.extend_from_slice(crate::config::MASK.as_bytes());
            i += secret.len();
        } else {
            out.push(body[i]);
            i += 1;
        }
    }
    out
}

/// Admits the request to an instance, waiting (until `deadline`) for window room that
/// will come by then. Refusals that cannot end by the deadline return at once.
fn admit(
    state: &State,
    g: &Generation,
    candidates: &[usize],
    tried: &[usize],
    need: u64,
    deadline: Instant,
) -> Result<Admission, Blocked> {
    loop {
        let now = Instant::now();
        let result = state
            .table
            .lock()
            .admit(&g.config, candidates, tried, need, now);
        match result {
            Err(Blocked::RateLimited { until }) if until <= deadline => {
                std::thread::sleep(until.saturating_duration_since(now));
            }
            other => return other,
        }
    }
}

/// 429 or 503 for a request no instance can take, with when to come back.
#[inline(never)]
fn blocked_reply(blocked: Blocked, model: &str, need: u64) -> Reply {
    let (until, error) = match blocked {
        Blocked::RateLimited { until } => (
            until,
            ApiError::new(
                429,
                "requests",
                format!("Every instance serving `{model}` is at its rate limit for a request of about {need} tokens. Retry after the time in the Retry-After header."),
            )
            .code("rate_limit_exceeded"),
        ),
        Blocked::Down { until } => (
            until,
            ApiError::new(503, "upstream_error", format!("Every instance serving `{model}` is unavailable (failing or circuit open)."))
                .code("service_unavailable"),
        ),
    };
    let wait = until
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let mut reply: Reply = error
        .header("Retry-After", wait.as_secs_f64().ceil().to_string())
        .header("retry-after-ms", wait.as_millis().max(1).to_string())
        .into();
    reply.trace.model = Some(model.to_string());
    reply
}

/// Raises the alerts an attempt calls for: an instance that rejects the proxy's key or
/// lacks the deployment, and a circuit that just opened.
#[inline(never)]
fn alert_on(
    g: &Generation,
    i: usize,
    model: &str,
    attempt: Option<&Attempt>,
    opened: Option<Duration>,
) {
    let name = &g.config.instances[i].name;
    match attempt.map(|a| &a.end) {
        Some(AttemptEnd::Status(s @ (401 | 403))) => g.alerts.error(
            &format!("auth:{name}"),
            &format!("instance {name} rejected the proxy's API key (HTTP {s}); check its api_key"),
        ),
        Some(AttemptEnd::Status(404)) => g.alerts.error(
            &format!("deployment:{name}:{}", Clean(model)),
            &format!(
                "instance {name} has no deployment {} for model {} (HTTP 404); check model_deployments and api_version",
                Clean(g.config.instances[i].deployment(model)),
                Clean(model)
            ),
        ),
        _ => {}
    }
    if let Some(out_for) = opened {
        g.alerts.error(
            &format!("circuit:{name}"),
            &format!(
                "instance {name} keeps failing; it is taken out for {} s",
                out_for.as_secs_f64()
            ),
        );
    }
}

/// `POST /v1/{op}` and `POST /openai/deployments/{model}/{op}`.
pub fn forward(
    state: &State,
    g: &Generation,
    req: &mut tiny_http::Request<'_>,
    op: &str,
    path_model: Option<String>,
) -> Reply {
    let config = &g.config;
    let (body, _held) = match read_body(req, config.server.max_body_bytes, &state.bodies) {
        Ok(b) => b,
        Err(e) => return e.into(),
    };
    let meta = match Meta::parse(&body) {
        Ok(m) => m,
        Err(e) => return e.into(),
    };
    let Some(model) = path_model.or_else(|| meta.model.clone()) else {
        return ApiError::invalid_request("You must provide a model parameter.")
            .param("model")
            .into();
    };
    let with_model = |mut reply: Reply, model: String| {
        reply.trace.model = Some(model);
        reply
    };
    let candidates = router::candidates(config, &model);
    if candidates.is_empty() {
        let reply = ApiError::new(
            404,
            "invalid_request_error",
            format!(
                "The model `{model}` is not served by this proxy. Served models: {}.",
                served_models(config).join(", ")
            ),
        )
        .param("model")
        .code("model_not_found")
        .into();
        return with_model(reply, model);
    }
    // No request may take more than an instance's whole window: one that no serving
    // instance could ever admit is the client's error, not a 429 for everyone after.
    let need = meta.estimate(op, config.routing.default_completion_tokens);
    let fits: Vec<usize> = candidates
        .iter()
        .copied()
        .filter(|&i| config.instances[i].max_tpm.is_none_or(|max| need <= max))
        .collect();
    if fits.is_empty() {
        let largest = candidates
            .iter()
            .filter_map(|&i| config.instances[i].max_tpm)
            .max()
            .unwrap_or(0);
        let reply = ApiError::invalid_request(format!(
            "This request may use about {need} tokens (prompt estimate plus completion reserve), \
             more than any instance serving `{model}` admits per minute (largest max_tpm: {largest}). \
             Lower max_tokens or split the request."
        ))
        .param("max_tokens")
        .code("tokens_exceed_limit")
        .into();
        return with_model(reply, model);
    }

    let forwarded = || {
        req.headers()
            .filter(|(name, value)| upstream::forward_request_header(name, value))
    };
    if let Some((name, _)) = forwarded().find(|(n, v)| !upstream::head_line_fits(&[n, ": ", v])) {
        let reply = ApiError::new(
            431,
            "invalid_request_error",
            format!("The header {} is too long to be forwarded upstream (about 4 KiB per line at most).", Clean(name)),
        )
        .code("request_header_fields_too_large")
        .into();
        return with_model(reply, model);
    }

    let deadline = Instant::now() + Duration::from_secs_f64(config.routing.queue_timeout);
    let Some(permit) = state.permits.acquire(deadline) else {
        let reply = ApiError::new(
            503,
            "server_error",
            format!(
                "All {} upstream calls this proxy allows at once (server.workers) are under way.",
                state.permits.total()
            ),
        )
        .code("server_busy")
        .header("Retry-After", "1")
        .into();
        return with_model(reply, model);
    };
    let mut permit = Some(permit);

    let stream = meta.stream;
    let out = Outgoing {
        op,
        model: &model,
        body_model: meta.model.as_deref(),
        body: &body,
        headers: forwarded().collect(),
        stream,
        ask_usage: stream && !meta.include_usage && op != "embeddings",
    };

    let mut trace = Trace {
        model: Some(model.clone()),
        ..Trace::default()
    };
    let mut tried: Vec<usize> = Vec::new();
    let mut last = None;
    while tried.len() <= config.routing.retries as usize {
        // Only the first admission waits; a retry takes what is free now or stops.
        let wait_until = if tried.is_empty() {
            deadline
        } else {
            Instant::now()
        };
        let admission = match admit(state, g, &fits, &tried, need, wait_until) {
            Ok(a) => a,
            Err(blocked) if tried.is_empty() => {
                if let Blocked::Down { .. } = blocked {
                    g.alerts.error(
                        &format!("all_down:{}", Clean(&model)),
                        &format!(
                            "every instance serving {} is down; clients get 503",
                            Clean(&model)
                        ),
                    );
                }
                return blocked_reply(blocked, &model, need);
            }
            Err(_) => break,
        };
        tried.push(admission.index);
        let name = &config.instances[admission.index].name;
        trace.instance = Some(name.clone());
        let (report, result) = attempt(g, admission.index, &out);
        let end = match &result {
            Ok(reply) | Err(Failed::Answer(reply)) => AttemptEnd::Status(reply.status),
            Err(Failed::Timeout) => AttemptEnd::Timeout,
            Err(Failed::Unreachable) => AttemptEnd::Unreachable,
        };
        trace.attempts.push(Attempt {
            instance: name.clone(),
            end,
        });
        let opened = state
            .table
            .lock()
            .finish(config, admission, report, Instant::now());
        alert_on(g, admission.index, &model, trace.attempts.last(), opened);
        match result {
            Ok(mut reply) => {
                if let Body::Stream { permit: held, .. } = &mut reply.body {
                    *held = permit.take();
                }
                trace.usage = reply.trace.usage;
                reply.trace = trace;
                return reply;
            }
            Err(failed) => last = Some(failed),
        }
    }

    let tried = trace.attempts.len();
    let mut reply: Reply = match last {
        Some(Failed::Answer(r)) => r,
        Some(Failed::Timeout) => ApiError::new(
            504,
            "upstream_error",
            format!("No instance answered for model `{model}` in time ({tried} tried)."),
        )
        .code("upstream_timeout")
        .into(),
        Some(Failed::Unreachable) | None => ApiError::new(
            502,
            "upstream_error",
            format!("No instance could be reached for model `{model}` ({tried} tried)."),
        )
        .code("upstream_unreachable")
        .into(),
    };
    reply.trace = trace;
    reply
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
