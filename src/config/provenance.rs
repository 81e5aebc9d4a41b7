//! Where each configuration value came from: the file or environment variable that
//! set each key path last, so that an error names what to fix, and each instance's
//! origins for the start-up log and `--check-config`.

use serde_yaml::Mapping;
use std::collections::HashMap;
use std::path::PathBuf;

/// Which source set each key path (`routing.strategy`, `instances[1].api_key`).
#[derive(Default, Debug)]
pub(super) struct Provenance {
    pub(super) by_path: HashMap<String, String>,
    /// The files read, joined: the source of a key no file or variable set (a default).
    files: String,
}

impl Provenance {
    /// The files read, the source of every key none of them (and no variable) set.
    pub(super) fn set_files(&mut self, files: &[PathBuf]) {
        self.files = files
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" + ");
    }

    pub(super) fn set(&mut self, path: &str, source: &str) {
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
    pub(super) fn of_instance(&self, i: usize, files: &[PathBuf]) -> String {
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

/// `instances[1].api_key` becomes `instances[1].api_key (instance "west")` when it can.
pub(super) fn describe_path(path: &str, merged: &Mapping) -> String {
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
#[cfg(test)]
mod tests {
    use crate::config::load::load;
    use crate::config::test_fixtures::{dir_with, env, BASE};

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
}
