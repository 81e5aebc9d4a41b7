//! The requests waiting for window room: per line (a hash of a model and its
//! candidate instances), their threads, served by client in turn (`clients::Line`),
//! each woken when it is first and room may have come back.

use super::Table;
use crate::routing::clients::Line;

impl Table {
    /// Adds the calling thread to the requests waiting in `line`, after its client's.
    pub fn wait_in_line(&mut self, line: u64, client: Option<&str>) -> u64 {
        self.tickets += 1;
        self.waiting
            .entry(line)
            .or_default()
            .push(client, self.tickets, std::thread::current());
        self.tickets
    }

    /// How many wait for room, in all lines.
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.waiting.values().map(Line::len).sum()
    }

    /// Whether anyone waits in `line`.
    pub fn has_waiters(&self, line: u64) -> bool {
        self.waiting.contains_key(&line)
    }

    /// Whether `ticket` is first in `line`.
    pub fn is_first(&self, line: u64, ticket: u64) -> bool {
        self.waiting
            .get(&line)
            .and_then(Line::first)
            .is_some_and(|(first, _)| first == ticket)
    }

    /// Takes `ticket` out of `line` (`admitted`, or giving up) and wakes whoever is
    /// first now. A request usually leaves from the front (all wait up to the same
    /// `routing.queue_timeout`), so this costs about O(clients waiting).
    pub fn leave_line(&mut self, line: u64, ticket: u64, admitted: bool) {
        let Some(waiters) = self.waiting.get_mut(&line) else {
            return;
        };
        waiters.remove(ticket, admitted);
        match waiters.first() {
            Some((_, thread)) => thread.unpark(),
            None => {
                self.waiting.remove(&line);
            }
        }
    }

    /// Room may have come back (a reservation was given back): the first in each line
    /// looks again.
    pub(super) fn wake_waiters(&self) {
        for line in self.waiting.values() {
            if let Some((_, thread)) = line.first() {
                thread.unpark();
            }
        }
    }
}
