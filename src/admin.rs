//! The operator's endpoints (DESIGN §9): `/stats*` with the field names dashboards
//! built for the earlier Python proxy read, `/health` for load balancers, `/metrics`
//! for Prometheus, and the admin-only `/config`, `/config/reload` and `/stats/reset`.

use crate::error::Error;
use crate::http::Reply;
use crate::observe::client_stats::Tally;
use crate::observe::metrics::{self, Gauges, InstanceGauges};
use crate::observe::stats::{Counts, Histogram};
use crate::routing::clients::utc_day;
use crate::routing::table::{Health, View};
use crate::state::{Generation, State};
use serde_json::{json, Map, Value};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        round2(part as f64 * 100.0 / whole as f64)
    }
}

fn latency(h: &Histogram) -> Value {
    let p = |q| h.percentile(q).map(round2);
    let avg = h.mean_ms().map(round2);
    json!({"p50": p(0.5), "p95": p(0.95), "p99": p(0.99), "avg": avg})
}

/// The `metrics` object of `/stats` for one window, with the totals since start.
fn window_metrics(w: &Counts, minutes: u32, totals: &Counts) -> Value {
    let per_minute = |n: u64| round2(n as f64 / f64::from(minutes));
    json!({
        "window_minutes": minutes,
        "requests_per_minute": per_minute(w.requests),
        "tokens_per_minute": per_minute(w.tokens()),
        "success_rate": percent(w.successes, w.requests),
        "error_rate": percent(w.failures(), w.requests),
        "upstream_error_rate": percent(w.upstream_errors, w.upstream_attempts),
        "total_requests_in_window": w.requests,
        "successful_requests_in_window": w.successes,
        "failed_requests_in_window": w.failures(),
        "total_tokens_in_window": w.tokens(),
        "prompt_tokens_in_window": w.prompt_tokens,
        "completion_tokens_in_window": w.completion_tokens,
        "client_errors_500": w.status_500,
        "client_errors_503": w.status_503,
        "client_errors_other": w.status_other_error,
        "upstream_errors_in_window": w.upstream_errors,
        "upstream_attempts_in_window": w.upstream_attempts,
        "retries_in_window": w.retries,
        "panics_in_window": w.panics,
        "latency_ms": latency(&w.latency),
        "models": w.by_model,
        "status_codes": w.by_status.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<Map<_, _>>(),
        "total_requests": totals.requests,
        "total_successful_requests": totals.successes,
        "total_client_errors": totals.failures(),
        "total_upstream_errors": totals.upstream_errors,
        "total_tokens_served": totals.tokens(),
        "total_panics": totals.panics,
    })
}

fn success(key: &str, value: Value) -> Reply {
    Reply::json(200, &json!({"status": "success", key: value}))
}

/// `GET /stats?window=N` (minutes, 1–60; default `monitoring.stats_window_minutes`).
pub fn stats(state: &State, g: &Generation, query: &str) -> Reply {
    let minutes = match query.split('&').find_map(|kv| kv.strip_prefix("window=")) {
        None => g.config.monitoring.stats_window_minutes,
        Some(n) => match n.parse::<u32>() {
            Ok(m @ 1..=60) => m,
            _ => return Error::BadWindow(n.to_string()).into(),
        },
    };
    let now = state.uptime_secs();
    let mut metrics = {
        let stats = state.stats.lock();
        let mut metrics = window_metrics(&stats.window(now, minutes), minutes, &stats.totals);
        metrics["realtime_sessions"] = json!({
            "open": state.realtime.open(),
            "opened": stats.sessions.opened,
            "closed": stats.sessions.closed,
        });
        metrics
    };
    // Counted apart from the statistics: a 401 is answered before any request is.
    metrics["auth_failures"] = state.key_failures.failures().into();
    metrics["auth_refused"] = state.key_failures.refused().into();
    success("metrics", metrics)
}

/// The configured windows: `stats_window_minutes` and `additional_windows`, once each.
fn windows(g: &Generation) -> Vec<u32> {
    let m = &g.config.monitoring;
    let mut all: Vec<u32> = std::iter::once(m.stats_window_minutes)
        .chain(m.additional_windows.iter().copied())
        .collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// `GET /stats/windows`.
pub fn stats_windows(state: &State, g: &Generation) -> Reply {
    let now = state.uptime_secs();
    let stats = state.stats.lock();
    // Written by hand: a JSON object here sorts its keys as text, "15min" before "5min".
    let mut body = String::from(r#"{"status":"success","windows":{"#);
    for (i, m) in windows(g).into_iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        let metrics = window_metrics(&stats.window(now, m), m, &stats.totals);
        body.push_str(&format!("\"{m}min\":{metrics}"));
    }
    body.push_str("}}");
    Reply::full(200, "application/json", body.into_bytes())
}

/// A named client's counts in a window or since start.
fn client_tally(t: &Tally) -> Value {
    json!({
        "requests": t.requests,
        "prompt_tokens": t.prompt_tokens,
        "completion_tokens": t.completion_tokens,
        "total_tokens": t.prompt_tokens.saturating_add(t.completion_tokens),
        "rate_limited_by_own_limits": t.limited,
    })
}

/// `GET /stats/clients`: per named client, its limits, its windows' use now, its
/// budget used today (the fleet's, with Redis), and its counts since start and in the
/// windows of `/stats/windows`.
pub fn stats_clients(state: &State, g: &Generation) -> Reply {
    let now = state.uptime_secs();
    let (day, _) = utc_day(SystemTime::now());
    let windows: Vec<(u32, Counts)> = {
        let stats = state.stats.lock();
        windows(g)
            .into_iter()
            .map(|m| (m, stats.window(now, m)))
            .collect()
    };
    let totals = state.stats.lock().totals.by_client.clone();
    let mut all = Map::new();
    for c in &g.config.auth.clients {
        let shared_today = state
            .shared
            .as_ref()
            .and_then(|s| s.spend(&g.alerts, &c.name, 0));
        let used = state.clients.lock().used(&c.name, Instant::now(), day);
        let today = shared_today.unwrap_or(used.today);
        let tally = |counts: Option<&Tally>| client_tally(&counts.copied().unwrap_or_default());
        let in_windows: Map<String, Value> = windows
            .iter()
            .map(|(m, w)| (format!("{m}min"), tally(w.by_client.get(&c.name))))
            .collect();
        all.insert(
            c.name.clone(),
            json!({
                "limits": {"tpm": c.tpm, "rpm": c.rpm, "tokens_per_day": c.tokens_per_day, "models": c.models},
                "tpm_used": used.tpm,
                "rpm_used": used.rpm,
                "budget_used_today": today,
                "budget_left_today": c.tokens_per_day.map(|b| b.saturating_sub(today)),
                "total": tally(totals.get(&c.name)),
                "windows": in_windows,
            }),
        );
    }
    success("clients", Value::Object(all))
}

/// RFC 3339 UTC with milliseconds (`2026-11-24T15:00:00.000Z`).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let (days, secs) = ((d.as_secs() / 86_400) as i64, d.as_secs() % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60,
        d.subsec_millis()
    )
}

/// Wall-clock form of a monotonic instant, for display.
fn wall(t: Instant, now: Instant, wall_now: SystemTime) -> String {
    let at = if t >= now {
        wall_now + (t - now)
    } else {
        wall_now.checked_sub(now - t).unwrap_or(UNIX_EPOCH)
    };
    rfc3339(at)
}

fn views(state: &State, g: &Generation) -> (Vec<View>, Instant) {
    let now = Instant::now();
    (state.table.lock().view(&g.config, now), now)
}

/// `GET /stats/instances`.
pub fn stats_instances(state: &State, g: &Generation) -> Reply {
    let (views, now) = views(state, g);
    let wall_now = SystemTime::now();
    let stats = state.stats.lock();
    let list: Vec<Value> = g
        .config
        .instances
        .iter()
        .zip(&views)
        .map(|(inst, v)| {
            let counts = stats.instances.get(&inst.name).cloned().unwrap_or_default();
            json!({
                "name": inst.name,
                "provider_type": inst.provider_type,
                "status": v.health.as_str(),
                "current_tpm": v.current_tpm,
                "current_rpm": v.current_rpm,
                "max_tpm": inst.max_tpm,
                "max_rpm": inst.max_rpm,
                "tpm_usage_percent": inst.max_tpm.map(|m| percent(v.current_tpm, m)),
                "total_tokens_served": counts.prompt_tokens.saturating_add(counts.completion_tokens),
                "prompt_tokens_served": counts.prompt_tokens,
                "completion_tokens_served": counts.completion_tokens,
                "total_requests": counts.attempts,
                "error_count": counts.errors,
                "errors_by_status": counts.errors_by_kind.iter().map(|(k, n)| (k.to_string(), json!(n))).collect::<Map<_, _>>(),
                "rate_limited_count": counts.rate_limited,
                "last_error": v.last_error,
                "rate_limited_until": v.rate_limited_until.map(|t| wall(t, now, wall_now)),
                "circuit_open_until": v.circuit_open_until.map(|t| wall(t, now, wall_now)),
                "models_out": v.models_out.iter().map(|(m, t)| (m.clone(), json!(wall(*t, now, wall_now)))).collect::<Map<_, _>>(),
                "priority": inst.priority,
                "weight": inst.weight,
                "last_used": v.last_used.map(|t| wall(t, now, wall_now)),
                "supported_models": inst.models().collect::<Vec<_>>(),
                "model_deployments": inst.model_deployments,
                "latency_ms": latency(&counts.latency),
            })
        })
        .collect();
    success("instances", Value::Array(list))
}

fn count(views: &[View], h: Health) -> usize {
    views.iter().filter(|v| v.health == h).count()
}

/// The instances that cannot take requests now, with why: `circuit_open`, or
/// `credential` (their Entra ID credential has no token).
fn unavailable(views: &[View], g: &Generation) -> Map<String, Value> {
    g.config
        .instances
        .iter()
        .zip(views)
        .zip(&g.addresses)
        .filter_map(|((inst, v), address)| {
            let reason = if !address.usable() {
                "credential"
            } else if v.health == Health::CircuitOpen {
                "circuit_open"
            } else {
                return None;
            };
            Some((inst.name.clone(), json!(reason)))
        })
        .collect()
}

/// `GET /stats/health`.
pub fn stats_health(state: &State, g: &Generation) -> Reply {
    let (views, _) = views(state, g);
    let total = views.len();
    let healthy = count(&views, Health::Healthy);
    let unavailable = unavailable(&views, g);
    success(
        "health_status",
        json!({
            "total_instances": total,
            "healthy_instances": healthy,
            "rate_limited_instances": count(&views, Health::RateLimited),
            "error_instances": count(&views, Health::Error),
            "circuit_open_instances": count(&views, Health::CircuitOpen),
            "available_instances": total - unavailable.len(),
            "health_percentage": percent(healthy as u64, total as u64),
            "has_available_capacity": views.iter().zip(&g.addresses).any(|(v, a)| matches!(v.health, Health::Healthy | Health::Error) && a.usable()),
            "unavailable": unavailable,
            "shared_state": state.shared_state(),
        }),
    )
}

/// `GET /stats/status`: one line per instance.
pub fn stats_status(state: &State, g: &Generation) -> Reply {
    let (views, _) = views(state, g);
    let list: Vec<Value> = g
        .config
        .instances
        .iter()
        .zip(&views)
        .map(|(inst, v)| {
            json!({"name": inst.name, "status": v.health.as_str(), "current_tpm": v.current_tpm,
                   "max_tpm": inst.max_tpm, "last_error": v.last_error})
        })
        .collect();
    success("instances", Value::Array(list))
}

/// `POST /stats/reset` (admin): clears every counter; instance state is kept.
pub fn stats_reset(state: &State) -> Reply {
    state.stats.lock().reset();
    log::info!("statistics reset");
    Reply::json(
        200,
        &json!({"status": "success", "message": "statistics reset"}),
    )
}

/// `GET /health`: 200 while at least one instance can take requests (its circuit is
/// not open, and its credential, if any, has a token), 503 otherwise; `unavailable`
/// names the others and why, and 503 from the moment the proxy starts shutting down,
/// so that a load balancer stops sending before it goes. `shared_state` says whether
/// the fleet's state is shared (`shared`), should be but Redis does not answer
/// (`degraded`: still 200, the proxy serves on its own state), or is not (`local`).
pub fn health(state: &State, g: &Generation) -> Reply {
    let (views, _) = views(state, g);
    let unavailable = unavailable(&views, g);
    let available = views.len() - unavailable.len();
    let draining = state.draining.load(std::sync::atomic::Ordering::SeqCst);
    let ok = available > 0 && !draining;
    let status = match (draining, ok) {
        (true, _) => "draining",
        (false, true) => "healthy",
        (false, false) => "unhealthy",
    };
    Reply::json(
        if ok { 200 } else { 503 },
        &json!({
            "status": status,
            "available_instances": available,
            "total_instances": views.len(),
            "unavailable": unavailable,
            "version": env!("CARGO_PKG_VERSION"),
            "config_version": Some(&g.config.version).filter(|v| !v.is_empty()),
            "uptime_seconds": state.uptime_secs(),
            "shared_state": state.shared_state(),
        }),
    )
}

/// `GET /metrics`.
pub fn metrics(state: &State, g: &Generation) -> Reply {
    let (views, _) = views(state, g);
    let instances: Vec<InstanceGauges> = g
        .config
        .instances
        .iter()
        .zip(&views)
        .map(|(inst, v)| InstanceGauges {
            name: &inst.name,
            tpm_used: v.current_tpm,
            tpm_limit: inst.max_tpm,
            rpm_used: v.current_rpm,
            state: v.health.as_str(),
        })
        .collect();
    let gauges = Gauges {
        connections: (
            state
                .connections
                .get()
                .map_or(0, http1_server::ConnectionCount::get),
            g.config.server.max_connections,
        ),
        permits: (state.permits.in_use(), state.permits.total()),
        body_bytes: (state.bodies.used(), state.bodies.limit()),
        realtime_sessions: (state.realtime.open(), g.config.server.max_realtime_sessions),
        uptime_secs: state.uptime_secs(),
        shared_state: state.shared_state(),
        key_failures: (state.key_failures.failures(), state.key_failures.refused()),
    };
    let states = Health::ALL.map(Health::as_str);
    let text = metrics::render(&state.stats.lock(), &instances, &states, &gauges);
    Reply::full(
        200,
        "text/plain; version=0.0.4; charset=utf-8",
        text.into_bytes(),
    )
}

/// `GET /config` (admin): the effective configuration, every secret masked by
/// `Secret`'s serialisation.
pub fn config(g: &Generation) -> Reply {
    let mut config = json!(*g.config);
    // Unset is null, as /health's `config_version` shows it.
    if g.config.version.is_empty() {
        config["version"] = Value::Null;
    }
    Reply::json(200, &json!({"status": "success", "config": config}))
}

/// `POST /config/reload` (admin): 200 with what was loaded and which `--env-file` was
/// read again (`env_reread`), or 400 with the validation message while the running
/// configuration stays.
pub fn reload(state: &State) -> Reply {
    match state.reload() {
        Ok(done) => Reply::json(
            200,
            &json!({"status": "success", "message": "configuration reloaded",
                    "instances": done.instances, "restart_needed": done.restart_needed,
                    "env_reread": done.env_reread}),
        ),
        Err(e) => Error::ReloadFailed(e.to_string()).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_millis(1_795_532_400_250)),
            "2026-11-24T15:00:00.250Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn rates_round_to_two_places() {
        assert_eq!(percent(1, 3), 33.33);
        assert_eq!(percent(0, 0), 0.0);
    }
}
