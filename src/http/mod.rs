//! The HTTP layer: the listening socket, our HTTP/1.1 server (`http1_server`: one thread per
//! connection answers that connection's requests), and writing a handler's `Reply`: in
//! one write, or relayed as a stream. A panic while handling one request is contained
//! to that request: it gets a 500 and the connection's thread serves on. Each answered
//! request gets its access log line and its statistics here.

pub mod auth;
pub mod cors;
pub mod panics;
mod reply;
pub mod request_body;

pub use reply::{Relay, Reply, ReplyBody, Stream, Trace, Upgrade};

use crate::config::Config;
use crate::error::Error;
use crate::observe::logging::Clean;
use crate::observe::stats::Record;
use crate::outcome::{Outcome, Usage};
use crate::routing;
use crate::state::{Generation, State};
use crate::upstream::stream::{self, End};
use crate::upstream::{self, relay};
use http1_server::{Method, Request};
use std::io::Read;
use std::net::{TcpListener, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
) -> std::io::Result<http1_server::Server> {
    let secs = Duration::from_secs_f64;
    let limits = http1_server::Limits {
        idle: secs(config.server.client_timeout),
        head: secs(config.server.client_timeout),
        body: secs(config.server.body_timeout),
        write: secs(config.server.client_timeout),
        stack_size: STACK_SIZE,
        max_connections: config.server.max_connections,
        max_connections_per_ip: config.server.connections_per_ip(),
        ..http1_server::Limits::default()
    };
    let handler_state = state.clone();
    panics::install_hook();
    let server = http1_server::Server::start(
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

/// A request as it came, as its log line names it.
struct Asked<'r> {
    id: u64,
    method: &'r Method,
    path: &'r str,
    started: Instant,
}

/// How a request was answered: its status, what the statistics learn, and how a
/// stream ended.
struct Answered {
    status: u16,
    trace: Trace,
    end: Option<End>,
}

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
    let asked = Asked {
        id,
        method: &method,
        path,
        started,
    };
    let answered = panics::catch(|| answer(state, &g, &mut slot, &asked, router))
        .unwrap_or_else(|message| internal_error(state, id, &message, &mut slot));
    record(state, &g, &asked, answered);
}

/// The answer to a request whose handler panicked, if it had not answered yet; the
/// panic is logged with the request's id and counted.
#[inline(never)]
fn internal_error(
    state: &State,
    id: u64,
    message: &str,
    slot: &mut Option<Request<'_>>,
) -> Answered {
    log::error!("request={id} {}", Clean(message));
    state.stats.lock().record_panic(state.uptime_secs());
    if let Some(request) = slot.take() {
        let reply: Reply = Error::Internal.into();
        if let ReplyBody::Full(body) = &reply.body {
            let _ = request.respond(reply.status, &reply.headers, body);
        }
    }
    let trace = Trace {
        api: true,
        ..Trace::default()
    };
    Answered {
        status: 500,
        trace,
        end: None,
    }
}

/// The access log line and the statistics of one answered request. Out of line, like
/// the other work before or after the upstream call: a stream's thread keeps the stack
/// pages that its deepest frames touched, so the frames live during the call stay small.
#[inline(never)]
fn record(
    state: &State,
    g: &Generation,
    &Asked {
        id,
        method,
        path,
        started,
    }: &Asked<'_>,
    Answered { status, trace, end }: Answered,
) {
    let usage = trace.usage.unwrap_or_default();
    log::info!(
        "request={id} {method} {}{} model={} instance={} status={status} tokens={}/{} latency_ms={} attempts={}{}{}",
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
            Some(End::Shutdown) => " stream=shutdown".into(),
            Some(End::UpstreamFailed(ref why)) => format!(" stream=failed ({why})"),
        },
        trace
            .session
            .map_or(String::new(), |why| format!(" session={why}"))
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
            // A session's usage was counted as it came.
            usage: trace.usage.filter(|_| trace.session.is_none()),
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
    &Asked {
        id, method, path, ..
    }: &Asked<'_>,
    router: Router,
) -> Answered {
    let Some(request) = slot.as_mut() else {
        return Answered {
            status: 500,
            trace: Trace::default(),
            end: None,
        };
    };
    // An upstream call or relay this request makes ends soon after its client leaves.
    let _watch = upstream::watch_client(request.client_socket());
    let mut reply = router(state, g, request, method, path);
    cors::allow_origin(&g.config.server.cors_origins, request, &mut reply);
    reply
        .headers
        .push(("x-proxy-request-id".into(), id.to_string()));
    let Some(request) = slot.take() else {
        return Answered {
            status: 500,
            trace: Trace::default(),
            end: None,
        };
    };
    let status = reply.status;
    match reply.body {
        ReplyBody::Full(body) => {
            if let Err(e) = request.respond(status, &reply.headers, &body) {
                log::debug!("writing a response failed: {e}");
            }
            Answered {
                status,
                trace: reply.trace,
                end: None,
            }
        }
        ReplyBody::Stream(Stream {
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
            // The server's cut at shutdown fails the writer as a client that left
            // would, but with its own kind of error.
            let mut cut = false;
            let end = match request.into_stream(status, &reply.headers) {
                Ok(mut client) => {
                    let summary = stream::relay(
                        &mut first.as_slice().chain(&mut rest),
                        &mut |event| {
                            let sent = client.send(event);
                            cut = sent.as_ref().is_err_and(http1_server::is_cut);
                            sent
                        },
                        options,
                    );
                    trace.usage = summary.usage.or_else(|| {
                        options
                            .count_text
                            .then(|| Usage::estimated(prompt_tokens, summary.text_tokens))
                    });
                    let end = finished(summary.end, || {
                        let done = client.finish();
                        cut |= done.as_ref().is_err_and(http1_server::is_cut);
                        done
                    });
                    shut_down(end, cut)
                }
                Err(_) => End::ClientGone,
            };
            drop(permit);
            let end = settle(state, g, instance, &mut trace, end);
            Answered {
                status,
                trace,
                end: Some(end),
            }
        }
        ReplyBody::Relay(Relay {
            body,
            instance,
            permit,
            remember,
        }) => {
            let mut trace = reply.trace;
            let inst = &g.config.instances[instance];
            let mut cut = false;
            let end = match request.into_relay(status, &reply.headers, body.client_length()) {
                Ok(mut client) => {
                    let relayed = relay::relay(body, inst.api_key.expose(), &mut |piece| {
                        let sent = client.send(piece);
                        cut |= sent.as_ref().is_err_and(http1_server::is_cut);
                        sent
                    });
                    trace.usage = relayed.usage;
                    if let (Some(model), Some(id)) = (remember, &relayed.id) {
                        state.remember_response(g, id, &inst.name, &model);
                    }
                    // Only a whole body gets its end: a relay that broke leaves the
                    // client's body unfinished (no last chunk), so it cannot look whole.
                    let end = match relayed.end {
                        End::Completed => finished(End::Completed, || {
                            let done = client.finish();
                            cut |= done.as_ref().is_err_and(http1_server::is_cut);
                            done
                        }),
                        end => end,
                    };
                    shut_down(end, cut)
                }
                Err(_) => End::ClientGone,
            };
            drop(permit);
            let end = settle(state, g, instance, &mut trace, end);
            Answered {
                status,
                trace,
                end: Some(end),
            }
        }
        ReplyBody::Upgrade(session) => {
            let mut trace = reply.trace;
            match request.upgrade(&reply.headers) {
                Ok(conn) => session.run(state, conn, &mut trace),
                Err(e) => log::debug!("writing a 101 failed: {e}"),
            }
            Answered {
                status,
                trace,
                end: None,
            }
        }
    }
}

/// How a relay ended once `finish` ended the client's body: only a relay that completed
/// becomes the client's failure if its end cannot be written; an upstream failure
/// stays one.
fn finished(end: End, finish: impl FnOnce() -> std::io::Result<()>) -> End {
    let written = end == End::ClientGone || finish().is_ok();
    match end {
        End::Completed if !written => End::ClientGone,
        end => end,
    }
}

/// A relay the server cut at shutdown ended for that reason, whatever the relay saw
/// (a write refused, or an upstream read ended by the client watch).
fn shut_down(end: End, cut: bool) -> End {
    match end {
        End::ClientGone | End::UpstreamFailed(_) if cut => End::Shutdown,
        end => end,
    }
}

/// A relay's end as it counts: an upstream failure is the instance's (`broke`), unless
/// it was the proxy ending the call because the client had left.
fn settle(state: &State, g: &Generation, instance: usize, trace: &mut Trace, end: End) -> End {
    match end {
        End::UpstreamFailed(_) if upstream::client_left() => End::ClientGone,
        End::UpstreamFailed(why) => {
            broke(state, g, instance, trace);
            End::UpstreamFailed(why)
        }
        end => end,
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
