//! Per-queue time index: broker append time → first queue offset appended
//! at or after it. Sparse: one entry per millisecond that saw an append.
//! Times are forced monotonic per queue (a clock step back reuses the last
//! time), so the index stays sorted.

use std::collections::VecDeque;

/// The time index of one queue.
#[derive(Default, Debug)]
pub struct TimeIndex {
    /// (append_time_ms, first offset appended at that time)
    entries: VecDeque<(i64, u64)>,
}

impl TimeIndex {
    /// Records that `offset` was appended at `time_ms`.
    pub fn push(&mut self, time_ms: i64, offset: u64) {
        match self.entries.back() {
            Some(&(t, o)) if time_ms <= t => {
                debug_assert!(offset >= o);
            }
            _ => self.entries.push_back((time_ms, offset)),
        }
    }

    /// First offset appended at or after `time_ms`; `None` if every indexed
    /// append is older.
    pub fn lookup(&self, time_ms: i64) -> Option<u64> {
        let i = self.entries.partition_point(|&(t, _)| t < time_ms);
        self.entries.get(i).map(|&(_, o)| o)
    }

    /// Latest time indexed.
    pub fn last_time(&self) -> Option<i64> {
        self.entries.back().map(|&(t, _)| t)
    }

    /// Drops entries for offsets before `offset` (keeping one that still
    /// covers it).
    pub fn trim_before(&mut self, offset: u64) {
        while self.entries.len() > 1 && self.entries[1].1 <= offset {
            self.entries.pop_front();
        }
        if let Some(front) = self.entries.front_mut() {
            front.1 = front.1.max(offset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_finds_first_offset_at_or_after() {
        let mut t = TimeIndex::default();
        t.push(100, 0);
        t.push(100, 5); // same millisecond: stays sparse
        t.push(200, 10);
        t.push(150, 12); // clock stepped back: ignored
        t.push(300, 20);
        assert_eq!(t.lookup(50), Some(0));
        assert_eq!(t.lookup(100), Some(0));
        assert_eq!(t.lookup(101), Some(10));
        assert_eq!(t.lookup(300), Some(20));
        assert_eq!(t.lookup(301), None);
        t.trim_before(11);
        assert_eq!(t.lookup(0), Some(11));
        assert_eq!(t.last_time(), Some(300));
    }
}
