//! Configuration: the schema and its secrets (`schema`), its semantic checks
//! (`validate`), the named `clients`, an instance's Entra ID `credential`, how the sources become one validated `Config` (`load`): the files and
//! their `${VAR}`s (`layers`), the Python proxy's variables (`legacy`), where each value
//! came from (`provenance`); what a migration plainly means where the sources disagree
//! (`migration`), the words of a refusal (`diagnose`), and the `--env-file` reader
//! (`env_file`).

pub mod api_version;
mod clients;
mod credential;
mod diagnose;
mod env_file;
mod layers;
mod legacy;
mod load;
mod migration;
mod provenance;
mod schema;
#[cfg(test)]
mod test_fixtures;
mod validate;

pub use clients::Client;
pub use credential::{Credential, DEFAULT_SCOPE};
pub use load::{Loaded, Source};
pub use schema::*;
pub use validate::Invalid;

/// The process environment as the loader sees it; tests pass their own.
pub type Env = std::collections::BTreeMap<String, String>;

/// Why a configuration cannot be loaded: names the file (or variable) and key, never
/// a value.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}
