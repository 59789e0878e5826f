//! One shard's storage: an append-only commit log in fixed-size segments
//! that every queue of the shard appends to, and per queue a consume index
//! (offset → log position) and a time index (timestamp → offset).
//!
//! Everything reaches files, time and tasks through the I/O seam in `io`:
//! io_uring direct I/O in the broker (`uring`), a seeded fault-injecting
//! simulator in tests (`sim`).
//!
//! `storage` never parses the wire protocol; it knows the batch format
//! (`crate::batch`) because that format *is* the disk format.

pub mod checkpoint;
pub mod commit_log;
pub mod consume_index;
pub mod index_snapshot;
pub mod io;
pub mod record_cache;
pub mod recovery;
pub mod retention;
pub mod segment;
#[cfg(test)]
pub(crate) mod sim;
pub mod store;
pub mod tail_cache;
pub mod time_index;
pub mod uring;

pub use commit_log::{CommitLog, LogConfig, LogError};
pub use store::{AppendReceipt, QueueStore, StoreConfig, StoreError};
pub use uring::UringIo;

/// Alignment of every direct-I/O write (and of segment capacities).
pub const DMA_ALIGNMENT_BYTES: u64 = 4096;

/// Rounds `v` down to the direct-I/O alignment.
pub fn align_down(v: u64) -> u64 {
    v & !(DMA_ALIGNMENT_BYTES - 1)
}

/// Rounds `v` up to the direct-I/O alignment.
pub fn align_up(v: u64) -> u64 {
    align_down(v + DMA_ALIGNMENT_BYTES - 1)
}

/// One stored batch as the indexes and snapshots know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchEntry {
    /// Where the batch starts in the shard's log.
    pub position: u64,
    pub len: u32,
    pub queue_id: u32,
    pub base_offset: u64,
    pub count: u32,
    pub append_time_ms: i64,
    /// Tag summary of its records (`batch::tag_summary`; all ones when
    /// unknown, as for entries of old index snapshots).
    pub tags: u32,
    /// The batch's `attributes` (`batch::BATCH_ATTR_*`).
    pub attributes: u16,
    /// A reference batch's view size (its header's `extra`); else 0.
    pub view_len: u32,
    /// Its records' highest priority.
    pub max_priority: u8,
}

impl BatchEntry {
    /// First position after the batch.
    pub fn end(&self) -> u64 {
        self.position + u64::from(self.len)
    }
    /// Offset after the batch's last record.
    pub fn next_offset(&self) -> u64 {
        self.base_offset + u64::from(self.count)
    }
}

/// Writes `name` in `dir` via a synced temp file and a rename, then syncs
/// the directory. Blocking (std::fs): for the small documents outside the
/// log (metadata, group offsets), run on the blocking pool.
pub fn write_atomic(dir: &std::path::Path, name: &str, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_data()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}
