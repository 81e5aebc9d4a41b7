//! What every request shares (DESIGN §2): the configuration generation in force and
//! what is built from it (`Generation`), and what outlives a reload (`State`): the
//! instance table, the statistics, the capacity bounds. Reloading swaps the generation.
//! Handlers and the HTTP layer read this module; it imports none of them.

use crate::capacity::{BodyMemory, Permits};
use crate::config::{Config, ConfigError, Source};
use crate::credential::Credentials;
use crate::error::Error;
use crate::key_failures::KeyFailures;
use crate::observe::alerts::Alerts;
use crate::observe::stats::Stats;
use crate::routing::affinity::Affinity;
use crate::routing::clients::Clients;
use crate::routing::table::Table;
use crate::routing::States;
use crate::shared::Shared;
use crate::upstream::websocket::Sessions;
use crate::upstream::{self, Address};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What one configuration brings: replaced whole by a reload, while requests that
/// started on the old one finish with it.
pub struct Generation {
    pub config: Arc<Config>,
    pub agent: ureq::Agent,
    /// How to address each instance, by its index in `config.instances`.
    pub addresses: Vec<Address>,
    /// Every model some instance names, sorted, once each: `/v1/models` lists them,
    /// a 404 names them, and statistics label only these.
    pub models: Vec<String>,
    /// Shared with the generation before when its settings did not change, so that a
    /// reload forgets neither which alerts were just sent nor the pooled connections.
    pub alerts: Arc<Alerts>,
}

impl Generation {
    /// The generation for `config`, taking over what it can from `previous`, and the
    /// tokens of the credentials that `credentials` already has.
    fn new(config: Config, previous: Option<&Generation>, credentials: &Credentials) -> Generation {
        let agent = match previous {
            Some(p) if same_agent(&p.config, &config) => p.agent.clone(),
            _ => upstream::agent(&config.routing, config.server.workers),
        };
        let alerts = match previous {
            Some(p)
                if p.config.name == config.name
                    && p.config.logging.feishu_webhook == config.logging.feishu_webhook =>
            {
                p.alerts.clone()
            }
            _ => Arc::new(match &config.logging.feishu_webhook {
                Some(hook) => Alerts::to_webhook(hook, &config.name),
                None => Alerts::disabled(&config.name),
            }),
        };
        Generation {
            agent,
            addresses: addresses(&config, credentials, &alerts),
            models: {
                let mut models: Vec<String> = config
                    .instances
                    .iter()
                    .flat_map(|i| i.models())
                    .map(str::to_string)
                    .collect();
                models.sort_unstable();
                models.dedup();
                models
            },
            alerts,
            config: Arc::new(config),
        }
    }
}

impl Generation {
    /// `candidates` without the instances whose credential has no token now; when
    /// that leaves none, 503 (the refresher has logged and alerted why).
    pub fn with_token(&self, candidates: Vec<usize>, model: &str) -> Result<Vec<usize>, Error> {
        let before = candidates.len();
        let kept: Vec<usize> = candidates
            .into_iter()
            .filter(|&i| self.addresses[i].usable())
            .collect();
        if kept.is_empty() && before > 0 {
            return Err(Error::AllDown {
                model: model.into(),
                wait: Duration::from_secs(1),
            });
        }
        Ok(kept)
    }
}

/// Each instance's address; an instance with a `credential` reads the tokens of that
/// credential's cache, shared by the instances with the same one.
fn addresses(config: &Config, credentials: &Credentials, alerts: &Arc<Alerts>) -> Vec<Address> {
    let instances = &config.instances;
    instances
        .iter()
        .map(|inst| {
            let address = Address::new(inst);
            let Some(credential) = &inst.credential else {
                return address;
            };
            let users: Vec<&str> = instances
                .iter()
                .filter(|other| other.credential.as_ref() == Some(credential))
                .map(|other| other.name.as_str())
                .collect();
            address.with_token(credentials.get(credential, users.join(", "), alerts))
        })
        .collect()
}

/// Whether two configurations build the same upstream agent.
fn same_agent(a: &Config, b: &Config) -> bool {
    let (x, y) = (&a.routing, &b.routing);
    (x.connect_timeout, x.timeout, x.first_byte_timeout)
        == (y.connect_timeout, y.timeout, y.first_byte_timeout)
        && a.server.workers == b.server.workers
}

/// What outlives a reload and every request shares.
pub struct State {
    current: parking_lot::RwLock<Arc<Generation>>,
    /// The Entra ID token caches, kept across reloads.
    credentials: Credentials,
    /// Runtime state of every instance, by name.
    pub table: parking_lot::Mutex<Table>,
    /// Named clients' own windows and day, by name.
    pub clients: parking_lot::Mutex<Clients>,
    /// Which instance made each Responses API answer.
    pub affinity: parking_lot::Mutex<Affinity>,
    /// The state shared with other proxies, when `redis` is configured (read at start).
    pub shared: Option<Arc<Shared>>,
    pub stats: parking_lot::Mutex<Stats>,
    /// `server.workers`: upstream calls under way at once.
    pub permits: Arc<Permits>,
    /// `server.max_body_memory`: request body bytes held at once.
    pub bodies: BodyMemory,
    /// The 401s given, and the client addresses answered 429 after too many.
    pub key_failures: KeyFailures,
    pub started: Instant,
    /// The Realtime API sessions open (`server.max_realtime_sessions`).
    pub realtime: Sessions,
    /// Set on SIGTERM: `/health` answers 503 from then on.
    pub draining: AtomicBool,
    /// Client connections open, once the server runs.
    pub connections: std::sync::OnceLock<http1_server::ConnectionCount>,
    source: Source,
    /// Held through a reload, so that two at once take turns: the later reads the
    /// files after the earlier has swapped its configuration in.
    reloading: parking_lot::Mutex<()>,
    /// The configuration at start: the settings read only then stay in force from it.
    at_start: Config,
    next_id: AtomicU64,
}

impl State {
    pub fn new(config: Config, source: Source) -> State {
        let at_start = config.clone();
        let credentials = Credentials::default();
        let generation = Generation::new(config, None, &credentials);
        let config = generation.config.clone();
        let shared = config
            .redis
            .as_ref()
            .and_then(|r| Shared::start(r, &config.name, &generation.alerts));
        if config.redis.is_none()
            && config
                .auth
                .clients
                .iter()
                .any(|c| c.tokens_per_day.is_some())
        {
            log::warn!(
                "clients' tokens_per_day are counted by this process only, without redis: a restart starts the day's count afresh"
            );
        }
        State {
            credentials,
            shared,
            permits: Permits::new(config.server.workers),
            bodies: BodyMemory::new(config.server.max_body_memory),
            key_failures: KeyFailures::default(),
            table: parking_lot::Mutex::new(Table::new(&config)),
            clients: parking_lot::Mutex::new(Clients::new(&config)),
            affinity: parking_lot::Mutex::new(Affinity::default()),
            current: parking_lot::RwLock::new(Arc::new(generation)),
            stats: parking_lot::Mutex::new(Stats::new()),
            started: Instant::now(),
            realtime: Sessions::default(),
            draining: AtomicBool::new(false),
            connections: std::sync::OnceLock::new(),
            source,
            reloading: parking_lot::Mutex::new(()),
            at_start,
            next_id: AtomicU64::new(1),
        }
    }

    /// The instance table and the shared state, for routing.
    pub fn states(&self) -> States<'_> {
        States {
            table: &self.table,
            shared: self.shared.as_deref(),
        }
    }

    /// Remembers that `instance` (of generation `g`) made Responses API response `id`
    /// for `model`, here and, with `redis`, for the fleet.
    pub fn remember_response(&self, g: &Generation, id: &str, instance: &str, model: &str) {
        self.affinity
            .lock()
            .remember(id, instance, model, Instant::now());
        if let Some(shared) = &self.shared {
            shared.remember(
                &g.alerts,
                id,
                instance,
                model,
                crate::routing::affinity::TTL,
            );
        }
    }

    /// `local` without `redis`; else `shared`, or `degraded` while Redis does not answer.
    pub fn shared_state(&self) -> &'static str {
        self.shared.as_ref().map_or("local", |s| s.state())
    }

    /// The statistics clock: whole seconds since start.
    pub fn uptime_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// A new request's id, for the access log and `x-proxy-request-id`.
    pub fn next_request_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The configuration generation new requests use.
    pub fn current(&self) -> Arc<Generation> {
        self.current.read().clone()
    }

    /// Reads the configuration again and, if it is valid, swaps it in: requests under
    /// way finish on the old one; instance state carries over by name. Settings that
    /// only apply at start are reported in `restart_needed`, not applied.
    pub fn reload(&self) -> Result<Reloaded, ConfigError> {
        let _turn = self.reloading.lock();
        let old = self.current();
        let loaded = match self.source.load() {
            Ok(l) => l,
            Err(e) => {
                let message = format!("configuration reload failed, keeping the running one: {e}");
                old.alerts.error("reload", &message);
                return Err(e);
            }
        };
        let crate::config::Loaded {
            config: mut new,
            warnings,
            ..
        } = loaded;
        // Against what runs (the start's values), not the last file: a change reported
        // once is still pending at the next reload.
        let restart_needed = keep_start_only(&self.at_start, &mut new);
        if new.logging.level != old.config.logging.level {
            crate::observe::logging::set_level(&new.logging.level);
        }
        let instances = new.instances.iter().map(|i| i.name.clone()).collect();
        let generation = Generation::new(new, Some(&old), &self.credentials);
        self.table.lock().update(&generation.config);
        self.clients.lock().update(&generation.config);
        self.stats
            .lock()
            .forget_clients(&generation.config.auth.clients);
        *self.current.write() = Arc::new(generation);
        let from = match &self.source.dir {
            Some(dir) => dir.display().to_string(),
            None => "environment variables (--env-only)".to_string(),
        };
        let env_reread: Vec<String> = self
            .source
            .env_file
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        log::info!(
            "configuration reloaded from {from}; environment variables re-read from: {}",
            if env_reread.is_empty() {
                "none (the process environment is the one it started with)".to_string()
            } else {
                env_reread.join(", ")
            }
        );
        for warning in &warnings {
            log::warn!("{warning}");
        }
        if !restart_needed.is_empty() {
            log::warn!(
                "reload: {} changed; that takes a restart",
                restart_needed.join(", ")
            );
        }
        Ok(Reloaded {
            instances,
            restart_needed,
            env_reread,
        })
    }
}

/// Puts back in `new` the settings read only at start, so that the generation (and
/// `GET /config`) says what is in force, and names those the files changed (for
/// `restart_needed`). Everything else a reload applies: instances, routing, auth,
/// monitoring, `logging.level` and `feishu_webhook`, `server.max_body_bytes` and
/// `server.shutdown_grace_seconds`.
fn keep_start_only(start: &Config, new: &mut Config) -> Vec<&'static str> {
    fn keep<T: PartialEq + Clone>(
        changed: &mut Vec<&'static str>,
        name: &'static str,
        start: &T,
        new: &mut T,
    ) {
        if start != new {
            changed.push(name);
            new.clone_from(start);
        }
    }
    let mut changed = Vec::new();
    if (&start.host, start.port) != (&new.host, new.port) {
        changed.push("host/port");
        (new.host, new.port) = (start.host.clone(), start.port);
    }
    let (s, n) = (&start.server, &mut new.server);
    keep(&mut changed, "server.workers", &s.workers, &mut n.workers);
    keep(
        &mut changed,
        "server.max_connections",
        &s.max_connections,
        &mut n.max_connections,
    );
    keep(
        &mut changed,
        "server.max_connections_per_ip",
        &s.max_connections_per_ip,
        &mut n.max_connections_per_ip,
    );
    keep(
        &mut changed,
        "server.max_body_memory",
        &s.max_body_memory,
        &mut n.max_body_memory,
    );
    keep(
        &mut changed,
        "server.client_timeout",
        &s.client_timeout,
        &mut n.client_timeout,
    );
    keep(
        &mut changed,
        "server.body_timeout",
        &s.body_timeout,
        &mut n.body_timeout,
    );
    let (s, n) = (&start.logging, &mut new.logging);
    keep(&mut changed, "logging.file", &s.file, &mut n.file);
    keep(
        &mut changed,
        "logging.max_size",
        &s.max_size,
        &mut n.max_size,
    );
    keep(
        &mut changed,
        "logging.backup_count",
        &s.backup_count,
        &mut n.backup_count,
    );
    keep(&mut changed, "redis", &start.redis, &mut new.redis);
    changed
}

/// What a successful reload did.
#[derive(Debug)]
pub struct Reloaded {
    pub instances: Vec<String>,
    /// Changed settings that apply only at start.
    pub restart_needed: Vec<&'static str>,
    /// The `--env-file` read again (none without one: the process environment cannot
    /// change, so a reload sees the variables it started with).
    pub env_reread: Vec<String>,
}
