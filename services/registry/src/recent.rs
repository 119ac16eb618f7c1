//! The run ids of recently logged failed runs, so that a trainer that
//! reports a failure again (its first report's reply was lost, or the
//! registry was down) gets it logged once. Bounded: the oldest id is
//! forgotten when [`RecentIds::CAPACITY`] are held.

use std::collections::{HashSet, VecDeque};

/// Insertion-ordered, bounded set of ids.
#[derive(Debug, Default)]
pub struct RecentIds {
    order: VecDeque<String>,
    ids: HashSet<String>,
}

impl RecentIds {
    /// Most ids held (about 0.5 MiB of run ids).
    pub const CAPACITY: usize = 8_192;

    /// Whether `id` is held.
    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    /// Holds `id`; forgets the oldest past [`Self::CAPACITY`]. Returns
    /// false when it was already held.
    pub fn insert(&mut self, id: &str) -> bool {
        if !self.ids.insert(id.to_owned()) {
            return false;
        }
        self.order.push_back(id.to_owned());
        if self.order.len() > Self::CAPACITY {
            if let Some(oldest) = self.order.pop_front() {
                self.ids.remove(&oldest);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_the_most_recent_ids_only() {
        let mut recent = RecentIds::default();
        assert!(recent.insert("run-0"));
        assert!(!recent.insert("run-0"));
        for i in 1..=RecentIds::CAPACITY {
            assert!(recent.insert(&format!("run-{i}")));
        }
        assert!(!recent.contains("run-0"), "the oldest is forgotten");
        assert!(recent.contains("run-1"));
        assert!(recent.contains(&format!("run-{}", RecentIds::CAPACITY)));
        assert_eq!(recent.order.len(), RecentIds::CAPACITY);
        assert_eq!(recent.ids.len(), RecentIds::CAPACITY);
    }
}
