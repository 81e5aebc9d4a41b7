//! Microsoft Entra ID for the tests: an `Issuer` of short-lived tokens behind a test
//! identity endpoint (IMDS's or App Service's form) and a test authority (the v2
//! token endpoint), each answering as the real service writes its answer, and an Azure
//! upstream that takes only a bearer token the issuer gave and that has not expired.

use super::{azure_like, json_reply, Behaviour, Recorded};
use serde_json::json;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Issues tokens of a fixed life and remembers them.
#[derive(Clone)]
pub struct Issuer(Arc<Mutex<Issued>>);

struct Issued {
    life: Duration,
    tokens: Vec<(String, Instant)>,
    revoked: HashSet<String>,
    down: bool,
}

impl Issuer {
    pub fn new(life: Duration) -> Issuer {
        Issuer(Arc::new(Mutex::new(Issued {
            life,
            tokens: Vec::new(),
            revoked: HashSet::new(),
            down: false,
        })))
    }

    /// A new token, unique in the whole test run (so searching for it means something).
    pub fn issue(&self) -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let token = format!("eyJ0eXAi.entra-{}-{n}-{nanos}.sig", std::process::id());
        let mut s = self.0.lock().unwrap();
        let expires = Instant::now() + s.life;
        s.tokens.push((token.clone(), expires));
        token
    }

    pub fn life(&self) -> Duration {
        self.0.lock().unwrap().life
    }

    /// Every token issued so far.
    pub fn tokens(&self) -> Vec<String> {
        let s = self.0.lock().unwrap();
        s.tokens.iter().map(|(t, _)| t.clone()).collect()
    }

    pub fn count(&self) -> usize {
        self.0.lock().unwrap().tokens.len()
    }

    /// While down, the endpoints answer 503 and issue nothing.
    pub fn set_down(&self, down: bool) {
        self.0.lock().unwrap().down = down;
    }

    fn is_down(&self) -> bool {
        self.0.lock().unwrap().down
    }

    /// The tokens issued so far are refused from now on, though not expired.
    pub fn revoke_all(&self) {
        let mut s = self.0.lock().unwrap();
        let all: Vec<String> = s.tokens.iter().map(|(t, _)| t.clone()).collect();
        s.revoked.extend(all);
    }

    /// Whether `token` was issued here, is not revoked and has not expired.
    pub fn accepts(&self, token: &str) -> bool {
        let s = self.0.lock().unwrap();
        !s.revoked.contains(token)
            && s.tokens
                .iter()
                .any(|(t, expires)| t == token && *expires > Instant::now())
    }
}

/// Where a managed identity asks.
pub enum Identity {
    /// `GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=` with
    /// `Metadata: true`; `expires_in` and `expires_on` as strings.
    Imds,
    /// `GET {IDENTITY_ENDPOINT}?api-version=2019-08-01&resource=` with
    /// `X-IDENTITY-HEADER`; only `expires_on`, a string.
    AppService { header: &'static str },
}

/// A test identity endpoint issuing `issuer`'s tokens.
pub fn identity_endpoint(issuer: Issuer, form: Identity) -> Behaviour {
    Arc::new(move |req: &Recorded| {
        if issuer.is_down() {
            return json_reply(503, json!({"error": "service_unavailable"}));
        }
        let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
        let q = form_fields(query);
        let field = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let resource_ok = field("resource") == Some("https://cognitiveservices.azure.com");
        let ok = match &form {
            Identity::Imds => {
                path == "/metadata/identity/oauth2/token"
                    && field("api-version") == Some("2018-02-01")
                    && req.header("metadata") == Some("true")
            }
            Identity::AppService { header } => {
                path == "/msi/token"
                    && field("api-version") == Some("2019-08-01")
                    && req.header("x-identity-header") == Some(header)
            }
        };
        if !(ok && resource_ok) {
            return json_reply(
                400,
                json!({"error": "invalid_request", "error_description": "Required metadata header not specified"}),
            );
        }
        let token = issuer.issue();
        let life = issuer.life().as_secs();
        let on = (SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + life)
            .to_string();
        let body = match form {
            Identity::Imds => {
                json!({"access_token": token, "refresh_token": "", "expires_in": life.to_string(),
                "expires_on": on, "not_before": "0", "resource": "https://cognitiveservices.azure.com", "token_type": "Bearer"})
            }
            Identity::AppService { .. } => json!({"access_token": token, "expires_on": on,
                "resource": "https://cognitiveservices.azure.com", "token_type": "Bearer", "client_id": "mi-client"}),
        };
        json_reply(200, body)
    })
}

/// What the test authority takes as proof from `client_id` of `tenant`: a secret, or
/// the assertion the test currently expects (it may change it, as the kubelet would
/// rotate the file).
pub enum Proof {
    Secret(&'static str),
    Assertion(Arc<Mutex<String>>),
}

/// A test authority's `POST /{tenant}/oauth2/v2.0/token` (client credentials),
/// answering `expires_in` as a number.
pub fn authority(
    issuer: Issuer,
    tenant: &'static str,
    client_id: &'static str,
    proof: Proof,
) -> Behaviour {
    Arc::new(move |req: &Recorded| {
        if issuer.is_down() {
            return json_reply(503, json!({"error": "temporarily_unavailable"}));
        }
        let form = form_fields(&String::from_utf8_lossy(&req.body));
        let field = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        if req.method != "POST" || req.target != format!("/{tenant}/oauth2/v2.0/token") {
            return json_reply(
                404,
                json!({"error": "invalid_request", "error_codes": [90002]}),
            );
        }
        let proved = match &proof {
            Proof::Secret(s) => field("client_secret") == Some(s),
            Proof::Assertion(a) => {
                field("client_assertion") == Some(a.lock().unwrap().as_str())
                    && field("client_assertion_type")
                        == Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
            }
        };
        let well_formed = field("grant_type") == Some("client_credentials")
            && field("scope") == Some("https://cognitiveservices.azure.com/.default");
        if !(proved && well_formed && field("client_id") == Some(client_id)) {
            return json_reply(
                401,
                json!({"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided. Trace ID: 1",
                       "error_codes": [7000215], "trace_id": "1", "correlation_id": "2"}),
            );
        }
        let life = issuer.life().as_secs();
        json_reply(
            200,
            json!({"token_type": "Bearer", "expires_in": life, "ext_expires_in": life, "access_token": issuer.issue()}),
        )
    })
}

/// Azure OpenAI that takes only `Authorization: Bearer` with one of `issuer`'s tokens,
/// unexpired and not revoked, and no `api-key`; then answers as `azure_like` does.
pub fn bearer_upstream(issuer: Issuer) -> Behaviour {
    const INNER: &str = "bearer-checked";
    let inner = azure_like(INNER);
    Arc::new(move |req: &Recorded| {
        let token = req
            .header("authorization")
            .and_then(|v| v.strip_prefix("Bearer "));
        if req.header("api-key").is_some() || !token.is_some_and(|t| issuer.accepts(t)) {
            return json_reply(
                401,
                json!({"error": {"code": "401", "message": "Unauthorized. Access token is missing, invalid, audience is incorrect (https://cognitiveservices.azure.com), or have expired."}}),
            );
        }
        let mut checked = req.clone();
        checked.headers.push(("api-key".into(), INNER.into()));
        inner(&checked)
    })
}

/// `a=1&b=x%2Fy` as pairs, decoded.
fn form_fields(text: &str) -> Vec<(String, String)> {
    text.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
