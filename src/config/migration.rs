//! What a configuration carried over from the Python proxy (or run from a checkout)
//! plainly means, where the layered sources would otherwise quietly disagree: the
//! shipped example instances beside the environment's own, `API_KEY`/`API_BASE`
//! beside the files' instances, an `ENVIRONMENT` that names no overlay, and the Python
//! proxy's `app/config` layout.

use super::layers::key_text;
use super::legacy::env_prefixes;
use super::load::PLACEHOLDER_KEYS;
use super::provenance::Provenance;
use super::Env;
use serde_yaml::{Mapping, Value};
use std::path::{Path, PathBuf};

/// Takes the example instances (placeholder keys that nothing in the environment
/// replaces) out of the files' instances when environment variables define the
/// instances (`API_INSTANCES`, or `API_KEY` and `API_BASE`), and says so in the
/// returned warning. `API_KEY`/`API_BASE` beside real instances from the files is an
/// error with its fix: which of the two was meant cannot be told.
pub(super) fn leave_out_examples(
    merged: &mut Mapping,
    env: &Env,
    prov: &mut Provenance,
) -> Result<Option<String>, String> {
    let Some(Value::Sequence(list)) = merged.get_mut("instances") else {
        return Ok(None);
    };
    let listed: Vec<&str> = env
        .get("API_INSTANCES")
        .map_or("", String::as_str)
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect();
    let single = env.contains_key("API_KEY") && env.contains_key("API_BASE");
    if listed.is_empty() && !single {
        return Ok(None);
    }
    let name_of = |item: &Value| item.get("name").map(key_text).unwrap_or_default();
    let is_example = |item: &Value| {
        let name = name_of(item);
        let placeholder = item
            .get("api_key")
            .and_then(Value::as_str)
            .is_some_and(|k| PLACEHOLDER_KEYS.iter().any(|p| k.contains(p)));
        let keyed_by_env = env_prefixes(&name)
            .iter()
            .any(|p| env.contains_key(&format!("{p}API_KEY")));
        placeholder && !keyed_by_env && !listed.contains(&name.as_str())
    };
    let examples: Vec<usize> = (0..list.len()).filter(|&i| is_example(&list[i])).collect();
    if single && listed.is_empty() && examples.len() < list.len() {
        // A file that reads `${API_KEY}` uses it: nothing is left over.
        let used = list.iter().any(|i| {
            i.get("api_key").and_then(Value::as_str) == env.get("API_KEY").map(String::as_str)
        });
        if used {
            return Ok(None);
        }
        let real: Vec<String> = list
            .iter()
            .filter(|i| !is_example(i))
            .map(name_of)
            .collect();
        return Err(format!(
            "API_KEY and API_BASE are set, but the config files define instances ({}): unset API_KEY and API_BASE to use the files' instances, or start with --env-only to use API_KEY/API_BASE alone",
            real.join(", ")
        ));
    }
    if examples.is_empty() {
        return Ok(None);
    }
    let names: Vec<String> = examples.iter().map(|&i| name_of(&list[i])).collect();
    for &i in examples.iter().rev() {
        list.remove(i);
    }
    renumber(&mut prov.by_path, &examples);
    let by = if listed.is_empty() {
        "API_KEY/API_BASE define the instance"
    } else {
        "API_INSTANCES defines the instances"
    };
    Ok(Some(format!(
        "the example instance(s) {} of the config files (placeholder keys) are left out: {by}",
        names.join(", ")
    )))
}

/// Renumbers the `instances[N]` paths after the instances at `removed` (ascending)
/// were taken out of the list.
fn renumber(by_path: &mut std::collections::HashMap<String, String>, removed: &[usize]) {
    for (path, source) in std::mem::take(by_path) {
        let index = path
            .strip_prefix("instances[")
            .and_then(|rest| rest.split_once(']'))
            .and_then(|(n, rest)| Some((n.parse::<usize>().ok()?, rest)));
        match index {
            None => {
                by_path.insert(path, source);
            }
            Some((n, _)) if removed.contains(&n) => {}
            Some((n, rest)) => {
                let before = removed.iter().filter(|&&r| r < n).count();
                by_path.insert(format!("instances[{}]{rest}", n - before), source);
            }
        }
    }
}

/// An `ENVIRONMENT` set to a name whose overlay file is not in `dir` (beside a
/// `base.yaml`): a typo would otherwise run on the base alone. `development`, the
/// default, may be absent.
pub(super) fn missing_overlay(dir: &Path, env: &Env) -> Option<String> {
    let name = env.get("ENVIRONMENT")?;
    let file = dir.join(format!("{name}.yaml"));
    if name == "development" || file.exists() || !dir.join("base.yaml").exists() {
        return None;
    }
    let mut present: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            let stem = path.file_stem()?.to_str()?.to_string();
            (path.extension()? == "yaml" && stem != "base").then_some(stem)
        })
        .collect();
    present.sort();
    let present = if present.is_empty() {
        "none".to_string()
    } else {
        present.join(", ")
    };
    Some(format!(
        "ENVIRONMENT={name:?}: {} not found (overlays in {}: {present}): set ENVIRONMENT to one of them, or create the file",
        file.display(),
        dir.display()
    ))
}

/// For a config directory without `base.yaml`: where the Python proxy's layout
/// (`app/config`) has one, the flag that reads it.
pub(super) fn python_layout_hint(dir: &Path) -> String {
    let Some(name) = dir.file_name() else {
        return String::new();
    };
    let there: PathBuf = dir.parent().unwrap_or(Path::new("")).join("app").join(name);
    if !there.join("base.yaml").is_file() {
        return String::new();
    }
    format!(
        " ({} exists, in the Python proxy's layout: start with --config-dir {})",
        there.join("base.yaml").display(),
        there.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_of_later_instances_move_up() {
        let mut by_path: std::collections::HashMap<String, String> = [
            ("instances", "f"),
            ("instances[0].api_key", "a"),
            ("instances[1]", "b"),
            ("instances[2].model_deployments.m", "c"),
            ("routing.strategy", "d"),
        ]
        .into_iter()
        .map(|(p, s)| (p.to_string(), s.to_string()))
        .collect();
        renumber(&mut by_path, &[0]);
        let mut got: Vec<(&str, &str)> = by_path
            .iter()
            .map(|(p, s)| (p.as_str(), s.as_str()))
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                ("instances", "f"),
                ("instances[0]", "b"),
                ("instances[1].model_deployments.m", "c"),
                ("routing.strategy", "d"),
            ]
        );
    }
}
