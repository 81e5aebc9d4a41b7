//! The OpenAI-compatible endpoints (DESIGN §3, §5): `/v1/models`; forwarding of chat,
//! completions, embeddings, the Responses API, images and audio (read and check the
//! request, take an upstream permit, let `routing` choose instances and `upstream` call
//! them, turn the result into the client's `Reply`); and the stored responses of the
//! Responses API, sent to the instance that made them (affinity).

pub mod body;
pub mod realtime;
pub mod upload;

use crate::capacity::Permit;
use crate::config::{Client, Config};
use crate::error::Error;
use crate::http::{self, Reply, ReplyBody, Stream, Trace};
use crate::observe::logging::Clean;
use crate::outcome::{Outcome, Usage};
use crate::routing::{self, Plan, Routed};
use crate::state::{Generation, State};
use crate::upstream::{self, headers, stream, Answer, Call, Op};
use body::Meta;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The longest model name or response id the proxy takes, in bytes. Azure's
/// deployment names and response ids are far shorter.
const MAX_NAME: usize = 256;

/// The models `client` may use: those some instance names, within its `models`.
fn served<'g>(g: &'g Generation, client: Option<&'g Client>) -> impl Iterator<Item = &'g str> {
    g.models
        .iter()
        .map(String::as_str)
        .filter(move |m| client.is_none_or(|c| c.allows(m)))
}

/// `GET /v1/models`: every model at least one instance names (that the client may
/// use), in OpenAI's list shape.
pub fn models(g: &Generation, client: Option<&Client>) -> Reply {
    let data: Vec<Value> = served(g, client)
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "azure-openai-proxy"}))
        .collect();
    Reply::json(200, &json!({"object": "list", "data": data}))
}

/// `POST /v1/{op}` and `POST /openai/deployments/{model}/{op}`.
pub fn forward(
    state: &State,
    g: &Generation,
    req: &mut http1_server::Request<'_>,
    op: Op,
    path_model: Option<String>,
    client: Option<&Client>,
) -> Reply {
    traced(client, |trace| {
        forward_traced(state, g, req, op, path_model, client, trace)
    })
}

/// A call on a stored response, as the upstream is to get it.
pub struct StoredCall<'a> {
    /// The upstream method (a `HEAD` asks for what a `GET` would have).
    pub method: &'a str,
    pub id: &'a str,
    /// The path after the id.
    pub rest: &'a str,
    /// The client's query string, of which only pagination passes
    /// (`Address::response_url`).
    pub query: &'a str,
}

/// `GET`/`DELETE /v1/responses/{id}`, `GET .../input_items`, `POST .../cancel`: sent
/// to the instance that made the response.
pub fn stored_response(
    state: &State,
    g: &Generation,
    req: &http1_server::Request<'_>,
    StoredCall {
        method,
        id,
        rest,
        query,
    }: StoredCall<'_>,
    client: Option<&Client>,
) -> Reply {
    traced(client, |trace| {
        let (instance, model) =
            home(state, g, id).ok_or_else(|| Error::UnknownResponse { id: id.into() })?;
        let config = &g.config;
        let i = config
            .instances
            .iter()
            .position(|inst| inst.name == instance)
            .ok_or_else(|| Error::ResponseGone {
                id: id.into(),
                instance,
            })?;
        let model: &str = trace.model.insert(model);
        let candidates = g.with_token(vec![i], model)?;
        let forwarded = forwarded_headers(req)?;
        let waits_until = queue_deadline(config);
        let mut permit = None;
        let scope = Op::Responses.fault_scope(model);
        let plan = Plan {
            model,
            scope: &scope,
            candidates: &candidates,
            need: 0,
            deadline: Instant::now(),
            retry_timeouts: false,
            client: None,
        };
        let routed = routing::run(
            state.states(),
            config,
            &g.alerts,
            &plan,
            &mut trace.attempts,
            |i| {
                take_permit(state, &mut permit, waits_until)?;
                let call = Call {
                    method,
                    url: g.addresses[i].response_url(id, rest, query),
                    what: ("a stored response", id),
                    body: (method == "POST").then_some(&[][..]),
                    headers: &forwarded,
                    stream: false,
                    first_byte: first_byte(config),
                    body_within: body_within(config),
                    not_found_is_answer: true,
                };
                upstream::call(&g.agent, &config.instances[i], &g.addresses[i], &call)
            },
        );
        let asked = Asked {
            model,
            ..Asked::default()
        };
        let tried = trace.attempts.len();
        let (reply, usage) = finish(routed, config, &mut trace.instance, tried, asked, permit)?;
        trace.usage = usage;
        if method == "DELETE" && (200..300).contains(&reply.status) {
            state.affinity.lock().forget(id);
            if let Some(shared) = &state.shared {
                shared.forget(&g.alerts, id);
            }
        }
        Ok(reply)
    })
}

/// Where response `id` was made (instance, model): remembered here, else by another
/// proxy of the fleet (shared state).
fn home(state: &State, g: &Generation, id: &str) -> Option<(String, String)> {
    // Not one the upstream made (theirs are short): no lookup, no Redis key.
    if id.len() > MAX_NAME {
        return None;
    }
    let local = state
        .affinity
        .lock()
        .find(id, Instant::now())
        .map(|h| (h.instance.clone(), h.model.clone()));
    local.or_else(|| state.shared.as_ref()?.find(&g.alerts, id))
}

/// Runs a handler with the request's `Trace`, and turns its error into the reply.
fn traced(
    client: Option<&Client>,
    handler: impl FnOnce(&mut Trace) -> Result<Reply, Error>,
) -> Reply {
    let mut trace = Trace {
        api: true,
        client: client.map(|c| c.name.clone()),
        ..Trace::default()
    };
    let reply = handler(&mut trace).unwrap_or_else(|e| {
        trace.own_limit = matches!(
            e,
            Error::ClientRateLimited { .. } | Error::BudgetSpent { .. }
        );
        Reply::from(e)
    });
    Reply { trace, ..reply }
}

/// The client's headers that travel upstream, or 431 for one too long to.
fn forwarded_headers<'r>(
    req: &'r http1_server::Request<'_>,
) -> Result<Vec<(&'r str, &'r str)>, Error> {
    let forwarded: Vec<(&str, &str)> = req
        .headers()
        .filter(|(name, value)| headers::forward_request_header(name, value))
        .collect();
    match forwarded
        .iter()
        .find(|(n, v)| !upstream::head_line_fits(&[n, ": ", v]))
    {
        Some((name, _)) => Err(Error::HeaderTooLong {
            name: Clean(name).to_string(),
        }),
        None => Ok(forwarded),
    }
}

/// Until when a request arriving now may wait for room and a permit, in all.
fn queue_deadline(config: &Config) -> Instant {
    Instant::now() + Duration::from_secs_f64(config.routing.queue_timeout)
}

/// One of the `server.workers` permits in `held`, waited for until `deadline`. Taken
/// at the first attempt, once admitted: a request parked waiting for room holds none.
fn take_permit(state: &State, held: &mut Option<Permit>, deadline: Instant) -> Result<(), Error> {
    if held.is_none() {
        *held = Some(state.permits.acquire(deadline).ok_or(Error::NoPermit {
            total: state.permits.total(),
        })?);
    }
    Ok(())
}

/// The limit an attempt that timed out ran out: a stream's first byte, or a
/// non-streamed answer's.
fn timeout_limit(config: &Config, stream: bool) -> (&'static str, f64) {
    let r = &config.routing;
    if stream {
        ("routing.first_byte_timeout", r.first_byte_timeout)
    } else {
        ("routing.timeout", r.timeout)
    }
}

fn first_byte(config: &Config) -> Duration {
    Duration::from_secs_f64(config.routing.first_byte_timeout)
}

/// A non-streamed answer's body must arrive whole within `routing.timeout` of its head.
fn body_within(config: &Config) -> Duration {
    Duration::from_secs_f64(config.routing.timeout)
}

fn forward_traced(
    state: &State,
    g: &Generation,
    req: &mut http1_server::Request<'_>,
    op: Op,
    path_model: Option<String>,
    client: Option<&Client>,
    trace: &mut Trace,
) -> Result<Reply, Error> {
    let config = &g.config;
    let (body, _held) = http::request_body::read(req, config.server.max_body_bytes, &state.bodies)?;
    let content_type = req.header("content-type");
    let meta = if op.is_upload() {
        Meta::of_model(upload::model(&body, content_type)?)
    } else {
        Meta::parse(&body)?
    };
    let model = path_model
        .or_else(|| meta.model.clone())
        .ok_or(Error::MissingModel)?;
    let model: &str = trace.model.insert(model);
    // A name the client chose ends up in an instance's faults, alert keys and log
    // lines: bounded here, once, for every way a model arrives (the access line cuts
    // its own copy).
    if model.len() > MAX_NAME {
        return Err(Error::ModelTooLong);
    }
    if client.is_some_and(|c| !c.allows(model)) {
        return Err(Error::ModelNotAllowed {
            model: model.into(),
        });
    }
    let mut candidates = routing::candidates(config, model);
    if candidates.is_empty() {
        return Err(Error::ModelNotFound {
            model: model.into(),
            served: served(g, client).collect::<Vec<_>>().join(", "),
        });
    }
    // A conversation continues where its previous response is stored.
    let previous = meta.previous_response_id.as_deref();
    if let Some(id) = previous {
        candidates = home_of(state, g, id, model, &candidates)?;
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
        return Err(Error::TokensExceedLimit {
            model: model.into(),
            need,
            largest: candidates
                .iter()
                .filter_map(|&i| config.instances[i].max_tpm)
                .max()
                .unwrap_or(0),
        });
    }
    let fits = g.with_token(fits, model)?;
    let forwarded = forwarded_headers(req)?;
    // A named client's own limits, before any instance is asked.
    let shared = state.shared.as_deref().map(|s| (s, &*g.alerts));
    let ticket = client
        .map(|c| routing::clients::admit(&state.clients, shared, c, need))
        .transpose()?;
    let mut permit = None;
    let scope = op.fault_scope(model);
    let plan = Plan {
        model,
        scope: &scope,
        candidates: &fits,
        need,
        deadline: queue_deadline(config),
        // A stream that sent nothing within the first-byte limit reached no client.
        retry_timeouts: config.routing.retry_timeouts || meta.stream,
        client: ticket.as_ref(),
    };
    // Chat and completions streams report usage only when asked for it.
    let usage_option = meta.stream && matches!(op, Op::Chat | Op::Completions);
    let mut asked_usage = false;
    let routed = routing::run(
        state.states(),
        config,
        &g.alerts,
        &plan,
        &mut trace.attempts,
        |i| {
            take_permit(state, &mut permit, plan.deadline)?;
            // Holding an admission, its reservation and a permit: what a panic must
            // give back (a debug build's test switch).
            #[cfg(debug_assertions)]
            if forwarded
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case(http::panics::TEST_PANIC_HEADER))
            {
                panic!("{} was sent", http::panics::TEST_PANIC_HEADER);
            }
            let inst = &config.instances[i];
            let address = &g.addresses[i];
            let deployment = inst.deployment(model);
            asked_usage = usage_option && !meta.include_usage && address.asks_usage;
            let rename = address.model_in_body(op) && meta.model.as_deref() != Some(deployment);
            let edited;
            let payload = if op.is_upload() {
                edited = if rename {
                    upload::with_model(&body, content_type, deployment)
                } else {
                    Vec::new()
                };
                if rename {
                    &edited[..]
                } else {
                    &body[..]
                }
            } else if asked_usage || rename {
                edited = body::for_upstream(&body, asked_usage, rename.then_some(deployment));
                &edited[..]
            } else {
                &body[..]
            };
            let call = Call {
                method: "POST",
                url: address.url(deployment, op),
                what: (op.path(), model),
                body: Some(payload),
                headers: &forwarded,
                stream: meta.stream,
                first_byte: first_byte(config),
                body_within: body_within(config),
                not_found_is_answer: previous.is_some(),
            };
            upstream::call(&g.agent, inst, address, &call)
        },
    );
    // Only a request no upstream can have counted gives its client's reservation back.
    if let Some(ticket) = ticket {
        if trace.attempts.iter().any(|a| !a.outcome.never_counted()) {
            ticket.keep();
        }
    }
    // The answer came from the last attempt, so `asked_usage` is its instance's.
    let relay = stream::Options {
        strip_usage: asked_usage,
        count_text: usage_option && !meta.include_usage && !asked_usage,
    };
    let asked = Asked {
        model,
        stream: meta.stream,
        relay,
        prompt_tokens: meta.prompt_tokens(),
    };
    let tried = trace.attempts.len();
    let (mut reply, usage) = finish(routed, config, &mut trace.instance, tried, asked, permit)?;
    trace.usage = usage;
    if op == Op::Responses && (200..300).contains(&reply.status) {
        remember_response(state, g, &mut reply, trace.instance.as_deref(), model);
    }
    Ok(reply)
}

/// The instances a `previous_response_id` allows: the one that holds it. An id the
/// proxy does not know can only go where a single instance serves the model.
fn home_of(
    state: &State,
    g: &Generation,
    id: &str,
    model: &str,
    candidates: &[usize],
) -> Result<Vec<usize>, Error> {
    let config = &g.config;
    let Some((home, _)) = home(state, g, id) else {
        return match candidates {
            [only] => Ok(vec![*only]),
            _ => Err(Error::UnknownResponse { id: id.into() }),
        };
    };
    match candidates
        .iter()
        .find(|&&i| config.instances[i].name == home)
    {
        Some(&i) => Ok(vec![i]),
        None if config.instances.iter().any(|i| i.name == home) => Err(Error::ResponseElsewhere {
            id: id.into(),
            instance: home,
            model: model.into(),
        }),
        None => Err(Error::ResponseGone {
            id: id.into(),
            instance: home,
        }),
    }
}

/// A Responses API answer's `id`, remembered with the instance that made it: from the
/// body, or from a stream's first event (`response.created`); a relayed body's once it
/// has passed.
fn remember_response(
    state: &State,
    g: &Generation,
    reply: &mut Reply,
    instance: Option<&str>,
    model: &str,
) {
    #[derive(serde::Deserialize)]
    struct Made {
        id: Option<String>,
        response: Option<Box<Made>>,
    }
    let bytes = match &mut reply.body {
        ReplyBody::Relay(relay) => {
            relay.remember = Some(model.to_string());
            return;
        }
        ReplyBody::Full(bytes) => &bytes[..],
        ReplyBody::Stream(s) => {
            let data = s
                .first
                .split(|&b| b == b'\n')
                .find_map(|l| l.strip_prefix(b"data:"));
            data.unwrap_or_default()
        }
        ReplyBody::Upgrade(_) => &[],
    };
    let made = serde_json::from_slice::<Made>(bytes).ok();
    let id = made.and_then(|m| m.id.or_else(|| m.response?.id));
    // Neither here nor in the shared state: no id of ours is this long.
    let id = id.filter(|id| id.len() <= routing::affinity::MAX_ID_BYTES);
    // `instance` is this generation's: the one whose answer this is.
    if let (Some(id), Some(instance)) = (id, instance) {
        state.remember_response(g, &id, instance, model);
    }
}

/// What a request asked for, as its reply needs it.
#[derive(Default)]
struct Asked<'a> {
    model: &'a str,
    /// Whether as a stream: which limit a timeout ran out.
    stream: bool,
    /// How a streamed answer is relayed.
    relay: stream::Options,
    /// The prompt's estimated tokens, should the upstream report no usage.
    prompt_tokens: u64,
}

/// The client's reply to how routing ended, and the usage its answer reported. `heard`
/// becomes the instance whose answer or failure the client hears, after `tried`
/// attempts.
fn finish(
    routed: Routed<Answer>,
    config: &Config,
    heard: &mut Option<String>,
    tried: usize,
    Asked {
        model,
        stream,
        relay,
        prompt_tokens,
    }: Asked<'_>,
    permit: Option<Permit>,
) -> Result<(Reply, Option<Usage>), Error> {
    *heard = match &routed {
        Routed::Answered { instance, .. } | Routed::Failed { instance, .. } => {
            Some(config.instances[*instance].name.clone())
        }
        Routed::Refused(_) => None,
    };
    let (answer, instance) = match routed {
        Routed::Answered { answer, instance } => (answer, Some(instance)),
        Routed::Failed {
            answer: Some(answer),
            ..
        } => (answer, None),
        Routed::Failed { outcome, .. } => {
            let model = model.to_string();
            return Err(match outcome {
                Outcome::TimedOut => Error::UpstreamTimeout {
                    model,
                    tried,
                    limit: timeout_limit(config, stream),
                },
                _ => Error::UpstreamUnreachable { model, tried },
            });
        }
        Routed::Refused(e) => return Err(e),
    };
    let body = match answer.body {
        upstream::AnswerBody::Full(bytes) => ReplyBody::Full(bytes),
        upstream::AnswerBody::Relay(body) => ReplyBody::Relay(http::Relay {
            body,
            instance: instance.unwrap_or_default(),
            permit,
            remember: None,
        }),
        // Only an answer passed on streams (`upstream::call` streams only successes).
        upstream::AnswerBody::Stream { first, rest } => ReplyBody::Stream(Stream {
            first,
            rest,
            options: relay,
            prompt_tokens,
            instance: instance.unwrap_or_default(),
            permit,
        }),
    };
    let reply = Reply {
        status: answer.status,
        headers: answer.headers,
        body,
        trace: Trace::default(),
    };
    Ok((reply, answer.usage))
}
