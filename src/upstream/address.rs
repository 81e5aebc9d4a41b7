//! Where and how each instance is called (DESIGN §5.3): the operations the proxy
//! forwards, an instance's URL for an operation on a deployment (Azure's deployment
//! URLs for a dated `api_version`, Azure's v1 API for `v1`, `preview` or `latest`, an
//! OpenAI-compatible `/v1/`), and its credential (a key header put together once per
//! configuration, or an Entra ID token read at each request).

use crate::config::api_version::{asks_usage, V1_VERSIONS};
use crate::config::{Instance, Provider};
use crate::credential::Token;
use std::sync::Arc;

/// An operation the proxy forwards, by its path after `/v1/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Chat,
    Completions,
    Embeddings,
    Responses,
    Images,
    Speech,
    Transcriptions,
    Translations,
}

impl Op {
    pub const ALL: [Op; 8] = [
        Op::Chat,
        Op::Completions,
        Op::Embeddings,
        Op::Responses,
        Op::Images,
        Op::Speech,
        Op::Transcriptions,
        Op::Translations,
    ];

    pub fn path(self) -> &'static str {
        match self {
            Op::Chat => "chat/completions",
            Op::Completions => "completions",
            Op::Embeddings => "embeddings",
            Op::Responses => "responses",
            Op::Images => "images/generations",
            Op::Speech => "audio/speech",
            Op::Transcriptions => "audio/transcriptions",
            Op::Translations => "audio/translations",
        }
    }

    pub fn from_path(path: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.path() == path)
    }

    /// What a deployment fault (401, 403, 404) on this operation for `model` takes an
    /// instance out for. Chat, completions and embeddings are served under the
    /// deployment on every api-version, so their 404 means the deployment is missing:
    /// the model is out. The other operations exist only on some api-versions or
    /// deployments, so their 404 may mean only that: the model is out for that
    /// operation alone, and chat goes on.
    pub fn fault_scope(self, model: &str) -> std::borrow::Cow<'_, str> {
        match self {
            Op::Chat | Op::Completions | Op::Embeddings => model.into(),
            _ => format!("{model} ({})", self.path()).into(),
        }
    }

    /// Its request is a `multipart/form-data` upload, not JSON.
    pub fn is_upload(self) -> bool {
        matches!(self, Op::Transcriptions | Op::Translations)
    }

    /// Its requests count against an instance's TPM window (the others count only as
    /// requests).
    pub fn counts_tokens(self) -> bool {
        matches!(
            self,
            Op::Chat | Op::Completions | Op::Embeddings | Op::Responses
        )
    }

    /// Azure serves it under a deployment (`/openai/deployments/{dep}/{op}`) on a dated
    /// api-version; the Responses API is not, it reads the deployment from the body.
    fn per_deployment(self) -> bool {
        self != Op::Responses
    }
}

/// The URL layouts of the upstreams.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Shape {
    /// Azure on a dated api-version: `{base}/openai/deployments/{dep}/{op}?api-version=`.
    Deployments,
    /// Azure's v1 API (`{base}/openai/v1/{op}`), or an OpenAI-compatible upstream
    /// (`{base}/v1/{op}`): the deployment is the body's `model`.
    V1,
}

/// How to address one instance: what every request to it shares, put together once
/// per configuration rather than per request.
pub struct Address {
    /// The URL up to the operation (or to `deployments/`).
    prefix: String,
    /// `?api-version=...`, or nothing.
    query: String,
    pub credential: Auth,
    shape: Shape,
    /// The upstream accepts `stream_options.include_usage`.
    pub asks_usage: bool,
}

/// How an instance's requests prove who sends them.
pub enum Auth {
    /// A key header. Its value is the one place a key leaves the `Secret` wrapper.
    Key(&'static str, String),
    /// `Authorization: Bearer` with the credential's current Entra ID token.
    Entra(Arc<Token>),
}

impl Address {
    pub fn new(inst: &Instance) -> Address {
        let base = &inst.api_base;
        let key = inst.api_key.expose();
        let version = inst.api_version.trim();
        match inst.provider_type {
            Provider::Azure if V1_VERSIONS.contains(&version) => Address {
                prefix: format!("{base}/openai/v1/"),
                query: if version == "preview" {
                    "?api-version=preview".into()
                } else {
                    String::new()
                },
                credential: Auth::Key("api-key", key.to_string()),
                shape: Shape::V1,
                asks_usage: asks_usage(inst),
            },
            Provider::Azure => {
                let mut query = String::from("?api-version=");
                push_escaped(&mut query, version);
                Address {
                    prefix: format!("{base}/openai/"),
                    query,
                    credential: Auth::Key("api-key", key.to_string()),
                    shape: Shape::Deployments,
                    asks_usage: asks_usage(inst),
                }
            }
            // `https://api.openai.com/v1` and `https://api.openai.com` both work as api_base.
            Provider::Openai => Address {
                prefix: if base.ends_with("/v1") {
                    format!("{base}/")
                } else {
                    format!("{base}/v1/")
                },
                query: String::new(),
                credential: Auth::Key("authorization", format!("Bearer {key}")),
                shape: Shape::V1,
                asks_usage: asks_usage(inst),
            },
        }
    }

    /// The same address, its requests carrying `token`'s bearer tokens instead of a key.
    pub fn with_token(self, token: Arc<Token>) -> Address {
        Address {
            credential: Auth::Entra(token),
            ..self
        }
    }

    /// Whether the instance can be sent requests: it has a key, or a token (or its
    /// first is on the way).
    pub fn usable(&self) -> bool {
        match &self.credential {
            Auth::Key(..) => true,
            Auth::Entra(token) => token.usable(),
        }
    }

    /// The URL of `op` on `deployment`.
    pub fn url(&self, deployment: &str, op: Op) -> String {
        let mut url = String::with_capacity(
            self.prefix.len() + 12 + 3 * deployment.len() + 24 + self.query.len(),
        );
        url.push_str(&self.prefix);
        if self.shape == Shape::Deployments && op.per_deployment() {
            url.push_str("deployments/");
            push_escaped(&mut url, deployment);
            url.push('/');
        }
        url.push_str(op.path());
        url.push_str(&self.query);
        url
    }

    /// Whether the upstream reads the deployment from the body's `model` for `op`.
    pub fn model_in_body(&self, op: Op) -> bool {
        self.shape == Shape::V1 || !op.per_deployment()
    }

    /// The Realtime API's WebSocket URL for `deployment`: `wss://` for an `https://`
    /// api_base, `ws://` for `http://`. Azure's v1 API and OpenAI name the deployment
    /// as `model`; Azure's dated versions as `deployment`, beside the api-version.
    pub fn realtime_url(&self, deployment: &str) -> String {
        let mut url = String::with_capacity(self.prefix.len() + 40 + 3 * deployment.len());
        let rest = match self.prefix.split_once("://") {
            Some(("https", rest)) => {
                url.push_str("wss://");
                rest
            }
            Some(("http", rest)) => {
                url.push_str("ws://");
                rest
            }
            _ => &self.prefix,
        };
        url.push_str(rest);
        url.push_str("realtime");
        url.push_str(&self.query);
        url.push(if self.query.is_empty() { '?' } else { '&' });
        url.push_str(match self.shape {
            Shape::Deployments => "deployment=",
            Shape::V1 => "model=",
        });
        push_escaped(&mut url, deployment);
        url
    }

    /// The URL of a stored response, `responses/{id}` then `rest` (`""`,
    /// `/input_items`, `/cancel`), with the client's `query` reduced to the parameters
    /// that page or widen the listing (`PASSED_PARAMS`): the proxy alone decides the
    /// rest of the upstream's query, its `api-version` above all.
    pub fn response_url(&self, id: &str, rest: &str, query: &str) -> String {
        let mut url = self.prefix.clone();
        url.push_str("responses/");
        push_escaped(&mut url, id);
        url.push_str(rest);
        url.push_str(&self.query);
        for (name, value) in query.split('&').filter_map(|p| p.split_once('=')) {
            if PASSED_PARAMS.contains(&name) {
                url.push(if url.contains('?') { '&' } else { '?' });
                push_query_value(&mut url, name);
                url.push('=');
                push_query_value(&mut url, value);
            }
        }
        url
    }
}

/// The client's query parameters a stored-response call passes on: the listing's
/// pagination and what it includes (`include[]` as sent, or with its brackets
/// escaped, as HTTP clients do). Anything else (a second `api-version`, say) would
/// let the client choose what only the proxy's configuration may.
const PASSED_PARAMS: [&str; 8] = [
    "after",
    "before",
    "limit",
    "order",
    "include",
    "include[]",
    "include%5B%5D",
    "include%5b%5d",
];

/// Appends `s` percent-encoding everything but RFC 3986 unreserved characters, so a
/// model name or response id taken from the client cannot change the upstream path.
/// A segment of dots alone (`.`, `..`) is encoded whole: bare, it would name this
/// directory or its parent.
fn push_escaped(out: &mut String, s: &str) {
    let dots = !s.is_empty() && s.bytes().all(|b| b == b'.');
    for b in s.bytes() {
        if dots {
            out.push_str("%2E");
        } else {
            push_byte(out, b);
        }
    }
}

/// Appends a query value as the client encoded it, its `%XX` escapes kept and any
/// other byte outside the unreserved set encoded.
fn push_query_value(out: &mut String, value: &str) {
    let bytes = value.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        let escape = b == b'%'
            && bytes
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit));
        if escape {
            out.push('%');
        } else {
            push_byte(out, b);
        }
    }
}

/// Appends `b` as it is when RFC 3986 leaves it unreserved, else as `%XX`.
fn push_byte(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
        out.push(char::from(b));
    } else {
        out.push('%');
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(yaml: &str) -> Instance {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn azure(version: &str) -> Address {
        Address::new(&instance(&format!("{{name: a, api_key: k, api_base: 'https://r.example.com', api_version: '{version}', supported_models: [m]}}")))
    }

    #[test]
    fn azure_deployment_urls_on_a_dated_version() {
        let az = azure("2024-10-21");
        assert_eq!(
            az.url("my-dep", Op::Chat),
            "https://r.example.com/openai/deployments/my-dep/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(
            az.url("../x?y é", Op::Embeddings),
            "https://r.example.com/openai/deployments/..%2Fx%3Fy%20%C3%A9/embeddings?api-version=2024-10-21"
        );
        assert_eq!(
            az.url("whisper", Op::Transcriptions),
            "https://r.example.com/openai/deployments/whisper/audio/transcriptions?api-version=2024-10-21"
        );
        // The Responses API is not per deployment: the deployment goes in the body.
        assert_eq!(
            az.url("dep", Op::Responses),
            "https://r.example.com/openai/responses?api-version=2024-10-21"
        );
        assert!(az.model_in_body(Op::Responses) && !az.model_in_body(Op::Chat));
        assert_eq!(
            az.response_url("resp_1", "/input_items", ""),
            "https://r.example.com/openai/responses/resp_1/input_items?api-version=2024-10-21"
        );
        assert!(matches!(&az.credential, Auth::Key("api-key", k) if k == "k"));
        assert_eq!(
            az.realtime_url("rt dep"),
            "wss://r.example.com/openai/realtime?api-version=2024-10-21&deployment=rt%20dep"
        );
    }

    #[test]
    fn dot_segments_are_encoded_whole() {
        let az = azure("2024-10-21");
        for (dep, segment) in [("..", "%2E%2E"), (".", "%2E"), ("gpt-3.5", "gpt-3.5")] {
            assert_eq!(
                az.url(dep, Op::Chat),
                format!("https://r.example.com/openai/deployments/{segment}/chat/completions?api-version=2024-10-21")
            );
        }
        assert_eq!(
            az.response_url("..", "", ""),
            "https://r.example.com/openai/responses/%2E%2E?api-version=2024-10-21"
        );
    }

    #[test]
    fn the_proxy_chooses_the_stored_response_query() {
        let az = azure("2025-04-01-preview");
        assert_eq!(
            az.response_url(
                "resp_1",
                "/input_items",
                "api-version=1999-01-01&limit=5&after=item%2F1&order=a b&include[]=x&include%5B%5D=y&stream=true"
            ),
            "https://r.example.com/openai/responses/resp_1/input_items?api-version=2025-04-01-preview&limit=5&after=item%2F1&order=a%20b&include%5B%5D=x&include%5B%5D=y"
        );
        let v1 = azure("v1");
        assert_eq!(
            v1.response_url("resp_1", "", "api-version=1999-01-01&include=a.b"),
            "https://r.example.com/openai/v1/responses/resp_1?include=a.b"
        );
    }

    #[test]
    fn azure_v1_api_urls() {
        for (version, query) in [
            ("v1", ""),
            ("latest", ""),
            ("preview", "?api-version=preview"),
        ] {
            let az = azure(version);
            assert_eq!(
                az.url("dep", Op::Chat),
                format!("https://r.example.com/openai/v1/chat/completions{query}")
            );
            assert_eq!(
                az.url("dep", Op::Responses),
                format!("https://r.example.com/openai/v1/responses{query}")
            );
            assert_eq!(
                az.response_url("resp_1", "", ""),
                format!("https://r.example.com/openai/v1/responses/resp_1{query}")
            );
            assert!(az.model_in_body(Op::Chat) && az.asks_usage);
            let sep = if query.is_empty() { '?' } else { '&' };
            assert_eq!(
                az.realtime_url("dep"),
                format!("wss://r.example.com/openai/v1/realtime{query}{sep}model=dep")
            );
        }
    }

    #[test]
    fn openai_urls() {
        let oa = Address::new(&instance("{name: o, provider_type: openai, api_key: k, api_base: 'https://o.example.com/v1', supported_models: [m]}"));
        assert_eq!(
            oa.url("m", Op::Embeddings),
            "https://o.example.com/v1/embeddings"
        );
        let oa2 = Address::new(&instance("{name: o, provider_type: openai, api_key: k, api_base: 'https://o.example.com', supported_models: [m]}"));
        assert_eq!(
            oa2.url("m", Op::Completions),
            "https://o.example.com/v1/completions"
        );
        assert!(matches!(&oa2.credential, Auth::Key("authorization", k) if k == "Bearer k"));
        let local = Address::new(&instance("{name: o, provider_type: openai, api_key: k, api_base: 'http://127.0.0.1:9', supported_models: [m]}"));
        assert_eq!(
            local.realtime_url("m"),
            "ws://127.0.0.1:9/v1/realtime?model=m"
        );
    }

    #[test]
    fn stream_usage_from_2024_09_01_on() {
        for (version, accepts) in [
            ("2024-10-21", true),
            ("2024-09-01-preview", true),
            ("2025-04-01-preview", true),
            ("2024-08-01-preview", false),
            ("2024-06-01", false),
            ("2023-05-15", false),
            ("someday", false),
        ] {
            assert_eq!(
                crate::config::api_version::accepts_stream_usage(version),
                accepts,
                "{version}"
            );
            assert_eq!(azure(version).asks_usage, accepts, "{version}");
        }
    }
}
