//! The HTTP side: the tiny_http listener, the fixed pool of worker threads, the route
//! table, and writing a `Reply` (buffered, or relayed as a stream). A panic while
//! handling one request is contained to that request: it gets a 500 and the worker
//! lives on.

use crate::alerts::Alerts;
use crate::api::{self, Body, Reply};
use crate::auth;
use crate::config::{Config, Source};
use crate::error::ApiError;
use crate::instances::Table;
use crate::stats::{Record, Stats};
use crate::stream::{self, ClientStream, End};
use crate::upstream;
use crate::{admin, metrics};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tiny_http::{Header, Method, Request, Response};

/// What one configuration brings: replaced whole by a reload, while requests that
/// started on the old one finish with it.
pub struct Generation {
    pub config: Arc<Config>,
    pub agent: ureq::Agent,
    /// Every model some instance names: statistics label only these.
    pub model_names: HashSet<String>,
    pub alerts: Alerts,
}

impl Generation {
    fn new(config: Config) -> Generation {
        Generation {
            agent: upstream::agent(&config.routing, config.server.workers),
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

/// What outlives a reload and every worker shares.
pub struct State {
    current: parking_lot::RwLock<Arc<Generation>>,
    /// Runtime state of every instance, by name.
    pub table: parking_lot::Mutex<Table>,
    pub stats: parking_lot::Mutex<Stats>,
    pub started: Instant,
    source: Source,
    next_id: AtomicU64,
}

/// Turns one request into a reply; `route` in production, a stand-in in tests.
type Handler = fn(&State, &Generation, &mut Request, &Method, &str) -> Reply;

/// A running proxy: its listener and worker threads.
pub struct Proxy {
    server: Arc<tiny_http::Server>,
    state: Arc<State>,
    workers: Vec<JoinHandle<()>>,
    rotator: JoinHandle<()>,
    stop_tx: crossbeam_channel::Sender<()>,
    stopping: Arc<AtomicBool>,
    addr: SocketAddr,
}

impl State {
    fn new(config: Config, source: Source) -> State {
        State {
            current: parking_lot::RwLock::new(Arc::new(Generation::new(config))),
            table: parking_lot::Mutex::new(Table::new()),
            stats: parking_lot::Mutex::new(Stats::new()),
            started: Instant::now(),
            source,
            next_id: AtomicU64::new(1),
        }
    }

    /// The statistics clock: whole seconds since start.
    pub fn uptime_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
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
        let instances = new.instances.iter().map(|i| i.name.clone()).collect();
        let generation = Generation::new(new);
        self.table.lock().retain(&generation.config);
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

impl Proxy {
    /// Binds `host:port` (port 0 picks a free one) and starts `server.workers` workers.
    pub fn start(config: Config, source: Source) -> Result<Proxy, String> {
        let bind = format!("{}:{}", config.host, config.port);
        let server = listen(&bind, Duration::from_secs_f64(config.server.client_timeout))
            .map_err(|e| format!("cannot listen on {bind}: {e}"))?;
        let addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| format!("{bind} is not an IP address"))?;
        let server = Arc::new(server);
        let workers_wanted = config.server.workers;
        let state = Arc::new(State::new(config, source));
        let stopping = Arc::new(AtomicBool::new(false));
        let workers = (0..workers_wanted)
            .map(|n| {
                let (server, state, stopping) = (server.clone(), state.clone(), stopping.clone());
                std::thread::Builder::new()
                    .name(format!("worker-{n}"))
                    .spawn(move || work(&server, &state, &stopping, route))
                    .map_err(|e| format!("cannot start worker thread: {e}"))
            })
            .collect::<Result<_, _>>()?;
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let rotator = {
            let state = state.clone();
            std::thread::Builder::new()
                .name("stats-rotation".into())
                .spawn(move || {
                    // Wakes each second; ends when `stop` drops the sender.
                    while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                        stop_rx.recv_timeout(Duration::from_secs(1))
                    {
                        state.stats.lock().rotate(state.uptime_secs());
                    }
                })
                .map_err(|e| format!("cannot start the stats thread: {e}"))?
        };
        Ok(Proxy {
            server,
            state,
            workers,
            rotator,
            stop_tx,
            stopping,
            addr,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Blocks until the workers end (they do not, unless stopped).
    pub fn wait(self) {
        for w in self.workers {
            let _ = w.join();
        }
    }

    /// Re-reads the configuration (see `State::reload`).
    pub fn reload(&self) -> Result<Reloaded, String> {
        self.state.reload()
    }

    /// Stops taking requests and waits up to `grace` for those under way (streams
    /// included) to finish. Returns whether they all did.
    pub fn shutdown(self, grace: Duration) -> bool {
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
        std::thread::spawn(move || {
            self.stop();
            let _ = done_tx.send(());
        });
        done_rx.recv_timeout(grace).is_ok()
    }

    /// Stops taking requests; each worker ends after its current request.
    pub fn stop(self) {
        self.stopping.store(true, Ordering::SeqCst);
        for _ in &self.workers {
            self.server.unblock();
        }
        drop(self.stop_tx);
        let _ = self.rotator.join();
        for w in self.workers {
            let _ = w.join();
        }
    }
}

/// Binds `bind` with read and write timeouts that every accepted connection inherits.
/// tiny_http has none of its own: without them a client that stalls holds one of its
/// connection threads forever, and new connections can wait behind such threads.
fn listen(
    bind: &str,
    client_timeout: Duration,
) -> Result<tiny_http::Server, Box<dyn std::error::Error + Send + Sync>> {
    let listener = std::net::TcpListener::bind(bind)?;
    let socket = socket2::SockRef::from(&listener);
    socket.set_read_timeout(Some(client_timeout))?;
    socket.set_write_timeout(Some(client_timeout))?;
    tiny_http::Server::from_listener(listener, None)
}

fn work(server: &tiny_http::Server, state: &State, stopping: &AtomicBool, handler: Handler) {
    loop {
        let request = match server.recv() {
            Ok(r) => r,
            Err(_) if stopping.load(Ordering::SeqCst) => return,
            Err(e) => {
                log::warn!("accepting a request failed: {e}");
                continue;
            }
        };
        // The request stays in this slot while the reply is computed, so that after a
        // panic there is still a connection to answer on.
        let mut slot = Some(request);
        if catch_unwind(AssertUnwindSafe(|| serve(state, &mut slot, handler))).is_err() {
            if let Some(request) = slot.take() {
                respond_full(
                    request,
                    ApiError::internal("The proxy failed while handling this request.").into(),
                );
            }
        }
    }
}

fn serve(state: &State, slot: &mut Option<Request>, handler: Handler) {
    let started = Instant::now();
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let Some(request) = slot.as_mut() else { return };
    let method = request.method().clone();
    let path = request.url().split('?').next().unwrap_or("").to_string();
    // One generation for the whole request, even if a reload swaps it meanwhile.
    let g = state.current();
    let mut reply = handler(state, &g, request, &method, &path);
    reply
        .headers
        .push(("x-proxy-request-id".into(), id.to_string()));
    let Some(request) = slot.take() else { return };
    let (status, trace, end) = match reply.body {
        Body::Full(_) => {
            let (status, trace) = (reply.status, std::mem::take(&mut reply.trace));
            respond_full(request, reply);
            (status, trace, None)
        }
        Body::Stream {
            upstream,
            strip_usage,
        } => {
            let mut trace = reply.trace;
            let http11 = *request.http_version() >= tiny_http::HTTPVersion(1, 1);
            let end = match ClientStream::start(
                request.into_writer(),
                http11,
                reply.status,
                &reply.headers,
            ) {
                Ok(mut client) => {
                    let summary =
                        stream::relay(&mut upstream.into_reader(), &mut client, strip_usage);
                    trace.usage = summary.usage;
                    summary.end
                }
                Err(_) => End::ClientGone,
            };
            (reply.status, trace, Some(end))
        }
    };
    let usage = trace.usage.unwrap_or_default();
    log::info!(
        "request={id} {method} {path} model={} instance={} status={status} tokens={}/{} latency_ms={} attempts={}{}",
        trace.model.as_deref().unwrap_or("-"),
        trace.instance.as_deref().unwrap_or("-"),
        usage.prompt_tokens,
        usage.completion_tokens,
        started.elapsed().as_millis(),
        trace.attempts.len(),
        match end {
            None | Some(End::Completed) => String::new(),
            Some(End::ClientGone) => " stream=client_gone".into(),
            Some(End::UpstreamFailed(why)) => format!(" stream=failed ({why})"),
        }
    );
    if trace.api {
        let model = trace
            .model
            .as_deref()
            .filter(|m| g.model_names.contains(*m));
        let record = Record {
            model,
            instance: trace.instance.as_deref(),
            status,
            latency: started.elapsed(),
            usage: trace.usage,
            attempts: &trace.attempts,
        };
        state.stats.lock().record(state.uptime_secs(), &record);
    }
}

fn route(
    state: &State,
    g: &Generation,
    request: &mut Request,
    method: &Method,
    path: &str,
) -> Reply {
    let auth = &g.config.auth;
    if path.starts_with("/v1/") || path.starts_with("/openai/") {
        if let Err(e) = auth::check_client(&auth.api_keys, request) {
            return e.into();
        }
    }
    let forward = |request: &mut Request, op: &str, model: Option<String>| {
        only(method, "POST", path, || {
            let mut reply = api::forward(state, g, request, op, model);
            reply.trace.api = true;
            reply
        })
    };
    if let Some(op) = path
        .strip_prefix("/v1/")
        .filter(|op| upstream::OPERATIONS.contains(op))
    {
        return forward(request, op, None);
    }
    if let Some((model, op)) = azure_path(path) {
        return forward(request, op, Some(model));
    }
    route_other(state, g, request, method, path)
}

/// The endpoints that are not forwarded. Never inlined: inlined, their locals made the
/// frame every worker keeps under a held stream 20 KiB larger (20 MB per 1,000 streams).
#[inline(never)]
fn route_other(
    state: &State,
    g: &Generation,
    request: &mut Request,
    method: &Method,
    path: &str,
) -> Reply {
    let auth = &g.config.auth;
    let get = |f: &dyn Fn() -> Reply| only(method, "GET", path, f);
    match path {
        "/v1/models" => get(&|| api::models(g)),
        "/health" => get(&|| admin::health(state, g)),
        "/metrics" => get(&|| metrics::metrics(state, g)),
        "/stats" => {
            let query = request
                .url()
                .split_once('?')
                .map_or("", |(_, q)| q)
                .to_string();
            get(&|| admin::stats(state, g, &query))
        }
        "/stats/windows" => get(&|| admin::stats_windows(state, g)),
        "/stats/instances" => get(&|| admin::stats_instances(state, g)),
        "/stats/health" => get(&|| admin::stats_health(state, g)),
        "/stats/status" => get(&|| admin::stats_status(state, g)),
        "/stats/reset" | "/config" | "/config/reload" => {
            let allowed = if path == "/config" { "GET" } else { "POST" };
            only(method, allowed, path, || {
                if let Err(e) = auth::check_admin(auth.admin_key.as_ref(), request) {
                    return e.into();
                }
                match path {
                    "/stats/reset" => admin::stats_reset(state),
                    "/config" => admin::config(g),
                    _ => admin::reload(state),
                }
            })
        }
        _ => ApiError::not_found(method.as_str(), path).into(),
    }
}

/// Runs `f` if the method is `allowed`, else answers 405 naming it.
fn only(method: &Method, allowed: &'static str, path: &str, f: impl FnOnce() -> Reply) -> Reply {
    if method.as_str() == allowed {
        f()
    } else {
        ApiError::method_not_allowed(method.as_str(), path, allowed).into()
    }
}

/// `/openai/deployments/{model}/{op}` → (model, op), for `AzureOpenAI` SDK clients.
fn azure_path(path: &str) -> Option<(String, &'static str)> {
    let rest = path.strip_prefix("/openai/deployments/")?;
    let (model, op) = rest.split_once('/')?;
    let op = upstream::OPERATIONS.iter().find(|o| **o == op)?;
    let model = percent_decode(model)?;
    (!model.is_empty()).then_some((model, op))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn respond_full(request: Request, reply: Reply) {
    let Body::Full(body) = reply.body else { return };
    let mut response = Response::from_data(body)
        .with_status_code(reply.status)
        // Always a Content-Length: tiny_http would otherwise chunk bodies over 32 KiB.
        .with_chunked_threshold(usize::MAX);
    for (name, value) in &reply.headers {
        if let Ok(h) = Header::from_bytes(name.as_bytes(), value.as_bytes()) {
            response.add_header(h);
        }
    }
    if let Err(e) = request.respond(response) {
        log::debug!("writing a response failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn panics_on_request(
        _: &State,
        _: &Generation,
        _: &mut Request,
        _: &Method,
        path: &str,
    ) -> Reply {
        assert_ne!(path, "/panic", "handler bug");
        Reply::json(200, &serde_json::json!({"ok": true}))
    }

    #[test]
    fn a_panicking_handler_answers_500_and_the_worker_lives_on() {
        let config: Config = serde_yaml::from_str(
            "instances: [{name: a, api_key: k, api_base: 'http://a', api_version: v, supported_models: [m]}]",
        )
        .unwrap();
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let url = format!("http://{}", server.server_addr().to_ip().unwrap());
        let source = Source {
            dir: "unused".into(),
            env: Default::default(),
        };
        let state = Arc::new(State::new(config, source));
        let stopping = Arc::new(AtomicBool::new(false));
        let (srv, st, stop) = (server.clone(), state.clone(), stopping.clone());
        // One worker: if the panic killed it, the second request would never be answered.
        let worker = std::thread::spawn(move || work(&srv, &st, &stop, panics_on_request));

        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(10)))
            .build()
            .into();
        let mut first = agent.get(format!("{url}/panic")).call().unwrap();
        assert_eq!(first.status(), 500);
        let body: serde_json::Value =
            serde_json::from_slice(&first.body_mut().read_to_vec().unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "internal_error");
        let second = agent.get(format!("{url}/fine")).call().unwrap();
        assert_eq!(second.status(), 200);

        stopping.store(true, Ordering::SeqCst);
        server.unblock();
        worker.join().unwrap();
    }

    #[test]
    fn azure_paths() {
        assert_eq!(
            azure_path("/openai/deployments/gpt-4o/chat/completions"),
            Some(("gpt-4o".to_string(), "chat/completions"))
        );
        assert_eq!(
            azure_path("/openai/deployments/my%20model/embeddings"),
            Some(("my model".to_string(), "embeddings"))
        );
        assert_eq!(azure_path("/openai/deployments/m/images/generations"), None);
        assert_eq!(azure_path("/openai/deployments//completions"), None);
        assert_eq!(azure_path("/openai/deployments/%zz/completions"), None);
    }
}
