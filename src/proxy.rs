//! A running proxy (`Proxy`): the server started on its socket, the statistics
//! rotation thread, reload and shutdown; and the route table that sends each path to
//! its handler (`api` for the OpenAI endpoints, `admin` for the operator's).

use crate::config::{Client, Config, ConfigError, Source};
use crate::error::Error;
use crate::http::{self, auth, Reply};
use crate::state::{Generation, Reloaded, State};
use crate::upstream::stream;
use crate::upstream::websocket::Closed;
use crate::upstream::Op;
use crate::{admin, api};
use http1_server::{Method, Request};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Why a proxy did not start: the step that failed, with the system's reason.
#[derive(Debug)]
pub enum StartError {
    /// The address (`host:port`) cannot be bound: in use, not local, or unresolvable.
    Listen(String, std::io::Error),
    /// The server's threads could not be started.
    Server(std::io::Error),
    /// The statistics rotation thread could not be started.
    StatsThread(std::io::Error),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Listen(bind, e) => write!(f, "cannot listen on {bind}: {e}"),
            StartError::Server(e) => write!(f, "cannot start the server: {e}"),
            StartError::StatsThread(e) => write!(f, "cannot start the stats thread: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// A running proxy: its server and the statistics thread.
pub struct Proxy {
    server: http1_server::Server,
    state: Arc<State>,
    rotator: JoinHandle<()>,
    stop_tx: crossbeam_channel::Sender<()>,
}

impl Proxy {
    /// Binds `host:port` (port 0 picks a free one) and starts serving.
    pub fn start(config: Config, source: Source) -> Result<Proxy, StartError> {
        let bind = format!("{}:{}", config.host, config.port);
        let listener = http::listen(&bind).map_err(|e| StartError::Listen(bind.clone(), e))?;
        let state = Arc::new(State::new(config.clone(), source));
        let server =
            http::start(listener, &config, state.clone(), route).map_err(StartError::Server)?;
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
                .map_err(StartError::StatsThread)?
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
    pub fn reload(&self) -> Result<Reloaded, ConfigError> {
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
            self.state.realtime.end_all(Closed::Shutdown);
            self.server.cut_streams(&stream::error_event(
                "The proxy is shutting down: this stream was cut before its end.",
            ));
            self.server
                .wait_closed(Instant::now() + Duration::from_secs(1));
        }
        self.flush_settlements();
        drop(self.stop_tx);
        let _ = self.rotator.join();
        finished
    }

    /// Applies in Redis the settlements of the last requests, which their answers did
    /// not wait for, giving Redis two of its timeouts to take them.
    fn flush_settlements(&self) {
        let Some(shared) = &self.state.shared else {
            return;
        };
        if !shared.flush(shared.timeout() * 2) {
            log::warn!("the last settlements were not all applied in Redis before stopping");
        }
    }

    /// `server.shutdown_grace_seconds` of the configuration in force.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs_f64(self.state.current().config.server.shutdown_grace_seconds)
    }

    /// Stops at once: `shutdown` without a grace period.
    pub fn stop(self) {
        self.shutdown(Duration::ZERO);
    }
}

fn route(
    state: &State,
    g: &Generation,
    request: &mut Request<'_>,
    method: &Method,
    path: &str,
) -> Reply {
    // A browser's preflight carries no key: it asks whether the real request may be sent.
    if *method == Method::Options {
        return http::cors::preflight(&g.config.server.cors_origins, request);
    }
    // A Realtime API session checks its key itself: browsers can only send it as a
    // WebSocket subprotocol.
    if let Some(param) = realtime_path(path) {
        let model = query_param(query(request), param);
        return only(method, "GET", path, || {
            api::realtime::session(state, g, request, model)
        });
    }
    let auth = &g.config.auth;
    let mut client = None;
    if path.starts_with("/v1/") || path.starts_with("/openai/") {
        let checked = state.key_failures.check(auth, request.remote_addr(), || {
            auth::check_client(&auth.api_keys, &auth.clients, |name| request.header(name))
        });
        match checked {
            Ok(named) => client = named.map(|i| &auth.clients[i]),
            Err(e) => return e.into(),
        }
    }
    // `/openai/v1/...` is `/v1/...` for clients whose base URL is an Azure v1 endpoint;
    // `AzureOpenAI` clients call the Responses API and the model list at
    // `/openai/responses` and `/openai/models`, outside any deployment.
    let v1 = path
        .strip_prefix("/v1/")
        .or_else(|| path.strip_prefix("/openai/v1/"))
        .or_else(|| {
            path.strip_prefix("/openai/")
                .filter(|rest| rest.starts_with("responses") || *rest == "models")
        });
    if let Some(op) = v1.and_then(Op::from_path) {
        return only(method, "POST", path, || {
            api::forward(state, g, request, op, None, client)
        });
    }
    if let Some((model, op)) = azure_path(path) {
        return only(method, "POST", path, || {
            api::forward(state, g, request, op, Some(model), client)
        });
    }
    if let Some((id, rest)) = v1.and_then(stored_response) {
        let allowed = match rest {
            "" => "GET, DELETE",
            "/input_items" => "GET",
            _ => "POST",
        };
        let query = query(request);
        // A HEAD asks the upstream for what a GET would have; the server drops the body.
        let upstream_method = if *method == Method::Head {
            "GET"
        } else {
            method.as_str()
        };
        return only(method, allowed, path, || {
            api::stored_response(
                state,
                g,
                request,
                api::StoredCall {
                    method: upstream_method,
                    id,
                    rest,
                    query,
                },
                client,
            )
        });
    }
    route_other(state, g, request, (method, v1, path), client)
}

/// The query parameter that names the model on a Realtime API path: `model` for
/// OpenAI's and Azure's v1 paths, `deployment` for Azure's dated one.
fn realtime_path(path: &str) -> Option<&'static str> {
    match path {
        "/v1/realtime" | "/openai/v1/realtime" => Some("model"),
        "/openai/realtime" => Some("deployment"),
        _ => None,
    }
}

/// The value of parameter `name` in a query string, percent-decoded.
fn query_param(query: &str, name: &str) -> Option<String> {
    let value = query
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))?;
    percent_decode(value)
}

/// `responses/{id}`, `responses/{id}/input_items`, `responses/{id}/cancel` → (id, the
/// rest).
fn stored_response(path: &str) -> Option<(&str, &'static str)> {
    let rest = path.strip_prefix("responses/")?;
    let (id, more) = rest.split_once('/').unwrap_or((rest, ""));
    let rest = match more {
        "" => "",
        "input_items" => "/input_items",
        "cancel" => "/cancel",
        _ => return None,
    };
    (!id.is_empty()).then_some((id, rest))
}

/// The request's query string (after `?`), or "".
fn query<'c>(request: &Request<'c>) -> &'c str {
    request.url().split_once('?').map_or("", |(_, q)| q)
}

/// The endpoints that are not forwarded. Never inlined: inlined, their locals made the
/// frame that every held stream keeps on its thread 20 KiB larger.
#[inline(never)]
fn route_other(
    state: &State,
    g: &Generation,
    request: &mut Request<'_>,
    (method, v1, path): (&Method, Option<&str>, &str),
    client: Option<&Client>,
) -> Reply {
    let auth = &g.config.auth;
    let get = |f: &dyn Fn() -> Reply| only(method, "GET", path, f);
    if v1 == Some("models") {
        return get(&|| api::models(g, client));
    }
    match path {
        "/health" => get(&|| admin::health(state, g)),
        "/metrics" => get(&|| admin::metrics(state, g)),
        "/stats" => {
            let query = query(request);
            get(&|| admin::stats(state, g, query))
        }
        "/stats/windows" => get(&|| admin::stats_windows(state, g)),
        "/stats/clients" => get(&|| admin::stats_clients(state, g)),
        "/stats/instances" => get(&|| admin::stats_instances(state, g)),
        "/stats/health" => get(&|| admin::stats_health(state, g)),
        "/stats/status" => get(&|| admin::stats_status(state, g)),
        "/stats/reset" | "/config" | "/config/reload" => {
            let allowed = if path == "/config" { "GET" } else { "POST" };
            only(method, allowed, path, || {
                let peer = request.remote_addr();
                let checked = state.key_failures.check(auth, peer, || {
                    auth::check_admin(auth.admin_key.as_ref(), |name| request.header(name), peer)
                });
                if let Err(e) = checked {
                    return e.into();
                }
                match path {
                    "/stats/reset" => admin::stats_reset(state),
                    "/config" => admin::config(g),
                    _ => admin::reload(state),
                }
            })
        }
        _ => Error::UnknownUrl {
            method: method.as_str().into(),
            path: path.into(),
        }
        .into(),
    }
}

/// Runs `f` if the method is one of `allowed` (`"GET, DELETE"`), or `HEAD` where `GET`
/// is, else answers 405 naming them.
fn only(method: &Method, allowed: &'static str, path: &str, f: impl FnOnce() -> Reply) -> Reply {
    let head_as_get = *method == Method::Head && allowed.split(", ").any(|m| m == "GET");
    if head_as_get || allowed.split(", ").any(|m| m == method.as_str()) {
        f()
    } else {
        Error::MethodNotAllowed {
            method: method.as_str().into(),
            path: path.into(),
            allowed,
        }
        .into()
    }
}

/// `/openai/deployments/{model}/{op}` → (model, op), for `AzureOpenAI` SDK clients
/// (every operation but the Responses API, which Azure does not serve per deployment).
fn azure_path(path: &str) -> Option<(String, Op)> {
    let rest = path.strip_prefix("/openai/deployments/")?;
    let (model, op) = rest.split_once('/')?;
    let op = Op::from_path(op).filter(|op| *op != Op::Responses)?;
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

    #[test]
    fn azure_paths() {
        assert_eq!(
            azure_path("/openai/deployments/gpt-4o/chat/completions"),
            Some(("gpt-4o".to_string(), Op::Chat))
        );
        assert_eq!(
            azure_path("/openai/deployments/my%20model/embeddings"),
            Some(("my model".to_string(), Op::Embeddings))
        );
        assert_eq!(
            azure_path("/openai/deployments/whisper/audio/transcriptions"),
            Some(("whisper".to_string(), Op::Transcriptions))
        );
        assert_eq!(azure_path("/openai/deployments/m/responses"), None);
        assert_eq!(azure_path("/openai/deployments/m/images/edits"), None);
        assert_eq!(azure_path("/openai/deployments//completions"), None);
        assert_eq!(azure_path("/openai/deployments/%zz/completions"), None);
    }

    #[test]
    fn realtime_paths_and_their_model() {
        assert_eq!(realtime_path("/openai/realtime"), Some("deployment"));
        assert_eq!(realtime_path("/v1/realtime/x"), None);
        assert_eq!(
            query_param("api-version=2025&deployment=gpt%20rt", "deployment").as_deref(),
            Some("gpt rt")
        );
        assert_eq!(
            query_param("models=a&model=b", "model").as_deref(),
            Some("b")
        );
        assert_eq!(query_param("model=%zz", "model"), None);
    }

    #[test]
    fn stored_response_paths() {
        assert_eq!(stored_response("responses/resp_1"), Some(("resp_1", "")));
        assert_eq!(
            stored_response("responses/resp_1/input_items"),
            Some(("resp_1", "/input_items"))
        );
        assert_eq!(
            stored_response("responses/resp_1/cancel"),
            Some(("resp_1", "/cancel"))
        );
        assert_eq!(stored_response("responses/resp_1/other"), None);
        assert_eq!(stored_response("responses/"), None);
        assert_eq!(stored_response("responses"), None);
    }
}
