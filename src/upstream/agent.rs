//! The one ureq agent of a configuration generation: its timeouts and buffer sizes,
//! the TCP layer under it (`transport.rs`), and a resolver that looks each upstream host
//! up once a minute rather than once per request.

use crate::config::Routing;
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
        // A non-streamed answer's head comes when its generation is done: `timeout`. A
        // stream's head and first event have the first-byte limit instead, set per call
        // (`transport::reads_until`), which can only shorten this one.
        .timeout_recv_response(Some(Duration::from_secs_f64(
            routing.timeout.max(routing.first_byte_timeout),
        )))
        // Bounds each gap between reads of a body, not the whole body.
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
            .chain(super::transport::TcpConnector)
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
/// After a failed lookup, how long the old answer serves before the next try: one
/// lookup (and one log line) per host every few seconds during a DNS outage, not one
/// per request.
const DNS_RETRY: Duration = Duration::from_secs(5);

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
    /// When it was looked up.
    at: Instant,
    /// When to look it up again.
    next: Instant,
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
        let now = Instant::now();
        let cached = self
            .cache
            .lock()
            .iter()
            .find(|r| r.scheme == scheme && r.authority == authority)
            .map(|r| {
                (
                    now < r.next,
                    now.saturating_duration_since(r.at),
                    r.addrs.clone(),
                )
            });
        match cached {
            Some((true, _, addrs)) => Ok(addrs),
            stale => {
                let stale = stale.map(|(_, age, addrs)| (age, addrs));
                self.look_up(uri, config, timeout, (scheme, authority, now), stale)
            }
        }
    }
}

impl<R: Resolver> CachingResolver<R> {
    /// A lookup, remembered; on failure, the `stale` answer (its age and addresses)
    /// while it is recent enough. Out of line: the common path above runs deep in
    /// ureq's stack, on every request.
    #[inline(never)]
    fn look_up(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
        (scheme, authority, now): (&str, &str, Instant),
        stale: Option<(Duration, ResolvedSocketAddrs)>,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        match self.inner.resolve(uri, config, timeout) {
            Ok(addrs) => {
                let mut cache = self.cache.lock();
                cache.retain(|r| !(r.scheme == scheme && r.authority == authority));
                cache.push(Resolved {
                    scheme: scheme.to_string(),
                    authority: authority.to_string(),
                    at: now,
                    next: now + self.ttl,
                    addrs: addrs.clone(),
                });
                Ok(addrs)
            }
            Err(e) => match stale {
                Some((age, addrs)) if age < DNS_STALE_MAX => {
                    log::warn!(
                        "resolving {authority} failed ({e}); using its addresses from {} s ago",
                        age.as_secs()
                    );
                    let mut cache = self.cache.lock();
                    let entry = cache
                        .iter_mut()
                        .find(|r| r.scheme == scheme && r.authority == authority);
                    if let Some(entry) = entry {
                        entry.next = now + DNS_RETRY;
                    }
                    Ok(addrs)
                }
                _ => Err(e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Resolves every name to 10.0.0.N:443, N counting the lookups; fails once `fail`.
    #[derive(Debug, Default)]
    struct Counting {
        lookups: AtomicUsize,
        tries: AtomicUsize,
        fail: std::sync::atomic::AtomicBool,
    }

    impl Resolver for Counting {
        fn resolve(
            &self,
            _: &ureq::http::Uri,
            _: &ureq::config::Config,
            _: NextTimeout,
        ) -> Result<ResolvedSocketAddrs, ureq::Error> {
            self.tries.fetch_add(1, Ordering::SeqCst);
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
        let tries = expiring.inner.tries.load(Ordering::SeqCst);
        assert_eq!(lookup(&expiring, east).unwrap(), "10.0.0.2:443");
        assert_eq!(
            expiring.inner.tries.load(Ordering::SeqCst),
            tries,
            "not looked up again for DNS_RETRY"
        );
        assert!(lookup(&expiring, "https://new.example.com/").is_err());
    }
}
