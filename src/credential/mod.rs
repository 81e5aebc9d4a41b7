//! Microsoft Entra ID tokens for the instances that have a `credential` (DESIGN §5.5):
//! one cache per distinct credential (instances with equal credentials share it), kept
//! fresh by a background thread of its own, so that a request only reads the current
//! token. The thread fetches at start, then at half a token's remaining life (at most
//! five minutes before it expires), and after a failure again with a growing pause;
//! requests that need a token while a fetch is under way wait for that one fetch.
//! Where a fetch goes is `fetch`'s.

mod fetch;

pub use fetch::Fetch;

use crate::config::{Credential, Secret};
use crate::observe::alerts::Alerts;
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// The most a token is refreshed before it expires.
const MOST_AHEAD: Duration = Duration::from_secs(300);
/// The least time between two fetches of one credential, whatever its tokens' life.
const LEAST_GAP: Duration = Duration::from_secs(1);
/// The longest pause between fetches that fail.
const MOST_BACKOFF: Duration = Duration::from_secs(15);
/// A token this close to its expiry is not sent: it could expire on the way.
const MARGIN: Duration = Duration::from_secs(1);
/// How often an idle refresher looks whether its credential is still in use.
const LOOK: Duration = Duration::from_secs(30);

/// The token caches of every credential in use, by credential: outlives reloads, so
/// that a reload that keeps a credential keeps its token.
#[derive(Default)]
pub struct Credentials {
    caches: Mutex<HashMap<Credential, Weak<Token>>>,
}

impl Credentials {
    /// The cache of `credential`, used by `instances`: the one in use, or a new one
    /// whose refresher starts fetching now. Alerts about it go to `alerts`.
    pub fn get(
        &self,
        credential: &Credential,
        instances: String,
        alerts: &Arc<Alerts>,
    ) -> Arc<Token> {
        let mut caches = self.caches.lock();
        caches.retain(|_, t| t.strong_count() > 0);
        if let Some(token) = caches.get(credential).and_then(Weak::upgrade) {
            *token.about.lock() = (instances, alerts.clone());
            return token;
        }
        let token = Arc::new(Token {
            kind: credential.kind(),
            slot: Mutex::new(Slot::default()),
            changed: Condvar::new(),
            about: Mutex::new((instances, alerts.clone())),
        });
        match Fetch::new(credential, |name| std::env::var(name).ok()) {
            Ok(Some(fetch)) => {
                let weak = Arc::downgrade(&token);
                let spawned = std::thread::Builder::new()
                    .name("credential".into())
                    .spawn(move || refresher(&weak, &fetch));
                if let Err(e) = spawned {
                    token.failed(
                        &mut token.slot.lock(),
                        format!("cannot start its thread: {e}"),
                    );
                }
            }
            Ok(None) => {
                if let Credential::Token { token: value } = credential {
                    let mut slot = token.slot.lock();
                    slot.current = Some((bearer(value), None));
                    slot.settled = true;
                }
            }
            Err(e) => token.failed(&mut token.slot.lock(), e),
        }
        caches.insert(credential.clone(), Arc::downgrade(&token));
        token
    }
}

/// One credential's current token, and the state of its fetching.
pub struct Token {
    /// `managed_identity`, ... : what the logs and alerts call it.
    kind: &'static str,
    slot: Mutex<Slot>,
    changed: Condvar,
    /// The instances that use it and where its alerts go: the latest configuration's.
    about: Mutex<(String, Arc<Alerts>)>,
}

#[derive(Default)]
struct Slot {
    /// `Bearer {token}`, and when it expires (never, for a static token).
    current: Option<(Arc<Secret>, Option<Instant>)>,
    /// A fetch has ended (or none will happen).
    settled: bool,
    /// Why the last fetch failed, until one succeeds.
    failure: Option<String>,
    /// A request saw the current token rejected: fetch another now.
    stale: bool,
    /// Fetches ended so far, so that a request can wait for the next one.
    ended: u64,
}

impl Slot {
    fn valid(&self, now: Instant) -> Option<&Arc<Secret>> {
        match &self.current {
            Some((header, None)) => Some(header),
            Some((header, Some(expires))) if *expires > now + MARGIN => Some(header),
            _ => None,
        }
    }
}

impl Token {
    /// The `Authorization` value to send: the current token, or, while the first
    /// fetch is under way, the one it brings (waiting at most as long as a fetch
    /// takes). `None`: no token (the instance is unavailable).
    pub fn header(&self) -> Option<Arc<Secret>> {
        let mut slot = self.slot.lock();
        let deadline = Instant::now() + fetch::FETCH_TIMEOUT;
        while !slot.settled {
            if self.changed.wait_until(&mut slot, deadline).timed_out() {
                break;
            }
        }
        slot.valid(Instant::now()).cloned()
    }

    /// Whether an instance with this credential can take requests: it has a token,
    /// or its first fetch is still under way (requests wait for it).
    pub fn usable(&self) -> bool {
        let slot = self.slot.lock();
        !slot.settled || slot.valid(Instant::now()).is_some()
    }

    /// A fresh header after the upstream rejected `rejected` (a 401 while it was
    /// thought valid): asks the refresher for a new token, unless another request
    /// already did and got it, and waits for it. `None` if none comes.
    pub fn renewed(&self, rejected: &Arc<Secret>) -> Option<Arc<Secret>> {
        let mut slot = self.slot.lock();
        let deadline = Instant::now() + fetch::FETCH_TIMEOUT;
        let same = |slot: &Slot| {
            slot.current
                .as_ref()
                .is_some_and(|(h, _)| Arc::ptr_eq(h, rejected))
        };
        if same(&slot) {
            if matches!(slot.current, Some((_, None))) {
                // A static token: nothing to fetch.
                return None;
            }
            slot.stale = true;
            self.changed.notify_all();
            let before = slot.ended;
            while slot.ended == before {
                if self.changed.wait_until(&mut slot, deadline).timed_out() {
                    return None;
                }
            }
        }
        slot.valid(Instant::now())
            .filter(|h| !Arc::ptr_eq(h, rejected))
            .cloned()
    }

    /// Records a failed fetch: logged each time, and alerted (once, de-duplicated)
    /// while no token is held.
    fn failed(&self, slot: &mut Slot, why: String) {
        let (instances, alerts) = self.about.lock().clone();
        let held = slot.valid(Instant::now()).is_some();
        log::warn!(
            "credential {} (instance {instances}): token fetch failed ({}): {why}",
            self.kind,
            if held {
                "the current token is still valid"
            } else {
                "no token"
            }
        );
        if !held {
            alerts.error(
                &format!("credential:{instances}"),
                &format!(
                    "instance {instances}: no Microsoft Entra ID token ({}): {why}; the instance is unavailable until one comes",
                    self.kind
                ),
            );
        }
        slot.failure = Some(why);
        slot.settled = true;
        slot.stale = false;
        slot.ended += 1;
    }
}

/// `Bearer {token}`, built once per token rather than per request.
fn bearer(token: &Secret) -> Arc<Secret> {
    Arc::new(Secret::new(format!("Bearer {}", token.expose())))
}

fn refresher(weak: &Weak<Token>, fetch: &Fetch) {
    let agent = fetch::agent();
    let mut failures = 0u32;
    loop {
        let Some(token) = weak.upgrade() else { return };
        let asked = Instant::now();
        // Never under a lock: requests go on reading the current token meanwhile.
        let got = fetch.token(&agent);
        let next = {
            let mut slot = token.slot.lock();
            match got {
                Ok(got) => {
                    if slot.failure.take().is_some() {
                        let instances = token.about.lock().0.clone();
                        log::info!(
                            "credential {} (instance {instances}): token obtained again; the instance is available",
                            token.kind
                        );
                    }
                    failures = 0;
                    log::debug!(
                        "credential {}: a new token, valid for {} s",
                        token.kind,
                        got.life.as_secs()
                    );
                    slot.current = Some((bearer(&got.token), Some(asked + got.life)));
                    slot.settled = true;
                    slot.stale = false;
                    slot.ended += 1;
                    asked + refresh_after(got.life)
                }
                Err(why) => {
                    failures = failures.saturating_add(1);
                    token.failed(&mut slot, why);
                    Instant::now() + backoff(failures)
                }
            }
        };
        token.changed.notify_all();
        let mut slot = token.slot.lock();
        loop {
            if slot.stale {
                break;
            }
            // Only this thread still holds it: no configuration uses it any more.
            if Arc::strong_count(&token) == 1 {
                return;
            }
            let now = Instant::now();
            if now >= next {
                break;
            }
            token.changed.wait_until(&mut slot, next.min(now + LOOK));
        }
    }
}

/// When to fetch again after a token of `life`: at half its life, but no more than
/// `MOST_AHEAD` before it expires.
fn refresh_after(life: Duration) -> Duration {
    let ahead = (life / 2).min(MOST_AHEAD);
    (life - ahead).max(LEAST_GAP)
}

/// The pause after the `failures`th failure in a row: 1, 2, 4, 8 s, ... up to
/// `MOST_BACKOFF`.
fn backoff(failures: u32) -> Duration {
    let secs = 1u64 << failures.saturating_sub(1).min(6);
    Duration::from_secs(secs).min(MOST_BACKOFF)
}

/// `--check-config --credentials`: one token fetched for each credential, and what
/// happened (never the token).
pub fn check(credential: &Credential) -> Result<String, String> {
    match Fetch::new(credential, |name| std::env::var(name).ok())? {
        None => Ok("static token (not checked: no authority to ask)".into()),
        Some(fetch) => {
            let got = fetch.token(&fetch::agent())?;
            Ok(format!(
                "token obtained, valid for {} s",
                got.life.as_secs()
            ))
        }
    }
}

/// Where a credential's tokens come from, for `--check-config`.
pub fn describe(credential: &Credential) -> String {
    match Fetch::new(credential, |name| std::env::var(name).ok()) {
        Ok(Some(fetch)) => fetch.describe(),
        Ok(None) => "a static bearer token from the configuration".into(),
        Err(e) => format!("cannot fetch: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_at_half_life_at_most_five_minutes_ahead() {
        assert_eq!(
            refresh_after(Duration::from_secs(5)),
            Duration::from_millis(2500)
        );
        assert_eq!(
            refresh_after(Duration::from_secs(600)),
            Duration::from_secs(300)
        );
        assert_eq!(
            refresh_after(Duration::from_secs(3600)),
            Duration::from_secs(3300)
        );
        assert_eq!(refresh_after(Duration::ZERO), LEAST_GAP);
    }

    #[test]
    fn backoff_grows_and_stops() {
        let pauses: Vec<u64> = (1..=7).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(pauses, [1, 2, 4, 8, 15, 15, 15]);
        assert_eq!(backoff(u32::MAX), MOST_BACKOFF);
    }

    #[test]
    fn equal_credentials_share_a_token() {
        let creds = Credentials::default();
        let alerts = Arc::new(Alerts::disabled("t"));
        let token = |value: &str| Credential::Token {
            token: Secret::new(value),
        };
        let a = creds.get(&token("one"), "a".into(), &alerts);
        let b = creds.get(&token("one"), "b".into(), &alerts);
        let c = creds.get(&token("two"), "c".into(), &alerts);
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(a.header().unwrap().expose(), "Bearer one");
        assert!(a.usable());
        // A static token cannot be renewed.
        assert!(a.renewed(&a.header().unwrap()).is_none());
    }
}
