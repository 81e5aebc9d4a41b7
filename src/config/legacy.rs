//! The Python proxy's environment variables: `API_INSTANCES` and
//! `API_INSTANCE_{NAME}_*` (fields and `MODEL_MAP_{MODEL}`), the global `MODEL_MAP_*`,
//! and the single legacy instance of `API_KEY` (or `API_CREDENTIAL`) and `API_BASE`,
//! applied over the merged files; what they leave unused becomes a warning.

use super::layers::{instance_index, key_text};
use super::provenance::Provenance;
use super::{ConfigError, Env};
use serde_yaml::{Mapping, Value};

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

pub(super) fn env_defines_instances(env: &Env) -> bool {
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
pub(super) struct Legacy {
    /// The single instance of `API_KEY`/`API_BASE` was created.
    pub(super) single: bool,
    pub(super) warnings: Vec<String>,
}

/// Applies `API_INSTANCES` / `API_INSTANCE_{NAME}_*` (fields and `MODEL_MAP_{MODEL}`),
/// the legacy single instance and the global `MODEL_MAP_*`. A per-instance map is
/// applied last, so it wins over a global one. Variables it does not use, and a single
/// instance it cannot create, become warnings.
pub(super) fn apply_legacy_env(
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
    use crate::config::load::{load, Loaded};
    use crate::config::test_fixtures::{dir_with, env, BASE};

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
}
