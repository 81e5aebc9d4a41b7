//! Alerts (DESIGN §10): ERROR events go to `logging.feishu_webhook` as
//! `{"msg_type":"text","content":{"text":...}}`. Each event has a key (`auth:east`,
//! `circuit:east`, `all_down:gpt-4o`); a key alerts (and logs) at most once per
//! `DEDUP_WINDOW`, with or without a webhook, so an outage sends and logs a few
//! lines, not one per request. Sending
//! happens on a background thread behind a bounded queue with a timeout, so a dead
//! webhook never slows a request.

use crate::config::Secret;
use crossbeam_channel::Sender;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::{Duration, Instant};

pub const DEDUP_WINDOW: Duration = Duration::from_secs(300);
/// Keys remembered at most. Some keys carry a model a client named (an instance that
/// serves any model), so their number is bounded; past it, new keys share one.
const MAX_KEYS: usize = 512;
const QUEUE: usize = 32;
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Alerts {
    /// To the sender thread; none without a webhook (alerts are only logged).
    tx: Option<Sender<String>>,
    /// Per key: when it last alerted, and how many repeats were held back since.
    seen: Mutex<HashMap<String, (Instant, u64)>>,
    proxy: String,
}

impl Alerts {
    fn new(tx: Option<Sender<String>>, proxy: &str) -> Alerts {
        Alerts {
            tx,
            seen: Mutex::new(HashMap::new()),
            proxy: proxy.into(),
        }
    }

    /// Alerts that only log (no webhook configured).
    pub fn disabled(proxy: &str) -> Alerts {
        Alerts::new(None, proxy)
    }

    pub fn to_webhook(webhook: &Secret, proxy: &str) -> Alerts {
        let (tx, rx) = crossbeam_channel::bounded::<String>(QUEUE);
        let url = webhook.expose().to_string();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(SEND_TIMEOUT))
            .max_redirects(0)
            .build()
            .into();
        let spawned = std::thread::Builder::new()
            .name("alerts".into())
            .spawn(move || {
                for text in rx {
                    let body = serde_json::json!({"msg_type": "text", "content": {"text": text}});
                    let sent = agent
                        .post(&url)
                        .header("content-type", "application/json")
                        .send(body.to_string());
                    match sent {
                        Ok(r) if r.status().is_success() => {}
                        // The URL holds the webhook's token: never log it, or ureq's error text.
                        Ok(r) => log::warn!("alert webhook answered {}", r.status().as_u16()),
                        Err(ureq::Error::Timeout(_)) => log::warn!("alert webhook timed out"),
                        Err(_) => log::warn!("alert webhook could not be reached"),
                    }
                }
            });
        match spawned {
            Ok(_) => Alerts::new(Some(tx), proxy),
            Err(e) => {
                log::error!("alerts are off: cannot start their thread: {e}");
                Alerts::disabled(proxy)
            }
        }
    }

    /// Unless `key` alerted within the last `DEDUP_WINDOW`, logs the event at ERROR and
    /// queues it for the webhook, if any (dropping it if the queue is full).
    pub fn error(&self, key: &str, message: &str) {
        self.error_at(key, message, Instant::now());
    }

    fn error_at(&self, key: &str, message: &str, now: Instant) {
        let held_back = {
            let mut seen = self.seen.lock();
            let mut key = key;
            if seen.len() >= MAX_KEYS && !seen.contains_key(key) {
                seen.retain(|_, (last, _)| now.saturating_duration_since(*last) < DEDUP_WINDOW);
                if seen.len() >= MAX_KEYS {
                    key = "*";
                }
            }
            match seen.get_mut(key) {
                Some((last, repeats)) if now.saturating_duration_since(*last) < DEDUP_WINDOW => {
                    *repeats += 1;
                    return;
                }
                Some(entry) => std::mem::replace(entry, (now, 0)).1,
                None => {
                    seen.insert(key.to_string(), (now, 0));
                    0
                }
            }
        };
        let held = if held_back > 0 {
            format!(" ({held_back} more since the last alert)")
        } else {
            String::new()
        };
        log::error!("{message}{held}");
        if let Some(tx) = &self.tx {
            if tx
                .try_send(format!("[{}] ERROR: {message}{held}", self.proxy))
                .is_err()
            {
                log::warn!("alert queue full; an alert was dropped");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_alerts_once_per_window_and_counts_what_it_held_back() {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        let alerts = Alerts::new(Some(tx), "p");
        let t0 = Instant::now();
        for i in 0..100 {
            alerts.error_at(
                "auth:east",
                "instance east rejected the key",
                t0 + Duration::from_millis(i),
            );
        }
        alerts.error_at("circuit:east", "circuit opened", t0);
        alerts.error_at(
            "auth:east",
            "instance east rejected the key",
            t0 + DEDUP_WINDOW,
        );
        let sent: Vec<String> = rx.try_iter().collect();
        assert_eq!(
            sent,
            [
                "[p] ERROR: instance east rejected the key",
                "[p] ERROR: circuit opened",
                "[p] ERROR: instance east rejected the key (99 more since the last alert)",
            ]
        );
    }

    #[test]
    fn distinct_keys_past_the_bound_share_one() {
        let (tx, rx) = crossbeam_channel::bounded(4 * MAX_KEYS);
        let alerts = Alerts::new(Some(tx), "p");
        let t0 = Instant::now();
        for i in 0..3 * MAX_KEYS {
            alerts.error_at(&format!("deployment:x:m{i}"), "no deployment", t0);
        }
        assert_eq!(
            rx.try_iter().count(),
            MAX_KEYS + 1,
            "one per key, then one for the rest"
        );
        let seen = alerts.seen.lock().len();
        assert_eq!(seen, MAX_KEYS + 1);
    }
}
