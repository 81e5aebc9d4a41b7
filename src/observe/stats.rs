//! Usage statistics (DESIGN §9): counters in 10-second buckets covering the longest
//! window (60 minutes), so any window is a sum of buckets; latency as fixed histograms,
//! so percentiles need no samples; totals since start (or the last reset); and
//! per-instance and per-label counters for `/stats/instances` and `/metrics`. Every map
//! is keyed by configured names (unknown models count as `other`), so memory stays
//! bounded however long the proxy runs. Time is passed in as seconds since start.

use super::client_stats::{ClientMetrics, Tally};
use crate::config::Client;
use crate::outcome::{Attempt, Label, Outcome, Usage};
use std::collections::BTreeMap;
use std::time::Duration;

pub const BUCKET_SECS: u64 = 10;
/// Buckets kept: 60 minutes.
pub const BUCKETS: u64 = 360;
/// Upper bounds (ms) of the latency histogram; one more bin counts everything above.
pub const LATENCY_BOUNDS_MS: [u64; 17] = [
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000, 60_000, 120_000, 300_000,
];
pub const LATENCY_BINS: usize = LATENCY_BOUNDS_MS.len() + 1;

/// A fixed latency histogram.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Histogram {
    pub bins: [u64; LATENCY_BINS],
    pub sum_us: u64,
}

impl Histogram {
    pub fn record(&mut self, latency: Duration) {
        let us = latency.as_micros() as u64;
        let bin = LATENCY_BOUNDS_MS
            .iter()
            .position(|b| us <= b * 1000)
            .unwrap_or(LATENCY_BOUNDS_MS.len());
        self.bins[bin] += 1;
        self.sum_us += us;
    }

    pub fn mean_ms(&self) -> Option<f64> {
        let n = self.count();
        (n > 0).then(|| self.sum_us as f64 / 1000.0 / n as f64)
    }

    pub fn add(&mut self, other: &Histogram) {
        for (a, b) in self.bins.iter_mut().zip(other.bins) {
            *a += b;
        }
        self.sum_us += other.sum_us;
    }

    pub fn count(&self) -> u64 {
        self.bins.iter().sum()
    }

    /// The `p` quantile (0–1) in ms, interpolated linearly inside its bin; `None` if empty.
    /// Values above the last bound report the last bound.
    pub fn percentile(&self, p: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let target = (p * total as f64).ceil().max(1.0);
        let mut below = 0.0;
        for (i, &n) in self.bins.iter().enumerate() {
            let n = n as f64;
            if n > 0.0 && below + n >= target {
                let Some(&upper) = LATENCY_BOUNDS_MS.get(i) else {
                    return Some(LATENCY_BOUNDS_MS[LATENCY_BOUNDS_MS.len() - 1] as f64);
                };
                let lower = if i == 0 { 0 } else { LATENCY_BOUNDS_MS[i - 1] };
                return Some(lower as f64 + (upper - lower) as f64 * (target - below) / n);
            }
            below += n;
        }
        None
    }
}

/// One finished request, as the statistics see it.
#[derive(Debug, Default)]
pub struct Record<'a> {
    /// A model some instance serves; others are counted as `other`.
    pub model: Option<&'a str>,
    /// The instance that gave the final answer, if any did.
    pub instance: Option<&'a str>,
    pub status: u16,
    /// A stream that broke after its head went out with `status`: a failed request.
    pub broke: bool,
    pub latency: Duration,
    pub usage: Option<Usage>,
    pub attempts: &'a [Attempt],
    /// The named client that sent it.
    pub client: Option<&'a str>,
    /// Refused by its client's own limits.
    pub own_limit: bool,
}

/// The counters of one bucket, or of a sum of buckets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    pub requests: u64,
    pub successes: u64,
    pub status_500: u64,
    pub status_503: u64,
    pub status_other_error: u64,
    pub upstream_attempts: u64,
    pub upstream_errors: u64,
    /// Attempts after a request's first.
    pub retries: u64,
    /// Requests whose handler panicked (each also a 500).
    pub panics: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub latency: Histogram,
    pub by_model: BTreeMap<String, u64>,
    pub by_status: BTreeMap<u16, u64>,
    pub by_client: BTreeMap<String, Tally>,
}

impl Counts {
    fn record(&mut self, r: &Record) {
        self.requests += 1;
        match r.status {
            // 101: a Realtime API session that was relayed.
            101 | 200..=299 if !r.broke => self.successes += 1,
            500 => self.status_500 += 1,
            503 => self.status_503 += 1,
            _ => self.status_other_error += 1,
        }
        self.upstream_attempts += r.attempts.len() as u64;
        self.retries += r.attempts.len().saturating_sub(1) as u64;
        self.upstream_errors += r.attempts.iter().filter(|a| a.outcome.is_error()).count() as u64;
        if let Some(u) = r.usage {
            // An upstream's numbers: counters stop at u64::MAX, never wrap back.
            self.prompt_tokens = self.prompt_tokens.saturating_add(u.prompt_tokens);
            self.completion_tokens = self.completion_tokens.saturating_add(u.completion_tokens);
        }
        self.latency.record(r.latency);
        *counter(&mut self.by_model, r.model.unwrap_or("other")) += 1;
        *self.by_status.entry(r.status).or_default() += 1;
        if let Some(client) = r.client {
            counter(&mut self.by_client, client).record(r);
        }
    }

    fn add(&mut self, other: &Counts) {
        self.requests += other.requests;
        self.successes += other.successes;
        self.status_500 += other.status_500;
        self.status_503 += other.status_503;
        self.status_other_error += other.status_other_error;
        self.upstream_attempts += other.upstream_attempts;
        self.upstream_errors += other.upstream_errors;
        self.retries += other.retries;
        self.panics += other.panics;
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(other.completion_tokens);
        self.latency.add(&other.latency);
        for (k, v) in &other.by_model {
            *self.by_model.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.by_status {
            *self.by_status.entry(*k).or_default() += v;
        }
        for (k, v) in &other.by_client {
            counter(&mut self.by_client, k).add(v);
        }
    }

    pub fn failures(&self) -> u64 {
        self.requests - self.successes
    }

    pub fn tokens(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

/// The counter for `key`, which is allocated only the first time it is counted.
pub(super) fn counter<'m, V: Default>(map: &'m mut BTreeMap<String, V>, key: &str) -> &'m mut V {
    if !map.contains_key(key) {
        map.insert(key.to_string(), V::default());
    }
    map.get_mut(key).expect("inserted above")
}

/// What one instance has done since start (or the last reset).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InstanceCounts {
    pub attempts: u64,
    pub errors: u64,
    /// Errors by how the attempt ended.
    pub errors_by_kind: BTreeMap<Label, u64>,
    /// 429 answers, each of which started or extended a cooldown.
    pub rate_limited: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Latency of the requests this instance gave the final answer to.
    pub latency: Histogram,
}

/// Requests by instance, model and status, for `/metrics`; nested so that counting one
/// allocates nothing once its labels have been seen.
pub type RequestCounts = BTreeMap<String, BTreeMap<String, BTreeMap<u16, u64>>>;

#[derive(Debug, Default)]
pub struct Stats {
    /// Ring of buckets; each remembers its slot (seconds since start / BUCKET_SECS) so
    /// a stale one is never mistaken for the current one.
    buckets: Vec<(u64, Counts)>,
    pub totals: Counts,
    pub instances: BTreeMap<String, InstanceCounts>,
    /// Requests of unnamed keys (and an open proxy); a named client's are in `clients`.
    pub requests: RequestCounts,
    /// By named client, for `/metrics`' `client` label.
    pub clients: BTreeMap<String, ClientMetrics>,
    pub sessions: SessionCounts,
}

/// Realtime API sessions: started, and ended by how they ended.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionCounts {
    pub opened: u64,
    pub closed: BTreeMap<&'static str, u64>,
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            buckets: (0..BUCKETS)
                .map(|_| (u64::MAX, Counts::default()))
                .collect(),
            ..Stats::default()
        }
    }

    fn bucket(&mut self, now_secs: u64) -> &mut Counts {
        let slot = now_secs / BUCKET_SECS;
        let entry = &mut self.buckets[(slot % BUCKETS) as usize];
        if entry.0 != slot {
            *entry = (slot, Counts::default());
        }
        &mut entry.1
    }

    pub fn record(&mut self, now_secs: u64, r: &Record) {
        self.bucket(now_secs).record(r);
        self.totals.record(r);
        let model = r.model.unwrap_or("other");
        let instance = r.instance.unwrap_or("none");
        let requests = match r.client {
            Some(client) => {
                let metrics = counter(&mut self.clients, client);
                metrics.record_tokens(r);
                &mut metrics.requests
            }
            None => &mut self.requests,
        };
        let by_model = counter(requests, instance);
        *counter(by_model, model).entry(r.status).or_default() += 1;
        for a in r.attempts {
            let c = counter(&mut self.instances, &a.instance);
            c.attempts += 1;
            if a.outcome.is_error() {
                c.errors += 1;
                *c.errors_by_kind.entry(a.outcome.label()).or_default() += 1;
            }
            if let Outcome::RateLimited { .. } = a.outcome {
                c.rate_limited += 1;
            }
        }
        if let Some(name) = r.instance {
            let c = counter(&mut self.instances, name);
            c.latency.record(r.latency);
            if let Some(u) = r.usage {
                c.prompt_tokens = c.prompt_tokens.saturating_add(u.prompt_tokens);
                c.completion_tokens = c.completion_tokens.saturating_add(u.completion_tokens);
            }
        }
    }

    /// A request whose handler panicked (its 500 is recorded as any answer is).
    pub fn record_panic(&mut self, now_secs: u64) {
        self.bucket(now_secs).panics += 1;
        self.totals.panics += 1;
    }

    /// Tokens a Realtime API session's `response.done` reported, counted as they come
    /// (the session itself is recorded when it ends, without them).
    pub fn tokens(&mut self, now_secs: u64, instance: &str, usage: Usage) {
        let (prompt, completion) = (usage.prompt_tokens, usage.completion_tokens);
        let add = |c: &mut Counts| {
            c.prompt_tokens = c.prompt_tokens.saturating_add(prompt);
            c.completion_tokens = c.completion_tokens.saturating_add(completion);
        };
        add(self.bucket(now_secs));
        add(&mut self.totals);
        let c = counter(&mut self.instances, instance);
        c.prompt_tokens = c.prompt_tokens.saturating_add(prompt);
        c.completion_tokens = c.completion_tokens.saturating_add(completion);
    }

    /// Opens the current bucket and drops what fell out of the longest window; run by
    /// a background thread each second so the request path rarely has to.
    pub fn rotate(&mut self, now_secs: u64) {
        let current = now_secs / BUCKET_SECS;
        for entry in &mut self.buckets {
            if entry.0 != u64::MAX && entry.0 + BUCKETS <= current {
                *entry = (u64::MAX, Counts::default());
            }
        }
        self.bucket(now_secs);
    }

    /// The sum of the buckets of the last `minutes` minutes (the current one included).
    pub fn window(&self, now_secs: u64, minutes: u32) -> Counts {
        let current = now_secs / BUCKET_SECS;
        let span = (u64::from(minutes) * 60 / BUCKET_SECS).clamp(1, BUCKETS);
        let mut sum = Counts::default();
        for (slot, counts) in &self.buckets {
            if *slot <= current && *slot + span > current {
                sum.add(counts);
            }
        }
        sum
    }

    pub fn reset(&mut self) {
        *self = Stats::new();
    }

    /// Forgets the clients a reload removed, so that `/metrics` names configured
    /// clients only.
    pub fn forget_clients(&mut self, configured: &[Client]) {
        let named = |name: &String| configured.iter().any(|c| &c.name == name);
        self.clients.retain(|name, _| named(name));
        self.totals.by_client.retain(|name, _| named(name));
        for (_, counts) in &mut self.buckets {
            counts.by_client.retain(|name, _| named(name));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(model: &'static str, ms: u64, tokens: u64) -> (u16, &'static str, u64, u64) {
        (200, model, ms, tokens)
    }

    fn record(s: &mut Stats, now: u64, (status, model, ms, tokens): (u16, &'static str, u64, u64)) {
        let attempts = [Attempt {
            instance: "a".into(),
            outcome: Outcome::of_status(status, || None, || (None, None)),
        }];
        s.record(
            now,
            &Record {
                model: Some(model),
                instance: Some("a"),
                status,
                broke: false,
                latency: Duration::from_millis(ms),
                usage: (status == 200).then_some(Usage {
                    prompt_tokens: tokens,
                    completion_tokens: 1,
                    total_tokens: tokens + 1,
                }),
                attempts: &attempts,
                ..Record::default()
            },
        );
    }

    #[test]
    fn windows_sum_their_buckets_and_forget_older_ones() {
        let mut s = Stats::new();
        record(&mut s, 0, ok("m", 20, 10)); // minute 0
        record(&mut s, 4 * 60 + 59, ok("m", 20, 10)); // just inside 5 min at t = 5:00
        record(&mut s, 20 * 60, (503, "m", 5, 0)); // minute 20
        let at = 20 * 60 + 5;
        assert_eq!(s.window(at, 5).requests, 1, "only the 503");
        assert_eq!(s.window(at, 15).requests, 1);
        assert_eq!(s.window(at, 30).requests, 3);
        assert_eq!(s.window(at, 30).status_503, 1);
        assert_eq!(
            s.window(5 * 60, 5).requests,
            1,
            "5:00 sees back to 0:10, not the one at 0:00"
        );
        assert_eq!(s.totals.requests, 3);
        assert_eq!(s.totals.tokens(), 22);
    }

    #[test]
    fn rotation_drops_what_is_older_than_an_hour_and_memory_stays_fixed() {
        let mut s = Stats::new();
        for minute in 0..600 {
            record(&mut s, minute * 60, ok("m", 20, 1));
            s.rotate(minute * 60 + 1);
        }
        assert_eq!(s.buckets.len() as u64, BUCKETS);
        let now = 599 * 60 + 1;
        assert_eq!(s.window(now, 60).requests, 60);
        assert_eq!(s.totals.requests, 600);
        s.rotate(now + 3600);
        assert_eq!(s.window(now + 3600, 60).requests, 0);
        assert!(s
            .buckets
            .iter()
            .all(|(slot, c)| *slot == u64::MAX || c.requests == 0));
    }

    #[test]
    fn a_bucket_reused_after_an_hour_starts_empty() {
        let mut s = Stats::new();
        record(&mut s, 5, ok("m", 20, 1));
        record(&mut s, 5 + BUCKET_SECS * BUCKETS, ok("m", 20, 1)); // the same ring index
        assert_eq!(s.window(5 + BUCKET_SECS * BUCKETS, 60).requests, 1);
    }

    #[test]
    fn percentiles_come_from_the_histogram() {
        let mut h = Histogram::default();
        assert_eq!(h.percentile(0.5), None);
        for _ in 0..90 {
            h.record(Duration::from_micros(8_500)); // bin (5, 10]
        }
        for _ in 0..10 {
            h.record(Duration::from_millis(400)); // bin (250, 500]
        }
        assert_eq!(h.percentile(0.5), Some(5.0 + 5.0 * 50.0 / 90.0));
        assert_eq!(h.mean_ms(), Some((90.0 * 8.5 + 10.0 * 400.0) / 100.0));
        assert_eq!(h.percentile(0.95), Some(250.0 + 250.0 * 5.0 / 10.0));
        assert_eq!(h.percentile(0.99), Some(250.0 + 250.0 * 9.0 / 10.0));
        h.record(Duration::from_secs(1000));
        assert_eq!(
            h.percentile(1.0),
            Some(300_000.0),
            "overflow reports the last bound"
        );
    }

    #[test]
    fn per_instance_and_per_label_counts() {
        let mut s = Stats::new();
        let attempts = [
            Attempt {
                instance: "a".into(),
                outcome: Outcome::RateLimited { retry_after: None },
            },
            Attempt {
                instance: "b".into(),
                outcome: Outcome::TimedOut,
            },
            Attempt {
                instance: "c".into(),
                outcome: Outcome::of_status(200, || None, || (None, None)),
            },
        ];
        s.record(
            3,
            &Record {
                model: Some("m"),
                instance: Some("c"),
                status: 200,
                broke: false,
                latency: Duration::from_millis(30),
                usage: None,
                attempts: &attempts,
                ..Record::default()
            },
        );
        s.record(
            4,
            &Record {
                model: None,
                instance: None,
                status: 404,
                ..Record::default()
            },
        );
        assert_eq!(s.instances["a"].rate_limited, 1);
        assert_eq!(s.instances["a"].errors_by_kind[&Label::Status(429)], 1);
        assert_eq!(s.instances["b"].errors_by_kind[&Label::Timeout], 1);
        assert_eq!(s.instances["c"].errors, 0);
        assert_eq!(s.instances["c"].latency.count(), 1);
        assert_eq!(s.totals.upstream_attempts, 3);
        assert_eq!(s.totals.upstream_errors, 2);
        assert_eq!(s.totals.retries, 2);
        assert_eq!(s.totals.by_model["other"], 1);
        assert_eq!(s.requests["none"]["other"][&404], 1);
        assert_eq!(s.requests["c"]["m"][&200], 1);
        s.reset();
        assert_eq!(s.totals, Counts::default());
        assert!(s.instances.is_empty());
    }
}
