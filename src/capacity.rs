//! What bounds the work under way in the whole process (DESIGN §2).
//! - `Permits` (`server.workers`): how many upstream calls may be under way at once. A
//!   request takes one once it is admitted to an instance, before its first attempt,
//!   and gives it back when its upstream side is done (a stream: when it ends). So a
//!   permit is never held while the proxy waits for a client to send, nor while a
//!   request waits for an instance's room.
//! - `BodyMemory` (`server.max_body_memory`): how many bytes of request bodies may be
//!   held at once, so that many clients sending large bodies together cannot exhaust
//!   memory. A body reserves its buffer as it grows and gives it back with the request.

use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub struct Permits {
    free: Mutex<usize>,
    returned: Condvar,
    total: usize,
}

/// One permit; dropping it gives it back.
pub struct Permit(Arc<Permits>);

impl Permits {
    pub fn new(total: usize) -> Arc<Permits> {
        Arc::new(Permits {
            free: Mutex::new(total),
            returned: Condvar::new(),
            total,
        })
    }

    /// A permit, waiting until `deadline` at most for one to be given back.
    pub fn acquire(self: &Arc<Self>, deadline: Instant) -> Option<Permit> {
        let mut free = self.free.lock();
        while *free == 0 {
            if self.returned.wait_until(&mut free, deadline).timed_out() && *free == 0 {
                return None;
            }
        }
        *free -= 1;
        Some(Permit(self.clone()))
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn in_use(&self) -> usize {
        self.total - *self.free.lock()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        *self.0.free.lock() += 1;
        self.0.returned.notify_one();
    }
}

/// The bytes request bodies hold, against `server.max_body_memory`.
pub struct BodyMemory {
    used: AtomicU64,
    limit: u64,
}

/// One body's reservation; dropping it gives the bytes back.
pub struct BodyHold<'a> {
    memory: &'a BodyMemory,
    bytes: u64,
}

impl BodyMemory {
    pub fn new(limit: u64) -> BodyMemory {
        BodyMemory {
            used: AtomicU64::new(0),
            limit,
        }
    }

    pub fn hold(&self) -> BodyHold<'_> {
        BodyHold {
            memory: self,
            bytes: 0,
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

impl BodyHold<'_> {
    /// Makes this hold `bytes` in all, if the memory allows; false if it does not.
    pub fn grow_to(&mut self, bytes: u64) -> bool {
        let more = bytes.saturating_sub(self.bytes);
        if more == 0 {
            return true;
        }
        let memory = self.memory;
        // Added only if it fits: two requests near the limit cannot both fail for
        // each other's attempt.
        let added = memory
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(more)
                    .filter(|&total| total <= memory.limit)
            });
        if added.is_ok() {
            self.bytes = bytes;
        }
        added.is_ok()
    }
}

impl Drop for BodyHold<'_> {
    fn drop(&mut self) {
        self.memory.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn body_memory_is_shared_and_given_back() {
        let memory = BodyMemory::new(100);
        let mut a = memory.hold();
        assert!(a.grow_to(60));
        let mut b = memory.hold();
        assert!(!b.grow_to(50), "60 + 50 is over 100");
        assert!(b.grow_to(40));
        assert_eq!(memory.used(), 100);
        drop(a);
        assert!(b.grow_to(90), "a's 60 came back");
        drop(b);
        assert_eq!(memory.used(), 0);
    }

    #[test]
    fn permits_are_counted_and_waited_for() {
        let permits = Permits::new(2);
        let soon = || Instant::now() + Duration::from_millis(20);
        let a = permits.acquire(soon()).unwrap();
        let _b = permits.acquire(soon()).unwrap();
        assert_eq!(permits.in_use(), 2);
        assert!(permits.acquire(soon()).is_none(), "none left");
        let waiter = {
            let permits = permits.clone();
            std::thread::spawn(move || {
                permits
                    .acquire(Instant::now() + Duration::from_secs(10))
                    .is_some()
            })
        };
        drop(a);
        assert!(waiter.join().unwrap(), "a returned permit wakes a waiter");
        assert_eq!(
            permits.in_use(),
            1,
            "the waiter's permit went with its thread"
        );
    }
}
