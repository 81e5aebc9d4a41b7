//! Settlements off the request path: what an attempt's outcome asks of Redis, applied
//! after the client has its answer. The common settlements (giving back a reservation
//! Azure cannot have counted, raising a window to the upstream's remaining counts, sent
//! with nearly every answer) go on a bounded queue to one `redis-settle` thread, which
//! sends whatever is queued as one pipelined round trip. A settlement that extends a
//! cooldown or opens a circuit (rare: a 429, a failure) is applied before the client
//! hears the failure, so that the other proxies know of it by then; so is any while the
//! queue is full (back-pressure: nothing is dropped). `flush` waits for what is queued.
//!
//! Each settlement is idempotent (a release removes its entry once, a cooldown or a
//! circuit only extends, a correction only raises to what the upstream said): they may
//! land later and in another order than their attempts ended, and a batch may be sent
//! again whole when Redis lost the script.

use super::{Settle, Shared};
use crate::config::Instance;
use crate::observe::alerts::Alerts;
use crossbeam_channel::{Receiver, Sender};
use redis::{ErrorKind, ServerErrorKind};
use std::sync::Weak;
use std::time::{Duration, Instant};

/// Settlements waiting for the thread; past this (or should the thread be gone), the
/// request's own thread settles.
pub(super) const QUEUE: usize = 1024;
/// Settlements sent in one round trip at most.
const BATCH: usize = 256;

/// A settlement with what it borrows owned, so that another thread can apply it.
pub(super) struct Owned {
    instance: String,
    /// The instance's max_tpm and max_rpm, which the remaining counts are read against.
    limits: (Option<u64>, Option<u64>),
    release: Option<(String, u64)>,
    cooldown: Option<Duration>,
    circuit: Option<Duration>,
    remaining: (Option<u64>, Option<u64>),
}

impl Owned {
    fn new(inst: &Instance, s: &Settle) -> Owned {
        Owned {
            instance: inst.name.clone(),
            limits: (inst.max_tpm, inst.max_rpm),
            release: s.release.map(|(id, tokens)| (id.to_string(), tokens)),
            cooldown: s.cooldown,
            circuit: s.circuit,
            remaining: s.remaining,
        }
    }

    fn settle(&self) -> Settle<'_> {
        Settle {
            release: self.release.as_ref().map(|(id, n)| (id.as_str(), *n)),
            cooldown: self.cooldown,
            circuit: self.circuit,
            remaining: self.remaining,
        }
    }
}

pub(super) enum Job {
    Settle(Owned),
    /// Answered once every job queued before it has been applied (or dropped, Redis
    /// not answering).
    Flush(Sender<()>),
}

impl Shared {
    /// Applies what an attempt's outcome asks: a cooldown or a circuit at once, in one
    /// round trip, anything else after the caller's answer (none if it asks nothing).
    pub fn settle(&self, alerts: &Alerts, inst: &Instance, s: &Settle) {
        if s.is_empty() {
            return;
        }
        let job = Owned::new(inst, s);
        if s.cooldown.is_some() || s.circuit.is_some() {
            return self.apply(alerts, std::slice::from_ref(&job));
        }
        if let Err(e) = self.jobs.try_send(Job::Settle(job)) {
            if let Job::Settle(job) = e.into_inner() {
                self.apply(alerts, std::slice::from_ref(&job));
            }
        }
    }

    /// Waits up to `timeout` for every settlement queued before the call to be applied;
    /// whether they were.
    pub fn flush(&self, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        let (done, flushed) = crossbeam_channel::bounded(1);
        self.jobs.send_deadline(Job::Flush(done), until).is_ok()
            && flushed.recv_deadline(until).is_ok()
    }

    /// Applies `jobs` in one pipelined round trip. A Redis that lost the script (a
    /// restart without persistence, SCRIPT FLUSH) gets it again and the whole batch once
    /// more, which changes nothing already applied. Redis not answering, the releases
    /// are kept to give back once it does, as for an admission whose reply was lost.
    fn apply(&self, alerts: &Alerts, jobs: &[Owned]) {
        let calls: Vec<_> = jobs
            .iter()
            .map(|j| self.settlement(&j.instance, j.limits, &j.settle()))
            .collect();
        let mut pipe = redis::pipe();
        for call in &calls {
            pipe.invoke_script(call).ignore();
        }
        let applied = self.with(alerts, |c| match pipe.exec(c) {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.settle.load(c)?;
                pipe.exec(c)
            }
            done => done,
        });
        if applied.is_none() {
            for job in jobs {
                if let Some((id, tokens)) = &job.release {
                    self.lost_reply(&job.instance, id.clone(), *tokens);
                }
            }
        }
    }
}

/// The `redis-settle` thread: waits for a settlement, takes whatever else is queued
/// (up to `BATCH`), and applies them together. Ends when the `Shared` is dropped.
pub(super) fn settling(shared: Weak<Shared>, jobs: Receiver<Job>) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut flushes = Vec::new();
    while let Ok(first) = jobs.recv() {
        let mut next = Some(first);
        while let Some(job) = next {
            match job {
                Job::Settle(s) => batch.push(s),
                Job::Flush(done) => flushes.push(done),
            }
            next = if batch.len() < BATCH {
                jobs.try_recv().ok()
            } else {
                None
            };
        }
        if !batch.is_empty() {
            let Some(s) = shared.upgrade() else { return };
            s.apply(&s.alerts, &batch);
            batch.clear();
        }
        for done in flushes.drain(..) {
            let _ = done.try_send(());
        }
    }
}
