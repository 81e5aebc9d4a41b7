//! Routing (DESIGN §6–§7): which instances may serve a request, its admission into an
//! instance's windows (waiting briefly for room), the attempts on instances not yet
//! tried, and the failure the client hears when none succeeds. The instances' state is
//! in `table`, the strategies in `strategy`, the windows in `window`. An attempt itself
//! is the caller's (`upstream::call`): routing sees only its `Outcome`.

pub mod strategy;
pub mod table;
pub mod window;

use crate::config::Config;
use crate::error::Error;
use crate::observe::alerts::Alerts;
use crate::observe::logging::Clean;
use crate::outcome::{Attempt, Outcome};
use parking_lot::Mutex;
use std::time::{Duration, Instant};
use table::{Admission, Blocked, Table};

/// Every instance that serves `model` exactly, in configuration order.
pub fn candidates(config: &Config, model: &str) -> Vec<usize> {
    (0..config.instances.len())
        .filter(|&i| config.instances[i].serves(model))
        .collect()
}

/// What routing needs to know of a request.
pub struct Plan<'a> {
    pub model: &'a str,
    /// The instances that may serve it (by index in the configuration).
    pub candidates: &'a [usize],
    /// Tokens to reserve in a window: the admission estimate.
    pub need: u64,
    /// Until when the first admission may wait for room.
    pub deadline: Instant,
}

/// How routing ended.
pub enum Routed<A> {
    /// An instance's answer to pass on (a success, or an error about the request);
    /// `instance` is its index.
    Answered { answer: A, instance: usize },
    /// Every attempt failed: the failure the client hears, with the upstream's answer
    /// when it gave one.
    Failed { outcome: Outcome, answer: Option<A> },
    /// No instance could take the request, or it could not be sent: the proxy's answer.
    Refused(Error),
}

/// Routes one request: admits it to an instance, calls `attempt` there, and tries
/// untried instances (up to `routing.retries` more) while the outcome says another
/// may do better. Each attempt is recorded in `attempts`.
pub fn run<A>(
    table: &Mutex<Table>,
    config: &Config,
    alerts: &Alerts,
    plan: &Plan,
    attempts: &mut Vec<Attempt>,
    mut attempt: impl FnMut(usize) -> Result<(Outcome, Option<A>), Error>,
) -> Routed<A> {
    let mut tried: Vec<usize> = Vec::new();
    let mut last = None;
    while tried.len() <= config.routing.retries as usize {
        // Only the first admission waits; a retry takes what is free now or stops.
        let wait_until = if tried.is_empty() {
            plan.deadline
        } else {
            Instant::now()
        };
        let admission = match admit(table, config, plan, &tried, wait_until) {
            Ok(a) => a,
            Err(blocked) if tried.is_empty() => {
                return Routed::Refused(refusal(alerts, plan, blocked))
            }
            Err(_) => break,
        };
        let i = admission.index;
        tried.push(i);
        let (outcome, answer) = match attempt(i) {
            Ok(done) => done,
            Err(not_sent) => {
                table.lock().cancel(config, admission);
                return Routed::Refused(not_sent);
            }
        };
        attempts.push(Attempt {
            instance: config.instances[i].name.clone(),
            outcome,
        });
        let opened = table
            .lock()
            .finish(config, admission, outcome, Instant::now());
        alert_on(config, alerts, i, plan.model, &outcome, opened);
        if !outcome.retry_elsewhere() {
            if let Some(answer) = answer {
                return Routed::Answered {
                    answer,
                    instance: i,
                };
            }
        }
        last = Some((outcome, answer));
    }
    match last {
        Some((outcome, answer)) => Routed::Failed { outcome, answer },
        None => Routed::Failed {
            outcome: Outcome::Unreachable { arrived: false },
            answer: None,
        },
    }
}

/// Admits the request to an instance, waiting (until `deadline`) for window room that
/// will come by then. Refusals that cannot end by the deadline return at once.
fn admit(
    table: &Mutex<Table>,
    config: &Config,
    plan: &Plan,
    tried: &[usize],
    deadline: Instant,
) -> Result<Admission, Blocked> {
    loop {
        let now = Instant::now();
        let result = table
            .lock()
            .admit(config, plan.candidates, tried, plan.need, now);
        match result {
            Err(Blocked::RateLimited { until }) if until <= deadline => {
                std::thread::sleep(until.saturating_duration_since(now));
            }
            other => return other,
        }
    }
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

/// Raises the alerts an attempt calls for: an instance that rejects the proxy's key or
/// lacks the deployment, and a circuit that just opened.
#[inline(never)]
fn alert_on(
    config: &Config,
    alerts: &Alerts,
    i: usize,
    model: &str,
    outcome: &Outcome,
    opened: Option<Duration>,
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
    if let Some(out_for) = opened {
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
