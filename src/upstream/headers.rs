//! The headers between the proxy and an upstream: which of a client's travel upstream,
//! which of an upstream's come back (DESIGN §5.3, §5.6), and what an upstream's
//! rate-limit headers say about when to come back (DESIGN §6).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Client headers that never reach an upstream: the client's credentials for the
/// proxy, hop-by-hop headers, and what the proxy itself sets (host, length, encoding).
const DROPPED_REQUEST_HEADERS: [&str; 21] = [
    "authorization",
    "api-key",
    "x-api-key",
    "ocp-apim-subscription-key",
    "cookie",
    "openai-organization",
    "openai-project",
    "host",
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "expect",
    // The proxy reads bodies for usage; it asks for them uncompressed.
    "accept-encoding",
];

/// Whether a client header travels upstream: not one of the above, and one ureq will
/// send (the server's parser already refuses control bytes; this keeps a header that
/// ureq would reject from ever failing an attempt, and so an instance).
pub fn forward_request_header(name: &str, value: &str) -> bool {
    !DROPPED_REQUEST_HEADERS
        .iter()
        .any(|d| d.eq_ignore_ascii_case(name))
        && ureq::http::HeaderName::from_bytes(name.as_bytes()).is_ok()
        && ureq::http::HeaderValue::from_str(value).is_ok()
}

const RETURNED_RESPONSE_HEADERS: [&str; 12] = [
    "content-type",
    // The proxy asks for no coding; a coded answer that comes all the same keeps its
    // label, so the client can decode it.
    "content-encoding",
    "x-request-id",
    "apim-request-id",
    "x-ms-region",
    "x-ms-client-request-id",
    "openai-processing-ms",
    "openai-model",
    "openai-version",
    "retry-after",
    "retry-after-ms",
    "x-ms-retry-after-ms",
];

pub fn return_response_header(name: &str) -> bool {
    name.get(..12)
        .is_some_and(|p| p.eq_ignore_ascii_case("x-ratelimit-"))
        || RETURNED_RESPONSE_HEADERS
            .iter()
            .any(|h| h.eq_ignore_ascii_case(name))
}

/// The longest wait an upstream's header is read as: any larger number (`1e20`, `inf`,
/// `18446744073709551615`) is this, so that no arithmetic on it can overflow. Routing
/// then caps a cooldown at `routing.max_cooldown`, and logs that it did.
pub const LONGEST_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);

/// `secs` as a wait: `None` if it is no number of seconds (negative, NaN), at most
/// `LONGEST_WAIT` (infinity included).
fn wait(secs: f64) -> Option<Duration> {
    if secs.is_nan() || secs < 0.0 {
        return None;
    }
    Some(Duration::try_from_secs_f64(secs).map_or(LONGEST_WAIT, |d| d.min(LONGEST_WAIT)))
}

/// What the upstream's headers say about a refusal: how long to stay away, at most
/// `LONGEST_WAIT`. `retry-after-ms`, `x-ms-retry-after-ms`, `Retry-After` (seconds or
/// an HTTP date), then `x-ratelimit-reset-tokens`/`-requests`; `None` if none of them
/// parse.
pub fn retry_after(header: impl Fn(&str) -> Option<String>, now: SystemTime) -> Option<Duration> {
    let millis = |name| wait(header(name)?.trim().parse::<f64>().ok()? / 1000.0);
    if let Some(ms) = millis("retry-after-ms").or_else(|| millis("x-ms-retry-after-ms")) {
        return Some(ms);
    }
    if let Some(v) = header("retry-after") {
        let v = v.trim();
        if let Ok(secs) = v.parse::<f64>() {
            return wait(secs);
        }
        if let Some(at) = parse_http_date(v) {
            let until = at.duration_since(now).unwrap_or(Duration::ZERO);
            return Some(until.min(LONGEST_WAIT));
        }
    }
    ["x-ratelimit-reset-tokens", "x-ratelimit-reset-requests"]
        .iter()
        .filter_map(|name| parse_duration(&header(name)?))
        .max()
}

/// `6`, `1.5`, `20ms`, `1s`, `6m0s`, `1h2m3.5s`: seconds, or Go-style durations as
/// OpenAI sends them in `x-ratelimit-reset-*`; at most `LONGEST_WAIT`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let t = text.trim();
    if let Ok(secs) = t.parse::<f64>() {
        return wait(secs);
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
    wait(total)
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
    // Fields in their ranges keep the arithmetic below far from overflowing.
    let in_range = (1..=31).contains(&day)
        && (1970..=9999).contains(&year)
        && (0..24).contains(&h)
        && (0..60).contains(&m)
        && (0..=60).contains(&s);
    if !in_range {
        return None;
    }
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
    use proptest::strategy::Strategy;

    #[test]
    fn credentials_and_hop_by_hop_headers_stay_behind() {
        for h in [
            "Authorization",
            "API-KEY",
            "Host",
            "Connection",
            "Transfer-Encoding",
            "Cookie",
        ] {
            assert!(!forward_request_header(h, "v"), "{h}");
        }
        for h in ["Content-Type", "Accept", "User-Agent", "X-Stainless-Lang"] {
            assert!(forward_request_header(h, "v"), "{h}");
        }
        for bad in ["a\u{1}b", "\u{0}", "\u{7f}", "a\nb"] {
            assert!(!forward_request_header("X-A", bad), "{bad:?}");
        }
        assert!(return_response_header("X-RateLimit-Remaining-Tokens"));
        assert!(return_response_header("apim-request-id"));
        assert!(!return_response_header("Set-Cookie"));
        assert!(!return_response_header("Transfer-Encoding"));
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

    /// Numbers no upstream should send, each read as a bounded wait (or none).
    #[test]
    fn outlandish_numbers_are_bounded_waits() {
        let now = UNIX_EPOCH + Duration::from_secs(1_795_532_400);
        let one = |name: &'static str, value: &'static str| {
            retry_after(move |n: &str| (n == name).then(|| value.to_string()), now)
        };
        for (name, value) in [
            ("retry-after", "1e20"),
            ("retry-after", "inf"),
            ("retry-after", "18446744073709551615"),
            ("retry-after", "1e308"),
            ("retry-after-ms", "1e30"),
            ("x-ms-retry-after-ms", "infinity"),
            ("x-ratelimit-reset-tokens", "9999999999999999999h"),
            (
                "x-ratelimit-reset-requests",
                "99999999999999999999999h99999m",
            ),
            ("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT"),
        ] {
            assert_eq!(one(name, value), Some(LONGEST_WAIT), "{name}: {value}");
        }
        for (name, value) in [
            ("retry-after", "NaN"),
            ("retry-after", "-1"),
            ("retry-after-ms", "-inf"),
            ("retry-after", "Sun, 06 Nov 99999999999999 08:49:37 GMT"),
            ("retry-after", "Sun, 99 Nov 1994 08:49:37 GMT"),
            ("x-ratelimit-reset-tokens", "-5s"),
        ] {
            assert_eq!(one(name, value), None, "{name}: {value}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_header_value_parses_to_a_bounded_wait_or_none(
            value in "[0-9a-zA-Z .:,+-]{0,40}",
            name in proptest::sample::select(vec![
                "retry-after",
                "retry-after-ms",
                "x-ms-retry-after-ms",
                "x-ratelimit-reset-tokens",
                "x-ratelimit-reset-requests",
            ]),
        ) {
            let header = |n: &str| (n == name).then(|| value.clone());
            let wait = retry_after(header, SystemTime::now());
            proptest::prop_assert!(wait.is_none_or(|w| w <= LONGEST_WAIT));
        }

        #[test]
        fn numbers_and_units_never_overflow(
            parts in proptest::collection::vec(
                (any_number(), proptest::sample::select(vec!["ms", "s", "m", "h", ""])),
                1..6,
            ),
        ) {
            let text: String = parts.iter().map(|(n, u)| format!("{n}{u}")).collect();
            proptest::prop_assert!(parse_duration(&text).is_none_or(|w| w <= LONGEST_WAIT));
        }

        #[test]
        fn any_date_is_a_time_or_none(text in "[A-Za-z]{3}, [0-9]{1,20} [A-Za-z]{3} [0-9]{1,20} [0-9]{1,20}:[0-9]{1,20}:[0-9]{1,20} GMT") {
            // Only the absence of a panic (an overflow) is asserted; the range checks
            // make every accepted date one that SystemTime holds.
            let _ = parse_http_date(&text);
        }
    }

    /// Decimal numbers of any size, fractions and exponents included.
    fn any_number() -> impl proptest::strategy::Strategy<Value = String> {
        proptest::prop_oneof![
            proptest::num::u64::ANY.prop_map(|n| n.to_string()),
            proptest::num::f64::POSITIVE.prop_map(|f| f.to_string()),
            "[0-9]{1,40}(\\.[0-9]{0,10})?(e[0-9]{1,3})?",
        ]
    }
}
