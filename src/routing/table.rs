//! Runtime state of each instance (DESIGN §6–§7): cooldown after a 429, the circuit
//! that opens on repeated failures, and the TPM/RPM windows. The whole table sits
//! behind one mutex; `admit` and `finish` are the only ways in, both short and free of
//! I/O, and both take the time as an argument.

use super::strategy;
use super::window::{Window, WINDOW};
use crate::config::{Config, Instance, Strategy};
use crate::outcome::Outcome;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long a 429 keeps an instance out when the upstream does not say.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Circuit {
    Closed,
    /// No requests until `until`; then one trial.
    Open {
        until: Instant,
        backoff: Duration,
    },
    /// One trial request is out; its outcome closes or reopens the circuit. A trial
    /// that never reports back (its worker died) stops counting at `expires`.
    Trial {
        backoff: Duration,
        expires: Instant,
    },
}

#[derive(Debug)]
pub struct Runtime {
    cooldown_until: Option<Instant>,
    circuit: Circuit,
    failures: u32,
    last_failure: Option<Instant>,
    tokens: Window,
    requests: Window,
    pub last_used: Option<Instant>,
    pub last_error: Option<String>,
}

impl Runtime {
    fn new() -> Runtime {
        Runtime {
            cooldown_until: None,
            circuit: Circuit::Closed,
            failures: 0,
            last_failure: None,
            tokens: Window::default(),
            requests: Window::default(),
            last_used: None,
            last_error: None,
        }
    }
}

/// A request's claim on an instance: its place in the windows, to give back if the
/// upstream refuses it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Admission {
    pub index: usize,
    at: Instant,
    tokens: u64,
}

/// Why no instance could take a request, and the soonest one might.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Blocked {
    /// Every candidate is cooling down or has a full window.
    RateLimited { until: Instant },
    /// Every candidate's circuit is open (and none is only rate-limited).
    Down { until: Instant },
}

pub struct Table {
    /// By instance name, so state carries over a reload that keeps the name.
    runtimes: HashMap<String, Runtime>,
    last_pick: Option<usize>,
    rng: u64,
}

impl Default for Table {
    fn default() -> Self {
        Table::new()
    }
}

impl Table {
    pub fn new() -> Table {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Table {
            runtimes: HashMap::new(),
            last_pick: None,
            rng: seed | 1,
        }
    }

    /// xorshift64*: weighted choice needs randomness, not cryptographic quality.
    fn random(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn runtime(&mut self, name: &str) -> &mut Runtime {
        if !self.runtimes.contains_key(name) {
            self.runtimes.insert(name.to_string(), Runtime::new());
        }
        self.runtimes.get_mut(name).expect("inserted above")
    }

    /// Keeps the state of instances `config` still names and forgets the others.
    pub fn retain(&mut self, config: &Config) {
        self.runtimes
            .retain(|name, _| config.instances.iter().any(|i| &i.name == name));
    }

    /// When instance `i` could take `need` tokens: `Ok(())` now, or why not and until when.
    fn check(&mut self, inst: &Instance, need: u64, now: Instant) -> Result<(), Blocked> {
        let rt = self.runtime(&inst.name);
        match rt.circuit {
            Circuit::Open { until, .. } if until > now => return Err(Blocked::Down { until }),
            // A trial is out; the instance is down until it reports back.
            Circuit::Trial { expires, .. } if expires > now => {
                return Err(Blocked::Down { until: expires })
            }
            _ => {}
        }
        let mut until = now;
        if let Some(c) = rt.cooldown_until.filter(|c| *c > now) {
            until = until.max(c);
        }
        if let Some(max) = inst.max_tpm {
            until = until.max(rt.tokens.room_at(now, need, max));
        }
        if let Some(max) = inst.max_rpm {
            until = until.max(rt.requests.room_at(now, 1, max));
        }
        if until > now {
            Err(Blocked::RateLimited { until })
        } else {
            Ok(())
        }
    }

    /// Picks an instance among `candidates` (not in `tried`) by the strategy, and
    /// reserves `need` tokens and one request in its windows.
    pub fn admit(
        &mut self,
        config: &Config,
        candidates: &[usize],
        tried: &[usize],
        need: u64,
        now: Instant,
    ) -> Result<Admission, Blocked> {
        let mut eligible = Vec::with_capacity(candidates.len());
        let mut blocked: Option<Blocked> = None;
        for &i in candidates.iter().filter(|i| !tried.contains(i)) {
            match self.check(&config.instances[i], need, now) {
                Ok(()) => eligible.push(i),
                Err(b) => blocked = Some(soonest(blocked, b)),
            }
        }
        if eligible.is_empty() {
            // No untried candidate at all: report as down, right away.
            return Err(blocked.unwrap_or(Blocked::Down { until: now }));
        }
        let index = match config.routing.strategy {
            Strategy::Failover => strategy::failover(&config.instances, &eligible, self.last_pick),
            Strategy::RoundRobin => strategy::rotate(&eligible, self.last_pick),
            Strategy::Weighted => {
                let r = self.random();
                strategy::weighted(&config.instances, &eligible, r)
            }
            Strategy::LeastLoaded => {
                let load: Vec<f64> = eligible
                    .iter()
                    .map(|&i| self.utilisation(&config.instances[i], now))
                    .collect();
                strategy::least_loaded(&config.instances, &eligible, &load, self.last_pick)
            }
        };
        self.last_pick = Some(index);
        let rt = self.runtime(&config.instances[index].name);
        rt.tokens.add(now, need);
        rt.requests.add(now, 1);
        rt.last_used = Some(now);
        if let Circuit::Open { backoff, .. } | Circuit::Trial { backoff, .. } = rt.circuit {
            // The trial's outcome is known once its response headers arrive.
            let routing = &config.routing;
            let expires = now + secs(routing.connect_timeout + routing.timeout + 1.0);
            rt.circuit = Circuit::Trial { backoff, expires };
        }
        Ok(Admission {
            index,
            at: now,
            tokens: need,
        })
    }

    /// TPM used / max_tpm; an instance without a limit counts as empty.
    pub fn utilisation(&mut self, inst: &Instance, now: Instant) -> f64 {
        match inst.max_tpm {
            Some(max) => self.runtime(&inst.name).tokens.used(now) as f64 / max as f64,
            None => 0.0,
        }
    }

    /// Gives back the reservation of a request that was never sent.
    pub fn cancel(&mut self, config: &Config, admission: Admission) {
        let rt = self.runtime(&config.instances[admission.index].name);
        rt.tokens.release(admission.at, admission.tokens);
        rt.requests.release(admission.at, 1);
    }

    /// Applies an attempt's outcome to its instance. Returns how long the instance is
    /// now out if this outcome opened its circuit (an event worth an alert).
    pub fn finish(
        &mut self,
        config: &Config,
        admission: Admission,
        outcome: Outcome,
        now: Instant,
    ) -> Option<Duration> {
        let inst = &config.instances[admission.index];
        let routing = &config.routing;
        if outcome.never_counted() {
            self.cancel(config, admission);
        }
        let rt = self.runtime(&inst.name);
        let was_open = matches!(rt.circuit, Circuit::Open { .. });
        match outcome {
            Outcome::Answered {
                remaining_tokens,
                remaining_requests,
                ..
            } => {
                rt.failures = 0;
                rt.circuit = Circuit::Closed;
                if let (Some(max), Some(left)) = (inst.max_tpm, remaining_tokens) {
                    rt.tokens.correct(now, max, left);
                }
                if let (Some(max), Some(left)) = (inst.max_rpm, remaining_requests) {
                    rt.requests.correct(now, max, left);
                }
            }
            Outcome::RateLimited { retry_after } => {
                // It answered, so it is alive: a trial that meets a 429 closes the circuit.
                rt.circuit = Circuit::Closed;
                rt.failures = 0;
                let until = now + retry_after.unwrap_or(DEFAULT_COOLDOWN);
                // Only ever extend: a late 429 with a short Retry-After must not cut a
                // longer cooldown short.
                rt.cooldown_until = Some(rt.cooldown_until.map_or(until, |c| c.max(until)));
            }
            Outcome::Failed { .. }
            | Outcome::DeploymentFault { .. }
            | Outcome::TimedOut
            | Outcome::Unreachable { .. }
            | Outcome::Broken => {
                let recent = rt
                    .last_failure
                    .is_some_and(|t| now.saturating_duration_since(t) < WINDOW);
                rt.failures = if recent { rt.failures + 1 } else { 1 };
                rt.last_failure = Some(now);
                rt.last_error = Some(describe(&outcome));
                rt.circuit = match rt.circuit {
                    Circuit::Trial { backoff, .. } => {
                        let backoff = (backoff * 2).min(secs(routing.circuit_max_open_seconds));
                        Circuit::Open {
                            until: now + backoff,
                            backoff,
                        }
                    }
                    Circuit::Closed if rt.failures >= routing.circuit_failures => {
                        let backoff = secs(routing.circuit_open_seconds);
                        Circuit::Open {
                            until: now + backoff,
                            backoff,
                        }
                    }
                    other => other,
                };
            }
        }
        match rt.circuit {
            Circuit::Open { backoff, .. } if !was_open => Some(backoff),
            _ => None,
        }
    }
}

/// A failure as `last_error` shows it.
fn describe(outcome: &Outcome) -> String {
    match outcome.status() {
        Some(status) => format!("HTTP {status}"),
        None => match outcome {
            Outcome::TimedOut => "no answer in time".into(),
            Outcome::Broken => "the answer broke off".into(),
            _ => "could not be reached".into(),
        },
    }
}

/// An instance's state as operators see it (`/stats/instances`, `/health`, `/metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// Cooling down after a 429, or its TPM/RPM window is full.
    RateLimited,
    /// Failed within the last minute, but still taking requests.
    Error,
    /// Taken out after repeated failures, until its trial request.
    CircuitOpen,
}

impl Health {
    pub const ALL: [Health; 4] = [
        Health::Healthy,
        Health::RateLimited,
        Health::Error,
        Health::CircuitOpen,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::RateLimited => "rate_limited",
            Health::Error => "error",
            Health::CircuitOpen => "circuit_open",
        }
    }
}

/// A snapshot of one instance's runtime state.
#[derive(Debug, Clone)]
pub struct View {
    pub health: Health,
    pub current_tpm: u64,
    pub current_rpm: u64,
    /// When a cooldown ends or a full window has room again.
    pub rate_limited_until: Option<Instant>,
    pub circuit_open_until: Option<Instant>,
    pub last_used: Option<Instant>,
    pub last_error: Option<String>,
}

impl Table {
    pub fn view(&mut self, config: &Config, now: Instant) -> Vec<View> {
        config
            .instances
            .iter()
            .map(|inst| {
                let rt = self
                    .runtimes
                    .entry(inst.name.clone())
                    .or_insert_with(Runtime::new);
                let circuit_open_until = match rt.circuit {
                    Circuit::Open { until, .. } if until > now => Some(until),
                    Circuit::Trial { expires, .. } if expires > now => Some(expires),
                    _ => None,
                };
                let current_tpm = rt.tokens.used(now);
                let current_rpm = rt.requests.used(now);
                let mut full_until = rt.cooldown_until.filter(|c| *c > now);
                for (window, max) in [
                    (&mut rt.tokens, inst.max_tpm),
                    (&mut rt.requests, inst.max_rpm),
                ] {
                    if let Some(max) = max.filter(|m| window.used(now) >= *m) {
                        let room = window.room_at(now, 1, max);
                        full_until = Some(full_until.map_or(room, |u| u.max(room)));
                    }
                }
                let failing = rt.failures > 0
                    && rt
                        .last_failure
                        .is_some_and(|t| now.saturating_duration_since(t) < WINDOW);
                let health = if circuit_open_until.is_some() {
                    Health::CircuitOpen
                } else if full_until.is_some() {
                    Health::RateLimited
                } else if failing {
                    Health::Error
                } else {
                    Health::Healthy
                };
                View {
                    health,
                    current_tpm,
                    current_rpm,
                    rate_limited_until: full_until,
                    circuit_open_until,
                    last_used: rt.last_used,
                    last_error: rt.last_error.clone(),
                }
            })
            .collect()
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// Of two reasons, the one a client should hear: rate-limited beats down (room will
/// come), and between equals the sooner moment.
fn soonest(a: Option<Blocked>, b: Blocked) -> Blocked {
    use Blocked::*;
    match (a, b) {
        (None, b) => b,
        (Some(RateLimited { until: x }), RateLimited { until: y }) => {
            RateLimited { until: x.min(y) }
        }
        (Some(Down { until: x }), Down { until: y }) => Down { until: x.min(y) },
        (Some(r @ RateLimited { .. }), Down { .. })
        | (Some(Down { .. }), r @ RateLimited { .. }) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(strategy: &str, instances: &str) -> Config {
        serde_yaml::from_str(&format!(
            "routing: {{strategy: {strategy}, circuit_failures: 2, circuit_open_seconds: 5, circuit_max_open_seconds: 12}}\ninstances:\n{instances}"
        ))
        .unwrap()
    }

    fn two(extra_a: &str, extra_b: &str) -> Config {
        config(
            "failover",
            &format!(
                "  - {{name: a, api_key: k, api_base: 'http://a', priority: 1, supported_models: [m] {extra_a}}}\n  - {{name: b, api_key: k, api_base: 'http://b', priority: 2, supported_models: [m] {extra_b}}}\n"
            ),
        )
    }

    fn at(t0: Instant, s: f64) -> Instant {
        t0 + Duration::from_secs_f64(s)
    }

    fn healthy() -> Outcome {
        Outcome::Answered {
            status: 200,
            remaining_tokens: None,
            remaining_requests: None,
        }
    }

    fn failed() -> Outcome {
        Outcome::Failed { status: 500 }
    }

    #[test]
    fn tpm_full_spills_to_the_next_and_then_blocks_until_room() {
        let c = two(", max_tpm: 1000", ", max_tpm: 500");
        let mut t = Table::new();
        let t0 = Instant::now();
        let all = [0, 1];
        assert_eq!(t.admit(&c, &all, &[], 600, t0).unwrap().index, 0);
        assert_eq!(t.admit(&c, &all, &[], 300, at(t0, 1.0)).unwrap().index, 0);
        assert_eq!(
            t.admit(&c, &all, &[], 300, at(t0, 2.0)).unwrap().index,
            1,
            "a is full"
        );
        assert_eq!(
            t.admit(&c, &all, &[], 300, at(t0, 3.0)),
            Err(Blocked::RateLimited {
                until: at(t0, 60.0)
            }),
            "a has room again when its first 600 leave at 60 s; b not before 62 s"
        );
        assert_eq!(t.admit(&c, &all, &[], 300, at(t0, 60.0)).unwrap().index, 0);
    }

    #[test]
    fn a_refused_request_gives_its_reservation_back() {
        let c = two(", max_tpm: 1000", ", max_tpm: 1000");
        let mut t = Table::new();
        let t0 = Instant::now();
        let adm = t.admit(&c, &[0], &[], 900, t0).unwrap();
        t.finish(&c, adm, Outcome::Unreachable { arrived: false }, t0);
        assert_eq!(
            t.admit(&c, &[0], &[], 900, t0).unwrap().index,
            0,
            "room again"
        );
        let adm = t.admit(&c, &[1], &[], 900, t0).unwrap();
        t.finish(&c, adm, failed(), t0);
        assert!(
            t.admit(&c, &[1], &[], 900, t0).is_err(),
            "a 5xx keeps its reservation"
        );
    }

    #[test]
    fn cooldown_follows_retry_after_and_only_extends() {
        let c = two("", "");
        let mut t = Table::new();
        let t0 = Instant::now();
        let adm = t.admit(&c, &[0], &[], 1, t0).unwrap();
        t.finish(
            &c,
            adm,
            Outcome::RateLimited {
                retry_after: Some(Duration::from_secs(30)),
            },
            t0,
        );
        assert_eq!(t.admit(&c, &[0, 1], &[], 1, at(t0, 1.0)).unwrap().index, 1);
        // A later 429 with a shorter wait does not shorten the cooldown.
        let mut t2 = Table::new();
        let adm = t2.admit(&c, &[0], &[], 1, t0).unwrap();
        t2.finish(
            &c,
            adm,
            Outcome::RateLimited {
                retry_after: Some(Duration::from_secs(30)),
            },
            t0,
        );
        t2.runtime("a").circuit = Circuit::Closed;
        let fake = Admission {
            index: 0,
            at: at(t0, 1.0),
            tokens: 1,
        };
        t2.finish(
            &c,
            fake,
            Outcome::RateLimited {
                retry_after: Some(Duration::from_secs(2)),
            },
            at(t0, 1.0),
        );
        assert_eq!(
            t2.admit(&c, &[0], &[], 1, at(t0, 5.0)),
            Err(Blocked::RateLimited {
                until: at(t0, 30.0)
            })
        );
        assert!(
            t2.admit(&c, &[0], &[], 1, at(t0, 30.0)).is_ok(),
            "back after 30 s"
        );
        let adm = Admission {
            index: 1,
            at: t0,
            tokens: 1,
        };
        t2.finish(&c, adm, Outcome::RateLimited { retry_after: None }, t0);
        assert!(t2.admit(&c, &[1], &[], 1, at(t0, 9.9)).is_err());
        assert!(
            t2.admit(&c, &[1], &[], 1, at(t0, 10.0)).is_ok(),
            "default cooldown is 10 s"
        );
    }

    #[test]
    fn circuit_opens_on_repeated_failures_and_a_trial_decides() {
        let c = two("", "");
        let mut t = Table::new();
        let t0 = Instant::now();
        let fail = |t: &mut Table, now| {
            let adm = t.admit(&c, &[0], &[], 1, now).unwrap();
            t.finish(&c, adm, failed(), now);
        };
        fail(&mut t, t0);
        assert!(
            t.admit(&c, &[0], &[], 1, t0).is_ok(),
            "one stray failure does not take it out"
        );
        let mut t = Table::new();
        fail(&mut t, t0);
        fail(&mut t, at(t0, 1.0));
        assert_eq!(
            t.admit(&c, &[0], &[], 1, at(t0, 2.0)),
            Err(Blocked::Down { until: at(t0, 6.0) })
        );
        // The trial fails: open twice as long.
        fail(&mut t, at(t0, 6.0));
        assert_eq!(
            t.admit(&c, &[0], &[], 1, at(t0, 7.0)),
            Err(Blocked::Down {
                until: at(t0, 16.0)
            })
        );
        // The next trial fails too: capped at circuit_max_open_seconds (12).
        fail(&mut t, at(t0, 16.0));
        assert_eq!(
            t.admit(&c, &[0], &[], 1, at(t0, 17.0)),
            Err(Blocked::Down {
                until: at(t0, 28.0)
            })
        );
        // During a trial no other request goes there; a success closes the circuit.
        let trial = t.admit(&c, &[0], &[], 1, at(t0, 28.0)).unwrap();
        assert!(matches!(
            t.admit(&c, &[0], &[], 1, at(t0, 28.1)),
            Err(Blocked::Down { .. })
        ));
        t.finish(&c, trial, healthy(), at(t0, 28.2));
        assert!(t.admit(&c, &[0], &[], 1, at(t0, 28.3)).is_ok());
        assert_eq!(t.runtime("a").circuit, Circuit::Closed);
    }

    #[test]
    fn a_trial_that_never_reports_back_expires() {
        let c = two("", "");
        let mut t = Table::new();
        let t0 = Instant::now();
        t.runtime("a").circuit = Circuit::Open {
            until: t0,
            backoff: Duration::from_secs(5),
        };
        t.admit(&c, &[0], &[], 1, t0).unwrap();
        // Default timeouts: 10 s connect + 60 s response + 1 s.
        assert_eq!(
            t.admit(&c, &[0], &[], 1, at(t0, 70.0)),
            Err(Blocked::Down {
                until: at(t0, 71.0)
            })
        );
        assert!(
            t.admit(&c, &[0], &[], 1, at(t0, 71.0)).is_ok(),
            "a new trial"
        );
    }

    #[test]
    fn failures_far_apart_do_not_add_up() {
        let c = two("", "");
        let mut t = Table::new();
        let t0 = Instant::now();
        for s in [0.0, 61.0, 122.0] {
            let adm = t.admit(&c, &[0], &[], 1, at(t0, s)).unwrap();
            t.finish(&c, adm, failed(), at(t0, s));
        }
        assert!(t.admit(&c, &[0], &[], 1, at(t0, 123.0)).is_ok());
    }

    #[test]
    fn rate_limited_is_reported_over_down_and_tried_instances_are_skipped() {
        let c = two(", max_tpm: 100", "");
        let mut t = Table::new();
        let t0 = Instant::now();
        t.admit(&c, &[0], &[], 100, t0).unwrap();
        t.runtime("b").circuit = Circuit::Open {
            until: at(t0, 5.0),
            backoff: Duration::from_secs(5),
        };
        assert_eq!(
            t.admit(&c, &[0, 1], &[], 10, at(t0, 1.0)),
            Err(Blocked::RateLimited {
                until: at(t0, 60.0)
            })
        );
        assert_eq!(
            t.admit(&c, &[0, 1], &[0], 10, at(t0, 1.0)),
            Err(Blocked::Down { until: at(t0, 5.0) })
        );
        assert_eq!(
            t.admit(&c, &[0, 1], &[0, 1], 10, at(t0, 1.0)),
            Err(Blocked::Down { until: at(t0, 1.0) })
        );
    }

    #[test]
    fn upstream_remaining_headers_fill_the_local_window() {
        let c = two(", max_tpm: 1000, max_rpm: 10", "");
        let mut t = Table::new();
        let t0 = Instant::now();
        let adm = t.admit(&c, &[0], &[], 10, t0).unwrap();
        t.finish(
            &c,
            adm,
            Outcome::Answered {
                status: 200,
                remaining_tokens: Some(5),
                remaining_requests: Some(3),
            },
            t0,
        );
        assert_eq!(
            t.admit(&c, &[0], &[], 10, t0),
            Err(Blocked::RateLimited {
                until: at(t0, 60.0)
            })
        );
        assert!(
            t.admit(&c, &[0], &[], 5, t0).is_ok(),
            "exactly the remaining 5 fit"
        );
    }

    #[test]
    fn state_follows_the_name_across_a_new_config() {
        let c = two(", max_tpm: 1000", "");
        let mut t = Table::new();
        let t0 = Instant::now();
        t.admit(&c, &[0], &[], 1000, t0).unwrap();
        // The reloaded config lists b first and a second, and drops nothing.
        let swapped = config(
            "failover",
            "  - {name: b, api_key: k, api_base: 'http://b', supported_models: [m]}\n  - {name: a, api_key: k, api_base: 'http://a', max_tpm: 1000, supported_models: [m]}\n",
        );
        t.retain(&swapped);
        assert_eq!(
            t.admit(&swapped, &[1], &[], 1, t0),
            Err(Blocked::RateLimited {
                until: at(t0, 60.0)
            }),
            "a's window came along"
        );
        let only_b = config(
            "failover",
            "  - {name: b, api_key: k, api_base: 'http://b', supported_models: [m]}\n",
        );
        t.retain(&only_b);
        assert!(
            t.admit(&swapped, &[1], &[], 1, t0).is_ok(),
            "a removed and re-added starts afresh"
        );
    }

    #[test]
    fn views_name_each_state() {
        let c = two(", max_tpm: 100", "");
        let mut t = Table::new();
        let t0 = Instant::now();
        let health =
            |t: &mut Table, now| t.view(&c, now).iter().map(|v| v.health).collect::<Vec<_>>();
        assert_eq!(health(&mut t, t0), [Health::Healthy, Health::Healthy]);
        let adm = t.admit(&c, &[0], &[], 100, t0).unwrap();
        t.finish(&c, adm, healthy(), t0);
        let adm = t.admit(&c, &[1], &[], 1, t0).unwrap();
        t.finish(&c, adm, failed(), t0);
        assert_eq!(health(&mut t, t0), [Health::RateLimited, Health::Error]);
        let v = &t.view(&c, t0)[0];
        assert_eq!(
            (v.current_tpm, v.current_rpm, v.rate_limited_until),
            (100, 1, Some(at(t0, 60.0)))
        );
        let adm = t.admit(&c, &[1], &[], 1, t0).unwrap();
        t.finish(&c, adm, failed(), t0);
        assert_eq!(
            health(&mut t, at(t0, 1.0)),
            [Health::RateLimited, Health::CircuitOpen]
        );
        assert_eq!(t.view(&c, t0)[1].last_error.as_deref(), Some("HTTP 500"));
        assert_eq!(
            health(&mut t, at(t0, 6.0)),
            [Health::RateLimited, Health::Error],
            "circuit time over, failures under a minute old"
        );
        assert_eq!(
            health(&mut t, at(t0, 61.0)),
            [Health::Healthy, Health::Healthy]
        );
    }

    #[test]
    fn rpm_limits_requests() {
        let c = two(", max_rpm: 2", "");
        let mut t = Table::new();
        let t0 = Instant::now();
        assert!(t.admit(&c, &[0], &[], 1, t0).is_ok());
        assert!(t.admit(&c, &[0], &[], 1, at(t0, 1.0)).is_ok());
        assert_eq!(
            t.admit(&c, &[0], &[], 1, at(t0, 2.0)),
            Err(Blocked::RateLimited {
                until: at(t0, 60.0)
            })
        );
    }
}
