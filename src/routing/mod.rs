//! Routing (DESIGN §6–§7): which instances may serve a request, its admission into an
//! instance's windows (waiting briefly for room), the attempts on instances not yet
//! tried, and the failure the client hears when none succeeds. The instances' state is
//! in `table`, the strategies in `strategy`, the windows in `window`. An attempt itself
//! is the caller's (`upstream::call`): routing sees only its `Outcome`. With `redis`
//! configured, each local admission is confirmed in the shared state (`crate::shared`)
//! after the table's lock is released, and each outcome settled there.

pub mod affinity;
mod claims;
pub mod clients;
mod rotation;
pub mod strategy;
pub mod table;
pub mod window;

use crate::config::Config;
use crate::error::Error;
use crate::observe::alerts::Alerts;
use crate::observe::logging::Clean;
use crate::outcome::{Attempt, Outcome};
use crate::shared::{Settle, Shared, Verdict};
use claims::{Claim, InLine};
use parking_lot::Mutex;
use std::time::{Duration, Instant};
use table::{Admission, Blocked, Held, Table};

/// Every instance that serves `model` exactly, in configuration order.
pub fn candidates(config: &Config, model: &str) -> Vec<usize> {
    (0..config.instances.len())
        .filter(|&i| config.instances[i].serves(model))
        .collect()
}

/// What routing needs to know of a request.
pub struct Plan<'a> {
    pub model: &'a str,
    /// What a deployment fault (401, 403, 404) takes an instance out for: the model, or
    /// the model for one operation (`upstream::Op::fault_scope`).
    pub scope: &'a str,
    /// The instances that may serve it (by index in the configuration).
    pub candidates: &'a [usize],
    /// Tokens to reserve in a window: the admission estimate.
    pub need: u64,
    /// Until when the request may wait, for room and then for a permit: one deadline
    /// for both, so that no request waits twice `routing.queue_timeout`.
    pub deadline: Instant,
    /// Whether an attempt that timed out is tried again on another instance.
    pub retry_timeouts: bool,
    /// A named client's reservation in its own windows: it waits in line in its
    /// client's turn, and with Redis its limits are checked there with the first
    /// instance's admission.
    pub client: Option<&'a clients::Ticket<'a>>,
}

/// Where an instance's state lives: this proxy's table, and the shared state when
/// Redis is configured.
#[derive(Clone, Copy)]
pub struct States<'a> {
    pub table: &'a Mutex<Table>,
    pub shared: Option<&'a Shared>,
}

/// How routing ended.
pub enum Routed<A> {
    /// An instance's answer to pass on (a success, or an error about the request);
    /// `instance` is its index.
    Answered { answer: A, instance: usize },
    /// Every attempt failed: the failure the client hears, with the upstream's answer
    /// when it gave one, and the index of the instance that failed so.
    Failed {
        outcome: Outcome,
        answer: Option<A>,
        instance: usize,
    },
    /// No instance could take the request, or it could not be sent: the proxy's answer.
    Refused(Error),
}

/// Routes one request: admits it to an instance, calls `attempt` there, and tries
/// untried instances (up to `routing.retries` more) while the outcome says another
/// may do better. Each attempt is recorded in `attempts`. When every attempt fails,
/// the client hears the most useful failure (`precedence`), not the last one.
pub fn run<A>(
    states: States,
    config: &Config,
    alerts: &Alerts,
    plan: &Plan,
    attempts: &mut Vec<Attempt>,
    mut attempt: impl FnMut(usize) -> Result<(Outcome, Option<A>), Error>,
) -> Routed<A> {
    let table = states.table;
    let mut tried: Vec<usize> = Vec::new();
    let mut best: Option<(Outcome, Option<A>, usize)> = None;
    while tried.len() <= config.routing.retries as usize {
        let admitted = confirmed(states, config, alerts, plan, || {
            if tried.is_empty() {
                admit(table, config, plan)
            } else {
                // A retry takes what is free now, or stops.
                let now = Instant::now();
                table.lock().admit(
                    config,
                    plan.candidates,
                    &tried,
                    (plan.scope, plan.need),
                    now,
                )
            }
        });
        let claim = match admitted {
            Ok(a) => Claim::new((states, config, alerts), plan.need, a),
            Err(Stop::Blocked(blocked)) if tried.is_empty() => {
                return Routed::Refused(refusal(alerts, plan, blocked))
            }
            Err(Stop::Client(e)) => return Routed::Refused(e),
            Err(_) => break,
        };
        let i = claim.index();
        tried.push(i);
        let (outcome, answer) = match attempt(i) {
            Ok(done) => done,
            Err(not_sent) => {
                // The claim, dropped, gives the reservation back.
                drop(claim);
                // A retry that could not be sent leaves the earlier failure to tell.
                return match best {
                    Some((outcome, answer, instance)) => Routed::Failed {
                        outcome,
                        answer,
                        instance,
                    },
                    None => Routed::Refused(not_sent),
                };
            }
        };
        let (admission, reservation) = claim.settle();
        attempts.push(Attempt {
            instance: config.instances[i].name.clone(),
            outcome,
        });
        let finished = table
            .lock()
            .finish(config, admission, plan.scope, outcome, Instant::now());
        settle(states, alerts, &config.instances[i], |s| {
            if outcome.never_counted() {
                s.release = reservation.as_deref().map(|r| (r, plan.need));
            }
            s.cooldown = finished.cooled;
            s.circuit = finished.opened;
            if let Outcome::Answered {
                remaining_tokens,
                remaining_requests,
                ..
            } = outcome
            {
                s.remaining = (remaining_tokens, remaining_requests);
            }
        });
        report(config, alerts, i, plan.model, &outcome, &finished);
        if !outcome.retry_elsewhere() {
            if let Some(answer) = answer {
                return Routed::Answered {
                    answer,
                    instance: i,
                };
            }
        }
        if best
            .as_ref()
            .is_none_or(|(kept, ..)| precedence(&outcome) >= precedence(kept))
        {
            best = Some((outcome, answer, i));
        }
        // Sent, then no answer in time: the instance may still be generating it, and a
        // second instance would generate (and bill) it again.
        if outcome == Outcome::TimedOut && !plan.retry_timeouts {
            break;
        }
    }
    // The loop ran at least once (`retries` ≥ 0) and each pass kept or returned.
    match best {
        Some((outcome, answer, instance)) => Routed::Failed {
            outcome,
            answer,
            instance,
        },
        None => Routed::Refused(Error::Internal),
    }
}

/// A local admission (`local`), confirmed in the shared state: Redis checks and
/// reserves the room there in one step. When it refuses, the instance is held out
/// locally for as long as Redis said and `local` runs again, so the strategy picks
/// among the others or the request waits for room as without Redis. Redis not
/// answering leaves the local admission standing, without a reservation id.
fn confirmed(
    states: States,
    config: &Config,
    alerts: &Alerts,
    plan: &Plan,
    mut local: impl FnMut() -> Result<Admission, Blocked>,
) -> Result<(Admission, Option<String>), Stop> {
    loop {
        let admission = local().map_err(Stop::Blocked)?;
        let Some(shared) = states.shared else {
            return Ok((admission, None));
        };
        let inst = &config.instances[admission.index];
        // The client's limits are checked once, with its request's first admission.
        let client = plan.client.filter(|t| t.shared_id.get().is_none());
        let held = match shared.admit(alerts, inst, plan.need, client.map(|t| t.client)) {
            None => return Ok((admission, None)),
            Some(Verdict::Admitted(id)) => {
                if let Some(ticket) = client {
                    let _ = ticket.shared_id.set(id.clone());
                }
                return Ok((admission, Some(id)));
            }
            Some(Verdict::Client(limit, wait)) => {
                states.table.lock().cancel(config, admission);
                // Redis checks a client's limits only when given one.
                let error = client.map_or(Error::Internal, |t| {
                    clients::refusal(t.client, (limit, wait))
                });
                return Err(Stop::Client(error));
            }
            Some(Verdict::Full(wait)) => Held::Cooling(Instant::now() + wait),
            Some(Verdict::NoRoom(wait)) => Held::NoRoom(Instant::now() + wait),
            Some(Verdict::Down(wait)) => Held::Down(Instant::now() + wait),
        };
        states.table.lock().hold(config, admission, held);
    }
}

/// Why an admission did not happen: no instance could take the request, or (with
/// Redis) its client's own limits across the fleet refused it.
enum Stop {
    Blocked(Blocked),
    Client(Error),
}

/// Tells the shared state (if any) what an attempt did to `inst`, filled in by `fill`.
fn settle<'a>(
    states: States,
    alerts: &Alerts,
    inst: &crate::config::Instance,
    fill: impl FnOnce(&mut Settle<'a>),
) {
    if let Some(shared) = states.shared {
        let mut s = Settle::default();
        fill(&mut s);
        shared.settle(alerts, inst, &s);
    }
}

/// Which of two failures the client should hear (the higher; between equals, the
/// later). A 429 first: it says when to come back, and among 429s the soonest
/// Retry-After wins; then an upstream's 5xx answer (its body says what failed); then a
/// timeout (504); then no connection or a broken answer (502); last a deployment fault
/// (401, 403 or 404: the proxy's configuration is wrong, not the client's request).
fn precedence(outcome: &Outcome) -> (u8, std::cmp::Reverse<Duration>) {
    use std::cmp::Reverse;
    match outcome {
        Outcome::RateLimited { retry_after } => {
            (5, Reverse(retry_after.unwrap_or(table::DEFAULT_COOLDOWN)))
        }
        Outcome::Failed { .. } => (4, Reverse(Duration::ZERO)),
        Outcome::TimedOut => (3, Reverse(Duration::ZERO)),
        Outcome::Unreachable { .. } | Outcome::Broken => (2, Reverse(Duration::ZERO)),
        Outcome::DeploymentFault { .. } => (1, Reverse(Duration::ZERO)),
        Outcome::Answered { .. } => (0, Reverse(Duration::ZERO)),
    }
}

/// Admits the request to an instance, waiting until the plan's deadline for window
/// room that will come by then. Requests wait in line per model and set of candidate
/// instances (a request bound to one instance by `previous_response_id` does not hold
/// up those that may go anywhere): only the first looks for room, when its room is due
/// or a reservation is given back, and each that is admitted or gives up wakes the
/// next; a request that arrives while others wait in its line joins it. Refusals that
/// cannot end by the deadline return at once.
fn admit(table: &Mutex<Table>, config: &Config, plan: &Plan) -> Result<Admission, Blocked> {
    let want = (plan.scope, plan.need);
    // The line, named by a hash of the model and the candidates, taken before the lock.
    let line = rotation::line(plan.model, plan.candidates);
    let mut t = table.lock();
    let mut now = Instant::now();
    if !t.has_waiters(line) {
        match t.admit(config, plan.candidates, &[], want, now) {
            Err(Blocked::RateLimited { until }) if until <= plan.deadline => {}
            done => return done,
        }
    }
    // Dropped, however the wait ends, it leaves the line and wakes the next.
    let client = plan.client.map(|c| c.client.name.as_str());
    let mut place = InLine::join(table, t, line, client);
    loop {
        let first = place.is_first();
        let result = if first || now >= plan.deadline {
            place.table().admit(config, plan.candidates, &[], want, now)
        } else {
            Err(Blocked::RateLimited {
                until: plan.deadline,
            })
        };
        let wake_at = match result {
            Err(Blocked::RateLimited { until })
                if until <= plan.deadline && now < plan.deadline =>
            {
                if first {
                    until
                } else {
                    plan.deadline
                }
            }
            done => {
                place.admitted = done.is_ok();
                return done;
            }
        };
        place.locked = None;
        std::thread::park_timeout(wake_at.saturating_duration_since(now));
        now = Instant::now();
    }
}

/// A stream that broke after its answer began: a failure of `instance`, as an attempt's
/// would be.
pub fn broke(states: States, config: &Config, alerts: &Alerts, instance: usize, model: &str) {
    let opened = states.table.lock().broke(config, instance, Instant::now());
    settle(states, alerts, &config.instances[instance], |s| {
        s.circuit = opened
    });
    let finished = table::Finished {
        opened,
        ..table::Finished::default()
    };
    report(config, alerts, instance, model, &Outcome::Broken, &finished);
}

/// The answer for a request no instance can take now: 429 with when room comes, or
/// 503 with when an instance may be back (and an alert: that is an outage).
#[inline(never)]
fn refusal(alerts: &Alerts, plan: &Plan, blocked: Blocked) -> Error {
    let wait = |until: Instant| {
        until
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let model = plan.model.to_string();
    match blocked {
        Blocked::RateLimited { until } => Error::RateLimited {
            model,
            need: plan.need,
            wait: wait(until),
        },
        Blocked::Down { until } => {
            alerts.error(
                &format!("all_down:{}", Clean(&model)),
                &format!(
                    "every instance serving {} is down; clients get 503",
                    Clean(&model)
                ),
            );
            Error::AllDown {
                model,
                wait: wait(until),
            }
        }
    }
}

/// Logs and alerts what an attempt did to its instance: a key rejected or a deployment
/// missing, a cooldown capped, a circuit opened.
#[inline(never)]
fn report(
    config: &Config,
    alerts: &Alerts,
    i: usize,
    model: &str,
    outcome: &Outcome,
    finished: &table::Finished,
) {
    let inst = &config.instances[i];
    let name = &inst.name;
    match outcome {
        Outcome::DeploymentFault { status: s @ (401 | 403) } => alerts.error(
            &format!("auth:{name}"),
            &format!("instance {name} rejected the proxy's API key (HTTP {s}); check its api_key"),
        ),
        Outcome::DeploymentFault { status: 404 } => alerts.error(
            &format!("deployment:{name}:{}", Clean(model)),
            &format!(
                "instance {name} has no deployment {} for model {} (HTTP 404); check model_deployments and api_version",
                Clean(inst.deployment(model)),
                Clean(model)
            ),
        ),
        _ => {}
    }
    if let Some(asked) = finished.capped {
        log::warn!(
            "instance {name} asked for a cooldown of {} s; capped at routing.max_cooldown ({} s)",
            asked.as_secs_f64(),
            config.routing.max_cooldown
        );
    }
    if let Some(out_for) = finished.opened {
        alerts.error(
            &format!("circuit:{name}"),
            &format!(
                "instance {name} keeps failing; it is taken out for {} s",
                out_for.as_secs_f64()
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn requests_waiting_for_room_get_it_in_arrival_order_and_look_once_each() {
        let c: Config = serde_yaml::from_str(
            "instances: [{name: a, api_key: k, api_base: 'http://a', max_tpm: 1000, supported_models: [m]}]",
        )
        .unwrap();
        let table = Arc::new(Mutex::new(Table::new(&c)));
        let start = Instant::now();
        // A full window whose ten reservations of 100 leave one by one, 100 ms apart,
        // from 400 ms on (a window is 60 s; these were made 59.6 s ago and later).
        let minute_ago = start.checked_sub(window::WINDOW).unwrap();
        for k in 0..10 {
            let at = minute_ago + Duration::from_millis(400 + 100 * k);
            table.lock().admit(&c, &[0], &[], ("m", 100), at).unwrap();
        }
        let checks_before = table.lock().checks;
        let order = Arc::new(Mutex::new(Vec::new()));
        let waiters: Vec<_> = (0..10)
            .map(|k| {
                let (shared, c, order) = (table.clone(), c.clone(), order.clone());
                let waiter = std::thread::spawn(move || {
                    let plan = Plan {
                        model: "m",
                        scope: "m",
                        candidates: &[0],
                        need: 100,
                        deadline: start + Duration::from_secs(5),
                        retry_timeouts: false,
                        client: None,
                    };
                    let admitted = admit(&shared, &c, &plan);
                    order.lock().push(k);
                    admitted.is_ok()
                });
                // The next arrives once this one waits in line (or 20 ms later).
                let spawned = Instant::now();
                while table.lock().waiting() < k + 1
                    && spawned.elapsed() < Duration::from_millis(20)
                {
                    std::thread::yield_now();
                }
                waiter
            })
            .collect();
        assert!(
            start.elapsed() < Duration::from_millis(400),
            "all arrived before room came"
        );
        for w in waiters {
            assert!(w.join().unwrap(), "admitted");
        }
        assert_eq!(
            *order.lock(),
            (0..10).collect::<Vec<_>>(),
            "first come, first served"
        );
        let looks = table.lock().checks - checks_before;
        // The first looks on arrival; later arrivals join the line without looking.
        // Each then looks when it becomes first and when its room is due: about 2 per
        // waiter (21 seen), with slack for a spurious wake-up. Waking every waiter
        // whenever room came would make it 10 + 10 + 9 + ... + 1 = 65.
        assert!(looks <= 30, "{looks} admission checks for 10 waiters");
        assert_eq!(table.lock().waiting(), 0);
    }

    #[test]
    fn candidates_serve_the_model_exactly() {
        let c: Config = serde_yaml::from_str(
            "instances:
  - {name: a, api_key: k, api_base: 'http://a', supported_models: [m]}
  - {name: b, api_key: k, api_base: 'http://b', supported_models: [m, other]}
  - {name: c, api_key: k, api_base: 'http://c', supported_models: [other]}
",
        )
        .unwrap();
        assert_eq!(candidates(&c, "m"), [0, 1]);
        assert_eq!(candidates(&c, "other"), [1, 2]);
        assert!(candidates(&c, "M").is_empty());
    }
}
