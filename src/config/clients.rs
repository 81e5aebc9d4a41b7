//! Named clients: who sends which key, the limits and models each may use, and the
//! checks of their names and keys.

use super::schema::{lenient_opt, lenient_string, Auth, Secret};
use super::validate::{invalid, Invalid};
use serde::{Deserialize, Serialize};

/// One named client: who sends `key` (or a key whose SHA-256 is `key_sha256`), and
/// what it may use. Every limit is optional; none means only the instances' limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Client {
    #[serde(deserialize_with = "lenient_string")]
    pub name: String,
    #[serde(default)]
    pub key: Option<Secret>,
    /// Hex of the SHA-256 of the key, so that the file need not hold the key.
    #[serde(default, deserialize_with = "lenient_opt")]
    pub key_sha256: Option<String>,
    /// Tokens a minute (the admission estimate, as for instances).
    #[serde(default, deserialize_with = "lenient_opt")]
    pub tpm: Option<u64>,
    /// Requests a minute.
    #[serde(default, deserialize_with = "lenient_opt")]
    pub rpm: Option<u64>,
    /// Tokens (as the upstream reports them) per UTC day.
    #[serde(default, deserialize_with = "lenient_opt")]
    pub tokens_per_day: Option<u64>,
    /// The models it may use; absent: every model the proxy serves.
    #[serde(default)]
    pub models: Option<Vec<String>>,
}

impl Client {
    pub fn allows(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|models| models.iter().any(|m| m == model))
    }
}

/// Client names become Redis keys, metric labels and log words: kept to a plain set.
pub(super) fn check_clients(auth: &Auth) -> Result<(), Invalid> {
    let mut names = std::collections::HashSet::new();
    let mut keys: std::collections::HashSet<&str> =
        auth.api_keys.iter().map(Secret::expose).collect();
    for (i, c) in auth.clients.iter().enumerate() {
        let at = |key: &str| format!("auth.clients[{i}].{key}");
        let plain = |ch: char| ch.is_ascii_alphanumeric() || "._-".contains(ch);
        if c.name.is_empty() || c.name.len() > 64 || !c.name.chars().all(plain) {
            return Err(invalid(
                at("name"),
                "must be 1 to 64 letters, digits, '.', '_' or '-'",
            ));
        }
        if !names.insert(c.name.as_str()) {
            return Err(invalid(
                at("name"),
                format!("duplicate client name {:?}", c.name),
            ));
        }
        match (&c.key, &c.key_sha256) {
            (Some(key), None) if key.is_empty() => return Err(invalid(at("key"), "is empty")),
            (Some(key), None) => {
                if !keys.insert(key.expose()) {
                    return Err(invalid(
                        at("key"),
                        "is also another client's key or one of auth.api_keys",
                    ));
                }
            }
            (None, Some(hex)) => {
                if hex.len() != 64 || !hex.chars().all(|ch| ch.is_ascii_hexdigit()) {
                    return Err(invalid(
                        at("key_sha256"),
                        "must be the 64 hex digits of the key's SHA-256",
                    ));
                }
            }
            _ => return Err(invalid(at("key"), "give exactly one of key and key_sha256")),
        }
        for (key, limit) in [
            ("tpm", c.tpm),
            ("rpm", c.rpm),
            ("tokens_per_day", c.tokens_per_day),
        ] {
            if limit == Some(0) {
                return Err(invalid(
                    at(key),
                    "must be above 0 (leave it out for no limit)",
                ));
            }
        }
        if let Some(m) = c.models.iter().flatten().find(|m| m.trim().is_empty()) {
            return Err(invalid(
                at("models"),
                format!("contains an empty model name {m:?}"),
            ));
        }
    }
    Ok(())
}
