//! The typed configuration (DESIGN §4), its defaults, the `Secret` type that can only
//! print a mask, and the semantic checks that run after the YAML layers are merged.

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

fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
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

fn lenient_opt<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
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

/// One named client: who sends `key` (or a key whose SHA-256 is `key_sha256`), and
/// what it may use. Every limit is optional; none means only the instances' limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Client {
    #[serde(deserialize_with = "lenient_string")]
    pub name: String,
    #[serde(default)]
    pub key: Option<Secret>,
    /// Hex of the SHA-256 of the key, so that the file need not hold the key.
    #[serde(default, deserialize_with = "lenient_opt")]
    pub key_sha256: Option<String>,
    /// Tokens a minute (the admission estimate, as for instances).
    #[serde(default, deserialize_with = "lenient_opt")]
    pub tpm: Option<u64>,
    /// Requests a minute.
    #[serde(default, deserialize_with = "lenient_opt")]
    pub rpm: Option<u64>,
    /// Tokens (as the upstream reports them) per UTC day.
    #[serde(default, deserialize_with = "lenient_opt")]
    pub tokens_per_day: Option<u64>,
    /// The models it may use; absent: every model the proxy serves.
    #[serde(default)]
    pub models: Option<Vec<String>>,
}

impl Client {
    pub fn allows(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|models| models.iter().any(|m| m == model))
    }
}

/// Client names become Redis keys, metric labels and log words: kept to a plain set.
fn check_clients(auth: &Auth) -> Result<(), Invalid> {
    let mut names = std::collections::HashSet::new();
    let mut keys: std::collections::HashSet<&str> =
        auth.api_keys.iter().map(Secret::expose).collect();
    for (i, c) in auth.clients.iter().enumerate() {
        let at = |key: &str| format!("auth.clients[{i}].{key}");
        let plain = |ch: char| ch.is_ascii_alphanumeric() || "._-".contains(ch);
        if c.name.is_empty() || c.name.len() > 64 || !c.name.chars().all(plain) {
            return Err(invalid(
                at("name"),
                "must be 1 to 64 letters, digits, '.', '_' or '-'",
            ));
        }
        if !names.insert(c.name.as_str()) {
            return Err(invalid(
                at("name"),
                format!("duplicate client name {:?}", c.name),
            ));
        }
        match (&c.key, &c.key_sha256) {
            (Some(key), None) if key.is_empty() => return Err(invalid(at("key"), "is empty")),
            (Some(key), None) => {
                if !keys.insert(key.expose()) {
                    return Err(invalid(
                        at("key"),
                        "is also another client's key or one of auth.api_keys",
                    ));
                }
            }
            (None, Some(hex)) => {
                if hex.len() != 64 || !hex.chars().all(|ch| ch.is_ascii_hexdigit()) {
                    return Err(invalid(
                        at("key_sha256"),
                        "must be the 64 hex digits of the key's SHA-256",
                    ));
                }
            }
            _ => return Err(invalid(at("key"), "give exactly one of key and key_sha256")),
        }
        for (key, limit) in [
            ("tpm", c.tpm),
            ("rpm", c.rpm),
            ("tokens_per_day", c.tokens_per_day),
        ] {
            if limit == Some(0) {
                return Err(invalid(
                    at(key),
                    "must be above 0 (leave it out for no limit)",
                ));
            }
        }
        if let Some(m) = c.models.iter().flatten().find(|m| m.trim().is_empty()) {
            return Err(invalid(
                at("models"),
                format!("contains an empty model name {m:?}"),
            ));
        }
    }
    Ok(())
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

/// A semantic problem in the merged config, located by its key path.
#[derive(Debug, PartialEq)]
pub struct Invalid {
    pub path: String,
    pub message: String,
}

fn invalid(path: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        path: path.into(),
        message: message.into(),
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

impl Config {
    /// The checks serde's types cannot express. Returns the first problem found.
    pub fn validate(&self) -> Result<(), Invalid> {
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
        check_clients(&self.auth)?;
        if let Some(redis) = &self.redis {
            check_redis(redis)?;
        }
        let mut seen = std::collections::HashSet::new();
        for (i, inst) in self.instances.iter().enumerate() {
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
        }
        Ok(())
    }
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

    #[test]
    fn secret_never_prints_its_value() {
        let s = Secret::new("sk-very-secret");
        assert_eq!(format!("{s} {s:?}"), format!("{MASK} {MASK}"));
        assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{MASK}\""));
        assert_eq!(s.expose(), "sk-very-secret");
    }

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
    fn byte_sizes_with_and_without_units() {
        assert_eq!(parse_byte_size("1024"), Some(1024));
        assert_eq!(parse_byte_size("10MB"), Some(10_000_000));
        assert_eq!(parse_byte_size("32 MiB"), Some(32 << 20));
        assert_eq!(parse_byte_size("1.5kib"), Some(1536));
        assert_eq!(parse_byte_size("ten"), None);
        assert_eq!(parse_byte_size("10 parsecs"), None);
    }

    #[test]
    fn urls_are_checked() {
        assert!(check_url("https://east.openai.azure.com").is_ok());
        assert!(check_url("http://127.0.0.1:8080/prefix").is_ok());
        assert!(check_url("east.openai.azure.com").is_err());
        assert!(check_url("https://").is_err());
        assert!(check_url("https://x.com/?a=b").is_err());
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
