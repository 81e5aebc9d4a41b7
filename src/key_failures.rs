//! Failed keys, counted and slowed: every 401 the key checks give is counted (for
//! `/stats` and `/metrics`), and a client address that presents `auth.max_failures`
//! wrong or missing keys within `auth.failure_window_seconds` is answered 429 for
//! `auth.failure_block_seconds`, its keys not even compared, so that guessing costs a
//! block per handful of guesses. Other addresses are never slowed. The table of
//! addresses is bounded: past `MAX_ADDRESSES` the one first seen is forgotten.

use crate::config::Auth;
use crate::error::Error;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Addresses remembered at once; past this the one first seen is forgotten.
const MAX_ADDRESSES: usize = 4096;

/// One address's recent failures.
struct Entry {
    window_start: Instant,
    failures: u32,
    blocked_until: Option<Instant>,
}

#[derive(Default)]
struct Table {
    entries: HashMap<IpAddr, Entry>,
    /// The addresses in the order first seen, to forget the oldest in O(1).
    order: VecDeque<IpAddr>,
}

pub struct KeyFailures {
    table: Mutex<Table>,
    origin: Instant,
    /// When the last block ends, in milliseconds from `origin`: while it is past, no
    /// address is blocked and a request need not take the lock.
    blocks_end: AtomicU64,
    failures: AtomicU64,
    refused: AtomicU64,
}

impl Default for KeyFailures {
    fn default() -> Self {
        KeyFailures {
            table: Mutex::default(),
            origin: Instant::now(),
            blocks_end: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }
}

/// The address a client is known by: an IPv6 client holds a whole /64, so it is
/// counted as one.
fn client(peer: SocketAddr) -> IpAddr {
    match peer.ip().to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

impl KeyFailures {
    /// Runs the key check `check` for a request from `peer`, unless that address is
    /// blocked (429 without comparing its key, so a block also hides which guess was
    /// right), and counts a 401 it gives.
    pub fn check<T>(
        &self,
        auth: &Auth,
        peer: Option<SocketAddr>,
        check: impl FnOnce() -> Result<T, Error>,
    ) -> Result<T, Error> {
        let now = Instant::now();
        let address = peer.map(client);
        if let Some(address) = address {
            if self.millis(now) < self.blocks_end.load(Ordering::Relaxed) {
                if let Some(wait) = self.blocked(address, now) {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    return Err(Error::KeyFailures { wait });
                }
            }
        }
        let result = check();
        if matches!(&result, Err(e) if e.status() == 401) {
            self.failures.fetch_add(1, Ordering::Relaxed);
            if let (Some(address), 1..) = (address, auth.max_failures) {
                self.failed(auth, address, now);
            }
        }
        result
    }

    /// 401s since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// 429s given to blocked addresses since start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    fn millis(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_millis() as u64
    }

    /// How long `address` stays blocked, if it is.
    fn blocked(&self, address: IpAddr, now: Instant) -> Option<Duration> {
        let t = self.table.lock();
        let until = t.entries.get(&address)?.blocked_until?;
        (until > now).then(|| until - now)
    }

    /// Counts a failure of `address`, and blocks it when its window holds too many.
    fn failed(&self, auth: &Auth, address: IpAddr, now: Instant) {
        let window = Duration::from_secs_f64(auth.failure_window_seconds);
        let mut t = self.table.lock();
        if !t.entries.contains_key(&address) {
            if t.order.len() >= MAX_ADDRESSES {
                if let Some(oldest) = t.order.pop_front() {
                    t.entries.remove(&oldest);
                }
            }
            t.order.push_back(address);
        }
        let entry = t.entries.entry(address).or_insert(Entry {
            window_start: now,
            failures: 0,
            blocked_until: None,
        });
        if now.saturating_duration_since(entry.window_start) >= window {
            entry.window_start = now;
            entry.failures = 0;
        }
        entry.failures = entry.failures.saturating_add(1);
        if entry.failures >= auth.max_failures {
            let block = Duration::from_secs_f64(auth.failure_block_seconds);
            let until = now + block;
            entry.blocked_until = Some(until);
            entry.failures = 0;
            entry.window_start = now;
            self.blocks_end
                .fetch_max(self.millis(until), Ordering::Relaxed);
            log::warn!(
                "client {address}: {} wrong or missing keys within {}s: answered 429 for {}s",
                auth.max_failures,
                auth.failure_window_seconds,
                auth.failure_block_seconds
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(max_failures: u32) -> Auth {
        Auth {
            max_failures,
            ..Auth::default()
        }
    }

    fn peer(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn an_address_is_blocked_after_its_failures_and_no_other() {
        let k = KeyFailures::default();
        let a = auth(3);
        for _ in 0..3 {
            assert_eq!(
                k.check(&a, peer("10.0.0.1:1"), || Err::<(), _>(Error::WrongKey)),
                Err(Error::WrongKey)
            );
        }
        let blocked = k.check(&a, peer("10.0.0.1:2"), || Ok(()));
        assert!(
            matches!(blocked, Err(Error::KeyFailures { wait }) if wait > Duration::from_secs(59)),
            "{blocked:?}"
        );
        assert_eq!(k.check(&a, peer("10.0.0.2:1"), || Ok(())), Ok(()));
        assert_eq!((k.failures(), k.refused()), (3, 1));
        // Off: counted, never blocked.
        let off = KeyFailures::default();
        for _ in 0..10 {
            let _ = off.check(&auth(0), peer("10.0.0.1:1"), || {
                Err::<(), _>(Error::MissingKey)
            });
        }
        assert_eq!(off.check(&auth(0), peer("10.0.0.1:1"), || Ok(())), Ok(()));
        assert_eq!(off.failures(), 10);
    }

    #[test]
    fn an_ipv6_client_is_its_64_and_the_table_is_bounded() {
        assert_eq!(
            client("[2001:db8:1:2:aaaa::1]:1".parse().unwrap()),
            client("[2001:db8:1:2:bbbb::9]:7".parse().unwrap())
        );
        assert_ne!(
            client("[2001:db8:1:2::1]:1".parse().unwrap()),
            client("[2001:db8:1:3::1]:1".parse().unwrap())
        );
        assert_eq!(
            client("[::ffff:10.0.0.1]:1".parse().unwrap()),
            client("10.0.0.1:2".parse().unwrap())
        );
        let k = KeyFailures::default();
        for i in 0..MAX_ADDRESSES as u32 + 10 {
            let ip = std::net::Ipv4Addr::from(i);
            let _ = k.check(&auth(5), Some(SocketAddr::from((ip, 1))), || {
                Err::<(), _>(Error::WrongKey)
            });
        }
        let t = k.table.lock();
        assert_eq!(
            (t.entries.len(), t.order.len()),
            (MAX_ADDRESSES, MAX_ADDRESSES)
        );
        assert!(
            !t.entries.contains_key(&IpAddr::from([0, 0, 0, 0])),
            "the oldest went first"
        );
    }
}
