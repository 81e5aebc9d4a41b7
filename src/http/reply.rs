//! What a handler answers: a status, headers and a body, either whole or an upstream
//! event stream still to relay, with what the access log and the statistics learn
//! about the request (`Trace`).

use crate::capacity::Permit;
use crate::error::Error;
use crate::outcome::{Attempt, Usage};
use serde_json::Value;

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
    /// The named client that sent it (`auth.clients`).
    pub client: Option<String>,
    /// Refused by its client's own `tpm`, `rpm` or `tokens_per_day`.
    pub own_limit: bool,
}

pub enum Body {
    Full(Vec<u8>),
    /// A 2xx event stream still to be relayed.
    Stream(Stream),
}

/// An upstream event stream and what its relay needs.
pub struct Stream {
    /// The stream's first event, already read.
    pub first: Vec<u8>,
    pub rest: ureq::BodyReader<'static>,
    pub options: crate::upstream::stream::Options,
    /// The prompt's estimate, for the usage when the upstream reports none.
    pub prompt_tokens: u64,
    /// The instance streaming, by its index in the request's configuration.
    pub instance: usize,
    /// Held until the stream ends: a stream is an upstream call under way.
    pub permit: Option<Permit>,
}

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Body,
    pub trace: Trace,
}

impl Reply {
    pub fn json(status: u16, value: &Value) -> Reply {
        Reply::full(status, "application/json", value.to_string().into_bytes())
    }

    pub fn full(status: u16, content_type: &str, body: Vec<u8>) -> Reply {
        Reply {
            status,
            headers: vec![("Content-Type".into(), content_type.into())],
            body: Body::Full(body),
            trace: Trace::default(),
        }
    }
}

impl From<Error> for Reply {
    fn from(e: Error) -> Reply {
        let mut reply = Reply::full(e.status(), "application/json", e.body());
        reply
            .headers
            .extend(e.headers().into_iter().map(|(k, v)| (k.to_string(), v)));
        reply
    }
}
