//! Which instances may serve a request and the order they are tried in (DESIGN §6).
//! For now: every instance that serves the model exactly, lowest `priority` first,
//! configuration order among equals.

use crate::config::Config;

/// Indexes into `config.instances`, in the order to try them.
pub fn candidates(config: &Config, model: &str) -> Vec<usize> {
    let mut order: Vec<usize> = (0..config.instances.len())
        .filter(|&i| config.instances[i].serves(model))
        .collect();
    order.sort_by_key(|&i| config.instances[i].priority);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_instances_by_priority_then_config_order() {
        let config: Config = serde_yaml::from_str(
            "instances:
  - {name: a, api_key: k, api_base: 'http://a', priority: 5, supported_models: [m]}
  - {name: b, api_key: k, api_base: 'http://b', priority: 1, supported_models: [m]}
  - {name: c, api_key: k, api_base: 'http://c', priority: 5, supported_models: [m]}
  - {name: d, api_key: k, api_base: 'http://d', priority: 0, supported_models: [other]}
",
        )
        .unwrap();
        assert_eq!(candidates(&config, "m"), [1, 0, 2]);
        assert_eq!(candidates(&config, "other"), [3]);
        assert!(candidates(&config, "M").is_empty());
    }
}
