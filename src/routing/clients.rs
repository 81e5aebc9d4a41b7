//! Named clients' own limits (DESIGN §5.6): each client's TPM/RPM windows and what it
//! spent of the UTC day, checked and reserved before any instance is asked (`admit`,
//! whose `Ticket` gives the reservation back unless the request was counted); and the
//! waiting line that serves waiting clients in turn (`Line`). Runtime state is kept by
//! client name, so a reload that keeps a name keeps its windows and its day.
//!
//! Without `redis`, a day's spending lives in this process only: a restart starts the
//! day's count afresh (said at start and in docs/clients.md). With `redis`, the
//! shared admission script checks and reserves the client's windows and budget with
//! the instance's, and the day's count lives there.

use super::window::Window;
use crate::config::{Client, Config};
use crate::error::Error;
use crate::observe::alerts::Alerts;
use crate::outcome::Usage;
use crate::shared::{ClientLimit, Shared};
use parking_lot::Mutex;
use std::cell::OnceCell;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const DAY_SECS: u64 = 86_400;

/// The UTC day at `now` (days since 1970-01-01), and how long until it ends.
pub fn utc_day(now: SystemTime) -> (u64, Duration) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let day = since.as_secs() / DAY_SECS;
    let end = Duration::from_secs((day + 1) * DAY_SECS);
    (day, end.saturating_sub(since))
}

#[derive(Debug, Default)]
struct Runtime {
    tokens: Window,
    requests: Window,
    /// The UTC day `spent` counts.
    day: u64,
    spent: u64,
}

impl Runtime {
    fn spent(&self, day: u64) -> u64 {
        if self.day == day {
            self.spent
        } else {
            0
        }
    }

    fn set_spent(&mut self, day: u64, spent: u64) {
        (self.day, self.spent) = (day, spent);
    }
}

/// Which of a client's own limits refuses a request, and until when: its window has
/// room, or its day ends.
pub type Over = (ClientLimit, Duration);

/// The client's answer to `over`.
pub fn refusal(client: &Client, (limit, wait): Over) -> Error {
    let name = client.name.clone();
    let (limit, value) = match limit {
        ClientLimit::Budget => {
            return Error::BudgetSpent {
                client: name,
                budget: client.tokens_per_day.unwrap_or(0),
                wait,
            }
        }
        ClientLimit::Tpm => ("tpm", client.tpm),
        ClientLimit::Rpm => ("rpm", client.rpm),
    };
    Error::ClientRateLimited {
        client: name,
        limit,
        value: value.unwrap_or(0),
        wait,
    }
}

/// What one client used: tokens and requests in its windows now, tokens spent today.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Used {
    pub tpm: u64,
    pub rpm: u64,
    pub today: u64,
}

/// Every named client's windows and day, by name.
#[derive(Debug, Default)]
pub struct Clients {
    runtimes: HashMap<String, Runtime>,
}

impl Clients {
    pub fn new(config: &Config) -> Clients {
        let mut clients = Clients::default();
        clients.update(config);
        clients
    }

    /// Follows a new configuration: clients it still names keep their windows and day,
    /// removed ones are forgotten, new ones start afresh.
    pub fn update(&mut self, config: &Config) {
        let clients = &config.auth.clients;
        self.runtimes
            .retain(|name, _| clients.iter().any(|c| &c.name == name));
        for c in clients {
            self.runtimes.entry(c.name.clone()).or_default();
        }
    }

    /// Checks `client`'s budget and windows for `need` tokens and reserves them.
    pub fn admit(
        &mut self,
        client: &Client,
        need: u64,
        now: Instant,
        day: u64,
    ) -> Result<(), Over> {
        let Some(rt) = self.runtimes.get_mut(&client.name) else {
            // Removed by a reload since its request began: nothing to count against.
            return Ok(());
        };
        if let Some(budget) = client.tokens_per_day {
            if rt.spent(day) >= budget {
                return Err((ClientLimit::Budget, Duration::ZERO));
            }
        }
        let wait = |at: Instant| at.saturating_duration_since(now);
        if let Some(max) = client.rpm {
            let at = rt.requests.room_at(now, 1, max);
            if at > now {
                return Err((ClientLimit::Rpm, wait(at)));
            }
        }
        if let Some(max) = client.tpm {
            let at = rt.tokens.room_at(now, need, max);
            if at > now {
                return Err((ClientLimit::Tpm, wait(at)));
            }
        }
        rt.tokens.add(now, need);
        rt.requests.add(now, 1);
        Ok(())
    }

    /// Takes back a reservation made `at` (a request no upstream counted).
    fn release(&mut self, name: &str, at: Instant, need: u64) {
        if let Some(rt) = self.runtimes.get_mut(name) {
            rt.tokens.release(at, need);
            rt.requests.release(at, 1);
        }
    }

    /// Adds `tokens` to what `name` spent on `day`; `shared_total` is the fleet's count
    /// when Redis keeps it, which replaces this proxy's own.
    pub fn spend(&mut self, name: &str, day: u64, tokens: u64, shared_total: Option<u64>) {
        if let Some(rt) = self.runtimes.get_mut(name) {
            let spent = shared_total.unwrap_or_else(|| rt.spent(day).saturating_add(tokens));
            rt.set_spent(day, spent);
        }
    }

    pub fn used(&mut self, name: &str, now: Instant, day: u64) -> Used {
        self.runtimes
            .get_mut(name)
            .map_or_else(Used::default, |rt| Used {
                tpm: rt.tokens.used(now),
                rpm: rt.requests.used(now),
                today: rt.spent(day),
            })
    }
}

/// A request's reservation in its client's windows. Dropped without `keep`, it is
/// given back: the request was refused or failed before any upstream counted it.
pub struct Ticket<'a> {
    clients: &'a Mutex<Clients>,
    shared: Option<(&'a Shared, &'a Alerts)>,
    pub client: &'a Client,
    pub need: u64,
    at: Instant,
    /// The reservation's id in the shared state, once Redis made it there (with the
    /// first instance's admission, in the same script).
    pub shared_id: OnceCell<String>,
    kept: bool,
}

impl Ticket<'_> {
    /// The request was counted upstream: the reservation stays its minute.
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        self.clients
            .lock()
            .release(&self.client.name, self.at, self.need);
        if let (Some((shared, alerts)), Some(id)) = (self.shared, self.shared_id.get()) {
            shared.release_client(alerts, &self.client.name, id, self.need);
        }
    }
}

/// Checks and reserves `need` tokens and a request in `client`'s own windows, before
/// any instance is asked; over a limit, the client's own 429.
pub fn admit<'a>(
    clients: &'a Mutex<Clients>,
    shared: Option<(&'a Shared, &'a Alerts)>,
    client: &'a Client,
    need: u64,
) -> Result<Ticket<'a>, Error> {
    let now = Instant::now();
    let (day, day_left) = utc_day(SystemTime::now());
    match clients.lock().admit(client, need, now, day) {
        Ok(()) => Ok(Ticket {
            clients,
            shared,
            client,
            need,
            at: now,
            shared_id: OnceCell::new(),
            kept: false,
        }),
        Err((ClientLimit::Budget, _)) => Err(refusal(client, (ClientLimit::Budget, day_left))),
        Err(over) => Err(refusal(client, over)),
    }
}

/// Counts what the upstream reported a request of `client` used against its day: in
/// Redis when it answers (the fleet's total comes back), else here only.
pub fn spend(
    clients: &Mutex<Clients>,
    shared: Option<(&Shared, &Alerts)>,
    client: &str,
    usage: Usage,
) {
    let tokens = usage.prompt_tokens.saturating_add(usage.completion_tokens);
    if tokens == 0 {
        return;
    }
    let (day, _) = utc_day(SystemTime::now());
    let total = shared.and_then(|(s, alerts)| s.spend(alerts, client, tokens));
    clients.lock().spend(client, day, tokens, total);
}

/// Requests waiting for room in one line, served by client in turn: the first is the
/// oldest request of the client whose turn it is, and a client whose request is
/// admitted goes to the back of the turns. A client sending ten times as many requests
/// as another thus gets about as many admitted while both wait, not ten times as many.
/// Unnamed keys (and an open proxy) share one turn.
#[derive(Debug)]
pub struct Line<T> {
    /// Per client with requests waiting, in turn order: its name and its waiting
    /// requests. No client appears twice, none with nothing waiting.
    turns: VecDeque<(Option<String>, Waiting<T>)>,
}

/// One client's waiting requests (ticket, item), oldest first.
type Waiting<T> = VecDeque<(u64, T)>;

impl<T> Default for Line<T> {
    fn default() -> Self {
        Line {
            turns: VecDeque::new(),
        }
    }
}

impl<T> Line<T> {
    /// Adds `client`'s request, after its others; a client not waiting yet takes the
    /// last turn.
    pub fn push(&mut self, client: Option<&str>, ticket: u64, item: T) {
        match self.turns.iter_mut().find(|(c, _)| c.as_deref() == client) {
            Some((_, waiting)) => waiting.push_back((ticket, item)),
            None => self
                .turns
                .push_back((client.map(str::to_string), VecDeque::from([(ticket, item)]))),
        }
    }

    /// The request whose turn it is.
    pub fn first(&self) -> Option<(u64, &T)> {
        let (_, waiting) = self.turns.front()?;
        waiting.front().map(|(ticket, item)| (*ticket, item))
    }

    /// Takes `ticket` out. If it was `admitted` as the first, its client's turn passes
    /// to the next client; a request that gives up leaves its client's turn as it was.
    pub fn remove(&mut self, ticket: u64, admitted: bool) {
        let Some(at) = self
            .turns
            .iter()
            .position(|(_, w)| w.iter().any(|(t, _)| *t == ticket))
        else {
            return;
        };
        let waiting = &mut self.turns[at].1;
        waiting.retain(|(t, _)| *t != ticket);
        if waiting.is_empty() {
            self.turns.remove(at);
        } else if at == 0 && admitted {
            self.turns.rotate_left(1);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.turns.is_empty()
    }

    /// How many requests wait.
    pub fn len(&self) -> usize {
        self.turns.iter().map(|(_, w)| w.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(yaml: &str) -> Client {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn days_end_at_midnight_utc() {
        let at = |secs| UNIX_EPOCH + Duration::from_secs(secs);
        assert_eq!(utc_day(at(0)), (0, Duration::from_secs(DAY_SECS)));
        assert_eq!(utc_day(at(DAY_SECS - 1)), (0, Duration::from_secs(1)));
        // 2026-12-05T23:00:00Z
        assert_eq!(
            utc_day(at(1_796_511_600)),
            (20_792, Duration::from_secs(3600))
        );
    }

    #[test]
    fn limits_refuse_with_the_wait_of_the_clients_own_window() {
        let c = client("{name: a, key: k, tpm: 100, rpm: 3, tokens_per_day: 1000}");
        let config: Config = serde_yaml::from_str(
            "auth: {clients: [{name: a, key: k}]}\ninstances: [{name: i, api_key: k, api_base: 'http://a', supported_models: [m]}]",
        )
        .unwrap();
        let mut clients = Clients::new(&config);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        clients.admit(&c, 60, t0, 7).unwrap();
        assert_eq!(
            clients.admit(&c, 60, at(10), 7),
            Err((ClientLimit::Tpm, Duration::from_secs(50))),
            "100 tokens a minute: room when the first 60 leave"
        );
        clients.admit(&c, 40, at(10), 7).unwrap();
        clients.admit(&c, 0, at(20), 7).unwrap();
        assert_eq!(
            clients.admit(&c, 0, at(30), 7),
            Err((ClientLimit::Rpm, Duration::from_secs(30)))
        );
        clients.release("a", at(20), 0);
        clients.admit(&c, 0, at(30), 7).unwrap();
        clients.spend("a", 7, 999, None);
        assert_eq!(clients.used("a", at(30), 7).today, 999);
        clients.spend("a", 7, 1, None);
        assert!(matches!(
            clients.admit(&c, 0, at(90), 7),
            Err((ClientLimit::Budget, _))
        ));
        assert!(clients.admit(&c, 0, at(90), 8).is_ok(), "a new day");
        clients.spend("a", 8, 5, Some(700));
        assert_eq!(clients.used("a", at(90), 8).today, 700, "the fleet's count");
    }

    #[test]
    fn a_reload_keeps_the_clients_it_still_names() {
        let config = |names: &str| -> Config {
            serde_yaml::from_str(&format!(
                "auth: {{clients: [{names}]}}\ninstances: [{{name: i, api_key: k, api_base: 'http://a', supported_models: [m]}}]"
            ))
            .unwrap()
        };
        let mut clients = Clients::new(&config("{name: a, key: ka}, {name: b, key: kb}"));
        let now = Instant::now();
        clients.spend("a", 1, 10, None);
        clients.spend("b", 1, 20, None);
        clients.update(&config("{name: a, key: ka2}, {name: c, key: kc}"));
        assert_eq!(clients.used("a", now, 1).today, 10, "kept");
        assert_eq!(clients.used("b", now, 1).today, 0, "forgotten");
        assert!(!clients.runtimes.contains_key("b"));
        assert!(clients.runtimes.contains_key("c"));
    }

    #[test]
    fn waiting_clients_are_served_in_turn() {
        let mut line = Line::default();
        // Client a queues five requests, then b one, then a again.
        for t in 1..=5 {
            line.push(Some("a"), t, ());
        }
        line.push(Some("b"), 6, ());
        line.push(None, 7, ());
        line.push(Some("a"), 8, ());
        assert_eq!(line.len(), 8);
        let mut order = Vec::new();
        while let Some((t, _)) = line.first() {
            order.push(t);
            line.remove(t, true);
        }
        assert_eq!(order, [1, 6, 7, 2, 3, 4, 5, 8]);
        assert!(line.is_empty());
    }

    #[test]
    fn giving_up_keeps_the_clients_turn() {
        let mut line = Line::default();
        line.push(Some("a"), 1, ());
        line.push(Some("a"), 2, ());
        line.push(Some("b"), 3, ());
        line.remove(1, false);
        assert_eq!(line.first().map(|f| f.0), Some(2), "still a's turn");
        line.remove(3, false);
        line.remove(2, true);
        assert!(line.is_empty());
        line.remove(9, true);
    }
}
