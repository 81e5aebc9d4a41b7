//! How one attempt on one instance ended (DESIGN §5.4): the one classification of an
//! upstream's answer, made once by `upstream::call` (or by the relay, for a stream that
//! breaks after its first event) and read by routing (the instance's state), the
//! statistics, the alerts and the choice of what the client is told; and the token
//! usage an answer reports.

use std::fmt;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// The instance answered as a healthy one does: 2xx, or a 4xx about the request
    /// itself that every instance would repeat (400, a content filter, 413, 422). The
    /// answer goes to the client as it is. The rate-limit headers, when sent, say how
    /// much of the instance's quota is left.
    Answered {
        status: u16,
        remaining_tokens: Option<u64>,
        remaining_requests: Option<u64>,
    },
    /// 429: the instance is at its limit; it cools down for `retry_after`
    /// (`None`: the upstream did not say).
    RateLimited { retry_after: Option<Duration> },
    /// A 5xx, or any other status no healthy instance gives.
    Failed { status: u16 },
    /// 401, 403 or 404: this instance rejects the proxy's key for this deployment, or
    /// has no such deployment. It says nothing about the instance's other models. A 404
    /// that is an OpenAI error about the request (`about_the_request`) is `Answered`
    /// instead: the client's own answer, which changes nothing for the instance.
    DeploymentFault { status: u16 },
    /// Connected and sent, but no answer came within the time allowed.
    TimedOut,
    /// No exchange with the upstream: the connection was refused, not made in time,
    /// or dropped before an answer. `arrived`: the request may have reached it.
    Unreachable { arrived: bool },
    /// The answer broke off after its head: a body that could not be read, or a
    /// stream cut or stalled after its first event.
    Broken,
}

/// Whether a 404's body is an OpenAI error about the request: an `error` with a string
/// `type` (OpenAI names every error's type) and a `code` other than Azure's
/// `DeploymentNotFound`. Azure's missing deployment and its gateway's "Resource not
/// found" (the operation is not served on this api-version) name no type; a body that
/// is not JSON is not the API speaking at all. Those are the instance's faults.
pub fn about_the_request(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Body {
        error: Error,
    }
    #[derive(serde::Deserialize)]
    struct Error {
        r#type: Option<String>,
        code: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Body>(body) {
        Ok(Body { error }) => {
            error.r#type.is_some()
                && error.code.as_ref().and_then(|c| c.as_str()) != Some("DeploymentNotFound")
        }
        Err(_) => false,
    }
}

/// Token usage as an upstream reports it (`usage` in a body or in a stream's last
/// chunk). The Responses API and audio name them `input_tokens` and `output_tokens`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
pub struct Usage {
    #[serde(default, alias = "input_tokens")]
    pub prompt_tokens: u64,
    #[serde(default, alias = "output_tokens")]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

impl Usage {
    /// The usage of a stream whose upstream reported none: the prompt's estimate, and
    /// the estimated tokens of the text it streamed.
    pub fn estimated(prompt_tokens: u64, streamed_tokens: u64) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens: streamed_tokens,
            total_tokens: prompt_tokens.saturating_add(streamed_tokens),
        }
    }
}

/// Tokens for a text without a BPE table: a quarter token per ASCII byte (English runs
/// near four characters a token) and one per other character (CJK is about one a
/// character; accented Latin is overcounted, which errs on the safe side). The
/// admission estimate of a prompt, and the usage of a stream whose upstream reports none.
pub fn estimate_text(text: &str) -> u64 {
    let ascii = text.bytes().filter(u8::is_ascii).count() as u64;
    let other = text.chars().filter(|c| !c.is_ascii()).count() as u64;
    ascii.div_ceil(4) + other
}

/// An attempt as the statistics and the access log keep it.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub instance: String,
    pub outcome: Outcome,
}

/// The error counters' key for an outcome: its status, or what failed below HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Label {
    Status(u16),
    Timeout,
    Connect,
    Broken,
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Label::Status(s) => write!(f, "{s}"),
            Label::Timeout => f.write_str("timeout"),
            Label::Connect => f.write_str("connect"),
            Label::Broken => f.write_str("broken"),
        }
    }
}

/// What an outcome means for the instance, in words for a log line.
impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Answered { .. } => f.write_str("answered"),
            Outcome::RateLimited {
                retry_after: Some(d),
            } => write!(f, "rate limited, retry after {} s", d.as_secs_f64()),
            Outcome::RateLimited { retry_after: None } => f.write_str("rate limited"),
            Outcome::Failed { .. } => f.write_str("an upstream failure"),
            Outcome::DeploymentFault { status: 404 } => {
                f.write_str("no such deployment here: out for this model")
            }
            Outcome::DeploymentFault { .. } => {
                f.write_str("the key is refused for this deployment: out for this model")
            }
            Outcome::TimedOut => f.write_str("timed out"),
            Outcome::Unreachable { .. } => f.write_str("unreachable"),
            Outcome::Broken => f.write_str("broke off"),
        }
    }
}

impl Outcome {
    /// The class of an upstream's answer with `status`; `retry_after` and the remaining
    /// counts are read from its headers by the caller.
    pub fn of_status(
        status: u16,
        retry_after: impl FnOnce() -> Option<Duration>,
        remaining: impl FnOnce() -> (Option<u64>, Option<u64>),
    ) -> Outcome {
        match status {
            429 => Outcome::RateLimited {
                retry_after: retry_after(),
            },
            401 | 403 | 404 => Outcome::DeploymentFault { status },
            200..=299 | 400..=499 => {
                let (remaining_tokens, remaining_requests) = remaining();
                Outcome::Answered {
                    status,
                    remaining_tokens,
                    remaining_requests,
                }
            }
            _ => Outcome::Failed { status },
        }
    }

    /// The status the upstream answered with, if it answered.
    pub fn status(&self) -> Option<u16> {
        match *self {
            Outcome::Answered { status, .. }
            | Outcome::Failed { status }
            | Outcome::DeploymentFault { status } => Some(status),
            Outcome::RateLimited { .. } => Some(429),
            Outcome::TimedOut | Outcome::Unreachable { .. } | Outcome::Broken => None,
        }
    }

    pub fn is_success(&self) -> bool {
        matches!(
            self,
            Outcome::Answered {
                status: 200..=299,
                ..
            }
        )
    }

    /// Whether another instance may do better: everything but an answer to pass on.
    pub fn retry_elsewhere(&self) -> bool {
        !matches!(self, Outcome::Answered { .. })
    }

    /// Whether the instance is to blame (an error in its statistics).
    pub fn is_error(&self) -> bool {
        self.retry_elsewhere()
    }

    /// Whether the upstream cannot have counted the request against its quota, so
    /// its reservation in the window is given back: refused before any work (429, a
    /// wrong key or deployment), or never delivered.
    pub fn never_counted(&self) -> bool {
        matches!(
            self,
            Outcome::RateLimited { .. }
                | Outcome::DeploymentFault { .. }
                | Outcome::Unreachable { arrived: false }
        )
    }

    pub fn label(&self) -> Label {
        match self {
            Outcome::TimedOut => Label::Timeout,
            Outcome::Unreachable { .. } => Label::Connect,
            Outcome::Broken => Label::Broken,
            other => Label::Status(other.status().unwrap_or(0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(status: u16) -> Outcome {
        Outcome::of_status(status, || Some(Duration::from_secs(3)), || (Some(1), None))
    }

    #[test]
    fn statuses_fall_into_their_classes() {
        assert!(of(200).is_success() && !of(200).retry_elsewhere());
        assert_eq!(
            of(429),
            Outcome::RateLimited {
                retry_after: Some(Duration::from_secs(3))
            }
        );
        assert_eq!(of(503), Outcome::Failed { status: 503 });
        assert_eq!(of(404), Outcome::DeploymentFault { status: 404 });
        assert_eq!(of(401), Outcome::DeploymentFault { status: 401 });
        // A 400 is about the request: any instance would say the same.
        assert!(!of(400).retry_elsewhere() && !of(400).is_success());
        assert!(of(404).retry_elsewhere() && of(404).never_counted());
        assert!(!of(503).never_counted());
        assert!(Outcome::Unreachable { arrived: false }.never_counted());
        assert!(!Outcome::Unreachable { arrived: true }.never_counted());
    }

    #[test]
    fn a_404_is_about_the_request_only_when_the_api_says_so() {
        assert!(about_the_request(
            br#"{"error":{"message":"Item with id 'x' not found.","type":"invalid_request_error","param":"input","code":null}}"#
        ));
        for fault in [
            r#"{"error":{"code":"DeploymentNotFound","message":"The API deployment for this resource does not exist."}}"#,
            r#"{"error":{"code":"DeploymentNotFound","type":"invalid_request_error","message":"m"}}"#,
            r#"{"error":{"code":"404","message":"Resource not found"}}"#,
            "<html>Not Found</html>",
            "",
        ] {
            assert!(!about_the_request(fault.as_bytes()), "{fault}");
        }
    }

    #[test]
    fn outcomes_read_as_words_not_rust() {
        for (outcome, words) in [
            (of(404), "no such deployment here: out for this model"),
            (
                of(403),
                "the key is refused for this deployment: out for this model",
            ),
            (of(429), "rate limited, retry after 3 s"),
            (of(502), "an upstream failure"),
        ] {
            assert_eq!(outcome.to_string(), words);
        }
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
    fn labels_name_statuses_and_failures_below_http() {
        let labels: Vec<String> = [
            of(500),
            Outcome::TimedOut,
            Outcome::Unreachable { arrived: false },
            Outcome::Broken,
        ]
        .iter()
        .map(|o| o.label().to_string())
        .collect();
        assert_eq!(labels, ["500", "timeout", "connect", "broken"]);
    }
}
