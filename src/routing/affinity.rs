//! Affinity (DESIGN §6): state that lives in one Azure resource must be reached there
//! again. Each Responses API answer's `id` is remembered with the instance that made it
//! (and the model, for statistics), so that `previous_response_id` and
//! `/v1/responses/{id}` go back to it. Bounded: past `MAX_IDS` the oldest is forgotten,
//! and an id older than `TTL` is forgotten when it is looked up or pushed out.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Ids remembered at most (see `MAX_ID_BYTES` for what each costs).
pub const MAX_IDS: usize = 50_000;
/// The longest id remembered. Azure's are about 50 bytes; a longer one is no id an
/// upstream of ours made, and remembering it would let one answer cost unbounded
/// memory. Such an answer is passed on; its id is not followed. Measured (bytes asked of
/// the allocator), an entry costs 300 B with 50-byte ids and 969 B with ids and models
/// of 256 bytes: at most about 53 MB for `MAX_IDS` with the allocator's own overhead
/// (docs/limits.md).
pub const MAX_ID_BYTES: usize = 256;
/// How long an id is remembered: Azure keeps a stored response for 30 days.
pub const TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Where a response was made.
#[derive(Debug, Clone, PartialEq)]
pub struct Home {
    pub instance: String,
    pub model: String,
    at: Instant,
}

#[derive(Debug, Default)]
pub struct Affinity {
    homes: HashMap<String, Home>,
    /// Ids in the order they were remembered, for eviction.
    order: VecDeque<(String, Instant)>,
}

impl Affinity {
    pub fn remember(&mut self, id: &str, instance: &str, model: &str, now: Instant) {
        if id.len() > MAX_ID_BYTES {
            log::debug!("a response id of {} bytes is not remembered", id.len());
            return;
        }
        while self.order.len() >= MAX_IDS
            || self
                .order
                .front()
                .is_some_and(|(_, at)| now.saturating_duration_since(*at) >= TTL)
        {
            let Some((old, at)) = self.order.pop_front() else {
                break;
            };
            // Only if it was not remembered again since.
            if self.homes.get(&old).is_some_and(|h| h.at == at) {
                self.homes.remove(&old);
            }
        }
        self.homes.insert(
            id.to_string(),
            Home {
                instance: instance.to_string(),
                model: model.to_string(),
                at: now,
            },
        );
        self.order.push_back((id.to_string(), now));
    }

    pub fn find(&self, id: &str, now: Instant) -> Option<&Home> {
        self.homes
            .get(id)
            .filter(|h| now.saturating_duration_since(h.at) < TTL)
    }

    /// A deleted response: its id is forgotten (its place in the eviction order goes
    /// when it comes to the front).
    pub fn forget(&mut self, id: &str) {
        self.homes.remove(id);
    }

    pub fn len(&self) -> usize {
        self.homes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.homes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_lead_home_until_forgotten_expired_or_pushed_out() {
        let mut a = Affinity::default();
        let t0 = Instant::now();
        a.remember("resp_1", "east", "gpt-4o", t0);
        assert_eq!(a.find("resp_1", t0).unwrap().instance, "east");
        assert!(a.find("resp_2", t0).is_none());
        assert!(a.find("resp_1", t0 + TTL).is_none(), "expired");
        a.forget("resp_1");
        assert!(a.find("resp_1", t0).is_none());

        for i in 0..MAX_IDS + 10 {
            a.remember(&format!("r{i}"), "west", "m", t0);
        }
        assert_eq!(a.len(), MAX_IDS);
        assert!(a.find("r0", t0).is_none(), "the oldest went first");
        assert!(a.find(&format!("r{}", MAX_IDS + 9), t0).is_some());
        // An old entry in the order does not take a newer one with the same id along.
        a.remember("r11", "north", "m", t0 + Duration::from_secs(1));
        for i in 0..20 {
            a.remember(&format!("s{i}"), "west", "m", t0 + Duration::from_secs(2));
        }
        assert_eq!(
            a.find("r11", t0 + Duration::from_secs(3)).unwrap().instance,
            "north"
        );
    }

    #[test]
    fn ids_longer_than_the_bound_are_not_remembered() {
        let mut a = Affinity::default();
        let t0 = Instant::now();
        let (longest, longer) = ("r".repeat(MAX_ID_BYTES), "r".repeat(MAX_ID_BYTES + 1));
        a.remember(&longest, "east", "m", t0);
        a.remember(&longer, "east", "m", t0);
        assert!(a.find(&longest, t0).is_some());
        assert!(a.find(&longer, t0).is_none());
        assert_eq!((a.len(), a.order.len()), (1, 1));
    }
}
