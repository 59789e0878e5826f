//! Per-queue consume index: one entry per batch, queue offset → log
//! position. Entries are appended in offset order and dropped from the front
//! when retention deletes the segments they point into.

use std::collections::VecDeque;

/// One indexed batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub base_offset: u64,
    pub position: u64,
    pub len: u32,
    pub count: u32,
    /// Tag summary of the batch's records (`batch::tag_summary`): a tag
    /// filter skips a batch whose summary lacks every tag it names.
    pub tags: u32,
    /// For a reference batch (fired scheduled messages, which readers
    /// resolve), the bytes of the view readers get; 0 for any other batch.
    pub view_len: u32,
}

impl IndexEntry {
    /// Whether readers resolve this batch into a view.
    pub fn is_reference(&self) -> bool {
        self.view_len != 0
    }
    /// Bytes a reader gets of this batch (what fetch budgets count).
    pub fn read_len(&self) -> u32 {
        if self.view_len != 0 {
            self.view_len
        } else {
            self.len
        }
    }

    /// Offset after the last record of the batch.
    pub fn next_offset(&self) -> u64 {
        self.base_offset + u64::from(self.count)
    }
}

/// The consume index of one queue.
#[derive(Default, Debug)]
pub struct ConsumeIndex {
    entries: VecDeque<IndexEntry>,
}

impl ConsumeIndex {
    /// Appends an entry; offsets must grow.
    pub fn push(&mut self, e: IndexEntry) {
        if let Some(last) = self.entries.back() {
            assert!(
                e.base_offset >= last.next_offset(),
                "consume index out of order: {} after {}..{}",
                e.base_offset,
                last.base_offset,
                last.next_offset()
            );
            assert!(
                e.position > last.position,
                "consume index positions must grow"
            );
        }
        self.entries.push_back(e);
    }

    /// Index of the entry holding `offset`, or of the first entry after it
    /// (when `offset` falls in a gap). `None` when past the end.
    pub fn find(&self, offset: u64) -> Option<usize> {
        let i = self.entries.partition_point(|e| e.next_offset() <= offset);
        (i < self.entries.len()).then_some(i)
    }

    /// Entry at index `i`.
    pub fn get(&self, i: usize) -> Option<&IndexEntry> {
        self.entries.get(i)
    }

    /// First offset still indexed.
    pub fn first_offset(&self) -> Option<u64> {
        self.entries.front().map(|e| e.base_offset)
    }

    /// Next offset after the last indexed batch.
    pub fn next_offset(&self) -> Option<u64> {
        self.entries.back().map(IndexEntry::next_offset)
    }

    /// Next offset covering only batches that end at or before `position`.
    pub fn next_offset_at(&self, position: u64) -> Option<u64> {
        let i = self
            .entries
            .partition_point(|e| e.position + u64::from(e.len) <= position);
        i.checked_sub(1).map(|i| self.entries[i].next_offset())
    }

    /// Index of the entry whose batch starts at `position` (positions grow
    /// with offsets within a queue).
    pub fn find_position(&self, position: u64) -> Option<usize> {
        let i = self.entries.partition_point(|e| e.position < position);
        (self.entries.get(i)?.position == position).then_some(i)
    }

    /// Entries of batches starting at or after `position`.
    pub fn since_position(&self, position: u64) -> impl Iterator<Item = &IndexEntry> {
        let i = self.entries.partition_point(|e| e.position < position);
        self.entries.range(i..)
    }

    /// Drops entries of batches that start before `position`; returns how many.
    pub fn trim_before(&mut self, position: u64) -> usize {
        let n = self.entries.partition_point(|e| e.position < position);
        self.entries.drain(..n);
        n
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(base: u64, count: u32, position: u64) -> IndexEntry {
        IndexEntry {
            base_offset: base,
            position,
            len: 100,
            count,
            tags: 0,
            view_len: 0,
        }
    }

    #[test]
    fn find_covers_offsets_inside_batches_and_gaps() {
        let mut ix = ConsumeIndex::default();
        ix.push(e(0, 10, 0));
        ix.push(e(10, 5, 1000));
        ix.push(e(20, 1, 5000)); // a gap 15..20 left by a corrupt batch
        assert_eq!(ix.find(0), Some(0));
        assert_eq!(ix.find(9), Some(0));
        assert_eq!(ix.find(10), Some(1));
        assert_eq!(ix.find(16), Some(2));
        assert_eq!(ix.find(20), Some(2));
        assert_eq!(ix.find(21), None);
        assert_eq!(ix.next_offset(), Some(21));
        assert_eq!(ix.next_offset_at(1100), Some(15));
        assert_eq!(ix.next_offset_at(1099), Some(10));
        assert_eq!(ix.next_offset_at(50), None);
    }

    #[test]
    fn trim_drops_only_batches_before_the_position() {
        let mut ix = ConsumeIndex::default();
        ix.push(e(0, 10, 0));
        ix.push(e(10, 5, 1000));
        assert_eq!(ix.trim_before(1000), 1);
        assert_eq!(ix.first_offset(), Some(10));
        assert_eq!(
            ix.find(3),
            Some(0),
            "an offset before the first entry maps to it"
        );
    }

    #[test]
    #[should_panic(expected = "out of order")]
    fn out_of_order_push_is_a_bug() {
        let mut ix = ConsumeIndex::default();
        ix.push(e(10, 5, 0));
        ix.push(e(12, 1, 100));
    }
}
