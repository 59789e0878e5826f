//! Recently appended batches kept in memory, so consumers at the tail are
//! served without touching the disk. Bounded by bytes; a batch is evicted
//! only once written, so every unwritten batch is always here.

use bytes::Bytes;
use std::collections::VecDeque;

/// The tail cache of one shard's log.
pub struct TailCache {
    batches: VecDeque<(u64, Bytes)>,
    bytes: u64,
    bytes_max: u64,
}

impl TailCache {
    /// A cache holding at most `bytes_max` bytes of written batches.
    pub fn new(bytes_max: u64) -> Self {
        TailCache {
            batches: VecDeque::new(),
            bytes: 0,
            bytes_max,
        }
    }

    /// Adds the batch appended at `position`.
    pub fn push(&mut self, position: u64, batch: Bytes) {
        debug_assert!(self.batches.back().is_none_or(|(p, _)| *p < position));
        self.bytes += batch.len() as u64;
        self.batches.push_back((position, batch));
    }

    /// Evicts the oldest batches over budget that end at or before `written`.
    pub fn evict(&mut self, written: u64) {
        while self.bytes > self.bytes_max {
            match self.batches.front() {
                Some((p, b)) if p + b.len() as u64 <= written => {
                    self.bytes -= b.len() as u64;
                    self.batches.pop_front();
                }
                _ => break,
            }
        }
    }

    /// The batch appended at exactly `position`, if cached.
    pub fn get(&self, position: u64) -> Option<Bytes> {
        let i = self.batches.partition_point(|(p, _)| *p < position);
        match self.batches.get(i) {
            Some((p, b)) if *p == position => Some(b.clone()),
            _ => None,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_oldest_written_batches_only() {
        let mut c = TailCache::new(10);
        c.push(0, Bytes::from_static(b"aaaaaa"));
        c.push(6, Bytes::from_static(b"bbbbbb"));
        c.evict(0); // nothing written yet: over budget but kept
        assert_eq!(c.bytes(), 12);
        assert!(c.get(0).is_some());
        c.evict(6);
        assert!(c.get(0).is_none());
        assert_eq!(c.get(6).as_deref(), Some(&b"bbbbbb"[..]));
        assert!(c.get(7).is_none());
    }
}
