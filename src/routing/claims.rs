//! What a request holds in the instance table while it is routed: its admission (a
//! reservation in an instance's windows, here and in the shared state) and its place in
//! a waiting line. Each is a drop guard, so that a request that ends any other way than
//! the normal one (an early return, a panic) gives back what it held and costs only
//! itself (DESIGN §2).

use super::table::Admission;
use super::{settle, States, Table};
use crate::config::Config;
use crate::observe::alerts::Alerts;
use parking_lot::{Mutex, MutexGuard};

/// An admission not yet settled by its attempt's outcome: dropped unsettled, its
/// reservation is cancelled (it tested nothing, so it says nothing of the instance).
pub struct Claim<'a> {
    states: States<'a>,
    config: &'a Config,
    alerts: &'a Alerts,
    need: u64,
    admission: Admission,
    /// The shared state's reservation id, when it made one.
    reservation: Option<String>,
    settled: bool,
}

impl<'a> Claim<'a> {
    pub fn new(
        (states, config, alerts): (States<'a>, &'a Config, &'a Alerts),
        need: u64,
        (admission, reservation): (Admission, Option<String>),
    ) -> Claim<'a> {
        Claim {
            states,
            config,
            alerts,
            need,
            admission,
            reservation,
            settled: false,
        }
    }

    /// The instance admitted to, by index.
    pub fn index(&self) -> usize {
        self.admission.index
    }

    /// The admission, for its outcome to settle: the guard no longer cancels it.
    pub fn settle(mut self) -> (Admission, Option<String>) {
        self.settled = true;
        (self.admission, self.reservation.take())
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let admission = self.admission;
        self.states.table.lock().cancel(self.config, admission);
        let inst = &self.config.instances[admission.index];
        let reservation = self.reservation.take();
        settle(self.states, self.alerts, inst, |s| {
            s.release = reservation.as_deref().map(|r| (r, self.need));
        });
    }
}

/// A place in a waiting line, with the table's lock while it is held: dropped, the
/// place is left (and the next in line woken), whether the wait ended normally or not.
pub struct InLine<'a> {
    table: &'a Mutex<Table>,
    /// The lock, while this thread holds it (not while it is parked).
    pub locked: Option<MutexGuard<'a, Table>>,
    line: u64,
    ticket: u64,
    /// Set when the wait ended in an admission: the client's turn passes on.
    pub admitted: bool,
}

impl<'a> InLine<'a> {
    /// Joins `line` in the turn of `client` (a named client; `None` for the others), with
    /// the table already locked.
    pub fn join(
        table: &'a Mutex<Table>,
        mut locked: MutexGuard<'a, Table>,
        line: u64,
        client: Option<&str>,
    ) -> Self {
        let ticket = locked.wait_in_line(line, client);
        InLine {
            table,
            locked: Some(locked),
            line,
            ticket,
            admitted: false,
        }
    }

    /// The table, locked again if the lock was let go.
    pub fn table(&mut self) -> &mut Table {
        self.locked.get_or_insert_with(|| self.table.lock())
    }

    pub fn is_first(&mut self) -> bool {
        let (line, ticket) = (self.line, self.ticket);
        self.table().is_first(line, ticket)
    }
}

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        let (line, ticket) = (self.line, self.ticket);
        let admitted = self.admitted;
        self.table().leave_line(line, ticket, admitted);
    }
}
