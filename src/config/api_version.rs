//! What an instance's `api_version` says it accepts: Azure's v1 API, and from which
//! dated version on `stream_options` (and so streamed usage) is taken. Read by the
//! addresses upstream and by the loader's warnings.

use super::{Instance, Provider};

/// `api_version` values that select Azure's v1 API rather than a dated version.
pub const V1_VERSIONS: [&str; 3] = ["v1", "preview", "latest"];

/// The first dated api-version that accepts `stream_options` (and so streamed usage).
const FIRST_WITH_STREAM_USAGE: &str = "2024-09-01";

/// A warning for each instance whose api-version takes no `stream_options`: its
/// streams' usage can only be estimated.
pub fn stream_usage_warnings(instances: &[Instance]) -> Vec<String> {
    instances
        .iter()
        .filter(|inst| !asks_usage(inst))
        .map(|inst| {
            format!(
                "instance {:?}: api_version {} takes no stream_options (Azure accepts them from {FIRST_WITH_STREAM_USAGE}-preview on, and on v1): its streams are passed on as they are and their usage is estimated from the text",
                inst.name, inst.api_version
            )
        })
        .collect()
}

/// Whether `inst` accepts `stream_options.include_usage`: Azure's v1 API and dated
/// versions from 2024-09-01 on, and OpenAI-compatible upstreams.
pub fn asks_usage(inst: &Instance) -> bool {
    let version = inst.api_version.trim();
    match inst.provider_type {
        Provider::Azure => V1_VERSIONS.contains(&version) || accepts_stream_usage(version),
        Provider::Openai => true,
    }
}

/// Whether a dated api-version (`2024-10-21`, `2024-09-01-preview`) accepts
/// `stream_options`: from 2024-09-01 on. Anything else is assumed not to.
pub fn accepts_stream_usage(version: &str) -> bool {
    let date = version.get(..10).unwrap_or("");
    let dated = date.len() == 10
        && date.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    dated && date >= FIRST_WITH_STREAM_USAGE
}
