//! The typed configuration (DESIGN §4), its defaults, the `Secret` type that can only
//! print a mask, and the lenient readers of values that `${VAR}` made strings; the
//! checks serde cannot express are in `validate`, the named clients in `clients`.

use super::clients::Client;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// A credential. `Debug`, `Display` and `Serialize` print a mask, so no log line or
/// config dump can show it by accident; only `expose()` gives the value, and only the
/// code that puts it on the wire should call it.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Secret(String);

pub const MASK: &str = "***redacted***";

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(MASK)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        lenient_string(d).map(Secret)
    }
}

/// A scalar written as a number or as a string. `${VAR}` substitution and the legacy
/// environment variables always produce strings, so `max_tpm: ${TPM:-1000}` must parse.
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "a single value (a string or a number), not a list or a map"
)]
enum Scalar {
    Str(String),
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
}

impl Scalar {
    fn into_string(self) -> String {
        match self {
            Scalar::Str(s) => s,
            Scalar::U64(n) => n.to_string(),
            Scalar::I64(n) => n.to_string(),
            Scalar::F64(n) => n.to_string(),
            Scalar::Bool(b) => b.to_string(),
        }
    }
}

pub(super) fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Scalar::deserialize(d).map(Scalar::into_string)
}

fn lenient<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    let text = lenient_string(d)?;
    // The value is not quoted back: a key pasted into the wrong field must not be printed.
    text.trim()
        .parse()
        .map_err(|e| serde::de::Error::custom(format!("is not a valid number ({e})")))
}

pub(super) fn lenient_opt<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    lenient(d).map(Some)
}

/// A byte size: a plain number of bytes, or a number with a unit (`10MB`, `512 KiB`).
fn byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let text = lenient_string(d)?;
    parse_byte_size(&text).ok_or_else(|| {
        serde::de::Error::custom(
            "is not a size (write bytes, or a number with KB, MB, GB, KiB, MiB, GiB)",
        )
    })
}

pub fn parse_byte_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        _ => return None,
    };
    Some((num * mult as f64) as u64)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_name", deserialize_with = "lenient_string")]
    pub name: String,
    #[serde(default = "default_version", deserialize_with = "lenient_string")]
    pub version: String,
    #[serde(default = "default_port", deserialize_with = "lenient")]
    pub port: u16,
    #[serde(default = "default_host", deserialize_with = "lenient_string")]
    pub host: String,
    #[serde(default)]
    pub routing: Routing,
    #[serde(default)]
    pub logging: Logging,
    #[serde(default)]
    pub monitoring: Monitoring,
    #[serde(default)]
    pub server: Server,
    #[serde(default)]
    pub auth: Auth,
    #[serde(default)]
    pub instances: Vec<Instance>,
    /// Realtime API sessions (WebSocket): their bounds.
    #[serde(default)]
    pub realtime: Realtime,
    /// Several proxies on one quota share their instances' state here (`shared.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<Redis>,
}

fn default_name() -> String {
    "azure-openai-proxy".into()
}
/// None set: empty, so that nothing passes the binary's version off as the
/// configuration's.
fn default_version() -> String {
    String::new()
}
fn default_port() -> u16 {
    3010
}
fn default_host() -> String {
    "0.0.0.0".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    #[default]
    Failover,
    Weighted,
    RoundRobin,
    LeastLoaded,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Routing {
    pub strategy: Strategy,
    /// Further attempts after the first, each on an instance not yet tried.
    #[serde(deserialize_with = "lenient")]
    pub retries: u32,
    /// Seconds a non-streamed request may wait for its answer's head (a long generation
    /// sends nothing until it is done: the OpenAI SDK waits 600 s), and the longest gap
    /// between two reads of an answer once it has begun.
    #[serde(deserialize_with = "lenient")]
    pub timeout: f64,
    /// Seconds from sending a streamed request to its answer's head and first event. A
    /// stream that misses it is retried on another instance. Fixed, not `timeout`: a
    /// hung instance must be found in the time a stream takes to start, however long
    /// the answers it is asked for.
    #[serde(deserialize_with = "lenient")]
    pub first_byte_timeout: f64,
    /// Whether a request that was sent and then timed out is tried on another instance.
    /// Off: the first instance may still be generating it, and it would be generated
    /// (and billed) twice.
    #[serde(deserialize_with = "lenient")]
    pub retry_timeouts: bool,
    /// Seconds to establish a connection (TCP + TLS) to an upstream.
    #[serde(deserialize_with = "lenient")]
    pub connect_timeout: f64,
    /// Seconds a request may wait for TPM/RPM room before it is answered 429.
    #[serde(deserialize_with = "lenient")]
    pub queue_timeout: f64,
    /// Completion tokens reserved when a request sets no `max_tokens`.
    #[serde(deserialize_with = "lenient")]
    pub default_completion_tokens: u64,
    /// Failures that open a circuit: this many in a row, or this many in the last
    /// minute when they are also at least `circuit_failure_rate` of its attempts.
    #[serde(deserialize_with = "lenient")]
    pub circuit_failures: u32,
    #[serde(deserialize_with = "lenient")]
    pub circuit_failure_rate: f64,
    /// Seconds a circuit first stays open; doubles on each failed trial.
    #[serde(deserialize_with = "lenient")]
    pub circuit_open_seconds: f64,
    #[serde(deserialize_with = "lenient")]
    pub circuit_max_open_seconds: f64,
    /// The longest cooldown an upstream's 429 can impose, in seconds.
    #[serde(deserialize_with = "lenient")]
    pub max_cooldown: f64,
}

impl Default for Routing {
    fn default() -> Self {
        Routing {
            strategy: Strategy::Failover,
            retries: 3,
            timeout: 600.0,
            first_byte_timeout: 60.0,
            retry_timeouts: false,
            connect_timeout: 10.0,
            queue_timeout: 1.0,
            default_completion_tokens: 1024,
            circuit_failures: 3,
            circuit_failure_rate: 0.5,
            circuit_open_seconds: 5.0,
            circuit_max_open_seconds: 300.0,
            max_cooldown: 300.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Logging {
    #[serde(deserialize_with = "lenient_string")]
    pub level: String,
    pub file: Option<String>,
    #[serde(deserialize_with = "byte_size")]
    pub max_size: u64,
    #[serde(deserialize_with = "lenient")]
    pub backup_count: u32,
    pub feishu_webhook: Option<Secret>,
}

impl Default for Logging {
    fn default() -> Self {
        Logging {
            level: "info".into(),
            file: None,
            max_size: 10 * 1024 * 1024,
            backup_count: 5,
            feishu_webhook: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Monitoring {
    #[serde(deserialize_with = "lenient")]
    pub stats_window_minutes: u32,
    pub additional_windows: Vec<u32>,
}

impl Default for Monitoring {
    fn default() -> Self {
        Monitoring {
            stats_window_minutes: 5,
            additional_windows: vec![15, 30, 60],
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    /// Worker threads; a streaming request holds one until its stream ends.
    #[serde(deserialize_with = "lenient")]
    pub workers: usize,
    #[serde(deserialize_with = "byte_size")]
    pub max_body_bytes: u64,
    /// Bytes of request bodies the whole process may hold at once.
    #[serde(deserialize_with = "byte_size")]
    pub max_body_memory: u64,
    /// Seconds SIGTERM/SIGINT waits for requests under way (streams included).
    #[serde(deserialize_with = "lenient")]
    pub shutdown_grace_seconds: f64,
    /// Seconds a client connection may stall while its request is read or its answer
    /// written; idle keep-alive connections close after it too.
    #[serde(deserialize_with = "lenient")]
    pub client_timeout: f64,
    /// Seconds a request body may take to arrive in all, however it trickles.
    #[serde(deserialize_with = "lenient")]
    pub body_timeout: f64,
    /// Client connections open at once (each has a thread); when full, idle ones are
    /// closed first.
    #[serde(deserialize_with = "lenient")]
    pub max_connections: usize,
    /// Client connections open at once from one address (an IPv6 address counts by its
    /// /64); unset: half of `max_connections`; 0: no limit (behind a reverse proxy,
    /// every client has its address).
    #[serde(deserialize_with = "lenient_opt")]
    pub max_connections_per_ip: Option<usize>,
    /// Origins whose browsers may call the API (CORS): `OPTIONS` preflights and answers
    /// to them carry `Access-Control-Allow-Origin`. `"*"` allows any. Empty: none.
    pub cors_origins: Vec<String>,
    /// Realtime API sessions open at once: each holds its connection's thread and one
    /// more for as long as it lasts (minutes). Sessions count in `max_connections` too.
    #[serde(deserialize_with = "lenient")]
    pub max_realtime_sessions: usize,
}

impl Server {
    /// `max_connections_per_ip` as the server takes it (0: no limit).
    pub fn connections_per_ip(&self) -> usize {
        self.max_connections_per_ip
            .unwrap_or(self.max_connections.div_ceil(2))
    }
}

impl Default for Server {
    fn default() -> Self {
        Server {
            workers: 256,
            max_body_bytes: 32 * 1024 * 1024,
            max_body_memory: 256 * 1024 * 1024,
            shutdown_grace_seconds: 30.0,
            client_timeout: 30.0,
            body_timeout: 60.0,
            max_connections: 4096,
            max_connections_per_ip: None,
            cors_origins: Vec::new(),
            max_realtime_sessions: 100,
        }
    }
}

/// The bounds of one Realtime API session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Realtime {
    /// The largest message either side may send; a larger one closes the session with
    /// 1009. The default takes the largest audio chunk the API accepts in one
    /// `input_audio_buffer.append` (15 MiB) with its JSON around it.
    #[serde(deserialize_with = "byte_size")]
    pub max_message_bytes: u64,
    /// Seconds without a message either way before the session is closed (1001).
    #[serde(deserialize_with = "lenient")]
    pub idle_timeout: f64,
    /// Seconds a session may last in all before it is closed (1001).
    #[serde(deserialize_with = "lenient")]
    pub max_session_seconds: f64,
}

impl Default for Realtime {
    fn default() -> Self {
        Realtime {
            max_message_bytes: 16 * 1024 * 1024,
            idle_timeout: 600.0,
            max_session_seconds: 3600.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    pub api_keys: Vec<Secret>,
    pub admin_key: Option<Secret>,
    /// Wrong or missing keys one client address may present within
    /// `failure_window_seconds` before it is answered 429 for `failure_block_seconds`
    /// (`http::key_failures`); 0 turns the slowing off (the failures are still counted).
    #[serde(deserialize_with = "lenient")]
    pub max_failures: u32,
    #[serde(deserialize_with = "lenient")]
    pub failure_window_seconds: f64,
    #[serde(deserialize_with = "lenient")]
    pub failure_block_seconds: f64,
    /// Named clients (DESIGN §5.6): each known by its key, with its own limits, day
    /// budget and models.
    pub clients: Vec<Client>,
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            api_keys: Vec::new(),
            admin_key: None,
            max_failures: 20,
            failure_window_seconds: 10.0,
            failure_block_seconds: 60.0,
            clients: Vec::new(),
        }
    }
}

/// Where several proxies share windows, cooldowns, circuits and affinity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redis {
    /// `redis://[[user]:password@]host[:port][/db]`, or `rediss://` for TLS. A
    /// `Secret`, since it may carry the password: `/config` and the log show only the mask.
    pub url: Secret,
    /// With `rediss://`: a PEM file of the CA that signed the server's certificate, in
    /// place of the Mozilla roots compiled in (which a private CA is not among).
    #[serde(default, deserialize_with = "lenient_opt")]
    pub ca_file: Option<String>,
    /// Milliseconds a connect or an answer may take before the proxy goes on with its
    /// own state alone.
    #[serde(default = "default_redis_timeout", deserialize_with = "lenient")]
    pub timeout_ms: u64,
    /// Starts every key, so that several fleets can share one Redis; default: `name`.
    #[serde(default, deserialize_with = "lenient_opt")]
    pub prefix: Option<String>,
}

fn default_redis_timeout() -> u64 {
    50
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    #[default]
    Azure,
    Openai,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    #[serde(deserialize_with = "lenient_string")]
    pub name: String,
    #[serde(default)]
    pub provider_type: Provider,
    /// Empty when the instance has a `credential`.
    #[serde(default)]
    pub api_key: Secret,
    /// Microsoft Entra ID in place of `api_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<super::Credential>,
    #[serde(deserialize_with = "lenient_string")]
    pub api_base: String,
    #[serde(default, deserialize_with = "lenient_string")]
    pub api_version: String,
    /// Lower is preferred by `failover`.
    #[serde(default = "default_priority", deserialize_with = "lenient")]
    pub priority: u32,
    #[serde(default = "default_weight", deserialize_with = "lenient")]
    pub weight: u32,
    /// Tokens per minute this instance may be sent; absent means no local limit.
    #[serde(default, deserialize_with = "lenient_opt")]
    pub max_tpm: Option<u64>,
    #[serde(default, deserialize_with = "lenient_opt")]
    pub max_rpm: Option<u64>,
    #[serde(default)]
    pub supported_models: Vec<String>,
    #[serde(default)]
    pub model_deployments: BTreeMap<String, String>,
    /// Only the legacy single instance (`API_KEY`/`API_BASE`) serves every model.
    #[serde(skip_deserializing, skip_serializing_if = "std::ops::Not::not")]
    pub serves_any_model: bool,
}

fn default_priority() -> u32 {
    100
}
fn default_weight() -> u32 {
    1
}

impl Instance {
    /// Exact matching only (DESIGN §4): no normalisation, no fallback to another model.
    pub fn serves(&self, model: &str) -> bool {
        self.serves_any_model
            || self.supported_models.iter().any(|m| m == model)
            || self.model_deployments.contains_key(model)
    }

    pub fn deployment<'a>(&'a self, model: &'a str) -> &'a str {
        self.model_deployments
            .get(model)
            .map(String::as_str)
            .unwrap_or(model)
    }

    /// Every model this instance names, in a stable order, without duplicates.
    pub fn models(&self) -> impl Iterator<Item = &str> {
        let extra = self
            .model_deployments
            .keys()
            .filter(|m| !self.supported_models.contains(m));
        self.supported_models
            .iter()
            .chain(extra)
            .map(String::as_str)
    }
}

pub const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// The level `name` means: one of `LOG_LEVELS` in any case, or a name of Python's
/// `logging` that the Python proxy's configurations use (`WARNING` is `warn`,
/// `CRITICAL` is `error`).
pub fn log_level(name: &str) -> Option<&'static str> {
    let lower = name.trim().to_ascii_lowercase();
    let canonical = match lower.as_str() {
        "warning" => "warn",
        "critical" => "error",
        other => other,
    };
    LOG_LEVELS.into_iter().find(|l| *l == canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints_its_value() {
        let s = Secret::new("sk-very-secret");
        assert_eq!(format!("{s} {s:?}"), format!("{MASK} {MASK}"));
        assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{MASK}\""));
        assert_eq!(s.expose(), "sk-very-secret");
    }

    #[cfg(feature = "redis")]
    #[test]
    fn byte_sizes_with_and_without_units() {
        assert_eq!(parse_byte_size("1024"), Some(1024));
        assert_eq!(parse_byte_size("10MB"), Some(10_000_000));
        assert_eq!(parse_byte_size("32 MiB"), Some(32 << 20));
        assert_eq!(parse_byte_size("1.5kib"), Some(1536));
        assert_eq!(parse_byte_size("ten"), None);
        assert_eq!(parse_byte_size("10 parsecs"), None);
    }

    #[test]
    fn log_levels_in_any_case_and_pythons_names() {
        assert_eq!(log_level("INFO"), Some("info"));
        assert_eq!(log_level("WARNING"), Some("warn"));
        assert_eq!(log_level("warning"), Some("warn"));
        assert_eq!(log_level("Critical"), Some("error"));
        assert_eq!(log_level("Warn"), Some("warn"));
        assert_eq!(log_level("verbose"), None);
    }

    #[test]
    fn models_lists_both_sources_once() {
        let inst: Instance = serde_yaml::from_str(
            "{name: a, api_key: k, api_base: 'http://x', supported_models: [m1, m2],
              model_deployments: {m2: d2, m3: d3}}",
        )
        .unwrap();
        assert_eq!(inst.models().collect::<Vec<_>>(), ["m1", "m2", "m3"]);
        assert!(inst.serves("m3") && !inst.serves("M3") && !inst.serves("m"));
        assert_eq!(inst.deployment("m2"), "d2");
        assert_eq!(inst.deployment("m1"), "m1");
    }
}
