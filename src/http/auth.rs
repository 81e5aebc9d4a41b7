//! Authentication (DESIGN §5.1): when `auth.api_keys` is set, API endpoints need one of
//! those keys as `Authorization: Bearer <key>` or `api-key: <key>`; admin endpoints
//! need `auth.admin_key` when it is set, and a loopback client when it is not. A key of
//! `auth.clients` also says which named client sent the request.

use crate::config::{Client, Secret};
use crate::error::Error;
use std::net::SocketAddr;

/// The key a request presents: `Authorization: Bearer <key>` or `api-key: <key>`.
/// `header` looks up a request header by name.
fn presented_key<'a>(header: impl Fn(&str) -> Option<&'a str>) -> Option<&'a str> {
    let header = |name| header(name).map(str::trim);
    header("authorization")
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .or_else(|| header("api-key"))
}

/// Whether `presented` is one of `keys`. Every key is compared, so the timing does
/// not tell which one nearly matched.
fn matches_any<'a>(keys: impl IntoIterator<Item = &'a Secret>, presented: &str) -> bool {
    keys.into_iter().fold(false, |any, k| {
        constant_time_eq(k.expose().as_bytes(), presented.as_bytes()) | any
    })
}

/// Checks the request's key against the configured ones (no keys and no clients
/// configured means open), and names its client: `Some(index in clients)` for a named
/// client's key, `None` for an unnamed key or an open proxy.
pub fn check_client<'a>(
    keys: &[Secret],
    clients: &[Client],
    header: impl Fn(&str) -> Option<&'a str>,
) -> Result<Option<usize>, Error> {
    if keys.is_empty() && clients.is_empty() {
        return Ok(None);
    }
    match presented_key(header) {
        None => Err(Error::MissingKey),
        Some(k) => match named_client(clients, k) {
            Some(i) => Ok(Some(i)),
            None if matches_any(keys, k) => Ok(None),
            None => Err(Error::WrongKey),
        },
    }
}

/// The client whose `key`, or whose `key_sha256` of the presented key, matches. Every
/// client is compared, so the timing does not tell which one nearly matched.
fn named_client(clients: &[Client], presented: &str) -> Option<usize> {
    use sha2::Digest;
    let hashed = clients.iter().any(|c| c.key_sha256.is_some());
    let digest: String = if hashed {
        sha2::Sha256::digest(presented.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    } else {
        String::new()
    };
    clients.iter().enumerate().fold(None, |found, (i, c)| {
        let hit = match (&c.key, &c.key_sha256) {
            (Some(key), _) => constant_time_eq(key.expose().as_bytes(), presented.as_bytes()),
            (None, Some(hex)) => {
                constant_time_eq(hex.to_ascii_lowercase().as_bytes(), digest.as_bytes())
            }
            (None, None) => false,
        };
        if hit {
            Some(i)
        } else {
            found
        }
    })
}

/// Admin endpoints need `auth.admin_key` when it is set, and otherwise a loopback client.
pub fn check_admin<'a>(
    admin_key: Option<&Secret>,
    header: impl Fn(&str) -> Option<&'a str>,
    peer: Option<SocketAddr>,
) -> Result<(), Error> {
    match admin_key {
        Some(key) => match presented_key(header) {
            Some(k) if matches_any([key], k) => Ok(()),
            _ => Err(Error::AdminKeyNeeded),
        },
        None if peer.is_some_and(|a| a.ip().is_loopback()) => Ok(()),
        None => Err(Error::AdminLoopbackOnly),
    }
}

/// Compares without an early exit on the first differing byte (only the length leaks).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request's one header, looked up by name in any case.
    fn one<'a>(header: Option<(&'a str, &'a str)>) -> impl Fn(&str) -> Option<&'a str> {
        move |name| {
            header
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        }
    }

    #[test]
    fn admin_rules() {
        let key = Secret::new("adm");
        let status = |key: Option<&Secret>, from: &str, header| {
            check_admin(key, one(header), from.parse().ok()).map_err(|e| e.status())
        };
        // No admin key: loopback only (IPv4 and IPv6).
        assert_eq!(status(None, "127.0.0.1:5000", None), Ok(()));
        assert_eq!(status(None, "[::1]:5000", None), Ok(()));
        assert_eq!(status(None, "10.1.2.3:5000", None), Err(403));
        assert_eq!(
            status(None, "10.1.2.3:5000", Some(("api-key", "adm"))),
            Err(403)
        );
        // With an admin key: the key, from anywhere; loopback alone is not enough.
        assert_eq!(
            status(
                Some(&key),
                "10.1.2.3:5000",
                Some(("authorization", "Bearer adm"))
            ),
            Ok(())
        );
        assert_eq!(status(Some(&key), "127.0.0.1:5000", None), Err(401));
        assert_eq!(
            status(Some(&key), "127.0.0.1:5000", Some(("api-key", "adm2"))),
            Err(401)
        );
    }

    #[test]
    fn client_keys_by_either_header() {
        let keys = [Secret::new("c1"), Secret::new("c2")];
        let ok = |h| check_client(&keys, &[], one(h)).is_ok();
        assert!(ok(Some(("authorization", "Bearer c2"))));
        assert!(ok(Some(("api-key", "c1"))));
        assert!(!ok(Some(("authorization", "Basic c1"))));
        assert!(!ok(None));
        assert_eq!(check_client(&[], &[], one(None)), Ok(None), "no keys: open");
    }

    #[test]
    fn named_clients_by_key_or_by_its_sha256() {
        let clients: Vec<Client> = serde_yaml::from_str(
            "[{name: a, key: ka}, {name: b, key_sha256: 2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824}]",
        )
        .unwrap();
        let keys = [Secret::new("plain")];
        let who = |h| check_client(&keys, &clients, one(h));
        assert_eq!(who(Some(("api-key", "ka"))), Ok(Some(0)));
        // SHA-256("hello"), written in upper case in the configuration.
        assert_eq!(who(Some(("authorization", "Bearer hello"))), Ok(Some(1)));
        assert_eq!(who(Some(("api-key", "plain"))), Ok(None), "an unnamed key");
        assert_eq!(who(Some(("api-key", "hello2"))), Err(Error::WrongKey));
        assert_eq!(
            check_client(&[], &clients, one(None)),
            Err(Error::MissingKey),
            "clients alone close the proxy"
        );
    }

    #[test]
    fn equal_only_when_bytes_and_length_match() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
