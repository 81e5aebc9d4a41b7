//! Probes a browser or a load balancer sends before or beside real requests: the CORS
//! preflight (`OPTIONS`), answered without a key, and the `Access-Control-Allow-Origin`
//! an answer to an allowed origin carries (`server.cors_origins`). `HEAD` is routed as
//! `GET` by the route table; the server leaves its body out.

use super::Reply;
use http1_server::Request;

/// How long a browser may reuse a preflight's answer.
const MAX_AGE_SECS: &str = "600";
/// The methods the proxy's endpoints answer.
const METHODS: &str = "GET, POST, DELETE, HEAD, OPTIONS";

/// The `Access-Control-Allow-Origin` value for the request's `Origin`, if
/// `cors_origins` allows it: `*` when any origin is allowed, else the origin itself.
fn allowed_origin<'r>(cors_origins: &[String], origin: Option<&'r str>) -> Option<&'r str> {
    let origin = origin?;
    if cors_origins.iter().any(|o| o == "*") {
        return Some("*");
    }
    cors_origins
        .iter()
        .any(|o| o.eq_ignore_ascii_case(origin))
        .then_some(origin)
}

/// The answer to any `OPTIONS`: 204, with the CORS headers when the origin is allowed.
pub fn preflight(cors_origins: &[String], request: &Request<'_>) -> Reply {
    let mut reply = Reply {
        status: 204,
        headers: vec![("Allow".into(), METHODS.into())],
        body: super::ReplyBody::Full(Vec::new()),
        trace: super::Trace::default(),
    };
    let Some(origin) = allowed_origin(cors_origins, request.header("origin")) else {
        return reply;
    };
    let mut headers = vec![
        ("Access-Control-Allow-Origin", origin),
        ("Access-Control-Allow-Methods", METHODS),
        ("Access-Control-Max-Age", MAX_AGE_SECS),
    ];
    // The SDKs send many headers of their own (`x-stainless-*`): what the browser
    // asks for is allowed, since the key, not the header list, guards the API.
    if let Some(asked) = request.header("access-control-request-headers") {
        headers.push(("Access-Control-Allow-Headers", asked));
    }
    reply
        .headers
        .extend(headers.into_iter().map(|(k, v)| (k.into(), v.into())));
    reply.headers.push(vary());
    reply
}

/// Adds `Access-Control-Allow-Origin` to an answer when the request's origin is
/// allowed.
pub fn allow_origin(cors_origins: &[String], request: &Request<'_>, reply: &mut Reply) {
    if let Some(origin) = allowed_origin(cors_origins, request.header("origin")) {
        reply
            .headers
            .push(("Access-Control-Allow-Origin".into(), origin.into()));
        reply.headers.push(vary());
    }
}

/// The answer depends on `Origin`: caches must not give one origin's to another.
fn vary() -> (String, String) {
    ("Vary".into(), "Origin".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_matched_exactly_or_by_a_star() {
        let some = vec!["https://app.example".to_string()];
        assert_eq!(
            allowed_origin(&some, Some("https://app.example")),
            Some("https://app.example")
        );
        assert_eq!(allowed_origin(&some, Some("https://evil.example")), None);
        assert_eq!(
            allowed_origin(&some, Some("https://app.example.evil")),
            None
        );
        assert_eq!(allowed_origin(&some, None), None);
        assert_eq!(allowed_origin(&[], Some("https://app.example")), None);
        let any = vec!["*".to_string()];
        assert_eq!(allowed_origin(&any, Some("https://x.example")), Some("*"));
    }
}
