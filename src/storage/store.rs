//! The queue store of one shard: the commit log plus, per queue, the
//! consume and time indexes, the next offset, the visible offset (high
//! watermark) and the offset reservation; the tail cache; the checkpoint
//! and the index snapshots. It stamps batches, appends them, makes them
//! visible once their durability level is reached, and serves reads.
//!
//! A keeper task stores the checkpoint and appends index snapshots every
//! checkpoint interval, and at once when an acknowledgement waits for an
//! offset reservation.
//!
//! **Offsets never go back.** A `fsync` append is acknowledged and visible
//! only once synced, so recovery finds it. A `memory` or `written` append
//! can be acknowledged (and seen) before it is synced, so it is
//! acknowledged only below its queue's *reservation* as last stored in the
//! checkpoint, and after a crash the queue resumes at its reservation. The
//! keeper raises reservations ahead of use (by 4× what the queue took in
//! the last interval, at least [`RESERVE_OFFSETS_MIN`]), so an ack rarely
//! waits; after a crash the skipped offsets are a gap, never a repeat. A
//! clean stop stores exact offsets, so it leaves no gap.

use bytes::{Bytes, BytesMut};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::{Rc, Weak};
use std::time::Duration;

use super::checkpoint::{Checkpoint, CheckpointFile, QueueCheckpoint, ReserveKind};
use super::commit_log::{CommitLog, LogConfig, LogError};
use super::consume_index::{ConsumeIndex, IndexEntry};
use super::index_snapshot::{self, BLOCK_ENTRIES_MAX};
use super::io::{Io, IoFailure, IoKind, TaskClass};
use super::recovery::{recover, RecoveryConfig, RecoveryError, RecoveryReport, SnapshotState};
use super::retention::{segments_to_delete, RetentionPolicy};
use super::segment::index_path;
use super::tail_cache::TailCache;
use super::time_index::TimeIndex;
use super::BatchEntry;
use crate::batch::{self, BatchHeader, RecordIter, BATCH_HEADER_BYTES};
use crate::ids::{IdMap, LogPosition, QueueId, QueueOffset, TIMER_QUEUE};
use crate::protocol::{Durability, QueueOffsets};
use crate::runtime::Watch;

/// Smallest offset reservation the keeper grants a queue.
pub const RESERVE_OFFSETS_MIN: u64 = 4096;
/// Largest offset reservation (bounds the gap a crash leaves).
pub const RESERVE_OFFSETS_MAX: u64 = 1 << 24;
/// Most batches appended but not yet in an index snapshot; past it the
/// snapshot of the oldest segment is given up (recovery then scans it).
pub const INDEX_PENDING_ENTRIES_MAX: usize = 1 << 20;
/// A snapshot block is written once this many batches or
/// [`SNAPSHOT_LAG_BYTES_MAX`] of log wait for one (or the segment seals):
/// ~40 bytes of index per batch, and a restart scans at most this much.
pub const SNAPSHOT_BLOCK_ENTRIES_MIN: usize = 101;
/// See [`SNAPSHOT_BLOCK_ENTRIES_MIN`].
pub const SNAPSHOT_LAG_BYTES_MAX: u64 = 16 << 20;

/// Settings of one shard's store.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub log: LogConfig,
    pub tail_cache_bytes_max: u64,
    pub checkpoint_interval: Duration,
    /// Run the zeroer (off in the simulation, which models no extents).
    pub zero_ahead: bool,
    /// Smallest offset reservation the keeper grants a queue (the broker
    /// uses [`RESERVE_OFFSETS_MIN`]; the simulation a few, so reservations
    /// run out all the time).
    pub reserve_offsets_min: u64,
}

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
    #[error(transparent)]
    Recovery(#[from] RecoveryError),
}

/// A long poll over many queues: publishes on its queues wake it and say
/// which queues have news.
#[derive(Default)]
pub struct FetchWaiter {
    woken: RefCell<Vec<QueueId>>,
    event: Watch,
}

impl FetchWaiter {
    /// Queues that published since the last call.
    pub fn take_woken(&self) -> Vec<QueueId> {
        std::mem::take(&mut *self.woken.borrow_mut())
    }
}

struct QueueState {
    consume: ConsumeIndex,
    time: TimeIndex,
    next_offset: u64,
    /// Offset the next visible message gets; advances once a batch reached
    /// its durability level. Long polls wait on it.
    visible: Watch,
    /// Offsets below this are reserved in the last stored checkpoint.
    reserved_stored: u64,
    /// Where the queue resumed at open (past its reservation after a
    /// crash): no checkpoint may record a next offset below it, or a later
    /// crash would take back what was shown since.
    floor: u64,
    /// Which crashes could take back this queue's acknowledged offsets.
    reserve: ReserveKind,
    /// Offsets appended since the last checkpoint (sizes the next grant).
    appended_since_checkpoint: u64,
    /// Long polls over many queues that watch this one.
    waiters: Vec<Weak<FetchWaiter>>,
    /// (base offset, next offset) of every indexed batch holding a record
    /// of priority above 0, oldest first (trimmed with the consume index):
    /// readers that order by priority read only these ahead.
    prioritized: VecDeque<(u64, u64)>,
}

impl QueueState {
    fn new(next_offset: u64) -> Self {
        QueueState {
            consume: ConsumeIndex::default(),
            time: TimeIndex::default(),
            next_offset,
            visible: Watch::new(next_offset),
            reserved_stored: 0,
            floor: 0,
            reserve: ReserveKind::None,
            appended_since_checkpoint: 0,
            waiters: Vec::new(),
            prioritized: VecDeque::new(),
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
    fn grant(&self, min: u64) -> u64 {
        (self.appended_since_checkpoint * 4).clamp(min, RESERVE_OFFSETS_MAX)
    }
}

/// Where an append went.
/// Where a stored batch is ([`QueueStore::locate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchLocation {
    pub position: LogPosition,
    /// Bytes.
    pub len: u32,
    pub base_offset: QueueOffset,
    /// The offset after its last record.
    pub next_offset: QueueOffset,
    /// Its tag summary (`batch::tag_summary`).
    pub tags: u32,
    /// A reference batch's view size (read as a view of the messages it
    /// points at); 0 for any other batch.
    pub view_len: u32,
}

impl BatchLocation {
    /// Bytes a reader gets of this batch.
    pub fn read_len(&self) -> u32 {
        if self.view_len != 0 {
            self.view_len
        } else {
            self.len
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendReceipt {
    pub queue_id: QueueId,
    pub position: LogPosition,
    pub end_position: LogPosition,
    pub base_offset: QueueOffset,
    pub count: u32,
    pub append_time_ms: i64,
}

impl AppendReceipt {
    /// Offset after the batch's last record.
    pub fn end_offset(&self) -> QueueOffset {
        self.base_offset.plus(u64::from(self.count))
    }
}

struct SnapshotSegment<F> {
    file: Option<(Rc<F>, u64)>,
    covered_end: u64,
    sealed: bool,
}

/// Index snapshots being written.
struct Snapshots<F> {
    segments: BTreeMap<u64, SnapshotSegment<F>>,
    /// Appended batches not yet in a snapshot, in log order.
    pending: VecDeque<BatchEntry>,
    /// Segments whose snapshot was given up.
    broken: BTreeSet<u64>,
}

/// One shard's queues over its commit log.
pub struct QueueStore<I: Io> {
    io: I,
    cfg: StoreConfig,
    log: Rc<CommitLog<I>>,
    queues: RefCell<IdMap<QueueState>>,
    tail: RefCell<TailCache>,
    /// Records read ahead (the timer's: scheduled messages about to fire).
    records: RefCell<super::record_cache::RecordCache>,
    last_append_ms: Cell<i64>,
    checkpoint_file: CheckpointFile<I>,
    /// Bumped after every stored checkpoint (reservation waiters).
    checkpoint_stored: Watch,
    /// Bumped to make the keeper work now.
    keeper_work: Watch,
    /// The last checkpoint could not grow for lack of space: appends that
    /// need a new reservation are refused with `Full`.
    checkpoint_full: RefCell<Option<IoFailure>>,
    snapshots: RefCell<Snapshots<I::File>>,
    free_bytes: Cell<Option<u64>>,
    closing: Cell<bool>,
    /// The keeper tried to mark a storage failure in the checkpoint.
    failure_marked: Cell<bool>,
}

impl<I: Io> QueueStore<I> {
    /// Recovers the shard directory and opens the store; call
    /// [`QueueStore::start`] before appending.
    pub async fn open(
        io: I,
        cfg: StoreConfig,
    ) -> Result<(Rc<QueueStore<I>>, RecoveryReport), StoreError> {
        let rcfg = RecoveryConfig {
            dir: cfg.log.dir.clone(),
            shard: cfg.log.shard,
            unsynced_bytes_max: cfg.log.unsynced_bytes_max,
        };
        let recovered = recover(&io, &rcfg).await?;
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
                tags: b.tags,
                view_len: b.view_len,
            });
            if b.max_priority > 0 {
                q.prioritized.push_back((b.base_offset, b.next_offset()));
            }
            q.time.push(b.append_time_ms, b.base_offset);
            q.next_offset = b.next_offset();
            last_ms = last_ms.max(b.append_time_ms);
        }
        // A power cut since the checkpoint (another boot) can take back
        // `written` appends; any crash can take back `memory` ones.
        let rebooted =
            recovered.checkpoint.boot_id != io.boot_id() || recovered.checkpoint.storage_failed;
        for (&id, c) in &recovered.checkpoint.queues {
            let q = queues
                .entry(id)
                .or_insert_with(|| QueueState::new(c.next_offset));
            let taken_back = match c.reserve {
                ReserveKind::Memory => true,
                ReserveKind::Written => rebooted,
                ReserveKind::None => false,
            };
            // Resume past every offset that could have been acknowledged
            // or seen.
            q.next_offset = q.next_offset.max(c.next_offset);
            if taken_back {
                q.next_offset = q.next_offset.max(c.offset_reserved);
            }
            q.reserve = c.reserve;
            q.reserved_stored = q.next_offset;
        }
        for q in queues.values_mut() {
            q.visible = Watch::new(q.next_offset);
            q.floor = q.next_offset;
        }
        let snapshots = Snapshots {
            pending: recovered
                .batches
                .iter()
                .copied()
                .filter(|b| {
                    !recovered
                        .snapshots
                        .iter()
                        .any(|s| b.position >= s.base && b.position < s.covered_end)
                })
                .collect(),
            segments: recovered
                .snapshots
                .into_iter()
                .map(|s: SnapshotState<I::File>| {
                    (
                        s.base,
                        SnapshotSegment {
                            file: s.file,
                            covered_end: s.covered_end,
                            sealed: s.sealed,
                        },
                    )
                })
                .collect(),
            broken: BTreeSet::new(),
        };
        let log = CommitLog::open(
            io.clone(),
            cfg.log.clone(),
            recovered.segments,
            recovered.end_position,
            recovered.tail_page,
        );
        let store = Rc::new(QueueStore {
            tail: RefCell::new(TailCache::new(cfg.tail_cache_bytes_max)),
            records: RefCell::new(super::record_cache::RecordCache::new(
                super::record_cache::RECORD_CACHE_BYTES_MAX,
            )),
            io,
            cfg,
            log,
            queues: RefCell::new(queues),
            last_append_ms: Cell::new(last_ms),
            checkpoint_file: recovered.checkpoint_file,
            checkpoint_stored: Watch::new(0),
            keeper_work: Watch::new(0),
            checkpoint_full: RefCell::new(None),
            snapshots: RefCell::new(snapshots),
            free_bytes: Cell::new(None),
            closing: Cell::new(false),
            failure_marked: Cell::new(false),
        });
        if let Ok(free) = store.io.free_bytes(&store.cfg.log.dir).await {
            store.free_bytes.set(Some(free));
        }
        // The stored clean end no longer holds once appends start.
        if let Err(e) = store.store_checkpoint(None).await {
            tracing::warn!(
                shard = store.cfg.log.shard,
                "cannot store the checkpoint at start: {e}"
            );
        }
        Ok((store, recovered.report))
    }

    /// Starts the log's tasks and the keeper.
    pub fn start(self: &Rc<Self>) {
        self.log.start(self.cfg.zero_ahead);
        let me = self.clone();
        self.io
            .spawn(TaskClass::Background, async move { me.keeper().await });
    }

    /// The commit log.
    pub fn log(&self) -> &Rc<CommitLog<I>> {
        &self.log
    }

    /// Makes sure queue `id` exists (a newly created topic's queue).
    pub fn ensure_queue(&self, id: QueueId) {
        self.queues
            .borrow_mut()
            .entry(id.0)
            .or_insert_with(|| QueueState::new(0));
    }

    /// Forgets queue `id` (its topic was deleted). Its batches stay in the
    /// log until retention removes their segments; long polls end.
    pub fn remove_queue(&self, id: QueueId) {
        if let Some(q) = self.queues.borrow_mut().remove(&id.0) {
            q.visible.close();
            for w in q.waiters.iter().filter_map(Weak::upgrade) {
                w.woken.borrow_mut().push(id);
                bump(&w.event);
            }
        }
    }

    /// Queue ids stored here.
    pub fn queue_ids(&self) -> Vec<QueueId> {
        self.queues.borrow().keys().map(|&q| QueueId(q)).collect()
    }

    /// Waits (up to `limit`) until an append of `len` bytes can be taken.
    pub async fn wait_appendable(&self, len: u64, limit: Duration) -> Result<(), StoreError> {
        Ok(self.log.wait_admission(len, limit).await?)
    }

    /// Stamps a validated produced batch for `queue_id` and appends it, to
    /// be acknowledged at `level`. `summary` (`batch::Summary`: tag bits and
    /// highest priority) is kept in the indexes.
    pub fn append(
        &self,
        queue: QueueId,
        produced: &[u8],
        header: &BatchHeader,
        summary: batch::Summary,
        level: Durability,
    ) -> Result<AppendReceipt, StoreError> {
        let tags = summary.tags;
        let queue_id = queue.0;
        let mut queues = self.queues.borrow_mut();
        let q = queues
            .get_mut(&queue_id)
            .ok_or(StoreError::UnknownQueue(queue_id))?;
        let base = q.next_offset;
        let count = u64::from(header.record_count);
        let kind = match level {
            Durability::Memory => ReserveKind::Memory,
            Durability::Written => ReserveKind::Written,
            Durability::Fsync => ReserveKind::None,
        };
        let needs_reserve = kind != ReserveKind::None;
        if needs_reserve && base + count > q.reserved_stored {
            if let Some(f) = self.checkpoint_full.borrow().as_ref() {
                return Err(LogError::Full(f.clone()).into());
            }
        }
        let now = self.io.now_ms().max(self.last_append_ms.get());
        let len = produced.len() as u64;
        let (position, stored) = self.log.append(len, now, |position, key| {
            let mut buf = BytesMut::from(produced);
            batch::stamp(&mut buf, queue_id, base, now, position, key);
            buf.freeze()
        })?;
        self.last_append_ms.set(now);
        let mut tail = self.tail.borrow_mut();
        tail.push(position, stored);
        tail.evict(self.log.written_position());
        drop(tail);
        q.consume.push(IndexEntry {
            base_offset: base,
            position,
            len: len as u32,
            count: header.record_count,
            tags,
            view_len: if header.is_reference() {
                header.extra.max(1)
            } else {
                0
            },
        });
        if summary.max_priority > 0 {
            q.prioritized.push_back((base, base + count));
        }
        q.time.push(now, base);
        q.next_offset = base + count;
        q.appended_since_checkpoint += count;
        if needs_reserve {
            q.reserve = q.reserve.max(kind);
            // Raise the reservation before it runs out.
            if q.next_offset + q.grant(self.cfg.reserve_offsets_min) / 2 > q.reserved_stored {
                bump(&self.keeper_work);
            }
        }
        self.snapshots.borrow_mut().pending.push_back(BatchEntry {
            position,
            len: len as u32,
            queue_id,
            base_offset: base,
            count: header.record_count,
            append_time_ms: now,
            tags,
            attributes: header.attributes,
            view_len: if header.is_reference() {
                header.extra.max(1)
            } else {
                0
            },
            max_priority: summary.max_priority,
        });
        Ok(AppendReceipt {
            queue_id: queue,
            position: LogPosition(position),
            end_position: LogPosition(position + len),
            base_offset: QueueOffset(base),
            count: header.record_count,
            append_time_ms: now,
        })
    }

    /// Resolves once the appended batch reached `level` (and, below
    /// `fsync`, its offsets are reserved).
    pub async fn wait_durable(
        &self,
        r: &AppendReceipt,
        level: Durability,
    ) -> Result<(), StoreError> {
        match level {
            Durability::Memory => self.wait_reserved(r).await,
            Durability::Written => {
                self.log.wait_written(r.end_position.0).await?;
                self.wait_reserved(r).await
            }
            Durability::Fsync => Ok(self.log.wait_synced(r.end_position.0).await?),
        }
    }

    /// Waits until a checkpoint reserving the batch's offsets is stored.
    async fn wait_reserved(&self, r: &AppendReceipt) -> Result<(), StoreError> {
        loop {
            let seen = self.checkpoint_stored.get();
            match self.queues.borrow().get(&r.queue_id.0) {
                Some(q) if q.reserved_stored < r.end_offset().0 => {}
                _ => return Ok(()),
            }
            if let Some(f) = self.log.failed() {
                return Err(LogError::Failed(f).into());
            }
            bump(&self.keeper_work);
            if self.checkpoint_stored.wait_for(seen + 1).await.is_err() {
                return Err(LogError::Closing.into());
            }
        }
    }

    /// Publishes a `memory`-level batch at once when nothing stands
    /// between it and its consumers: its offsets are reserved by a stored
    /// checkpoint and every batch before it in its queue is visible. True
    /// when published; otherwise the caller waits with
    /// [`QueueStore::wait_durable`] and publishes then.
    pub fn publish_if_ready(&self, r: &AppendReceipt) -> bool {
        let ready = self.queues.borrow().get(&r.queue_id.0).is_some_and(|q| {
            q.reserved_stored >= r.end_offset().0 && q.visible.get() == r.base_offset.0
        });
        if ready {
            self.publish(r);
        }
        ready
    }

    /// Makes the appended batch visible to consumers and wakes long polls
    /// (once: a batch already visible wakes nobody).
    pub fn publish(&self, r: &AppendReceipt) {
        let mut queues = self.queues.borrow_mut();
        let Some(q) = queues.get_mut(&r.queue_id.0) else {
            return;
        };
        if q.visible.get() >= r.end_offset().0 {
            return;
        }
        q.visible.advance(r.end_offset().0);
        if !q.waiters.is_empty() {
            q.waiters.retain(|w| match w.upgrade() {
                Some(w) => {
                    w.woken.borrow_mut().push(r.queue_id);
                    bump(&w.event);
                    true
                }
                None => false,
            });
        }
    }

    /// A long poll over `queue_ids`: woken by a publish on any of them.
    /// Dropping it unregisters it (lazily).
    pub fn watch_queues(&self, queue_ids: &[QueueId]) -> Rc<FetchWaiter> {
        let w = Rc::new(FetchWaiter::default());
        let mut queues = self.queues.borrow_mut();
        for id in queue_ids {
            if let Some(q) = queues.get_mut(&id.0) {
                // Drop waiters that are gone, so an idle queue's list stays
                // as long as its live long polls.
                if q.waiters.len() >= 8 && q.waiters.len().is_power_of_two() {
                    q.waiters.retain(|w| w.strong_count() > 0);
                }
                q.waiters.push(Rc::downgrade(&w));
            }
        }
        w
    }

    /// Waits (up to `wait`) for a publish on the queues `w` watches.
    pub async fn wait_watched(&self, w: &FetchWaiter, wait: Duration) {
        let seen = w.event.get();
        if !w.woken.borrow().is_empty() {
            return;
        }
        w.event.wait_for_within(seen + 1, self.io.sleep(wait)).await;
    }

    /// Whether the queue has visible messages at or after `offset` (or the
    /// offset is out of range): the cheap first check of a fetch over many
    /// queues.
    pub fn has_news(&self, queue: QueueId, offset: QueueOffset) -> Result<bool, StoreError> {
        let queues = self.queues.borrow();
        let q = queues
            .get(&queue.0)
            .ok_or(StoreError::UnknownQueue(queue.0))?;
        Ok(q.visible.get() != offset.0)
    }

    /// Earliest stored and latest visible offsets of a queue.
    pub fn offsets(&self, queue: QueueId) -> Result<QueueOffsets, StoreError> {
        let queues = self.queues.borrow();
        let q = queues
            .get(&queue.0)
            .ok_or(StoreError::UnknownQueue(queue.0))?;
        Ok(q.offsets())
    }

    /// First offset whose batch was appended at or after `time_ms`.
    pub fn offset_for_time(&self, queue: QueueId, time_ms: i64) -> Result<QueueOffset, StoreError> {
        let queues = self.queues.borrow();
        let q = queues
            .get(&queue.0)
            .ok_or(StoreError::UnknownQueue(queue.0))?;
        let o = q.offsets();
        let found = q.time.lookup(time_ms).unwrap_or(o.latest);
        Ok(QueueOffset(found.clamp(o.earliest, o.latest)))
    }

    /// Waits (up to `wait`) until `offset` is visible in the queue.
    pub async fn wait_visible(
        &self,
        queue: QueueId,
        offset: QueueOffset,
        wait: Duration,
    ) -> Result<(), StoreError> {
        let (queue_id, offset) = (queue.0, offset.0);
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
        watch.wait_for_within(offset + 1, self.io.sleep(wait)).await;
        Ok(())
    }

    /// Visible batches of a queue from `offset`, up to `max_bytes` (at least
    /// one batch when any is visible).
    pub async fn read(
        &self,
        queue: QueueId,
        offset: QueueOffset,
        max_bytes: u32,
    ) -> Result<(QueueOffsets, Vec<Bytes>), StoreError> {
        let (offsets, _, batches) = self
            .read_where(queue, offset, max_bytes, usize::MAX, |_| true)
            .await?;
        Ok((offsets, batches))
    }

    /// Visible batches of a queue from `offset` that `may_match` (given a
    /// batch's tag summary) lets through, up to `max_bytes` (at least one
    /// when any is visible) and looking at most `look_max` index entries.
    /// Also returns the offset after the last entry looked at: batches
    /// skipped unread count as looked at, so a filtered reader moves past
    /// them.
    pub async fn read_where(
        &self,
        queue: QueueId,
        offset: QueueOffset,
        max_bytes: u32,
        look_max: usize,
        may_match: impl Fn(u32) -> bool,
    ) -> Result<(QueueOffsets, QueueOffset, Vec<Bytes>), StoreError> {
        let (queue_id, offset) = (queue.0, offset.0);
        let (offsets, looked_to, entries) = {
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
            let (mut bytes, mut looked_to) = (0u64, offset);
            if let Some(mut i) = q.consume.find(offset) {
                let end = i.saturating_add(look_max.max(1));
                while let Some(e) = q.consume.get(i).filter(|_| i < end) {
                    if e.base_offset >= o.latest
                        || (!entries.is_empty()
                            && bytes + u64::from(e.read_len()) > u64::from(max_bytes))
                    {
                        break;
                    }
                    if may_match(e.tags) {
                        bytes += u64::from(e.read_len());
                        entries.push(*e);
                    }
                    looked_to = e.next_offset().min(o.latest).max(looked_to);
                    i += 1;
                }
            }
            (o, looked_to, entries)
        };
        let out = self.read_entries(&entries).await?;
        Ok((offsets, QueueOffset(looked_to), out))
    }

    /// Where the visible batch holding `offset` of a queue is (none in a
    /// gap or past the visible end): to read it with
    /// [`QueueStore::read_located`], and its size before reading.
    pub fn locate(&self, queue: QueueId, offset: QueueOffset) -> Option<BatchLocation> {
        let queues = self.queues.borrow();
        let q = queues.get(&queue.0)?;
        let latest = q.offsets().latest;
        let e = q.consume.get(q.consume.find(offset.0)?)?;
        (e.base_offset <= offset.0 && offset.0 < e.next_offset() && e.base_offset < latest).then(
            || BatchLocation {
                position: LogPosition(e.position),
                len: e.len,
                base_offset: QueueOffset(e.base_offset),
                next_offset: QueueOffset(e.next_offset()),
                tags: e.tags,
                view_len: e.view_len,
            },
        )
    }

    /// The batch at a location from [`QueueStore::locate`], read and
    /// checked like any read.
    pub async fn read_located(&self, at: &BatchLocation) -> Result<Bytes, StoreError> {
        let b = self.batch_at_entry(at.position.0, at.len as usize).await?;
        self.serve(b, at.view_len != 0).await
    }

    /// A stored batch as readers get it: a reference batch becomes a view
    /// of the messages it points at ([`QueueStore::resolve_references`]).
    async fn serve(&self, b: Bytes, reference: bool) -> Result<Bytes, StoreError> {
        if reference {
            self.resolve_references(&b).await
        } else {
            Ok(b)
        }
    }

    /// The batches of `entries` as readers get them, the reads not served
    /// by the tail cache issued together.
    async fn read_entries(&self, entries: &[IndexEntry]) -> Result<Vec<Bytes>, StoreError> {
        futures_util::future::try_join_all(entries.iter().map(|e| async move {
            let b = self.batch_at_entry(e.position, e.len as usize).await?;
            self.serve(b, e.is_reference()).await
        }))
        .await
    }

    /// A view of the fired scheduled messages a reference batch points at
    /// (`batch::build_view`): each one's record, sliced from its batch in
    /// the tail cache or read alone (its bytes only) from the log, the
    /// reads together, and checked against the CRC-32 the reference
    /// carries. A message whose record is gone (retention) or damaged is
    /// left out of the view; its offset stays covered.
    pub async fn resolve_references(&self, stored: &Bytes) -> Result<Bytes, StoreError> {
        let h = BatchHeader::parse(stored).map_err(|e| StoreError::Corrupt {
            position: 0,
            reason: e.to_string(),
        })?;
        let refs: Vec<batch::Reference> = RecordIter::new(stored)
            .map_while(Result::ok)
            .map(|r| batch::Reference::decode(r.payload))
            .collect::<Option<_>>()
            .ok_or_else(|| StoreError::Corrupt {
                position: h.log_position,
                reason: "a reference record does not decode".into(),
            })?;
        let mut raws: Vec<Option<Bytes>> = vec![None; refs.len()];
        let mut reads: Vec<usize> = Vec::new();
        {
            let tail = self.tail.borrow();
            let ahead = self.records.borrow();
            let mut last: Option<(u64, Bytes)> = None;
            for (j, r) in refs.iter().enumerate() {
                if let Some(b) = ahead.get(r.location_position + u64::from(r.location_offset)) {
                    raws[j] = Some(b);
                    continue;
                }
                if last.as_ref().is_none_or(|(p, _)| *p != r.location_position) {
                    last = tail
                        .get(r.location_position)
                        .map(|b| (r.location_position, b));
                }
                match &last {
                    Some((_, b)) => {
                        let (at, len) = (r.location_offset as usize, r.len as usize);
                        raws[j] = b.get(at..at + len).map(|_| b.slice(at..at + len));
                    }
                    None => reads.push(j),
                }
            }
        }
        let got = futures_util::future::try_join_all(reads.iter().map(|&j| {
            let r = refs[j];
            async move {
                match self
                    .log
                    .read(
                        r.location_position + u64::from(r.location_offset),
                        r.len as usize,
                    )
                    .await
                {
                    Ok(b) => Ok(Some(b)),
                    Err(LogError::NotFound(_)) => Ok(None),
                    Err(e) => Err(StoreError::from(e)),
                }
            }
        }))
        .await?;
        // Read ahead, or in the tail cache: checked already; read now:
        // checked here.
        let mut from_disk = vec![false; refs.len()];
        for (&j, b) in reads.iter().zip(got) {
            raws[j] = b;
            from_disk[j] = true;
        }
        let chosen: Vec<batch::ViewRecord<'_>> = refs
            .iter()
            .zip(&raws)
            .enumerate()
            .filter_map(|(j, (r, raw))| {
                let raw = raw.as_ref()?;
                if (from_disk[j] || raw.len() != r.len as usize) && crc32fast::hash(raw) != r.crc {
                    tracing::error!(
                        position = r.location_position,
                        offset = r.location_offset,
                        "a fired scheduled message's record fails its CRC; left out"
                    );
                    return None;
                }
                Some(batch::ViewRecord {
                    delta: j as u32,
                    origin_position: r.origin_position,
                    origin_index: r.origin_index,
                    raw: &raw[..],
                })
            })
            .collect();
        Ok(batch::build_view(stored, h.record_count, &chosen))
    }

    /// Reads a queue's batches back from its last until `find` answers
    /// for one (a journal's last complete generation).
    pub async fn find_back<T>(
        &self,
        queue: QueueId,
        mut find: impl FnMut(&Bytes) -> Option<T>,
    ) -> Result<Option<T>, StoreError> {
        for i in (0..self.batch_count(queue)).rev() {
            let (_, b) = self.batch_by_index(queue, i).await?;
            if let Some(t) = find(&b) {
                return Ok(Some(t));
            }
        }
        Ok(None)
    }

    /// Whether a batch holding a record of priority above 0 overlaps the
    /// offsets `[from, to)` of a queue.
    pub fn has_prioritized(&self, queue: QueueId, from: u64, to: u64) -> bool {
        let queues = self.queues.borrow();
        let Some(q) = queues.get(&queue.0) else {
            return false;
        };
        let i = q.prioritized.partition_point(|&(_, end)| end <= from);
        q.prioritized.get(i).is_some_and(|&(base, _)| base < to)
    }

    /// The priorities of the records of priority above 0 at offsets
    /// `[from, to)` of a queue (reading only the batches that hold any, at
    /// most `max_bytes` of them, at least one), and the offset up to which
    /// they are known (`to` unless the budget ran out first).
    pub async fn priorities(
        &self,
        queue: QueueId,
        from: u64,
        to: u64,
        max_bytes: u64,
    ) -> Result<(u64, Vec<(u64, u8)>), StoreError> {
        let (entries, known_to) = {
            let queues = self.queues.borrow();
            let q = queues
                .get(&queue.0)
                .ok_or(StoreError::UnknownQueue(queue.0))?;
            let mut entries: Vec<IndexEntry> = Vec::new();
            let mut bytes = 0u64;
            let mut known_to = to;
            let i = q.prioritized.partition_point(|&(_, end)| end <= from);
            for &(base, _) in q.prioritized.range(i..) {
                if base >= to {
                    break;
                }
                let Some(e) = q.consume.find(base).and_then(|j| q.consume.get(j)) else {
                    continue;
                };
                if !entries.is_empty() && bytes + u64::from(e.read_len()) > max_bytes {
                    known_to = base.max(from);
                    break;
                }
                bytes += u64::from(e.read_len());
                entries.push(*e);
            }
            (entries, known_to)
        };
        let batches = self.read_entries(&entries).await?;
        let mut out = Vec::new();
        for b in &batches {
            let Ok(h) = BatchHeader::parse(b) else {
                continue;
            };
            for r in RecordIter::new(b).map_while(Result::ok) {
                let o = h.base_offset + u64::from(r.index);
                if r.priority > 0 && (from..known_to).contains(&o) {
                    out.push((o, r.priority));
                }
            }
        }
        Ok((known_to, out))
    }

    /// Reads ahead the records at `(log position, bytes, batch position,
    /// CRC-32)` (sorted by position), checking each, coalescing neighbours into reads of up to 1 MiB, into
    /// the record cache, while it has room; records whose batch is in the
    /// tail cache are copied from it, those already read ahead skipped.
    /// How many were read or copied.
    pub async fn read_ahead(&self, records: &[(u64, u32, u64, u32)]) -> Result<usize, StoreError> {
        /// Largest read, and largest gap a read spans between records.
        const READ_BYTES_MAX: u64 = 1 << 20;
        const GAP_BYTES_MAX: u64 = 64 << 10;
        // (start, end, records in it as (position, bytes))
        type Range = (u64, u64, Vec<(u64, u32)>);
        let mut ranges: Vec<Range> = Vec::new();
        let crc_of: crate::schedule::PositionMap<u64, u32> =
            records.iter().map(|&(at, _, _, crc)| (at, crc)).collect();
        let mut n = 0;
        {
            let tail = self.tail.borrow();
            let mut ahead = self.records.borrow_mut();
            let mut room = 0u64;
            for &(at, len, batch, crc) in records {
                if ahead.get(at).is_some() {
                    continue;
                }
                room += u64::from(len);
                if !ahead.has_room(room) {
                    break;
                }
                // A batch still in the tail cache may well have left it by
                // the time the record fires (the fires' own references push
                // it out): its record is copied now, without a read.
                if let Some(b) = tail.get(batch) {
                    let from = (at - batch) as usize;
                    if let Some(r) = b
                        .get(from..from + len as usize)
                        .filter(|r| crc32fast::hash(r) == crc)
                    {
                        ahead.insert(at, Bytes::copy_from_slice(r));
                        // Held now: it counts in the cache, not in `room`.
                        room -= u64::from(len);
                        n += 1;
                        continue;
                    }
                }
                let end = at + u64::from(len);
                match ranges.last_mut() {
                    Some(r)
                        if at >= r.1
                            && at - r.1 <= GAP_BYTES_MAX
                            && end - r.0 <= READ_BYTES_MAX =>
                    {
                        r.1 = end;
                        r.2.push((at, len));
                    }
                    _ => ranges.push((at, end, vec![(at, len)])),
                }
            }
        }
        let reads = futures_util::future::join_all(
            ranges
                .iter()
                .map(|(start, end, _)| self.log.read(*start, (end - start) as usize)),
        )
        .await;
        let mut ahead = self.records.borrow_mut();
        for ((start, _, recs), got) in ranges.iter().zip(reads) {
            // A range that cannot be read is read again when it fires.
            let Ok(b) = got else {
                continue;
            };
            // Each record copied out, so the read's buffer (with the bytes
            // between records) is not held.
            for &(at, len) in recs {
                let from = (at - start) as usize;
                // Checked here, once (readers trust what it holds).
                if let Some(r) = b
                    .get(from..from + len as usize)
                    .filter(|r| crc_of.get(&at) == Some(&crc32fast::hash(r)))
                {
                    ahead.insert(at, Bytes::copy_from_slice(r));
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Index entries of reference batches stored at or after `position`,
    /// over every queue (the timer's recovery: fires since its snapshot).
    pub fn references_since(&self, position: LogPosition) -> Vec<(QueueId, IndexEntry)> {
        let queues = self.queues.borrow();
        let mut out: Vec<(QueueId, IndexEntry)> = queues
            .iter()
            .flat_map(|(&id, q)| {
                q.consume
                    .since_position(position.0)
                    .filter(|e| e.is_reference())
                    .map(move |e| (QueueId(id), *e))
            })
            .collect();
        out.sort_by_key(|(_, e)| e.position);
        out
    }

    /// The stored batch of the timer queue starting at `position` (a
    /// scheduled or carried batch), if the index has one there.
    pub async fn timer_batch_at(&self, position: LogPosition) -> Result<Option<Bytes>, StoreError> {
        let e = {
            let queues = self.queues.borrow();
            queues.get(&TIMER_QUEUE.0).and_then(|q| {
                q.consume
                    .find_position(position.0)
                    .and_then(|i| q.consume.get(i).copied())
            })
        };
        match e {
            Some(e) => self
                .batch_at_entry(e.position, e.len as usize)
                .await
                .map(Some),
            None => Ok(None),
        }
    }

    /// The batch an index entry points at: from the tail cache, else read
    /// and checked: MAC and CRC under its segment's key, and stamped for
    /// this very position (a misdirected read can return another genuine
    /// batch).
    async fn batch_at_entry(&self, position: u64, len: usize) -> Result<Bytes, StoreError> {
        if let Some(b) = self.tail.borrow().get(position) {
            return Ok(b);
        }
        let b = self.log.read(position, len).await?;
        let key = self
            .log
            .key_at(position)
            .ok_or(LogError::NotFound(position))?;
        let corrupt = |reason: String| StoreError::Corrupt { position, reason };
        let h = batch::check_stored(&b, &key).map_err(|e| corrupt(e.to_string()))?;
        if h.log_position != position {
            return Err(corrupt(format!(
                "read back the batch stamped for position {}",
                h.log_position
            )));
        }
        Ok(b)
    }

    /// Batches indexed in a queue (visible or not).
    pub fn batch_count(&self, queue: QueueId) -> usize {
        self.queues
            .borrow()
            .get(&queue.0)
            .map_or(0, |q| q.consume.len())
    }

    /// The `i`-th indexed batch of a queue (oldest first) and its log
    /// position, read and checked like any read.
    pub async fn batch_by_index(
        &self,
        queue: QueueId,
        i: usize,
    ) -> Result<(LogPosition, Bytes), StoreError> {
        let e = {
            let queues = self.queues.borrow();
            let q = queues
                .get(&queue.0)
                .ok_or(StoreError::UnknownQueue(queue.0))?;
            *q.consume.get(i).ok_or(StoreError::OffsetOutOfRange {
                offset: i as u64,
                earliest: 0,
                latest: q.consume.len() as u64,
            })?
        };
        let b = self.batch_at_entry(e.position, e.len as usize).await?;
        Ok((LogPosition(e.position), b))
    }

    /// The first offset at or after `offset` that holds a message (offsets
    /// in a gap left by a crash, or deleted by retention, hold none);
    /// `None` past the last appended batch.
    pub fn first_offset_from(&self, queue: QueueId, offset: QueueOffset) -> Option<QueueOffset> {
        let queues = self.queues.borrow();
        let q = queues.get(&queue.0)?;
        let i = q.consume.find(offset.0)?;
        q.consume
            .get(i)
            .map(|e| QueueOffset(e.base_offset.max(offset.0)))
    }

    /// Log position of the batch holding `offset` of a queue (or the first
    /// after it).
    pub fn position_of(&self, queue: QueueId, offset: QueueOffset) -> Option<LogPosition> {
        let queues = self.queues.borrow();
        let q = queues.get(&queue.0)?;
        let i = q.consume.find(offset.0)?;
        q.consume.get(i).map(|e| LogPosition(e.position))
    }

    /// The visible stored batch starting at `position` (message lookup).
    ///
    /// A position is accepted only where the log's own index says a batch
    /// starts: the 80-byte header there must carry a MAC under the
    /// segment's key (a producer's bytes never do) and name a queue whose
    /// index has a batch at exactly this position; only then is the
    /// batch's length, from the index, read. A forged id costs one header
    /// read.
    pub async fn batch_at(&self, position: LogPosition) -> Result<Bytes, StoreError> {
        let position = position.0;
        let not_found = || StoreError::Log(LogError::NotFound(position));
        let cached = self.tail.borrow().get(position);
        let head = match &cached {
            Some(b) => b.slice(..BATCH_HEADER_BYTES),
            None => {
                if position >= self.log.written_position() {
                    return Err(not_found());
                }
                let key = self.log.key_at(position).ok_or_else(not_found)?;
                let head = self.log.read(position, BATCH_HEADER_BYTES).await?;
                let h = batch::check_stored_header(&head, &key).map_err(|_| not_found())?;
                if h.log_position != position {
                    return Err(not_found());
                }
                head
            }
        };
        let h = BatchHeader::parse(&head).map_err(|_| not_found())?;
        let entry = {
            let queues = self.queues.borrow();
            let q = queues.get(&h.queue_id).ok_or_else(not_found)?;
            let entry = q
                .consume
                .find(h.base_offset)
                .and_then(|i| q.consume.get(i).copied())
                .filter(|e| e.position == position && e.base_offset == h.base_offset)
                .ok_or_else(not_found)?;
            if entry.base_offset >= q.visible.get() {
                return Err(not_found());
            }
            entry
        };
        let b = match cached {
            Some(b) => b,
            None => self.batch_at_entry(position, entry.len as usize).await?,
        };
        self.serve(b, entry.is_reference()).await
    }

    /// The checkpoint of what is durable now; with `clean_end`, of a clean
    /// stop (exact offsets, no reservation ahead).
    fn checkpoint(&self, clean_end: Option<u64>) -> Checkpoint {
        let synced = self.log.synced_position();
        let queues = self.queues.borrow();
        let entries = queues
            .iter()
            .map(|(&id, q)| {
                let next = q
                    .consume
                    .next_offset_at(synced)
                    .or(q.consume.first_offset())
                    .unwrap_or(q.next_offset)
                    .max(q.floor);
                let reserved = match (q.reserve, clean_end) {
                    (ReserveKind::None, _) => 0,
                    (_, Some(_)) => q.next_offset,
                    (_, None) => q
                        .reserved_stored
                        .max(q.next_offset + q.grant(self.cfg.reserve_offsets_min)),
                };
                (
                    id,
                    QueueCheckpoint {
                        reserve: q.reserve,
                        next_offset: next,
                        offset_reserved: reserved,
                    },
                )
            })
            .collect();
        Checkpoint {
            synced_position: synced,
            clean_end,
            boot_id: self.io.boot_id(),
            storage_failed: self.log.failed().is_some(),
            queues: entries,
        }
    }

    /// Stores the checkpoint; on success every queue's reservation is what
    /// it says.
    async fn store_checkpoint(&self, clean_end: Option<u64>) -> Result<(), StoreError> {
        let stored = self
            .checkpoint_file
            .store_with(|| self.checkpoint(clean_end))
            .await;
        match stored {
            Ok(None) => Ok(()),
            Ok(Some(cp)) => {
                let mut queues = self.queues.borrow_mut();
                for (id, c) in &cp.queues {
                    if let Some(q) = queues.get_mut(id) {
                        q.reserved_stored = q.reserved_stored.max(c.offset_reserved);
                        q.appended_since_checkpoint = 0;
                    }
                }
                drop(queues);
                *self.checkpoint_full.borrow_mut() = None;
                bump(&self.checkpoint_stored);
                Ok(())
            }
            Err(f) if f.kind == IoKind::NoSpace => {
                *self.checkpoint_full.borrow_mut() = Some(f.clone());
                Err(LogError::Full(f).into())
            }
            Err(f) => Err(LogError::Failed(f).into()),
        }
    }

    /// Checkpoints and index snapshots, every interval or when asked.
    async fn keeper(self: Rc<Self>) {
        // Taken before each round's work, so a request made during it gets
        // the next round at once.
        let mut seen = self.keeper_work.get();
        loop {
            // A failure wakes it too: its mark should be stored at once.
            let timer = futures_lite::future::or(
                self.io.sleep(self.cfg.checkpoint_interval),
                self.log.wait_failed(),
            );
            self.keeper_work.wait_for_within(seen + 1, timer).await;
            seen = self.keeper_work.get();
            if self.closing.get() {
                return;
            }
            if self.log.failed().is_some() {
                // Mark the failure for recovery (the device may have lost
                // completed writes), once, and stop.
                if let Err(e) = self.store_checkpoint(None).await {
                    tracing::error!(
                        shard = self.cfg.log.shard,
                        "cannot mark the storage failure in the checkpoint: {e}"
                    );
                }
                self.failure_marked.set(true);
                bump(&self.checkpoint_stored);
                return;
            }
            self.write_snapshots(false).await;
            match self.store_checkpoint(None).await {
                Ok(()) => {}
                Err(StoreError::Log(LogError::Full(f))) => tracing::warn!(
                    shard = self.cfg.log.shard,
                    "cannot grow the checkpoint, the disk is full: {f}"
                ),
                Err(StoreError::Log(LogError::Failed(f))) => {
                    // The device failed: the shard stops taking writes, and
                    // waiters for a reservation get the failure.
                    self.log.fail_external(f);
                    bump(&self.checkpoint_stored);
                    return;
                }
                Err(e) => tracing::error!(shard = self.cfg.log.shard, "checkpoint failed: {e}"),
            }
            if let Ok(free) = self.io.free_bytes(&self.cfg.log.dir).await {
                self.free_bytes.set(Some(free));
            }
        }
    }

    /// Appends index snapshot blocks for batches now synced (when enough
    /// wait, or `all`); seals segments the log has left behind.
    async fn write_snapshots(&self, all: bool) {
        let synced = self.log.synced_position();
        let segments = self.log.segments();
        for (i, seg) in segments.iter().enumerate() {
            let is_active = i + 1 == segments.len();
            if self.log.key_at(seg.base).is_none() {
                // Retention deleted it while an earlier block was written.
                continue;
            }
            let (entries, from, covered, sealed, file) = {
                let mut snaps = self.snapshots.borrow_mut();
                let snaps = &mut *snaps;
                if snaps.broken.contains(&seg.base) {
                    continue;
                }
                let state = snaps
                    .segments
                    .entry(seg.base)
                    .or_insert_with(|| SnapshotSegment {
                        file: None,
                        covered_end: seg.data_start(),
                        sealed: false,
                    });
                if state.sealed {
                    continue;
                }
                // Pending entries are in log order: while an earlier
                // segment's wait at the front, this one gets nothing (it
                // may not claim coverage of batches it does not list).
                if snaps.pending.front().is_some_and(|e| e.position < seg.base) {
                    continue;
                }
                let in_seg = snaps
                    .pending
                    .iter()
                    .take_while(|e| e.position < seg.end())
                    .count();
                let sealed_now = !is_active && synced >= seg.data_end();
                let covered = if sealed_now {
                    seg.data_end()
                } else {
                    synced.clamp(seg.data_start(), seg.data_end())
                };
                let n = snaps
                    .pending
                    .iter()
                    .take(in_seg)
                    .take_while(|e| e.end() <= covered)
                    .count();
                let sealed = sealed_now && n == in_seg;
                let covered = match snaps.pending.get(n) {
                    Some(e) if n < in_seg => covered.min(e.position),
                    _ => covered,
                };
                let due = sealed
                    || n >= SNAPSHOT_BLOCK_ENTRIES_MIN
                    || covered >= state.covered_end + SNAPSHOT_LAG_BYTES_MAX
                    || (all && covered > state.covered_end);
                if !due {
                    continue;
                }
                let entries: Vec<BatchEntry> = snaps.pending.iter().take(n).copied().collect();
                (
                    entries,
                    state.covered_end,
                    covered,
                    sealed,
                    state.file.clone(),
                )
            };
            match self
                .append_snapshot(seg.base, file, &entries, from, covered, sealed)
                .await
            {
                Ok(file) => {
                    // Retention may have removed the segment meanwhile (and
                    // its index file, possibly before this created it).
                    let gone = !self.snapshots.borrow().segments.contains_key(&seg.base);
                    if gone {
                        drop(file);
                        let _ = self
                            .io
                            .remove(&index_path(&self.cfg.log.dir, seg.base))
                            .await;
                        continue;
                    }
                    let mut snaps = self.snapshots.borrow_mut();
                    let state = snaps.segments.get_mut(&seg.base).expect("checked");
                    state.file = Some(file);
                    state.covered_end = covered;
                    state.sealed = sealed;
                    let n = snaps
                        .pending
                        .iter()
                        .take(entries.len())
                        .take_while(|e| e.position >= seg.base && e.position < seg.end())
                        .count();
                    snaps.pending.drain(..n);
                }
                Err(f) if f.kind == IoKind::NoSpace => break,
                Err(f) => {
                    tracing::warn!(
                        shard = self.cfg.log.shard,
                        "index snapshot of segment {} given up: {f}",
                        seg.base
                    );
                    self.give_up_snapshot(seg.base, seg.end()).await;
                }
            }
        }
        let overflow = self.snapshots.borrow().pending.len() > INDEX_PENDING_ENTRIES_MAX;
        if overflow {
            let oldest = self.snapshots.borrow().pending.front().map(|e| e.position);
            if let Some(seg) =
                oldest.and_then(|p| segments.iter().find(|s| p >= s.base && p < s.end()))
            {
                self.give_up_snapshot(seg.base, seg.end()).await;
            }
        }
    }

    async fn append_snapshot(
        &self,
        base: u64,
        file: Option<(Rc<I::File>, u64)>,
        entries: &[BatchEntry],
        mut from: u64,
        covered: u64,
        sealed: bool,
    ) -> Result<(Rc<I::File>, u64), IoFailure> {
        let (file, mut at) = match file {
            Some(f) => f,
            None => {
                let path = index_path(&self.cfg.log.dir, base);
                let f = Rc::new(self.io.create(&path).await?);
                self.io.sync_dir(&self.cfg.log.dir).await?;
                (f, 0)
            }
        };
        let chunks: Vec<&[BatchEntry]> = entries.chunks(BLOCK_ENTRIES_MAX).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            let (cov, seal) = if last {
                (covered, sealed)
            } else {
                (chunk.last().expect("non-empty").end(), false)
            };
            at = index_snapshot::append(&self.io, &*file, at, chunk, from, cov, seal).await?;
            from = cov;
        }
        if chunks.is_empty() {
            at = index_snapshot::append(&self.io, &*file, at, &[], from, covered, sealed).await?;
        }
        Ok((file, at))
    }

    /// Stops snapshotting the segment `[base, end)`: its file goes,
    /// recovery scans it.
    async fn give_up_snapshot(&self, base: u64, end: u64) {
        {
            let mut snaps = self.snapshots.borrow_mut();
            snaps.broken.insert(base);
            snaps.segments.remove(&base);
            snaps
                .pending
                .retain(|e| e.position < base || e.position >= end);
        }
        let _ = self.io.remove(&index_path(&self.cfg.log.dir, base)).await;
    }

    /// Applies retention: checkpoints, then deletes whole old segments and
    /// their snapshots and trims the indexes. Returns the number deleted.
    /// Nothing at or past `keep_from` goes (the group journal's last
    /// generation: state that is not in a newer record).
    /// Where the segments `policy` would delete now end (ignoring pins):
    /// the cut retention wants. `None` when it would delete nothing.
    pub fn retention_cutoff(&self, policy: RetentionPolicy) -> Option<u64> {
        let all = self.log.segments();
        let wanted = segments_to_delete(&all, policy, self.io.now_ms(), u64::MAX);
        let last = *wanted.last()?;
        all.iter().find(|s| s.base == last).map(|s| s.end())
    }

    pub async fn apply_retention(
        &self,
        policy: RetentionPolicy,
        keep_from: LogPosition,
    ) -> Result<usize, StoreError> {
        // Only durable segments go (recovery must never find a hole where
        // a deleted segment's successor was lost): what the policy would
        // delete is synced first, then the durable prefix of it goes.
        let all = self.log.segments();
        let wanted = segments_to_delete(&all, policy, self.io.now_ms(), keep_from.0);
        let Some(&wanted_last) = wanted.last() else {
            return Ok(0);
        };
        if let Some(s) = all.iter().find(|s| s.base == wanted_last) {
            self.log.wait_synced(s.end()).await?;
        }
        let segments = self.log.segments();
        let mut bases = segments_to_delete(
            &segments,
            policy,
            self.io.now_ms(),
            self.log.synced_position().min(keep_from.0),
        );
        bases.retain(|&b| b <= wanted_last);
        let Some(&last) = bases.last() else {
            return Ok(0);
        };
        let cutoff = segments
            .iter()
            .find(|s| s.base == last)
            .map(|s| s.end())
            .expect("segment to delete exists");
        // Offsets of queues whose every batch goes must survive a restart.
        self.store_checkpoint(None).await?;
        {
            let mut queues = self.queues.borrow_mut();
            for q in queues.values_mut() {
                q.consume.trim_before(cutoff);
                let earliest = q.earliest();
                q.time.trim_before(earliest);
                while q
                    .prioritized
                    .front()
                    .is_some_and(|&(_, end)| end <= earliest)
                {
                    q.prioritized.pop_front();
                }
            }
            self.records.borrow_mut().remove_below(cutoff);
            let mut snaps = self.snapshots.borrow_mut();
            snaps.pending.retain(|e| e.position >= cutoff);
            for b in &bases {
                snaps.segments.remove(b);
                snaps.broken.remove(b);
            }
        }
        self.log
            .delete_segments(&bases)
            .await
            .map_err(LogError::Failed)?;
        for &b in &bases {
            let _ = self.io.remove(&index_path(&self.cfg.log.dir, b)).await;
        }
        Ok(bases.len())
    }

    /// Bytes held by the tail cache.
    pub fn tail_cache_bytes(&self) -> u64 {
        self.tail.borrow().bytes()
    }

    /// Free bytes on the data dir's filesystem, as the keeper last saw it.
    pub fn free_bytes(&self) -> Option<u64> {
        self.free_bytes.get()
    }

    /// Stops appends and makes everything appended durable, then stores
    /// the snapshots and a clean-stop checkpoint.
    pub async fn close(&self) -> Result<(), StoreError> {
        self.closing.set(true);
        bump(&self.keeper_work);
        self.log.close().await?;
        self.write_snapshots(true).await;
        self.store_checkpoint(Some(self.log.append_position()))
            .await
    }

    /// The index entries of a queue (tests check them against the log).
    #[cfg(test)]
    pub(crate) fn entries(&self, queue: QueueId) -> Vec<IndexEntry> {
        let queues = self.queues.borrow();
        let Some(q) = queues.get(&queue.0) else {
            return Vec::new();
        };
        (0..q.consume.len())
            .filter_map(|i| q.consume.get(i).copied())
            .collect()
    }

    /// The stored batch of an index entry, read and checked as stored (a
    /// reference batch is not resolved).
    pub async fn read_entry(&self, e: &IndexEntry) -> Result<Bytes, StoreError> {
        self.batch_at_entry(e.position, e.len as usize).await
    }
}

fn bump(w: &Watch) {
    w.advance(w.get() + 1);
}

#[cfg(test)]
mod tests;
