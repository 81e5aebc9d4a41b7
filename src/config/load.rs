//! Builds the effective `Config` from its sources (DESIGN §4), in order: the files'
//! `layers`, the `legacy` environment variables, then typing and validation, every
//! problem named with its `provenance`. Owns `Source` (what to read, again on reload)
//! and `Loaded` (the result, its origins and warnings).

use super::layers::{self, UNSET};
use super::legacy::{self, Legacy};
use super::provenance::{describe_path, Provenance};
use super::schema::Config;
use super::validate::Invalid;
use super::{diagnose, env_file, migration};
use super::{ConfigError, Env};
use serde_yaml::{Mapping, Value};
use std::path::{Path, PathBuf};

/// A loaded config, where it came from (for the start-up log and `--check-config`), and
/// what in it is probably not what the operator meant.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    /// The files read, in order.
    pub sources: Vec<PathBuf>,
    /// For each instance, in config order, the files and variables that set it.
    pub origins: Vec<String>,
    /// Loads, but is probably a mistake: ignored variables, placeholder keys. Never a
    /// value.
    pub warnings: Vec<String>,
    prov: Provenance,
}

impl Loaded {
    /// The file or variable that set `path` (`logging.file`), for a message about it.
    pub fn source_of(&self, path: &str) -> String {
        self.prov.source(path)
    }
}

/// Where the configuration comes from, kept so it can be read again on reload.
#[derive(Debug, Clone, Default)]
pub struct Source {
    /// Where `base.yaml` and `{ENVIRONMENT}.yaml` are; `None` (`--env-only`) reads no
    /// file, so the environment variables alone define the instances.
    pub dir: Option<PathBuf>,
    /// The process environment at start. Nothing outside a process can change its
    /// environment, so every reload sees this same one.
    pub env: Env,
    /// `--env-file`: read on every load, its variables over `env`, so that a reload
    /// picks up a rotated key.
    pub env_file: Option<PathBuf>,
    /// `--host` and `--port`: over the configuration's `host` and `port` (the only way
    /// to set them with `--env-only`).
    pub host: Option<String>,
    pub port: Option<u16>,
}

impl Source {
    pub fn load(&self) -> Result<Loaded, ConfigError> {
        let mut env = self.env.clone();
        let file_vars = match &self.env_file {
            Some(path) => Some(env_file::read(path)?),
            None => None,
        };
        env.extend(file_vars.clone().unwrap_or_default());
        let from_file = self.env_file.as_deref().zip(file_vars.as_ref());
        let mut loaded = load_with(self.dir.as_deref(), &env, from_file)?;
        // Here, so that the start, `--check-config` and every reload name them alike.
        let usage_warnings = super::api_version::stream_usage_warnings(&loaded.config.instances);
        loaded.warnings.extend(usage_warnings);
        if let Some(host) = &self.host {
            loaded.config.host = host.clone();
        }
        if let Some(port) = self.port {
            loaded.config.port = port;
        }
        Ok(loaded)
    }
}

/// Reads `dir`'s files (none when `dir` is `None`), then the legacy variables of `env`
/// (the tests' shorthand: the binary goes through `Source::load`).
#[cfg(test)]
pub(super) fn load(dir: Option<&Path>, env: &Env) -> Result<Loaded, ConfigError> {
    load_with(dir, env, None)
}

/// `load`, knowing the variables the `--env-file` gave (to name it when one of them
/// is wrong). Reports every problem it can find in one pass, one per line: all unset
/// variables, a missing overlay, a type error, and each instance's empty key or
/// misplaced path; a later check whose input an earlier problem spoiled is skipped.
fn load_with(
    dir: Option<&Path>,
    env: &Env,
    env_file: Option<(&Path, &Env)>,
) -> Result<Loaded, ConfigError> {
    let mut merged = Mapping::new();
    let mut prov = Provenance::default();
    let mut sources = Vec::new();
    let mut errors = Vec::new();
    let fail = |mut errors: Vec<String>| {
        // The files' variables are unset, and the environment has instances of its own.
        if dir.is_some()
            && env.contains_key("API_INSTANCES")
            && errors.iter().any(|e| e.contains(UNSET))
        {
            errors.push("environment: API_INSTANCES defines instances: to run on them alone, without the config files' instances, start with --env-only".into());
        }
        ConfigError(errors.join("\n"))
    };
    if let Some(dir) = dir {
        for file in layers::files_of(dir, env)? {
            if let Some(layer) = layers::read_layer(&file, env, &mut errors)? {
                let name = file.display().to_string();
                layers::merge_map(&mut merged, layer, "", &name, &mut prov);
                sources.push(file);
            }
        }
        errors.extend(migration::missing_overlay(dir, env));
    }
    let examples_left_out = match migration::leave_out_examples(&mut merged, env, &mut prov) {
        Ok(warning) => warning,
        Err(e) => {
            errors.push(format!("environment: {e}"));
            return Err(fail(errors));
        }
    };
    let Legacy {
        single: legacy_single,
        mut warnings,
    } = legacy::apply_legacy_env(&mut merged, env, &mut prov)?;
    warnings.extend(examples_left_out);
    if sources.is_empty() && !legacy::env_defines_instances(env) {
        return Err(ConfigError(match dir {
            Some(dir) => format!(
                "{}: not found, and no instance is defined by environment variables (API_KEY + API_BASE, or API_INSTANCES){}",
                dir.join("base.yaml").display(),
                migration::python_layout_hint(dir)
            ),
            None => "--env-only reads no file, and no instance is defined by environment variables (API_KEY + API_BASE, or API_INSTANCES)".to_string(),
        }));
    }
    prov.set_files(&sources);
    let locate = |path: &str| -> String {
        format!("{}: {}", prov.source(path), describe_path(path, &merged))
    };

    // Problems found before (unset variables leave their `${VAR}` in place).
    let earlier = errors.len();
    let mut config: Config = match serde_path_to_error::deserialize(Value::Mapping(merged.clone()))
    {
        Ok(config) => config,
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            let inner =
                diagnose::unknown_value(&path, &inner).unwrap_or_else(|| hide_value(&inner));
            if earlier == 0 || !diagnose::unsubstituted(&merged, &path) {
                errors.push(format!("{}: {inner}", locate(&path)));
            }
            return Err(fail(errors));
        }
    };
    if !errors.is_empty() {
        return Err(fail(errors));
    }
    if legacy_single {
        config.instances[0].serves_any_model = true;
    }
    for inst in &mut config.instances {
        inst.api_base = inst.api_base.trim_end_matches('/').to_string();
    }
    let mut invalid = diagnose::instances(&config, &prov, env, env_file);
    for problem in config.problems() {
        if !invalid.iter().any(|i| i.path == problem.path) {
            invalid.push(diagnose::with_url(problem, &config));
        }
    }
    if !invalid.is_empty() {
        let lines = invalid
            .into_iter()
            .map(|Invalid { path, message }| format!("{}: {message}", locate(&path)));
        return Err(fail(lines.collect()));
    }
    if let (Some(dir), Some(file)) = (dir, &mut config.logging.file) {
        *file = resolve_log_file(dir, file);
    }
    let origins = (0..config.instances.len())
        .map(|i| prov.of_instance(i, &sources))
        .collect();
    for (i, inst) in config.instances.iter().enumerate() {
        if PLACEHOLDER_KEYS
            .iter()
            .any(|p| inst.api_key.expose().contains(p))
        {
            warnings.push(format!(
                "instance {:?}: its api_key (from {}) is a placeholder; the instance is routed to, and its requests fail until a real key is set",
                inst.name,
                prov.source(&format!("instances[{i}].api_key"))
            ));
        }
    }
    Ok(Loaded {
        config,
        sources,
        origins,
        warnings,
        prov,
    })
}

/// Markers of the example keys (`config/base.yaml`'s `replace-me-east`, the Python
/// proxy's README's `your-api-key`): a key that contains one is not a real key.
pub(super) const PLACEHOLDER_KEYS: [&str; 2] = ["replace-me", "your-api-key"];

/// A relative `logging.file` is taken from the config directory's parent, as the Python
/// proxy did (it resolved it against its `app/` package, the parent of `app/config`):
/// its `../logs/app.log` lands beside `app/`, and `logs/app.log` beside `config/`.
fn resolve_log_file(dir: &Path, file: &str) -> String {
    let path = Path::new(file);
    if path.is_absolute() {
        return file.to_string();
    }
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let base = dir.parent().unwrap_or(&dir);
    let mut out = PathBuf::new();
    // Lexically, so that the log shows `/srv/logs/app.log`, not `/srv/app/../logs/app.log`.
    for part in base.join(path).components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out.display().to_string()
}

/// serde's messages quote the value they could not read (`invalid type: string
/// "sk-…", expected u32`). A key pasted into the wrong field must not be printed, so
/// only the kind of value is kept.
fn hide_value(message: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            let (found, expected) = rest.rsplit_once(", expected ").unwrap_or((rest, "?"));
            let kind = found.split([' ', '`', '"']).next().unwrap_or("value");
            return format!("{prefix}a {kind} (not shown), expected {expected}");
        }
    }
    message.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_fixtures::{dir_with, env, BASE};
    use crate::testutil::TempDir;

    #[test]
    fn every_instances_problem_and_the_settings_are_named_in_one_run() {
        let d = dir_with(&[(
            "base.yaml",
            &BASE
                .replace("retries: 2}", "retries: 2, circuit_failures: 0}")
                .replace("max_tpm: ${EAST_TPM:-1000}", "max_tpm: 0")
                .replace("api_key: k2", "api_key: k2\n    weight: 0"),
        )]);
        let e = load(Some(&d.0), &env(&[("EAST_KEY", "k1")])).unwrap_err().0;
        for (key, said) in [
            ("routing.circuit_failures", "must be at least 1"),
            ("instances[0].max_tpm", "must be above 0"),
            ("instances[1].weight", "must be at least 1"),
        ] {
            assert!(
                e.lines().any(|l| l.contains(key) && l.contains(said)),
                "{key}: {e}"
            );
        }
    }

    #[test]
    fn type_error_names_the_file_that_set_the_key() {
        let d = dir_with(&[
            ("base.yaml", BASE),
            (
                "development.yaml",
                "instances: [{name: west, max_tpm: lots}]",
            ),
        ]);
        let e = load(Some(&d.0), &env(&[("EAST_KEY", "k")])).unwrap_err().0;
        assert!(
            e.starts_with(&format!("{}", d.0.join("development.yaml").display())),
            "{e}"
        );
        assert!(
            e.contains("instances[1].max_tpm (instance \"west\")"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_and_strategies_are_rejected_with_their_path() {
        let d = dir_with(&[(
            "base.yaml",
            &BASE.replace("strategy: failover", "strategy: fastest"),
        )]);
        let e = load(Some(&d.0), &env(&[("EAST_KEY", "k")])).unwrap_err().0;
        assert!(
            e.ends_with("routing.strategy: unknown value \"fastest\" (expected one of failover, weighted, round_robin, least_loaded)"),
            "the path, the name given and what it may be: {e}"
        );
        let d = dir_with(&[(
            "base.yaml",
            &BASE.replace("strategy: failover", "strategy: sk-proj-pasted-here"),
        )]);
        let e = load(Some(&d.0), &env(&[("EAST_KEY", "k")])).unwrap_err().0;
        assert!(
            e.contains("unknown value (not shown)") && !e.contains("sk-proj"),
            "never what looks like a key: {e}"
        );

        let d = dir_with(&[("base.yaml", &BASE.replace("max_tpm:", "max_tmp:"))]);
        let e = load(Some(&d.0), &env(&[("EAST_KEY", "k")])).unwrap_err().0;
        assert!(e.contains("instances[0]") && e.contains("max_tmp"), "{e}");
    }

    #[test]
    fn validation_errors_name_file_and_key() {
        for (bad, key) in [
            ("max_tpm: ${EAST_TPM:-1000}", "instances[0].max_tpm"),
            (
                "api_base: https://east.example.com/",
                "instances[0].api_base",
            ),
            ("name: west", "instances[1].name"),
        ] {
            let replacement = match key {
                "instances[0].max_tpm" => "max_tpm: 0",
                "instances[0].api_base" => "api_base: east.example.com",
                _ => "name: east",
            };
            let d = dir_with(&[("base.yaml", &BASE.replace(bad, replacement))]);
            let e = load(Some(&d.0), &env(&[("EAST_KEY", "k")])).unwrap_err().0;
            assert!(e.contains("base.yaml") && e.contains(key), "{key}: {e}");
        }
        let d = dir_with(&[("base.yaml", "instances: []")]);
        let e = load(Some(&d.0), &env(&[])).unwrap_err().0;
        assert!(e.contains("base.yaml") && e.contains("no instance"), "{e}");
    }

    #[test]
    fn values_are_never_quoted_back() {
        assert_eq!(
            hide_value(r#"invalid type: string "sk-1, expected x", expected u32"#),
            "invalid type: a string (not shown), expected u32"
        );
        assert_eq!(
            hide_value("missing field `api_key`"),
            "missing field `api_key`"
        );
    }

    #[test]
    fn a_list_where_a_value_belongs_is_named_as_such() {
        let d = dir_with(&[(
            "base.yaml",
            "instances:\n  - {name: a, api_key: [x], api_base: 'https://a.example.com', api_version: v, supported_models: [m]}\n",
        )]);
        let e = load(Some(&d.0), &env(&[])).unwrap_err().0;
        assert!(
            e.contains(
                "instances[0].api_key (instance \"a\"): a single value (a string or a number)"
            ),
            "{e}"
        );
    }

    #[test]
    fn a_typed_environment_names_the_overlays_there_are() {
        let d = dir_with(&[
            ("base.yaml", BASE),
            ("production.yaml", "host: 0.0.0.0"),
            ("staging.yaml", ""),
        ]);
        let e = load(
            Some(&d.0),
            &env(&[("ENVIRONMENT", "prod"), ("EAST_KEY", "k")]),
        )
        .unwrap_err()
        .0;
        assert!(
            e.starts_with(&format!(
                "ENVIRONMENT=\"prod\": {} not found (overlays in {}: production, staging)",
                d.0.join("prod.yaml").display(),
                d.0.display()
            )),
            "{e}"
        );
        // Unset, or `development`, may have no file.
        assert!(load(Some(&d.0), &env(&[("EAST_KEY", "k")])).is_ok());
        assert!(load(
            Some(&d.0),
            &env(&[("ENVIRONMENT", "development"), ("EAST_KEY", "k")])
        )
        .is_ok());
    }

    #[test]
    fn empty_keys_name_their_variable_and_env_file_each() {
        let d = dir_with(&[(
            "base.yaml",
            &BASE.replace("api_key: k2", "api_key: ${WEST_KEY}"),
        )]);
        let file = d.0.join("env");
        std::fs::write(&file, "EAST_KEY=\n").unwrap();
        let source = Source {
            dir: Some(d.0.clone()),
            env: env(&[("WEST_KEY", "")]),
            env_file: Some(file.clone()),
            ..Source::default()
        };
        let e = source.load().unwrap_err().0;
        let base = d.0.join("base.yaml").display().to_string();
        assert_eq!(
            e.lines().collect::<Vec<_>>(),
            [
                format!("{base}: instances[0].api_key (instance \"east\"): is empty: EAST_KEY is empty in {} (--env-file)", file.display()),
                format!("{base}: instances[1].api_key (instance \"west\"): is empty: WEST_KEY is set but empty in the environment"),
            ]
        );
    }

    #[test]
    fn an_azure_api_base_with_a_deployment_path_is_refused_with_the_resource_url() {
        let d = dir_with(&[(
            "base.yaml",
            &BASE.replace(
                "https://west.example.com",
                "https://west.openai.azure.com/openai/deployments/gpt-4o",
            ),
        )]);
        let e = load(Some(&d.0), &env(&[("EAST_KEY", "k")])).unwrap_err().0;
        assert!(
            e.contains("instances[1].api_base (instance \"west\"): \"https://west.openai.azure.com/openai/deployments/gpt-4o\" has the path \"/openai/deployments/gpt-4o\"")
                && e.contains("write api_base: https://west.openai.azure.com ("),
            "{e}"
        );
    }

    #[test]
    fn the_python_layout_is_pointed_at() {
        let root = TempDir::new("layout");
        std::fs::create_dir_all(root.0.join("app/config")).unwrap();
        std::fs::write(root.0.join("app/config/base.yaml"), BASE).unwrap();
        let e = load(Some(&root.0.join("config")), &env(&[])).unwrap_err().0;
        assert!(
            e.ends_with(&format!(
                "(API_KEY + API_BASE, or API_INSTANCES) ({} exists, in the Python proxy's layout: start with --config-dir {})",
                root.0.join("app/config/base.yaml").display(),
                root.0.join("app/config").display()
            )),
            "{e}"
        );
    }

    #[test]
    fn env_only_reads_no_file() {
        let d = dir_with(&[("base.yaml", BASE)]);
        let e = env(&[("API_KEY", "k"), ("API_BASE", "https://one.example.com")]);
        let loaded = load(None, &e).unwrap();
        assert!(loaded.sources.is_empty());
        assert_eq!(loaded.config.instances.len(), 1);
        assert_eq!(loaded.origins, ["environment (API_KEY/API_BASE)"]);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        let from_dir = load(
            Some(&d.0),
            &env(&[
                ("EAST_KEY", "k"),
                ("API_KEY", "k"),
                ("API_BASE", "https://one.example.com"),
            ]),
        )
        .unwrap();
        assert_eq!(
            from_dir.config.instances.len(),
            2,
            "the files' instances, one of which reads API_KEY's value"
        );
        let e = load(None, &env(&[])).unwrap_err().0;
        assert!(e.starts_with("--env-only reads no file"), "{e}");
    }

    #[test]
    fn a_relative_log_file_is_taken_from_the_config_directorys_parent() {
        assert_eq!(
            resolve_log_file(Path::new("/srv/proxy/app/config"), "../logs/app.log"),
            "/srv/proxy/logs/app.log"
        );
        assert_eq!(
            resolve_log_file(Path::new("/etc/aop"), "./logs/./app.log"),
            "/etc/logs/app.log"
        );
        assert_eq!(
            resolve_log_file(Path::new("/etc/aop"), "/var/log/a.log"),
            "/var/log/a.log"
        );
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            resolve_log_file(Path::new("config"), "logs/app.log"),
            cwd.join("logs/app.log").display().to_string()
        );
        let d = dir_with(&[(
            "base.yaml",
            &format!("{BASE}logging: {{file: ../logs/app.log}}\n"),
        )]);
        let c = load(Some(&d.0), &env(&[("EAST_KEY", "k")])).unwrap().config;
        let parent = d.0.parent().unwrap().parent().unwrap();
        assert_eq!(
            c.logging.file.as_deref(),
            Some(parent.join("logs/app.log").to_str().unwrap())
        );
    }

    #[test]
    fn an_env_file_is_read_on_every_load_over_the_process_environment() {
        let d = dir_with(&[("base.yaml", BASE)]);
        let file = d.0.join("env");
        std::fs::write(&file, "EAST_KEY=from-file-1\n").unwrap();
        let source = Source {
            dir: Some(d.0.clone()),
            env: env(&[("EAST_KEY", "from-process")]),
            env_file: Some(file.clone()),
            ..Source::default()
        };
        let key = |s: &Source| {
            s.load().unwrap().config.instances[0]
                .api_key
                .expose()
                .to_string()
        };
        assert_eq!(key(&source), "from-file-1");
        std::fs::write(&file, "EAST_KEY='from-file-2'\n").unwrap();
        assert_eq!(key(&source), "from-file-2", "read again");
        std::fs::remove_file(&file).unwrap();
        let e = source.load().unwrap_err().0;
        assert!(e.contains("(--env-file): cannot read"), "{e}");
    }
}
