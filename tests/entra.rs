//! Keyless Azure: instances with a Microsoft Entra ID `credential`, through the real
//! binary. The test identity endpoint and authority are HTTP servers these tests start,
//! given to the proxy by the variables the Azure SDKs read (`IDENTITY_ENDPOINT`,
//! `AZURE_POD_IDENTITY_AUTHORITY_HOST`, `AZURE_AUTHORITY_HOST`, ...), and the upstream
//! takes only their unexpired tokens.

mod common;
use common::entra::{authority, bearer_upstream, identity_endpoint, Identity, Issuer, Proof};
use common::{post_json, send, wait_until, Mock, Running, TempDir, BIN};
use serde_json::{json, Value};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECRET: &str = "cs-Secret~8Q~not-for-logs-4711";
const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const CLIENT: &str = "0f7e4a1c-5b2d-4c3e-9a8b-1d2e3f4a5b6c";

/// The binary on `yaml` (with a free port), with only `env` in its environment.
fn start(yaml: &str, env: &[(&str, String)]) -> Running {
    let dir = TempDir::new();
    dir.write("base.yaml", &format!("host: 127.0.0.1\nport: 0\n{yaml}"));
    let mut cmd = Command::new(BIN);
    cmd.env_clear().arg("--config-dir").arg(&dir.0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut running = Running::start(&mut cmd);
    running.dir = Some(dir);
    running
}

/// One instance for `model` on `upstream`, authenticated by `credential` (YAML).
fn instance(name: &str, upstream: &Mock, priority: u32, model: &str, credential: &str) -> String {
    format!(
        "  - {{name: {name}, api_base: '{}', api_version: 2024-10-21, priority: {priority}, supported_models: [{model}], credential: {credential}}}\n",
        upstream.url
    )
}

fn chat(proxy: &Running, model: &str) -> common::Answer {
    post_json(
        &proxy.url("/v1/chat/completions"),
        &json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}),
    )
}

fn get_json(proxy: &Running, path: &str) -> Value {
    send("GET", &proxy.url(path), &[], None).json()
}

/// Waits until `/health` says `name` is unavailable for want of a token.
fn wait_unavailable(proxy: &Running, name: &str) {
    assert!(
        wait_until(Duration::from_secs(10), || {
            get_json(proxy, "/health")["unavailable"][name] == "credential"
        }),
        "{name} never became unavailable"
    );
}

/// The bearer token an upstream request carried.
fn bearer(r: &common::Recorded) -> String {
    assert!(r.header("api-key").is_none(), "an api-key was sent");
    r.header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_else(|| panic!("no bearer token: {:?}", r.headers))
        .to_string()
}

/// A test authority for the client secret, and the variable that points at it.
fn secret_authority(issuer: &Issuer) -> (Mock, (&'static str, String)) {
    let mock = Mock::start(authority(
        issuer.clone(),
        TENANT,
        CLIENT,
        Proof::Secret(SECRET),
    ));
    let host = ("AZURE_AUTHORITY_HOST", mock.url.clone());
    (mock, host)
}

const CLIENT_SECRET: &str = "{type: client_secret, tenant_id: '${AZURE_TENANT_ID}', client_id: '${AZURE_CLIENT_ID}', client_secret: '${AZURE_CLIENT_SECRET}'}";

fn secret_env() -> Vec<(&'static str, String)> {
    vec![
        ("AZURE_TENANT_ID", TENANT.into()),
        ("AZURE_CLIENT_ID", CLIENT.into()),
        ("AZURE_CLIENT_SECRET", SECRET.into()),
    ]
}

/// The binary with one instance (`name`, for `model`) on `upstream`, authenticated by
/// `credential`.
fn start_one(
    upstream: &Mock,
    name: &str,
    model: &str,
    credential: &str,
    env: &[(&str, String)],
) -> Running {
    let yaml = format!(
        "instances:\n{}",
        instance(name, upstream, 1, model, credential)
    );
    start(&yaml, env)
}

/// A proxy with one instance (`sp`, model `m`) on a client secret, its tokens living
/// `life`: the issuer, the upstream, the authority and the proxy.
fn with_client_secret(life: Duration) -> (Issuer, Mock, Mock, Running) {
    let issuer = Issuer::new(life);
    let upstream = Mock::start(bearer_upstream(issuer.clone()));
    let (auth, host) = secret_authority(&issuer);
    let mut env = secret_env();
    env.push(host);
    let proxy = start_one(&upstream, "sp", "m", CLIENT_SECRET, &env);
    (issuer, upstream, auth, proxy)
}

#[test]
fn each_credential_type_serves_requests_with_a_bearer_token_and_no_key() {
    let issuer = Issuer::new(Duration::from_secs(3600));
    let upstream = Mock::start(bearer_upstream(issuer.clone()));
    let imds = Mock::start(identity_endpoint(issuer.clone(), Identity::Imds));
    let (auth, host) = secret_authority(&issuer);
    let dir = TempDir::new();
    let assertion_file = dir.0.join("azure-identity-token");
    std::fs::write(&assertion_file, "assertion-one\n").unwrap();
    let wi_authority = Mock::start(authority(
        issuer.clone(),
        TENANT,
        CLIENT,
        Proof::Assertion(Arc::new(Mutex::new("assertion-one".into()))),
    ));
    let fixed = issuer.issue();
    let yaml = format!(
        "instances:\n{}{}{}{}",
        instance(
            "mi",
            &upstream,
            1,
            "m-mi",
            "{type: managed_identity, client_id: user-assigned-1}"
        ),
        instance("sp", &upstream, 1, "m-sp", CLIENT_SECRET),
        instance(
            "wi",
            &upstream,
            1,
            "m-wi",
            "{type: workload_identity, scope: 'https://cognitiveservices.azure.com/.default'}"
        ),
        instance(
            "fixed",
            &upstream,
            1,
            "m-fixed",
            "{type: token, token: '${FIXED_TOKEN}'}"
        ),
    );
    // One authority host for the process: the workload identity's is the secret's
    // authority here, so it gets its own proxy below.
    let mut env = secret_env();
    env.extend([
        ("AZURE_POD_IDENTITY_AUTHORITY_HOST", imds.url.clone()),
        host,
        (
            "AZURE_FEDERATED_TOKEN_FILE",
            assertion_file.display().to_string(),
        ),
        ("FIXED_TOKEN", fixed.clone()),
    ]);
    let proxy = start(&yaml, &env);
    for model in ["m-mi", "m-sp", "m-fixed"] {
        chat(&proxy, model).assert_status(200);
    }
    let seen = upstream.requests();
    assert_eq!(seen.len(), 3, "each served at the first attempt");
    let tokens: Vec<String> = seen.iter().map(bearer).collect();
    assert!(tokens.iter().all(|t| issuer.accepts(t)));
    assert_eq!(tokens[2], fixed, "the static token is sent as it is");
    let asked = &imds.requests()[0];
    assert!(
        asked.target.contains("client_id=user-assigned-1"),
        "a user-assigned identity is asked for by its client id: {}",
        asked.target
    );
    let by_secret = auth
        .requests()
        .iter()
        .filter(|r| String::from_utf8_lossy(&r.body).contains("client_secret="))
        .count();
    assert_eq!(by_secret, 1, "one token for the client secret");
    // The workload identity asked the secret's authority, which refuses an assertion:
    // that instance is unavailable, the others serve.
    wait_unavailable(&proxy, "wi");
    chat(&proxy, "m-wi").assert_status(503);
    chat(&proxy, "m-sp").assert_status(200);
    drop(proxy);

    let mut env = vec![
        ("AZURE_TENANT_ID", TENANT.to_string()),
        ("AZURE_CLIENT_ID", CLIENT.to_string()),
        ("AZURE_AUTHORITY_HOST", wi_authority.url.clone()),
        (
            "AZURE_FEDERATED_TOKEN_FILE",
            assertion_file.display().to_string(),
        ),
    ];
    let proxy = start_one(&upstream, "wi", "m-wi", "workload_identity", &env);
    chat(&proxy, "m-wi").assert_status(200);
    assert_eq!(wi_authority.count(), 1);
    drop(proxy);

    // App Service form: IDENTITY_ENDPOINT and IDENTITY_HEADER.
    let app = Mock::start(identity_endpoint(
        issuer.clone(),
        Identity::AppService {
            header: "app-service-header-value",
        },
    ));
    env = vec![
        ("IDENTITY_ENDPOINT", format!("{}/msi/token", app.url)),
        ("IDENTITY_HEADER", "app-service-header-value".into()),
    ];
    let before = imds.count();
    let proxy = start_one(&upstream, "mi", "m-mi", "managed_identity", &env);
    chat(&proxy, "m-mi").assert_status(200);
    assert_eq!(app.count(), 1);
    assert_eq!(
        imds.count(),
        before,
        "IMDS is not asked when IDENTITY_ENDPOINT is set"
    );
    assert!(issuer.accepts(&bearer(upstream.requests().last().unwrap())));
}

#[test]
fn a_workload_identity_reads_its_rotated_assertion_at_each_refresh() {
    let issuer = Issuer::new(Duration::from_secs(3));
    let upstream = Mock::start(bearer_upstream(issuer.clone()));
    let expected = Arc::new(Mutex::new("assertion-one".to_string()));
    let auth = Mock::start(authority(
        issuer.clone(),
        TENANT,
        CLIENT,
        Proof::Assertion(expected.clone()),
    ));
    let dir = TempDir::new();
    let file = dir.0.join("token");
    std::fs::write(&file, "assertion-one").unwrap();
    let env = [
        ("AZURE_TENANT_ID", TENANT.to_string()),
        ("AZURE_CLIENT_ID", CLIENT.to_string()),
        ("AZURE_AUTHORITY_HOST", auth.url.clone()),
        ("AZURE_FEDERATED_TOKEN_FILE", file.display().to_string()),
    ];
    let proxy = start_one(&upstream, "wi", "m", "workload_identity", &env);
    chat(&proxy, "m").assert_status(200);
    // The kubelet rotates the file; the authority takes only the new assertion.
    std::fs::write(&file, "assertion-two").unwrap();
    *expected.lock().unwrap() = "assertion-two".into();
    let issued = issuer.count();
    assert!(
        wait_until(Duration::from_secs(10), || issuer.count() > issued),
        "no token from the rotated assertion"
    );
    // The old token has expired by now: only the new one can serve.
    std::thread::sleep(issuer.life());
    chat(&proxy, "m").assert_status(200);
}

/// The only long test: 30 s of steady requests on 5-second tokens.
#[test]
fn five_second_tokens_serve_thirty_seconds_of_requests_without_a_failure() {
    let (_, upstream, auth, proxy) = with_client_secret(Duration::from_secs(5));
    chat(&proxy, "m").assert_status(200);
    let before = auth.count();
    let until = Instant::now() + Duration::from_secs(30);
    let mut served = 0;
    while Instant::now() < until {
        let answer = chat(&proxy, "m");
        answer.assert_status(200);
        served += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let fetched = auth.count() - before;
    // A refresh at half a 5 s token's life: about one fetch every 2.5 s, 12 in 30 s
    // (6 would be a refresh at the last moment); never one per request.
    assert!(
        (6..=13).contains(&fetched),
        "{fetched} token fetches for {served} requests in 30 s"
    );
    assert!(served > 100, "only {served} requests in 30 s");
    assert_eq!(
        upstream.count(),
        served + 1,
        "every request served at its first attempt (no 401)"
    );
}

#[test]
fn an_identity_endpoint_down_at_start_makes_only_its_instance_unavailable_until_it_returns() {
    let issuer = Issuer::new(Duration::from_secs(3600));
    issuer.set_down(true);
    let upstream = Mock::start(bearer_upstream(issuer.clone()));
    let imds = Mock::start(identity_endpoint(issuer.clone(), Identity::Imds));
    let fixed = issuer.issue();
    let yaml = format!(
        "instances:\n{}{}",
        instance("east", &upstream, 1, "m", "managed_identity"),
        instance(
            "west",
            &upstream,
            2,
            "m",
            "{type: token, token: '${FIXED}'}"
        ),
    );
    let mut proxy = start(
        &yaml,
        &[
            ("AZURE_POD_IDENTITY_AUTHORITY_HOST", imds.url.clone()),
            ("FIXED", fixed.clone()),
        ],
    );
    // Two failed fetches at least, so that the alert's de-duplication is seen.
    assert!(wait_until(Duration::from_secs(10), || imds.count() >= 2));
    let health = get_json(&proxy, "/health");
    assert_eq!(
        health["unavailable"],
        json!({"east": "credential"}),
        "{health}"
    );
    assert_eq!(health["available_instances"], 1, "{health}");
    let stats = get_json(&proxy, "/stats/health");
    assert_eq!(
        stats["health_status"]["unavailable"],
        json!({"east": "credential"}),
        "{stats}"
    );
    assert_eq!(stats["health_status"]["available_instances"], 1, "{stats}");
    let answer = chat(&proxy, "m");
    answer.assert_status(200);
    assert_eq!(answer.header("x-proxy-instance"), Some("west"));
    assert_eq!(bearer(upstream.requests().last().unwrap()), fixed);
    assert!(
        wait_until(Duration::from_secs(5), || {
            proxy
                .stderr()
                .matches("token fetch failed (no token)")
                .count()
                >= 2
        }),
        "a log line per failed fetch"
    );
    let log = proxy.stderr();
    assert_eq!(
        log.matches("no Microsoft Entra ID token").count(),
        1,
        "one alert, however many fetches failed: {log}"
    );

    issuer.set_down(false);
    assert!(
        wait_until(Duration::from_secs(20), || get_json(&proxy, "/health")
            ["unavailable"]
            == json!({})),
        "the instance did not come back"
    );
    let answer = chat(&proxy, "m");
    answer.assert_status(200);
    assert_eq!(answer.header("x-proxy-instance"), Some("east"));
    assert!(proxy.stderr().contains("token obtained again"));
}

#[test]
fn every_instance_without_a_token_is_a_503_not_a_wait() {
    let issuer = Issuer::new(Duration::from_secs(3600));
    issuer.set_down(true);
    let upstream = Mock::start(bearer_upstream(issuer.clone()));
    let imds = Mock::start(identity_endpoint(issuer.clone(), Identity::Imds));
    let env = [("AZURE_POD_IDENTITY_AUTHORITY_HOST", imds.url.clone())];
    let proxy = start_one(&upstream, "east", "m", "managed_identity", &env);
    // The endpoint's refusal reaches the instance's state just after the endpoint
    // counts the request: wait for the state, not for the count.
    let health = || send("GET", &proxy.url("/health"), &[], None);
    assert!(
        wait_until(Duration::from_secs(10), || health().status == 503),
        "{}",
        String::from_utf8_lossy(&health().body)
    );
    assert!(imds.count() >= 1);
    let answer = chat(&proxy, "m");
    answer.assert_status(503);
    assert!(answer.openai_error()["message"]
        .as_str()
        .unwrap()
        .contains("Entra ID"));
    assert_eq!(upstream.count(), 0);
}

#[test]
fn a_refused_token_is_renewed_once_and_the_request_served() {
    let (issuer, upstream, auth, proxy) = with_client_secret(Duration::from_secs(3600));
    chat(&proxy, "m").assert_status(200);
    assert_eq!(auth.count(), 1);
    // Revoked upstream while the proxy still thinks it valid for an hour.
    issuer.revoke_all();
    let answer = chat(&proxy, "m");
    answer.assert_status(200);
    assert_eq!(answer.header("x-proxy-instance"), Some("sp"));
    assert_eq!(auth.count(), 2, "one refresh for the 401");
    let seen = upstream.requests();
    assert_eq!(seen.len(), 3, "the 401, then the request once more");
    assert_eq!(bearer(&seen[1]), bearer(&seen[0]));
    assert_ne!(bearer(&seen[2]), bearer(&seen[1]));
    // The instance was not taken out: the next request goes straight through.
    chat(&proxy, "m").assert_status(200);
    assert_eq!((auth.count(), upstream.count()), (2, 4));
}

#[test]
fn no_token_or_secret_appears_in_the_log_or_the_admin_endpoints() {
    let issuer = Issuer::new(Duration::from_secs(3));
    let upstream = Mock::start(bearer_upstream(issuer.clone()));
    let (auth, host) = secret_authority(&issuer);
    let app = Mock::start(identity_endpoint(
        issuer.clone(),
        Identity::AppService {
            header: "identity-header-not-for-logs",
        },
    ));
    let fixed = issuer.issue();
    let yaml = format!(
        "logging: {{level: trace}}\ninstances:\n{}{}{}{}",
        instance("sp", &upstream, 1, "m", CLIENT_SECRET),
        instance("mi", &upstream, 2, "m", "managed_identity"),
        instance("fixed", &upstream, 3, "m-fixed", "{type: token, token: '${FIXED}'}"),
        instance("wrong", &upstream, 1, "m-wrong", "{type: client_secret, tenant_id: '${AZURE_TENANT_ID}', client_id: '${AZURE_CLIENT_ID}', client_secret: wrong-secret-not-for-logs}"),
    );
    let mut env = secret_env();
    env.extend([
        host,
        ("IDENTITY_ENDPOINT", format!("{}/msi/token", app.url)),
        ("IDENTITY_HEADER", "identity-header-not-for-logs".into()),
        ("FIXED", fixed.clone()),
    ]);
    let mut proxy = start(&yaml, &env);
    chat(&proxy, "m").assert_status(200);
    chat(&proxy, "m-fixed").assert_status(200);
    wait_unavailable(&proxy, "wrong");
    chat(&proxy, "m-wrong").assert_status(503);
    // A 401 and its renewal, and refreshes.
    issuer.revoke_all();
    chat(&proxy, "m").assert_status(200);
    let fetched = auth.count();
    assert!(wait_until(Duration::from_secs(10), || auth.count() > fetched));
    let mut shown = proxy.stderr();
    for path in [
        "/config",
        "/health",
        "/stats",
        "/stats/windows",
        "/stats/instances",
        "/stats/health",
        "/stats/status",
        "/metrics",
    ] {
        let answer = send("GET", &proxy.url(path), &[], None);
        answer.assert_status(200);
        shown.push_str(&String::from_utf8_lossy(&answer.body));
    }
    let config = get_json(&proxy, "/config");
    assert_eq!(
        config["config"]["instances"][0]["credential"]["type"],
        "client_secret"
    );
    assert_eq!(
        config["config"]["instances"][0]["credential"]["client_secret"],
        "***redacted***"
    );
    let mut secrets = issuer.tokens();
    assert!(secrets.len() >= 4, "{secrets:?}");
    secrets.extend([
        SECRET.to_string(),
        "wrong-secret-not-for-logs".into(),
        "identity-header-not-for-logs".into(),
    ]);
    for secret in &secrets {
        assert!(!shown.contains(secret.as_str()), "{secret} was shown");
    }
    assert!(
        shown.contains("invalid_client (AADSTS7000215)"),
        "the authority's error is told"
    );
}

#[test]
fn check_config_names_each_credential_and_checks_one_token_each() {
    let issuer = Issuer::new(Duration::from_secs(3600));
    let (auth, host) = secret_authority(&issuer);
    let dir = TempDir::new();
    dir.write(
        "base.yaml",
        &format!(
            "instances:\n{}{}{}",
            "  - {name: a, api_base: 'https://a.example.com', api_version: 2024-10-21, supported_models: [m], credential: {type: client_secret, tenant_id: '${AZURE_TENANT_ID}', client_id: '${AZURE_CLIENT_ID}', client_secret: '${AZURE_CLIENT_SECRET}'}}\n",
            "  - {name: b, api_base: 'https://b.example.com', api_version: 2024-10-21, supported_models: [m], credential: {type: client_secret, tenant_id: '${AZURE_TENANT_ID}', client_id: '${AZURE_CLIENT_ID}', client_secret: '${AZURE_CLIENT_SECRET}'}}\n",
            "  - {name: c, api_base: 'https://c.example.com', api_version: 2024-10-21, supported_models: [m], credential: {type: client_secret, tenant_id: '${AZURE_TENANT_ID}', client_id: '${AZURE_CLIENT_ID}', client_secret: not-the-secret}}\n",
        ),
    );
    let run = |extra: &[&str]| {
        let mut cmd = Command::new(BIN);
        cmd.env_clear()
            .arg("--config-dir")
            .arg(&dir.0)
            .arg("--check-config")
            .args(extra);
        for (k, v) in secret_env().into_iter().chain([host.clone()]) {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let (code, text) = run(&[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("credential client_secret"), "{text}");
    assert!(
        text.contains(&format!(
            "authority {}/{TENANT}/oauth2/v2.0/token (AZURE_AUTHORITY_HOST)",
            auth.url
        )),
        "{text}"
    );
    assert_eq!(auth.count(), 0, "no token is fetched without --credentials");

    let (code, text) = run(&["--credentials"]);
    assert_eq!(code, Some(1), "one credential fails: {text}");
    assert!(
        text.contains("credential check: ok, token obtained"),
        "{text}"
    );
    assert!(text.contains("credential check: as above (ok)"), "{text}");
    assert!(
        text.contains("credential check: FAILED: HTTP 401 invalid_client (AADSTS7000215)"),
        "{text}"
    );
    assert_eq!(auth.count(), 2, "one fetch per distinct credential");
    for secret in issuer
        .tokens()
        .iter()
        .map(String::as_str)
        .chain([SECRET, "not-the-secret"])
    {
        assert!(!text.contains(secret), "{secret} was printed: {text}");
    }
}

#[test]
fn a_reload_picks_up_a_new_static_token() {
    let issuer = Issuer::new(Duration::from_secs(3600));
    let upstream = Mock::start(bearer_upstream(issuer.clone()));
    let (first, second) = (issuer.issue(), issuer.issue());
    let dir = TempDir::new();
    dir.write(
        "base.yaml",
        &format!(
            "host: 127.0.0.1\nport: 0\ninstances:\n{}",
            instance(
                "fixed",
                &upstream,
                1,
                "m",
                "{type: token, token: '${FIXED}'}"
            )
        ),
    );
    let env_file = dir.0.join("env");
    dir.write("env", &format!("FIXED={first}\n"));
    let proxy = Running::start(
        Command::new(BIN)
            .env_clear()
            .arg("--config-dir")
            .arg(&dir.0)
            .arg("--env-file")
            .arg(&env_file),
    );
    chat(&proxy, "m").assert_status(200);
    assert_eq!(bearer(upstream.requests().last().unwrap()), first);
    // The outside tool wrote a new token.
    dir.write("env", &format!("FIXED={second}\n"));
    send("POST", &proxy.url("/config/reload"), &[], None).assert_status(200);
    chat(&proxy, "m").assert_status(200);
    assert_eq!(bearer(upstream.requests().last().unwrap()), second);
}
