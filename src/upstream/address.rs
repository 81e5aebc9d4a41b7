//! Where and how each instance is called (DESIGN §5.3): its URL for an operation on a
//! deployment, and its credential header, put together once per configuration.

use crate::config::{Instance, Provider};

/// The operations the proxy forwards, by their path after `/v1/` (or after the
/// deployment in an Azure-style path).
pub const OPERATIONS: [&str; 3] = ["chat/completions", "completions", "embeddings"];

/// How to address one instance: what every request to it shares, put together once
/// per configuration rather than per request.
pub struct Address {
    /// The URL up to the deployment (azure) or the operation (openai).
    prefix: String,
    /// `?api-version=...` (azure), or nothing.
    query: String,
    /// The credential header. Its value is the one place a key leaves the `Secret`
    /// wrapper.
    pub credential: (&'static str, String),
    per_deployment: bool,
}

impl Address {
    pub fn new(inst: &Instance) -> Address {
        let base = &inst.api_base;
        let key = inst.api_key.expose();
        match inst.provider_type {
            Provider::Azure => {
                let mut query = String::from("?api-version=");
                push_escaped(&mut query, &inst.api_version);
                Address {
                    prefix: format!("{base}/openai/deployments/"),
                    query,
                    credential: ("api-key", key.to_string()),
                    per_deployment: true,
                }
            }
            // `https://api.openai.com/v1` and `https://api.openai.com` both work as api_base.
            Provider::Openai => Address {
                prefix: if base.ends_with("/v1") {
                    format!("{base}/")
                } else {
                    format!("{base}/v1/")
                },
                query: String::new(),
                credential: ("authorization", format!("Bearer {key}")),
                per_deployment: false,
            },
        }
    }

    /// The URL of `op` on `deployment`.
    pub fn url(&self, deployment: &str, op: &str) -> String {
        let mut url = String::with_capacity(
            self.prefix.len() + 3 * deployment.len() + op.len() + self.query.len() + 1,
        );
        url.push_str(&self.prefix);
        if self.per_deployment {
            push_escaped(&mut url, deployment);
            url.push('/');
        }
        url.push_str(op);
        url.push_str(&self.query);
        url
    }
}

/// Appends `s` percent-encoding everything but RFC 3986 unreserved characters, so a
/// model name taken from the client (legacy serve-any instance) cannot change the
/// upstream path.
fn push_escaped(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(yaml: &str) -> Instance {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn azure_and_openai_urls() {
        let az = Address::new(&instance("{name: a, api_key: k, api_base: 'https://r.example.com', api_version: 2024-10-21, supported_models: [m]}"));
        assert_eq!(
            az.url("my-dep", "chat/completions"),
            "https://r.example.com/openai/deployments/my-dep/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(
            az.url("../x?y é", "embeddings"),
            "https://r.example.com/openai/deployments/..%2Fx%3Fy%20%C3%A9/embeddings?api-version=2024-10-21"
        );
        assert_eq!(az.credential, ("api-key", "k".to_string()));

        let oa = Address::new(&instance("{name: o, provider_type: openai, api_key: k, api_base: 'https://o.example.com/v1', supported_models: [m]}"));
        assert_eq!(
            oa.url("m", "embeddings"),
            "https://o.example.com/v1/embeddings"
        );
        let oa2 = Address::new(&instance("{name: o, provider_type: openai, api_key: k, api_base: 'https://o.example.com', supported_models: [m]}"));
        assert_eq!(
            oa2.url("m", "completions"),
            "https://o.example.com/v1/completions"
        );
        assert_eq!(oa2.credential, ("authorization", "Bearer k".to_string()));
    }
}
