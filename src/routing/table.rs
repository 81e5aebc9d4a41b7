//! Runtime state of each instance (DESIGN §6–§7): its cooldown after a 429, its
//! circuit (opened by a run or a rate of failures, closed only by its trial), the
//! models it is taken out for after a deployment fault, and its TPM/RPM windows; and
//! the requests waiting for window room (by client in turn, `clients::Line`). The
//! whole table sits behind one mutex; every method is short and free of I/O, and takes
//! the time as an argument.

use super::clients::Line;
use super::rotation::{self, Rotations};
use super::strategy;
use super::window::{Window, WINDOW};
use crate::config::{Config, Instance, Strategy};
use crate::outcome::Outcome;
use std::collections::HashMap;
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long a 429 keeps an instance out when the upstream does not say.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(10);
/// Models an instance remembers being taken out for; past this, the one back soonest
/// is forgotten (a client names the model on an instance that serves any).
const MAX_FAULTS: usize = 64;
/// The minute over which a failure rate is read, in buckets of this many seconds.
const RATE_BUCKET_SECS: u64 = 10;
const RATE_BUCKETS: usize = 6;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Circuit {
    Closed,
    /// No requests until `until`; then one trial.
    Open {
        until: Instant,
        backoff: Duration,
    },
    /// One trial request is out; only its outcome closes or reopens the circuit. A
    /// trial that never reports back stops counting at `expires`.
    Trial {
        backoff: Duration,
        expires: Instant,
    },
}

/// Attempts and failures over about the last minute, in 10-second buckets.
#[derive(Debug, Default)]
struct Recent {
    /// (bucket number since the table's origin, attempts, failures)
    buckets: [(u64, u32, u32); RATE_BUCKETS],
}

impl Recent {
    fn count(&mut self, slot: u64, failed: bool) {
        let bucket = &mut self.buckets[(slot % RATE_BUCKETS as u64) as usize];
        if bucket.0 != slot {
            *bucket = (slot, 0, 0);
        }
        bucket.1 += 1;
        bucket.2 += u32::from(failed);
    }

    /// Takes back a success counted in `slot` (a stream that broke after its first
    /// byte, about to be counted as a failure). One from an earlier bucket stays.
    fn forget_success(&mut self, slot: u64) {
        let bucket = &mut self.buckets[(slot % RATE_BUCKETS as u64) as usize];
        if bucket.0 == slot && bucket.1 > bucket.2 {
            bucket.1 -= 1;
        }
    }

    /// (attempts, failures) in the buckets of the last minute.
    fn sum(&self, slot: u64) -> (u32, u32) {
        self.buckets
            .iter()
            .filter(|b| b.0 + RATE_BUCKETS as u64 > slot && b.0 <= slot)
            .fold((0, 0), |(a, f), b| (a + b.1, f + b.2))
    }
}

/// A model an instance is taken out for: it answered 401, 403 or 404 for it.
#[derive(Debug)]
struct Fault {
    model: String,
    until: Instant,
    backoff: Duration,
}

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

    /// Adds the calling thread to the requests waiting in `line`, after its client's.
    pub fn wait_in_line(&mut self, line: u64, client: Option<&str>) -> u64 {
        self.tickets += 1;
        self.waiting
            .entry(line)
            .or_default()
            .push(client, self.tickets, std::thread::current());
        self.tickets
    }

    /// How many wait for room, in all lines.
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.waiting.values().map(Line::len).sum()
    }

    /// Whether anyone waits in `line`.
    pub fn has_waiters(&self, line: u64) -> bool {
        self.waiting.contains_key(&line)
    }

    /// Whether `ticket` is first in `line`.
    pub fn is_first(&self, line: u64, ticket: u64) -> bool {
        self.waiting
            .get(&line)
            .and_then(Line::first)
            .is_some_and(|(first, _)| first == ticket)
    }

    /// Takes `ticket` out of `line` (`admitted`, or giving up) and wakes whoever is
    /// first now. A request usually leaves from the front (all wait up to the same
    /// `routing.queue_timeout`), so this costs about O(clients waiting).
    pub fn leave_line(&mut self, line: u64, ticket: u64, admitted: bool) {
        let Some(waiters) = self.waiting.get_mut(&line) else {
            return;
        };
        waiters.remove(ticket, admitted);
        match waiters.first() {
            Some((_, thread)) => thread.unpark(),
            None => {
                self.waiting.remove(&line);
            }
        }
    }

    /// Room may have come back (a reservation was given back): the first in each line
    /// looks again.
    fn wake_waiters(&self) {
        for line in self.waiting.values() {
            if let Some((_, thread)) = line.first() {
                thread.unpark();
            }
        }
    }
}

/// Counts a failure against `rt` and, if it `speaks` for the circuit, opens or reopens
/// it: a failed trial doubles the time out; a closed circuit opens on
/// `circuit_failures` failures in a row, or as many in the last minute that are also
/// `circuit_failure_rate` of its attempts.
fn fail(
    rt: &mut Runtime,
    slot: u64,
    routing: &crate::config::Routing,
    speaks: bool,
    now: Instant,
) -> Option<Duration> {
    // Failures far apart (each a minute or more after the last) do not make a run.
    let recent = rt
        .last_failure
        .is_some_and(|t| now.saturating_duration_since(t) < WINDOW);
    rt.consecutive = if recent { rt.consecutive + 1 } else { 1 };
    rt.recent.count(slot, true);
    rt.last_failure = Some(now);
    if !speaks {
        return None;
    }
    let backoff = match rt.circuit {
        Circuit::Trial { backoff, .. } | Circuit::Open { backoff, .. } => {
            (backoff * 2).min(secs(routing.circuit_max_open_seconds))
        }
        Circuit::Closed => {
            let (attempts, failures) = rt.recent.sum(slot);
            let rate_high = failures >= routing.circuit_failures
                && f64::from(failures) >= routing.circuit_failure_rate * f64::from(attempts);
            if rt.consecutive < routing.circuit_failures && !rate_high {
                return None;
            }
            secs(routing.circuit_open_seconds)
        }
    };
    rt.circuit = Circuit::Open {
        until: now + backoff,
        backoff,
    };
    Some(backoff)
}

/// Takes `rt` out for `model` after a deployment fault: first for
/// `circuit_open_seconds`, twice as long on each fault after that.
fn take_out(rt: &mut Runtime, model: &str, routing: &crate::config::Routing, now: Instant) {
    let first = secs(routing.circuit_open_seconds);
    let max = secs(routing.circuit_max_open_seconds);
    match rt.faults.iter_mut().find(|f| f.model == model) {
        Some(fault) => {
            fault.backoff = (fault.backoff * 2).min(max);
            fault.until = now + fault.backoff;
        }
        None => {
            if rt.faults.len() >= MAX_FAULTS {
                if let Some(soonest) = (0..rt.faults.len()).min_by_key(|&i| rt.faults[i].until) {
                    rt.faults.swap_remove(soonest);
                }
            }
            rt.faults.push(Fault {
                model: model.to_string(),
                until: now + first,
                backoff: first,
            });
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
    /// Models it is taken out for after a deployment fault, and until when.
    pub models_out: Vec<(String, Instant)>,
    pub last_used: Option<Instant>,
    pub last_error: Option<String>,
}

impl Table {
    pub fn view(&mut self, config: &Config, now: Instant) -> Vec<View> {
        config
            .instances
            .iter()
            .map(|inst| {
                let Some(rt) = self.runtimes.get_mut(&inst.name) else {
                    // An old configuration's instance, removed since: nothing to show.
                    return View {
                        health: Health::Healthy,
                        current_tpm: 0,
                        current_rpm: 0,
                        rate_limited_until: None,
                        circuit_open_until: None,
                        models_out: Vec::new(),
                        last_used: None,
                        last_error: None,
                    };
                };
                let circuit_open_until = match rt.circuit {
                    Circuit::Open { until, .. } if until > now => Some(until),
                    Circuit::Trial { expires, .. } if expires > now => Some(expires),
                    _ => None,
                }
                .max(rt.shared_down_until.filter(|u| *u > now));
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
                let failing = rt
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
                    models_out: rt
                        .faults
                        .iter()
                        .filter(|f| f.until > now)
                        .map(|f| (f.model.clone(), f.until))
                        .collect(),
                    last_used: rt.last_used,
                    last_error: rt.last_error.clone(),
                }
            })
            .collect()
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
    fn each_line_takes_its_own_turns() {
        let inst = |name, model| {
            format!("  - {{name: {name}, api_key: k, api_base: 'http://{name}', supported_models: [{model}]}}\n")
        };
        let all = ["a", "b", "c", "d"].map(|n| inst(n, if n < "c" { "m1" } else { "m2" }));
        let t0 = Instant::now();
        for strategy in ["round_robin", "failover"] {
            let c = config(strategy, &all.concat());
            let mut t = Table::new(&c);
            let picks: Vec<usize> = (0..8)
                .map(|k| {
                    let (model, candidates) = if k % 2 == 0 {
                        ("m1", [0, 1])
                    } else {
                        ("m2", [2, 3])
                    };
                    t.admit(&c, &candidates, &[], (model, 1), t0).unwrap().index
                })
                .collect();
            assert_eq!(picks, [0, 2, 1, 3, 0, 2, 1, 3], "{strategy}");
        }
    }

    #[test]
    fn a_shared_refusal_gives_the_room_back_and_holds_the_instance_out_here_too() {
        let c = two(", max_tpm: 1000", "");
        let mut t = Table::new(&c);
        let t0 = Instant::now();
        let all = [0, 1];
        // Two requests admitted here at once; Redis refuses both, with different times.
        let first = t.admit(&c, &all, &[], ("m", 600), t0).unwrap();
        let second = t.admit(&c, &[0], &[], ("m", 300), t0).unwrap();
        assert_eq!((first.index, second.index), (0, 0));
        let full = Blocked::RateLimited {
            until: at(t0, 30.0),
        };
        t.hold(&c, first, Held::Cooling(at(t0, 30.0)));
        t.hold(&c, second, Held::Cooling(at(t0, 10.0)));
        assert_eq!(t.view(&c, t0)[0].current_tpm, 0, "reservations given back");
        assert_eq!(t.admit(&c, &all, &[], ("m", 600), t0).unwrap().index, 1);
        assert_eq!(
            t.admit(&c, &[0], &[], ("m", 1), at(t0, 20.0)),
            Err(full),
            "held out as by a cooldown, which only ever extends"
        );
        assert!(t.admit(&c, &[0], &[], ("m", 1), at(t0, 30.0)).is_ok());
        // Another proxy's open circuit: down here until then.
        let a = t.admit(&c, &[0], &[], ("m", 1), at(t0, 32.0)).unwrap();
        let down = Blocked::Down {
            until: at(t0, 40.0),
        };
        t.hold(&c, a, Held::Down(at(t0, 40.0)));
        assert_eq!(t.admit(&c, &[0], &[], ("m", 1), at(t0, 33.0)), Err(down));
        assert_eq!(t.view(&c, at(t0, 33.0))[0].health, Health::CircuitOpen);
        let a = t.admit(&c, &[0], &[], ("m", 1), at(t0, 40.0)).unwrap();
        // No room in the shared window for 600 tokens: requests that large are held
        // here, a smaller one may still go (Redis will say).
        let big = t.admit(&c, &[0], &[], ("m", 600), at(t0, 41.0)).unwrap();
        t.cancel(&c, a);
        t.hold(&c, big, Held::NoRoom(at(t0, 50.0)));
        assert_eq!(
            t.admit(&c, &[0], &[], ("m", 600), at(t0, 42.0)),
            Err(Blocked::RateLimited {
                until: at(t0, 50.0)
            })
        );
        assert!(t.admit(&c, &[0], &[], ("m", 100), at(t0, 42.0)).is_ok());
    }

    #[test]
    fn tpm_full_spills_to_the_next_and_then_blocks_until_room() {
        let c = two(", max_tpm: 1000", ", max_tpm: 500");
        let mut t = Table::new(&c);
        let t0 = Instant::now();
        let all = [0, 1];
        assert_eq!(t.admit(&c, &all, &[], ("m", 600), t0).unwrap().index, 0);
        assert_eq!(
            t.admit(&c, &all, &[], ("m", 300), at(t0, 1.0))
                .unwrap()
                .index,
            0
        );
        assert_eq!(
            t.admit(&c, &all, &[], ("m", 300), at(t0, 2.0))
                .unwrap()
                .index,
            1,
            "a is full"
        );
        assert_eq!(
            t.admit(&c, &all, &[], ("m", 300), at(t0, 3.0)),
            Err(Blocked::RateLimited {
                until: at(t0, 60.0)
            }),
            "a has room again when its first 600 leave at 60 s; b not before 62 s"
        );
        assert_eq!(
            t.admit(&c, &all, &[], ("m", 300), at(t0, 60.0))
                .unwrap()
                .index,
            0
        );
    }

    #[test]
    fn a_refused_request_gives_its_reservation_back() {
        let c = two(", max_tpm: 1000", ", max_tpm: 1000");
        let mut t = Table::new(&c);
        let t0 = Instant::now();
        let adm = t.admit(&c, &[0], &[], ("m", 900), t0).unwrap();
        t.finish(&c, adm, "m", Outcome::Unreachable { arrived: false }, t0);
        assert_eq!(
            t.admit(&c, &[0], &[], ("m", 900), t0).unwrap().index,
            0,
            "room again"
        );
        let adm = t.admit(&c, &[1], &[], ("m", 900), t0).unwrap();
        t.finish(&c, adm, "m", failed(), t0);
        assert!(
            t.admit(&c, &[1], &[], ("m", 900), t0).is_err(),
            "a 5xx keeps its reservation"
        );
    }

    #[test]
    fn cooldown_follows_retry_after_and_only_extends() {
        let c = two("", "");
        let mut t = Table::new(&c);
        let t0 = Instant::now();
        let adm = t.admit(&c, &[0], &[], ("m", 1), t0).unwrap();
        t.finish(
            &c,
            adm,
            "m",
            Outcome::RateLimited {
                retry_after: Some(Duration::from_secs(30)),
            },
            t0,
        );
        assert_eq!(
            t.admit(&c, &[0, 1], &[], ("m", 1), at(t0, 1.0))
                .unwrap()
                .index,
            1
        );
        // A later 429 with a shorter wait does not shorten the cooldown.
        let mut t2 = Table::new(&c);
        let adm = t2.admit(&c, &[0], &[], ("m", 1), t0).unwrap();
        t2.finish(
            &c,
            adm,
            "m",
            Outcome::RateLimited {
                retry_after: Some(Duration::from_secs(30)),
            },
            t0,
        );
        t2.runtimes.get_mut("a").unwrap().circuit = Circuit::Closed;
        let fake = Admission {
            index: 0,
            at: at(t0, 1.0),
            tokens: 1,
            epoch: t2.runtimes["a"].epoch,
            trial: false,
        };
        t2.finish(
            &c,
            fake,
            "m",
            Outcome::RateLimited {
                retry_after: Some(Duration::from_secs(2)),
            },
            at(t0, 1.0),
        );
        assert_eq!(
            t2.admit(&c, &[0], &[], ("m", 1), at(t0, 5.0)),
            Err(Blocked::RateLimited {
                until: at(t0, 30.0)
            })
        );
        assert!(
            t2.admit(&c, &[0], &[], ("m", 1), at(t0, 30.0)).is_ok(),
            "back after 30 s"
        );
        let adm = Admission {
            index: 1,
            at: t0,
            tokens: 1,
            epoch: t2.runtimes["b"].epoch,
            trial: false,
        };
        t2.finish(&c, adm, "m", Outcome::RateLimited { retry_after: None }, t0);
        assert!(t2.admit(&c, &[1], &[], ("m", 1), at(t0, 9.9)).is_err());
        assert!(
            t2.admit(&c, &[1], &[], ("m", 1), at(t0, 10.0)).is_ok(),
            "default cooldown is 10 s"
        );
    }

    #[test]
    fn circuit_opens_on_repeated_failures_and_a_trial_decides() {
        let c = two("", "");
        let mut t = Table::new(&c);
        let t0 = Instant::now();
        let fail = |t: &mut Table, now| {
            let adm = t.admit(&c, &[0], &[], ("m", 1), now).unwrap();
            t.finish(&c, adm, "m", failed(), now);
        };
        fail(&mut t, t0);
        assert!(
            t.admit(&c, &[0], &[], ("m", 1), t0).is_ok(),
            "one stray failure does not take it out"
        );
        let mut t = Table::new(&c);
        fail(&mut t, t0);
        fail(&mut t, at(t0, 1.0));
        assert_eq!(
            t.admit(&c, &[0], &[], ("m", 1), at(t0, 2.0)),
            Err(Blocked::Down { until: at(t0, 6.0) })
        );
        // The trial fails: open twice as long.
        fail(&mut t, at(t0, 6.0));
        assert_eq!(
            t.admit(&c, &[0], &[], ("m", 1), at(t0, 7.0)),
            Err(Blocked::Down {
                until: at(t0, 16.0)
            })
        );
        // The next trial fails too: capped at circuit_max_open_seconds (12).
        fail(&mut t, at(t0, 16.0));
        assert_eq!(
            t.admit(&c, &[0], &[], ("m", 1), at(t0, 17.0)),
            Err(Blocked::Down {
                until: at(t0, 28.0)
            })
        );
        // During a trial no other request goes there; a success closes the circuit.
        let trial = t.admit(&c, &[0], &[], ("m", 1), at(t0, 28.0)).unwrap();
        assert!(matches!(
            t.admit(&c, &[0], &[], ("m", 1), at(t0, 28.1)),
            Err(Blocked::Down { .. })
        ));
        t.finish(&c, trial, "m", healthy(), at(t0, 28.2));
        assert!(t.admit(&c, &[0], &[], ("m", 1), at(t0, 28.3)).is_ok());
        assert_eq!(t.runtimes.get_mut("a").unwrap().circuit, Circuit::Closed);
    }

    #[test]
    fn streams_that_break_after_their_first_byte_open_the_circuit() {
        let c = two("", "");
        let mut t = Table::new(&c);
        let t0 = Instant::now();
        // Each stream's first byte is a success; each then breaks.
        for s in [0.0, 1.0] {
            let adm = t.admit(&c, &[0], &[], ("m", 1), at(t0, s)).unwrap();
            t.finish(&c, adm, "m", healthy(), at(t0, s));
            t.broke(&c, 0, at(t0, s + 0.5));
        }
        assert_eq!(
            t.admit(&c, &[0], &[], ("m", 1), at(t0, 2.0)),
            Err(Blocked::Down { until: at(t0, 6.5) }),
            "two broken streams are a run of two failures"
        );
        let slot = t.slot(at(t0, 2.0));
        assert_eq!(
            t.runtimes["a"].recent.sum(slot),
            (2, 2),
            "(attempts, failures)"
        );
    }

    #[test]
    fn a_trial_that_never_reports_back_expires() {
        let c = two("", "");
        let mut t = Table::new(&c);
        let t0 = Instant::now();
        t.runtimes.get_mut("a").unwrap().circuit = Circuit::Open {
            until: t0,
            backoff: Duration::from_secs(5),
        };
        t.admit(&c, &[0], &[], ("m", 1), t0).unwrap();
        // Default timeouts: 10 s connect + 60 s response + 1 s.
        assert_eq!(
            t.admit(&c, &[0], &[], ("m", 1), at(t0, 70.0)),
            Err(Blocked::Down {
                until: at(t0, 71.0)
            })
        );
        assert!(
            t.admit(&c, &[0], &[], ("m", 1), at(t0, 71.0)).is_ok(),
            "a new trial"
        );
    }

    #[test]
    fn failures_far_apart_do_not_add_up() {
        let c = two("", "");
        let mut t = Table::new(&c);
        let t0 = Instant::now();
        for s in [0.0, 61.0, 122.0] {
            let adm = t.admit(&c, &[0], &[], ("m", 1), at(t0, s)).unwrap();
            t.finish(&c, adm, "m", failed(), at(t0, s));
        }
        assert!(t.admit(&c, &[0], &[], ("m", 1), at(t0, 123.0)).is_ok());
    }

    #[test]
    fn rate_limited_is_reported_over_down_and_tried_instances_are_skipped() {
        let c = two(", max_tpm: 100", "");
        let mut t = Table::new(&c);
        let t0 = Instant::now();
        t.admit(&c, &[0], &[], ("m", 100), t0).unwrap();
        t.runtimes.get_mut("b").unwrap().circuit = Circuit::Open {
            until: at(t0, 5.0),
            backoff: Duration::from_secs(5),
        };
        assert_eq!(
            t.admit(&c, &[0, 1], &[], ("m", 10), at(t0, 1.0)),
            Err(Blocked::RateLimited {
                until: at(t0, 60.0)
            })
        );
        assert_eq!(
            t.admit(&c, &[0, 1], &[0], ("m", 10), at(t0, 1.0)),
            Err(Blocked::Down { until: at(t0, 5.0) })
        );
        assert_eq!(
            t.admit(&c, &[0, 1], &[0, 1], ("m", 10), at(t0, 1.0)),
            Err(Blocked::Down { until: at(t0, 1.0) })
        );
    }

    #[test]
    fn upstream_remaining_headers_fill_the_local_window() {
        let c = two(", max_tpm: 1000, max_rpm: 10", "");
        let mut t = Table::new(&c);
        let t0 = Instant::now();
        let adm = t.admit(&c, &[0], &[], ("m", 10), t0).unwrap();
        t.finish(
            &c,
            adm,
            "m",
            Outcome::Answered {
                status: 200,
                remaining_tokens: Some(5),
                remaining_requests: Some(3),
            },
            t0,
        );
        assert_eq!(
            t.admit(&c, &[0], &[], ("m", 10), t0),
            Err(Blocked::RateLimited {
                until: at(t0, 60.0)
            })
        );
        assert!(
            t.admit(&c, &[0], &[], ("m", 5), t0).is_ok(),
            "exactly the remaining 5 fit"
        );
    }

    #[test]
    fn state_follows_the_name_across_a_new_config() {
        let c = two(", max_tpm: 1000", "");
        let mut t = Table::new(&c);
        let t0 = Instant::now();
        let before = t.admit(&c, &[0], &[], ("m", 1000), t0).unwrap();
        // The reloaded config lists b first and a second, and drops nothing.
        let swapped = config(
            "failover",
            "  - {name: b, api_key: k, api_base: 'http://b', supported_models: [m]}\n  - {name: a, api_key: k, api_base: 'http://a', max_tpm: 1000, supported_models: [m]}\n",
        );
        t.update(&swapped);
        assert_eq!(
            t.admit(&swapped, &[1], &[], ("m", 1), t0),
            Err(Blocked::RateLimited {
                until: at(t0, 60.0)
            }),
            "a's window came along"
        );
        let only_b = config(
            "failover",
            "  - {name: b, api_key: k, api_base: 'http://b', supported_models: [m]}\n",
        );
        t.update(&only_b);
        assert_eq!(
            t.admit(&swapped, &[1], &[], ("m", 1), t0),
            Err(Blocked::Down { until: t0 }),
            "a request on the old configuration cannot reach a removed instance"
        );
        t.update(&swapped);
        // The request admitted before a was removed fails late: it must not touch the
        // new a.
        let late = t.finish(&c, before, "m", Outcome::Unreachable { arrived: false }, t0);
        assert_eq!(late, Finished::default());
        assert_eq!(t.runtimes["a"].last_error, None);
        assert!(
            t.admit(&swapped, &[1], &[], ("m", 1000), t0).is_ok(),
            "a removed and re-added starts afresh"
        );
    }

    #[test]
    fn views_name_each_state() {
        let c = two(", max_tpm: 100", "");
        let mut t = Table::new(&c);
        let t0 = Instant::now();
        let health =
            |t: &mut Table, now| t.view(&c, now).iter().map(|v| v.health).collect::<Vec<_>>();
        assert_eq!(health(&mut t, t0), [Health::Healthy, Health::Healthy]);
        let adm = t.admit(&c, &[0], &[], ("m", 100), t0).unwrap();
        t.finish(&c, adm, "m", healthy(), t0);
        let adm = t.admit(&c, &[1], &[], ("m", 1), t0).unwrap();
        t.finish(&c, adm, "m", failed(), t0);
        assert_eq!(health(&mut t, t0), [Health::RateLimited, Health::Error]);
        let v = &t.view(&c, t0)[0];
        assert_eq!(
            (v.current_tpm, v.current_rpm, v.rate_limited_until),
            (100, 1, Some(at(t0, 60.0)))
        );
        let adm = t.admit(&c, &[1], &[], ("m", 1), t0).unwrap();
        t.finish(&c, adm, "m", failed(), t0);
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
        let mut t = Table::new(&c);
        let t0 = Instant::now();
        assert!(t.admit(&c, &[0], &[], ("m", 1), t0).is_ok());
        assert!(t.admit(&c, &[0], &[], ("m", 1), at(t0, 1.0)).is_ok());
        assert_eq!(
            t.admit(&c, &[0], &[], ("m", 1), at(t0, 2.0)),
            Err(Blocked::RateLimited {
                until: at(t0, 60.0)
            })
        );
    }
}
