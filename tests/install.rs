//! `scripts/install.sh` run into a temporary root (`--destdir`): what it installs, that a
//! second run keeps the operator's config and secrets, and `--uninstall`.

mod common;
use common::{TempDir, BIN};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn install(root: &Path, extra: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg("--destdir")
        .arg(root)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn installs_a_service_idempotently_and_uninstalls() {
    let root = TempDir::new();
    let r = |p: &str| root.0.join(p.trim_start_matches('/'));
    let out = install(
        &root.0,
        &[
            "--binary",
            BIN,
            "--prefix",
            "/opt/aop",
            "--user",
            "proxyuser",
        ],
    );
    assert!(out.contains("no systemd actions taken"), "{out}");

    let bin = r("/opt/aop/bin/azure-openai-proxy");
    assert_eq!(mode(&bin), 0o755);
    let version = Command::new(&bin).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("azure-openai-proxy "));
    assert_eq!(
        mode(&r("/etc/azure-openai-proxy/env")),
        0o640,
        "secrets: root writes, the service's group reads (--env-file), others nothing"
    );
    let base = std::fs::read_to_string(r("/etc/azure-openai-proxy/base.yaml")).unwrap();
    assert_eq!(
        base,
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/base.yaml")).unwrap()
    );

    let unit =
        std::fs::read_to_string(r("/etc/systemd/system/azure-openai-proxy.service")).unwrap();
    for line in [
        "ExecStartPre=/opt/aop/bin/azure-openai-proxy --check-config --config-dir /etc/azure-openai-proxy --env-file /etc/azure-openai-proxy/env",
        "ExecStart=/opt/aop/bin/azure-openai-proxy --config-dir /etc/azure-openai-proxy --env-file /etc/azure-openai-proxy/env",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Environment=ENVIRONMENT=production",
        "Restart=on-failure",
        "User=proxyuser",
        "NoNewPrivileges=true",
        "WantedBy=multi-user.target",
    ] {
        assert!(
            unit.lines().any(|l| l == line),
            "missing {line:?} in\n{unit}"
        );
    }
    assert!(
        !unit.contains(root.0.to_str().unwrap()),
        "the unit names real paths, not the staging root"
    );

    assert!(
        !unit.lines().any(|l| l.starts_with("EnvironmentFile=")),
        "systemd would read it at start only: {unit}"
    );

    // The unit's check, as it runs it: empty keys fail, filled-in keys pass.
    let env_file = r("/etc/azure-openai-proxy/env");
    let check = || {
        Command::new(&bin)
            .args(["--check-config", "--config-dir"])
            .arg(r("/etc/azure-openai-proxy"))
            .arg("--env-file")
            .arg(&env_file)
            .env_clear()
            .env("ENVIRONMENT", "production")
            .output()
            .unwrap()
    };
    assert_eq!(check().status.code(), Some(1), "the keys are still empty");
    let template = std::fs::read_to_string(&env_file).unwrap();
    let filled = template
        .replace("KEY_EAST=", "KEY_EAST=k1")
        .replace("BASE_EAST=", "BASE_EAST=https://east.example.com")
        .replace("KEY_WEST=", "KEY_WEST=k2")
        .replace("BASE_WEST=", "BASE_WEST=https://west.example.com");
    std::fs::write(&env_file, filled).unwrap();
    let passed = check();
    assert!(
        passed.status.success(),
        "{}",
        String::from_utf8_lossy(&passed.stderr)
    );

    // Operator edits survive a second run; the binary and unit are refreshed.
    std::fs::write(r("/etc/azure-openai-proxy/base.yaml"), "# edited\n").unwrap();
    std::fs::write(
        r("/etc/azure-openai-proxy/env"),
        "AZURE_OPENAI_KEY_EAST=secret\n",
    )
    .unwrap();
    std::fs::write(&bin, "stale").unwrap();
    install(
        &root.0,
        &[
            "--binary",
            BIN,
            "--prefix",
            "/opt/aop",
            "--user",
            "proxyuser",
        ],
    );
    assert_eq!(
        std::fs::read_to_string(r("/etc/azure-openai-proxy/base.yaml")).unwrap(),
        "# edited\n"
    );
    assert_eq!(
        std::fs::read_to_string(r("/etc/azure-openai-proxy/env")).unwrap(),
        "AZURE_OPENAI_KEY_EAST=secret\n"
    );
    assert_eq!(
        std::fs::metadata(&bin).unwrap().len(),
        std::fs::metadata(BIN).unwrap().len()
    );

    // --redis-url: the URL (with its password) in the env file only, named in
    // production.yaml once however often it runs; the config then checks.
    for url in ["redis://:old@cache:6379/0", "redis://:pw%&1@cache:6380/2"] {
        install(
            &root.0,
            &["--binary", BIN, "--prefix", "/opt/aop", "--redis-url", url],
        );
    }
    assert_eq!(
        std::fs::read_to_string(r("/etc/azure-openai-proxy/env")).unwrap(),
        "AZURE_OPENAI_KEY_EAST=secret\nREDIS_URL=redis://:pw%&1@cache:6380/2\n"
    );
    assert_eq!(mode(&r("/etc/azure-openai-proxy/env")), 0o640);
    let production = std::fs::read_to_string(r("/etc/azure-openai-proxy/production.yaml")).unwrap();
    assert_eq!(
        production.matches("url: ${REDIS_URL}").count(),
        1,
        "{production}"
    );
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/base.yaml"),
        r("/etc/azure-openai-proxy/base.yaml"),
    )
    .unwrap();
    let with_redis = template
        .replace("KEY_EAST=", "KEY_EAST=k1")
        .replace("BASE_EAST=", "BASE_EAST=https://east.example.com")
        .replace("KEY_WEST=", "KEY_WEST=k2")
        .replace("BASE_WEST=", "BASE_WEST=https://west.example.com")
        + "REDIS_URL=redis://:pw@cache:6380/2\n";
    std::fs::write(&env_file, with_redis).unwrap();
    let checked = check();
    let said = String::from_utf8_lossy(&checked.stderr).into_owned()
        + &String::from_utf8_lossy(&checked.stdout);
    assert!(checked.status.success(), "{said}");
    assert!(!said.contains(":pw@"), "{said}");

    let out = install(&root.0, &["--uninstall", "--prefix", "/opt/aop"]);
    assert!(out.contains("is kept"), "{out}");
    assert!(!bin.exists() && !r("/etc/systemd/system/azure-openai-proxy.service").exists());
    assert!(
        r("/etc/azure-openai-proxy/env").exists(),
        "keys are not deleted"
    );
    install(&root.0, &["--uninstall", "--prefix", "/opt/aop"]); // twice is fine
}

#[test]
fn help_prints_the_scripts_comment_and_nothing_of_its_code() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install.sh");
    let out = Command::new("bash")
        .args([script, "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.starts_with("Installs the proxy"), "{help}");
    assert!(
        help.contains("--uninstall") && help.contains("--env-file"),
        "{help}"
    );
    assert!(!help.contains("set -euo") && !help.contains('#'), "{help}");
}

#[test]
fn a_managed_identity_install_holds_no_key() {
    let root = TempDir::new();
    let r = |p: &str| root.0.join(p.trim_start_matches('/'));
    install(&root.0, &["--binary", BIN, "--managed-identity"]);
    let etc = r("/etc/azure-openai-proxy");
    let env_file = etc.join("env");
    let template = std::fs::read_to_string(&env_file).unwrap();
    assert!(!template.contains("KEY"), "{template}");
    for f in ["base.yaml", "production.yaml"] {
        let yaml = std::fs::read_to_string(etc.join(f)).unwrap();
        assert!(!yaml.contains("api_key"), "{f}: {yaml}");
        assert!(yaml.contains("credential: managed_identity"), "{f}: {yaml}");
    }
    let filled = template
        .replace("BASE_EAST=", "BASE_EAST=https://east.example.com")
        .replace("BASE_WEST=", "BASE_WEST=https://west.example.com");
    std::fs::write(&env_file, filled).unwrap();
    let out = Command::new(r("/usr/local/bin/azure-openai-proxy"))
        .args(["--check-config", "--config-dir"])
        .arg(&etc)
        .arg("--env-file")
        .arg(&env_file)
        .env_clear()
        .env("ENVIRONMENT", "production")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.matches("credential managed_identity").count(),
        2,
        "{stdout}"
    );
}
