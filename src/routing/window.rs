//! Sliding 60-second windows of tokens and of requests (DESIGN §7): what each instance
//! has admitted in the last minute, as Azure's limiter counts it. Time is passed in, so
//! all of it is tested without sleeping.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub const WINDOW: Duration = Duration::from_secs(60);

/// A sliding window of amounts (tokens, or 1 per request) over the last 60 seconds.
/// Entries are kept per admission so a refused request can take its own back. The
/// total is a u128: amounts come from client estimates (an instance without `max_tpm`
/// admits any), and no sum of a minute's u64 entries can overflow it.
#[derive(Debug, Default)]
pub struct Window {
    entries: VecDeque<(Instant, u64)>,
    total: u128,
}

impl Window {
    fn prune(&mut self, now: Instant) {
        while let Some(&(at, n)) = self.entries.front() {
            if now.saturating_duration_since(at) < WINDOW {
                break;
            }
            self.entries.pop_front();
            self.total -= u128::from(n);
        }
    }

    pub fn used(&mut self, now: Instant) -> u64 {
        self.prune(now);
        u64::try_from(self.total).unwrap_or(u64::MAX)
    }

    pub fn add(&mut self, now: Instant, n: u64) {
        self.prune(now);
        self.entries.push_back((now, n));
        self.total += u128::from(n);
    }

    /// Takes back an earlier `add(at, n)` (a request the upstream refused).
    pub fn release(&mut self, at: Instant, n: u64) {
        if let Some(i) = self.entries.iter().rposition(|&e| e == (at, n)) {
            self.entries.remove(i);
            self.total -= u128::from(n);
        }
    }

    /// The earliest moment from `now` at which `need` more fits under `limit`: when
    /// enough of the entries have left. (A request larger than the whole limit never
    /// gets here: it is refused before admission.)
    pub fn room_at(&mut self, now: Instant, need: u64, limit: u64) -> Instant {
        self.prune(now);
        let (need, limit) = (u128::from(need), u128::from(limit));
        if self.total + need <= limit {
            return now;
        }
        let mut remaining = self.total;
        for &(at, n) in &self.entries {
            remaining -= u128::from(n);
            if remaining + need <= limit {
                return at + WINDOW;
            }
        }
        // Only a `need` above `limit` gets here; the window's end is the best answer.
        self.entries.back().map_or(now, |&(at, _)| at + WINDOW)
    }

    /// Makes the window's free room at most `remaining` (an upstream's own count),
    /// by recording the difference as usage seen elsewhere. Never lowers usage: the
    /// local entries are reservations of requests the upstream may not have counted yet.
    pub fn correct(&mut self, now: Instant, limit: u64, remaining: u64) {
        let used = self.used(now);
        let floor = limit.saturating_sub(remaining);
        if floor > used {
            self.add(now, floor - used);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, secs: f64) -> Instant {
        base + Duration::from_secs_f64(secs)
    }

    #[test]
    fn window_slides_and_releases() {
        let t0 = Instant::now();
        let mut w = Window::default();
        w.add(t0, 100);
        w.add(at(t0, 10.0), 50);
        assert_eq!(w.used(at(t0, 59.9)), 150);
        assert_eq!(w.used(at(t0, 60.0)), 50, "the first entry left the window");
        w.release(at(t0, 10.0), 50);
        assert_eq!(w.used(at(t0, 60.0)), 0);
        w.release(at(t0, 10.0), 50);
        assert_eq!(
            w.used(at(t0, 60.0)),
            0,
            "releasing twice takes nothing more"
        );
    }

    #[test]
    fn room_at_is_when_enough_old_entries_leave() {
        let t0 = Instant::now();
        let mut w = Window::default();
        w.add(t0, 400);
        w.add(at(t0, 5.0), 400);
        w.add(at(t0, 20.0), 100);
        let now = at(t0, 30.0);
        assert_eq!(w.room_at(now, 100, 1000), now, "fits now");
        assert_eq!(
            w.room_at(now, 200, 1000),
            at(t0, 60.0),
            "after the first 400 leaves"
        );
        assert_eq!(
            w.room_at(now, 600, 1000),
            at(t0, 65.0),
            "after both 400s leave"
        );
        assert_eq!(
            w.room_at(now, 1000, 1000),
            at(t0, 80.0),
            "the whole limit: when the window is empty"
        );
    }

    #[test]
    fn absurd_amounts_saturate_the_reading_not_the_window() {
        let t0 = Instant::now();
        let mut w = Window::default();
        w.add(t0, u64::MAX);
        w.add(t0, u64::MAX);
        w.add(at(t0, 1.0), 5);
        assert_eq!(w.used(t0), u64::MAX);
        w.release(t0, u64::MAX);
        w.release(t0, u64::MAX);
        assert_eq!(w.used(at(t0, 1.0)), 5, "exact again once they are gone");
        assert_eq!(w.room_at(at(t0, 1.0), 10, 100), at(t0, 1.0));
    }

    #[test]
    fn upstream_remaining_only_ever_raises_usage() {
        let t0 = Instant::now();
        let mut w = Window::default();
        w.add(t0, 100);
        w.correct(t0, 1000, 300);
        assert_eq!(
            w.used(t0),
            700,
            "upstream says 300 left: 700 used somewhere"
        );
        w.correct(t0, 1000, 900);
        assert_eq!(
            w.used(t0),
            700,
            "a larger remaining does not erase reservations"
        );
        assert_eq!(w.used(at(t0, 60.0)), 0, "corrections age out like usage");
    }
}
