//! The `server.workers` permits (DESIGN §2): how many upstream calls may be under way
//! at once. A request takes one once its body is read, before its first attempt, and
//! gives it back when its upstream side is done (a stream: when it ends). So a permit
//! is never held while the proxy waits for a client to send.

use parking_lot::{Condvar, Mutex};
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
