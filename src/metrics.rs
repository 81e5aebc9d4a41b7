//! `GET /metrics`: Prometheus text exposition format 0.0.4, built from the statistics
//! and a snapshot of the instance table.

use crate::api::{Body, Reply};
use crate::instances::Health;
use crate::server::{Generation, State};
use crate::stats::{Histogram, LATENCY_BOUNDS_MS};
use std::fmt::Write;
use std::time::Instant;

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

pub fn metrics(state: &State, g: &Generation) -> Reply {
    let views = state.table.lock().view(&g.config, Instant::now());
    let stats = state.stats.lock();
    let mut out = Exposition(String::with_capacity(8 * 1024));

    out.family("requests_total", "counter", "API requests answered, by the last instance tried (none: the proxy tried none), model and status.");
    for (instance, models) in &stats.requests {
        for (model, statuses) in models {
            for (status, n) in statuses {
                out.sample(
                    "requests_total",
                    &[
                        ("instance", instance),
                        ("model", model),
                        ("status", &status.to_string()),
                    ],
                    n,
                );
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
        "tokens_total",
        "counter",
        "Tokens served (the upstream's reported usage), by instance and kind.",
    );
    for (name, c) in &stats.instances {
        out.sample(
            "tokens_total",
            &[("instance", name), ("kind", "prompt")],
            c.prompt_tokens,
        );
        out.sample(
            "tokens_total",
            &[("instance", name), ("kind", "completion")],
            c.completion_tokens,
        );
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
                &[("instance", name), ("kind", &kind.label())],
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

    let instances = g.config.instances.iter().zip(&views);
    out.family(
        "instance_tpm_used",
        "gauge",
        "Tokens in the instance's 60 s window (reservations and upstream corrections).",
    );
    for (inst, v) in instances.clone() {
        out.sample(
            "instance_tpm_used",
            &[("instance", &inst.name)],
            v.current_tpm,
        );
    }
    out.family(
        "instance_tpm_limit",
        "gauge",
        "The instance's max_tpm (absent: no limit).",
    );
    for (inst, _) in instances.clone() {
        if let Some(max) = inst.max_tpm {
            out.sample("instance_tpm_limit", &[("instance", &inst.name)], max);
        }
    }
    out.family(
        "instance_rpm_used",
        "gauge",
        "Requests in the instance's 60 s window.",
    );
    for (inst, v) in instances.clone() {
        out.sample(
            "instance_rpm_used",
            &[("instance", &inst.name)],
            v.current_rpm,
        );
    }
    out.family(
        "instance_state",
        "gauge",
        "1 for the instance's current state, 0 for the others.",
    );
    for (inst, v) in instances {
        for h in Health::ALL {
            out.sample(
                "instance_state",
                &[("instance", &inst.name), ("state", h.as_str())],
                u8::from(v.health == h),
            );
        }
    }
    out.family(
        "client_connections",
        "gauge",
        "Client connections open (each has a thread).",
    );
    let open = state
        .connections
        .get()
        .map_or(0, tiny_http::ConnectionCount::get);
    out.sample("client_connections", &[], open);
    out.family(
        "client_connections_limit",
        "gauge",
        "server.max_connections: client connections allowed at once.",
    );
    out.sample(
        "client_connections_limit",
        &[],
        g.config.server.max_connections,
    );
    out.family(
        "upstream_permits_in_use",
        "gauge",
        "Upstream calls under way (server.workers permits taken).",
    );
    out.sample("upstream_permits_in_use", &[], state.permits.in_use());
    out.family(
        "upstream_permits_limit",
        "gauge",
        "server.workers: upstream calls allowed at once.",
    );
    out.sample("upstream_permits_limit", &[], state.permits.total());
    out.family(
        "request_body_bytes_held",
        "gauge",
        "Bytes reserved by request bodies being read or forwarded.",
    );
    out.sample("request_body_bytes_held", &[], state.bodies.used());
    out.family(
        "request_body_bytes_limit",
        "gauge",
        "server.max_body_memory: bytes request bodies may hold at once.",
    );
    out.sample("request_body_bytes_limit", &[], state.bodies.limit());
    out.family(
        "uptime_seconds",
        "gauge",
        "Seconds since the proxy started.",
    );
    out.sample("uptime_seconds", &[], state.started.elapsed().as_secs());
    out.family("build_info", "gauge", "The running version.");
    out.sample("build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1);

    Reply {
        status: 200,
        headers: vec![(
            "Content-Type".into(),
            "text/plain; version=0.0.4; charset=utf-8".into(),
        )],
        body: Body::Full(out.0.into_bytes()),
        trace: Default::default(),
    }
}
