//! Where each waiting line's rotation stands (DESIGN §6): the instance last picked for
//! a model and its set of candidates, so that round-robin and failover's ties take
//! turns within each line, whatever other models do in between.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// Lines remembered; past this the memory starts afresh. A client may name any model
/// on an instance that serves any, so the lines are not bounded by the configuration.
/// Starting afresh costs each line one pick out of turn.
const MAX_LINES: usize = 4096;

/// A line's name: a hash of its model (or the model for one operation) and its
/// candidate instances.
pub fn line(model: &str, candidates: &[usize]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (model, candidates).hash(&mut h);
    h.finish()
}

/// The last pick of each line.
#[derive(Default)]
pub struct Rotations {
    last: HashMap<u64, usize>,
}

impl Rotations {
    /// The instance `line` picked last, if it has picked.
    pub fn last(&self, line: u64) -> Option<usize> {
        self.last.get(&line).copied()
    }

    /// Records that `line` picked `index`.
    pub fn picked(&mut self, line: u64, index: usize) {
        if self.last.len() >= MAX_LINES && !self.last.contains_key(&line) {
            self.last.clear();
        }
        self.last.insert(line, index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_keep_their_own_turn_within_a_bounded_memory() {
        let mut r = Rotations::default();
        let (m1, m2) = (line("m1", &[0, 1]), line("m2", &[2, 3]));
        assert_ne!(m1, line("m1", &[0]), "another candidate set, another line");
        r.picked(m1, 0);
        r.picked(m2, 2);
        assert_eq!((r.last(m1), r.last(m2)), (Some(0), Some(2)));
        for i in 0..MAX_LINES as u64 {
            r.picked(1_000_000 + i, 0);
        }
        assert!(r.last.len() <= MAX_LINES);
    }
}
