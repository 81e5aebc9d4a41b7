//! What each named client did (DESIGN §5.6): its requests, tokens and the 429s of its
//! own limits, counted in the statistics' buckets (`Tally`, in `stats::Counts`) so that
//! `/stats/clients` has the same windows as `/stats/windows`; and, since start, its
//! requests by instance, model and status and its tokens by instance
//! (`ClientMetrics`), for the `client` label of `/metrics`. Only configured names are
//! counted, so the label set is bounded by the configuration.

use super::stats::{counter, Record, RequestCounts};
use std::collections::BTreeMap;

/// One client's counts in a bucket, a window or since start.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tally {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Requests refused by the client's own `tpm`, `rpm` or `tokens_per_day`.
    pub limited: u64,
}

impl Tally {
    pub fn record(&mut self, r: &Record) {
        self.requests += 1;
        if let Some(u) = r.usage {
            self.prompt_tokens = self.prompt_tokens.saturating_add(u.prompt_tokens);
            self.completion_tokens = self.completion_tokens.saturating_add(u.completion_tokens);
        }
        self.limited += u64::from(r.own_limit);
    }

    pub fn add(&mut self, other: &Tally) {
        self.requests += other.requests;
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(other.completion_tokens);
        self.limited += other.limited;
    }
}

/// A client's requests by instance (`none`: no instance tried), model and status, and
/// its tokens (prompt, completion) by the instance that served them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClientMetrics {
    pub requests: RequestCounts,
    pub tokens: BTreeMap<String, (u64, u64)>,
}

impl ClientMetrics {
    /// Counts the tokens of `r`; its request is counted by the caller, in `requests`.
    pub fn record_tokens(&mut self, r: &Record) {
        if let (Some(instance), Some(u)) = (r.instance, r.usage) {
            let (prompt, completion) = counter(&mut self.tokens, instance);
            *prompt = prompt.saturating_add(u.prompt_tokens);
            *completion = completion.saturating_add(u.completion_tokens);
        }
    }
}
