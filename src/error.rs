//! The proxy's own errors: every answer the proxy gives rather than an upstream, each
//! variant documented by when it happens, and their OpenAI-shaped JSON body
//! (`{"error":{"message","type","param","code"}}`), so that an SDK client reads them as
//! it reads OpenAI's. (The HTTP parser's own answers, for requests too malformed to
//! reach a handler, are in `crates/http1-server`.)

use serde_json::json;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    // The request.
    /// The body is not one JSON object, or does not parse; the message says where.
    InvalidJson(String),
    /// Neither the body nor the path names a model.
    MissingModel,
    /// An audio upload that is not a readable `multipart/form-data` body.
    InvalidUpload(String),
    /// A `/v1/responses/{id}` or `previous_response_id` the proxy does not know: it did
    /// not pass through this proxy, or it was deleted, or it is older than the proxy
    /// remembers.
    UnknownResponse { id: String },
    /// A stored response whose instance is no longer configured.
    ResponseGone { id: String, instance: String },
    /// `previous_response_id` names a response made on an instance that does not serve
    /// the model asked for now.
    ResponseElsewhere {
        id: String,
        instance: String,
        model: String,
    },
    /// The body is larger than `server.max_body_bytes`: by its declared length, at
    /// once, or as it arrives. The connection is closed rather than the body drained.
    BodyTooLarge { limit: u64 },
    /// The body did not arrive within `server.body_timeout`.
    BodyTimeout,
    /// Reading the body failed: the client closed, or its chunked framing broke.
    BodyUnreadable(String),
    /// No instance serves this exact model; `served` lists those that are.
    ModelNotFound { model: String, served: String },
    /// The request's token estimate is larger than every serving instance's
    /// `max_tpm`: no instance could ever admit it.
    TokensExceedLimit {
        model: String,
        need: u64,
        largest: u64,
    },
    /// A header that would be forwarded is too long for a head line upstream.
    HeaderTooLong { name: String },
    /// The model is longer than the proxy takes (256 bytes), or, as a deployment in
    /// the upstream URL, makes that line too long.
    ModelTooLong,
    /// The request could not be put on the wire (the upstream client refused it).
    NotForwardable(String),

    // Capacity.
    /// All `server.workers` upstream calls stayed under way for `routing.queue_timeout`.
    NoPermit { total: usize },
    /// Request bodies already hold `server.max_body_memory` bytes.
    BodyMemoryFull { limit: u64 },
    /// Every instance serving the model is cooling down or has a full window; room
    /// comes in `wait`.
    RateLimited {
        model: String,
        need: u64,
        wait: Duration,
    },
    /// Every instance serving the model is failing or has its circuit open; the
    /// soonest may be back in `wait`.
    AllDown { model: String, wait: Duration },
    /// Instances were tried (`tried` of them) and the best failure was a timeout.
    /// `limit` names the setting that ran out, with its seconds.
    UpstreamTimeout {
        model: String,
        tried: usize,
        limit: (&'static str, f64),
    },
    /// Instances were tried and none could be reached, or every answer broke off.
    UpstreamUnreachable { model: String, tried: usize },
    /// The client closed its connection while the proxy waited on an upstream: the
    /// call was ended. Nobody reads this answer; the access log and statistics do.
    ClientGone,

    // A named client's own limits (`auth.clients`).
    /// The client's `models` do not include this model. Worded as OpenAI words it, so
    /// the answer does not tell whether the proxy serves the model to others.
    ModelNotAllowed { model: String },
    /// The client is over its own `tpm` or `rpm` (`limit` names which, `value` is its
    /// setting); its own window has room in `wait`.
    ClientRateLimited {
        client: String,
        limit: &'static str,
        value: u64,
        wait: Duration,
    },
    /// The client has spent its `tokens_per_day`; its day ends (00:00 UTC) in `wait`.
    BudgetSpent {
        client: String,
        budget: u64,
        wait: Duration,
    },

    // Authentication.
    /// `auth.api_keys` is set and the request presents no key.
    MissingKey,
    /// `auth.api_keys` is set and the request's key is not one of them.
    WrongKey,
    /// An admin endpoint, `auth.admin_key` is set, and the request does not present it.
    AdminKeyNeeded,
    /// An admin endpoint, no `auth.admin_key`, and the client is not on loopback.
    AdminLoopbackOnly,
    /// The client's address presented `auth.max_failures` wrong or missing keys within
    /// `auth.failure_window_seconds`; no key from it is checked until `wait` has passed.
    KeyFailures { wait: Duration },

    // Routes.
    /// No endpoint at this path.
    UnknownUrl { method: String, path: String },
    /// The endpoint exists, for `allowed` only.
    MethodNotAllowed {
        method: String,
        path: String,
        allowed: &'static str,
    },
    /// `/stats?window=` is not whole minutes from 1 to 60.
    BadWindow(String),
    /// `POST /config/reload` found the files invalid; the running configuration stays.
    ReloadFailed(String),
    /// The handler panicked; the proxy serves on.
    Internal,
    /// A Realtime API path called without a WebSocket handshake (RFC 6455 §4.1).
    NotWebSocket,
    /// `server.max_realtime_sessions` Realtime API sessions are open.
    TooManySessions { max: usize },
}

impl Error {
    pub fn status(&self) -> u16 {
        use Error::*;
        match self {
            InvalidJson(_) | MissingModel | BodyUnreadable(_) | TokensExceedLimit { .. } => 400,
            InvalidUpload(_) | ResponseElsewhere { .. } => 400,
            ModelTooLong | NotForwardable(_) | BadWindow(_) | ReloadFailed(_) => 400,
            MissingKey | WrongKey | AdminKeyNeeded => 401,
            AdminLoopbackOnly => 403,
            ModelNotFound { .. } | ModelNotAllowed { .. } | UnknownUrl { .. } => 404,
            UnknownResponse { .. } | ResponseGone { .. } => 404,
            MethodNotAllowed { .. } => 405,
            BodyTimeout => 408,
            BodyTooLarge { .. } => 413,
            RateLimited { .. }
            | KeyFailures { .. }
            | ClientRateLimited { .. }
            | BudgetSpent { .. } => 429,
            HeaderTooLong { .. } => 431,
            // nginx's "client closed request": the log's word for it.
            ClientGone => 499,
            NotWebSocket => 426,
            Internal => 500,
            UpstreamUnreachable { .. } => 502,
            NoPermit { .. } | BodyMemoryFull { .. } | AllDown { .. } => 503,
            TooManySessions { .. } => 503,
            UpstreamTimeout { .. } => 504,
        }
    }

    /// OpenAI's `type`.
    fn kind(&self) -> &'static str {
        use Error::*;
        match self {
            RateLimited { .. } | KeyFailures { .. } | ClientRateLimited { .. } => "requests",
            BudgetSpent { .. } => "insufficient_quota",
            AllDown { .. } | UpstreamTimeout { .. } | UpstreamUnreachable { .. } => {
                "upstream_error"
            }
            NoPermit { .. } | BodyMemoryFull { .. } | Internal => "server_error",
            TooManySessions { .. } => "server_error",
            _ => "invalid_request_error",
        }
    }

    fn code(&self) -> Option<&'static str> {
        use Error::*;
        Some(match self {
            InvalidJson(_) | MissingModel | BodyUnreadable(_) | ModelTooLong => return None,
            InvalidUpload(_) => return None,
            UnknownResponse { .. } | ResponseGone { .. } => "response_not_found",
            ResponseElsewhere { .. } => "response_on_another_instance",
            NotForwardable(_) | BadWindow(_) => return None,
            BodyTooLarge { .. } => "request_too_large",
            BodyTimeout => "request_timeout",
            ModelNotFound { .. } | ModelNotAllowed { .. } => "model_not_found",
            TokensExceedLimit { .. } => "tokens_exceed_limit",
            HeaderTooLong { .. } => "request_header_fields_too_large",
            NoPermit { .. } | BodyMemoryFull { .. } | TooManySessions { .. } => "server_busy",
            NotWebSocket => "upgrade_required",
            RateLimited { .. } | ClientRateLimited { .. } => "rate_limit_exceeded",
            BudgetSpent { .. } => "insufficient_quota",
            AllDown { .. } => "service_unavailable",
            UpstreamTimeout { .. } => "upstream_timeout",
            UpstreamUnreachable { .. } => "upstream_unreachable",
            MissingKey | WrongKey | AdminKeyNeeded => "invalid_api_key",
            AdminLoopbackOnly => "forbidden",
            KeyFailures { .. } => "too_many_key_failures",
            UnknownUrl { .. } => "unknown_url",
            MethodNotAllowed { .. } => "method_not_allowed",
            ReloadFailed(_) => "invalid_config",
            ClientGone => "client_closed_request",
            Internal => "internal_error",
        })
    }

    fn param(&self) -> Option<&'static str> {
        use Error::*;
        match self {
            MissingModel | ModelNotFound { .. } | ModelNotAllowed { .. } | ModelTooLong => {
                Some("model")
            }
            ResponseElsewhere { .. } => Some("previous_response_id"),
            TokensExceedLimit { .. } => Some("max_tokens"),
            BadWindow(_) => Some("window"),
            _ => None,
        }
    }

    pub fn message(&self) -> String {
        use Error::*;
        match self {
            InvalidJson(why) => why.clone(),
            MissingModel => "You must provide a model parameter.".into(),
            InvalidUpload(why) => format!("The upload could not be read: {why}."),
            UnknownResponse { id } => format!(
                "Response with id '{id}' not found: this proxy has no record of it (it did not pass through this proxy, was deleted, or is older than the proxy remembers)."
            ),
            ResponseGone { id, instance } => format!(
                "Response with id '{id}' was made on instance {instance}, which is no longer configured."
            ),
            ResponseElsewhere { id, instance, model } => format!(
                "previous_response_id '{id}' was made on instance {instance}, which does not serve model `{model}`; a conversation continues on the instance that holds it."
            ),
            BodyTooLarge { limit } => {
                format!("The request body is larger than the limit of {limit} bytes")
            }
            BodyTimeout => "The request body did not arrive within server.body_timeout.".into(),
            BodyUnreadable(why) => format!("Could not read the request body: {why}"),
            ModelNotFound { model, served } => format!(
                "The model `{model}` is not served by this proxy. Served models: {served}."
            ),
            TokensExceedLimit { model, need, largest } => format!(
                "This request may use about {need} tokens (prompt estimate plus completion reserve), \
                 more than any instance serving `{model}` admits per minute (largest max_tpm: {largest}). \
                 Lower max_tokens or split the request."
            ),
            HeaderTooLong { name } => format!(
                "The header {name} is too long to be forwarded upstream (about 4 KiB per line at most)."
            ),
            ModelTooLong => {
                "The model name is too long (at most 256 bytes, and short enough to be sent upstream as a deployment).".into()
            }
            NotForwardable(why) => format!("The request could not be forwarded: {why}"),
            NoPermit { total } => format!(
                "All {total} upstream calls this proxy allows at once (server.workers) are under way."
            ),
            BodyMemoryFull { limit } => format!(
                "The proxy holds as much request body data as it allows at once (server.max_body_memory, {limit} bytes); retry shortly."
            ),
            RateLimited { model, need, .. } => format!(
                "Every instance serving `{model}` is at its rate limit for a request of about {need} tokens. Retry after the time in the Retry-After header."
            ),
            AllDown { model, .. } => format!(
                "Every instance serving `{model}` is unavailable (failing, its circuit open, without a Microsoft Entra ID token, or its deployment for this model missing or refusing the proxy's key)."
            ),
            UpstreamTimeout {
                model,
                tried,
                limit: (name, secs),
            } => format!(
                "No instance answered for model `{model}` within {name} ({secs} s; {tried} tried)."
            ),
            UpstreamUnreachable { model, tried } => {
                format!("No instance could be reached for model `{model}` ({tried} tried).")
            }
            ModelNotAllowed { model } => {
                format!("The model `{model}` does not exist or you do not have access to it.")
            }
            ClientRateLimited {
                client,
                limit,
                value,
                ..
            } => {
                let per = if *limit == "tpm" { "tokens" } else { "requests" };
                format!(
                    "Rate limit reached for client `{client}`: its own {limit} limit ({value} {per} a minute) set on this proxy, not the instances'. Retry after the time in the Retry-After header."
                )
            }
            BudgetSpent { client, budget, .. } => format!(
                "Client `{client}` has used its daily budget of {budget} tokens on this proxy; it renews at 00:00 UTC (Retry-After)."
            ),
            MissingKey => {
                "Missing API key: send it as `Authorization: Bearer <key>` or `api-key: <key>`."
                    .into()
            }
            WrongKey => "Incorrect API key provided.".into(),
            AdminKeyNeeded => "This admin endpoint needs auth.admin_key.".into(),
            AdminLoopbackOnly => {
                "Admin endpoints answer only loopback clients while auth.admin_key is not set."
                    .into()
            }
            KeyFailures { .. } => {
                "Too many requests from this address presented a wrong or missing API key; no key from it is checked until the time in the Retry-After header has passed."
                    .into()
            }
            UnknownUrl { method, path } => format!("Invalid URL ({method} {path})"),
            MethodNotAllowed {
                method,
                path,
                allowed,
            } => format!("Method {method} is not allowed on {path}; use {allowed}"),
            BadWindow(given) => {
                format!("window must be whole minutes from 1 to 60, not {given:?}")
            }
            ReloadFailed(why) => format!("The configuration was not reloaded: {why}"),
            ClientGone => "The client closed its connection before the answer came.".into(),
            Internal => "The proxy failed while handling this request.".into(),
            NotWebSocket => "The Realtime API is a WebSocket: connect with `Upgrade: websocket`, `Connection: Upgrade`, `Sec-WebSocket-Key` and `Sec-WebSocket-Version: 13`.".into(),
            TooManySessions { max } => format!(
                "All {max} Realtime API sessions this proxy allows at once (server.max_realtime_sessions) are open; retry shortly."
            ),
        }
    }

    /// Headers the answer carries besides its content type.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        use Error::*;
        let retry = |wait: &Duration| {
            let wait = (*wait).max(Duration::from_millis(1));
            vec![
                ("Retry-After", wait.as_secs_f64().ceil().to_string()),
                ("retry-after-ms", wait.as_millis().max(1).to_string()),
            ]
        };
        let close = || ("Connection", "close".to_string());
        match self {
            BodyTooLarge { .. } | BodyTimeout | BodyUnreadable(_) => vec![close()],
            BodyMemoryFull { .. } => vec![("Retry-After", "1".into()), close()],
            NoPermit { .. } | TooManySessions { .. } => vec![("Retry-After", "1".into())],
            NotWebSocket => vec![("Upgrade", "websocket".into())],
            RateLimited { wait, .. } | AllDown { wait, .. } | KeyFailures { wait } => retry(wait),
            ClientRateLimited { wait, .. } | BudgetSpent { wait, .. } => retry(wait),
            MissingKey | WrongKey | AdminKeyNeeded => {
                vec![("WWW-Authenticate", "Bearer".into())]
            }
            MethodNotAllowed { allowed, .. } => vec![("Allow", (*allowed).to_string())],
            _ => Vec::new(),
        }
    }

    pub fn body(&self) -> Vec<u8> {
        json!({
            "error": {
                "message": self.message(),
                "type": self.kind(),
                "param": self.param(),
                "code": self.code(),
            }
        })
        .to_string()
        .into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_openai_shape_with_nulls() {
        let body: serde_json::Value =
            serde_json::from_slice(&Error::InvalidJson("bad".into()).body()).unwrap();
        assert_eq!(
            body,
            json!({"error": {"message": "bad", "type": "invalid_request_error",
                              "param": null, "code": null}})
        );
    }

    #[test]
    fn method_not_allowed_names_the_allowed_method() {
        let e = Error::MethodNotAllowed {
            method: "GET".into(),
            path: "/v1/embeddings".into(),
            allowed: "POST",
        };
        assert_eq!(e.status(), 405);
        assert_eq!(e.headers(), vec![("Allow", "POST".to_string())]);
        assert!(e.message().contains("GET"), "{}", e.message());
    }

    #[test]
    fn waits_are_given_in_whole_seconds_and_in_milliseconds() {
        let e = Error::RateLimited {
            model: "m".into(),
            need: 10,
            wait: Duration::from_millis(1500),
        };
        assert_eq!(
            e.headers(),
            vec![
                ("Retry-After", "2".to_string()),
                ("retry-after-ms", "1500".to_string())
            ]
        );
    }
}
