//! One token request to where a credential's tokens come from, following the Azure
//! SDKs' environment conventions: the App Service identity endpoint
//! (`IDENTITY_ENDPOINT`, `IDENTITY_HEADER`), IMDS (its host replaced by
//! `AZURE_POD_IDENTITY_AUTHORITY_HOST`), or the authority's v2 token endpoint
//! (`AZURE_AUTHORITY_HOST`) with a client secret or a federated assertion
//! (`AZURE_FEDERATED_TOKEN_FILE`), and the answer parsed as each service writes it.

use crate::config::{Credential, Secret};
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const IMDS: &str = "http://169.254.169.254";
const IMDS_PATH: &str = "/metadata/identity/oauth2/token";
const AUTHORITY: &str = "https://login.microsoftonline.com";
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The life assumed for a token whose expiry is absent or unreadable: short, so that
/// a misread never keeps a dead token.
pub const SHORT_LIFE: Duration = Duration::from_secs(120);
/// Tokens are never kept longer than this, whatever the service said.
const LONGEST_LIFE: Duration = Duration::from_secs(24 * 3600);

/// A short wait: a token fetch is never on a request's path but the first time, and a
/// fetch that fails is retried by the refresher.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// How a credential gets a token, its environment read once.
#[derive(Debug)]
pub enum Fetch {
    AppService {
        endpoint: String,
        header: Secret,
        resource: String,
        client_id: Option<String>,
    },
    Imds {
        url: String,
        resource: String,
        client_id: Option<String>,
    },
    Authority {
        /// `{authority}/{tenant}/oauth2/v2.0/token`.
        url: String,
        client_id: String,
        proof: Proof,
        scope: String,
    },
}

/// What the client proves itself with at the authority.
#[derive(Debug)]
pub enum Proof {
    Secret(Secret),
    /// Read again at every fetch: the kubelet rotates it.
    AssertionFile(PathBuf),
}

/// A token and how long it lives from when it was asked for.
pub struct Got {
    pub token: Secret,
    pub life: Duration,
}

impl Fetch {
    /// How `credential` fetches, with `env` the process environment; `Ok(None)` for a
    /// static token. The error names the missing variable.
    pub fn new(
        credential: &Credential,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Fetch>, String> {
        let var = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let authority = || {
            let host = var("AZURE_AUTHORITY_HOST").unwrap_or_else(|| AUTHORITY.into());
            let host = host.trim_end_matches('/');
            if host.contains("://") {
                host.to_string()
            } else {
                format!("https://{host}")
            }
        };
        let resource = |scope: &str| scope.trim_end_matches("/.default").to_string();
        Ok(Some(match credential {
            Credential::Token { .. } => return Ok(None),
            Credential::ManagedIdentity { client_id, scope } => {
                match (var("IDENTITY_ENDPOINT"), var("IDENTITY_HEADER")) {
                    (Some(endpoint), Some(header)) => Fetch::AppService {
                        endpoint,
                        header: Secret::new(header),
                        resource: resource(scope),
                        client_id: client_id.clone(),
                    },
                    _ => Fetch::Imds {
                        url: format!(
                            "{}{IMDS_PATH}",
                            var("AZURE_POD_IDENTITY_AUTHORITY_HOST")
                                .as_deref()
                                .unwrap_or(IMDS)
                                .trim_end_matches('/')
                        ),
                        resource: resource(scope),
                        client_id: client_id.clone(),
                    },
                }
            }
            Credential::WorkloadIdentity {
                tenant_id,
                client_id,
                scope,
            } => {
                let or_env = |v: &Option<String>, name: &str| {
                    v.clone()
                        .or_else(|| var(name))
                        .ok_or_else(|| format!("{name} is not set (and the credential names none)"))
                };
                let tenant = or_env(tenant_id, "AZURE_TENANT_ID")?;
                let file = var("AZURE_FEDERATED_TOKEN_FILE")
                    .ok_or("AZURE_FEDERATED_TOKEN_FILE is not set")?;
                Fetch::Authority {
                    url: format!("{}/{tenant}/oauth2/v2.0/token", authority()),
                    client_id: or_env(client_id, "AZURE_CLIENT_ID")?,
                    proof: Proof::AssertionFile(file.into()),
                    scope: scope.clone(),
                }
            }
            Credential::ClientSecret {
                tenant_id,
                client_id,
                client_secret,
                scope,
            } => Fetch::Authority {
                url: format!("{}/{tenant_id}/oauth2/v2.0/token", authority()),
                client_id: client_id.clone(),
                proof: Proof::Secret(client_secret.clone()),
                scope: scope.clone(),
            },
        }))
    }

    /// Where tokens come from, for `--check-config` and the logs: endpoints and the
    /// variables that chose them, never a secret.
    pub fn describe(&self) -> String {
        match self {
            Fetch::AppService {
                endpoint,
                client_id,
                ..
            } => format!(
                "identity endpoint {endpoint} (IDENTITY_ENDPOINT, IDENTITY_HEADER), {}",
                who(client_id)
            ),
            Fetch::Imds { url, client_id, .. } => format!(
                "IMDS {url} (AZURE_POD_IDENTITY_AUTHORITY_HOST replaces its host), {}",
                who(client_id)
            ),
            Fetch::Authority {
                url,
                client_id,
                proof,
                ..
            } => format!(
                "authority {url} (AZURE_AUTHORITY_HOST), client {client_id}, {}",
                match proof {
                    Proof::Secret(_) => "client secret from the configuration".to_string(),
                    Proof::AssertionFile(f) => format!(
                        "assertion from {} (AZURE_FEDERATED_TOKEN_FILE)",
                        f.display()
                    ),
                }
            ),
        }
    }

    /// Asks for one token. The error says what the service answered (its status and
    /// error code) or why it could not be reached; never a secret.
    pub fn token(&self, agent: &ureq::Agent) -> Result<Got, String> {
        let sent = match self {
            Fetch::AppService {
                endpoint,
                header,
                resource,
                client_id,
            } => identity(
                agent,
                endpoint,
                ("2019-08-01", ("X-IDENTITY-HEADER", header.expose())),
                resource,
                client_id,
            ),
            Fetch::Imds {
                url,
                resource,
                client_id,
            } => identity(
                agent,
                url,
                ("2018-02-01", ("Metadata", "true")),
                resource,
                client_id,
            ),
            Fetch::Authority {
                url,
                client_id,
                proof,
                scope,
            } => {
                let proof = match proof {
                    Proof::Secret(s) => ("client_secret", s.clone()),
                    Proof::AssertionFile(f) => match std::fs::read_to_string(f) {
                        Ok(a) => ("client_assertion", Secret::new(a.trim())),
                        Err(e) => return Err(format!("cannot read {}: {e}", f.display())),
                    },
                };
                let mut form = vec![
                    ("grant_type", "client_credentials"),
                    ("client_id", client_id.as_str()),
                    ("scope", scope.as_str()),
                    (proof.0, proof.1.expose()),
                ];
                if proof.0 == "client_assertion" {
                    form.push(("client_assertion_type", ASSERTION_TYPE));
                }
                agent.post(url).send_form(form)
            }
        };
        let mut response = sent.map_err(|e| match e {
            ureq::Error::Timeout(_) => "no answer in time".to_string(),
            e => format!("could not be reached: {e}"),
        })?;
        let status = response.status().as_u16();
        let body: Value = response
            .body_mut()
            .with_config()
            .limit(64 * 1024)
            .read_to_vec()
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        if !(200..300).contains(&status) {
            return Err(error_code(status, &body));
        }
        parse(&body, SystemTime::now())
    }
}

/// The agent for token fetches: short timeouts, error statuses read as answers, and
/// no redirect (it would carry a secret elsewhere).
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_global(Some(FETCH_TIMEOUT))
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into()
}

/// A managed identity's token request: `GET url` on its api-version, with the header
/// that proves the caller runs on the host.
fn identity(
    agent: &ureq::Agent,
    url: &str,
    (version, header): (&str, (&str, &str)),
    resource: &str,
    client_id: &Option<String>,
) -> Result<ureq::http::Response<ureq::Body>, ureq::Error> {
    let mut r = agent
        .get(url)
        .query("api-version", version)
        .query("resource", resource)
        .header(header.0, header.1);
    if let Some(id) = client_id {
        r = r.query("client_id", id);
    }
    r.call()
}

fn who(client_id: &Option<String>) -> String {
    match client_id {
        Some(id) => format!("user-assigned identity {id}"),
        None => "the system-assigned identity".into(),
    }
}

/// A failed answer as the logs and `--check-config --credentials` tell it: the status,
/// the OAuth error code and Entra's AADSTS number (the description may quote what was
/// sent, so it is left out).
fn error_code(status: u16, body: &Value) -> String {
    let mut out = format!("HTTP {status}");
    if let Some(code) = body["error"].as_str() {
        out.push(' ');
        out.push_str(&crate::observe::logging::Clean(code).to_string());
    }
    if let Some(n) = body["error_codes"].get(0).and_then(Value::as_u64) {
        out.push_str(&format!(" (AADSTS{n})"));
    }
    out
}

/// A token answer: `access_token`, and its life from `expires_in` (a number from the
/// authority, a string from IMDS and App Service), else `expires_on` (seconds since
/// the epoch, a string), else short.
fn parse(body: &Value, now: SystemTime) -> Result<Got, String> {
    let token = body["access_token"]
        .as_str()
        .filter(|t| !t.is_empty())
        .ok_or("the answer has no access_token")?;
    let seconds = |v: &Value| match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    let life = seconds(&body["expires_in"])
        .map(Duration::from_secs)
        .or_else(|| {
            let on = UNIX_EPOCH + Duration::from_secs(seconds(&body["expires_on"])?);
            Some(on.duration_since(now).unwrap_or_default())
        })
        .unwrap_or(SHORT_LIFE)
        .min(LONGEST_LIFE);
    Ok(Got {
        token: Secret::new(token),
        life,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn life(body: Value) -> Duration {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        parse(&body, now).map(|g| g.life).unwrap()
    }

    #[test]
    fn expiry_as_each_service_writes_it() {
        // The authority's v2 endpoint.
        assert_eq!(
            life(json!({"access_token": "t", "expires_in": 3599})).as_secs(),
            3599
        );
        // IMDS: strings.
        assert_eq!(
            life(json!({"access_token": "t", "expires_in": "3599", "expires_on": "1003599"}))
                .as_secs(),
            3599
        );
        // App Service: only expires_on, a string.
        assert_eq!(
            life(json!({"access_token": "t", "expires_on": "1000600"})).as_secs(),
            600
        );
        // Already past: no life at all.
        assert_eq!(
            life(json!({"access_token": "t", "expires_on": 999_000})),
            Duration::ZERO
        );
        // Unreadable or absent: short.
        assert_eq!(
            life(json!({"access_token": "t", "expires_in": "soon"})),
            SHORT_LIFE
        );
        assert_eq!(life(json!({"access_token": "t"})), SHORT_LIFE);
        assert_eq!(
            life(json!({"access_token": "t", "expires_in": u64::MAX})),
            LONGEST_LIFE
        );
        assert!(parse(&json!({"expires_in": 5}), SystemTime::now()).is_err());
    }

    #[test]
    fn errors_give_codes_not_descriptions() {
        let body = json!({"error": "invalid_client", "error_description": "AADSTS7000215: secret s3cr3t", "error_codes": [7000215]});
        assert_eq!(
            error_code(401, &body),
            "HTTP 401 invalid_client (AADSTS7000215)"
        );
        assert_eq!(error_code(503, &Value::Null), "HTTP 503");
    }

    #[test]
    fn endpoints_follow_the_environment() {
        let mi = Credential::ManagedIdentity {
            client_id: None,
            scope: crate::config::DEFAULT_SCOPE.into(),
        };
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let imds = Fetch::new(&mi, env(&[])).unwrap().unwrap();
        assert!(matches!(&imds, Fetch::Imds { url, resource, .. }
            if url == "http://169.254.169.254/metadata/identity/oauth2/token"
            && resource == "https://cognitiveservices.azure.com"));
        let pod = Fetch::new(
            &mi,
            env(&[("AZURE_POD_IDENTITY_AUTHORITY_HOST", "http://127.0.0.1:9/")]),
        )
        .unwrap()
        .unwrap();
        assert!(
            matches!(&pod, Fetch::Imds { url, .. } if url == "http://127.0.0.1:9/metadata/identity/oauth2/token")
        );
        let app = Fetch::new(
            &mi,
            env(&[
                ("IDENTITY_ENDPOINT", "http://e/msi"),
                ("IDENTITY_HEADER", "h"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert!(matches!(app, Fetch::AppService { .. }));
        let wi = Credential::WorkloadIdentity {
            tenant_id: None,
            client_id: None,
            scope: crate::config::DEFAULT_SCOPE.into(),
        };
        let e = Fetch::new(
            &wi,
            env(&[("AZURE_TENANT_ID", "t"), ("AZURE_CLIENT_ID", "c")]),
        )
        .unwrap_err();
        assert!(e.contains("AZURE_FEDERATED_TOKEN_FILE"), "{e}");
        let wi = Fetch::new(
            &wi,
            env(&[
                ("AZURE_TENANT_ID", "t"),
                ("AZURE_CLIENT_ID", "c"),
                ("AZURE_FEDERATED_TOKEN_FILE", "/f"),
                ("AZURE_AUTHORITY_HOST", "login.microsoftonline.us"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert!(
            matches!(&wi, Fetch::Authority { url, .. } if url == "https://login.microsoftonline.us/t/oauth2/v2.0/token")
        );
    }
}
