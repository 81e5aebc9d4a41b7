//! Builds the effective `Config` from its sources (DESIGN §4): `base.yaml`, then
//! `{ENVIRONMENT}.yaml`, deep-merged (instances by name), `${VAR}` substitution inside
//! each file, then the legacy environment variables. Every key remembers which source
//! set it last, so a type or validation error names the file (or variable) to fix.

use super::schema::{Config, Invalid};
use super::{diagnose, env_file, migration};
use super::{ConfigError, Env};
use serde_yaml::{Mapping, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Keys where an unset `${VAR}` without a default means "off" instead of an error.
const OPTIONAL_KEYS: [&str; 3] = ["logging.feishu_webhook", "logging.file", "auth.admin_key"];

const LEGACY_FIELDS: [(&str, &str); 10] = [
    ("API_KEY", "api_key"),
    // `managed_identity` or `workload_identity`: Entra ID in place of API_KEY.
    ("CREDENTIAL", "credential"),
    ("API_BASE", "api_base"),
    ("API_VERSION", "api_version"),
    ("PRIORITY", "priority"),
    ("WEIGHT", "weight"),
    ("MAX_TPM", "max_tpm"),
    ("MAX_RPM", "max_rpm"),
    ("PROVIDER_TYPE", "provider_type"),
    ("SUPPORTED_MODELS", "supported_models"),
];

const DEFAULT_API_VERSION: &str = "2024-10-21";

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
        if let Some(host) = &self.host {
            loaded.config.host = host.clone();
        }
        if let Some(port) = self.port {
            loaded.config.port = port;
        }
        Ok(loaded)
    }
}

/// Which source set each key path (`routing.strategy`, `instances[1].api_key`).
#[derive(Default, Debug)]
pub(super) struct Provenance {
    pub(super) by_path: HashMap<String, String>,
    /// The files read, joined: the source of a key no file or variable set (a default).
    files: String,
}

impl Provenance {
    fn set(&mut self, path: &str, source: &str) {
        self.by_path.insert(path.to_string(), source.to_string());
    }

    /// The source of `path` or of its nearest ancestor that has one.
    fn of(&self, path: &str) -> Option<&str> {
        let mut p = path;
        loop {
            if let Some(s) = self.by_path.get(p) {
                return Some(s);
            }
            p = &p[..p.rfind(['.', '['])?];
        }
    }

    /// `of`, else the files, else "environment".
    pub(super) fn source(&self, path: &str) -> String {
        match self.of(path) {
            Some(s) => s.to_string(),
            None if self.files.is_empty() => "environment".to_string(),
            None => self.files.clone(),
        }
    }

    /// Every source that set something of instance `i`: its files in the order they
    /// were read, then its environment variables by name.
    fn of_instance(&self, i: usize, files: &[PathBuf]) -> String {
        let at = format!("instances[{i}]");
        let mut set: Vec<&str> = self
            .by_path
            .iter()
            .filter(|(path, _)| {
                path.strip_prefix(&at)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
            })
            .map(|(_, source)| source.as_str())
            .collect();
        let rank = |s: &str| {
            files
                .iter()
                .position(|f| f.display().to_string() == s)
                .unwrap_or(files.len())
        };
        set.sort_by_key(|s| (rank(s), *s));
        set.dedup();
        let (vars, named): (Vec<&str>, Vec<&str>) = set
            .iter()
            .partition(|s| s.starts_with("environment variable"));
        let mut parts: Vec<String> = named.iter().map(|s| s.to_string()).collect();
        if !vars.is_empty() {
            let names: Vec<&str> = vars
                .iter()
                .filter_map(|s| {
                    s.strip_prefix("environment variables ")
                        .or_else(|| s.strip_prefix("environment variable "))
                })
                .collect();
            parts.push(format!("environment ({})", names.join(", ")));
        }
        parts.join(" + ")
    }
}

/// Reads `dir`'s files (none when `dir` is `None`), then the legacy variables of `env`
/// (the tests' shorthand: the binary goes through `Source::load`).
#[cfg(test)]
fn load(dir: Option<&Path>, env: &Env) -> Result<Loaded, ConfigError> {
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
        for file in files_of(dir, env)? {
            if let Some(layer) = read_layer(&file, env, &mut errors)? {
                let name = file.display().to_string();
                merge_map(&mut merged, layer, "", &name, &mut prov);
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
    } = apply_legacy_env(&mut merged, env, &mut prov)?;
    warnings.extend(examples_left_out);
    if sources.is_empty() && !env_defines_instances(env) {
        return Err(ConfigError(match dir {
            Some(dir) => format!(
                "{}: not found, and no instance is defined by environment variables (API_KEY + API_BASE, or API_INSTANCES){}",
                dir.join("base.yaml").display(),
                migration::python_layout_hint(dir)
            ),
            None => "--env-only reads no file, and no instance is defined by environment variables (API_KEY + API_BASE, or API_INSTANCES)".to_string(),
        }));
    }
    prov.files = sources
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" + ");
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
    if let Err(first) = config.validate() {
        if !invalid.iter().any(|i| i.path == first.path) {
            invalid.push(diagnose::with_url(first, &config));
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

/// `base.yaml` and `{ENVIRONMENT}.yaml` in `dir`.
fn files_of(dir: &Path, env: &Env) -> Result<[PathBuf; 2], ConfigError> {
    let environment = env
        .get("ENVIRONMENT")
        .map(String::as_str)
        .unwrap_or("development");
    if environment.is_empty() || environment.contains(['/', '\\', '.']) {
        return Err(ConfigError(format!(
            "ENVIRONMENT={environment:?} is not a plain name (it selects {}/<name>.yaml)",
            dir.display()
        )));
    }
    Ok([
        dir.join("base.yaml"),
        dir.join(format!("{environment}.yaml")),
    ])
}

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

/// `instances[1].api_key` becomes `instances[1].api_key (instance "west")` when it can.
fn describe_path(path: &str, merged: &Mapping) -> String {
    let name = path
        .strip_prefix("instances[")
        .and_then(|rest| rest.split(']').next())
        .and_then(|i| i.parse::<usize>().ok())
        .and_then(|i| {
            merged
                .get("instances")?
                .as_sequence()?
                .get(i)?
                .get("name")?
                .as_str()
        });
    match name {
        Some(name) => format!("{path} (instance {name:?})"),
        None => path.to_string(),
    }
}

/// A file's mapping, its `${VAR}` problems added to `errors` (the value left as
/// written), or why it cannot be read at all.
fn read_layer(
    file: &Path,
    env: &Env,
    errors: &mut Vec<String>,
) -> Result<Option<Mapping>, ConfigError> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ConfigError(format!("{}: cannot read: {e}", file.display()))),
    };
    let name = file.display().to_string();
    let mut value: Value = serde_yaml::from_str(&text)
        .map_err(|e| ConfigError(format!("{name}: invalid YAML: {e}")))?;
    let mut problems = Vec::new();
    substitute(&mut value, "", env, &mut problems);
    errors.extend(problems.into_iter().map(|e| format!("{name}: {e}")));
    match value {
        Value::Null => Ok(Some(Mapping::new())),
        Value::Mapping(m) => Ok(Some(m)),
        _ => Err(ConfigError(format!(
            "{name}: the top level must be a mapping of keys"
        ))),
    }
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

pub(super) fn key_text(k: &Value) -> String {
    match k {
        Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other)
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

/// Replaces `${VAR}` and `${VAR:-default}` in every string value, in place; a value
/// it cannot replace stays as written, and why goes to `errors`.
fn substitute(v: &mut Value, path: &str, env: &Env, errors: &mut Vec<String>) {
    match v {
        Value::String(s) if s.contains("${") => match expand(s, env) {
            Ok(out) => *s = out,
            Err(Unset(_)) if OPTIONAL_KEYS.contains(&path) => *v = Value::Null,
            Err(Unset(var)) => errors.push(format!(
                "{path}: environment variable {var}{UNSET} (write ${{{var}:-default}} to give a default)"
            )),
            Err(Malformed(why)) => errors.push(format!("{path}: {why}")),
        },
        Value::Mapping(m) => {
            for (k, val) in m.iter_mut() {
                substitute(val, &child(path, &key_text(k)), env, errors);
            }
        }
        Value::Sequence(items) => {
            for (i, val) in items.iter_mut().enumerate() {
                substitute(val, &format!("{path}[{i}]"), env, errors);
            }
        }
        _ => {}
    }
}

/// How an unset variable's error ends, after its name.
const UNSET: &str = " is not set";

#[derive(Debug, PartialEq)]
enum ExpandError {
    Unset(String),
    Malformed(String),
}
use ExpandError::{Malformed, Unset};

fn expand(s: &str, env: &Env) -> Result<String, ExpandError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| Malformed("unterminated ${ in value".into()))?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(Malformed(
                "a ${...} is not a valid variable reference (write ${NAME} or ${NAME:-default})"
                    .into(),
            ));
        }
        // As in the shell, `:-` also replaces a variable that is set but empty.
        match (env.get(name), default) {
            (Some(v), Some(d)) if v.is_empty() => out.push_str(d),
            (Some(v), _) => out.push_str(v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => return Err(Unset(name.to_string())),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn merge_map(acc: &mut Mapping, overlay: Mapping, path: &str, src: &str, prov: &mut Provenance) {
    for (k, v) in overlay {
        let key = key_text(&k);
        let here = child(path, &key);
        match (acc.get_mut(&k), v) {
            (Some(Value::Sequence(old)), Value::Sequence(new)) if here == "instances" => {
                merge_instances(old, new, src, prov)
            }
            (Some(Value::Mapping(old)), Value::Mapping(new)) => {
                merge_map(old, new, &here, src, prov)
            }
            (_, v) => {
                prov.set(&here, src);
                if here == "instances" {
                    if let Value::Sequence(items) = &v {
                        for i in 0..items.len() {
                            prov.set(&format!("instances[{i}]"), src);
                        }
                    }
                }
                acc.insert(k, v);
            }
        }
    }
}

fn instance_index(list: &[Value], name: &str) -> Option<usize> {
    list.iter()
        .position(|i| i.get("name").map(key_text).as_deref() == Some(name))
}

fn merge_instances(acc: &mut Vec<Value>, overlay: Vec<Value>, src: &str, prov: &mut Provenance) {
    for item in overlay {
        let found = item
            .get("name")
            .map(key_text)
            .and_then(|n| instance_index(acc, &n));
        match (found, item) {
            (Some(i), Value::Mapping(fields)) if acc[i].is_mapping() => {
                let Value::Mapping(old) = &mut acc[i] else {
                    unreachable!()
                };
                merge_map(old, fields, &format!("instances[{i}]"), src, prov);
            }
            (_, item) => {
                prov.set(&format!("instances[{}]", acc.len()), src);
                acc.push(item);
            }
        }
    }
}

fn env_defines_instances(env: &Env) -> bool {
    env.contains_key("API_INSTANCES")
        || (legacy_auth(env).is_some() && env.contains_key("API_BASE"))
}

/// How the single legacy instance authenticates: `API_KEY`, else `API_CREDENTIAL`
/// (`managed_identity` or `workload_identity`), as the field it sets.
fn legacy_auth(env: &Env) -> Option<(&'static str, &String)> {
    env.get("API_KEY")
        .map(|key| ("api_key", key))
        .or_else(|| env.get("API_CREDENTIAL").map(|c| ("credential", c)))
}

/// The prefixes of an instance's variables: the name upper-cased (the Python proxy's
/// form, `API_INSTANCE_SOUTH-1_`) and, when they differ, with `-` written as `_`
/// (`API_INSTANCE_SOUTH_1_`, the form a shell can export).
pub(super) fn env_prefixes(name: &str) -> Vec<String> {
    let upper = name.to_ascii_uppercase();
    let mut prefixes = vec![format!("API_INSTANCE_{}_", upper.replace('-', "_"))];
    if upper.contains('-') {
        prefixes.push(format!("API_INSTANCE_{upper}_"));
    }
    prefixes
}

/// The model a `MODEL_MAP_{MODEL}` suffix names: lower-cased, `_` read as `-`, as the
/// Python proxy did. `GPT-4O-2024-11-20` and `GPT_4O_2024_11_20` both name
/// `gpt-4o-2024-11-20`.
fn model_of(suffix: &str) -> String {
    suffix.to_ascii_lowercase().replace('_', "-")
}

fn field_value(field: &str, raw: &str) -> Value {
    if field == "supported_models" {
        Value::Sequence(
            raw.split(',')
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(|m| Value::String(m.to_string()))
                .collect(),
        )
    } else {
        Value::String(raw.to_string())
    }
}

/// Sets `model`'s deployment in an (untyped) instance, recording `var` as its source.
fn map_model(
    list: &mut [Value],
    i: usize,
    model: &str,
    deployment: &str,
    var: &str,
    prov: &mut Provenance,
) {
    let Some(inst) = list[i].as_mapping_mut() else {
        return;
    };
    let map = inst
        .entry("model_deployments".into())
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if let Value::Mapping(map) = map {
        map.insert(model.into(), deployment.into());
        // One path per model: each variable stays among the instance's origins.
        prov.set(
            &format!("instances[{i}].model_deployments.{model}"),
            &format!("environment variable {var}"),
        );
    }
}

/// What the legacy variables did beyond the merged configuration.
struct Legacy {
    /// The single instance of `API_KEY`/`API_BASE` was created.
    single: bool,
    warnings: Vec<String>,
}

/// Applies `API_INSTANCES` / `API_INSTANCE_{NAME}_*` (fields and `MODEL_MAP_{MODEL}`),
/// the legacy single instance and the global `MODEL_MAP_*`. A per-instance map is
/// applied last, so it wins over a global one. Variables it does not use, and a single
/// instance it cannot create, become warnings.
fn apply_legacy_env(
    merged: &mut Mapping,
    env: &Env,
    prov: &mut Provenance,
) -> Result<Legacy, ConfigError> {
    let mut legacy = Legacy {
        single: false,
        warnings: Vec::new(),
    };
    let instances = merged
        .entry(Value::String("instances".into()))
        .or_insert_with(|| Value::Sequence(Vec::new()));
    let Value::Sequence(list) = instances else {
        // A wrong type here is reported by deserialization with its file name.
        return Ok(legacy);
    };

    let from_files = list.len();
    let mut names: Vec<String> = list
        .iter()
        .filter_map(|i| i.get("name").map(key_text))
        .collect();
    for n in env
        .get("API_INSTANCES")
        .map(String::as_str)
        .unwrap_or("")
        .split(',')
    {
        let n = n.trim();
        if !n.is_empty() && !names.iter().any(|x| x == n) {
            names.push(n.to_string());
        }
    }
    let mut used = std::collections::HashSet::new();
    let mut instance_maps = Vec::new();
    for name in &names {
        let index = match instance_index(list, name) {
            Some(i) => i,
            None => {
                prov.set(
                    &format!("instances[{}]", list.len()),
                    "environment variable API_INSTANCES",
                );
                let mut m = Mapping::new();
                m.insert("name".into(), Value::String(name.clone()));
                // As for the single instance: the Python proxy had a default too.
                m.insert("api_version".into(), DEFAULT_API_VERSION.into());
                list.push(Value::Mapping(m));
                list.len() - 1
            }
        };
        for prefix in env_prefixes(name) {
            let vars = env
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix));
            for (var, raw) in vars {
                let rest = &var[prefix.len()..];
                if let Some(model) = rest.strip_prefix("MODEL_MAP_").filter(|m| !m.is_empty()) {
                    instance_maps.push((index, model_of(model), raw, var));
                } else if let Some((_, field)) = LEGACY_FIELDS.iter().find(|(s, _)| *s == rest) {
                    if let Some(target) = list[index].as_mapping_mut() {
                        target.insert((*field).into(), field_value(field, raw));
                    }
                    prov.set(
                        &format!("instances[{index}].{field}"),
                        &format!("environment variable {var}"),
                    );
                } else {
                    continue;
                }
                used.insert(var.as_str());
            }
        }
    }

    if list.is_empty() {
        match (legacy_auth(env), env.get("API_BASE")) {
            (Some((field, value)), Some(base)) => {
                let mut m = Mapping::new();
                m.insert("name".into(), "default".into());
                m.insert(field.into(), Value::String(value.clone()));
                m.insert("api_base".into(), Value::String(base.clone()));
                let version = env.get("API_VERSION").map(String::as_str).unwrap_or(DEFAULT_API_VERSION);
                m.insert("api_version".into(), version.into());
                list.push(Value::Mapping(m));
                let var = if field == "api_key" { "API_KEY" } else { "API_CREDENTIAL" };
                prov.set("instances[0]", &format!("environment variables {var}/API_BASE"));
                legacy.single = true;
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err(ConfigError(
                    "environment: API_KEY (or API_CREDENTIAL) and API_BASE must be set together for the single legacy instance".into(),
                ))
            }
            (None, None) => {}
        }
    } else if env.contains_key("API_KEY") || env.contains_key("API_BASE") {
        let source = if from_files > 0 {
            "the config files define instances"
        } else {
            "API_INSTANCES defines instances"
        };
        legacy.warnings.push(format!(
            "API_KEY/API_BASE are ignored: {source} ({}); the single legacy instance is only used when nothing else defines one (to run on environment variables alone, start with --env-only)",
            names.join(", ")
        ));
    }

    for (var, deployment) in env.range("MODEL_MAP_".to_string()..) {
        let Some(suffix) = var.strip_prefix("MODEL_MAP_") else {
            break;
        };
        let model = model_of(suffix);
        for i in 0..list.len() {
            if legacy.single || value_serves(&list[i], &model) {
                map_model(list, i, &model, deployment, var, prov);
            }
        }
    }
    for (i, model, deployment, var) in instance_maps {
        map_model(list, i, &model, deployment, var, prov);
    }

    let unknown = env
        .range("API_INSTANCE_".to_string()..)
        .take_while(|(k, _)| k.starts_with("API_INSTANCE_"))
        .filter(|(k, _)| !used.contains(k.as_str()));
    for (var, _) in unknown {
        let instance = names
            .iter()
            .find(|n| env_prefixes(n).iter().any(|p| var.starts_with(p.as_str())));
        let why = match instance {
            Some(name) => format!(
                "not a field of instance {name:?} (fields: {}, MODEL_MAP_{{MODEL}})",
                LEGACY_FIELDS.map(|(s, _)| s).join(", ")
            ),
            None => format!(
                "it names no instance (instances: {}; a new one must be listed in API_INSTANCES)",
                names.join(", ")
            ),
        };
        legacy
            .warnings
            .push(format!("environment variable {var} is ignored: {why}"));
    }
    Ok(legacy)
}

/// Whether an instance (still untyped) names `model` in its supported models or map.
fn value_serves(inst: &Value, model: &str) -> bool {
    let listed = inst
        .get("supported_models")
        .and_then(Value::as_sequence)
        .is_some_and(|s| s.iter().any(|m| m.as_str() == Some(model)));
    listed
        || inst
            .get("model_deployments")
            .and_then(|m| m.get(model))
            .is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::schema::Strategy;

    use crate::testutil::TempDir;

    fn dir_with(files: &[(&str, &str)]) -> TempDir {
        let d = TempDir::new("load");
        for (name, text) in files {
            std::fs::write(d.0.join(name), text).unwrap();
        }
        d
    }

    fn env(pairs: &[(&str, &str)]) -> Env {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const BASE: &str = "
routing: {strategy: failover, retries: 2}
monitoring: {additional_windows: [15, 30]}
instances:
  - name: east
    api_key: ${EAST_KEY}
    api_base: https://east.example.com/
    api_version: 2024-10-21
    max_tpm: ${EAST_TPM:-1000}
    supported_models: [gpt-4o]
    model_deployments: {gpt-4o: east-4o}
  - name: west
    api_key: k2
    api_base: https://west.example.com
    api_version: 2024-10-21
    supported_models: [gpt-4o]
";

    #[test]
    fn overlay_merges_maps_and_instances_by_name_and_replaces_lists() {
        let d = dir_with(&[
            ("base.yaml", BASE),
            (
                "production.yaml",
                "routing: {strategy: round_robin}
monitoring: {additional_windows: [60]}
instances:
  - {name: west, priority: 1}
  - {name: north, api_key: k3, api_base: 'http://n', provider_type: openai, supported_models: [m]}
",
            ),
        ]);
        let c = load(
            Some(&d.0),
            &env(&[("EAST_KEY", "ek"), ("ENVIRONMENT", "production")]),
        )
        .unwrap()
        .config;
        assert_eq!(c.routing.strategy, Strategy::RoundRobin);
        assert_eq!(c.routing.retries, 2, "untouched keys of a merged map stay");
        assert_eq!(
            c.monitoring.additional_windows,
            vec![60],
            "other lists replace"
        );
        let names: Vec<_> = c.instances.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["east", "west", "north"]);
        assert_eq!(c.instances[1].priority, 1);
        assert_eq!(
            c.instances[1].api_base, "https://west.example.com",
            "kept from base"
        );
        assert_eq!(c.instances[0].api_key.expose(), "ek");
        assert_eq!(
            c.instances[0].max_tpm,
            Some(1000),
            "default applied and read as a number"
        );
        assert_eq!(
            c.instances[0].api_base, "https://east.example.com",
            "trailing slash trimmed"
        );
    }

    #[test]
    fn environment_defaults_to_development() {
        let d = dir_with(&[("base.yaml", BASE), ("development.yaml", "port: 4000")]);
        let c = load(Some(&d.0), &env(&[("EAST_KEY", "ek")])).unwrap();
        assert_eq!(c.config.port, 4000);
        assert_eq!(c.sources.len(), 2);
    }

    #[test]
    fn unset_variable_names_file_key_and_variable() {
        let d = dir_with(&[("base.yaml", BASE)]);
        let e = load(Some(&d.0), &env(&[])).unwrap_err().0;
        assert!(e.contains("base.yaml"), "{e}");
        assert!(e.contains("instances[0].api_key"), "{e}");
        assert!(e.contains("EAST_KEY"), "{e}");
    }

    #[test]
    fn unset_optional_variable_means_off() {
        let d = dir_with(&[(
            "base.yaml",
            &format!("{BASE}logging: {{feishu_webhook: '${{HOOK}}'}}\n"),
        )]);
        let c = load(Some(&d.0), &env(&[("EAST_KEY", "k")])).unwrap().config;
        assert!(c.logging.feishu_webhook.is_none());
    }

    #[test]
    fn expand_forms() {
        let e = env(&[("A", "1"), ("EMPTY", "")]);
        assert_eq!(expand("x${A}y${B:-2}z", &e), Ok("x1y2z".into()));
        assert_eq!(expand("${EMPTY:-d}|${EMPTY}", &e), Ok("d|".into()));
        assert_eq!(expand("${B}", &e), Err(Unset("B".into())));
        assert!(matches!(expand("${A", &e), Err(Malformed(_))));
        assert!(matches!(expand("${1A}", &e), Err(Malformed(_))));
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
    fn yaml_syntax_error_names_the_file() {
        let d = dir_with(&[("base.yaml", "instances: [\n")]);
        let e = load(Some(&d.0), &env(&[])).unwrap_err().0;
        assert!(e.contains("base.yaml: invalid YAML"), "{e}");
    }

    #[test]
    fn legacy_instance_variables_override_and_add() {
        let d = dir_with(&[("base.yaml", BASE)]);
        let c = load(
            Some(&d.0),
            &env(&[
                ("EAST_KEY", "k"),
                ("API_INSTANCES", "west, south-1"),
                ("API_INSTANCE_WEST_MAX_TPM", "5000"),
                ("API_INSTANCE_SOUTH_1_API_KEY", "sk"),
                ("API_INSTANCE_SOUTH_1_API_BASE", "https://south.example.com"),
                ("API_INSTANCE_SOUTH_1_API_VERSION", "2024-06-01"),
                (
                    "API_INSTANCE_SOUTH_1_SUPPORTED_MODELS",
                    "gpt-4o, gpt-4o-mini",
                ),
                ("API_INSTANCE_SOUTH_1_PRIORITY", "7"),
                ("MODEL_MAP_GPT_4O_MINI", "mini-deploy"),
            ]),
        )
        .unwrap()
        .config;
        assert_eq!(c.instances[1].max_tpm, Some(5000));
        let south = &c.instances[2];
        assert_eq!(south.name, "south-1");
        assert_eq!(south.priority, 7);
        assert_eq!(south.supported_models, ["gpt-4o", "gpt-4o-mini"]);
        assert_eq!(south.deployment("gpt-4o-mini"), "mini-deploy");
        assert!(
            !c.instances[0].serves("gpt-4o-mini"),
            "MODEL_MAP only maps models an instance serves"
        );
    }

    #[test]
    fn legacy_variable_errors_name_the_variable() {
        let d = dir_with(&[("base.yaml", BASE)]);
        let e = load(
            Some(&d.0),
            &env(&[("EAST_KEY", "k"), ("API_INSTANCE_EAST_WEIGHT", "heavy")]),
        )
        .unwrap_err()
        .0;
        assert!(
            e.starts_with("environment variable API_INSTANCE_EAST_WEIGHT"),
            "{e}"
        );
    }

    #[test]
    fn legacy_single_instance_serves_any_model() {
        let d = dir_with(&[]);
        let c = load(
            Some(&d.0),
            &env(&[
                ("API_KEY", "k"),
                ("API_BASE", "https://one.example.com"),
                ("MODEL_MAP_GPT_4O", "my-4o"),
            ]),
        )
        .unwrap()
        .config;
        let only = &c.instances[0];
        assert!(only.serves("anything") && only.serves("gpt-4o"));
        assert_eq!(only.deployment("gpt-4o"), "my-4o");
        assert_eq!(only.deployment("other"), "other");
        assert_eq!(only.api_version, DEFAULT_API_VERSION);

        let e = load(Some(&d.0), &env(&[("API_KEY", "k")])).unwrap_err().0;
        assert!(e.contains("API_BASE"), "{e}");
        let e = load(Some(&d.0), &env(&[])).unwrap_err().0;
        assert!(e.contains("base.yaml: not found"), "{e}");
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
    fn per_instance_model_maps_as_the_python_readme_writes_them() {
        let d = dir_with(&[("base.yaml", BASE)]);
        let c = load(
            Some(&d.0),
            &env(&[
                ("EAST_KEY", "k"),
                (
                    "API_INSTANCE_EAST_MODEL_MAP_GPT-4O-2024-11-20",
                    "gpt4o-november",
                ),
                ("API_INSTANCE_EAST_MODEL_MAP_GPT_4O_MINI", "mini-east"),
                ("API_INSTANCE_EAST_MODEL_MAP_GPT-4O", "east-own"),
                ("MODEL_MAP_GPT_4O", "global-4o"),
            ]),
        )
        .unwrap();
        // Every variable that mapped one of east's models is among its origins.
        for var in [
            "API_INSTANCE_EAST_MODEL_MAP_GPT-4O-2024-11-20",
            "API_INSTANCE_EAST_MODEL_MAP_GPT_4O_MINI",
            "API_INSTANCE_EAST_MODEL_MAP_GPT-4O",
        ] {
            assert!(
                c.origins[0].contains(&format!("{var},"))
                    || c.origins[0].contains(&format!("{var})")),
                "{var}: {}",
                c.origins[0]
            );
        }
        let c = c.config;
        let (east, west) = (&c.instances[0], &c.instances[1]);
        assert_eq!(east.deployment("gpt-4o-2024-11-20"), "gpt4o-november");
        assert_eq!(
            east.deployment("gpt-4o-mini"),
            "mini-east",
            "`_` reads as `-`"
        );
        assert_eq!(
            east.deployment("gpt-4o"),
            "east-own",
            "the instance's map wins"
        );
        assert_eq!(west.deployment("gpt-4o"), "global-4o");
        assert!(!west.serves("gpt-4o-2024-11-20"), "only the named instance");
    }

    #[test]
    fn a_hyphenated_name_takes_both_variable_forms() {
        let e = env(&[
            ("API_INSTANCES", "south-1,north-2"),
            ("API_INSTANCE_SOUTH-1_API_KEY", "k1"),
            ("API_INSTANCE_SOUTH-1_API_BASE", "https://s.example.com"),
            ("API_INSTANCE_SOUTH-1_SUPPORTED_MODELS", "m"),
            ("API_INSTANCE_NORTH_2_API_KEY", "k2"),
            ("API_INSTANCE_NORTH_2_API_BASE", "https://n.example.com"),
            ("API_INSTANCE_NORTH_2_MODEL_MAP_M", "n-m"),
        ]);
        let loaded = load(None, &e).unwrap();
        let c = &loaded.config;
        assert_eq!(c.instances[0].api_base, "https://s.example.com");
        assert_eq!(c.instances[1].deployment("m"), "n-m");
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    }

    #[test]
    fn variables_it_does_not_understand_are_warnings_naming_them_not_their_values() {
        let d = dir_with(&[("base.yaml", BASE)]);
        let loaded = load(
            Some(&d.0),
            &env(&[
                ("EAST_KEY", "k"),
                ("API_INSTANCE_EAST_PROXY_URL", "http://user:pw-secret@p"),
                ("API_INSTANCE_SOUTH_API_KEY", "sk-secret-south"),
                ("API_INSTANCE_EAST_MODEL_MAP_", "x"),
                ("API_KEY", "sk-ignored"),
            ]),
        )
        .unwrap();
        let w = loaded.warnings.join("\n");
        assert_eq!(loaded.warnings.len(), 4, "{w}");
        assert!(
            w.contains("API_INSTANCE_EAST_PROXY_URL is ignored: not a field of instance \"east\""),
            "{w}"
        );
        assert!(w.contains("API_INSTANCE_EAST_MODEL_MAP_ is ignored"), "{w}");
        assert!(
            w.contains("API_INSTANCE_SOUTH_API_KEY is ignored: it names no instance")
                && w.contains("API_INSTANCES"),
            "{w}"
        );
        assert!(
            w.contains(
                "API_KEY/API_BASE are ignored: the config files define instances (east, west)"
            ) && w.contains("--env-only"),
            "{w}"
        );
        for secret in ["pw-secret", "sk-secret-south", "sk-ignored"] {
            assert!(!w.contains(secret), "{w}");
        }
    }

    #[test]
    fn origins_name_each_instances_files_and_variables_and_placeholders_warn() {
        let d = dir_with(&[
            (
                "base.yaml",
                &BASE.replace("api_key: k2", "api_key: replace-me-west"),
            ),
            ("production.yaml", "instances: [{name: east, priority: 3}]"),
        ]);
        let loaded = load(
            Some(&d.0),
            &env(&[
                ("ENVIRONMENT", "production"),
                ("EAST_KEY", "k"),
                ("API_INSTANCES", "south"),
                ("API_INSTANCE_SOUTH_API_KEY", "your-api-key"),
                ("API_INSTANCE_SOUTH_API_BASE", "https://s.example.com"),
                ("API_INSTANCE_SOUTH_API_VERSION", "2024-10-21"),
                ("API_INSTANCE_EAST_WEIGHT", "2"),
                ("API_INSTANCE_SOUTH_MODEL_MAP_M", "d"),
            ]),
        )
        .unwrap();
        let (base, prod) = (
            d.0.join("base.yaml").display().to_string(),
            d.0.join("production.yaml").display().to_string(),
        );
        // West, an example (a placeholder key), gives way to the environment's
        // instances; south's placeholder came from the environment: it stays.
        assert_eq!(
            loaded.origins,
            [
                format!("{base} + {prod} + environment (API_INSTANCE_EAST_WEIGHT)"),
                "environment (API_INSTANCES, API_INSTANCE_SOUTH_API_BASE, API_INSTANCE_SOUTH_API_KEY, API_INSTANCE_SOUTH_API_VERSION, API_INSTANCE_SOUTH_MODEL_MAP_M)".to_string(),
            ]
        );
        let w = loaded.warnings.join("\n");
        assert_eq!(loaded.warnings.len(), 2, "{w}");
        assert!(
            w.contains("the example instance(s) west of the config files (placeholder keys) are left out: API_INSTANCES defines the instances"),
            "{w}"
        );
        assert!(
            w.contains("instance \"south\": its api_key (from environment variable API_INSTANCE_SOUTH_API_KEY) is a placeholder"),
            "{w}"
        );
        assert!(!w.contains("replace-me-west"), "{w}");

        // Without environment instances, an example stays, with its warning.
        let loaded = load(
            Some(&d.0),
            &env(&[("ENVIRONMENT", "production"), ("EAST_KEY", "k")]),
        )
        .unwrap();
        assert_eq!(loaded.config.instances.len(), 2);
        assert!(
            loaded.warnings.join("\n").contains(&format!(
                "instance \"west\": its api_key (from {base}) is a placeholder"
            )),
            "{:?}",
            loaded.warnings
        );
    }

    #[test]
    fn the_legacy_single_instance_replaces_examples_and_refuses_beside_real_instances() {
        let examples = BASE
            .replace(
                "api_key: ${EAST_KEY}",
                "api_key: ${EAST_KEY:-replace-me-east}",
            )
            .replace("api_key: k2", "api_key: replace-me-west");
        let d = dir_with(&[("base.yaml", &examples)]);
        let legacy = env(&[
            ("API_KEY", "sk-real"),
            ("API_BASE", "https://one.example.com"),
        ]);
        let loaded = load(Some(&d.0), &legacy).unwrap();
        let only = &loaded.config.instances;
        assert_eq!(only.len(), 1, "what API_KEY/API_BASE plainly meant");
        assert!(only[0].name == "default" && only[0].serves("any-model"));
        assert_eq!(
            loaded.warnings,
            ["the example instance(s) east, west of the config files (placeholder keys) are left out: API_KEY/API_BASE define the instance"]
        );

        let d = dir_with(&[("base.yaml", BASE)]);
        let e = load(
            Some(&d.0),
            &env(&[
                ("EAST_KEY", "k"),
                ("API_KEY", "sk-real"),
                ("API_BASE", "https://one.example.com"),
            ]),
        )
        .unwrap_err()
        .0;
        assert_eq!(
            e,
            "environment: API_KEY and API_BASE are set, but the config files define instances (east, west): unset API_KEY and API_BASE to use the files' instances, or start with --env-only to use API_KEY/API_BASE alone"
        );
        assert!(!e.contains("sk-real"));
    }

    #[test]
    fn every_unset_variable_is_named_at_once() {
        let d = dir_with(&[(
            "base.yaml",
            &BASE
                .replace("api_key: k2", "api_key: ${WEST_KEY}")
                .replace("retries: 2", "retries: '${RETRIES}'"),
        )]);
        let e = load(Some(&d.0), &env(&[])).unwrap_err().0;
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(lines.len(), 3, "{e}");
        for var in ["RETRIES", "EAST_KEY", "WEST_KEY"] {
            assert!(
                e.contains(&format!("environment variable {var} is not set")),
                "{e}"
            );
        }
        // Beside instances of the environment, the way to use those alone.
        let e = load(Some(&d.0), &env(&[("API_INSTANCES", "x")]))
            .unwrap_err()
            .0;
        assert!(e.ends_with("\nenvironment: API_INSTANCES defines instances: to run on them alone, without the config files' instances, start with --env-only"), "{e}");
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
    fn legacy_credential_replaces_the_key() {
        let kind = |loaded: &Loaded| {
            let inst = &loaded.config.instances[0];
            assert!(inst.api_key.is_empty());
            inst.credential.as_ref().map(|c| c.kind())
        };
        let listed = load(
            None,
            &env(&[
                ("API_INSTANCES", "east"),
                ("API_INSTANCE_EAST_API_BASE", "https://e.example.com"),
                ("API_INSTANCE_EAST_CREDENTIAL", "managed_identity"),
                ("API_INSTANCE_EAST_SUPPORTED_MODELS", "m"),
            ]),
        )
        .unwrap();
        assert_eq!(kind(&listed), Some("managed_identity"));
        assert!(listed.warnings.is_empty(), "{:?}", listed.warnings);
        let single = load(
            None,
            &env(&[
                ("API_CREDENTIAL", "workload_identity"),
                ("API_BASE", "https://one.example.com"),
            ]),
        )
        .unwrap();
        assert_eq!(kind(&single), Some("workload_identity"));
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
