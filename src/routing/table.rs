//! Runtime state of each instance (DESIGN §6–§7) and the admissions made on it: its
//! cooldown after a 429, its TPM/RPM windows, and the attempts' outcomes applied to
//! it. Its circuit and the models it is taken out for are in `circuit`, the requests
//! waiting for window room in `line`, what operators read of it in `views`. The whole
//! table sits behind one mutex; every method is short and free of I/O, and takes the
//! time as an argument.

mod circuit;
mod line;
mod views;

use super::clients::Line;
use super::rotation::{self, Rotations};
use super::strategy;
use super::window::Window;
use crate::config::{Config, Instance, Strategy};
use crate::outcome::Outcome;
use std::collections::HashMap;
use std::thread::Thread;
use std::time::{Duration, Instant};

use circuit::{describe, fail, take_out, Circuit, Fault, Recent, RATE_BUCKET_SECS};
pub use views::{Health, View};

/// How long a 429 keeps an instance out when the upstream does not say.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Runtime {
    /// Which runtime this is: a request admitted before a reload removed and re-added
    /// its instance must not touch the new one.
    epoch: u64,
    cooldown_until: Option<Instant>,
    circuit: Circuit,
    /// Another proxy opened its circuit (shared state): down until then.
    shared_down_until: Option<Instant>,
    /// The shared windows had no room for this many tokens until then (requests as
    /// large wait; smaller ones may fit, and Redis says).
    shared_full: Option<(Instant, u64)>,
    /// Failures since the last success.
    consecutive: u32,
    /// `consecutive` before the last success reset it: a stream counts as a success
    /// at its first byte, and if it then breaks the run goes on from here.
    run_before_success: u32,
    recent: Recent,
    last_failure: Option<Instant>,
    /// When it last answered (any answer, a 429 too): alive then.
    last_answer: Option<Instant>,
    faults: Vec<Fault>,
    tokens: Window,
    requests: Window,
    last_used: Option<Instant>,
    last_error: Option<String>,
}

impl Runtime {
    fn new(epoch: u64) -> Runtime {
        Runtime {
            epoch,
            cooldown_until: None,
            circuit: Circuit::Closed,
            shared_down_until: None,
            shared_full: None,
            consecutive: 0,
            run_before_success: 0,
            recent: Recent::default(),
            last_failure: None,
            last_answer: None,
            faults: Vec::new(),
            tokens: Window::default(),
            requests: Window::default(),
            last_used: None,
            last_error: None,
        }
    }

    fn release(&mut self, admission: &Admission) {
        self.tokens.release(admission.at, admission.tokens);
        self.requests.release(admission.at, 1);
    }

    fn fault(&mut self, model: &str) -> Option<&Fault> {
        self.faults.iter().find(|f| f.model == model)
    }
}

/// A request's claim on an instance: its place in the windows, to give back if the
/// upstream refuses it, and whether it is the trial of an open circuit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Admission {
    pub index: usize,
    at: Instant,
    tokens: u64,
    epoch: u64,
    trial: bool,
}

/// Why the shared state refused an admission, and until when.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Held {
    /// Another proxy's 429, or no room for one more request: the instance is out.
    Cooling(Instant),
    /// Another proxy opened its circuit.
    Down(Instant),
    /// No room for this request's tokens: requests as large are held, smaller ones
    /// may still fit.
    NoRoom(Instant),
}

/// Why no instance could take a request, and the soonest one might.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Blocked {
    /// Every candidate is cooling down or has a full window.
    RateLimited { until: Instant },
    /// Every candidate's circuit is open or it is out for this model (and none is
    /// only rate-limited).
    Down { until: Instant },
}

/// What an attempt's outcome did to its instance, for the log and the alerts.
#[derive(Debug, Default, PartialEq)]
pub struct Finished {
    /// Its circuit opened, for this long.
    pub opened: Option<Duration>,
    /// The upstream asked for a cooldown longer than `routing.max_cooldown`: this one.
    pub capped: Option<Duration>,
    /// A 429 cooled the instance down for this long.
    pub cooled: Option<Duration>,
}

pub struct Table {
    /// By instance name, so state carries over a reload that keeps the name.
    runtimes: HashMap<String, Runtime>,
    epochs: u64,
    /// Where the failure-rate buckets count from.
    origin: Instant,
    /// Where each line's rotation stands (the last pick of a model and its candidates).
    rotations: Rotations,
    rng: u64,
    /// Per line (a hash of a model and its candidate instances), the threads of the
    /// requests waiting for room, served by client in turn.
    waiting: HashMap<u64, Line<Thread>>,
    tickets: u64,
    /// Admissions tried (to show that waiting for room is not polling).
    #[cfg(test)]
    pub checks: usize,
}

impl Table {
    /// A table with a fresh state for each instance of `config`.
    pub fn new(config: &Config) -> Table {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let mut table = Table {
            runtimes: HashMap::new(),
            epochs: 0,
            origin: Instant::now(),
            rotations: Rotations::default(),
            rng: seed | 1,
            waiting: HashMap::new(),
            tickets: 0,
            #[cfg(test)]
            checks: 0,
        };
        table.update(config);
        table
    }

    /// xorshift64*: weighted choice needs randomness, not cryptographic quality.
    fn random(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Follows a new configuration: keeps the state of instances it still names,
    /// forgets the others, and starts afresh for new ones.
    pub fn update(&mut self, config: &Config) {
        self.runtimes
            .retain(|name, _| config.instances.iter().any(|i| &i.name == name));
        for inst in &config.instances {
            if !self.runtimes.contains_key(&inst.name) {
                self.epochs += 1;
                self.runtimes
                    .insert(inst.name.clone(), Runtime::new(self.epochs));
            }
        }
    }

    /// The runtime an admission was made on, unless a reload has removed it since.
    fn admitted(&mut self, config: &Config, admission: &Admission) -> Option<&mut Runtime> {
        self.runtimes
            .get_mut(&config.instances[admission.index].name)
            .filter(|rt| rt.epoch == admission.epoch)
    }

    fn slot(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs() / RATE_BUCKET_SECS
    }

    /// Whether `inst` could take `need` tokens of `model` now, or why not and until when.
    fn check(
        &mut self,
        inst: &Instance,
        model: &str,
        need: u64,
        now: Instant,
    ) -> Result<(), Blocked> {
        // An instance a reload has removed takes no new attempts.
        let Some(rt) = self.runtimes.get_mut(&inst.name) else {
            return Err(Blocked::Down { until: now });
        };
        match rt.circuit {
            Circuit::Open { until, .. } if until > now => return Err(Blocked::Down { until }),
            // A trial is out; the instance is down until it reports back.
            Circuit::Trial { expires, .. } if expires > now => {
                return Err(Blocked::Down { until: expires })
            }
            _ => {}
        }
        if let Some(fault) = rt.fault(model).filter(|f| f.until > now) {
            return Err(Blocked::Down { until: fault.until });
        }
        if let Some(until) = rt.shared_down_until.filter(|u| *u > now) {
            return Err(Blocked::Down { until });
        }
        let mut until = now;
        if let Some(c) = rt.cooldown_until.filter(|c| *c > now) {
            until = until.max(c);
        }
        if let Some((full, least)) = rt.shared_full {
            if full > now && need >= least {
                until = until.max(full);
            }
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
        (model, need): (&str, u64),
        now: Instant,
    ) -> Result<Admission, Blocked> {
        #[cfg(test)]
        {
            self.checks += 1;
        }
        let mut eligible = Vec::with_capacity(candidates.len());
        let mut blocked: Option<Blocked> = None;
        for &i in candidates.iter().filter(|i| !tried.contains(i)) {
            match self.check(&config.instances[i], model, need, now) {
                Ok(()) => eligible.push(i),
                Err(b) => blocked = Some(soonest(blocked, b)),
            }
        }
        if eligible.is_empty() {
            // No untried candidate at all: report as down, right away.
            return Err(blocked.unwrap_or(Blocked::Down { until: now }));
        }
        // Turns are taken within the line: with one candidate there is no turn to keep.
        let line = (candidates.len() > 1).then(|| rotation::line(model, candidates));
        let last = line.and_then(|l| self.rotations.last(l));
        let index = match config.routing.strategy {
            Strategy::Failover => strategy::failover(&config.instances, &eligible, last),
            Strategy::RoundRobin => strategy::rotate(&eligible, last),
            Strategy::Weighted => {
                let r = self.random();
                strategy::weighted(&config.instances, &eligible, r)
            }
            Strategy::LeastLoaded => {
                let load: Vec<f64> = eligible
                    .iter()
                    .map(|&i| self.utilisation(&config.instances[i], now))
                    .collect();
                strategy::least_loaded(&config.instances, &eligible, &load, last)
            }
        };
        if let Some(line) = line {
            self.rotations.picked(line, index);
        }
        let rt = self
            .runtimes
            .get_mut(&config.instances[index].name)
            .expect("checked above");
        rt.tokens.add(now, need);
        rt.requests.add(now, 1);
        rt.last_used = Some(now);
        let mut trial = false;
        if let Circuit::Open { backoff, .. } | Circuit::Trial { backoff, .. } = rt.circuit {
            // The trial's outcome is known once its first byte arrives.
            let routing = &config.routing;
            let expires = now + secs(routing.connect_timeout + routing.first_byte_timeout + 1.0);
            rt.circuit = Circuit::Trial { backoff, expires };
            trial = true;
        }
        Ok(Admission {
            index,
            at: now,
            tokens: need,
            epoch: rt.epoch,
            trial,
        })
    }

    /// TPM used / max_tpm; an instance without a limit counts as empty.
    fn utilisation(&mut self, inst: &Instance, now: Instant) -> f64 {
        match (inst.max_tpm, self.runtimes.get_mut(&inst.name)) {
            (Some(max), Some(rt)) => rt.tokens.used(now) as f64 / max as f64,
            _ => 0.0,
        }
    }

    /// Gives back the reservation of a request that was never sent.
    pub fn cancel(&mut self, config: &Config, admission: Admission) {
        if let Some(rt) = self.admitted(config, &admission) {
            rt.release(&admission);
            if admission.trial {
                // It tested nothing: the next request is the trial.
                if let Circuit::Trial { backoff, .. } = rt.circuit {
                    rt.circuit = Circuit::Open {
                        until: admission.at,
                        backoff,
                    };
                }
            }
            self.wake_waiters();
        }
    }

    /// The shared state refused `admission` (`Held` says why and until when): its
    /// reservation goes back, and the instance stays out here too until then, as if
    /// this proxy had seen the 429 or opened the circuit itself (only ever extended),
    /// or, for want of room for its tokens, for requests at least as large.
    pub fn hold(&mut self, config: &Config, admission: Admission, held: Held) {
        if let Some(rt) = self.admitted(config, &admission) {
            match held {
                Held::Cooling(until) => extend(&mut rt.cooldown_until, until),
                Held::Down(until) => extend(&mut rt.shared_down_until, until),
                Held::NoRoom(until) => rt.shared_full = Some((until, admission.tokens)),
            }
        }
        // After the mark, so that the waiters it wakes see it.
        self.cancel(config, admission);
    }

    /// Applies an attempt's outcome (for `model`) to its instance.
    pub fn finish(
        &mut self,
        config: &Config,
        admission: Admission,
        model: &str,
        outcome: Outcome,
        now: Instant,
    ) -> Finished {
        let slot = self.slot(now);
        let inst = &config.instances[admission.index];
        let routing = &config.routing;
        let Some(rt) = self.admitted(config, &admission) else {
            return Finished::default();
        };
        let mut finished = Finished::default();
        if outcome.never_counted() {
            rt.release(&admission);
        }
        // An outcome speaks for the circuit only if the circuit was closed when its
        // request was admitted, or if it is the trial's: a late answer from before the
        // circuit opened says nothing about now.
        let speaks = admission.trial || rt.circuit == Circuit::Closed;
        if outcome.status().is_some() {
            rt.last_answer = Some(now);
        }
        match outcome {
            Outcome::Answered {
                remaining_tokens,
                remaining_requests,
                ..
            } => {
                rt.run_before_success = rt.consecutive;
                rt.consecutive = 0;
                if admission.trial {
                    // The failures that opened the circuit must not reopen it at the
                    // next one: the rate starts afresh with the trial's success.
                    rt.recent = Recent::default();
                }
                rt.recent.count(slot, false);
                rt.faults.retain(|f| f.model != model);
                if speaks {
                    rt.circuit = Circuit::Closed;
                }
                if let (Some(max), Some(left)) = (inst.max_tpm, remaining_tokens) {
                    rt.tokens.correct(now, max, left);
                }
                if let (Some(max), Some(left)) = (inst.max_rpm, remaining_requests) {
                    rt.requests.correct(now, max, left);
                }
            }
            Outcome::RateLimited { retry_after } => {
                // It answered, so it is alive: a trial that meets a 429 closes the circuit.
                if admission.trial {
                    rt.circuit = Circuit::Closed;
                }
                let asked = retry_after.unwrap_or(DEFAULT_COOLDOWN);
                let cap = secs(routing.max_cooldown);
                if asked > cap {
                    finished.capped = Some(asked);
                }
                let until = now + asked.min(cap);
                finished.cooled = Some(asked.min(cap));
                // Only ever extend: a late 429 with a short Retry-After must not cut a
                // longer cooldown short.
                extend(&mut rt.cooldown_until, until);
            }
            Outcome::DeploymentFault { status } => {
                if admission.trial {
                    rt.circuit = Circuit::Closed;
                }
                rt.last_error = Some(format!("HTTP {status} for model {model}"));
                take_out(rt, model, routing, now);
            }
            // It answered other requests while this one waited: it is alive, and this
            // request is merely long (or its answer slow to start).
            Outcome::TimedOut if rt.last_answer.is_some_and(|t| t > admission.at) => {
                rt.last_error = Some(describe(&outcome));
            }
            Outcome::Failed { .. }
            | Outcome::TimedOut
            | Outcome::Unreachable { .. }
            | Outcome::Broken => {
                rt.last_error = Some(describe(&outcome));
                finished.opened = fail(rt, slot, routing, speaks, now);
            }
        }
        if outcome.never_counted() {
            self.wake_waiters();
        }
        finished
    }

    /// A failure after the answer began (a stream cut or stalled): it counts against
    /// the instance like a failed attempt. Returns how long its circuit is now out, if
    /// this opened it.
    pub fn broke(&mut self, config: &Config, index: usize, now: Instant) -> Option<Duration> {
        let slot = self.slot(now);
        let rt = self.runtimes.get_mut(&config.instances[index].name)?;
        rt.last_error = Some(describe(&Outcome::Broken));
        let speaks = rt.circuit == Circuit::Closed;
        // Its first byte counted as a success; the stream is a failure instead.
        if rt.consecutive == 0 {
            rt.consecutive = rt.run_before_success;
        }
        rt.recent.forget_success(slot);
        fail(rt, slot, &config.routing, speaks, now)
    }

    /// Adds `tokens` an instance reported using outside any admission (a Realtime API
    /// session's responses) to its TPM window. By name: a session outlives a reload
    /// that keeps its instance.
    pub fn charge(&mut self, instance: &str, tokens: u64, now: Instant) {
        if let Some(rt) = self.runtimes.get_mut(instance) {
            rt.tokens.add(now, tokens);
        }
    }
}

/// Sets `slot` to `until` unless it already runs later: a time out is only ever
/// extended.
fn extend(slot: &mut Option<Instant>, until: Instant) {
    *slot = Some(slot.map_or(until, |u| u.max(until)));
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
mod tests;
