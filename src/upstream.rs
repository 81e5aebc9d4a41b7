//! Talking to one upstream instance: the shared ureq agent and its timeouts, the URL
//! and credentials for each provider type, which client headers may travel and which
//! upstream headers come back, and how an outcome is classified (DESIGN §5.3–§5.6).

use crate::config::{Instance, Provider, Routing};
use std::time::{Duration, Instant};
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{
    ConnectProxyConnector, Connector, NextTimeout, RustlsConnector,
};

/// One agent for the whole process so keep-alive connections are pooled and reused.
pub fn agent(routing: &Routing, workers: usize) -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        // A redirect could carry the api-key to another host; an upstream never needs one.
        .max_redirects(0)
        .max_redirects_will_error(false)
        .timeout_connect(Some(Duration::from_secs_f64(routing.connect_timeout)))
        .timeout_recv_response(Some(Duration::from_secs_f64(routing.timeout)))
        // Bounds each gap between reads of a (streamed) body, not the whole body.
        .timeout_per_read(Some(Duration::from_secs_f64(routing.timeout)))
        // ureq fills 128 KiB input and output buffers per connection by default: 256 KiB
        // of RSS for each stream held open. Sending a body, ureq borrows 10 KiB of the
        // input buffer as scratch space: a smaller one is grown to that and cut back on
        // every request, zero-filling the difference each time. A response head must fit
        // the input buffer; 8 KiB is also nginx's default limit for an upstream's head.
        .input_buffer_size(10 * 1024)
        .max_response_header_size(8 * 1024)
        .output_buffer_size(OUTPUT_BUFFER)
        .max_idle_connections(workers.max(16))
        .max_idle_connections_per_host(workers.max(16))
        .user_agent(concat!("azure-openai-proxy/", env!("CARGO_PKG_VERSION")))
        .build();
    let resolver = CachingResolver::<DefaultResolver>::new(DNS_TTL);
    // ureq's own chain, with our TCP layer (`transport.rs`) and without SOCKS, which
    // is not compiled in.
    let connector =
        ().chain(ConnectProxyConnector::default())
            .chain(crate::transport::TcpConnector)
            .chain(RustlsConnector::default());
    ureq::Agent::with_parts(config, connector, resolver)
}

/// ureq writes a request's head through this buffer a line at a time: a line that does
/// not fit cannot be sent at all (ureq fails the attempt), so longer ones are refused
/// before they are tried (see `head_line_fits`).
const OUTPUT_BUFFER: usize = 4 * 1024;

/// Whether a head line of `parts` (joined, with its framing) can be sent upstream.
/// A client controls header values and, with an instance that serves any model, the
/// deployment in the URL: a line too long to send must be its error, never a failed
/// attempt counted against the instance.
pub fn head_line_fits(parts: &[&str]) -> bool {
    parts.iter().map(|p| p.len()).sum::<usize>() + 16 <= OUTPUT_BUFFER
}

/// How long a resolved upstream address is used before it is looked up again, and how
/// long an old one still serves when the lookup fails.
const DNS_TTL: Duration = Duration::from_secs(60);
const DNS_STALE_MAX: Duration = Duration::from_secs(600);

/// ureq resolves the upstream's host name on every request, before it looks for a
/// pooled connection: against an Azure host that is a DNS lookup per request (musl's
/// resolver keeps no cache), and a DNS hiccup fails requests that need no new
/// connection at all. This remembers each host's addresses for `ttl`, and keeps using
/// them (up to `DNS_STALE_MAX`) while a fresh lookup fails.
#[derive(Debug)]
struct CachingResolver<R = DefaultResolver> {
    inner: R,
    ttl: Duration,
    /// One entry per upstream scheme and authority: as many as instances, a handful.
    cache: parking_lot::Mutex<Vec<Resolved>>,
}

#[derive(Debug)]
struct Resolved {
    scheme: String,
    authority: String,
    at: Instant,
    addrs: ResolvedSocketAddrs,
}

impl<R: Resolver + Default> CachingResolver<R> {
    fn new(ttl: Duration) -> Self {
        CachingResolver {
            inner: R::default(),
            ttl,
            cache: parking_lot::Mutex::new(Vec::new()),
        }
    }
}

impl<R: Resolver> Resolver for CachingResolver<R> {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let scheme = uri.scheme_str().unwrap_or_default();
        let authority = uri.authority().map_or("", |a| a.as_str());
        let fresh = self
            .cache
            .lock()
            .iter()
            .find(|r| r.scheme == scheme && r.authority == authority && r.at.elapsed() < self.ttl)
            .map(|r| r.addrs.clone());
        match fresh {
            Some(addrs) => Ok(addrs),
            None => self.look_up(uri, config, timeout),
        }
    }
}

impl<R: Resolver> CachingResolver<R> {
    /// A lookup, remembered; on failure, the last answer while it is recent enough. Out
    /// of line: the common path above runs deep in ureq's stack, on every request.
    #[inline(never)]
    fn look_up(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let scheme = uri.scheme_str().unwrap_or_default();
        let authority = uri.authority().map_or("", |a| a.as_str());
        let now = Instant::now();
        let cached = self
            .cache
            .lock()
            .iter()
            .find(|r| r.scheme == scheme && r.authority == authority)
            .map(|r| (now.saturating_duration_since(r.at), r.addrs.clone()));
        match self.inner.resolve(uri, config, timeout) {
            Ok(addrs) => {
                let mut cache = self.cache.lock();
                cache.retain(|r| !(r.scheme == scheme && r.authority == authority));
                cache.push(Resolved {
                    scheme: scheme.to_string(),
                    authority: authority.to_string(),
                    at: now,
                    addrs: addrs.clone(),
                });
                Ok(addrs)
            }
            Err(e) => match cached {
                Some((age, addrs)) if age < DNS_STALE_MAX => {
                    log::warn!(
                        "resolving {authority} failed ({e}); using its addresses from {} s ago",
                        age.as_secs()
                    );
                    Ok(addrs)
                }
                _ => Err(e),
            },
        }
    }
}

/// The operations the proxy forwards, by their path after `/v1/` (or after the
/// deployment in an Azure-style path).
pub const OPERATIONS: [&str; 3] = ["chat/completions", "completions", "embeddings"];

/// How to address one instance: what every request to it shares, put together once
/// per configuration rather than per request.
pub struct Address {
    /// The URL up to the deployment (azure) or the operation (openai).
    prefix: String,
    /// `?api-version=...` (azure), or nothing.
    query: String,
    /// The credential header. Its value is the one place a key leaves the `Secret`
    /// wrapper.
    pub credential: (&'static str, String),
    per_deployment: bool,
}

impl Address {
    pub fn new(inst: &Instance) -> Address {
        let base = &inst.api_base;
        let key = inst.api_key.expose();
        match inst.provider_type {
            Provider::Azure => {
                let mut query = String::from("?api-version=");
                push_escaped(&mut query, &inst.api_version);
                Address {
                    prefix: format!("{base}/openai/deployments/"),
                    query,
                    credential: ("api-key", key.to_string()),
                    per_deployment: true,
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
                credential: ("authorization", format!("Bearer {key}")),
                per_deployment: false,
            },
        }
    }

    /// The URL of `op` on `deployment`.
    pub fn url(&self, deployment: &str, op: &str) -> String {
        let mut url = String::with_capacity(
            self.prefix.len() + 3 * deployment.len() + op.len() + self.query.len() + 1,
        );
        url.push_str(&self.prefix);
        if self.per_deployment {
            push_escaped(&mut url, deployment);
            url.push('/');
        }
        url.push_str(op);
        url.push_str(&self.query);
        url
    }
}

/// Appends `s` percent-encoding everything but RFC 3986 unreserved characters, so a
/// model name taken from the client (legacy serve-any instance) cannot change the
/// upstream path.
fn push_escaped(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
}

/// Client headers that never reach an upstream: the client's credentials for the
/// proxy, hop-by-hop headers, and what the proxy itself sets (host, length, encoding).
const DROPPED_REQUEST_HEADERS: [&str; 21] = [
    "authorization",
    "api-key",
    "x-api-key",
    "ocp-apim-subscription-key",
    "cookie",
    "openai-organization",
    "openai-project",
    "host",
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "expect",
    // The proxy reads bodies for usage; it asks for them uncompressed.
    "accept-encoding",
];

/// Whether a client header travels upstream: not one of the above, and one ureq will
/// send (the server's parser already refuses control bytes; this keeps a header that
/// ureq would reject from ever failing an attempt, and so an instance).
pub fn forward_request_header(name: &str, value: &str) -> bool {
    !DROPPED_REQUEST_HEADERS
        .iter()
        .any(|d| d.eq_ignore_ascii_case(name))
        && ureq::http::HeaderName::from_bytes(name.as_bytes()).is_ok()
        && ureq::http::HeaderValue::from_str(value).is_ok()
}

const RETURNED_RESPONSE_HEADERS: [&str; 11] = [
    "content-type",
    "x-request-id",
    "apim-request-id",
    "x-ms-region",
    "x-ms-client-request-id",
    "openai-processing-ms",
    "openai-model",
    "openai-version",
    "retry-after",
    "retry-after-ms",
    "x-ms-retry-after-ms",
];

pub fn return_response_header(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("x-ratelimit-") || RETURNED_RESPONSE_HEADERS.contains(&lower.as_str())
}

/// What an upstream's status means for routing (DESIGN §5.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// 429: the instance is out of quota for now.
    RateLimited,
    /// 5xx (and anything unexpected): the instance is failing.
    Failure,
    /// 401/403/404: the instance's key or deployment is wrong.
    InstanceFault,
    /// Other 4xx: the request itself is wrong; every instance would say the same.
    ClientError,
}

impl Outcome {
    pub fn of(status: u16) -> Outcome {
        match status {
            200..=299 => Outcome::Success,
            429 => Outcome::RateLimited,
            401 | 403 | 404 => Outcome::InstanceFault,
            400..=499 => Outcome::ClientError,
            _ => Outcome::Failure,
        }
    }

    /// Whether another instance may give a different answer.
    pub fn retry_elsewhere(self) -> bool {
        !matches!(self, Outcome::Success | Outcome::ClientError)
    }
}

/// Token usage as an upstream reports it (`usage` in a body or in a stream's last chunk).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
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
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Resolves every name to 10.0.0.N:443, N counting the lookups; fails once `fail`.
    #[derive(Debug, Default)]
    struct Counting {
        lookups: AtomicUsize,
        fail: std::sync::atomic::AtomicBool,
    }

    impl Resolver for Counting {
        fn resolve(
            &self,
            _: &ureq::http::Uri,
            _: &ureq::config::Config,
            _: NextTimeout,
        ) -> Result<ResolvedSocketAddrs, ureq::Error> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(ureq::Error::HostNotFound);
            }
            let n = self.lookups.fetch_add(1, Ordering::SeqCst) + 1;
            let mut addrs = self.empty();
            addrs.push(format!("10.0.0.{n}:443").parse().unwrap());
            Ok(addrs)
        }
    }

    fn lookup(r: &CachingResolver<Counting>, url: &str) -> Result<String, ureq::Error> {
        let timeout = NextTimeout {
            after: Duration::from_secs(1).into(),
            reason: ureq::Timeout::Resolve,
            per_read: None,
            per_write: None,
        };
        let config = ureq::config::Config::default();
        r.resolve(&url.parse().unwrap(), &config, timeout)
            .map(|a| a.iter().map(|a| a.to_string()).collect())
    }

    #[test]
    fn names_are_looked_up_once_per_ttl_and_kept_while_lookups_fail() {
        let cached = CachingResolver::<Counting>::new(Duration::from_secs(60));
        let east = "https://east.example.com/openai/x";
        assert_eq!(lookup(&cached, east).unwrap(), "10.0.0.1:443");
        assert_eq!(
            lookup(&cached, "https://east.example.com/other").unwrap(),
            "10.0.0.1:443"
        );
        assert_eq!(
            lookup(&cached, "https://west.example.com/").unwrap(),
            "10.0.0.2:443"
        );
        assert_eq!(cached.inner.lookups.load(Ordering::SeqCst), 2);

        let expiring = CachingResolver::<Counting>::new(Duration::ZERO);
        assert_eq!(lookup(&expiring, east).unwrap(), "10.0.0.1:443");
        assert_eq!(
            lookup(&expiring, east).unwrap(),
            "10.0.0.2:443",
            "looked up again"
        );
        expiring.inner.fail.store(true, Ordering::SeqCst);
        assert_eq!(
            lookup(&expiring, east).unwrap(),
            "10.0.0.2:443",
            "the last good answer"
        );
        assert!(lookup(&expiring, "https://new.example.com/").is_err());
    }

    fn instance(yaml: &str) -> Instance {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn azure_and_openai_urls() {
        let az = Address::new(&instance("{name: a, api_key: k, api_base: 'https://r.example.com', api_version: 2024-10-21, supported_models: [m]}"));
        assert_eq!(
            az.url("my-dep", "chat/completions"),
            "https://r.example.com/openai/deployments/my-dep/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(
            az.url("../x?y é", "embeddings"),
            "https://r.example.com/openai/deployments/..%2Fx%3Fy%20%C3%A9/embeddings?api-version=2024-10-21"
        );
        assert_eq!(az.credential, ("api-key", "k".to_string()));

        let oa = Address::new(&instance("{name: o, provider_type: openai, api_key: k, api_base: 'https://o.example.com/v1', supported_models: [m]}"));
        assert_eq!(
            oa.url("m", "embeddings"),
            "https://o.example.com/v1/embeddings"
        );
        let oa2 = Address::new(&instance("{name: o, provider_type: openai, api_key: k, api_base: 'https://o.example.com', supported_models: [m]}"));
        assert_eq!(
            oa2.url("m", "completions"),
            "https://o.example.com/v1/completions"
        );
        assert_eq!(oa2.credential, ("authorization", "Bearer k".to_string()));
    }

    #[test]
    fn credentials_and_hop_by_hop_headers_stay_behind() {
        for h in [
            "Authorization",
            "API-KEY",
            "Host",
            "Connection",
            "Transfer-Encoding",
            "Cookie",
        ] {
            assert!(!forward_request_header(h, "v"), "{h}");
        }
        for h in ["Content-Type", "Accept", "User-Agent", "X-Stainless-Lang"] {
            assert!(forward_request_header(h, "v"), "{h}");
        }
        for bad in ["a\u{1}b", "\u{0}", "\u{7f}", "a\nb"] {
            assert!(!forward_request_header("X-A", bad), "{bad:?}");
        }
        assert!(return_response_header("X-RateLimit-Remaining-Tokens"));
        assert!(return_response_header("apim-request-id"));
        assert!(!return_response_header("Set-Cookie"));
        assert!(!return_response_header("Transfer-Encoding"));
    }

    #[test]
    fn outcome_classes() {
        assert_eq!(Outcome::of(200), Outcome::Success);
        assert_eq!(Outcome::of(429), Outcome::RateLimited);
        assert_eq!(Outcome::of(503), Outcome::Failure);
        assert_eq!(Outcome::of(401), Outcome::InstanceFault);
        assert_eq!(Outcome::of(404), Outcome::InstanceFault);
        assert_eq!(Outcome::of(400), Outcome::ClientError);
        assert!(!Outcome::of(400).retry_elsewhere() && Outcome::of(404).retry_elsewhere());
    }
}
