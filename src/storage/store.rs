//! The queue store of one shard: the commit log plus, per queue, the
//! consume and time indexes, the next offset and the visible offset (high
//! watermark), and the tail cache. It stamps batches, appends them, makes
//! them visible once their durability level is reached, and serves reads.

use bytes::{Bytes, BytesMut};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use super::checkpoint::Checkpoint;
use super::commit_log::{CommitLog, LogConfig, LogError};
use super::consume_index::{ConsumeIndex, IndexEntry};
use super::recovery::{recover_dir, RecoveryReport};
use super::retention::{segments_to_delete, RetentionPolicy};
use super::tail_cache::TailCache;
use super::time_index::TimeIndex;
#[cfg(test)]
use crate::batch::RecordIter;
use crate::batch::{self, BatchHeader, BATCH_HEADER_BYTES};
use crate::ids::IdMap;
use crate::protocol::{Durability, QueueOffsets};
use crate::runtime::{self, Watch};

/// Why a store operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("queue {0} is not stored on this shard")]
    UnknownQueue(u32),
    #[error("offset {offset} is out of range [{earliest}, {latest}]")]
    OffsetOutOfRange {
        offset: u64,
        earliest: u64,
        latest: u64,
    },
    #[error("stored batch at position {position} failed its check: {reason}")]
    Corrupt { position: u64, reason: String },
    #[error("recovery failed: {0}")]
    Recovery(String),
}

struct QueueState {
    consume: ConsumeIndex,
    time: TimeIndex,
    next_offset: u64,
    /// Offset the next visible message gets; advances once a batch reached
    /// its durability level. Long polls wait on it.
    visible: Watch,
}

impl QueueState {
    fn new(next_offset: u64) -> Self {
        QueueState {
            consume: ConsumeIndex::default(),
            time: TimeIndex::default(),
            next_offset,
            visible: Watch::new(next_offset),
        }
    }
    fn earliest(&self) -> u64 {
        self.consume.first_offset().unwrap_or(self.next_offset)
    }
    fn offsets(&self) -> QueueOffsets {
        QueueOffsets {
            earliest: self.earliest().min(self.visible.get()),
            latest: self.visible.get(),
        }
    }
}

/// Where an append went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendReceipt {
    pub queue_id: u32,
    pub position: u64,
    pub end_position: u64,
    pub base_offset: u64,
    pub count: u32,
    pub append_time_ms: i64,
}

/// One shard's queues over its commit log.
pub struct QueueStore {
    log: Rc<CommitLog>,
    queues: RefCell<IdMap<QueueState>>,
    tail: RefCell<TailCache>,
    last_append_ms: Cell<i64>,
    dir: std::path::PathBuf,
    /// Counts publishes: wakes long polls over many queues.
    published: Watch,
}

impl QueueStore {
    /// Recovers the shard directory and opens the store.
    pub async fn open(
        cfg: LogConfig,
        tail_cache_bytes_max: u64,
    ) -> Result<(Rc<QueueStore>, RecoveryReport), StoreError> {
        let dir = cfg.dir.clone();
        let d = dir.clone();
        let recovered = runtime::blocking(move || recover_dir(&d))
            .await
            .map_err(|e| StoreError::Recovery(e.to_string()))?;
        let log = CommitLog::open(
            cfg,
            &recovered.segments,
            recovered.end_position,
            recovered.tail_page,
        )
        .await?;
        let mut queues: IdMap<QueueState> = IdMap::default();
        let mut last_ms = 0;
        for b in &recovered.batches {
            let q = queues
                .entry(b.queue_id)
                .or_insert_with(|| QueueState::new(b.base_offset));
            q.consume.push(IndexEntry {
                base_offset: b.base_offset,
                position: b.position,
                len: b.len,
                count: b.count,
            });
            q.time.push(b.append_time_ms, b.base_offset);
            q.next_offset = b.base_offset + u64::from(b.count);
            last_ms = last_ms.max(b.append_time_ms);
        }
        for (&id, &next) in &recovered.checkpoint.next_offsets {
            let q = queues.entry(id).or_insert_with(|| QueueState::new(next));
            q.next_offset = q.next_offset.max(next);
        }
        for q in queues.values_mut() {
            q.visible = Watch::new(q.next_offset);
        }
        let store = Rc::new(QueueStore {
            log,
            queues: RefCell::new(queues),
            tail: RefCell::new(TailCache::new(tail_cache_bytes_max)),
            last_append_ms: Cell::new(last_ms),
            published: Watch::new(0),
            dir,
        });
        Ok((store, recovered.report))
    }

    /// The commit log.
    pub fn log(&self) -> &Rc<CommitLog> {
        &self.log
    }

    /// Makes sure queue `id` exists (a newly created topic's queue).
    pub fn ensure_queue(&self, id: u32) {
        self.queues
            .borrow_mut()
            .entry(id)
            .or_insert_with(|| QueueState::new(0));
    }

    /// Forgets queue `id` (its topic was deleted). Its batches stay in the
    /// log until retention removes their segments; long polls end.
    pub fn remove_queue(&self, id: u32) {
        if let Some(q) = self.queues.borrow_mut().remove(&id) {
            q.visible.close();
        }
    }

    /// Queue ids stored here.
    pub fn queue_ids(&self) -> Vec<u32> {
        self.queues.borrow().keys().copied().collect()
    }

    /// Number of queues.
    pub fn queue_count(&self) -> usize {
        self.queues.borrow().len()
    }

    /// Stamps a validated produced batch for `queue_id` and appends it.
    pub fn append(
        &self,
        queue_id: u32,
        produced: &[u8],
        header: &BatchHeader,
    ) -> Result<AppendReceipt, StoreError> {
        let mut queues = self.queues.borrow_mut();
        let q = queues
            .get_mut(&queue_id)
            .ok_or(StoreError::UnknownQueue(queue_id))?;
        let now = runtime::now_ms().max(self.last_append_ms.get());
        self.last_append_ms.set(now);
        let base = q.next_offset;
        let len = produced.len() as u64;
        let (position, stored) = self.log.append(len, now, |position| {
            let mut buf = BytesMut::from(produced);
            batch::stamp(&mut buf, queue_id, base, now, position);
            buf.freeze()
        })?;
        let mut tail = self.tail.borrow_mut();
        tail.push(position, stored);
        tail.evict(self.log.written_position());
        q.consume.push(IndexEntry {
            base_offset: base,
            position,
            len: len as u32,
            count: header.record_count,
        });
        q.time.push(now, base);
        q.next_offset = base + u64::from(header.record_count);
        Ok(AppendReceipt {
            queue_id,
            position,
            end_position: position + len,
            base_offset: base,
            count: header.record_count,
            append_time_ms: now,
        })
    }

    /// Resolves once the appended batch reached `level`.
    pub async fn wait_durable(
        &self,
        r: &AppendReceipt,
        level: Durability,
    ) -> Result<(), StoreError> {
        match level {
            Durability::Memory => Ok(()),
            Durability::Written => Ok(self.log.wait_written(r.end_position).await?),
            Durability::Fsync => Ok(self.log.wait_synced(r.end_position).await?),
        }
    }

    /// Makes the appended batch visible to consumers and wakes long polls.
    pub fn publish(&self, r: &AppendReceipt) {
        if let Some(q) = self.queues.borrow().get(&r.queue_id) {
            q.visible.advance(r.base_offset + u64::from(r.count));
        }
        self.published.advance(self.published.get() + 1);
    }

    /// Whether the queue has visible messages at or after `offset` (or the
    /// offset is out of range): the cheap first check of a fetch over many
    /// queues.
    pub fn has_news(&self, queue_id: u32, offset: u64) -> Result<bool, StoreError> {
        let queues = self.queues.borrow();
        let q = queues
            .get(&queue_id)
            .ok_or(StoreError::UnknownQueue(queue_id))?;
        Ok(q.visible.get() != offset)
    }

    /// Earliest stored and latest visible offsets of a queue.
    pub fn offsets(&self, queue_id: u32) -> Result<QueueOffsets, StoreError> {
        let queues = self.queues.borrow();
        let q = queues
            .get(&queue_id)
            .ok_or(StoreError::UnknownQueue(queue_id))?;
        Ok(q.offsets())
    }

    /// First offset whose batch was appended at or after `time_ms`.
    pub fn offset_for_time(&self, queue_id: u32, time_ms: i64) -> Result<u64, StoreError> {
        let queues = self.queues.borrow();
        let q = queues
            .get(&queue_id)
            .ok_or(StoreError::UnknownQueue(queue_id))?;
        let o = q.offsets();
        let found = q.time.lookup(time_ms).unwrap_or(o.latest);
        Ok(found.clamp(o.earliest, o.latest))
    }

    /// Publishes so far (a counter, for [`QueueStore::wait_published`]).
    pub fn published(&self) -> u64 {
        self.published.get()
    }

    /// Waits (up to `wait`) until something is published after `seen`
    /// (a value of [`QueueStore::published`]).
    pub async fn wait_published(&self, seen: u64, wait: Duration) {
        self.published.wait_for_within(seen + 1, wait).await;
    }

    /// Waits (up to `wait`) until `offset` is visible in the queue.
    pub async fn wait_visible(
        &self,
        queue_id: u32,
        offset: u64,
        wait: Duration,
    ) -> Result<(), StoreError> {
        let watch = {
            let queues = self.queues.borrow();
            let q = queues
                .get(&queue_id)
                .ok_or(StoreError::UnknownQueue(queue_id))?;
            if q.visible.get() > offset || wait.is_zero() {
                return Ok(());
            }
            q.visible.clone()
        };
        watch.wait_for_within(offset + 1, wait).await;
        Ok(())
    }

    /// Visible batches of a queue from `offset`, up to `max_bytes` (at least
    /// one batch when any is visible).
    pub async fn read(
        &self,
        queue_id: u32,
        offset: u64,
        max_bytes: u32,
    ) -> Result<(QueueOffsets, Vec<Bytes>), StoreError> {
        let (offsets, entries) = {
            let queues = self.queues.borrow();
            let q = queues
                .get(&queue_id)
                .ok_or(StoreError::UnknownQueue(queue_id))?;
            let o = q.offsets();
            if offset < o.earliest || offset > o.latest {
                return Err(StoreError::OffsetOutOfRange {
                    offset,
                    earliest: o.earliest,
                    latest: o.latest,
                });
            }
            let mut entries = Vec::new();
            let mut bytes = 0u64;
            if let Some(mut i) = q.consume.find(offset) {
                while let Some(e) = q.consume.get(i) {
                    if e.base_offset >= o.latest
                        || (!entries.is_empty() && bytes + u64::from(e.len) > u64::from(max_bytes))
                    {
                        break;
                    }
                    bytes += u64::from(e.len);
                    entries.push(*e);
                    i += 1;
                }
            }
            (o, entries)
        };
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            out.push(self.batch_at_entry(e.position, e.len as usize).await?);
        }
        Ok((offsets, out))
    }

    async fn batch_at_entry(&self, position: u64, len: usize) -> Result<Bytes, StoreError> {
        if let Some(b) = self.tail.borrow().get(position) {
            return Ok(b);
        }
        let b = self.log.read(position, len).await?;
        batch::check_stored(&b).map_err(|e| StoreError::Corrupt {
            position,
            reason: e.to_string(),
        })?;
        Ok(b)
    }

    /// The visible stored batch starting at `position` (message lookup).
    pub async fn batch_at(&self, position: u64) -> Result<Bytes, StoreError> {
        let not_found = || StoreError::Log(LogError::NotFound(position));
        let cached = self.tail.borrow().get(position);
        let b = match cached {
            Some(b) => b,
            None => {
                if position >= self.log.written_position() {
                    return Err(not_found());
                }
                let head = self.log.read(position, BATCH_HEADER_BYTES).await?;
                let h = batch::check_stored_header(&head).map_err(|_| not_found())?;
                let b = self.log.read(position, h.batch_len as usize).await?;
                batch::check_stored(&b).map_err(|_| not_found())?;
                b
            }
        };
        let h = batch::BatchHeader::parse(&b).map_err(|_| not_found())?;
        let queues = self.queues.borrow();
        let q = queues.get(&h.queue_id).ok_or_else(not_found)?;
        // Only a batch the index knows at this position and that is visible.
        let known = q
            .consume
            .find(h.base_offset)
            .and_then(|i| q.consume.get(i))
            .is_some_and(|e| e.position == position);
        if !known || h.base_offset >= q.visible.get() {
            return Err(not_found());
        }
        Ok(b)
    }

    /// A checkpoint of what is durable now.
    pub fn checkpoint(&self) -> Checkpoint {
        let synced = self.log.synced_position();
        let queues = self.queues.borrow();
        let next_offsets = queues
            .iter()
            .map(|(&id, q)| {
                let n = q
                    .consume
                    .next_offset_at(synced)
                    .or(q.consume.first_offset())
                    .unwrap_or(q.next_offset);
                (id, n)
            })
            .collect();
        Checkpoint {
            synced_position: synced,
            next_offsets,
        }
    }

    /// Writes the checkpoint durably (off the executor).
    pub async fn store_checkpoint(&self) -> Result<(), StoreError> {
        let c = self.checkpoint();
        let dir = self.dir.clone();
        runtime::blocking(move || c.store(&dir)).await.map_err(|e| {
            StoreError::Log(LogError::Io {
                op: "write checkpoint",
                path: self.dir.display().to_string(),
                message: e.to_string(),
            })
        })
    }

    /// Applies retention: checkpoints, then deletes whole old segments and
    /// trims the indexes. Returns the number of segments deleted.
    pub async fn apply_retention(&self, policy: RetentionPolicy) -> Result<usize, StoreError> {
        let bases = segments_to_delete(&self.log.segments(), policy, runtime::now_ms());
        let Some(&last) = bases.last() else {
            return Ok(0);
        };
        let cutoff = self
            .log
            .segments()
            .iter()
            .find(|s| s.base == last)
            .map(|s| s.end())
            .expect("segment to delete exists");
        // Offsets of queues whose every batch goes must survive a restart.
        self.store_checkpoint().await?;
        {
            let mut queues = self.queues.borrow_mut();
            for q in queues.values_mut() {
                q.consume.trim_before(cutoff);
                let earliest = q.earliest();
                q.time.trim_before(earliest);
            }
        }
        self.log.delete_segments(&bases).await?;
        Ok(bases.len())
    }

    /// Bytes held by the tail cache.
    pub fn tail_cache_bytes(&self) -> u64 {
        self.tail.borrow().bytes()
    }

    /// Stops appends and makes everything appended durable, then checkpoints.
    pub async fn close(&self) -> Result<(), StoreError> {
        self.log.close().await?;
        self.store_checkpoint().await
    }
}

#[cfg(test)]
mod tests;
