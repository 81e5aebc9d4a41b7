//! The configuration files as layers: which files (`base.yaml`, then
//! `{ENVIRONMENT}.yaml`), `${VAR}` and `${VAR:-default}` substitution inside each,
//! and their deep merge (maps by key, instances by name, other lists replaced), each
//! key recording the file that set it.

use super::provenance::Provenance;
use super::{ConfigError, Env};
use serde_yaml::{Mapping, Value};
use std::path::{Path, PathBuf};

/// Keys where an unset `${VAR}` without a default means "off" instead of an error.
const OPTIONAL_KEYS: [&str; 3] = ["logging.feishu_webhook", "logging.file", "auth.admin_key"];

/// `base.yaml` and `{ENVIRONMENT}.yaml` in `dir`.
pub(super) fn files_of(dir: &Path, env: &Env) -> Result<[PathBuf; 2], ConfigError> {
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

/// A file's mapping, its `${VAR}` problems added to `errors` (the value left as
/// written), or why it cannot be read at all.
pub(super) fn read_layer(
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
pub(super) const UNSET: &str = " is not set";

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

pub(super) fn merge_map(
    acc: &mut Mapping,
    overlay: Mapping,
    path: &str,
    src: &str,
    prov: &mut Provenance,
) {
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

pub(super) fn instance_index(list: &[Value], name: &str) -> Option<usize> {
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
#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::load;
    use crate::config::schema::Strategy;
    use crate::config::test_fixtures::{dir_with, env, BASE};

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
    fn yaml_syntax_error_names_the_file() {
        let d = dir_with(&[("base.yaml", "instances: [\n")]);
        let e = load(Some(&d.0), &env(&[])).unwrap_err().0;
        assert!(e.contains("base.yaml: invalid YAML"), "{e}");
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
}
