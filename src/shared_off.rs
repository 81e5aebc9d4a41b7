//! The shared state of a build without the `redis` feature: a type that cannot be made,
//! so that every `Option<Shared>` on the request path is `None` and the compiler drops
//! the branches that would talk to Redis. The configuration check refuses `redis:` in
//! such a build (`config::schema`), so `start` is never reached with a section to use.

pub use crate::shared_terms::{ClientLimit, Settle, Verdict};

use crate::config::{Client, Instance, Redis};
use crate::observe::alerts::Alerts;
use std::sync::Arc;
use std::time::Duration;

pub enum Shared {}

impl Shared {
    pub fn start(_: &Redis, _: &str, _: &Alerts) -> Option<Arc<Shared>> {
        None
    }

    pub fn state(&self) -> &'static str {
        match *self {}
    }

    pub fn admit(&self, _: &Alerts, _: &Instance, _: u64, _: Option<&Client>) -> Option<Verdict> {
        match *self {}
    }

    pub fn settle(&self, _: &Alerts, _: &Instance, _: &Settle) {
        match *self {}
    }

    pub fn flush(&self, _: Duration) -> bool {
        match *self {}
    }

    pub fn timeout(&self) -> Duration {
        match *self {}
    }

    pub fn release_client(&self, _: &Alerts, _: &str, _: &str, _: u64) {
        match *self {}
    }

    pub fn spend(&self, _: &Alerts, _: &str, _: u64) -> Option<u64> {
        match *self {}
    }

    pub fn remember(&self, _: &Alerts, _: &str, _: &str, _: &str, _: Duration) {
        match *self {}
    }

    pub fn find(&self, _: &Alerts, _: &str) -> Option<(String, String)> {
        match *self {}
    }

    pub fn forget(&self, _: &Alerts, _: &str) {
        match *self {}
    }
}
