//! What operators read of the table: each instance's health and state, for
//! `/stats/instances`, `/health` and `/metrics`.

use super::{Circuit, Table};
use crate::config::Config;
use crate::routing::window::WINDOW;
use std::time::Instant;

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

#[cfg(test)]
mod tests {
    use super::super::tests::{at, failed, healthy, two};
    use super::super::*;

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
}
