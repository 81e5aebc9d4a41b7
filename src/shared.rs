//! State several proxies share in Redis (`redis:` in the configuration), so that a
//! fleet behind one load balancer spends one Azure quota as one proxy would: each
//! instance's TPM/RPM windows, its cooldown after a 429 and its open circuit, and the
//! Responses API's response → instance affinity. This module owns the connections
//! (a small pool), the Lua scripts that make each admission and settlement one atomic
//! step, the shared/degraded flag, and the thread that reconnects after a failure.
//!
//! A request makes one round trip on its path, its admission. Its settlement (a
//! reservation given back, the upstream's remaining counts) is applied after its
//! answer, by the `redis-settle` thread (`settling`), except one that extends a
//! cooldown or opens a circuit: that one is applied before the client hears the
//! failure, so that no other proxy sends to the instance after it did.
//!
//! Redis never holds a request up for long: every call has `redis.timeout_ms` to
//! connect and to answer, and any failure switches the proxy to its own state alone
//! (degraded: no further Redis calls on the request path, one alert) until the
//! reconnect thread gets an answer again (and has given back the reservations whose
//! admission lost its reply). No call is made with the instance table's lock held: routing takes
//! its local decision under the lock, releases it, and then asks Redis.

mod settling;

pub use crate::shared_terms::{ClientLimit, Settle, Verdict};

use crate::config::{Client, Instance, Redis};
use crate::observe::alerts::Alerts;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// Connections kept for reuse (at most one per request talking to Redis at once, so
/// bounded by `server.workers`); past this, a connection is closed after its call.
const IDLE: usize = 64;
/// Connections opened ahead of need when Redis is reached (at start and when it is
/// back), so that the requests then do not each connect on their own path.
const WARM: usize = 8;
/// The reconnect thread's first and longest pause between attempts.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
/// A Redis that came back this long ago and fails again starts its backoff afresh.
const STABLE: Duration = Duration::from_secs(60);
/// Reservations whose admission lost its reply, kept to give back; past this the
/// oldest is forgotten (it leaves the window within a minute anyway).
const LOST: usize = 1024;
/// How long a reservation stays in a window: one lost longer ago needs no release.
const WINDOW: Duration = Duration::from_secs(60);

/// What both scripts begin with: the Redis server's time in ms (the only clock, so the
/// proxies' clocks may differ), and the windows. A window is a sorted set of entries
/// "id:amount" scored by that time, with its total beside it (`{key}:sum`), so that
/// checking room costs the entries that leave, not all of them. Both expire 120 s after
/// their last write, so nothing is left behind. Every key a script touches comes in
/// `KEYS` (`INSTANCE_KEYS`), as Redis requires of scripts (Cluster routes by them).
const WINDOWS: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = 120000
local function amount(m) return tonumber(string.match(m, ':(%d+)$')) end
local function used(key, sum)
  local total = tonumber(redis.call('GET', sum) or '-1')
  if total < 0 then
    total = 0
    for _, m in ipairs(redis.call('ZRANGE', key, 0, -1)) do total = total + amount(m) end
  end
  local old = redis.call('ZRANGEBYSCORE', key, '-inf', now - 60000)
  for _, m in ipairs(old) do total = total - amount(m) end
  if #old > 0 then redis.call('ZREMRANGEBYSCORE', key, '-inf', now - 60000) end
  if total < 0 or redis.call('EXISTS', key) == 0 then total = 0 end
  redis.call('SET', sum, total, 'PX', ttl)
  return total
end
-- Only after `used` on the same window, whose SET gave the total its expiry (INCRBY
-- keeps it).
local function add(key, sum, id, n)
  redis.call('ZADD', key, now, id .. ':' .. string.format('%d', n))
  redis.call('INCRBY', sum, n)
  redis.call('PEXPIRE', key, ttl)
end
";

/// The keys of an instance both scripts take, in this order: its windows (tokens,
/// requests), cooldown, circuit, and the windows' totals.
const INSTANCE_KEYS: [&str; 6] = ["tpm", "rpm", "cooldown", "circuit", "tpm:sum", "rpm:sum"];

/// The keys of a named client ADMIT takes after its instance's: its windows (tokens,
/// requests), its day's spending, and the windows' totals.
const CLIENT_KEYS: [&str; 5] = ["tpm", "rpm", "day", "tpm:sum", "rpm:sum"];

/// Checks cooldown and circuit, then room in both windows, and reserves in one step.
/// KEYS: `INSTANCE_KEYS`. ARGV: reservation id, tokens, max_tpm,
/// max_rpm (0: no limit). Returns {0, 0} admitted, {1, ms} cooling down or no room for
/// a request for ms, {2, ms} its circuit is open for ms, {3, ms} no room for this many
/// tokens for ms (a smaller request may fit). With a named client, KEYS 7–11 are its
/// `CLIENT_KEYS`, ARGV 5–7 its tpm, rpm and tokens_per_day (0: none): its
/// own limits are checked first and reserved with the instance's, and it is refused
/// with {4, ms} over tpm, {5, ms} over rpm, {6, ms until 00:00 UTC} its day spent.
const ADMIT: &str = r"
local open = tonumber(redis.call('GET', KEYS[4]) or '0')
if open > now then return {2, open - now} end
local wait = math.max(0, tonumber(redis.call('GET', KEYS[3]) or '0') - now)
local function room(key, sum, need, max)
  local total = used(key, sum)
  if total + need <= max then return 0 end
  local e = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  for i = 1, #e, 2 do
    total = total - amount(e[i])
    if total + need <= max then return tonumber(e[i + 1]) + 60000 - now end
  end
  return 60000
end
local need, tpm, rpm = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local client = #KEYS > 6
if client then
  local ctpm, crpm, budget = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
  local day = math.floor(now / 86400000)
  if budget > 0 and tonumber(redis.call('HGET', KEYS[9], 'day') or '-1') == day
      and tonumber(redis.call('HGET', KEYS[9], 'used') or '0') >= budget then
    return {6, (day + 1) * 86400000 - now}
  end
  if crpm > 0 then
    local w = room(KEYS[8], KEYS[11], 1, crpm)
    if w > 0 then return {5, w} end
  end
  if ctpm > 0 then
    local w = room(KEYS[7], KEYS[10], need, ctpm)
    if w > 0 then return {4, w} end
  end
end
if rpm > 0 then wait = math.max(wait, room(KEYS[2], KEYS[6], 1, rpm)) end
if wait > 0 then return {1, wait} end
if tpm > 0 then wait = room(KEYS[1], KEYS[5], need, tpm) end
if wait > 0 then return {3, wait} end
if tpm > 0 then add(KEYS[1], KEYS[5], ARGV[1], ARGV[2]) end
if rpm > 0 then add(KEYS[2], KEYS[6], ARGV[1], 1) end
if client and tonumber(ARGV[5]) > 0 then add(KEYS[7], KEYS[10], ARGV[1], ARGV[2]) end
if client and tonumber(ARGV[6]) > 0 then add(KEYS[8], KEYS[11], ARGV[1], 1) end
return {0, 0}
";

/// What an attempt's outcome changes, in one step. KEYS as ADMIT. ARGV: reservation
/// id ('' for none) and its tokens, to give back; cooldown ms, circuit ms (0: none),
/// only ever extended; the upstream's remaining tokens and requests with their limits
/// (-1: not known), which only ever raise the window's usage, as `Window::correct`;
/// an id for such a correction.
const SETTLE: &str = r"
local function release(key, sum, member, n)
  if redis.call('ZREM', key, member .. ':' .. n) == 1 and redis.call('EXISTS', sum) == 1 then
    redis.call('DECRBY', sum, n)
  end
end
if ARGV[1] ~= '' then
  release(KEYS[1], KEYS[5], ARGV[1], ARGV[2])
  release(KEYS[2], KEYS[6], ARGV[1], 1)
end
local function extend(key, ms)
  if ms > 0 and now + ms > tonumber(redis.call('GET', key) or '0') then
    redis.call('SET', key, now + ms, 'PX', ms)
  end
end
extend(KEYS[3], tonumber(ARGV[3]))
extend(KEYS[4], tonumber(ARGV[4]))
local function correct(key, sum, max, left)
  if max < 0 or left < 0 then return end
  local total = used(key, sum)
  if max - left > total then add(key, sum, ARGV[9], max - left - total) end
end
correct(KEYS[1], KEYS[5], tonumber(ARGV[5]), tonumber(ARGV[6]))
correct(KEYS[2], KEYS[6], tonumber(ARGV[7]), tonumber(ARGV[8]))
return 0
";

/// A client's day: what it spent (`used`) on which UTC day (`day`), in one hash that
/// outlives the day by one, so nothing is left behind. KEYS: the day. ARGV: tokens to
/// add (0 to read). Returns the day's total.
const SPEND: &str = r"
local day = math.floor(now / 86400000)
if tonumber(redis.call('HGET', KEYS[1], 'day') or '-1') ~= day then
  redis.call('HSET', KEYS[1], 'day', day, 'used', 0)
end
local used = redis.call('HINCRBY', KEYS[1], 'used', ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * 86400000)
return used
";

impl Settle<'_> {
    fn is_empty(&self) -> bool {
        self.release.is_none()
            && self.cooldown.is_none()
            && self.circuit.is_none()
            && self.remaining == (None, None)
    }
}

/// A reservation that may stand in Redis with no request behind it.
struct Lost {
    instance: String,
    id: String,
    tokens: u64,
    at: Instant,
}

pub struct Shared {
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    idle: Mutex<Vec<redis::Connection>>,
    healthy: AtomicBool,
    admit: redis::Script,
    settle: redis::Script,
    /// Admissions whose reply was lost (a timeout, a broken connection): the script may
    /// have reserved, so the reservation is given back once Redis answers again; and
    /// releases that could not be sent, for the same reason.
    lost: Mutex<std::collections::VecDeque<Lost>>,
    spend: redis::Script,
    /// Reservation ids: this process's random tag and a counter.
    tag: u64,
    next: AtomicU64,
    /// Wakes the reconnect thread; dropping it ends the thread.
    wake: Sender<()>,
    /// To the `redis-settle` thread; dropping it ends the thread.
    jobs: Sender<settling::Job>,
    /// Where that thread alerts when Redis fails it: the alerts of the configuration the
    /// proxy started with (as `redis` itself, read at start only).
    alerts: Arc<Alerts>,
}

impl Shared {
    /// Connects (or starts degraded, reconnecting in the background). `name` is the
    /// proxy's name: the default key prefix. The URL and the CA file were checked with
    /// the configuration; if they fail now (the file gone since), the proxy runs on its
    /// own state, and says so.
    pub fn start(config: &Redis, name: &str, alerts: &Arc<Alerts>) -> Option<Arc<Shared>> {
        let client = match client(config) {
            Ok(client) => client,
            Err(e) => {
                alerts.error("redis", &format!("shared state is off: {e}"));
                return None;
            }
        };
        let (wake, woken) = crossbeam_channel::bounded(1);
        let (jobs, queued) = crossbeam_channel::bounded(settling::QUEUE);
        let tag = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()).rotate_left(32);
        let shared = Arc::new(Shared {
            client,
            prefix: config.prefix.clone().unwrap_or_else(|| name.to_string()),
            timeout: Duration::from_millis(config.timeout_ms),
            idle: Mutex::new(Vec::new()),
            lost: Mutex::default(),
            // Until the first connection fails, so that its failure alerts.
            healthy: AtomicBool::new(true),
            admit: redis::Script::new(&format!("{WINDOWS}{ADMIT}")),
            settle: redis::Script::new(&format!("{WINDOWS}{SETTLE}")),
            spend: redis::Script::new(&format!("{WINDOWS}{SPEND}")),
            tag,
            next: AtomicU64::new(0),
            wake,
            jobs,
            alerts: alerts.clone(),
        });
        let weak = Arc::downgrade(&shared);
        let reconnecting = std::thread::Builder::new()
            .name("redis-reconnect".into())
            .spawn(move || reconnect(weak, woken));
        let weak = Arc::downgrade(&shared);
        let settling = std::thread::Builder::new()
            .name("redis-settle".into())
            .spawn(move || settling::settling(weak, queued));
        if let Err(e) = reconnecting.and(settling) {
            log::error!("shared state is off: cannot start its threads: {e}");
            return None;
        }
        match shared.connect_and_load() {
            Ok(conn) => {
                shared.warm(conn);
                log::info!("shared state in Redis (key prefix {:?})", shared.prefix);
            }
            Err(e) => shared.failed(alerts, &e),
        }
        Some(shared)
    }

    /// `shared`, or `degraded` while Redis is not answering.
    pub fn state(&self) -> &'static str {
        if self.healthy.load(Ordering::Relaxed) {
            "shared"
        } else {
            "degraded"
        }
    }

    /// `redis.timeout_ms`: how long each call may take to connect and to answer.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A new connection with the timeouts set.
    fn connect(&self) -> redis::RedisResult<redis::Connection> {
        let conn = self.client.get_connection_with_timeout(self.timeout)?;
        conn.set_read_timeout(Some(self.timeout))?;
        conn.set_write_timeout(Some(self.timeout))?;
        Ok(conn)
    }

    /// A first connection (at start, or to a Redis found again), with the scripts
    /// loaded into the server, so that each call is one EVALSHA (a server that lost
    /// them anyway loads them again on NOSCRIPT). Loading is also the round trip that
    /// proves the server answers, not only accepts connections.
    fn connect_and_load(&self) -> redis::RedisResult<redis::Connection> {
        let mut conn = self.connect()?;
        self.admit.load(&mut conn)?;
        self.settle.load(&mut conn)?;
        // And a write, through the script, on keys no instance has (names are not
        // empty): a read-only replica or a Redis out of memory answers, but refuses
        // every reservation, and must not count as back.
        let mut probe = self.invocation(&self.settle, "");
        probe.arg("").arg(0).arg(1).arg(0);
        probe.arg(-1).arg(-1).arg(-1).arg(-1).arg("probe");
        let _: i64 = probe.invoke(&mut conn)?;
        Ok(conn)
    }

    /// Pools `first` and up to `WARM` - 1 more, stopping at the first that fails.
    fn warm(&self, first: redis::Connection) {
        let mut conns = vec![first];
        while conns.len() < WARM {
            match self.connect() {
                Ok(conn) => conns.push(conn),
                Err(_) => break,
            }
        }
        self.idle.lock().extend(conns);
    }

    /// Runs `f` on a pooled connection, or returns None at once while degraded. A
    /// failure degrades: the connection (which may now be out of step with its
    /// answers) is dropped, and so are the idle ones, which the same outage broke.
    fn with<T>(
        &self,
        alerts: &Alerts,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Option<T> {
        if !self.healthy.load(Ordering::Acquire) {
            return None;
        }
        let pooled = self.idle.lock().pop();
        let result = match pooled {
            Some(conn) => Ok(conn),
            None => self.connect(),
        }
        .and_then(|mut conn| f(&mut conn).map(|v| (v, conn)));
        match result {
            Ok((value, conn)) => {
                let mut idle = self.idle.lock();
                if idle.len() < IDLE {
                    idle.push(conn);
                }
                Some(value)
            }
            Err(e) => {
                self.failed(alerts, &e);
                None
            }
        }
    }

    /// Switches to local state (once per outage: one log line, one alert) and wakes
    /// the reconnect thread.
    fn failed(&self, alerts: &Alerts, e: &redis::RedisError) {
        // Closed after the pool's lock is let go: other requests take it meanwhile.
        let broken = std::mem::take(&mut *self.idle.lock());
        drop(broken);
        if self.healthy.swap(false, Ordering::AcqRel) {
            alerts.error(
                "redis",
                &format!(
                    "Redis does not answer ({e}); each proxy uses its own state until it does"
                ),
            );
        }
        let _ = self.wake.try_send(());
    }

    /// An instance's key: `{prefix}:i:{instance}:tpm` and so on. The braces make all of
    /// one instance's keys one Redis Cluster hash slot, as a script needs.
    fn key(&self, instance: &str, what: &str) -> String {
        format!("{}:i:{{{instance}}}:{what}", self.prefix)
    }

    /// A call of `script` on `instance`'s keys (`INSTANCE_KEYS`).
    fn invocation<'s>(
        &self,
        script: &'s redis::Script,
        instance: &str,
    ) -> redis::ScriptInvocation<'s> {
        let mut call = script.prepare_invoke();
        for what in INSTANCE_KEYS {
            call.key(self.key(instance, what));
        }
        call
    }

    /// A named client's key: `{prefix}:c:{client}:tpm` and so on, apart from every
    /// instance's keys.
    fn client_key(&self, client: &str, what: &str) -> String {
        format!("{}:c:{client}:{what}", self.prefix)
    }

    /// A new reservation (or correction, `kind` "c") id: this process's random tag and
    /// a counter.
    fn new_id(&self, kind: &str) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{:x}-{kind}{n}", self.tag)
    }

    /// A response id's key: `{prefix}:r:{id}`, apart from every instance's keys.
    fn response_key(&self, id: &str) -> String {
        format!("{}:r:{id}", self.prefix)
    }

    /// Checks and reserves `need` tokens and a request on `inst` in the shared windows,
    /// in one round trip. None: Redis is not answering; the local decision stands.
    /// With `client`, its own limits are checked and reserved in the same step.
    pub fn admit(
        &self,
        alerts: &Alerts,
        inst: &Instance,
        need: u64,
        client: Option<&Client>,
    ) -> Option<Verdict> {
        if !self.healthy.load(Ordering::Acquire) {
            return None;
        }
        let id = self.new_id("");
        let mut call = self.invocation(&self.admit, &inst.name);
        call.arg(&id)
            .arg(need)
            .arg(inst.max_tpm.unwrap_or(0))
            .arg(inst.max_rpm.unwrap_or(0));
        if let Some(c) = client {
            for what in CLIENT_KEYS {
                call.key(self.client_key(&c.name, what));
            }
            call.arg(c.tpm.unwrap_or(0))
                .arg(c.rpm.unwrap_or(0))
                .arg(c.tokens_per_day.unwrap_or(0));
        }
        let Some((kind, ms)) = self.with(alerts, |c| call.invoke::<(u8, u64)>(c)) else {
            // The script may have reserved before its reply was lost; the request goes
            // on with the local decision alone, so that reservation stands for nothing.
            self.lost_reply(&inst.name, id, need);
            return None;
        };
        let wait = Duration::from_millis(ms.max(1));
        Some(match kind {
            0 => Verdict::Admitted(id),
            1 => Verdict::Full(wait),
            3 => Verdict::NoRoom(wait),
            4 => Verdict::Client(ClientLimit::Tpm, wait),
            5 => Verdict::Client(ClientLimit::Rpm, wait),
            6 => Verdict::Client(ClientLimit::Budget, wait),
            _ => Verdict::Down(wait),
        })
    }

    /// Keeps a reservation whose admission lost its reply (or whose release could not
    /// be sent), to give back once Redis answers again (`release_lost`).
    fn lost_reply(&self, instance: &str, id: String, tokens: u64) {
        let mut lost = self.lost.lock();
        if lost.len() >= LOST {
            lost.pop_front();
        }
        lost.push_back(Lost {
            instance: instance.to_string(),
            id,
            tokens,
            at: Instant::now(),
        });
    }

    /// Gives back, on `conn`, the reservations whose admission lost its reply and that
    /// are still in their window, the same way a settlement gives one back (an entry
    /// that the admission never made is left alone). Those not given back when a call
    /// fails are kept for the next connection.
    fn release_lost(&self, conn: &mut redis::Connection) -> redis::RedisResult<()> {
        let lost = std::mem::take(&mut *self.lost.lock());
        let mut pending = lost.into_iter().filter(|l| l.at.elapsed() < WINDOW);
        while let Some(l) = pending.next() {
            let release = Settle {
                release: Some((&l.id, l.tokens)),
                ..Settle::default()
            };
            let call = self.settlement(&l.instance, (None, None), &release);
            if let Err(e) = call.invoke::<i64>(conn) {
                let mut kept = self.lost.lock();
                for l in std::iter::once(l).chain(pending) {
                    kept.push_back(l);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// The settle script's call for `s` on `instance`, whose limits (max_tpm, max_rpm)
    /// the upstream's remaining counts are read against.
    fn settlement<'s>(
        &'s self,
        instance: &str,
        (tpm, rpm): (Option<u64>, Option<u64>),
        s: &Settle,
    ) -> redis::ScriptInvocation<'s> {
        let ms = |d: Option<Duration>| d.map_or(0, |d| d.as_millis().max(1) as u64);
        let known = |limit: Option<u64>, left: Option<u64>| match (limit, left) {
            (Some(limit), Some(left)) => (limit as i64, left.min(limit) as i64),
            _ => (-1, -1),
        };
        let (release, tokens) = s.release.unwrap_or(("", 0));
        let (max_tpm, left_tokens) = known(tpm, s.remaining.0);
        let (max_rpm, left_requests) = known(rpm, s.remaining.1);
        // The script reads it only to record a correction.
        let correction = if s.remaining == (None, None) {
            String::new()
        } else {
            self.new_id("c")
        };
        let mut call = self.invocation(&self.settle, instance);
        call.arg(release)
            .arg(tokens)
            .arg(ms(s.cooldown))
            .arg(ms(s.circuit))
            .arg(max_tpm)
            .arg(left_tokens)
            .arg(max_rpm)
            .arg(left_requests)
            .arg(correction);
        call
    }

    /// Gives back a client's reservation `id` of `need` tokens (its request was
    /// counted nowhere): the settlement script on the client's windows.
    pub fn release_client(&self, alerts: &Alerts, client: &str, id: &str, need: u64) {
        let mut call = self.settle.prepare_invoke();
        // A client has no cooldown or circuit: those keys are never set.
        for what in INSTANCE_KEYS {
            call.key(self.client_key(client, what));
        }
        call.arg(id).arg(need).arg(0).arg(0);
        call.arg(-1).arg(-1).arg(-1).arg(-1).arg("");
        let _: Option<i64> = self.with(alerts, |c| call.invoke(c));
    }

    /// Adds `tokens` to what `client` spent today across the fleet and returns the
    /// day's total (0 tokens: only reads it). None: Redis is not answering.
    pub fn spend(&self, alerts: &Alerts, client: &str, tokens: u64) -> Option<u64> {
        let mut call = self.spend.prepare_invoke();
        call.key(self.client_key(client, "day")).arg(tokens);
        self.with(alerts, |c| call.invoke(c))
    }

    /// Remembers which instance made a Responses API answer, for `ttl`.
    pub fn remember(&self, alerts: &Alerts, id: &str, instance: &str, model: &str, ttl: Duration) {
        let key = self.response_key(id);
        let value = format!("{instance}\n{model}");
        let ttl = ttl.as_millis() as u64;
        let _: Option<()> = self.with(alerts, |c| {
            redis::cmd("SET")
                .arg(&key)
                .arg(&value)
                .arg("PX")
                .arg(ttl)
                .query(c)
        });
    }

    /// The instance and model another proxy remembered for a response id.
    pub fn find(&self, alerts: &Alerts, id: &str) -> Option<(String, String)> {
        let key = self.response_key(id);
        let found: Option<String> = self.with(alerts, |c| redis::cmd("GET").arg(&key).query(c))?;
        let (instance, model) = found?.split_once('\n').map(|(i, m)| (i.into(), m.into()))?;
        Some((instance, model))
    }

    pub fn forget(&self, alerts: &Alerts, id: &str) {
        let key = self.response_key(id);
        let _: Option<()> = self.with(alerts, |c| redis::cmd("DEL").arg(&key).query(c));
    }
}

/// The client for `redis.url`: TLS for `rediss://`, checked against `redis.ca_file` or
/// else the Mozilla roots compiled in.
fn client(config: &Redis) -> Result<redis::Client, String> {
    let url = config.url.expose();
    match &config.ca_file {
        None => redis::Client::open(url).map_err(|_| "redis.url is not a valid Redis URL".into()),
        Some(file) => {
            let root_cert = std::fs::read(file)
                .map_err(|e| format!("redis.ca_file {file:?} cannot be read: {e}"))?;
            let certificates = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            };
            redis::Client::build_with_tls(url, certificates)
                .map_err(|e| format!("redis.ca_file {file:?} is not usable: {e}"))
        }
    }
}

/// The reconnect thread: after a failure, tries a new connection with a growing pause
/// until one answers, gives back on it the reservations whose admission lost its reply,
/// then puts it in the pool and marks the state shared again. A
/// Redis that fails again within `STABLE` of coming back (one that accepts connections
/// but refuses the scripts' writes, say) is retried ever more slowly, so that it does
/// not flap every 100 ms with a log line each time. Ends when the `Shared` is dropped.
fn reconnect(shared: Weak<Shared>, woken: Receiver<()>) {
    let mut pause = BACKOFF.0;
    let mut recovered: Option<Instant> = None;
    while woken.recv().is_ok() {
        if recovered.is_some_and(|t| t.elapsed() < STABLE) {
            if let Err(RecvTimeoutError::Disconnected) = woken.recv_timeout(pause) {
                return;
            }
            pause = (pause * 2).min(BACKOFF.1);
        } else {
            pause = BACKOFF.0;
        }
        loop {
            let Some(s) = shared.upgrade() else { return };
            if s.healthy.load(Ordering::Acquire) {
                break;
            }
            let back = s
                .connect_and_load()
                .and_then(|mut conn| s.release_lost(&mut conn).map(|()| conn));
            if let Ok(conn) = back {
                s.warm(conn);
                // Wakes from failures of this same outage are not a new one; taken
                // before the state is shared again, so none from a new one is lost.
                while woken.try_recv().is_ok() {}
                s.healthy.store(true, Ordering::Release);
                recovered = Some(Instant::now());
                log::info!("Redis answers again: state is shared again");
                break;
            }
            drop(s);
            if let Err(RecvTimeoutError::Disconnected) = woken.recv_timeout(pause) {
                return;
            }
            pause = (pause * 2).min(BACKOFF.1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_settlement_that_asks_nothing_makes_no_call() {
        assert!(Settle::default().is_empty());
        let release = Settle {
            release: Some(("id", 5)),
            ..Settle::default()
        };
        assert!(!release.is_empty());
        let remaining = Settle {
            remaining: (None, Some(3)),
            ..Settle::default()
        };
        assert!(!remaining.is_empty());
    }
}
