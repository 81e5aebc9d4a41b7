//! What a handler answers: a status, headers and a body, either whole or an upstream
//! event stream still to relay, with what the access log and the statistics learn
//! about the request (`Trace`).

use crate::capacity::Permit;
use crate::error::Error;
use crate::outcome::{Attempt, Usage};
use crate::state::State;
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
    /// How a Realtime API session ended; its usage was counted as it came.
    pub session: Option<&'static str>,
    /// The named client that sent it (`auth.clients`).
    pub client: Option<String>,
    /// Refused by its client's own `tpm`, `rpm` or `tokens_per_day`.
    pub own_limit: bool,
}

/// What a reply sends after its head.
pub enum ReplyBody {
    Full(Vec<u8>),
    /// A 2xx event stream still to be relayed.
    Stream(Stream),
    /// A `101`: the connection is taken over (a Realtime API session).
    Upgrade(Box<dyn Upgrade>),
    /// Any other upstream answer still to be relayed as it arrives.
    Relay(Relay),
}

/// An upstream answer (not an event stream) and what its relay needs.
pub struct Relay {
    pub body: crate::upstream::relay::Relay,
    /// The instance answering, by its index in the request's configuration.
    pub instance: usize,
    /// Held until the body is relayed: the upstream call is under way until then.
    pub permit: Option<Permit>,
    /// A Responses API answer: the model under which its `id` is remembered.
    pub remember: Option<String>,
}

/// What runs on a connection after its `101` answer, on the connection's thread, and
/// fills in the request's `Trace`.
pub trait Upgrade {
    fn run(self: Box<Self>, state: &State, conn: http1_server::Upgraded<'_>, trace: &mut Trace);
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
    pub body: ReplyBody,
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
            body: ReplyBody::Full(body),
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
