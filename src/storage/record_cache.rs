//! Records read ahead of need, by their log position: the shard's timer
//! fills it with the records of scheduled messages about to come due
//! (read together, in log order, in large reads), so the references that
//! fire point at records already in memory. Bounded by bytes; the oldest
//! inserted go first; readers fall back to the tail cache and the disk.

use bytes::Bytes;
use std::collections::VecDeque;

use crate::schedule::PositionMap;

/// Most bytes of records the cache holds per shard.
pub const RECORD_CACHE_BYTES_MAX: u64 = 128 << 20;

/// Records by the log position where each starts.
#[derive(Default)]
pub struct RecordCache {
    records: PositionMap<u64, Bytes>,
    order: VecDeque<u64>,
    bytes: u64,
    bytes_max: u64,
}

impl RecordCache {
    /// A cache of at most `bytes_max` bytes.
    pub fn new(bytes_max: u64) -> RecordCache {
        RecordCache {
            bytes_max,
            ..RecordCache::default()
        }
    }

    /// Whether `len` more bytes fit without evicting.
    pub fn has_room(&self, len: u64) -> bool {
        self.bytes + len <= self.bytes_max
    }

    /// Keeps the record starting at `position` (evicting the oldest when
    /// over budget).
    pub fn insert(&mut self, position: u64, record: Bytes) {
        let len = record.len() as u64;
        if len > self.bytes_max {
            return;
        }
        if let Some(old) = self.records.insert(position, record) {
            self.bytes -= old.len() as u64;
        } else {
            self.order.push_back(position);
        }
        self.bytes += len;
        while self.bytes > self.bytes_max {
            let Some(p) = self.order.pop_front() else {
                break;
            };
            if let Some(b) = self.records.remove(&p) {
                self.bytes -= b.len() as u64;
            }
        }
    }

    /// The record starting at `position`, if held.
    pub fn get(&self, position: u64) -> Option<Bytes> {
        self.records.get(&position).cloned()
    }

    /// Drops the records below `position` (retention removed them).
    pub fn remove_below(&mut self, position: u64) {
        self.records.retain(|&p, b| {
            if p < position {
                self.bytes -= b.len() as u64;
                false
            } else {
                true
            }
        });
        self.order.retain(|p| *p >= position);
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_records_within_its_bound_oldest_out_first() {
        let mut c = RecordCache::new(10);
        c.insert(100, Bytes::from_static(b"aaaa"));
        c.insert(200, Bytes::from_static(b"bbbb"));
        assert!(c.has_room(2) && !c.has_room(3));
        c.insert(300, Bytes::from_static(b"cccc"));
        assert_eq!(c.get(100), None, "the oldest went");
        assert_eq!(c.get(300).as_deref(), Some(&b"cccc"[..]));
        assert_eq!(c.bytes(), 8);
        c.insert(400, Bytes::from(vec![0u8; 11]));
        assert_eq!(c.get(400), None, "larger than the whole cache");
        c.remove_below(300);
        assert_eq!((c.len(), c.bytes()), (1, 4));
        // A later insert evicts only what is still held.
        c.insert(500, Bytes::from_static(b"dddddd"));
        c.insert(600, Bytes::from_static(b"ee"));
        assert_eq!(c.get(300), None);
        assert_eq!(c.bytes(), 8);
    }
}
