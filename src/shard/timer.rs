//! The shard's timer: scheduled messages over the shard's own log (no
//! cross-core hop: a queue's scheduled messages are kept and fired by the
//! shard that owns the queue).
//!
//! - **Schedule.** A produced batch with a record due later is stored whole
//!   in the timer queue ([`TIMER_QUEUE`]) as a scheduled batch (target
//!   queue in its header), at the topic's durability level; each record
//!   becomes a pending entry of the [`TimerState`] (about 80 bytes of
//!   memory, never the payload).
//! - **Fire.** [`run`] sleeps until the wheel's next wake; entries due are
//!   stored, per target queue and in due order, as reference batches (one
//!   small record per message pointing at where its record is stored),
//!   appended to the queue like any produce (offsets assigned now, visible
//!   once durable at the topic's level). A reference is the only record of
//!   a fire, so after a crash a message has fired exactly when its
//!   reference was kept.
//! - **Cancel.** A `cancelled` journal record, at the topic's level.
//! - **Generations.** Every 16 MiB of timer-queue and reference bytes (or
//!   the size of the pending set, if larger), and before retention when the
//!   last one lies in a segment retention would delete, a snapshot of every
//!   pending entry and pin is written between `begin` and `end` markers;
//!   recovery reads the last complete one and replays what came after, so
//!   restart time follows the pending set and the recent journal, not how
//!   far ahead messages are due.
//! - **Retention.** Before retention deletes segments, pending entries
//!   stored there are *carried*: their records copied to the log's head
//!   (a carried batch, then `carried` journal records), so a message due in
//!   a year survives a 7-day retention. Retention keeps the segments of
//!   pending records and of records that kept references point at.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;

use super::metadata::Metadata;
use crate::batch::{self, BatchBuilder, BatchHeader, Record, RecordIter};
use crate::ids::{LogPosition, QueueId, QueueOffset, TIMER_QUEUE};
use crate::protocol::Durability;
use crate::runtime::{now_ms, Watch};
use crate::schedule::entry::TimerEntry;
use crate::schedule::{Pending, RecordAt, Timer, TimerState};
use crate::storage::{AppendReceipt, QueueStore, StoreError, UringIo};

/// A generation is written once this many bytes of the timer queue and of
/// references were appended since the last (or the pending set's snapshot
/// size, if larger).
pub const TIMER_GENERATION_BYTES: u64 = 16 << 20;
/// Largest batch the timer appends (journal records, references, carried
/// records), so its batches are admitted beside producers' when the disk
/// is behind.
pub const TIMER_BATCH_BYTES_MAX: usize = 64 << 10;
/// Bytes of one reference record in a batch (its framing and payload).
const REFERENCE_RECORD_BYTES: usize = batch::RECORD_FIXED_BYTES + 4 + batch::REFERENCE_BYTES;
/// Room a journal batch keeps for its header and a record's framing.
const BATCH_OVERHEAD_BYTES: usize = 256;
/// Bytes of the view one reference batch resolves to (the records it
/// points at, and the view's table): at most this or
/// `limits.batch_bytes_max`, whichever is smaller, unless one record alone
/// is larger. Reads count a reference batch at its view's size.
const REFERENCE_VIEW_BYTES_MAX: usize = 1 << 20;
/// How long the fire loop waits before trying again when the log did not
/// take its references.
const FIRE_RETRY_MS: u64 = 20;
/// How far ahead of their due time the records of scheduled messages are
/// read into memory (`storage::record_cache`), and how often: a burst due
/// together is read in log order, in large reads, before it fires.
pub const READ_AHEAD_MS: u64 = 2000;
const READ_AHEAD_EVERY_MS: u64 = 100;

/// What recovery found.
#[derive(Debug, Default)]
pub struct TimerRecoveryReport {
    pub pending: usize,
    pub replayed: u64,
    pub references: u64,
    pub dropped: usize,
    pub millis: u64,
}

impl std::fmt::Display for TimerRecoveryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "timer: {} scheduled pending ({} journal records and {} references replayed, {} for deleted queues dropped) in {} ms",
            self.pending, self.replayed, self.references, self.dropped, self.millis
        )
    }
}

/// Counters and the lateness histogram of the timer.
pub struct TimerStats {
    pub scheduled: u64,
    pub fired: u64,
    pub cancelled: u64,
    pub carried: u64,
    pub dropped: u64,
    /// Fire time − due time, ms (the reference's append; visibility then
    /// waits for the topic's durability level).
    pub lateness_ms: Histogram<u64>,
}

/// The outcome of a cancel.
#[derive(Debug, PartialEq, Eq)]
pub enum Cancelled {
    /// It was pending; it will never be delivered.
    Done,
    /// Not pending: unknown, delivered already, or cancelled before.
    NotPending,
}

/// One shard's timer.
pub struct TimerEngine {
    state: RefCell<TimerState>,
    /// Due entries the log has not taken as references yet, in due order.
    firing: RefCell<VecDeque<Timer>>,
    kick: Watch,
    /// When the fire loop means to wake next.
    wake_ms: Cell<u64>,
    generation: Cell<u64>,
    /// Log position of the last durable generation's begin.
    snapshot_begin: Cell<Option<LogPosition>>,
    /// Timer-queue and reference bytes since the last generation began.
    journal_bytes: Cell<u64>,
    force_generation: Cell<bool>,
    snapshotting: Cell<bool>,
    /// Records of entries due before this were read ahead (or tried).
    read_ahead_until: Cell<u64>,
    reading_ahead: Cell<bool>,
    batch_bytes_max: usize,
    /// `limits.batch_bytes_max`: what a reference batch's view stays within.
    view_bytes_max: usize,
    pub delay_max_ms: u64,
    pub pending_max: u64,
    pub stats: RefCell<TimerStats>,
}

/// Recovery's view of a timer-queue record after the generation it starts
/// from.
enum Replayed {
    /// A scheduled batch: where it is stored, when it was appended.
    Scheduled(LogPosition, i64, Bytes),
    Entry(TimerEntry),
}

impl TimerEngine {
    fn new(now: u64, batch_bytes_max: usize, delay_max_ms: u64, pending_max: u64) -> TimerEngine {
        TimerEngine {
            state: RefCell::new(TimerState::new(now)),
            firing: RefCell::new(VecDeque::new()),
            kick: Watch::new(0),
            wake_ms: Cell::new(0),
            generation: Cell::new(0),
            snapshot_begin: Cell::new(None),
            journal_bytes: Cell::new(0),
            force_generation: Cell::new(false),
            snapshotting: Cell::new(false),
            read_ahead_until: Cell::new(0),
            reading_ahead: Cell::new(false),
            batch_bytes_max: batch_bytes_max.min(TIMER_BATCH_BYTES_MAX),
            view_bytes_max: batch_bytes_max,
            delay_max_ms,
            pending_max,
            stats: RefCell::new(TimerStats {
                scheduled: 0,
                fired: 0,
                cancelled: 0,
                carried: 0,
                dropped: 0,
                lateness_ms: Histogram::new_with_bounds(1, 86_400_000, 2).expect("static bounds"),
            }),
        }
    }

    /// Rebuilds the pending set from the timer queue (before the shard
    /// serves): the last complete generation, then every record after its
    /// begin, then the references stored since (fired: no longer pending).
    pub async fn recover(
        store: &QueueStore<UringIo>,
        meta: &Metadata,
        shard: u16,
        batch_bytes_max: usize,
        delay_max_ms: u64,
        pending_max: u64,
    ) -> Result<(TimerEngine, TimerRecoveryReport), StoreError> {
        let t0 = std::time::Instant::now();
        store.ensure_queue(TIMER_QUEUE);
        let now = now_ms().max(0) as u64;
        let engine = TimerEngine::new(now, batch_bytes_max, delay_max_ms, pending_max);
        let mut report = TimerRecoveryReport::default();
        // The last complete generation, read back from the end (only
        // journal batches hold entries).
        let last: Option<(u64, u64)> = store
            .find_back(TIMER_QUEUE, |b| {
                if BatchHeader::parse(b).map_or(true, |h| h.attributes != 0) {
                    return None;
                }
                RecordIter::new(b)
                    .flatten()
                    .filter_map(|r| match TimerEntry::decode(r.payload) {
                        Ok(TimerEntry::End {
                            generation,
                            begin_offset,
                        }) => Some((generation, begin_offset)),
                        _ => None,
                    })
                    .last()
            })
            .await?;
        let o = store.offsets(TIMER_QUEUE)?;
        let from = last.map_or(o.earliest, |(_, b)| b).max(o.earliest);
        let begin_position = match last {
            Some(_) => store
                .position_of(TIMER_QUEUE, QueueOffset(from))
                .unwrap_or(LogPosition(0)),
            None => LogPosition(0),
        };
        // Everything from the begin on: the generation's snapshot parts
        // are its base state; every other record applies on top, in order.
        let mut replay: Vec<Replayed> = Vec::new();
        let mut offset = from;
        let mut state = TimerState::new(now);
        let mut generation = 0;
        while offset < o.latest {
            let (_, batches) = store
                .read(TIMER_QUEUE, QueueOffset(offset), 4 << 20)
                .await?;
            if batches.is_empty() {
                break;
            }
            for b in batches {
                let Ok(h) = BatchHeader::parse(&b) else {
                    continue;
                };
                offset = offset.max(h.next_offset());
                if h.base_offset < from {
                    continue;
                }
                if h.attributes == batch::BATCH_ATTR_SCHEDULED {
                    replay.push(Replayed::Scheduled(
                        LogPosition(h.log_position),
                        h.append_time_ms,
                        b,
                    ));
                    continue;
                }
                if h.attributes != 0 {
                    continue; // carried records: their `carried` entries follow
                }
                for r in RecordIter::new(&b).flatten() {
                    report.replayed += 1;
                    match TimerEntry::decode(r.payload) {
                        Ok(TimerEntry::Snapshot {
                            generation: g,
                            timers,
                        }) if Some(g) == last.map(|l| l.0) => {
                            for t in timers {
                                state.restore(t);
                            }
                        }
                        Ok(TimerEntry::Pins {
                            generation: g,
                            pins,
                        }) if Some(g) == last.map(|l| l.0) => {
                            for (b, m) in pins {
                                state.restore_pin(b, m);
                            }
                        }
                        Ok(
                            TimerEntry::Begin { generation: g }
                            | TimerEntry::End { generation: g, .. },
                        ) => {
                            generation = generation.max(g);
                        }
                        Ok(e @ (TimerEntry::Cancelled { .. } | TimerEntry::Carried { .. })) => {
                            replay.push(Replayed::Entry(e));
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(shard, "timer journal: {e}"),
                    }
                }
            }
        }
        for r in replay {
            match r {
                Replayed::Scheduled(position, at, b) => {
                    schedule_records(&mut state, position, at, &b);
                }
                Replayed::Entry(TimerEntry::Cancelled { origin }) => {
                    state.remove(origin);
                }
                Replayed::Entry(TimerEntry::Carried { origin, location }) => {
                    state.carried(origin, location);
                }
                Replayed::Entry(_) => {}
            }
        }
        // Fired since the generation began: their references say so. With
        // nothing in the timer queue nothing can be pending, and no record
        // is left for a reference to pin: a broker that never scheduled
        // skips the scan of every queue's index.
        let references = if store.batch_count(TIMER_QUEUE) == 0 {
            Vec::new()
        } else {
            store.references_since(begin_position)
        };
        for (_, e) in references {
            let b = store.read_entry(&e).await?;
            report.references += 1;
            let mut min_location = u64::MAX;
            for r in RecordIter::new(&b).flatten() {
                if let Some(x) = batch::Reference::decode(r.payload) {
                    state.remove(RecordAt {
                        position: x.origin_position,
                        index: x.origin_index,
                    });
                    min_location = min_location.min(x.location_position);
                }
            }
            if min_location != u64::MAX {
                state.referenced(e.position, min_location);
            }
        }
        let owned: std::collections::HashSet<u32> = meta
            .queues_of_shard(shard)
            .into_iter()
            .map(|q| q.0)
            .collect();
        report.dropped = state.retain_targets(|q| owned.contains(&q));
        report.pending = state.len();
        report.millis = t0.elapsed().as_millis() as u64;
        *engine.state.borrow_mut() = state;
        engine.generation.set(generation);
        engine.snapshot_begin.set(last.map(|_| begin_position));
        engine.journal_bytes.set(report.replayed * 48);
        Ok((engine, report))
    }

    /// Pending entries.
    pub fn pending(&self) -> usize {
        self.state.borrow().len()
    }

    /// Stores a produced batch holding scheduled records for `target`, at
    /// `level`, and makes its records pending (each due per its
    /// `deliver_at_ms` on the append's clock; a record not due later fires
    /// at once). The caller validated it and waited for the log's room.
    pub fn schedule(
        &self,
        store: &QueueStore<UringIo>,
        target: QueueId,
        produced: &[u8],
        level: Durability,
    ) -> Result<AppendReceipt, StoreError> {
        let mut b = BytesMut::from(produced);
        batch::mark_scheduled(&mut b, target.0);
        let h = BatchHeader::parse(&b).expect("a validated batch parses");
        let r = store.append(TIMER_QUEUE, &b, &h, batch::Summary::NONE, level)?;
        self.journal_bytes
            .set(self.journal_bytes.get() + b.len() as u64);
        let earliest = {
            let mut state = self.state.borrow_mut();
            let before = state.len();
            let earliest = schedule_records(&mut state, r.position, r.append_time_ms, &b);
            self.stats.borrow_mut().scheduled += (state.len() - before) as u64;
            earliest
        };
        if let Some(due) = earliest {
            self.kick_for(due);
        }
        Ok(r)
    }

    /// Wakes the fire loop if `due_ms` comes before its next wake.
    fn kick_for(&self, due_ms: u64) {
        if due_ms < self.wake_ms.get() {
            self.wake_ms.set(0);
            self.kick.advance(self.kick.get() + 1);
        }
    }

    /// Cancels the pending message `origin`: a `cancelled` record at
    /// `level`, answered once durable.
    pub async fn cancel(
        &self,
        store: &QueueStore<UringIo>,
        origin: RecordAt,
        level: Durability,
    ) -> Result<Cancelled, StoreError> {
        store
            .wait_appendable(4096, Duration::from_millis(1000))
            .await?;
        // From here to the append nothing yields: it cannot fire meanwhile.
        let removed = self.state.borrow_mut().remove(origin).or_else(|| {
            let mut f = self.firing.borrow_mut();
            let i = f.iter().position(|t| t.pending.origin == origin)?;
            f.remove(i)
        });
        let Some(t) = removed else {
            return Ok(Cancelled::NotPending);
        };
        match self.append_entries(store, &[TimerEntry::Cancelled { origin }], level) {
            Ok(r) => {
                self.stats.borrow_mut().cancelled += 1;
                store.wait_durable(&r, level).await?;
                Ok(Cancelled::Done)
            }
            Err(e) => {
                self.state.borrow_mut().restore(t);
                self.kick_for(t.due_ms);
                Err(e)
            }
        }
    }

    /// Appends journal entries to the timer queue (in batches of at most
    /// [`TIMER_BATCH_BYTES_MAX`]); the last batch's receipt.
    fn append_entries(
        &self,
        store: &QueueStore<UringIo>,
        entries: &[TimerEntry],
        level: Durability,
    ) -> Result<AppendReceipt, StoreError> {
        let now = now_ms();
        let mut last = None;
        let mut b = BatchBuilder::new();
        let mut flush = |b: BatchBuilder| -> Result<(), StoreError> {
            let bytes = b.finish();
            let h = BatchHeader::parse(&bytes).expect("a built batch parses");
            let r = store.append(TIMER_QUEUE, &bytes, &h, batch::Summary::NONE, level)?;
            self.journal_bytes
                .set(self.journal_bytes.get() + bytes.len() as u64);
            last = Some(r);
            Ok(())
        };
        let mut buf = Vec::new();
        for e in entries {
            buf.clear();
            e.encode(&mut buf);
            if !b.is_empty() && b.encoded_len() + buf.len() + 64 > self.batch_bytes_max {
                flush(std::mem::replace(&mut b, BatchBuilder::new()))?;
            }
            b.push(&Record {
                payload: Bytes::copy_from_slice(&buf),
                timestamp_ms: now,
                ..Record::default()
            });
        }
        if !b.is_empty() {
            flush(b)?;
        }
        Ok(last.expect("at least one entry"))
    }

    /// Stores the due entries waiting in `firing` as references, per target
    /// queue, in due order; what the log does not take stays first in
    /// line. False when some stay.
    fn store_references(&self, shard: &Rc<super::Shard>) -> bool {
        let due: Vec<Timer> = self.firing.borrow_mut().drain(..).collect();
        if due.is_empty() {
            return true;
        }
        // Per target queue, in due order.
        let mut by_queue: BTreeMap<u32, Vec<Timer>> = BTreeMap::new();
        for t in due {
            by_queue.entry(t.pending.target).or_default().push(t);
        }
        let store = &shard.store;
        let now = now_ms().max(0) as u64;
        let mut left: Vec<Timer> = Vec::new();
        let mut levels: HashMap<u32, Option<Durability>> = HashMap::new();
        for (q, timers) in by_queue {
            if !left.is_empty() {
                left.extend(timers);
                continue;
            }
            let level = *levels.entry(q).or_insert_with(|| {
                let meta = shard.metadata.borrow();
                meta.locate(QueueId(q))
                    .and_then(|(t, i)| meta.route(t, i).ok())
                    .filter(|r| r.shard == shard.id)
                    .map(|r| r.durability)
            });
            let Some(level) = level else {
                // The queue is gone (its topic deleted): nothing to deliver.
                self.stats.borrow_mut().dropped += timers.len() as u64;
                continue;
            };
            let view_max = REFERENCE_VIEW_BYTES_MAX.min(self.view_bytes_max);
            let mut rest = timers.as_slice();
            while !rest.is_empty() {
                // As many as the batch and its view may hold (at least one).
                let mut n = 0;
                let mut view = batch::BATCH_HEADER_BYTES;
                let per_batch =
                    ((self.batch_bytes_max - BATCH_OVERHEAD_BYTES) / REFERENCE_RECORD_BYTES).max(1);
                while n < rest.len().min(per_batch) {
                    let add = batch::VIEW_ENTRY_BYTES + rest[n].pending.len as usize;
                    if n > 0 && view + add > view_max {
                        break;
                    }
                    view += add;
                    n += 1;
                }
                let (chunk, after) = rest.split_at(n);
                let (bytes, tags, min_location) = reference_batch(chunk, view as u32);
                let h = BatchHeader::parse(&bytes).expect("a built batch parses");
                match store.append(QueueId(q), &bytes, &h, tags, level) {
                    Ok(r) => {
                        self.state
                            .borrow_mut()
                            .referenced(r.position.0, min_location);
                        self.journal_bytes
                            .set(self.journal_bytes.get() + bytes.len() as u64);
                        {
                            let mut s = self.stats.borrow_mut();
                            s.fired += chunk.len() as u64;
                            for t in chunk {
                                let _ = s.lateness_ms.record(now.saturating_sub(t.due_ms).max(1));
                            }
                        }
                        publish_when_durable(shard, r, level);
                        rest = after;
                    }
                    Err(StoreError::UnknownQueue(_)) => {
                        self.stats.borrow_mut().dropped += rest.len() as u64;
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(
                            shard = shard.id,
                            "timer: references wait for the log: {e}"
                        );
                        left.extend_from_slice(rest);
                        break;
                    }
                }
            }
        }
        if left.is_empty() {
            return true;
        }
        // Back first in line, in due order.
        left.sort_by_key(|t| (t.due_ms, t.pending.origin));
        let mut f = self.firing.borrow_mut();
        for t in left.into_iter().rev() {
            f.push_front(t);
        }
        false
    }

    /// Writes a generation when the journal grew enough (or one is
    /// forced), and moves the retention pin once it is durable.
    pub async fn maybe_write_generation(
        &self,
        store: &QueueStore<UringIo>,
    ) -> Result<(), StoreError> {
        let pending = self.state.borrow().len() as u64;
        let due = self.force_generation.get()
            || self.journal_bytes.get()
                >= TIMER_GENERATION_BYTES.max(pending * crate::schedule::entry::TIMER_BYTES as u64);
        if !due || self.snapshotting.get() {
            return Ok(());
        }
        self.snapshotting.set(true);
        let r = self.write_generation(store).await;
        self.snapshotting.set(false);
        r
    }

    /// Appends a generation's own records: they do not count towards the
    /// next generation (else a snapshot larger than
    /// [`TIMER_GENERATION_BYTES`] would call for the next one at once, and
    /// the timer would rewrite its pending set without end).
    fn append_uncounted(
        &self,
        store: &QueueStore<UringIo>,
        entries: &[TimerEntry],
    ) -> Result<AppendReceipt, StoreError> {
        let before = self.journal_bytes.get();
        let r = self.append_entries(store, entries, Durability::Fsync);
        self.journal_bytes.set(before);
        r
    }

    async fn write_generation(&self, store: &QueueStore<UringIo>) -> Result<(), StoreError> {
        let generation = self.generation.get() + 1;
        store.wait_appendable(4096, Duration::from_secs(1)).await?;
        let begin = self.append_entries(
            store,
            &[TimerEntry::Begin { generation }],
            Durability::Fsync,
        )?;
        // The state as of the begin marker (nothing yields in between):
        // the pending entries, and those due but not stored as references
        // yet (they are pending until their references are).
        let (timers, pins) = {
            let s = self.state.borrow();
            let mut timers = s.timers();
            timers.extend(self.firing.borrow().iter().copied());
            (timers, s.pins())
        };
        self.journal_bytes.set(0);
        self.force_generation.set(false);
        // Parts that fit one batch each, each appended once the log has
        // room for it.
        let room = self.batch_bytes_max - BATCH_OVERHEAD_BYTES;
        let timer_parts = timers
            .chunks((room / crate::schedule::entry::TIMER_BYTES).max(1))
            .map(|part| TimerEntry::Snapshot {
                generation,
                timers: part.to_vec(),
            });
        let pin_parts = pins
            .chunks((room / 16).max(1))
            .map(|part| TimerEntry::Pins {
                generation,
                pins: part.to_vec(),
            });
        for part in timer_parts.chain(pin_parts) {
            store
                .wait_appendable(self.batch_bytes_max as u64, Duration::from_secs(10))
                .await?;
            self.append_uncounted(store, &[part])?;
        }
        store.wait_appendable(4096, Duration::from_secs(10)).await?;
        let end = self.append_uncounted(
            store,
            &[TimerEntry::End {
                generation,
                begin_offset: begin.base_offset.0,
            }],
        )?;
        store.wait_durable(&end, Durability::Fsync).await?;
        self.generation.set(generation);
        self.snapshot_begin.set(Some(begin.position));
        Ok(())
    }

    /// Before retention deletes the log below `cutoff`: carries pending
    /// records stored there, renews a generation that lies there, and says
    /// how much of the log the timer still needs (`None`: nothing).
    pub async fn prepare_retention(
        &self,
        store: &QueueStore<UringIo>,
        cutoff: u64,
    ) -> Result<Option<u64>, StoreError> {
        let below = self.state.borrow().stored_below(cutoff);
        if !below.is_empty() {
            self.carry(store, below).await?;
        }
        let pending = !self.state.borrow().is_empty() || !self.firing.borrow().is_empty();
        if pending && self.snapshot_begin.get().is_none_or(|b| b.0 < cutoff) {
            self.force_generation.set(true);
            self.maybe_write_generation(store).await?;
        }
        let mut pin = self.state.borrow().retention_pin(cutoff);
        if let Some(f) = self
            .firing
            .borrow()
            .iter()
            .map(|t| t.location.position)
            .min()
        {
            pin = Some(pin.map_or(f, |p| p.min(f)));
        }
        if !self.state.borrow().is_empty() || !self.firing.borrow().is_empty() {
            let begin = self.snapshot_begin.get().map_or(0, |b| b.0);
            pin = Some(pin.map_or(begin, |p| p.min(begin)));
        }
        Ok(pin)
    }

    /// Retention deleted the log below `position`.
    pub fn removed_below(&self, position: u64) {
        self.state.borrow_mut().removed_below(position);
    }

    /// Copies the records of `timers` to the log's head (carried batches
    /// of the timer queue, then their `carried` records, durable), so
    /// retention can delete where they were.
    async fn carry(
        &self,
        store: &QueueStore<UringIo>,
        timers: Vec<Timer>,
    ) -> Result<(), StoreError> {
        let mut i = 0;
        while i < timers.len() {
            // One carried batch: records until the batch is full.
            let mut b = BatchBuilder::new();
            // (origin, byte offset in the carried batch): the same bytes,
            // so the record's CRC stands.
            let mut moved: Vec<(RecordAt, u32)> = Vec::new();
            let mut cache: Option<(u64, Bytes)> = None;
            while i < timers.len() {
                let t = timers[i];
                let at = t.location.position;
                if cache.as_ref().is_none_or(|(p, _)| *p != at) {
                    match store.timer_batch_at(LogPosition(at)).await? {
                        Some(bytes) => cache = Some((at, bytes)),
                        None => {
                            tracing::error!(
                                "timer: the record of scheduled message {:?} is not at {:?}; it stays pinned",
                                t.pending.origin,
                                t.location
                            );
                            i += 1;
                            continue;
                        }
                    }
                }
                let (_, bytes) = cache.as_ref().expect("read");
                let Some(r) = RecordIter::new(bytes)
                    .map_while(Result::ok)
                    .nth(t.location.index as usize)
                else {
                    i += 1;
                    continue;
                };
                // A batch holds what fits (at least one record).
                if !b.is_empty() && b.encoded_len() + r.raw.len() > self.batch_bytes_max {
                    break;
                }
                i += 1;
                let offset = b.encoded_len() as u32;
                b.push_raw(r.raw, r.timestamp_ms);
                moved.push((t.pending.origin, offset));
            }
            if moved.is_empty() {
                continue;
            }
            let mut bytes = BytesMut::from(&b.finish()[..]);
            store
                .wait_appendable(
                    (bytes.len() + self.batch_bytes_max) as u64,
                    Duration::from_secs(10),
                )
                .await?;
            mark(&mut bytes, batch::BATCH_ATTR_CARRIED);
            let h = BatchHeader::parse(&bytes).expect("a built batch parses");
            let r = store.append(
                TIMER_QUEUE,
                &bytes,
                &h,
                batch::Summary::NONE,
                Durability::Fsync,
            )?;
            let entries: Vec<TimerEntry> = moved
                .iter()
                .enumerate()
                .map(|(j, &(origin, offset))| TimerEntry::Carried {
                    origin,
                    location: crate::schedule::Location {
                        position: r.position.0,
                        index: j as u32,
                        offset,
                    },
                })
                .collect();
            let last = self.append_entries(store, &entries, Durability::Fsync)?;
            store.wait_durable(&last, Durability::Fsync).await?;
            let mut state = self.state.borrow_mut();
            for e in entries {
                if let TimerEntry::Carried { origin, location } = e {
                    state.carried(origin, location);
                }
            }
            self.stats.borrow_mut().carried += moved.len() as u64;
        }
        Ok(())
    }

    /// The pending entry of `origin` (also one due but not stored as a
    /// reference yet).
    pub fn get(&self, origin: RecordAt) -> Option<Timer> {
        self.state.borrow().get(origin).or_else(|| {
            self.firing
                .borrow()
                .iter()
                .find(|t| t.pending.origin == origin)
                .copied()
        })
    }

    /// Where the record of a pending message is now (its origin unless it
    /// was carried); `None` when not pending.
    pub fn location_of(&self, origin: RecordAt) -> Option<RecordAt> {
        self.state.borrow().get(origin).map(|t| t.location.record())
    }

    /// The timer's part of the stats document.
    pub fn stats_json(&self) -> serde_json::Value {
        let s = self.stats.borrow();
        let state = self.state.borrow();
        serde_json::json!({
            "pending": state.len(),
            "firing": self.firing.borrow().len(),
            "memory_bytes": state.memory_bytes(),
            "scheduled": s.scheduled,
            "fired": s.fired,
            "cancelled": s.cancelled,
            "carried": s.carried,
            "dropped": s.dropped,
            "generation": self.generation.get(),
            "read_ahead_until": self.read_ahead_until.get(),
            "fire_lateness": super::metrics::histogram_ms_json(&s.lateness_ms),
        })
    }
}

/// Makes the records of the scheduled batch `b` (stored at `position`,
/// appended at `append_time_ms`) pending; the earliest due time among
/// them.
fn schedule_records(
    state: &mut TimerState,
    position: LogPosition,
    append_time_ms: i64,
    b: &[u8],
) -> Option<u64> {
    let h = BatchHeader::parse(b).ok()?;
    let mut earliest = None::<u64>;
    for (i, r) in RecordIter::new(b).map_while(Result::ok).enumerate() {
        let due = batch::due_ms(r.deliver_at_ms, append_time_ms).max(0) as u64;
        let pending = Pending {
            origin: RecordAt {
                position: position.0,
                index: i as u32,
            },
            target: h.extra,
            tags: r.tag.map_or(0, |t| batch::tag_bloom(t.as_bytes())),
            len: r.raw.len() as u32,
            crc: crc32fast::hash(r.raw),
            offset: r.at as u32,
            priority: r.priority,
        };
        if state.schedule(due, pending) {
            earliest = Some(earliest.map_or(due, |e| e.min(due)));
        }
    }
    earliest
}

/// Sets a built batch's attributes and rewrites its body CRC.
fn mark(b: &mut [u8], attributes: u16) {
    b[52..54].copy_from_slice(&attributes.to_le_bytes());
    let crc = crc32fast::hash(&b[52..]);
    b[48..52].copy_from_slice(&crc.to_le_bytes());
}

/// A reference batch for `timers` (one target queue, due order) whose view
/// takes `view_len` bytes: its bytes, summary (the fired messages' tags and
/// highest priority) and the lowest record position it points at.
fn reference_batch(timers: &[Timer], view_len: u32) -> (Bytes, batch::Summary, u64) {
    let mut b = BatchBuilder::new();
    let (mut tags, mut min_location, mut max_priority) = (0u32, u64::MAX, 0u8);
    for t in timers {
        let r = batch::Reference {
            origin_position: t.pending.origin.position,
            origin_index: t.pending.origin.index,
            location_position: t.location.position,
            location_index: t.location.index,
            location_offset: t.location.offset,
            len: t.pending.len,
            crc: t.pending.crc,
            tags: t.pending.tags,
        };
        tags |= t.pending.tags;
        max_priority = max_priority.max(t.pending.priority);
        min_location = min_location.min(t.location.position);
        b.push_payload(t.pending.priority, t.due_ms as i64, &r.encode());
    }
    let mut bytes = BytesMut::from(&b.finish()[..]);
    bytes[60..64].copy_from_slice(&view_len.to_le_bytes());
    mark(&mut bytes, batch::BATCH_ATTR_REFERENCE);
    (
        bytes.freeze(),
        batch::Summary { tags, max_priority },
        min_location,
    )
}

/// Publishes a fired batch once durable at its level (at once when a
/// `memory` batch can be).
fn publish_when_durable(shard: &Rc<super::Shard>, r: AppendReceipt, level: Durability) {
    if level == Durability::Memory && shard.store.publish_if_ready(&r) {
        return;
    }
    let s = shard.clone();
    crate::runtime::spawn_local_into(
        async move {
            match s.store.wait_durable(&r, level).await {
                Ok(()) => s.store.publish(&r),
                Err(e) => tracing::warn!(shard = s.id, "timer: a fired batch was not stored: {e}"),
            }
        },
        shard.tq.data,
    )
    .expect("data queue")
    .detach();
}

/// Reads ahead, in the background, the records of the entries coming due
/// in the next [`READ_AHEAD_MS`] not read ahead yet.
fn read_ahead(shard: &Rc<super::Shard>, now: u64) {
    let t = &shard.timer;
    let from = t.read_ahead_until.get().max(now);
    let to = now + READ_AHEAD_MS;
    if t.reading_ahead.get() || to < from + READ_AHEAD_EVERY_MS {
        return;
    }
    t.read_ahead_until.set(to);
    let mut records: Vec<(u64, u32, u64, u32)> = t
        .state
        .borrow()
        .upcoming(from, to)
        .iter()
        .map(|u| {
            (
                u.location.position + u64::from(u.location.offset),
                u.pending.len,
                u.location.position,
                u.pending.crc,
            )
        })
        .collect();
    if records.is_empty() {
        return;
    }
    records.sort_unstable();
    t.reading_ahead.set(true);
    let s = shard.clone();
    crate::runtime::spawn_local_into(
        async move {
            if let Err(e) = s.store.read_ahead(&records).await {
                tracing::debug!(shard = s.id, "timer: read-ahead: {e}");
            }
            s.timer.reading_ahead.set(false);
        },
        shard.tq.data,
    )
    .expect("data queue")
    .detach();
}

/// The fire loop of a shard: sleeps until the wheel's next wake (or a
/// kick: an earlier due time was scheduled), fires what is due, and reads
/// ahead what comes due soon.
pub async fn run(shard: Rc<super::Shard>) {
    let t = &shard.timer;
    while !shard.stopping.get() {
        let now = now_ms().max(0) as u64;
        read_ahead(&shard, now);
        let fired = t.state.borrow_mut().advance(now);
        if !fired.is_empty() {
            t.firing.borrow_mut().extend(fired);
        }
        let all_stored = t.store_references(&shard);
        let next = t.state.borrow().next_wake();
        let sleep_ms = if all_stored {
            next.map_or(1000, |w| {
                w.saturating_sub(now_ms().max(0) as u64)
                    .min(READ_AHEAD_EVERY_MS)
            })
        } else {
            let _ = shard
                .store
                .wait_appendable(
                    t.batch_bytes_max as u64,
                    Duration::from_millis(FIRE_RETRY_MS),
                )
                .await;
            0
        };
        if sleep_ms == 0 {
            futures_lite::future::yield_now().await;
            continue;
        }
        let seen = t.kick.get();
        t.wake_ms.set(now_ms().max(0) as u64 + sleep_ms);
        t.kick
            .wait_for_within(
                seen + 1,
                crate::runtime::sleep(Duration::from_millis(sleep_ms)),
            )
            .await;
    }
}
