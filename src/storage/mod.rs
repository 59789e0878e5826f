//! One shard's storage: an append-only commit log in fixed-size segments
//! that every queue of the shard appends to, and per queue a consume index
//! (offset → log position) and a time index (timestamp → offset).
//!
//! `storage` never parses the wire protocol; it knows the batch format
//! (`crate::batch`) because that format *is* the disk format.

pub mod checkpoint;
pub mod commit_log;
pub mod consume_index;
pub mod recovery;
pub mod retention;
pub mod segment;
pub mod store;
pub mod tail_cache;
pub mod time_index;

pub use commit_log::{CommitLog, LogConfig};
pub use store::{AppendReceipt, QueueStore, StoreError};

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
