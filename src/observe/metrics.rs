//! The Prometheus text exposition (format 0.0.4) that `GET /metrics` serves, built
//! from the statistics and from gauges the caller reads: each instance's state and
//! windows, and the process's capacity in use.

use super::stats::{Histogram, Stats, LATENCY_BOUNDS_MS};
use std::fmt::Write;

const PREFIX: &str = "aoai_proxy";

/// The exposition being written: `# HELP`/`# TYPE` once per family, then its samples.
struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(
            self.0,
            "# HELP {PREFIX}_{name} {help}\n# TYPE {PREFIX}_{name} {kind}"
        );
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let _ = write!(self.0, "{PREFIX}_{name}");
        if !labels.is_empty() {
            let rendered: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = write!(self.0, "{{{}}}", rendered.join(","));
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) {
        let mut cumulative = 0;
        for (i, n) in h.bins.iter().enumerate() {
            cumulative += n;
            let le = LATENCY_BOUNDS_MS
                .get(i)
                .map_or("+Inf".to_string(), |ms| (*ms as f64 / 1000.0).to_string());
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&format!("{name}_bucket"), &with_le, cumulative);
        }
        self.sample(&format!("{name}_sum"), labels, h.sum_us as f64 / 1e6);
        self.sample(&format!("{name}_count"), labels, h.count());
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One instance's gauges, as the instance table shows it now.
pub struct InstanceGauges<'a> {
    pub name: &'a str,
    pub tpm_used: u64,
    pub tpm_limit: Option<u64>,
    pub rpm_used: u64,
    /// Its state's name, among `states`.
    pub state: &'static str,
}

/// The process's gauges: used and limit of each bound.
pub struct Gauges {
    pub connections: (usize, usize),
    pub permits: (usize, usize),
    pub body_bytes: (u64, u64),
    /// Realtime API sessions open (handshakes under way included), and the limit.
    pub realtime_sessions: (usize, usize),
    pub uptime_secs: u64,
    /// `local`, `shared` or `degraded` (see `admin::health`).
    pub shared_state: &'static str,
    /// Counters kept outside the statistics: the 401s given, and the 429s to
    /// addresses blocked after too many (`key_failures`).
    pub key_failures: (u64, u64),
}

/// The values `Gauges::shared_state` takes, each a 0 or 1 sample.
const SHARED_STATES: [&str; 3] = ["local", "shared", "degraded"];

/// `labels`, and `client` last when there is one.
fn with_client<'a>(
    labels: &[(&'a str, &'a str)],
    client: Option<&'a str>,
) -> Vec<(&'a str, &'a str)> {
    let mut all = labels.to_vec();
    all.extend(client.map(|c| ("client", c)));
    all
}

/// The exposition: `states` are every name an instance state can have (each gets a 0
/// or 1 sample).
pub fn render(
    stats: &Stats,
    instances: &[InstanceGauges],
    states: &[&str],
    gauges: &Gauges,
) -> String {
    let mut out = Exposition(String::with_capacity(8 * 1024));

    out.family("requests_total", "counter", "API requests answered, by the last instance tried (none: the proxy tried none), model and status; a named client's carry its name as `client`.");
    let named = stats
        .clients
        .iter()
        .map(|(c, m)| (Some(c.as_str()), &m.requests));
    for (client, requests) in std::iter::once((None, &stats.requests)).chain(named) {
        for (instance, models) in requests {
            for (model, statuses) in models {
                for (status, n) in statuses {
                    let status = status.to_string();
                    let labels = [
                        ("instance", instance.as_str()),
                        ("model", model),
                        ("status", &status),
                    ];
                    out.sample("requests_total", &with_client(&labels, client), n);
                }
            }
        }
    }
    out.family(
        "request_duration_seconds",
        "histogram",
        "Time from request to the end of the answer (streams included).",
    );
    out.histogram("request_duration_seconds", &[], &stats.totals.latency);
    out.family(
        "retries_total",
        "counter",
        "Upstream attempts after a request's first.",
    );
    out.sample("retries_total", &[], stats.totals.retries);
    out.family(
        "auth_failures_total",
        "counter",
        "Requests answered 401: a wrong or missing client or admin key.",
    );
    out.sample("auth_failures_total", &[], gauges.key_failures.0);
    out.family(
        "auth_refused_total",
        "counter",
        "Requests answered 429 because their address presented too many wrong keys.",
    );
    out.sample("auth_refused_total", &[], gauges.key_failures.1);
    out.family(
        "panics_total",
        "counter",
        "Requests whose handling panicked (each answered 500, nothing else affected).",
    );
    out.sample("panics_total", &[], stats.totals.panics);

    out.family(
        "tokens_total",
        "counter",
        "Tokens served (the upstream's reported usage), by instance and kind; a named client's carry its name as `client`.",
    );
    for (name, c) in &stats.instances {
        // What named clients used is in their own samples, not counted twice here.
        let named = stats.clients.values().filter_map(|m| m.tokens.get(name));
        let (prompt, completion) = named.fold((0u64, 0u64), |(p, q), (a, b)| (p + a, q + b));
        out.sample(
            "tokens_total",
            &[("instance", name), ("kind", "prompt")],
            c.prompt_tokens.saturating_sub(prompt),
        );
        out.sample(
            "tokens_total",
            &[("instance", name), ("kind", "completion")],
            c.completion_tokens.saturating_sub(completion),
        );
    }
    for (client, m) in &stats.clients {
        for (name, (prompt, completion)) in &m.tokens {
            for (kind, n) in [("prompt", prompt), ("completion", completion)] {
                let labels = [
                    ("instance", name.as_str()),
                    ("kind", kind),
                    ("client", client),
                ];
                out.sample("tokens_total", &labels, n);
            }
        }
    }
    out.family(
        "upstream_attempts_total",
        "counter",
        "Calls to each instance.",
    );
    for (name, c) in &stats.instances {
        out.sample("upstream_attempts_total", &[("instance", name)], c.attempts);
    }
    out.family(
        "upstream_errors_total",
        "counter",
        "Failed calls to each instance, by status code, timeout or connect.",
    );
    for (name, c) in &stats.instances {
        for (kind, n) in &c.errors_by_kind {
            out.sample(
                "upstream_errors_total",
                &[("instance", name), ("kind", &kind.to_string())],
                n,
            );
        }
    }
    out.family(
        "cooldowns_total",
        "counter",
        "429 answers from each instance, each starting or extending a cooldown.",
    );
    for (name, c) in &stats.instances {
        out.sample("cooldowns_total", &[("instance", name)], c.rate_limited);
    }
    out.family(
        "instance_request_duration_seconds",
        "histogram",
        "Request time, by the instance that answered.",
    );
    for (name, c) in &stats.instances {
        out.histogram(
            "instance_request_duration_seconds",
            &[("instance", name)],
            &c.latency,
        );
    }

    out.family(
        "instance_tpm_used",
        "gauge",
        "Tokens in the instance's 60 s window (reservations and upstream corrections).",
    );
    for i in instances {
        out.sample("instance_tpm_used", &[("instance", i.name)], i.tpm_used);
    }
    out.family(
        "instance_tpm_limit",
        "gauge",
        "The instance's max_tpm (absent: no limit).",
    );
    for i in instances {
        if let Some(max) = i.tpm_limit {
            out.sample("instance_tpm_limit", &[("instance", i.name)], max);
        }
    }
    out.family(
        "instance_rpm_used",
        "gauge",
        "Requests in the instance's 60 s window.",
    );
    for i in instances {
        out.sample("instance_rpm_used", &[("instance", i.name)], i.rpm_used);
    }
    out.family(
        "instance_state",
        "gauge",
        "1 for the instance's current state, 0 for the others.",
    );
    for i in instances {
        for &state in states {
            out.sample(
                "instance_state",
                &[("instance", i.name), ("state", state)],
                u8::from(i.state == state),
            );
        }
    }
    out.family(
        "client_connections",
        "gauge",
        "Client connections open (each has a thread).",
    );
    out.sample("client_connections", &[], gauges.connections.0);
    out.family(
        "client_connections_limit",
        "gauge",
        "server.max_connections: client connections allowed at once.",
    );
    out.sample("client_connections_limit", &[], gauges.connections.1);
    out.family(
        "upstream_permits_in_use",
        "gauge",
        "Upstream calls under way (server.workers permits taken).",
    );
    out.sample("upstream_permits_in_use", &[], gauges.permits.0);
    out.family(
        "upstream_permits_limit",
        "gauge",
        "server.workers: upstream calls allowed at once.",
    );
    out.sample("upstream_permits_limit", &[], gauges.permits.1);
    out.family(
        "request_body_bytes_held",
        "gauge",
        "Bytes reserved by request bodies being read or forwarded.",
    );
    out.sample("request_body_bytes_held", &[], gauges.body_bytes.0);
    out.family(
        "request_body_bytes_limit",
        "gauge",
        "server.max_body_memory: bytes request bodies may hold at once.",
    );
    out.sample("request_body_bytes_limit", &[], gauges.body_bytes.1);
    out.family(
        "realtime_sessions_open",
        "gauge",
        "Realtime API sessions open, or in their handshake.",
    );
    out.sample("realtime_sessions_open", &[], gauges.realtime_sessions.0);
    out.family(
        "realtime_sessions_limit",
        "gauge",
        "server.max_realtime_sessions: Realtime API sessions allowed at once.",
    );
    out.sample("realtime_sessions_limit", &[], gauges.realtime_sessions.1);
    out.family(
        "realtime_sessions_opened_total",
        "counter",
        "Realtime API sessions relayed (upstream and client handshakes done).",
    );
    out.sample("realtime_sessions_opened_total", &[], stats.sessions.opened);
    out.family(
        "realtime_sessions_closed_total",
        "counter",
        "Realtime API sessions ended, by how they ended.",
    );
    for (reason, n) in &stats.sessions.closed {
        out.sample("realtime_sessions_closed_total", &[("reason", reason)], n);
    }
    out.family(
        "uptime_seconds",
        "gauge",
        "Seconds since the proxy started.",
    );
    out.sample("uptime_seconds", &[], gauges.uptime_secs);
    out.family(
        "shared_state",
        "gauge",
        "1 for the state of the fleet's shared state: local (no redis), shared, or degraded (Redis not answering).",
    );
    for state in SHARED_STATES {
        out.sample(
            "shared_state",
            &[("state", state)],
            u8::from(state == gauges.shared_state),
        );
    }
    out.family("build_info", "gauge", "The running version.");
    out.sample("build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1);

    out.0
}
