//! What the loader says about a configuration it refuses, beyond the key path and
//! its source: the value when it is no secret (an enum's name, a URL without its
//! credentials), the new name of a value the Python proxy used, the variable and env
//! file behind an empty key, and an Azure `api_base` copied with a deployment path.

use super::provenance::Provenance;
use super::schema::{Config, Provider};
use super::validate::Invalid;
use super::Env;
use serde_yaml::Value;
use std::path::Path;

/// Values the Python proxy accepted that are spelled otherwise here: (the key the
/// path ends with, the old value, the new one).
const RENAMED: [(&str, &str, &str); 1] = [("provider_type", "generic", "openai")];

/// The longest value quoted back in an error: an enum's names are short, keys are not
/// (Azure's are 32 characters or more).
const MAX_QUOTED: usize = 24;

/// serde's `unknown variant `x`, expected one of `a`, `b`` for the enum at `path`,
/// reworded: the value quoted when it looks like a name (never a key pasted in the
/// wrong place), the values it may take, and the new name of a renamed one.
pub(super) fn unknown_value(path: &str, message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown variant `")?;
    let (value, expected) = rest.split_once("`, expected ")?;
    let expected: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let shown = if is_name(value) {
        format!("{value:?}")
    } else {
        "(not shown)".into()
    };
    let mut out = format!(
        "unknown value {shown} (expected one of {})",
        expected.join(", ")
    );
    let key = path.rsplit('.').next().unwrap_or(path);
    if let Some((_, old, new)) = RENAMED
        .iter()
        .find(|(k, old, _)| *k == key && *old == value)
    {
        out.push_str(&format!("; `{old}` is now `{new}`"));
    } else if let Some(near) = expected
        .iter()
        .find(|e| **e == value.to_ascii_lowercase().replace('-', "_"))
    {
        out.push_str(&format!("; did you mean {near}?"));
    }
    Some(out)
}

fn is_name(value: &str) -> bool {
    value.len() <= MAX_QUOTED
        && !value.starts_with("sk-")
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// `url` without what may be secret (user and password, query, fragment), to quote.
pub(super) fn shown_url(url: &str) -> String {
    let url = url.split(['?', '#']).next().unwrap_or("");
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let host = authority.rsplit('@').next().unwrap_or(authority);
    match scheme {
        "" => format!("{host}{path}"),
        _ => format!("{scheme}://{host}{path}"),
    }
}

/// The problems of each instance that `Config::problems` reports only one at a time (the first of each instance),
/// or without what would fix them: every empty key, with the variable (and env file)
/// it came from, and every Azure `api_base` with a path under `/openai`.
pub(super) fn instances(
    config: &Config,
    prov: &Provenance,
    env: &Env,
    env_file: Option<(&Path, &Env)>,
) -> Vec<Invalid> {
    let mut found = Vec::new();
    for (i, inst) in config.instances.iter().enumerate() {
        let at = |key: &str| format!("instances[{i}].{key}");
        // An instance with a credential has no key to be empty.
        if inst.api_key.is_empty() && inst.credential.is_none() {
            let source = prov.source(&at("api_key"));
            let vars: Vec<String> = match source.strip_prefix("environment variable ") {
                Some(var) => vec![var.to_string()],
                None => referenced(Path::new(&source), &inst.name),
            };
            let whence: Vec<String> = vars
                .iter()
                .filter_map(|var| match env_file {
                    Some((file, vars)) if vars.contains_key(var) => {
                        Some(format!("{var} is empty in {} (--env-file)", file.display()))
                    }
                    _ => env
                        .contains_key(var)
                        .then(|| format!("{var} is set but empty in the environment")),
                })
                .collect();
            let message = if whence.is_empty() {
                "is empty".to_string()
            } else {
                format!("is empty: {}", whence.join("; "))
            };
            found.push(Invalid {
                path: at("api_key"),
                message,
            });
        }
        if inst.provider_type == Provider::Azure {
            if let Some(message) = deployment_path(&inst.api_base) {
                found.push(Invalid {
                    path: at("api_base"),
                    message,
                });
            }
        }
    }
    found
}

/// The variables the raw text of instance `name`'s `api_key` in `file` refers to.
fn referenced(file: &Path, name: &str) -> Vec<String> {
    let Some(raw) = std::fs::read_to_string(file)
        .ok()
        .and_then(|text| serde_yaml::from_str::<Value>(&text).ok())
    else {
        return Vec::new();
    };
    let key = raw
        .get("instances")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .find(|i| i.get("name").and_then(Value::as_str) == Some(name))
        .and_then(|i| i.get("api_key")?.as_str());
    key.map_or_else(Vec::new, |k| {
        k.split("${")
            .skip(1)
            .filter_map(|r| Some(r.split_once('}')?.0.split(":-").next()?.to_string()))
            .collect()
    })
}

/// An Azure `api_base` is the resource's URL: the proxy adds `/openai/...`. One with
/// `/openai` in its path (copied from the portal's endpoint of a deployment) would be
/// called at `/openai/deployments/x/openai/deployments/...`.
fn deployment_path(api_base: &str) -> Option<String> {
    let shown = shown_url(api_base);
    let (scheme, rest) = shown.split_once("://")?;
    let (host, path) = rest.split_at(rest.find('/')?);
    path.split('/').any(|segment| segment == "openai").then(|| {
        format!(
            "{shown:?} has the path {path:?}, which Azure's resource URL does not have: write api_base: {scheme}://{host} (the proxy adds /openai/...; a deployment goes in model_deployments)"
        )
    })
}

/// A validation message about an `api_base`, with the URL it is about (without its
/// credentials), so the operator sees what was read. What is not a URL is not shown:
/// it may be a key pasted into the wrong field.
pub(super) fn with_url(invalid: Invalid, config: &Config) -> Invalid {
    let index = invalid
        .path
        .strip_prefix("instances[")
        .and_then(|rest| rest.strip_suffix("].api_base"))
        .and_then(|n| n.parse::<usize>().ok());
    let is_url = |url: &str| url.starts_with("https://") || url.starts_with("http://");
    match index.and_then(|i| config.instances.get(i)) {
        Some(inst) if is_url(&inst.api_base) => Invalid {
            message: format!("{} (read {:?})", invalid.message, shown_url(&inst.api_base)),
            path: invalid.path,
        },
        _ => invalid,
    }
}

/// Whether the merged value at `path` (`instances[0].max_tpm`) still holds a `${`:
/// an unset variable already reported, whose raw text a type error would only echo.
pub(super) fn unsubstituted(merged: &serde_yaml::Mapping, path: &str) -> bool {
    let mut here: Option<&Value> = None;
    for (n, part) in path.split('.').enumerate() {
        let (key, indexes) = part.split_once('[').unwrap_or((part, ""));
        here = match n {
            0 => merged.get(key),
            _ => here.and_then(|v| v.get(key)),
        };
        for index in indexes.split('[').filter(|s| !s.is_empty()) {
            let i = index.trim_end_matches(']').parse::<usize>().ok();
            here = here.and_then(|v| v.get(i?));
        }
    }
    here.and_then(Value::as_str)
        .is_some_and(|s| s.contains("${"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_values_are_quoted_with_what_they_may_be_and_keys_are_not() {
        assert_eq!(
            unknown_value(
                "routing.strategy",
                "unknown variant `least-loaded`, expected one of `failover`, `weighted`, `round_robin`, `least_loaded`"
            )
            .unwrap(),
            "unknown value \"least-loaded\" (expected one of failover, weighted, round_robin, least_loaded); did you mean least_loaded?"
        );
        assert_eq!(
            unknown_value(
                "instances[0].provider_type",
                "unknown variant `generic`, expected `azure` or `openai`"
            )
            .unwrap(),
            "unknown value \"generic\" (expected one of azure, openai); `generic` is now `openai`"
        );
        for key in ["sk-2", "0123456789abcdef0123456789abcdef"] {
            let m = unknown_value(
                "routing.strategy",
                &format!("unknown variant `{key}`, expected `failover`"),
            )
            .unwrap();
            assert_eq!(m, "unknown value (not shown) (expected one of failover)");
        }
        assert_eq!(unknown_value("x", "missing field `api_key`"), None);
    }

    #[test]
    fn urls_are_shown_without_credentials() {
        assert_eq!(
            shown_url("https://user:pw@x.example.com:8443/a/b?key=sk#f"),
            "https://x.example.com:8443/a/b"
        );
        assert_eq!(shown_url("x.example.com"), "x.example.com");
    }

    #[test]
    fn a_deployment_path_in_an_azure_api_base_is_refused_with_the_resource_url() {
        let m = deployment_path("https://x.openai.azure.com/openai/deployments/gpt-4o").unwrap();
        assert!(
            m.contains("write api_base: https://x.openai.azure.com ("),
            "{m}"
        );
        assert_eq!(deployment_path("https://x.openai.azure.com"), None);
        assert_eq!(deployment_path("https://apim.example.com/aoai"), None);
    }

    #[test]
    fn an_api_base_is_quoted_only_when_it_is_a_url() {
        let config: Config = serde_yaml::from_str(
            "instances: [{name: a, api_key: k, api_base: 'https://u:pw@a.example.com/x y', supported_models: [m]}, {name: b, api_key: k, api_base: sk-pasted, supported_models: [m]}]",
        )
        .unwrap();
        let at = |i: usize| Invalid {
            path: format!("instances[{i}].api_base"),
            message: "is wrong".into(),
        };
        assert_eq!(
            with_url(at(0), &config).message,
            "is wrong (read \"https://a.example.com/x y\")"
        );
        assert_eq!(with_url(at(1), &config).message, "is wrong");
    }

    #[test]
    fn unsubstituted_values_are_found_by_path() {
        let merged: serde_yaml::Mapping =
            serde_yaml::from_str("instances: [{name: a, max_tpm: '${TPM}'}, {max_tpm: 5}]")
                .unwrap();
        assert!(unsubstituted(&merged, "instances[0].max_tpm"));
        assert!(!unsubstituted(&merged, "instances[1].max_tpm"));
        assert!(!unsubstituted(&merged, "routing.strategy"));
    }
}
