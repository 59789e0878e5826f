//! Consumer-group state of the queues one shard owns: the delivery window
//! of every (group, queue) in message delivery, the committed offsets of
//! queue delivery, and the group journal that makes both durable.
//!
//! **Journal.** Every change is an [`Entry`] appended to the shard's own
//! commit log, in the internal queue [`GROUP_JOURNAL_QUEUE`], at the
//! group's durability level (by default its topic's): the reply to an ack,
//! nack or commit waits for it. Deliveries are journaled alongside the
//! reply by default (or before it: `journal_deliveries = before`).
//!
//! **Generations.** Every [`GENERATION_JOURNAL_BYTES`] of journal (or
//! [`GENERATION_INTERVAL_MS`] after a change) the shard appends a
//! *generation*: a begin marker, a snapshot of every window, every
//! committed offset, an end marker naming the begin's journal offset, all
//! in one synchronous run (nothing interleaves). Once the end marker is
//! durable, retention may delete every segment before the begin
//! ([`GroupEngine::retention_pin`]). Recovery reads the journal backwards
//! to the last end marker, then replays forward from its begin: restart
//! work follows the journal since the last generation, not history.
//!
//! **Leases after a restart.** Deliveries journaled alongside may be lost
//! in a crash while their handles are out; after recovery every window
//! skips [`LEASE_RESTART_GAP`] lease numbers, and a fresh generation stores
//! that, so an old handle never matches a new delivery.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use bytes::Bytes;

use crate::batch::{BatchBuilder, BatchHeader, Record, RecordIter};
use crate::group::config::{Delivery, GroupConfig, StartFrom};
use crate::group::entry::Entry;
use crate::group::receipt::HandleKey;
use crate::group::window::{DeliveryWindow, MessageGroup};
use crate::ids::{GroupId, LogPosition, QueueId, QueueIndex, QueueOffset, GROUP_JOURNAL_QUEUE};
use crate::protocol::Durability;
use crate::runtime::Watch;
use crate::shard::metadata::Metadata;
use crate::storage::{AppendReceipt, QueueStore, StoreError, UringIo};

/// Lease numbers every window leaves unused after a restart (2^40: a
/// window handing out a million leases a second takes 12 days to use
/// them; the counter has room for 16 million restarts).
pub const LEASE_RESTART_GAP: u64 = 1 << 40;
/// A generation is written once this much journal was appended since the
/// last one: a restart replays at most about this much.
pub const GENERATION_JOURNAL_BYTES: u64 = 16 << 20;
/// ... or once this long passed since the last one with any change.
pub const GENERATION_INTERVAL_MS: i64 = 60_000;
/// Largest journal batch (a window snapshot bigger than this is a batch of
/// its own): small, so journal appends are admitted beside producers'
/// batches when the disk is behind, not starved by them.
pub const JOURNAL_BATCH_BYTES_MAX: usize = 64 << 10;
/// Journal entries that may wait for a busy or full log before receives
/// are refused (`busy`); acks and commits wait for room instead.
pub const OUTBOX_ENTRIES_MAX: usize = 1 << 20;
/// Most bytes read ahead to learn message groups (orderly windows).
pub const ORDERLY_READ_AHEAD_BYTES: u32 = 1 << 20;
/// File (in the shard directory) holding the receipt-handle key.
pub const HANDLE_KEY_FILE: &str = "handle.key";

/// The delivery window of one (group, queue) and what it needs to run.
pub struct Window {
    pub w: DeliveryWindow,
    pub topic: String,
    pub index: QueueIndex,
    /// Level acks and nacks are durable at before their reply.
    pub level: Durability,
    pub orderly: bool,
    /// Journal deliveries before replying.
    pub journal_before: bool,
}

/// Why group state could not be recovered.
#[derive(Debug, thiserror::Error)]
pub enum GroupRecoveryError {
    #[error("group journal: {0}")]
    Store(#[from] StoreError),
    #[error("receipt-handle key {path}: {error}")]
    Key { path: String, error: String },
}

/// What recovery found, for the startup line.
#[derive(Debug, Default, Clone, Copy)]
pub struct GroupRecoveryReport {
    pub windows: usize,
    pub offsets: usize,
    pub replayed: u64,
    /// Journal records that did not fit the state (skipped).
    pub inconsistent: u64,
}

impl std::fmt::Display for GroupRecoveryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "groups: {} windows, {} offsets, {} journal records replayed",
            self.windows, self.offsets, self.replayed
        )?;
        if self.inconsistent > 0 {
            write!(f, ", {} inconsistent skipped", self.inconsistent)?;
        }
        Ok(())
    }
}

/// Key of a committed offset: (group name, queue, broadcast instance or "").
pub type OffsetKey = (String, QueueId, String);

/// One shard's consumer-group state.
pub struct GroupEngine {
    pub key: HandleKey,
    /// Largest journal batch: [`JOURNAL_BATCH_BYTES_MAX`] or the broker's
    /// batch limit (which every segment fits), whichever is smaller.
    batch_bytes_max: usize,
    windows: RefCell<BTreeMap<(GroupId, QueueId), Window>>,
    offsets: RefCell<BTreeMap<OffsetKey, u64>>,
    generation: Cell<u64>,
    pin: Cell<LogPosition>,
    journal_bytes: Cell<u64>,
    last_generation_ms: Cell<i64>,
    /// A change could not be journaled: write a generation at the next tick.
    force_generation: Cell<bool>,
    /// Entries the log could not take yet (busy or full), in order: the
    /// next append stores them first. At most [`OUTBOX_ENTRIES_MAX`]
    /// before receives are refused.
    outbox: RefCell<Vec<Entry>>,
    outbox_level: Cell<Durability>,
    /// A generation was stored since startup (its lease gap is durable):
    /// receives hand out leases only then.
    generation_durable: Cell<bool>,
    /// Coordinator: membership of the groups in queue delivery this shard
    /// coordinates (in memory: after a restart members rejoin).
    pub coordinated: RefCell<HashMap<GroupId, Coordinated>>,
    /// Queue side: who may commit (member, grant epoch) each (group,
    /// queue) of this shard in queue delivery, as the coordinator said.
    pub holders: RefCell<HashMap<(GroupId, QueueId), (u64, u64)>>,
    /// Bumped when messages become deliverable without a publish (a retry
    /// whose time came, an ordered message unblocked): wakes long polls.
    pub ready: Watch,
    /// Bumped when a deadline may be earlier than the timer's sleep.
    pub kick: Watch,
    /// When the group timer wakes next (ms since the epoch; 0 while it
    /// runs): a new deadline at or after it needs no kick.
    pub timer_wake_ms: Cell<u64>,
    /// A task that flushes the outbox is spawned and has not run yet.
    flush_scheduled: Cell<bool>,
}

fn level_of(meta: &Metadata, cfg: &GroupConfig, topic: &str) -> Durability {
    cfg.durability.unwrap_or_else(|| {
        meta.topics
            .get(topic)
            .map_or(Durability::Fsync, |t| t.durability)
    })
}

/// Message group of a record (orderly): a hash of its key; keyless records
/// share group 0.
pub fn message_group_of(key: Option<&[u8]>) -> MessageGroup {
    key.map_or(0, |k| {
        use std::hash::Hasher;
        let mut h = siphasher::sip::SipHasher13::new_with_keys(0x6b65656c, 0x6d71);
        h.write(k);
        h.finish()
    })
}

fn load_or_create_key(dir: &Path) -> Result<HandleKey, GroupRecoveryError> {
    let path = dir.join(HANDLE_KEY_FILE);
    let err = |e: &dyn std::fmt::Display| GroupRecoveryError::Key {
        path: path.display().to_string(),
        error: e.to_string(),
    };
    match std::fs::read(&path) {
        Ok(b) if b.len() == 16 => Ok(HandleKey(b.try_into().expect("16 bytes"))),
        Ok(b) => Err(err(&format!("{} bytes, not 16", b.len()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = crate::runtime::random_bytes();
            crate::storage::write_atomic(dir, HANDLE_KEY_FILE, &key).map_err(|e| err(&e))?;
            Ok(HandleKey(key))
        }
        Err(e) => Err(err(&e)),
    }
}

impl GroupEngine {
    fn new(key: HandleKey, batch_bytes_max: usize) -> GroupEngine {
        GroupEngine {
            key,
            batch_bytes_max: batch_bytes_max.min(JOURNAL_BATCH_BYTES_MAX),
            windows: RefCell::new(BTreeMap::new()),
            offsets: RefCell::new(BTreeMap::new()),
            generation: Cell::new(0),
            pin: Cell::new(LogPosition(0)),
            journal_bytes: Cell::new(0),
            last_generation_ms: Cell::new(0),
            force_generation: Cell::new(false),
            outbox: RefCell::new(Vec::new()),
            outbox_level: Cell::new(Durability::Memory),
            coordinated: RefCell::new(HashMap::new()),
            holders: RefCell::new(HashMap::new()),
            generation_durable: Cell::new(true),
            ready: Watch::new(0),
            kick: Watch::new(0),
            timer_wake_ms: Cell::new(0),
            flush_scheduled: Cell::new(false),
        }
    }

    /// Rebuilds the state from the journal (before the shard serves), then
    /// stores a fresh generation.
    pub async fn recover(
        store: &QueueStore<UringIo>,
        dir: &Path,
        meta: &Metadata,
        shard: u16,
        batch_bytes_max: usize,
    ) -> Result<(GroupEngine, GroupRecoveryReport), GroupRecoveryError> {
        let d = dir.to_path_buf();
        let key = crate::runtime::blocking(move || load_or_create_key(&d)).await?;
        let engine = GroupEngine::new(key, batch_bytes_max);
        store.ensure_queue(GROUP_JOURNAL_QUEUE);
        let mut report = GroupRecoveryReport::default();
        // The last complete generation: read back from the end.
        let start = store
            .find_back(GROUP_JOURNAL_QUEUE, |b| {
                RecordIter::new(b)
                    .flatten()
                    .filter_map(|r| match Entry::decode(r.payload) {
                        Ok(Entry::End { begin_offset, .. }) => Some(begin_offset),
                        _ => None,
                    })
                    .last()
            })
            .await?;
        let o = store.offsets(GROUP_JOURNAL_QUEUE)?;
        let mut offset = start.unwrap_or(0).max(o.earliest);
        while offset < o.latest {
            let (_, batches) = store
                .read(GROUP_JOURNAL_QUEUE, QueueOffset(offset), 4 << 20)
                .await?;
            if batches.is_empty() {
                break;
            }
            for b in batches {
                let Ok(h) = BatchHeader::parse(&b) else {
                    continue;
                };
                for (i, r) in RecordIter::new(&b).enumerate() {
                    let at = h.base_offset + i as u64;
                    let Ok(r) = r else { break };
                    if at < offset {
                        continue;
                    }
                    report.replayed += 1;
                    match Entry::decode(r.payload) {
                        Ok(e) => {
                            if !engine.replay(store, meta, shard, e).await {
                                report.inconsistent += 1;
                            }
                        }
                        Err(_) => report.inconsistent += 1,
                    }
                }
                offset = offset.max(h.next_offset());
            }
        }
        for w in engine.windows.borrow_mut().values_mut() {
            w.w.replayed();
            w.w.skip_leases(LEASE_RESTART_GAP);
        }
        engine.sync_metadata(store, None, meta, shard);
        // A fresh generation: the skipped leases must be durable before a
        // handle is handed out. The log may still be preparing its first
        // segment: wait for room, and retry a generation cut short.
        let mut tries = 0;
        loop {
            let attempt = async {
                store
                    .wait_appendable(4096, std::time::Duration::from_secs(10))
                    .await?;
                match engine.write_generation(store)? {
                    Some(r) => {
                        store.wait_durable(&r.end, Durability::Fsync).await?;
                        engine.pin.set(r.begin);
                        Ok(())
                    }
                    None => Ok(()),
                }
            };
            match attempt.await {
                Ok(()) => break,
                Err(StoreError::Log(crate::storage::LogError::Busy(_))) if tries < 100 => {
                    tries += 1;
                }
                Err(e) => {
                    // A full (or failed) disk: the broker still starts and
                    // serves; receives wait until a generation is stored.
                    tracing::warn!(
                        shard,
                        "group journal: no generation stored at startup ({e}); receives are refused until one is"
                    );
                    engine.force_generation.set(true);
                    engine.generation_durable.set(false);
                    break;
                }
            }
        }
        report.windows = engine.windows.borrow().len();
        report.offsets = engine.offsets.borrow().len();
        Ok((engine, report))
    }

    /// Applies one journal entry during recovery; false when it did not
    /// fit (skipped).
    async fn replay(
        &self,
        store: &QueueStore<UringIo>,
        meta: &Metadata,
        shard: u16,
        e: Entry,
    ) -> bool {
        match e {
            Entry::Begin { generation } | Entry::End { generation, .. } => {
                self.generation.set(self.generation.get().max(generation));
                true
            }
            Entry::Offset {
                group,
                instance,
                queue,
                offset,
            } => {
                self.offsets
                    .borrow_mut()
                    .insert((group, queue, instance), offset);
                true
            }
            Entry::Dropped { group, name } => {
                self.windows.borrow_mut().retain(|(g, _), _| *g != group);
                self.offsets.borrow_mut().retain(|(n, _, _), _| *n != name);
                true
            }
            Entry::Snapshot {
                group,
                queue,
                snapshot,
            } => {
                let Some(w) = self.new_window(meta, shard, group, queue, None) else {
                    return true; // the group or queue is gone
                };
                match DeliveryWindow::restore(w.w_cfg.clone(), &snapshot) {
                    Ok(dw) => {
                        self.windows.borrow_mut().insert((group, queue), w.with(dw));
                        true
                    }
                    Err(_) => false,
                }
            }
            Entry::Window {
                group,
                queue,
                event,
            } => {
                let key = (group, queue);
                let (orderly, from, cap) = match self.windows.borrow().get(&key) {
                    None => return meta_has_group(meta, group).is_none(),
                    Some(w) => (
                        w.orderly,
                        w.w.next(),
                        w.w.floor() + u64::from(w.w.config().inflight_max),
                    ),
                };
                let mut groups = HashMap::new();
                let mut priorities: HashMap<u64, u8> = HashMap::new();
                // The offsets the window may take in up to the delivery
                // have known priorities below `known_to`: the window's
                // reach, not the whole way to a delivery far ahead of it.
                let mut known_to = u64::MAX;
                let mut deliver = None;
                if let crate::group::journal::Event::Deliver { offset, count, .. } = event {
                    let to = offset + u64::from(count);
                    if to > from {
                        if orderly {
                            groups = message_groups(store, queue, from, to)
                                .await
                                .unwrap_or_default();
                        } else if store.has_prioritized(queue, from, to) {
                            deliver = Some(to);
                            known_to = to.min(cap.max(from));
                            for (a, b) in [(from, known_to), (offset.max(known_to), to)] {
                                if a < b {
                                    priorities.extend(read_priorities(store, queue, a, b).await);
                                }
                            }
                        }
                    }
                }
                let applied = {
                    let mut windows = self.windows.borrow_mut();
                    let Some(w) = windows.get_mut(&key) else {
                        return false;
                    };
                    w.w.apply_known(
                        &event,
                        |o| groups.get(&o).copied().unwrap_or(0),
                        |o| priorities.get(&o).copied().unwrap_or(0),
                        known_to,
                    )
                };
                let skip = match applied {
                    Ok(()) => return true,
                    Err((skip, _)) => skip,
                };
                let Some(to) = deliver else {
                    return false;
                };
                // Taking in finished slots moved the floor further than
                // the first read reached: know all the way, once.
                let from = self.windows.borrow().get(&key).map_or(from, |w| w.w.next());
                let all = read_priorities(store, queue, from, to).await;
                let mut windows = self.windows.borrow_mut();
                let Some(w) = windows.get_mut(&key) else {
                    return false;
                };
                w.w.apply_from(
                    &event,
                    skip,
                    |o| groups.get(&o).copied().unwrap_or(0),
                    |o| all.get(&o).copied().unwrap_or(0),
                )
                .is_ok()
            }
        }
    }

    fn new_window(
        &self,
        meta: &Metadata,
        shard: u16,
        group: GroupId,
        queue: QueueId,
        floor: Option<u64>,
    ) -> Option<NewWindow> {
        let g = meta_has_group(meta, group)?;
        if g.config.delivery != Delivery::Message {
            return None;
        }
        let (topic, index) = meta.locate(queue)?;
        let route = meta.route(topic, index).ok()?;
        if route.shard != shard || !g.config.subscriptions.iter().any(|s| s.topic == topic) {
            return None;
        }
        let w_cfg = g.config.window();
        Some(NewWindow {
            floor,
            w_cfg,
            topic: topic.to_owned(),
            index,
            level: level_of(meta, &g.config, topic),
            orderly: g.config.orderly,
            journal_before: g.config.journal_deliveries
                == crate::group::config::JournalDeliveries::Before,
            start: g.config.start,
        })
    }

    /// Brings the state in line with the metadata: a window for every
    /// (message-delivery group, subscribed queue on this shard), starting
    /// where the group's `start` says; the windows and offsets of groups
    /// deleted since `old` dropped, and those of deleted queues. Changes
    /// are journaled (a snapshot per new window, a drop per deleted group).
    pub fn sync_metadata(
        &self,
        store: &QueueStore<UringIo>,
        old: Option<&Metadata>,
        meta: &Metadata,
        shard: u16,
    ) {
        let mut entries = Vec::new();
        if let Some(old) = old {
            for (name, g) in &old.groups {
                if meta.groups.get(name).is_none_or(|n| n.id != g.id) {
                    entries.push(Entry::Dropped {
                        group: GroupId(g.id),
                        name: name.clone(),
                    });
                }
            }
        }
        let mut windows = self.windows.borrow_mut();
        windows.retain(|(g, q), _| meta_has_group(meta, *g).is_some() && meta.locate(*q).is_some());
        self.holders
            .borrow_mut()
            .retain(|(g, q), _| meta_has_group(meta, *g).is_some() && meta.locate(*q).is_some());
        self.coordinated
            .borrow_mut()
            .retain(|g, _| meta_has_group(meta, *g).is_some());
        self.offsets.borrow_mut().retain(|(name, q, _), _| {
            meta.locate(*q).is_some()
                && !entries
                    .iter()
                    .any(|e| matches!(e, Entry::Dropped { name: n, .. } if n == name))
        });
        for g in meta.groups.values() {
            if g.config.delivery != Delivery::Message {
                continue;
            }
            for s in &g.config.subscriptions {
                let Ok(queues) = meta.queues(&s.topic) else {
                    continue;
                };
                for (qid, owner) in queues {
                    if owner.0 != shard || windows.contains_key(&(GroupId(g.id), qid)) {
                        continue;
                    }
                    let Some(nw) = self.new_window(meta, shard, GroupId(g.id), qid, None) else {
                        continue;
                    };
                    let floor = match (nw.floor, nw.start) {
                        (Some(f), _) => f,
                        (None, start) => store.offsets(qid).map_or(0, |o| match start {
                            StartFrom::Latest => o.latest,
                            StartFrom::Earliest => o.earliest,
                        }),
                    };
                    let dw = DeliveryWindow::new(nw.w_cfg.clone(), floor, 1);
                    entries.push(Entry::Snapshot {
                        group: GroupId(g.id),
                        queue: qid,
                        snapshot: dw.snapshot(),
                    });
                    windows.insert((GroupId(g.id), qid), nw.with(dw));
                }
            }
        }
        drop(windows);
        if !entries.is_empty() {
            if let Err(e) = self.append(store, &entries, Durability::Fsync) {
                // The next generation (soon) stores the state instead.
                tracing::warn!("group journal: group changes wait for the next generation: {e}");
                self.force_generation.set(true);
            }
        }
    }

    /// Appends entries to the journal at `level` (synchronously, in
    /// order), after any entries an earlier append could not store (the
    /// log was busy or full): those stay first in line, so the journal
    /// keeps the order the state changed in.
    pub fn append(
        &self,
        store: &QueueStore<UringIo>,
        entries: &[Entry],
        level: Durability,
    ) -> Result<Option<AppendReceipt>, StoreError> {
        let mut all = std::mem::take(&mut *self.outbox.borrow_mut());
        let level = if all.is_empty() {
            level
        } else {
            level.max_level(self.outbox_level.get())
        };
        all.extend_from_slice(entries);
        match self.append_now(store, &all, level) {
            Ok(r) => Ok(r),
            Err((stored, e)) => {
                *self.outbox.borrow_mut() = all.split_off(stored);
                self.outbox_level.set(level);
                Err(e)
            }
        }
    }

    /// Wakes the group timer if `deadline_ms` comes before its next wake
    /// (a kick per receive would cost a task run per receive for deadlines
    /// that are nearly always later).
    pub fn kick_for(&self, deadline_ms: u64) {
        if deadline_ms < self.timer_wake_ms.get() {
            self.timer_wake_ms.set(0);
            self.kick.advance(self.kick.get() + 1);
        }
    }

    /// Queues `entries` for the log without appending them now: the next
    /// append (or [`Groups::flush_outbox`]) stores them first, in order.
    /// True when the caller should schedule that flush (none is pending).
    pub fn defer(&self, entries: &[Entry], level: Durability) -> bool {
        let mut o = self.outbox.borrow_mut();
        if o.is_empty() {
            self.outbox_level.set(level);
        } else {
            self.outbox_level
                .set(level.max_level(self.outbox_level.get()));
        }
        o.extend_from_slice(entries);
        !self.flush_scheduled.replace(true)
    }

    /// Entries waiting for the log to take them.
    pub fn outbox_len(&self) -> usize {
        self.outbox.borrow().len()
    }

    /// Appends the waiting entries, if the log takes them now.
    pub fn flush_outbox(&self, store: &QueueStore<UringIo>) -> Result<(), StoreError> {
        self.flush_scheduled.set(false);
        if self.outbox.borrow().is_empty() {
            return Ok(());
        }
        self.append(store, &[], Durability::Memory).map(|_| ())
    }

    /// Appends `entries` (changes already applied), waiting for the log to
    /// take them, up to `limit`: a busy disk delays the reply instead of
    /// failing a change that has happened.
    pub async fn append_waiting(
        &self,
        store: &QueueStore<UringIo>,
        entries: &[Entry],
        level: Durability,
        limit: std::time::Duration,
    ) -> Result<Option<AppendReceipt>, StoreError> {
        let deadline = std::time::Instant::now() + limit;
        let mut r = self.append(store, entries, level);
        loop {
            match r {
                Err(StoreError::Log(crate::storage::LogError::Busy(_)))
                    if std::time::Instant::now() < deadline =>
                {
                    let _ = store
                        .wait_appendable(
                            self.batch_bytes_max as u64,
                            std::time::Duration::from_millis(100),
                        )
                        .await;
                    r = self.append(store, &[], level);
                }
                r => return r,
            }
        }
    }

    /// On failure: how many leading entries were stored, and why not the
    /// rest.
    fn append_now(
        &self,
        store: &QueueStore<UringIo>,
        entries: &[Entry],
        level: Durability,
    ) -> Result<Option<AppendReceipt>, (usize, StoreError)> {
        let now = crate::runtime::now_ms();
        let mut last = None;
        let mut b = BatchBuilder::new();
        let mut first_in_batch = 0;
        let mut buf = Vec::new();
        let mut flush = |b: BatchBuilder, first: usize| -> Result<(), (usize, StoreError)> {
            let bytes = b.finish();
            let header = BatchHeader::parse(&bytes).expect("a built batch parses");
            let r = store
                .append(
                    GROUP_JOURNAL_QUEUE,
                    &bytes,
                    &header,
                    crate::batch::Summary::NONE,
                    level,
                )
                .map_err(|e| (first, e))?;
            self.journal_bytes
                .set(self.journal_bytes.get() + bytes.len() as u64);
            last = Some(r);
            Ok(())
        };
        for (i, e) in entries.iter().enumerate() {
            buf.clear();
            e.encode(&mut buf);
            if !b.is_empty() && b.encoded_len() + buf.len() + 64 > self.batch_bytes_max {
                flush(std::mem::take(&mut b), first_in_batch)?;
                b = BatchBuilder::new();
                first_in_batch = i;
            }
            b.push(&Record {
                payload: Bytes::copy_from_slice(&buf),
                timestamp_ms: now,
                ..Record::default()
            });
        }
        if !b.is_empty() {
            flush(b, first_in_batch)?;
        }
        Ok(last)
    }

    /// Writes a generation now: begin, every window, every offset, end.
    fn write_generation(
        &self,
        store: &QueueStore<UringIo>,
    ) -> Result<Option<GenerationReceipt>, StoreError> {
        let generation = self.generation.get() + 1;
        let Some(begin) = self.append(store, &[Entry::Begin { generation }], Durability::Fsync)?
        else {
            return Ok(None);
        };
        let mut entries: Vec<Entry> = self
            .windows
            .borrow()
            .iter()
            .map(|(&(group, queue), w)| Entry::Snapshot {
                group,
                queue,
                snapshot: w.w.snapshot(),
            })
            .collect();
        entries.extend(
            self.offsets
                .borrow()
                .iter()
                .map(|((group, queue, instance), &offset)| Entry::Offset {
                    group: group.clone(),
                    instance: instance.clone(),
                    queue: *queue,
                    offset,
                }),
        );
        entries.push(Entry::End {
            generation,
            begin_offset: begin.base_offset.0,
        });
        let end = self
            .append(store, &entries, Durability::Fsync)?
            .expect("the end marker was appended");
        self.generation.set(generation);
        self.journal_bytes.set(0);
        self.last_generation_ms.set(crate::runtime::now_ms());
        Ok(Some(GenerationReceipt {
            begin: begin.position,
            end,
        }))
    }

    /// Writes a generation when the journal grew enough (or a change is
    /// old enough), and moves the retention pin once it is durable.
    pub async fn maybe_write_generation(
        &self,
        store: &QueueStore<UringIo>,
    ) -> Result<bool, StoreError> {
        let bytes = self.journal_bytes.get();
        let due = self.force_generation.get()
            || bytes >= GENERATION_JOURNAL_BYTES
            || (bytes > 0
                && crate::runtime::now_ms() - self.last_generation_ms.get()
                    >= GENERATION_INTERVAL_MS);
        if !due {
            return Ok(false);
        }
        store
            .wait_appendable(4096, std::time::Duration::from_secs(1))
            .await?;
        if let Some(r) = self.write_generation(store)? {
            self.force_generation.set(false);
            store.wait_durable(&r.end, Durability::Fsync).await?;
            self.pin.set(r.begin);
            self.generation_durable.set(true);
        }
        Ok(true)
    }

    /// Before retention: when the last generation is in an older segment
    /// than the active one, a new generation moves the pin forward (else
    /// an idle journal would keep every segment).
    pub async fn refresh_pin(&self, store: &QueueStore<UringIo>) -> Result<(), StoreError> {
        let active = store.log().segments().last().map_or(0, |s| s.base);
        if self.pin.get().0 < active {
            self.force_generation.set(true);
            self.maybe_write_generation(store).await?;
        }
        Ok(())
    }

    /// Whether receives may hand out leases (a generation is durable).
    pub fn leases_safe(&self) -> bool {
        self.generation_durable.get()
    }

    /// Retention keeps every segment from here on (the last durable
    /// generation's begin).
    pub fn retention_pin(&self) -> LogPosition {
        self.pin.get()
    }

    /// Runs `f` on the window of (group, queue), if there is one.
    pub fn with_window<T>(
        &self,
        group: GroupId,
        queue: QueueId,
        f: impl FnOnce(&mut Window) -> T,
    ) -> Option<T> {
        self.windows.borrow_mut().get_mut(&(group, queue)).map(f)
    }

    /// Every window's key.
    pub fn window_keys(&self) -> Vec<(GroupId, QueueId)> {
        self.windows.borrow().keys().copied().collect()
    }

    /// Earliest deadline or retry time over all windows.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.windows
            .borrow()
            .values()
            .filter_map(|w| w.w.next_due_ms())
            .min()
    }

    /// Moves every window's clock to `now_ms`; returns the dead letters to
    /// store and whether any window has messages ready.
    pub fn advance_all(
        &self,
        now_ms: u64,
        mut late: impl FnMut(u64),
    ) -> (Vec<(GroupId, QueueId, u64, u32)>, bool) {
        let mut dead = Vec::new();
        let mut ready = false;
        for (&(g, q), w) in self.windows.borrow_mut().iter_mut() {
            w.w.advance_observed(now_ms, &mut late);
            ready |= w.w.has_ready();
            dead.extend(
                w.w.take_dead_letters()
                    .into_iter()
                    .map(|d| (g, q, d.offset, d.attempts)),
            );
        }
        (dead, ready)
    }

    /// A committed offset.
    pub fn offset(&self, group: &str, queue: QueueId, instance: &str) -> Option<u64> {
        self.offsets
            .borrow()
            .get(&(group.to_owned(), queue, instance.to_owned()))
            .copied()
    }

    /// Committed offsets of one group on this shard.
    pub fn offsets_of(&self, group: &str) -> Vec<(QueueId, String, u64)> {
        self.offsets
            .borrow()
            .iter()
            .filter(|((g, _, _), _)| g == group)
            .map(|((_, q, i), &o)| (*q, i.clone(), o))
            .collect()
    }

    /// Records a committed offset (journal entry returned, to append).
    pub fn commit(
        &self,
        group: &str,
        queue: QueueId,
        instance: &str,
        offset: u64,
        max: u32,
    ) -> Result<Entry, CommitError> {
        let key = (group.to_owned(), queue, instance.to_owned());
        let mut offsets = self.offsets.borrow_mut();
        if !offsets.contains_key(&key) && offsets.len() >= max as usize {
            return Err(CommitError::Full(max));
        }
        offsets.insert(key, offset);
        Ok(Entry::Offset {
            group: group.to_owned(),
            instance: instance.to_owned(),
            queue,
            offset,
        })
    }
}

/// A group this shard coordinates.
pub struct Coordinated {
    pub m: crate::group::membership::Membership,
    /// (queue → holder) as last sent to the queues' shards.
    pub pushed: BTreeMap<QueueId, (u64, u64)>,
}

/// Why an offset commit was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    #[error("this shard holds {0} committed offsets, limits.group_offsets_max")]
    Full(u32),
}

struct GenerationReceipt {
    begin: LogPosition,
    end: AppendReceipt,
}

struct NewWindow {
    floor: Option<u64>,
    w_cfg: crate::group::window::WindowConfig,
    topic: String,
    index: QueueIndex,
    level: Durability,
    orderly: bool,
    journal_before: bool,
    start: StartFrom,
}

impl NewWindow {
    fn with(self, w: DeliveryWindow) -> Window {
        Window {
            w,
            topic: self.topic,
            index: self.index,
            level: self.level,
            orderly: self.orderly,
            journal_before: self.journal_before,
        }
    }
}

/// The priorities above 0 of the records at offsets `[from, to)` of a
/// queue (for a replay). A read that fails leaves them at 0: the replay
/// may then deliver again a message finished ahead of its window (at least
/// once, never lost), and says so.
async fn read_priorities(
    store: &QueueStore<UringIo>,
    queue: QueueId,
    from: u64,
    to: u64,
) -> HashMap<u64, u8> {
    match store.priorities(queue, from, to, u64::MAX).await {
        Ok((_, p)) => p.into_iter().collect(),
        Err(e) => {
            tracing::warn!(
                queue = queue.0,
                "group journal replay: priorities of offsets {from}..{to} unreadable ({e}); \
                 messages finished there may be delivered again"
            );
            HashMap::new()
        }
    }
}

fn meta_has_group(meta: &Metadata, id: GroupId) -> Option<&crate::shard::metadata::GroupMeta> {
    meta.groups.values().find(|g| g.id == id.0)
}

/// The message group of every offset in `[from, to)` of a queue that the
/// store still has (read ahead at most [`ORDERLY_READ_AHEAD_BYTES`] past
/// the first batch).
pub async fn message_groups(
    store: &QueueStore<UringIo>,
    queue: QueueId,
    from: u64,
    to: u64,
) -> Result<HashMap<u64, MessageGroup>, StoreError> {
    let mut out = HashMap::new();
    let mut at = from;
    while at < to {
        let (_, batches) = match store
            .read(queue, QueueOffset(at), ORDERLY_READ_AHEAD_BYTES)
            .await
        {
            Ok(r) => r,
            Err(StoreError::OffsetOutOfRange { .. }) => break,
            Err(e) => return Err(e),
        };
        if batches.is_empty() {
            break;
        }
        let before = at;
        for b in &batches {
            let Ok(h) = BatchHeader::parse(b) else {
                continue;
            };
            // Offsets a view lacks (a record retention removed) take group
            // 0 and are finished unsent when leased.
            for o in h.base_offset.max(at)..h.next_offset().min(to) {
                out.insert(o, 0);
            }
            for r in RecordIter::new(b) {
                let Ok(r) = r else { break };
                let o = h.base_offset + u64::from(r.index);
                if o >= at && o < to {
                    out.insert(o, message_group_of(r.key));
                }
            }
            at = at.max(h.next_offset());
        }
        if at == before || at >= to || out.len() > 100_000 {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timer_is_kicked_only_for_a_deadline_before_its_wake() {
        let g = GroupEngine::new(HandleKey([7; 16]), 1 << 20);
        g.timer_wake_ms.set(10_000);
        g.kick_for(10_000);
        g.kick_for(25_000);
        assert_eq!(g.kick.get(), 0, "deadlines at or after the wake");
        g.kick_for(9_999);
        assert_eq!(g.kick.get(), 1, "an earlier deadline");
        // Kicked: the timer recomputes its wake from every deadline.
        g.kick_for(5);
        assert_eq!(g.kick.get(), 1);
        g.timer_wake_ms.set(100);
        g.kick_for(50);
        assert_eq!(g.kick.get(), 2);
    }

    #[test]
    fn deferred_entries_wait_in_order_and_ask_for_one_flush() {
        let g = GroupEngine::new(HandleKey([7; 16]), 1 << 20);
        let e = |generation| Entry::Begin { generation };
        assert!(
            g.defer(&[e(1)], Durability::Memory),
            "the first asks for a flush"
        );
        assert!(!g.defer(&[e(2), e(3)], Durability::Fsync), "one is pending");
        assert_eq!(g.outbox_len(), 3);
        assert_eq!(
            g.outbox_level.get(),
            Durability::Fsync,
            "the strongest level"
        );
        let order: Vec<u64> = g
            .outbox
            .borrow()
            .iter()
            .map(|e| match e {
                Entry::Begin { generation } => *generation,
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(order, [1, 2, 3]);
    }
}
