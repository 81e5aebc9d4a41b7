//! What the proxy knows about rate limits (DESIGN §7): sliding 60-second windows of
//! tokens and requests, the admission estimate of a request's tokens, and what an
//! upstream's rate-limit headers say (cooldowns, remaining quota). Time is always
//! passed in, so all of it is tested without sleeping.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

/// Tokens for a text without a BPE table: a quarter token per ASCII byte (English runs
/// near four characters a token) and one per other character (CJK is about one a
/// character; accented Latin is overcounted, which errs on the safe side).
pub fn estimate_text(text: &str) -> u64 {
    let ascii = text.bytes().filter(u8::is_ascii).count() as u64;
    let other = text.chars().filter(|c| !c.is_ascii()).count() as u64;
    ascii.div_ceil(4) + other
}

/// What the upstream's headers say about a refusal: how long to stay away.
/// `retry-after-ms`, `x-ms-retry-after-ms`, `Retry-After` (seconds or an HTTP date),
/// then `x-ratelimit-reset-tokens`/`-requests`; `None` if none of them parse.
pub fn retry_after(header: impl Fn(&str) -> Option<String>, now: SystemTime) -> Option<Duration> {
    let millis = |name| {
        header(name)?
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|v| *v >= 0.0)
    };
    if let Some(ms) = millis("retry-after-ms").or_else(|| millis("x-ms-retry-after-ms")) {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    if let Some(v) = header("retry-after") {
        let v = v.trim();
        if let Ok(secs) = v.parse::<f64>() {
            return (secs >= 0.0).then(|| Duration::from_secs_f64(secs));
        }
        if let Some(at) = parse_http_date(v) {
            return Some(at.duration_since(now).unwrap_or(Duration::ZERO));
        }
    }
    ["x-ratelimit-reset-tokens", "x-ratelimit-reset-requests"]
        .iter()
        .filter_map(|name| parse_duration(&header(name)?))
        .max()
}

/// `6`, `1.5`, `20ms`, `1s`, `6m0s`, `1h2m3.5s`: seconds, or Go-style durations as
/// OpenAI sends them in `x-ratelimit-reset-*`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let t = text.trim();
    if let Ok(secs) = t.parse::<f64>() {
        return (secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let mut total = 0.0;
    let mut rest = t;
    while !rest.is_empty() {
        let split = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let value: f64 = rest[..split].parse().ok()?;
        let unit_len = rest[split..]
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len() - split);
        let unit = &rest[split..split + unit_len];
        total += value
            * match unit {
                "ms" => 0.001,
                "s" => 1.0,
                "m" => 60.0,
                "h" => 3600.0,
                _ => return None,
            };
        rest = &rest[split + unit_len..];
    }
    Some(Duration::from_secs_f64(total))
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the form RFC 9110 requires.
pub fn parse_http_date(text: &str) -> Option<SystemTime> {
    let parts: Vec<&str> = text.split_whitespace().collect();
    let [_, day, month, year, time, "GMT"] = parts[..] else {
        return None;
    };
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == month)? as i64
        + 1;
    let (day, year): (i64, i64) = (day.parse().ok()?, year.parse().ok()?);
    let hms: Vec<i64> = time
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let [h, m, s] = hms[..] else { return None };
    // Days from 1970-01-01 to the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + m * 60 + s;
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
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

    #[test]
    fn text_estimate_is_pinned() {
        assert_eq!(estimate_text(""), 0);
        assert_eq!(estimate_text("Hello, world!"), 4);
        assert_eq!(
            estimate_text("The quick brown fox jumps over the lazy dog."),
            11
        );
        assert_eq!(estimate_text("你好世界"), 4);
        assert_eq!(estimate_text("café"), 2);
        assert_eq!(estimate_text(&"a".repeat(4000)), 1000);
    }

    #[test]
    fn retry_after_sources_in_order() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        let h = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            retry_after(h(&[("retry-after-ms", "1500"), ("retry-after", "30")]), now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            retry_after(h(&[("x-ms-retry-after-ms", "250")]), now),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            retry_after(h(&[("retry-after", "30")]), now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            retry_after(h(&[("retry-after", "Sun, 06 Nov 1994 08:50:07 GMT")]), now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            retry_after(
                h(&[
                    ("x-ratelimit-reset-tokens", "6m0s"),
                    ("x-ratelimit-reset-requests", "20ms")
                ]),
                now
            ),
            Some(Duration::from_secs(360))
        );
        assert_eq!(retry_after(h(&[("retry-after", "soon")]), now), None);
        assert_eq!(retry_after(h(&[]), now), None);
    }

    #[test]
    fn durations_and_dates() {
        assert_eq!(
            parse_duration("1h2m3.5s"),
            Some(Duration::from_secs_f64(3723.5))
        );
        assert_eq!(parse_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("3 fortnights"), None);
        assert_eq!(
            parse_http_date("Thu, 01 Jan 1970 00:00:10 GMT"),
            Some(UNIX_EPOCH + Duration::from_secs(10))
        );
        assert_eq!(
            parse_http_date("Tue, 24 Nov 2026 15:00:00 GMT"),
            Some(UNIX_EPOCH + Duration::from_secs(1_795_532_400))
        );
        assert_eq!(parse_http_date("yesterday"), None);
    }
}
