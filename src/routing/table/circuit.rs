//! An instance's circuit (opened by a run or a rate of failures, closed only by its
//! trial) and the models it is taken out for after a deployment fault.

use super::{secs, Runtime};
use crate::config::Routing;
use crate::outcome::Outcome;
use crate::routing::window::WINDOW;
use std::time::{Duration, Instant};

/// Models an instance remembers being taken out for; past this, the one back soonest
/// is forgotten (a client names the model on an instance that serves any).
const MAX_FAULTS: usize = 64;
/// The minute over which a failure rate is read, in buckets of this many seconds.
pub(super) const RATE_BUCKET_SECS: u64 = 10;
const RATE_BUCKETS: usize = 6;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Circuit {
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
pub(super) struct Recent {
    /// (bucket number since the table's origin, attempts, failures)
    buckets: [(u64, u32, u32); RATE_BUCKETS],
}

impl Recent {
    pub(super) fn count(&mut self, slot: u64, failed: bool) {
        let bucket = &mut self.buckets[(slot % RATE_BUCKETS as u64) as usize];
        if bucket.0 != slot {
            *bucket = (slot, 0, 0);
        }
        bucket.1 += 1;
        bucket.2 += u32::from(failed);
    }

    /// Takes back a success counted in `slot` (a stream that broke after its first
    /// byte, about to be counted as a failure). One from an earlier bucket stays.
    pub(super) fn forget_success(&mut self, slot: u64) {
        let bucket = &mut self.buckets[(slot % RATE_BUCKETS as u64) as usize];
        if bucket.0 == slot && bucket.1 > bucket.2 {
            bucket.1 -= 1;
        }
    }

    /// (attempts, failures) in the buckets of the last minute.
    pub(super) fn sum(&self, slot: u64) -> (u32, u32) {
        self.buckets
            .iter()
            .filter(|b| b.0 + RATE_BUCKETS as u64 > slot && b.0 <= slot)
            .fold((0, 0), |(a, f), b| (a + b.1, f + b.2))
    }
}

/// A model an instance is taken out for: it answered 401, 403 or 404 for it.
#[derive(Debug)]
pub(super) struct Fault {
    pub(super) model: String,
    pub(super) until: Instant,
    backoff: Duration,
}

/// Counts a failure against `rt` and, if it `speaks` for the circuit, opens or reopens
/// it: a failed trial doubles the time out; a closed circuit opens on
/// `circuit_failures` failures in a row, or as many in the last minute that are also
/// `circuit_failure_rate` of its attempts.
pub(super) fn fail(
    rt: &mut Runtime,
    slot: u64,
    routing: &Routing,
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
pub(super) fn take_out(rt: &mut Runtime, model: &str, routing: &Routing, now: Instant) {
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
pub(super) fn describe(outcome: &Outcome) -> String {
    match outcome.status() {
        Some(status) => format!("HTTP {status}"),
        None => match outcome {
            Outcome::TimedOut => "no answer in time".into(),
            Outcome::Broken => "the answer broke off".into(),
            _ => "could not be reached".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{at, failed, healthy, two};
    use super::super::*;
    use super::*;

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
}
