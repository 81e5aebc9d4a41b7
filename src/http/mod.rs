//! The HTTP layer: the listening socket, the vendored tiny_http server (one thread per
//! connection answers that connection's requests), and writing a handler's `Reply`: in
//! one write, or relayed as a stream. A panic while handling one request is contained
//! to that request: it gets a 500 and the connection's thread serves on. Each answered
//! request gets its access log line and its statistics here.

pub mod auth;
pub mod body;
mod reply;

pub use reply::{Body, Reply, Stream, Trace};

use crate::config::Config;
use crate::error::Error;
use crate::observe::logging::Clean;
use crate::observe::stats::Record;
use crate::outcome::{Outcome, Usage};
use crate::routing;
use crate::state::{Generation, State};
use crate::upstream::stream::{self, End};
use std::io::Read;
use std::net::{TcpListener, ToSocketAddrs};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tiny_http::{Method, Request};

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

/// Starts serving on `listener`: each connection's thread runs `router` for its requests.
pub fn start(
    listener: TcpListener,
    config: &Config,
    state: Arc<State>,
    router: Router,
) -> std::io::Result<tiny_http::Server> {
    let secs = Duration::from_secs_f64;
    let limits = tiny_http::Limits {
        idle: secs(config.server.client_timeout),
        head: secs(config.server.client_timeout),
        body: secs(config.server.body_timeout),
        write: secs(config.server.client_timeout),
        stack_size: STACK_SIZE,
        max_connections: config.server.max_connections,
    };
    let handler_state = state.clone();
    let server = tiny_http::Server::start(
        listener,
        limits,
        Box::new(move |request| serve(&handler_state, request, router)),
    )?;
    let _ = state.connections.set(server.connection_count());
    Ok(server)
}

/// Binds `bind` with a wide backlog, so that a burst of new connections is not refused
/// before the accept thread takes them, and a receive timeout, so that the accept
/// thread sees a drain even while no one connects.
pub fn listen(bind: &str) -> std::io::Result<TcpListener> {
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
pub type Router = fn(&State, &Generation, &mut Request<'_>, &Method, &str) -> Reply;

/// Answers one request on its connection's thread, then logs and counts it.
fn serve(state: &State, request: Request<'_>, router: Router) {
    let started = Instant::now();
    let id = state.next_request_id();
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
        let reply: Reply = Error::Internal.into();
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
        "request={id} {method} {}{} model={} instance={} status={status} tokens={}/{} latency_ms={} attempts={}{}",
        Clean(path),
        trace.client.as_deref().map(|c| format!(" client={c}")).unwrap_or_default(),
        Clean(trace.model.as_deref().unwrap_or("-")),
        trace.instance.as_deref().unwrap_or("-"),
        usage.prompt_tokens,
        usage.completion_tokens,
        started.elapsed().as_millis(),
        trace.attempts.len(),
        match end {
            None | Some(End::Completed) => String::new(),
            Some(End::ClientGone) => " stream=client_gone".into(),
            Some(End::UpstreamFailed(ref why)) => format!(" stream=failed ({why})"),
        }
    );
    if trace.api {
        let model = trace
            .model
            .as_deref()
            .filter(|m| g.models.binary_search_by(|n| n.as_str().cmp(m)).is_ok());
        let record = Record {
            model,
            instance: trace.instance.as_deref(),
            status,
            broke: matches!(end, Some(End::UpstreamFailed(_))),
            latency: started.elapsed(),
            usage: trace.usage,
            attempts: &trace.attempts,
            client: trace.client.as_deref(),
            own_limit: trace.own_limit,
        };
        state.stats.lock().record(state.uptime_secs(), &record);
        if let (Some(client), Some(usage)) = (&trace.client, trace.usage) {
            let shared = state.shared.as_deref().map(|s| (s, &*g.alerts));
            routing::clients::spend(&state.clients, shared, client, usage);
        }
    }
}

/// A stream that broke after its answer began is its instance's failure: in the
/// instance's state (and circuit), and in the statistics as a broken attempt.
#[inline(never)]
fn broke(state: &State, g: &Generation, instance: usize, trace: &mut Trace) {
    let model = trace.model.as_deref().unwrap_or_default();
    routing::broke(state.states(), &g.config, &g.alerts, instance, model);
    if let Some(last) = trace.attempts.last_mut() {
        last.outcome = Outcome::Broken;
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
        Body::Stream(Stream {
            first,
            mut rest,
            options,
            prompt_tokens,
            instance,
            permit,
        }) => {
            let mut trace = reply.trace;
            reply
                .headers
                .push(("Cache-Control".into(), "no-cache".into()));
            let end = match request.into_stream(status, &reply.headers) {
                Ok(mut client) => {
                    let summary = stream::relay(
                        &mut first.as_slice().chain(&mut rest),
                        &mut |event| client.send(event),
                        options,
                    );
                    trace.usage = summary.usage.or_else(|| {
                        options
                            .count_text
                            .then(|| Usage::estimated(prompt_tokens, summary.text_tokens))
                    });
                    // Only a stream that completed becomes the client's failure if its
                    // end cannot be written; an upstream failure stays one.
                    let finished = summary.end == End::ClientGone || client.finish().is_ok();
                    match summary.end {
                        End::Completed if !finished => End::ClientGone,
                        end => end,
                    }
                }
                Err(_) => End::ClientGone,
            };
            drop(permit);
            if let End::UpstreamFailed(_) = end {
                broke(state, g, instance, &mut trace);
            }
            (status, trace, Some(end))
        }
    }
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
        let source = crate::config::Source::default();
        let state = Arc::new(State::new(config.clone(), source));
        let server = start(
            listen("127.0.0.1:0").unwrap(),
            &config,
            state,
            panics_on_request,
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
}
