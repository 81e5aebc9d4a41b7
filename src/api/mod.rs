//! The OpenAI-compatible endpoints (DESIGN §3, §5): `/v1/models`, and forwarding of
//! completions, chat and embeddings: read and check the request (`body` reads what
//! routing needs from it), take an upstream permit, let `routing` choose instances and
//! `upstream` call them, and turn the result into the client's `Reply`.

pub mod body;

use crate::config::{Config, Provider};
use crate::error::Error;
use crate::http::{self, Body, Reply, Stream, Trace};
use crate::observe::logging::Clean;
use crate::outcome::Outcome;
use crate::routing::{self, Plan, Routed};
use crate::state::{Generation, State};
use crate::upstream::{self, headers, Answer, Call};
use body::Meta;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

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

/// `POST /v1/{op}` and `POST /openai/deployments/{model}/{op}`.
pub fn forward(
    state: &State,
    g: &Generation,
    req: &mut tiny_http::Request<'_>,
    op: &str,
    path_model: Option<String>,
) -> Reply {
    let mut trace = Trace {
        api: true,
        ..Trace::default()
    };
    let reply = match forward_traced(state, g, req, op, path_model, &mut trace) {
        Ok(reply) => reply,
        Err(e) => e.into(),
    };
    Reply { trace, ..reply }
}

fn forward_traced(
    state: &State,
    g: &Generation,
    req: &mut tiny_http::Request<'_>,
    op: &str,
    path_model: Option<String>,
    trace: &mut Trace,
) -> Result<Reply, Error> {
    let config = &g.config;
    let (body, _held) = http::body::read(req, config.server.max_body_bytes, &state.bodies)?;
    let meta = Meta::parse(&body)?;
    let model = path_model
        .or_else(|| meta.model.clone())
        .ok_or(Error::MissingModel)?;
    let model: &str = trace.model.insert(model);
    let candidates = routing::candidates(config, model);
    if candidates.is_empty() {
        return Err(Error::ModelNotFound {
            model: model.into(),
            served: served_models(config).join(", "),
        });
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
    let forwarded: Vec<(&str, &str)> = req
        .headers()
        .filter(|(name, value)| headers::forward_request_header(name, value))
        .collect();
    if let Some((name, _)) = forwarded
        .iter()
        .find(|(n, v)| !upstream::head_line_fits(&[n, ": ", v]))
    {
        return Err(Error::HeaderTooLong {
            name: Clean(name).to_string(),
        });
    }

    let deadline = Instant::now() + Duration::from_secs_f64(config.routing.queue_timeout);
    let permit = state.permits.acquire(deadline).ok_or(Error::NoPermit {
        total: state.permits.total(),
    })?;
    let plan = Plan {
        model,
        candidates: &fits,
        need,
        deadline,
    };
    let ask_usage = meta.stream && !meta.include_usage && op != "embeddings";
    let routed = routing::run(
        &state.table,
        config,
        &g.alerts,
        &plan,
        &mut trace.attempts,
        |i| {
            let inst = &config.instances[i];
            let deployment = inst.deployment(model);
            // An OpenAI-compatible upstream reads the deployment from the body.
            let rename =
                inst.provider_type == Provider::Openai && meta.model.as_deref() != Some(deployment);
            let edited;
            let payload = if ask_usage || rename {
                edited = body::for_upstream(&body, ask_usage, rename.then_some(deployment));
                &edited[..]
            } else {
                &body[..]
            };
            let call = Call {
                op,
                model,
                deployment,
                body: payload,
                headers: &forwarded,
                stream: meta.stream,
                first_byte: Duration::from_secs_f64(config.routing.first_byte_timeout()),
            };
            upstream::call(&g.agent, inst, &g.addresses[i], &call)
        },
    );
    trace.instance = trace.attempts.last().map(|a| a.instance.clone());
    match routed {
        Routed::Answered { answer, instance } => {
            trace.usage = answer.usage;
            Ok(reply(answer, |first, rest| {
                Body::Stream(Stream {
                    first,
                    rest,
                    strip_usage: ask_usage,
                    instance,
                    permit: Some(permit),
                })
            }))
        }
        // `upstream::call` streams only successes: a failed answer is always whole.
        Routed::Failed {
            answer: Some(answer),
            ..
        } => Ok(reply(answer, |_, _| Body::Full(Vec::new()))),
        Routed::Failed { outcome, .. } => {
            let (model, tried) = (model.to_string(), trace.attempts.len());
            Err(match outcome {
                Outcome::TimedOut => Error::UpstreamTimeout { model, tried },
                _ => Error::UpstreamUnreachable { model, tried },
            })
        }
        Routed::Refused(e) => Err(e),
    }
}

/// The client's reply to an upstream's answer; `stream` makes the body of an event
/// stream.
fn reply(answer: Answer, stream: impl FnOnce(Vec<u8>, ureq::BodyReader<'static>) -> Body) -> Reply {
    Reply {
        status: answer.status,
        headers: answer.headers,
        body: match answer.body {
            upstream::Body::Full(bytes) => Body::Full(bytes),
            upstream::Body::Stream { first, rest } => stream(first, rest),
        },
        trace: Trace::default(),
    }
}
