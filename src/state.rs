//! What every request shares (DESIGN §2): the configuration generation in force and
//! what is built from it (`Generation`), and what outlives a reload (`State`): the
//! instance table, the statistics, the capacity bounds. Reloading swaps the generation.
//! Handlers and the HTTP layer read this module; it imports none of them.

use crate::capacity::{BodyMemory, Permits};
use crate::config::{Config, Source};
use crate::observe::alerts::Alerts;
use crate::observe::stats::Stats;
use crate::routing::table::Table;
use crate::upstream::{self, Address};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// What one configuration brings: replaced whole by a reload, while requests that
/// started on the old one finish with it.
pub struct Generation {
    pub config: Arc<Config>,
    pub agent: ureq::Agent,
    /// How to address each instance, by its index in `config.instances`.
    pub addresses: Vec<Address>,
    /// Every model some instance names: statistics label only these.
    pub model_names: HashSet<String>,
    pub alerts: Alerts,
}

impl Generation {
    fn new(config: Config) -> Generation {
        Generation {
            agent: upstream::agent(&config.routing, config.server.workers),
            addresses: config.instances.iter().map(Address::new).collect(),
            model_names: config
                .instances
                .iter()
                .flat_map(|i| i.models())
                .map(str::to_string)
                .collect(),
            alerts: match &config.logging.feishu_webhook {
                Some(hook) => Alerts::to_webhook(hook, &config.name),
                None => Alerts::disabled(&config.name),
            },
            config: Arc::new(config),
        }
    }
}

/// What outlives a reload and every request shares.
pub struct State {
    current: parking_lot::RwLock<Arc<Generation>>,
    /// Runtime state of every instance, by name.
    pub table: parking_lot::Mutex<Table>,
    pub stats: parking_lot::Mutex<Stats>,
    /// `server.workers`: upstream calls under way at once.
    pub permits: Arc<Permits>,
    /// `server.max_body_memory`: request body bytes held at once.
    pub bodies: BodyMemory,
    pub started: Instant,
    /// Set on SIGTERM: `/health` answers 503 from then on.
    pub draining: AtomicBool,
    /// Client connections open, once the server runs.
    pub connections: std::sync::OnceLock<tiny_http::ConnectionCount>,
    source: Source,
    next_id: AtomicU64,
}

impl State {
    pub fn new(config: Config, source: Source) -> State {
        State {
            permits: Permits::new(config.server.workers),
            bodies: BodyMemory::new(config.server.max_body_memory),
            table: parking_lot::Mutex::new(Table::new(&config)),
            current: parking_lot::RwLock::new(Arc::new(Generation::new(config))),
            stats: parking_lot::Mutex::new(Stats::new()),
            started: Instant::now(),
            draining: AtomicBool::new(false),
            connections: std::sync::OnceLock::new(),
            source,
            next_id: AtomicU64::new(1),
        }
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
    /// only apply at start (listen address, worker count) are reported, not applied.
    pub fn reload(&self) -> Result<Reloaded, String> {
        let old = self.current();
        let loaded = match self.source.load() {
            Ok(l) => l,
            Err(e) => {
                let message = format!("configuration reload failed, keeping the running one: {e}");
                old.alerts.error("reload", &message);
                return Err(e.to_string());
            }
        };
        let new = loaded.config;
        let mut restart_needed = Vec::new();
        if (new.host.as_str(), new.port) != (old.config.host.as_str(), old.config.port) {
            restart_needed.push("host/port");
        }
        if new.server.workers != old.config.server.workers {
            restart_needed.push("server.workers");
        }
        if new.server.max_body_memory != old.config.server.max_body_memory {
            restart_needed.push("server.max_body_memory");
        }
        if new.server.max_connections != old.config.server.max_connections {
            restart_needed.push("server.max_connections");
        }
        let instances = new.instances.iter().map(|i| i.name.clone()).collect();
        let generation = Generation::new(new);
        self.table.lock().update(&generation.config);
        *self.current.write() = Arc::new(generation);
        log::info!("configuration reloaded from {}", self.source.dir.display());
        if !restart_needed.is_empty() {
            log::warn!(
                "reload: {} changed; that takes a restart",
                restart_needed.join(", ")
            );
        }
        Ok(Reloaded {
            instances,
            restart_needed,
        })
    }
}

/// What a successful reload did.
#[derive(Debug)]
pub struct Reloaded {
    pub instances: Vec<String>,
    /// Changed settings that apply only at start.
    pub restart_needed: Vec<&'static str>,
}
