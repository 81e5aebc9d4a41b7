//! The semantic checks serde's types cannot express, run on the merged config: each
//! problem an `Invalid` located by its key path, never quoting a value that may be a
//! secret.

use super::clients::check_clients;
use super::schema::{log_level, Config, Instance, Provider, Redis, LOG_LEVELS};

/// A semantic problem in the merged config, located by its key path.
#[derive(Debug, PartialEq)]
pub struct Invalid {
    pub path: String,
    pub message: String,
}

pub(super) fn invalid(path: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        path: path.into(),
        message: message.into(),
    }
}

impl Config {
    /// The checks serde's types cannot express: every problem they find, so that one run of `--check-config` names them
    /// all: the first of the global settings, of the clients, of Redis, and of each
    /// instance.
    pub fn problems(&self) -> Vec<Invalid> {
        let mut found: Vec<Invalid> = self.check_settings().err().into_iter().collect();
        found.extend(check_clients(&self.auth).err());
        if let Some(redis) = &self.redis {
            found.extend(check_redis(redis).err());
        }
        let mut seen = std::collections::HashSet::new();
        for (i, inst) in self.instances.iter().enumerate() {
            found.extend(check_instance(i, inst, &mut seen).err());
        }
        found
    }

    fn check_settings(&self) -> Result<(), Invalid> {
        if self.instances.is_empty() {
            return Err(invalid(
                "instances",
                "no instance is configured: list at least one under `instances`, or set API_KEY and API_BASE",
            ));
        }
        if log_level(&self.logging.level).is_none() {
            return Err(invalid(
                "logging.level",
                format!("unknown level; use one of {LOG_LEVELS:?} (or WARNING, CRITICAL)"),
            ));
        }
        let r = &self.routing;
        for (key, secs) in [
            ("routing.timeout", r.timeout),
            ("routing.first_byte_timeout", r.first_byte_timeout),
            ("routing.connect_timeout", r.connect_timeout),
            ("routing.circuit_open_seconds", r.circuit_open_seconds),
            (
                "routing.circuit_max_open_seconds",
                r.circuit_max_open_seconds,
            ),
            ("routing.max_cooldown", r.max_cooldown),
            ("server.client_timeout", self.server.client_timeout),
            ("server.body_timeout", self.server.body_timeout),
            (
                "auth.failure_window_seconds",
                self.auth.failure_window_seconds,
            ),
            (
                "auth.failure_block_seconds",
                self.auth.failure_block_seconds,
            ),
            ("realtime.idle_timeout", self.realtime.idle_timeout),
            (
                "realtime.max_session_seconds",
                self.realtime.max_session_seconds,
            ),
        ] {
            if !(secs.is_finite() && secs > 0.0) {
                return Err(invalid(key, "must be a number of seconds above 0"));
            }
        }
        if !(r.queue_timeout.is_finite() && (0.0..=60.0).contains(&r.queue_timeout)) {
            return Err(invalid(
                "routing.queue_timeout",
                "must be seconds from 0 to 60",
            ));
        }
        if r.circuit_failures == 0 {
            return Err(invalid("routing.circuit_failures", "must be at least 1"));
        }
        if !(r.circuit_failure_rate > 0.0 && r.circuit_failure_rate <= 1.0) {
            return Err(invalid(
                "routing.circuit_failure_rate",
                "must be a share of attempts above 0 and at most 1",
            ));
        }
        if self.server.workers == 0 {
            return Err(invalid("server.workers", "must be at least 1"));
        }
        if self.server.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be at least 1"));
        }
        let grace = self.server.shutdown_grace_seconds;
        if !(grace.is_finite() && grace >= 0.0) {
            return Err(invalid(
                "server.shutdown_grace_seconds",
                "must be seconds, 0 or more",
            ));
        }
        if self.realtime.max_message_bytes == 0 {
            return Err(invalid("realtime.max_message_bytes", "must be above 0"));
        }
        if self.server.max_body_bytes == 0 {
            return Err(invalid("server.max_body_bytes", "must be above 0"));
        }
        if self.server.max_body_memory < self.server.max_body_bytes {
            return Err(invalid(
                "server.max_body_memory",
                "must be at least server.max_body_bytes (one body of the largest size)",
            ));
        }
        let m = &self.monitoring;
        let windows = std::iter::once(&m.stats_window_minutes).chain(&m.additional_windows);
        if windows.clone().any(|w| !(1..=60).contains(w)) {
            return Err(invalid(
                "monitoring",
                "stats windows are whole minutes from 1 to 60",
            ));
        }
        for (i, key) in self.auth.api_keys.iter().enumerate() {
            if key.is_empty() {
                return Err(invalid(format!("auth.api_keys[{i}]"), "is empty"));
            }
        }
        Ok(())
    }
}

/// One instance's first problem; `seen` holds the names of the instances before it.
fn check_instance<'a>(
    i: usize,
    inst: &'a Instance,
    seen: &mut std::collections::HashSet<&'a str>,
) -> Result<(), Invalid> {
    let at = |key: &str| format!("instances[{i}].{key}");
    if inst.name.trim().is_empty() {
        return Err(invalid(at("name"), "is empty"));
    }
    if !seen.insert(inst.name.as_str()) {
        return Err(invalid(
            at("name"),
            format!("duplicate instance name {:?}", inst.name),
        ));
    }
    match &inst.credential {
        None if inst.api_key.is_empty() => {
            return Err(invalid(
                at("api_key"),
                "is empty (or give the instance a credential: instead)",
            ))
        }
        None => {}
        Some(_) if !inst.api_key.is_empty() => {
            return Err(invalid(
                at("credential"),
                "an instance has an api_key or a credential, not both",
            ))
        }
        Some(_) if inst.provider_type != Provider::Azure => {
            return Err(invalid(
                at("credential"),
                "Microsoft Entra ID credentials are for provider_type azure",
            ))
        }
        Some(c) => c
            .check()
            .map_err(|(field, m)| invalid(at(&format!("credential.{field}")), m))?,
    }
    check_url(&inst.api_base).map_err(|m| invalid(at("api_base"), m))?;
    if inst.provider_type == Provider::Azure && inst.api_version.trim().is_empty() {
        return Err(invalid(
            at("api_version"),
            "is required for provider_type azure",
        ));
    }
    if inst.weight == 0 {
        return Err(invalid(at("weight"), "must be at least 1"));
    }
    if inst.max_tpm == Some(0) {
        return Err(invalid(
            at("max_tpm"),
            "must be above 0 (leave it out for no limit)",
        ));
    }
    if inst.max_rpm == Some(0) {
        return Err(invalid(
            at("max_rpm"),
            "must be above 0 (leave it out for no limit)",
        ));
    }
    if !inst.serves_any_model && inst.models().next().is_none() {
        return Err(invalid(
            at("supported_models"),
            "the instance serves no model: list models in supported_models or model_deployments",
        ));
    }
    if let Some(m) = inst.supported_models.iter().find(|m| m.trim().is_empty()) {
        return Err(invalid(
            at("supported_models"),
            format!("contains an empty model name {m:?}"),
        ));
    }
    if let Some((m, _)) = inst
        .model_deployments
        .iter()
        .find(|(_, d)| d.trim().is_empty())
    {
        return Err(invalid(
            at("model_deployments"),
            format!("model {m:?} maps to an empty deployment"),
        ));
    }
    Ok(())
}

/// A base URL the proxy can call: http(s), a host, no query or fragment. The messages
/// do not quote the URL: a key pasted here by mistake must not be printed.
fn check_url(url: &str) -> Result<(), &'static str> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or("is not an http:// or https:// URL")?;
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() || host.starts_with(':') {
        return Err("has no host");
    }
    if rest.contains(['?', '#', ' ']) {
        return Err("must not contain a query, fragment or space");
    }
    Ok(())
}

/// Why a build without the `redis` feature refuses a configuration with `redis:`.
#[cfg(not(feature = "redis"))]
pub const NO_REDIS: &str = "this build has no Redis support: rebuild with the default features";

/// The `redis:` section still parses in a build without Redis support, so that a
/// configuration written for a full build is refused with the fix, not taken without
/// its shared state.
#[cfg(not(feature = "redis"))]
fn check_redis(_: &Redis) -> Result<(), Invalid> {
    Err(invalid("redis", NO_REDIS))
}

/// A Redis URL the shared state can use, and its CA file. The messages do not quote
/// the URL: it may hold a password.
#[cfg(feature = "redis")]
fn check_redis(redis: &Redis) -> Result<(), Invalid> {
    let url = redis.url.expose();
    let tls = url.starts_with("rediss://");
    let rest = url
        .strip_prefix("redis://")
        .or_else(|| url.strip_prefix("rediss://"))
        .ok_or_else(|| invalid("redis.url", "is not a redis:// or rediss:// URL"))?;
    if rest.contains('#') {
        return Err(invalid(
            "redis.url",
            "must not end in a #fragment (#insecure is not supported: certificates are always checked)",
        ));
    }
    let host = rest.rsplit('@').next().unwrap_or("");
    if host.is_empty() || host.starts_with([':', '/']) {
        return Err(invalid("redis.url", "has no host"));
    }
    if redis::Client::open(url).is_err() {
        return Err(invalid("redis.url", "is not a valid Redis URL"));
    }
    if !(1..=10_000).contains(&redis.timeout_ms) {
        return Err(invalid(
            "redis.timeout_ms",
            "must be milliseconds from 1 to 10000",
        ));
    }
    if redis.prefix.as_ref().is_some_and(|p| p.trim().is_empty()) {
        return Err(invalid("redis.prefix", "is empty"));
    }
    if let Some(file) = &redis.ca_file {
        if !tls {
            return Err(invalid("redis.ca_file", "needs a rediss:// URL"));
        }
        let pem = std::fs::read(file)
            .map_err(|e| invalid("redis.ca_file", format!("cannot be read: {e}")))?;
        if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
            return Err(invalid(
                "redis.ca_file",
                "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[cfg(not(feature = "redis"))]
    #[test]
    fn a_build_without_redis_refuses_the_redis_section_with_the_fix() {
        let e = check_redis(&Redis {
            url: Secret::new("redis://127.0.0.1:6379/0"),
            ca_file: None,
            prefix: None,
            timeout_ms: 200,
        })
        .unwrap_err();
        assert_eq!((e.path.as_str(), e.message.as_str()), ("redis", NO_REDIS));
    }

    #[cfg(feature = "redis")]
    #[test]
    fn redis_urls_are_checked_without_being_quoted() {
        let check = |url: &str, ca_file: Option<&str>| {
            check_redis(&Redis {
                url: Secret::new(url),
                ca_file: ca_file.map(str::to_string),
                timeout_ms: 50,
                prefix: None,
            })
        };
        assert!(check("redis://127.0.0.1:6379/0", None).is_ok());
        assert!(check("redis://:s3cret@cache.internal:6380/2", None).is_ok());
        assert!(check("rediss://:s3cret@cache.redis.cache.windows.net:6380", None).is_ok());
        for bad in [
            "http://:s3cret@cache",
            "redis://",
            "redis://:s3cret@",
            "rediss://:s3cret@cache:6380/#insecure",
        ] {
            let e = check(bad, None).unwrap_err();
            assert_eq!(e.path, "redis.url", "{bad}");
            assert!(!e.message.contains("s3cret"), "{}", e.message);
        }
        let dir = crate::testutil::TempDir::new("redis-ca");
        let (pem, other) = (dir.0.join("ca.pem"), dir.0.join("other.txt"));
        std::fs::write(&pem, "-----BEGIN CERTIFICATE-----\nMIIB\n").unwrap();
        std::fs::write(&other, "not a certificate").unwrap();
        let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
        assert!(check("rediss://cache:6380", Some(&path(&pem))).is_ok());
        for (url, file) in [
            ("redis://cache:6379", path(&pem)),
            ("rediss://cache:6380", path(&other)),
            ("rediss://cache:6380", path(&dir.0.join("missing.pem"))),
        ] {
            let e = check(url, Some(&file)).unwrap_err();
            assert_eq!(e.path, "redis.ca_file", "{url} {file}: {}", e.message);
        }
    }

    #[test]
    fn urls_are_checked() {
        assert!(check_url("https://east.openai.azure.com").is_ok());
        assert!(check_url("http://127.0.0.1:8080/prefix").is_ok());
        assert!(check_url("east.openai.azure.com").is_err());
        assert!(check_url("https://").is_err());
        assert!(check_url("https://x.com/?a=b").is_err());
    }
}
