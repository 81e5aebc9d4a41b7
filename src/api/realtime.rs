//! The Realtime API (DESIGN §3, §5.7): a WebSocket session's handshake (the client's
//! key, from a header or the subprotocol browsers send it in; the model; a seat among
//! the open sessions), routed like chat to the first instance whose own handshake
//! succeeds, then relayed by `upstream::websocket`, with the usage of each
//! `response.done` counted as it comes in the statistics and the instance's TPM window.

use super::{traced, MAX_NAME};
use crate::config::{Config, MASK};
use crate::error::Error;
use crate::http::{auth, Reply, ReplyBody, Trace, Upgrade};
use crate::outcome::{Outcome, Usage};
use crate::routing::{self, Plan, Routed};
use crate::state::{Generation, State};
use crate::upstream::websocket::{self, Closed, Handshake, Limits, Refusal, Seat, Upstream};
use crate::upstream::{headers, Auth};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The subprotocol prefix browsers carry the key in (they cannot set headers on a
/// WebSocket): `openai-insecure-api-key.<key>`. Never forwarded.
const KEY_PROTOCOL: &str = "openai-insecure-api-key.";

/// `GET /v1/realtime?model=`, `/openai/v1/realtime?model=`,
/// `/openai/realtime?deployment=` with a WebSocket handshake.
pub fn session(
    state: &State,
    g: &Generation,
    req: &http1_server::Request<'_>,
    model: Option<String>,
) -> Reply {
    traced(None, |trace| handshake(state, g, req, model, trace))
}

/// The subprotocols a client offers, in order.
fn offered<'r>(req: &http1_server::Request<'r>) -> impl Iterator<Item = &'r str> {
    req.headers()
        .filter(|(name, _)| name.eq_ignore_ascii_case("sec-websocket-protocol"))
        .flat_map(|(_, value)| value.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
}

/// Whether the request asks for a WebSocket (RFC 6455 §4.2.1), and its key.
fn websocket_key<'r>(req: &http1_server::Request<'r>) -> Option<&'r str> {
    let has = |name: &str, token: &str| {
        req.headers()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    let upgrade = has("upgrade", "websocket") && has("connection", "upgrade");
    let version = req.header("sec-websocket-version").map(str::trim) == Some("13");
    req.header("sec-websocket-key")
        .filter(|k| upgrade && version && !k.is_empty())
}

fn seconds(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX)
}

fn limits(config: &Config) -> Limits {
    let r = &config.realtime;
    Limits {
        max_message: usize::try_from(r.max_message_bytes).unwrap_or(usize::MAX),
        idle: seconds(r.idle_timeout),
        max_length: seconds(r.max_session_seconds),
        connect: seconds(config.routing.connect_timeout),
        handshake: seconds(config.routing.first_byte_timeout),
        write: seconds(config.server.client_timeout),
    }
}

fn handshake(
    state: &State,
    g: &Generation,
    req: &http1_server::Request<'_>,
    model: Option<String>,
    trace: &mut Trace,
) -> Result<Reply, Error> {
    let config = &g.config;
    let key_protocol = offered(req).find_map(|p| p.strip_prefix(KEY_PROTOCOL));
    // Counted and slowed like every other key check: an address blocked for guessing
    // keys gets no comparison here either.
    let client = state
        .key_failures
        .check(&config.auth, req.remote_addr(), || {
            auth::check_client(&config.auth.api_keys, &config.auth.clients, |name| {
                req.header(name)
                    .or_else(|| key_protocol.filter(|_| name == "api-key"))
            })
        })?
        .map(|i| &config.auth.clients[i]);
    trace.client = client.map(|c| c.name.clone());
    let key = websocket_key(req).ok_or(Error::NotWebSocket)?;
    if req.body_length().is_some_and(|n| n > 0) {
        return Err(Error::NotWebSocket);
    }
    let model: &str = trace.model.insert(model.ok_or(Error::MissingModel)?);
    if model.len() > MAX_NAME {
        return Err(Error::ModelTooLong);
    }
    if client.is_some_and(|c| !c.allows(model)) {
        return Err(Error::ModelNotAllowed {
            model: model.into(),
        });
    }
    let candidates = routing::candidates(config, model);
    if candidates.is_empty() {
        return Err(Error::ModelNotFound {
            model: model.into(),
            served: g.models.join(", "),
        });
    }
    // An Entra ID instance without a token is left out, as for other calls: it counts
    // no failure and opens no circuit.
    let candidates = g.with_token(candidates, model)?;
    let max = config.server.max_realtime_sessions;
    let seat = state
        .realtime
        .seat(max)
        .ok_or(Error::TooManySessions { max })?;
    let forwarded: Vec<(&str, &str)> = req
        .headers()
        .filter(|(name, value)| {
            headers::forward_request_header(name, value)
                && !name.to_ascii_lowercase().starts_with("sec-websocket-")
        })
        .collect();
    let protocols = offered(req)
        .filter(|p| !p.starts_with(KEY_PROTOCOL))
        .collect::<Vec<_>>()
        .join(", ");
    let protocols = (!protocols.is_empty()).then_some(protocols.as_str());
    let limits = limits(config);
    // A deployment fault on the Realtime API leaves the model's other operations be.
    let scope = format!("{model} (realtime)");
    let plan = Plan {
        model,
        scope: &scope,
        candidates: &candidates,
        // Nothing is known of a session's tokens before it runs: it counts as one
        // request at admission, and its usage as it is reported.
        need: 0,
        deadline: Instant::now() + seconds(config.routing.queue_timeout),
        // A handshake that timed out started no session: nothing was generated.
        retry_timeouts: true,
        // A named client's tpm/rpm are not applied to sessions: a session's tokens are
        // known only as it runs.
        client: None,
    };
    let routed = routing::run(
        state.states(),
        config,
        &g.alerts,
        &plan,
        &mut trace.attempts,
        |i| {
            let address = &g.addresses[i];
            let url = address.realtime_url(config.instances[i].deployment(model));
            let (name, value) = match &address.credential {
                Auth::Key(name, value) => (*name, value.clone()),
                Auth::Entra(token) => match token.header() {
                    Some(bearer) => ("authorization", bearer.expose().to_string()),
                    // No token: the instance is unavailable, as for other calls.
                    None => return Ok((Outcome::Unreachable { arrived: false }, None)),
                },
            };
            let mut sent = vec![(name, value.as_str())];
            sent.extend(&forwarded);
            let h = Handshake {
                url: &url,
                headers: &sent,
                protocols,
            };
            websocket::connect(&h, &limits).map_err(Error::NotForwardable)
        },
    );
    let tried = trace.attempts.len();
    let (upstream, i) = match routed {
        Routed::Answered {
            answer: Ok(upstream),
            instance,
        }
        | Routed::Failed {
            answer: Some(Ok(upstream)),
            instance,
            ..
        } => (upstream, instance),
        Routed::Answered {
            answer: Err(refusal),
            instance,
        }
        | Routed::Failed {
            answer: Some(Err(refusal)),
            instance,
            ..
        } => {
            trace.instance = Some(config.instances[instance].name.clone());
            return Ok(refused(refusal, config, instance));
        }
        Routed::Failed {
            outcome, instance, ..
        } => {
            trace.instance = Some(config.instances[instance].name.clone());
            let model = model.to_string();
            return Err(match outcome {
                Outcome::TimedOut => Error::UpstreamTimeout {
                    model,
                    tried,
                    limit: (
                        "routing.first_byte_timeout",
                        config.routing.first_byte_timeout,
                    ),
                },
                _ => Error::UpstreamUnreachable { model, tried },
            });
        }
        Routed::Refused(e) => return Err(e),
    };
    let instance = config.instances[i].name.clone();
    trace.instance = Some(instance.clone());
    let mut headers = vec![
        ("Upgrade".to_string(), "websocket".to_string()),
        (
            "Sec-WebSocket-Accept".to_string(),
            tungstenite::handshake::derive_accept_key(key.as_bytes()),
        ),
        ("x-proxy-instance".to_string(), instance.clone()),
    ];
    if let Some(protocol) = &upstream.protocol {
        headers.push(("Sec-WebSocket-Protocol".to_string(), protocol.clone()));
    }
    Ok(Reply {
        status: 101,
        headers,
        body: ReplyBody::Upgrade(Box::new(Session {
            upstream,
            seat,
            instance,
            limits,
        })),
        trace: Trace::default(),
    })
}

/// The upstream's refusal of the handshake as the client hears it, with the instance's
/// key masked wherever the upstream echoed it.
fn refused(refusal: Refusal, config: &Config, i: usize) -> Reply {
    let inst = &config.instances[i];
    let key = inst.api_key.expose();
    let mask = |text: String| {
        if key.is_empty() || !text.contains(key) {
            text
        } else {
            text.replace(key, MASK)
        }
    };
    let mut headers: Vec<(String, String)> = refusal
        .headers
        .into_iter()
        .map(|(k, v)| (k, mask(v)))
        .collect();
    headers.push(("x-proxy-instance".into(), inst.name.clone()));
    let body = mask(String::from_utf8_lossy(&refusal.body).into_owned());
    Reply {
        status: refusal.status,
        headers,
        body: ReplyBody::Full(body.into_bytes()),
        trace: Trace::default(),
    }
}

/// A session whose upstream accepted it, to relay once the client has its `101`.
struct Session {
    upstream: Upstream,
    seat: Seat,
    instance: String,
    limits: Limits,
}

impl Upgrade for Session {
    fn run(self: Box<Self>, state: &State, conn: http1_server::Upgraded<'_>, trace: &mut Trace) {
        let Session {
            upstream,
            mut seat,
            instance,
            limits,
        } = *self;
        let counted = Mutex::new(Usage::default());
        let on_text = |text: &str| {
            if let Some(usage) = usage_of(text) {
                count(state, &instance, usage);
                let mut c = counted.lock();
                c.prompt_tokens = c.prompt_tokens.saturating_add(usage.prompt_tokens);
                c.completion_tokens = c.completion_tokens.saturating_add(usage.completion_tokens);
            }
        };
        state.stats.lock().sessions.opened += 1;
        let why = match websocket::control(conn.stream, &upstream) {
            Ok(control) => websocket::relay(
                conn,
                upstream,
                &limits,
                (&mut seat, Arc::new(control)),
                &on_text,
            ),
            Err(e) => {
                log::warn!("no socket for a realtime session: {e}");
                Closed::NoResources
            }
        };
        *state
            .stats
            .lock()
            .sessions
            .closed
            .entry(why.as_str())
            .or_default() += 1;
        trace.usage = Some(*counted.lock());
        trace.session = Some(why.as_str());
    }
}

/// A session's tokens, reported by one response: in the statistics, and in the
/// instance's TPM window (Azure counts them against its quota).
fn count(state: &State, instance: &str, usage: Usage) {
    let tokens = usage
        .total_tokens
        .max(usage.prompt_tokens.saturating_add(usage.completion_tokens));
    state.table.lock().charge(instance, tokens, Instant::now());
    state
        .stats
        .lock()
        .tokens(state.uptime_secs(), instance, usage);
}

/// The usage of a `response.done` server event; `None` for any other message.
fn usage_of(text: &str) -> Option<Usage> {
    #[derive(serde::Deserialize)]
    struct Event {
        #[serde(rename = "type")]
        kind: String,
        response: Option<Response>,
    }
    #[derive(serde::Deserialize)]
    struct Response {
        usage: Option<Usage>,
    }
    // Most events are audio deltas: not parsed.
    if !text.contains("\"response.done\"") {
        return None;
    }
    let event: Event = serde_json::from_str(text).ok()?;
    (event.kind == "response.done")
        .then_some(event.response?.usage)
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_comes_from_response_done_only() {
        let done = r#"{"type":"response.done","event_id":"e","response":{"id":"r","usage":{"total_tokens":30,"input_tokens":10,"output_tokens":20,"input_token_details":{"audio_tokens":4}}}}"#;
        assert_eq!(
            usage_of(done),
            Some(Usage {
                prompt_tokens: 10,
                completion_tokens: 20,
                total_tokens: 30
            })
        );
        let delta = r#"{"type":"response.audio.delta","delta":"response.done"}"#;
        assert_eq!(usage_of(delta), None);
        assert_eq!(usage_of(r#"{"type":"response.done","response":{}}"#), None);
        assert_eq!(
            usage_of(r#"{"type":"response.done","response":{"usage":{"input_tokens":-1}}}"#),
            None
        );
    }
}
