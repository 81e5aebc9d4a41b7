//! The OpenAI-compatible endpoints: `/v1/models`, and forwarding of completions, chat
//! and embeddings (DESIGN §5) with retries on another instance. Produces a `Reply`;
//! the server writes it.

use crate::error::ApiError;
use crate::router;
use crate::server::State;
use crate::upstream::{self, Outcome, Usage};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::borrow::Cow;
use std::io::Read;

/// What the access log says about a request.
#[derive(Debug, Default)]
pub struct Trace {
    pub model: Option<String>,
    pub instance: Option<String>,
    pub attempts: u32,
    pub usage: Option<Usage>,
}

pub enum Body {
    Full(Vec<u8>),
    /// A 2xx SSE response still to be relayed; `strip_usage` when the proxy asked for
    /// the usage chunk on the client's behalf.
    Stream {
        upstream: ureq::Body,
        strip_usage: bool,
    },
}

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Body,
    pub trace: Trace,
}

impl Reply {
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
fn served_models(config: &crate::config::Config) -> Vec<&str> {
    let mut ids: Vec<&str> = config.instances.iter().flat_map(|i| i.models()).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// `GET /v1/models`: every model at least one instance names, in OpenAI's list shape.
pub fn models(state: &State) -> Reply {
    let ids = served_models(&state.config);
    let data: Vec<Value> = ids
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "azure-openai-proxy"}))
        .collect();
    Reply::json(200, &json!({"object": "list", "data": data}))
}

/// The few fields routing needs; everything else in the body is skipped unparsed.
#[derive(Deserialize)]
struct Meta {
    model: Option<String>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

fn read_body(req: &mut tiny_http::Request, limit: u64) -> Result<Vec<u8>, ApiError> {
    let too_large = || {
        ApiError::new(
            413,
            "invalid_request_error",
            format!("The request body is larger than the limit of {limit} bytes"),
        )
        .code("request_too_large")
        .header("Connection", "close")
    };
    let declared = req.body_length().map(|n| n as u64);
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(0) as usize);
    req.as_reader()
        .take(limit + 1)
        .read_to_end(&mut body)
        .map_err(|e| ApiError::invalid_request(format!("Could not read the request body: {e}")))?;
    if body.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(body)
}

fn parse_meta(body: &[u8]) -> Result<Meta, ApiError> {
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(ApiError::invalid_request(
            "We could not parse the JSON body of your request: it must be a JSON object.",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid_request(format!(
            "We could not parse the JSON body of your request. ({e})"
        ))
    })
}

/// The body an instance receives: the client's bytes, unless the proxy must ask for
/// stream usage or name the instance's deployment as the model (openai providers).
fn upstream_body<'a>(body: &'a [u8], ask_usage: bool, set_model: Option<&str>) -> Cow<'a, [u8]> {
    if !ask_usage && set_model.is_none() {
        return Cow::Borrowed(body);
    }
    let Ok(mut obj) = serde_json::from_slice::<Map<String, Value>>(body) else {
        return Cow::Borrowed(body);
    };
    if ask_usage {
        let options = obj.entry("stream_options").or_insert_with(|| json!({}));
        match options.as_object_mut() {
            Some(o) => {
                o.insert("include_usage".into(), Value::Bool(true));
            }
            None => *options = json!({"include_usage": true}),
        }
    }
    if let Some(model) = set_model {
        obj.insert("model".into(), Value::String(model.into()));
    }
    Cow::Owned(serde_json::to_vec(&obj).unwrap_or_else(|_| body.to_vec()))
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

/// `POST /v1/{op}` and `POST /openai/deployments/{model}/{op}`.
pub fn forward(
    state: &State,
    req: &mut tiny_http::Request,
    op: &str,
    path_model: Option<String>,
) -> Reply {
    let config = &state.config;
    let body = match read_body(req, config.server.max_body_bytes) {
        Ok(b) => b,
        Err(e) => return e.into(),
    };
    let meta = match parse_meta(&body) {
        Ok(m) => m,
        Err(e) => return e.into(),
    };
    let Some(model) = path_model.or_else(|| meta.model.clone()) else {
        return ApiError::invalid_request("You must provide a model parameter.")
            .param("model")
            .into();
    };
    let order = router::candidates(config, &model);
    if order.is_empty() {
        let mut reply: Reply = ApiError::new(
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
        reply.trace.model = Some(model);
        return reply;
    }

    let stream = meta.stream == Some(true);
    let client_asked_usage = meta.stream_options.and_then(|o| o.include_usage) == Some(true);
    let ask_usage = stream && !client_asked_usage && op != "embeddings";
    let client_headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .filter(|h| upstream::forward_request_header(h.field.as_str().as_str()))
        .map(|h| (h.field.as_str().to_string(), h.value.to_string()))
        .collect();

    let mut trace = Trace {
        model: Some(model.clone()),
        ..Trace::default()
    };
    let mut last = Failed::Unreachable;
    for &i in order.iter().take(1 + config.routing.retries as usize) {
        let inst = &config.instances[i];
        trace.attempts += 1;
        trace.instance = Some(inst.name.clone());
        let deployment = inst.deployment(&model);
        let rename = inst.provider_type == crate::config::Provider::Openai
            && meta.model.as_deref() != Some(deployment);
        let payload = upstream_body(&body, ask_usage, rename.then_some(deployment));

        let mut call = state.agent.post(upstream::url(inst, deployment, op));
        for (name, value) in &client_headers {
            call = call.header(name, value);
        }
        let (name, value) = upstream::credential(inst);
        let sent = call.header(name, value).send(&payload[..]);
        let response = match sent {
            Ok(r) => r,
            Err(e) => {
                log::warn!("instance {}: {op} for {model} failed: {e}", inst.name);
                last = if matches!(e, ureq::Error::Timeout(_)) {
                    Failed::Timeout
                } else {
                    Failed::Unreachable
                };
                continue;
            }
        };
        let status = response.status().as_u16();
        let outcome = Outcome::of(status);
        let mut headers: Vec<(String, String)> = response
            .headers()
            .iter()
            .filter(|(k, _)| upstream::return_response_header(k.as_str()))
            .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect();
        headers.push(("x-proxy-instance".into(), inst.name.clone()));
        let is_sse = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("text/event-stream"));
        if outcome == Outcome::Success && stream && is_sse {
            return Reply {
                status,
                headers,
                body: Body::Stream {
                    upstream: response.into_body(),
                    strip_usage: ask_usage,
                },
                trace,
            };
        }
        let bytes = match response
            .into_body()
            .with_config()
            .limit(MAX_UPSTREAM_BODY)
            .read_to_vec()
        {
            Ok(b) => b,
            Err(e) => {
                log::warn!(
                    "instance {}: reading the {status} response failed: {e}",
                    inst.name
                );
                last = if matches!(e, ureq::Error::Timeout(_)) {
                    Failed::Timeout
                } else {
                    Failed::Unreachable
                };
                continue;
            }
        };
        if outcome == Outcome::Success {
            trace.usage = upstream::usage_of(&bytes);
        }
        let reply = Reply {
            status,
            headers,
            body: Body::Full(bytes),
            trace,
        };
        if !outcome.retry_elsewhere() {
            return reply;
        }
        log::warn!(
            "instance {}: {op} for {model} answered {status} ({outcome:?})",
            inst.name
        );
        trace = reply.trace;
        last = Failed::Answer(Reply {
            trace: Trace::default(),
            ..reply
        });
    }

    let tried = trace.attempts;
    let mut reply: Reply = match last {
        Failed::Answer(r) => r,
        Failed::Timeout => ApiError::new(
            504,
            "upstream_error",
            format!("No instance answered for model `{model}` in time ({tried} tried)."),
        )
        .code("upstream_timeout")
        .into(),
        Failed::Unreachable => ApiError::new(
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
    fn body_is_untouched_unless_an_edit_is_needed() {
        let body = br#"{"model":"m","messages":[],"stream":true}"#;
        assert!(matches!(upstream_body(body, false, None), Cow::Borrowed(_)));
        let asked: Value = serde_json::from_slice(&upstream_body(body, true, None)).unwrap();
        assert_eq!(asked["stream_options"], json!({"include_usage": true}));
        assert_eq!(asked["messages"], json!([]));
        let kept = br#"{"model":"m","stream_options":{"other":1,"include_usage":false}}"#;
        let asked: Value = serde_json::from_slice(&upstream_body(kept, true, Some("dep"))).unwrap();
        assert_eq!(
            asked["stream_options"],
            json!({"other": 1, "include_usage": true})
        );
        assert_eq!(asked["model"], "dep");
    }

    #[test]
    fn meta_needs_a_json_object() {
        assert!(parse_meta(b"[1]").is_err());
        assert!(parse_meta(b"{\"model\": 5}").is_err());
        assert!(parse_meta(b"{\"model\": \"m\"} trailing").is_err());
        let m =
            parse_meta(b" {\"model\":\"m\",\"stream\":true,\"extra\":{\"deep\":[1,2]}}").unwrap();
        assert_eq!((m.model.as_deref(), m.stream), (Some("m"), Some(true)));
    }
}
