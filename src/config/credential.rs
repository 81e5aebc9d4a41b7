//! An instance's `credential:` (DESIGN §5.5): a Microsoft Entra ID identity the proxy
//! gets bearer tokens for, instead of an `api_key`. Written as a map with `type`, or
//! as the bare type for the two that need no field (`credential: managed_identity`).
//! Where the tokens come from at run time is `crate::credential`'s.

use super::schema::Secret;
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// Azure OpenAI's audience.
pub const DEFAULT_SCOPE: &str = "https://cognitiveservices.azure.com/.default";

fn default_scope() -> String {
    DEFAULT_SCOPE.into()
}

/// Two instances with equal credentials share one token.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(
    remote = "Self",
    tag = "type",
    rename_all = "snake_case",
    deny_unknown_fields
)]
pub enum Credential {
    /// The host's managed identity: `IDENTITY_ENDPOINT` (App Service, Container Apps,
    /// Functions) or IMDS. `client_id` picks a user-assigned identity.
    ManagedIdentity {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_id: Option<String>,
        #[serde(default = "default_scope")]
        scope: String,
    },
    /// AKS workload identity: the assertion in `AZURE_FEDERATED_TOKEN_FILE`, exchanged at
    /// the authority; tenant and client default to `AZURE_TENANT_ID`/`AZURE_CLIENT_ID`.
    WorkloadIdentity {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tenant_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_id: Option<String>,
        #[serde(default = "default_scope")]
        scope: String,
    },
    /// A service principal's secret, exchanged at the authority.
    ClientSecret {
        tenant_id: String,
        client_id: String,
        client_secret: Secret,
        #[serde(default = "default_scope")]
        scope: String,
    },
    /// A bearer token some outside tool keeps fresh (a reload picks up a new one).
    Token { token: Secret },
}

impl Credential {
    /// The `type` as written in the configuration.
    pub fn kind(&self) -> &'static str {
        match self {
            Credential::ManagedIdentity { .. } => "managed_identity",
            Credential::WorkloadIdentity { .. } => "workload_identity",
            Credential::ClientSecret { .. } => "client_secret",
            Credential::Token { .. } => "token",
        }
    }

    /// What is wrong with it, as (field, message); the messages quote no value.
    pub fn check(&self) -> Result<(), (&'static str, &'static str)> {
        let scope = match self {
            Credential::ManagedIdentity { scope, .. }
            | Credential::WorkloadIdentity { scope, .. } => scope,
            Credential::ClientSecret {
                tenant_id,
                client_id,
                client_secret,
                scope,
            } => {
                for (field, value) in [
                    ("tenant_id", tenant_id.as_str()),
                    ("client_id", client_id),
                    ("client_secret", client_secret.expose()),
                ] {
                    if value.trim().is_empty() {
                        return Err((field, "is empty"));
                    }
                }
                scope
            }
            Credential::Token { token } if token.is_empty() => return Err(("token", "is empty")),
            Credential::Token { .. } => return Ok(()),
        };
        if !scope.starts_with("https://") && !scope.starts_with("api://") {
            return Err((
                "scope",
                "must be an https:// or api:// audience (default https://cognitiveservices.azure.com/.default)",
            ));
        }
        Ok(())
    }
}

impl Serialize for Credential {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Credential::serialize(self, s)
    }
}

impl<'de> Deserialize<'de> for Credential {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Shorthand;
        impl<'de> Visitor<'de> for Shorthand {
            type Value = Credential;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("managed_identity, workload_identity, or a map with `type` (managed_identity | workload_identity | client_secret | token)")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Credential, E> {
                match s {
                    "managed_identity" => Ok(Credential::ManagedIdentity {
                        client_id: None,
                        scope: default_scope(),
                    }),
                    "workload_identity" => Ok(Credential::WorkloadIdentity {
                        tenant_id: None,
                        client_id: None,
                        scope: default_scope(),
                    }),
                    _ => Err(E::invalid_value(
                        de::Unexpected::Other("another word"),
                        &self,
                    )),
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Credential, A::Error> {
                Credential::deserialize(de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_any(Shorthand)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Credential, String> {
        serde_yaml::from_str(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn shorthand_and_maps() {
        assert_eq!(
            parse("managed_identity").unwrap(),
            Credential::ManagedIdentity {
                client_id: None,
                scope: DEFAULT_SCOPE.into()
            }
        );
        assert_eq!(
            parse("{type: managed_identity, client_id: abc}").unwrap(),
            Credential::ManagedIdentity {
                client_id: Some("abc".into()),
                scope: DEFAULT_SCOPE.into()
            }
        );
        let c = parse("{type: client_secret, tenant_id: t, client_id: c, client_secret: s3cr3t}")
            .unwrap();
        assert_eq!(c.kind(), "client_secret");
        assert!(!format!("{c:?}").contains("s3cr3t"));
        assert!(!serde_json::to_string(&c).unwrap().contains("s3cr3t"));
        assert!(parse("token").is_err(), "a token needs its value");
        let e = parse("{type: managed_identity, clientid: x}").unwrap_err();
        assert!(e.contains("clientid"), "{e}");
        let e = parse("{type: password}").unwrap_err();
        assert!(e.contains("password"), "{e}");
    }

    #[test]
    fn checks_name_the_field() {
        let c =
            parse("{type: client_secret, tenant_id: t, client_id: ' ', client_secret: s}").unwrap();
        assert_eq!(c.check(), Err(("client_id", "is empty")));
        let c = parse("{type: managed_identity, scope: cognitiveservices}").unwrap();
        assert_eq!(c.check().unwrap_err().0, "scope");
        assert_eq!(
            parse("{type: token, token: ''}")
                .unwrap()
                .check()
                .unwrap_err()
                .0,
            "token"
        );
        assert!(parse("workload_identity").unwrap().check().is_ok());
    }
}
