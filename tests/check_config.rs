//! `--check-config` as an operator meets it: every problem of a configuration in one
//! run, values quoted when they are no secret, the fix named; and what a migration
//! from the Python proxy plainly means (the same rules hold at start).

mod common;
use common::{TempDir, BIN};
use std::path::Path;
use std::process::{Command, Output};

fn example_config() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config"))
}

/// `--check-config` with `args`, an empty environment but `env`, run in `cwd`.
fn check(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(BIN)
        .env_clear()
        .envs(env.iter().copied())
        .current_dir(cwd)
        .arg("--check-config")
        .args(args)
        .output()
        .unwrap();
    (
        status.code(),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

fn errors(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("error: invalid configuration: "))
        .collect()
}

#[test]
fn every_problem_is_reported_in_one_run_with_values_that_are_no_secret() {
    let dir = TempDir::new();
    dir.write(
        "base.yaml",
        "routing: {strategy: least-loaded}\ninstances:\n\
         - {name: a, api_key: '${KEY_A}', api_base: 'https://a.openai.azure.com', api_version: v, supported_models: [m]}\n\
         - {name: b, api_key: '${KEY_B}', api_base: 'https://b.openai.azure.com', api_version: v, supported_models: [m]}\n",
    );
    let (code, _, stderr) = check(&dir.0, &["--config-dir", "."], &[]);
    assert_eq!(code, Some(1));
    let found = errors(&stderr);
    assert_eq!(found.len(), 3, "{stderr}");
    assert!(found[0].ends_with("instances[0].api_key: environment variable KEY_A is not set (write ${KEY_A:-default} to give a default)"), "{stderr}");
    assert!(
        found[1].contains("environment variable KEY_B is not set"),
        "{stderr}"
    );
    assert!(found[2].ends_with("routing.strategy: unknown value \"least-loaded\" (expected one of failover, weighted, round_robin, least_loaded); did you mean least_loaded?"), "{stderr}");

    // The Python proxy's provider name, and a key pasted where a name goes.
    dir.write(
        "base.yaml",
        "instances:\n- {name: a, provider_type: generic, api_key: sk-secret-1, api_base: 'https://a.example.com', supported_models: [m]}\n",
    );
    let (_, _, stderr) = check(&dir.0, &["--config-dir", "."], &[]);
    assert!(stderr.contains("instances[0].provider_type (instance \"a\"): unknown value \"generic\" (expected one of azure, openai); `generic` is now `openai`"), "{stderr}");
    dir.write(
        "base.yaml",
        "instances:\n- {name: a, provider_type: sk-secret-1, api_key: k, api_base: 'https://a.example.com', supported_models: [m]}\n",
    );
    let (_, _, stderr) = check(&dir.0, &["--config-dir", "."], &[]);
    assert!(
        stderr.contains("unknown value (not shown)") && !stderr.contains("sk-secret"),
        "{stderr}"
    );
}

#[test]
fn empty_keys_and_a_portal_url_are_named_with_their_fix() {
    let dir = TempDir::new();
    dir.write(
        "base.yaml",
        "instances:\n\
         - {name: east, api_key: '${KEY_EAST}', api_base: 'https://east.openai.azure.com/openai/deployments/gpt-4o', api_version: 2024-10-21, supported_models: [gpt-4o]}\n\
         - {name: west, api_key: '${KEY_WEST}', api_base: 'https://west.openai.azure.com', api_version: 2024-10-21, supported_models: [gpt-4o]}\n",
    );
    dir.write("env", "export KEY_EAST=sk-east-secret\nKEY_WEST=\n");
    let (code, _, stderr) = check(&dir.0, &["--config-dir", ".", "--env-file", "env"], &[]);
    assert_eq!(code, Some(1));
    let found = errors(&stderr);
    assert_eq!(found.len(), 2, "{stderr}");
    assert!(found[0].ends_with("instances[0].api_base (instance \"east\"): \"https://east.openai.azure.com/openai/deployments/gpt-4o\" has the path \"/openai/deployments/gpt-4o\", which Azure's resource URL does not have: write api_base: https://east.openai.azure.com (the proxy adds /openai/...; a deployment goes in model_deployments)"), "{stderr}");
    assert!(found[1].ends_with("instances[1].api_key (instance \"west\"): is empty: KEY_WEST is empty in env (--env-file)"), "{stderr}");
    assert!(!stderr.contains("sk-east-secret"), "{stderr}");

    // An unterminated quote is blamed on its line, not on what it spoils later.
    dir.write("env", "KEY_EAST=\"sk-east-secret\nKEY_WEST=k\n");
    let (_, _, stderr) = check(&dir.0, &["--config-dir", ".", "--env-file", "env"], &[]);
    assert_eq!(
        errors(&stderr),
        ["env:1 (--env-file): a quote opened in the value is not closed"],
        "{stderr}"
    );
}

#[test]
fn a_typo_in_environment_and_the_python_layout_are_pointed_out() {
    let config = example_config().display().to_string();
    let (code, _, stderr) = check(
        Path::new("/"),
        &["--config-dir", &config],
        &[("ENVIRONMENT", "prod")],
    );
    assert_eq!(code, Some(1));
    assert!(stderr.contains(&format!("ENVIRONMENT=\"prod\": {config}/prod.yaml not found (overlays in {config}: development, fake, production): set ENVIRONMENT to one of them, or create the file")), "{stderr}");

    let root = TempDir::new();
    std::fs::create_dir_all(root.0.join("app/config")).unwrap();
    std::fs::copy(
        example_config().join("base.yaml"),
        root.0.join("app/config/base.yaml"),
    )
    .unwrap();
    let (code, _, stderr) = check(&root.0, &[], &[]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("config/base.yaml: not found") && stderr.contains("(app/config/base.yaml exists, in the Python proxy's layout: start with --config-dir app/config)"), "{stderr}");
}

#[test]
fn the_legacy_single_instance_replaces_the_examples_and_refuses_beside_real_ones() {
    let legacy = [
        ("API_KEY", "sk-legacy-secret"),
        ("API_BASE", "https://one.openai.azure.com"),
    ];
    let config = example_config().display().to_string();
    let (code, stdout, stderr) = check(Path::new("/"), &["--config-dir", &config], &legacy);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("1 instance(s): default\n"), "{stdout}");
    assert!(stderr.contains("warning: the example instance(s) east-us, west-us of the config files (placeholder keys) are left out: API_KEY/API_BASE define the instance"), "{stderr}");

    // With a real key for one example, the files define a real instance: refused.
    let mut env = legacy.to_vec();
    env.push(("AZURE_OPENAI_KEY_EAST", "sk-east-secret"));
    let (code, _, stderr) = check(Path::new("/"), &["--config-dir", &config], &env);
    assert_eq!(code, Some(1));
    assert_eq!(
        errors(&stderr),
        ["environment: API_KEY and API_BASE are set, but the config files define instances (east-us): unset API_KEY and API_BASE to use the files' instances, or start with --env-only to use API_KEY/API_BASE alone"],
        "{stderr}"
    );
    assert!(!stderr.contains("secret"), "{stderr}");
}
