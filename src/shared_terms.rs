//! What routing and the shared state say to each other (a client's limit, Redis's
//! answer to an admission, what an attempt's outcome asks of it): kept apart from
//! `shared.rs` so that routing compiles the same in a build without Redis.

use std::time::Duration;

/// Which of a named client's own limits refused it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ClientLimit {
    Tpm,
    Rpm,
    /// Its `tokens_per_day`.
    Budget,
}

/// Redis's answer to an admission.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Reserved under this id (to give back with `settle`).
    Admitted(String),
    /// The instance cools down or has no room for a request, for this long.
    Full(Duration),
    /// The instance has no room for this many tokens for this long; a smaller request
    /// may fit.
    NoRoom(Duration),
    /// Another proxy opened the instance's circuit, for this long.
    Down(Duration),
    /// The client is over one of its own limits across the fleet, for this long.
    Client(ClientLimit, Duration),
}

/// What an attempt's outcome asks of the shared state.
#[derive(Debug, Default, PartialEq)]
pub struct Settle<'a> {
    /// Give back this reservation (id, tokens): Azure cannot have counted it.
    pub release: Option<(&'a str, u64)>,
    pub cooldown: Option<Duration>,
    pub circuit: Option<Duration>,
    /// The upstream's remaining tokens and requests.
    pub remaining: (Option<u64>, Option<u64>),
}
