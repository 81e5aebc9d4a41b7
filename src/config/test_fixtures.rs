//! The loader's test fixtures, shared by the tests of `load`, `layers`, `legacy` and
//! `provenance`: a temporary config directory, an environment, and a base file.

use super::Env;
use crate::testutil::TempDir;

pub(super) fn dir_with(files: &[(&str, &str)]) -> TempDir {
    let d = TempDir::new("load");
    for (name, text) in files {
        std::fs::write(d.0.join(name), text).unwrap();
    }
    d
}

pub(super) fn env(pairs: &[(&str, &str)]) -> Env {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub(super) const BASE: &str = "
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
