//! The HTTP side: the listening socket, the vendored tiny_http server (one thread per
//! connection runs the handler that answers its requests), the route table, and writing
//! a `Reply` (in one write, or relayed as a stream). A panic while handling one request
//! is contained to that request: it gets a 500 and the proxy serves on. Shutdown stops
//! accepting at once and cuts what is still streaming at the end of the grace period.

use crate::alerts::Alerts;
use crate::api::{self, Body, Reply, Trace};
use crate::auth;
use crate::capacity::{BodyMemory, Permits};
use crate::config::{Config, Source};
use crate::error::ApiError;
use crate::instances::Table;
use crate::logging::Clean;
use crate::stats::{Record, Stats};
use crate::stream::{self, End};
use crate::upstream;
use crate::{admin, metrics};
use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tiny_http::{Method, Request};

/// What one configuration brings: replaced whole by a reload, while requests that
/// started on the old one finish with it.
pub struct Generation {
    pub config: Arc<Config>,
    pub agent: ureq::Agent,
    /// How to address each instance, by its index in `config.instances`.
    pub addresses: Vec<upstream::Address>,
    /// Every model some instance names: statistics label only these.
    pub model_names: HashSet<String>,
    pub alerts: Alerts,
}

impl Generation {
    fn new(config: Config) -> Generation {
        Generation {
            agent: upstream::agent(&config.routing, config.server.workers),
            addresses: config
                .instances
                .iter()
                .map(upstream::Address::new)
                .collect(),
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

/// A running proxy: its server and the statistics thread.
pub struct Proxy {
    server: tiny_http::Server,
    state: Arc<State>,
    rotator: JoinHandle<()>,
    stop_tx: crossbeam_channel::Sender<()>,
}

impl State {
    fn new(config: Config, source: Source) -> State {
        State {
            permits: Permits::new(config.server.workers),
            bodies: BodyMemory::new(config.server.max_body_memory),
            current: parking_lot::RwLock::new(Arc::new(Generation::new(config))),
            table: parking_lot::Mutex::new(Table::new()),
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

/// How often an idle accept thread wakes to see whether the server is draining.
const ACCEPT_WAKE: Duration = Duration::from_millis(200);
/// Stack of each connection's thread. The deepest requests measured (a body nested 127
/// levels deep, the most serde allows; a TLS handshake with an upstream; a 6.8 MB body)
/// touched 44 KiB of stack in the release build and 152 KiB in the debug build (the
/// stack mapping's RSS in /proc/PID/smaps). 512 KiB leaves room for a panic's backtrace;
/// only touched pages cost memory, but each thread reserves this much address space.
const STACK_SIZE: usize = 512 * 1024;
/// Connections waiting in the kernel for the accept thread.
const LISTEN_BACKLOG: i32 = 1024;

impl Proxy {
    /// Binds `host:port` (port 0 picks a free one) and starts serving.
    pub fn start(config: Config, source: Source) -> Result<Proxy, String> {
        let bind = format!("{}:{}", config.host, config.port);
        let listener = listen(&bind).map_err(|e| format!("cannot listen on {bind}: {e}"))?;
        let secs = Duration::from_secs_f64;
        let limits = tiny_http::Limits {
            idle: secs(config.server.client_timeout),
            head: secs(config.server.client_timeout),
            body: secs(config.server.body_timeout),
            write: secs(config.server.client_timeout),
            stack_size: STACK_SIZE,
            max_connections: config.server.max_connections,
        };
        let state = Arc::new(State::new(config, source));
        let handler_state = state.clone();
        let server = tiny_http::Server::start(
            listener,
            limits,
            Box::new(move |request| serve(&handler_state, request, route)),
        )
        .map_err(|e| format!("cannot start the server: {e}"))?;
        let _ = state.connections.set(server.connection_count());
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let rotator = {
            let state = state.clone();
            std::thread::Builder::new()
                .name("stats-rotation".into())
                .spawn(move || {
                    // Wakes each second; ends when the proxy drops the sender.
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
            rotator,
            stop_tx,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.server_addr()
    }

    /// Blocks until the proxy is stopped from another thread (it is not, unless killed).
    pub fn wait(self) {
        let _ = self.rotator.join();
    }

    /// Re-reads the configuration (see `State::reload`).
    pub fn reload(&self) -> Result<Reloaded, String> {
        self.state.reload()
    }

    /// Stops accepting at once (the listening socket closes), answers `/health` with
    /// 503, closes idle connections, and waits up to `grace` for requests under way
    /// (streams included). Streams still running then end with an SSE error event.
    /// Returns whether everything finished within `grace`.
    pub fn shutdown(self, grace: Duration) -> bool {
        self.state.draining.store(true, Ordering::SeqCst);
        self.server.drain();
        let finished = self.server.wait_closed(Instant::now() + grace);
        if !finished {
            self.server.cut_streams(&stream::error_event(
                "The proxy is shutting down: this stream was cut before its end.",
            ));
            self.server
                .wait_closed(Instant::now() + Duration::from_secs(1));
        }
        drop(self.stop_tx);
        let _ = self.rotator.join();
        finished
    }

    /// Stops at once: `shutdown` without a grace period.
    pub fn stop(self) {
        self.shutdown(Duration::ZERO);
    }
}

/// Binds `bind` with a wide backlog, so that a burst of new connections is not refused
/// before the accept thread takes them, and a receive timeout, so that the accept
/// thread sees a drain even while no one connects.
fn listen(bind: &str) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let addr = bind.to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to bind")
    })?;
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_read_timeout(Some(ACCEPT_WAKE))?;
    Ok(socket.into())
}

/// Turns one request into a reply: `route` in production, a stand-in in tests.
type Router = fn(&State, &Generation, &mut Request<'_>, &Method, &str) -> Reply;

/// Answers one request on its connection's thread, then logs and counts it.
fn serve(state: &State, request: Request<'_>, router: Router) {
    let started = Instant::now();
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let method = request.method().clone();
    // Borrowed from the connection's head buffer, which outlives the request.
    let path = request.url().split('?').next().unwrap_or("");
    // One generation for the whole request, even if a reload swaps it meanwhile.
    let g = state.current();
    // The request stays in this slot while the reply is computed, so that after a
    // panic there is still a connection to answer on.
    let mut slot = Some(request);
    let answered = catch_unwind(AssertUnwindSafe(|| {
        answer(state, &g, &mut slot, (id, &method, path), router)
    }));
    let (status, trace, end) = answered.unwrap_or_else(|_| internal_error(&mut slot));
    record(
        state,
        &g,
        (id, &method, path, started),
        (status, trace, end),
    );
}

/// The answer to a request whose handler panicked, if it had not answered yet.
#[inline(never)]
fn internal_error(slot: &mut Option<Request<'_>>) -> (u16, Trace, Option<End>) {
    if let Some(request) = slot.take() {
        let reply: Reply =
            ApiError::internal("The proxy failed while handling this request.").into();
        if let Body::Full(body) = &reply.body {
            let _ = request.respond(reply.status, &reply.headers, body);
        }
    }
    (500, Trace::default(), None)
}

/// The access log line and the statistics of one answered request. Out of line, like
/// the other work before or after the upstream call: a stream's thread keeps the stack
/// pages that its deepest frames touched, so the frames live during the call stay small.
#[inline(never)]
fn record(
    state: &State,
    g: &Generation,
    (id, method, path, started): (u64, &Method, &str, Instant),
    (status, trace, end): (u16, Trace, Option<End>),
) {
    let usage = trace.usage.unwrap_or_default();
    log::info!(
        "request={id} {method} {} model={} instance={} status={status} tokens={}/{} latency_ms={} attempts={}{}",
        Clean(path),
        Clean(trace.model.as_deref().unwrap_or("-")),
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

/// Routes the request and writes the reply: the status, what the statistics learn,
/// and how a stream ended.
fn answer(
    state: &State,
    g: &Generation,
    slot: &mut Option<Request<'_>>,
    (id, method, path): (u64, &Method, &str),
    router: Router,
) -> (u16, Trace, Option<End>) {
    let Some(request) = slot.as_mut() else {
        return (500, Trace::default(), None);
    };
    let mut reply = router(state, g, request, method, path);
    reply
        .headers
        .push(("x-proxy-request-id".into(), id.to_string()));
    let Some(request) = slot.take() else {
        return (500, Trace::default(), None);
    };
    let status = reply.status;
    match reply.body {
        Body::Full(body) => {
            if let Err(e) = request.respond(status, &reply.headers, &body) {
                log::debug!("writing a response failed: {e}");
            }
            (status, reply.trace, None)
        }
        Body::Stream {
            upstream,
            strip_usage,
            permit,
        } => {
            let mut trace = reply.trace;
            reply
                .headers
                .push(("Cache-Control".into(), "no-cache".into()));
            let end = match request.into_stream(status, &reply.headers) {
                Ok(mut client) => {
                    let summary = stream::relay(
                        &mut upstream.into_reader(),
                        &mut |event| client.send(event),
                        strip_usage,
                    );
                    trace.usage = summary.usage;
                    match summary.end {
                        End::ClientGone => End::ClientGone,
                        end if client.finish().is_ok() => end,
                        _ => End::ClientGone,
                    }
                }
                Err(_) => End::ClientGone,
            };
            drop(permit);
            (status, trace, Some(end))
        }
    }
}

fn route(
    state: &State,
    g: &Generation,
    request: &mut Request<'_>,
    method: &Method,
    path: &str,
) -> Reply {
    let auth = &g.config.auth;
    if path.starts_with("/v1/") || path.starts_with("/openai/") {
        if let Err(e) = auth::check_client(&auth.api_keys, |name| request.header(name)) {
            return e.into();
        }
    }
    let forward = |request: &mut Request<'_>, op: &str, model: Option<String>| {
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
/// frame that every held stream keeps on its thread 20 KiB larger.
#[inline(never)]
fn route_other(
    state: &State,
    g: &Generation,
    request: &mut Request<'_>,
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
                let peer = request.remote_addr();
                if let Err(e) =
                    auth::check_admin(auth.admin_key.as_ref(), |name| request.header(name), peer)
                {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn panics_on_request(
        _: &State,
        _: &Generation,
        _: &mut Request<'_>,
        _: &Method,
        path: &str,
    ) -> Reply {
        assert_ne!(path, "/panic", "handler bug");
        Reply::json(200, &serde_json::json!({"ok": true}))
    }

    #[test]
    fn a_panicking_handler_answers_500_and_the_connection_thread_lives_on() {
        let config: Config = serde_yaml::from_str(
            "instances: [{name: a, api_key: k, api_base: 'http://a', api_version: v, supported_models: [m]}]",
        )
        .unwrap();
        let source = Source {
            dir: "unused".into(),
            env: Default::default(),
        };
        let state = Arc::new(State::new(config, source));
        let server = tiny_http::Server::start(
            listen("127.0.0.1:0").unwrap(),
            tiny_http::Limits::default(),
            Box::new(move |request| serve(&state, request, panics_on_request)),
        )
        .unwrap();
        let url = format!("http://{}", server.server_addr());
        // One kept-alive connection: if the panic ended its thread, the second request
        // would fail.
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let mut first = agent.get(format!("{url}/panic")).call().unwrap();
        assert_eq!(first.status(), 500);
        let body: serde_json::Value =
            serde_json::from_slice(&first.body_mut().read_to_vec().unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "internal_error");
        let second = agent.get(format!("{url}/fine")).call().unwrap();
        assert_eq!(second.status(), 200);
        assert_eq!(server.connections(), 1, "the same connection served both");
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
