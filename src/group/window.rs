//! The delivery window of one (consumer group, queue) in message delivery
//! ("pop"): which offsets are leased to a consumer, until when, how many
//! times each was delivered, and what is due again. Plain state, no I/O and
//! no clock of its own: the owning shard feeds it the time, the log's
//! visible end and, for orderly groups, each message's message group.
//!
//! The window spans `[floor, next)`: every offset below `floor` is finished
//! (acked or dead-lettered), `next` is the first offset never delivered.
//! One slot per offset in between, at most `inflight_max` of them, so when
//! the oldest unfinished message is far behind the queue pauses for this
//! group instead of growing.
//!
//! A slot is *pending* (taken into the window but held back: its message
//! group is busy), *in flight* (leased until its deadline), *retry* (failed,
//! not before a time), *dead-lettering* (attempts exhausted; the shard is
//! moving it to `%DLQ%<group>`), or *done*. Every delivery gets a new lease
//! number, which the receipt handle carries, so an ack or nack from a
//! delivery that has since expired and gone to someone else is refused.
//!
//! Rules, each checked by the simulation in `window/sim.rs`:
//! - a delivery happens only when the message is due: new, or its retry
//!   time (the deadline after a timeout, the backoff after a nack) passed;
//! - an offset is leased to at most one delivery at a time, and a finished
//!   offset is never delivered again;
//! - a message is delivered at most `attempts_max` times; when the last
//!   delivery fails (times out or is nacked) it is dead-lettered;
//! - orderly: a message group has at most one unfinished message out of the
//!   pending ones, the lowest offset of the group; the next is delivered
//!   only once it is finished, so a failed message blocks only its group;
//! - every message is eventually delivered while consumers receive;
//! - priority (non-orderly windows, [`DeliveryWindow::receive_prioritized`]):
//!   the window takes every visible message it has room for and leases the
//!   one of highest priority first (retries keep theirs), FIFO within a
//!   priority, except that the oldest deliverable message goes first once
//!   its priority plus one per `priority_age_boost_ms` it has waited
//!   reaches the best one's (so no priority starves).
//! - priority ahead of the window: when the window is full and messages of
//!   priority above 0 wait beyond it, each priority `p` keeps its own
//!   sparse sub-window of them (the *ahead* slots, found by the shard's
//!   scan beyond the window): every priority-`p` offset in `[next,
//!   done_p)` is finished, and every one in
//!   `[max(next, done_p), cursor_p)` is an ahead slot, so a higher priority
//!   beyond the window goes before a lower one in it. Finished ahead slots
//!   at the front of their priority are dropped (`done_p` moves past them),
//!   so under a sustained overload the high priorities keep flowing while
//!   the low ones wait in the window (aging still moves them). At most
//!   [`PRIORITY_AHEAD_MAX`] (or `inflight_max` when smaller) ahead slots;
//!   a better one may evict the last pending ahead slot of a lower priority.
//!
//! Memory: a slot is 40 bytes (an ahead slot about 100 with its map
//! entries) and an in-flight or retry slot one ordered
//! timer entry (16 bytes plus B-tree overhead), about 70 bytes per
//! in-flight message, 0.7 MB for a full default window of 10,000.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use super::backoff::Backoff;
use super::journal::{Event, JournalError};

/// Default most messages in one (group, queue) window.
pub const INFLIGHT_MESSAGES_MAX_DEFAULT: u32 = 10_000;
/// Largest `inflight_messages_max` a group may set (a full window's
/// snapshot, 3.6 MB with its ahead slots, is one record of the group journal).
pub const INFLIGHT_MESSAGES_MAX_LIMIT: u32 = 100_000;
/// Default most deliveries of one message before it is dead-lettered.
pub const ATTEMPTS_MAX_DEFAULT: u32 = 16;
/// Shortest invisible time a receive may ask for, in milliseconds.
pub const INVISIBLE_MS_MIN: u64 = 10;
/// Longest invisible time a receive may ask for: 12 h, in milliseconds.
pub const INVISIBLE_MS_MAX: u64 = 12 * 3600 * 1000;

/// How a group delivers from one queue.
#[derive(Clone, Debug)]
pub struct WindowConfig {
    /// Most slots (pending, in flight, retry, dead-lettering and finished
    /// ones not yet passed by the floor).
    pub inflight_max: u32,
    /// Most deliveries of one message.
    pub attempts_max: u32,
    /// Orderly: one unfinished message per message group at a time.
    pub orderly: bool,
    /// How long a nacked message waits when the nack names no delay.
    pub backoff: Backoff,
    /// Priority's starvation guard: a waiting message counts one priority
    /// higher per this many ms it has waited (0: no aging).
    pub priority_age_boost_ms: u64,
}

/// Default `priority_age_boost_ms`: a message waiting 1 s counts one
/// priority higher, so the lowest goes first after at most 9 s.
pub const PRIORITY_AGE_BOOST_MS_DEFAULT: u64 = 1000;
/// Highest priority.
pub const PRIORITY_MAX: u8 = 9;
/// Most slots a window holds ahead of its next offset for messages of
/// priority above 0 (fewer when `inflight_max` is smaller): 10,000, about
/// 1 MB, 400 KB of snapshot.
pub const PRIORITY_AHEAD_MAX: u32 = 10_000;
/// Most passes of one offer over a scan (module docs).
const OFFER_PASSES_MAX: usize = 3;
/// Priorities 0..=9, for per-priority arrays.
const PRIORITIES: usize = PRIORITY_MAX as usize + 1;

impl Default for WindowConfig {
    fn default() -> WindowConfig {
        WindowConfig {
            inflight_max: INFLIGHT_MESSAGES_MAX_DEFAULT,
            attempts_max: ATTEMPTS_MAX_DEFAULT,
            orderly: false,
            backoff: Backoff::default(),
            priority_age_boost_ms: PRIORITY_AGE_BOOST_MS_DEFAULT,
        }
    }
}

/// The message group of a message (a hash of its `message_group`; for a
/// queue-orderly group every message of the queue has the same one).
pub type MessageGroup = u64;

/// One delivery: what a receipt handle names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    pub offset: u64,
    /// 1 for the first delivery.
    pub attempt: u32,
    /// Unique per window and increasing: the delivery's identity.
    pub lease: u64,
    /// Invisible to other consumers until then.
    pub deadline_ms: u64,
    /// A redelivery: when it became due (its retry time, or the deadline
    /// of the delivery before), to measure lateness.
    pub due_ms: Option<u64>,
}

/// Why an ack, nack or change of invisible time was refused. None of them
/// changes anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("offset {0} is already acknowledged or dead-lettered")]
    Finished(u64),
    #[error("offset {0} has not been delivered")]
    NotDelivered(u64),
    #[error("offset {0} was delivered again since this handle was issued")]
    Stale(u64),
    #[error("offset {0} is not leased (its invisible time passed or it was nacked)")]
    NotLeased(u64),
    #[error("offset {0} is being moved to the dead-letter queue")]
    DeadLettering(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    Pending,
    InFlight { deadline_ms: u64 },
    Retry { not_before_ms: u64 },
    DeadLettering,
    Done,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    state: State,
    /// Deliveries so far.
    attempt: u32,
    /// Lease number of the last delivery (0: none yet).
    lease: u64,
    /// Orderly: the message group. Otherwise, for a pending slot: when it
    /// was taken into the window (ms; priority aging).
    group: MessageGroup,
    /// 0 to 9.
    priority: u8,
}

/// A message whose attempts ran out: the shard appends it to the group's
/// dead-letter topic, then calls [`DeliveryWindow::dead_lettered`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    pub offset: u64,
    pub attempts: u32,
}

/// The window of one (group, queue).
#[derive(Debug)]
pub struct DeliveryWindow {
    cfg: WindowConfig,
    floor: u64,
    slots: VecDeque<Slot>,
    /// (due ms, offset) of every in-flight deadline and retry time.
    timers: BTreeSet<(u64, u64)>,
    /// Retry slots whose time came: delivered first, oldest first.
    ready: BTreeSet<u64>,
    /// The same, by priority (highest first), then offset.
    ready_by_priority: BTreeSet<(Reverse<u8>, u64)>,
    /// Non-orderly pending slots (taken ahead for priority), by priority,
    /// then offset; and by offset.
    pending_by_priority: BTreeSet<(Reverse<u8>, u64)>,
    pending: BTreeSet<u64>,
    /// Orderly: pending slots whose message group became free.
    unblocked: BTreeSet<u64>,
    /// Orderly: the unfinished, non-pending offset of each busy group.
    busy: HashMap<MessageGroup, u64>,
    /// Orderly: pending offsets per busy group, in order.
    waiting: HashMap<MessageGroup, VecDeque<u64>>,
    /// Slots at or past `next` for messages of priority above 0, taken in
    /// ahead of the window (module docs).
    ahead: BTreeMap<u64, Slot>,
    /// The offsets of `ahead`, per priority.
    ahead_of: [BTreeSet<u64>; PRIORITIES],
    /// Per priority: every offset of it in `[next, ahead_done[p])` is
    /// finished.
    ahead_done: [u64; PRIORITIES],
    /// Per priority: every offset of it in `[max(next, ahead_done[p]),
    /// ahead_cursor[p])` is in `ahead` (the scan beyond the window saw it).
    ahead_cursor: [u64; PRIORITIES],
    dead_letters: Vec<DeadLetter>,
    /// Transitions since the last [`DeliveryWindow::take_journal`].
    journal: Vec<Event>,
    next_lease: u64,
    now_ms: u64,
}

impl DeliveryWindow {
    /// A window starting at `floor` (the group's committed position), whose
    /// leases are numbered from `first_lease` up (above any lease a handle
    /// from before may carry).
    pub fn new(cfg: WindowConfig, floor: u64, first_lease: u64) -> DeliveryWindow {
        assert!(
            cfg.inflight_max > 0 && cfg.attempts_max > 0,
            "validated config"
        );
        DeliveryWindow {
            cfg,
            floor,
            slots: VecDeque::new(),
            timers: BTreeSet::new(),
            ready: BTreeSet::new(),
            ready_by_priority: BTreeSet::new(),
            pending_by_priority: BTreeSet::new(),
            pending: BTreeSet::new(),
            unblocked: BTreeSet::new(),
            busy: HashMap::new(),
            waiting: HashMap::new(),
            ahead: BTreeMap::new(),
            ahead_of: std::array::from_fn(|_| BTreeSet::new()),
            ahead_done: [0; PRIORITIES],
            ahead_cursor: [0; PRIORITIES],
            dead_letters: Vec::new(),
            journal: Vec::new(),
            next_lease: first_lease.max(1),
            now_ms: 0,
        }
    }

    /// The settings the window runs with.
    pub fn config(&self) -> &WindowConfig {
        &self.cfg
    }
    /// Every offset below is finished.
    pub fn floor(&self) -> u64 {
        self.floor
    }
    /// The first offset never taken into the window.
    pub fn next(&self) -> u64 {
        self.floor + self.slots.len() as u64
    }
    /// Slots held from the floor (bounded by `inflight_max`).
    pub fn len(&self) -> usize {
        self.slots.len()
    }
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
    /// Slots held ahead of the window (bounded by [`Self::ahead_max`],
    /// except right after a replay).
    pub fn ahead_len(&self) -> usize {
        self.ahead.len()
    }
    /// Most ahead slots: [`PRIORITY_AHEAD_MAX`], or `inflight_max` when
    /// smaller.
    pub fn ahead_max(&self) -> usize {
        self.cfg.inflight_max.min(PRIORITY_AHEAD_MAX) as usize
    }
    /// Every slot, from the floor, then the ahead ones.
    fn all_slots(&self) -> impl Iterator<Item = (u64, &Slot)> {
        (self.floor..)
            .zip(self.slots.iter())
            .chain(self.ahead.iter().map(|(&o, s)| (o, s)))
    }
    /// Messages leased now.
    pub fn in_flight(&self) -> usize {
        self.all_slots()
            .filter(|(_, s)| matches!(s.state, State::InFlight { .. }))
            .count()
    }
    /// The next lease number (to persist, so leases are never reused).
    pub fn next_lease(&self) -> u64 {
        self.next_lease
    }
    /// When a deadline or retry time falls next: the shard wakes then.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.timers.first().map(|&(due, _)| due)
    }
    /// Whether a receive now would deliver something already in the window
    /// (a retry whose time came, an unblocked pending message).
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty() || !self.unblocked.is_empty() || !self.pending.is_empty()
    }

    /// Whether priority decides what goes next: pending slots taken ahead
    /// are waiting, or a ready retry has a priority above 0. (Without, the
    /// FIFO path gives the same order.)
    pub fn has_priorities(&self) -> bool {
        !self.pending.is_empty()
            || self.ready_by_priority.first().is_some_and(|(p, _)| p.0 > 0)
            || !self.ahead.is_empty()
            || self.ahead_done.iter().any(|&d| d > self.next())
    }

    fn ready_insert(&mut self, offset: u64) {
        let p = self.slot(offset).map_or(0, |s| s.priority);
        self.ready.insert(offset);
        self.ready_by_priority.insert((Reverse(p), offset));
    }

    fn ready_remove(&mut self, offset: u64) -> bool {
        let p = self.slot(offset).map_or(0, |s| s.priority);
        self.ready_by_priority.remove(&(Reverse(p), offset));
        self.ready.remove(&offset)
    }

    fn slot(&self, offset: u64) -> Option<&Slot> {
        let i = offset.checked_sub(self.floor)?;
        match self.slots.get(usize::try_from(i).ok()?) {
            Some(s) => Some(s),
            None => self.ahead.get(&offset),
        }
    }
    fn slot_mut(&mut self, offset: u64) -> &mut Slot {
        let i = (offset - self.floor) as usize;
        if i < self.slots.len() {
            &mut self.slots[i]
        } else {
            self.ahead.get_mut(&offset).expect("an ahead slot")
        }
    }

    /// Moves the clock (never back) and fires what is due: expired leases
    /// become retries (or dead letters), retries whose time came become
    /// ready. Returns how many became ready or dead-lettering.
    pub fn advance(&mut self, now_ms: u64) -> usize {
        self.advance_observed(now_ms, |_| {})
    }

    /// [`Window::advance`], telling `late` how long after its due time
    /// each timer fired (ms).
    pub fn advance_observed(&mut self, now_ms: u64, mut late: impl FnMut(u64)) -> usize {
        self.now_ms = self.now_ms.max(now_ms);
        let mut fired = 0;
        while let Some(&(due, offset)) = self.timers.first() {
            if due > self.now_ms {
                break;
            }
            self.timers.pop_first();
            fired += 1;
            late(self.now_ms - due);
            let slot = *self.slot(offset).expect("timers name window slots");
            match slot.state {
                State::InFlight { .. } => self.fail(offset, due),
                State::Retry { .. } => self.ready_insert(offset),
                s => unreachable!("a timer for a {s:?} slot"),
            }
        }
        fired
    }

    /// The delivery of `offset` failed (timed out at `due`, or nacked to
    /// retry at `due`): a retry, or a dead letter when attempts ran out.
    fn fail(&mut self, offset: u64, due: u64) {
        let attempts_max = self.cfg.attempts_max;
        let slot = self.slot_mut(offset);
        if slot.attempt >= attempts_max {
            slot.state = State::DeadLettering;
            let attempts = slot.attempt;
            self.dead_letters.push(DeadLetter { offset, attempts });
            return;
        }
        slot.state = State::Retry { not_before_ms: due };
        if due <= self.now_ms {
            self.ready_insert(offset);
        } else {
            self.timers.insert((due, offset));
        }
    }

    /// Leases up to `max` messages for `invisible_ms`: retries whose time
    /// came first (oldest first), then pending messages whose group became
    /// free, then new offsets below `visible_end`, while the window has
    /// room. `group_of` gives a new offset's message group (orderly only).
    pub fn receive(
        &mut self,
        now_ms: u64,
        max: usize,
        invisible_ms: u64,
        visible_end: u64,
        mut group_of: impl FnMut(u64) -> MessageGroup,
    ) -> Vec<Lease> {
        let mut out = self.receive_due(now_ms, max, invisible_ms);
        let left = max - out.len();
        self.take_new(left, invisible_ms, visible_end, &mut group_of, &mut out);
        out
    }

    /// Leases up to `max` new offsets below `visible_end` (taking them into
    /// the window while it has room), and nothing already in it: for a
    /// receive that took the due ones first with
    /// [`DeliveryWindow::receive_due`]. Appends to `out`.
    pub fn receive_new(
        &mut self,
        now_ms: u64,
        max: usize,
        invisible_ms: u64,
        visible_end: u64,
        mut group_of: impl FnMut(u64) -> MessageGroup,
        out: &mut Vec<Lease>,
    ) {
        self.advance(now_ms);
        self.take_new(max, invisible_ms, visible_end, &mut group_of, out);
    }

    fn take_new(
        &mut self,
        max: usize,
        invisible_ms: u64,
        visible_end: u64,
        group_of: &mut impl FnMut(u64) -> MessageGroup,
        out: &mut Vec<Lease>,
    ) {
        let mut n = 0;
        while n < max
            && self.next() < visible_end
            && self.slots.len() < self.cfg.inflight_max as usize
        {
            let offset = self.next();
            if self.take(group_of, None) {
                out.push(self.deliver(offset, invisible_ms));
                n += 1;
            }
        }
    }

    /// Leases up to `max` of the messages already in the window that are
    /// due: retries whose time came (oldest first), then pending messages
    /// whose group became free. [`DeliveryWindow::receive`] takes these
    /// first too; a receive over many queues takes every queue's due ones
    /// before any queue's new ones.
    pub fn receive_due(&mut self, now_ms: u64, max: usize, invisible_ms: u64) -> Vec<Lease> {
        self.advance(now_ms);
        let mut out = Vec::new();
        while out.len() < max {
            let Some(&offset) = self.ready.first() else {
                break;
            };
            self.ready_remove(offset);
            out.push(self.deliver(offset, invisible_ms));
        }
        while out.len() < max {
            let Some(offset) = self.unblocked.pop_first() else {
                break;
            };
            out.push(self.deliver(offset, invisible_ms));
        }
        out
    }

    /// Whether [`DeliveryWindow::receive_due`] at `now_ms` may lease
    /// something: a retry or unblocked message is ready, or a timer is due
    /// (without moving the clock).
    pub fn has_due(&self, now_ms: u64) -> bool {
        self.has_ready()
            || self
                .timers
                .first()
                .is_some_and(|&(due, _)| due <= now_ms.max(self.now_ms))
    }

    /// Leases up to `max` messages by priority (non-orderly windows): first
    /// takes every new offset below `visible_end` the window has room for
    /// (`priority_of` gives each one's priority, 0 to 9), then leases, one
    /// at a time, the deliverable message (a ready retry or a pending one)
    /// of highest priority, the lowest offset among equals; unless the
    /// oldest deliverable one, aged one priority per
    /// `priority_age_boost_ms` it waited, reaches that priority: then it.
    /// Appends to `out`.
    pub fn receive_prioritized(
        &mut self,
        now_ms: u64,
        max: usize,
        invisible_ms: u64,
        visible_end: u64,
        mut priority_of: impl FnMut(u64) -> u8,
        out: &mut Vec<Lease>,
    ) {
        self.take_prioritized(now_ms, visible_end, &mut priority_of);
        for _ in 0..max {
            let Some(offset) = self.pick() else {
                break;
            };
            if !self.ready_remove(offset) {
                let p = self.slot(offset).map_or(0, |s| s.priority);
                self.pending.remove(&offset);
                self.pending_by_priority.remove(&(Reverse(p), offset));
            }
            out.push(self.deliver(offset, invisible_ms));
        }
    }

    /// The first part of [`DeliveryWindow::receive_prioritized`]: moves the
    /// clock and takes every new offset below `visible_end` the window has
    /// room for, with its priority. (The shard calls it before scanning
    /// beyond the window.)
    pub fn take_prioritized(
        &mut self,
        now_ms: u64,
        visible_end: u64,
        mut priority_of: impl FnMut(u64) -> u8,
    ) {
        debug_assert!(!self.cfg.orderly, "priority is for non-orderly windows");
        self.advance(now_ms);
        while self.next() < visible_end && self.slots.len() < self.cfg.inflight_max as usize {
            self.take(&mut |_| 0, Some(&mut priority_of));
        }
    }

    /// Where the shard should scan for messages of priority above 0 beyond
    /// the window (up to `visible_end`), then offer what it found with
    /// [`DeliveryWindow::offer_ahead`]; `None` when there is nothing to
    /// learn: the window reaches `visible_end`, or no priority the scan
    /// could add to has room (ahead slots full and nothing to evict) or
    /// slots the scan has not covered yet.
    pub fn ahead_scan_from(&self, visible_end: u64) -> Option<u64> {
        let next = self.next();
        if self.cfg.orderly
            || next >= visible_end
            || self.slots.len() < self.cfg.inflight_max as usize
        {
            return None;
        }
        let room = self.ahead.len() < self.ahead_max();
        // The lowest priority with a pending last slot: any better one may
        // evict it.
        let evictable = (1..PRIORITIES).find(|&q| self.evictable(q).is_some());
        (1..PRIORITIES)
            .filter(|&p| {
                room || evictable.is_some_and(|q| q < p)
                    || self.ahead_of[p]
                        .last()
                        .is_some_and(|&o| o >= self.ahead_cursor[p])
            })
            .map(|p| self.ahead_cursor[p].max(next))
            .filter(|&from| from < visible_end)
            .min()
    }

    /// The slot the scan may evict for a better priority: the last ahead
    /// slot of priority `q`, when it is pending (merely known, not leased).
    fn evictable(&self, q: usize) -> Option<u64> {
        let &o = self.ahead_of[q].last()?;
        (self.ahead[&o].state == State::Pending).then_some(o)
    }

    /// What a scan beyond the window from `from` up to `known_to` found:
    /// every offset in it holding a message of priority above 0, with the
    /// priority (in offset order). Each priority whose cursor the scan
    /// covered takes in its offsets as pending ahead slots while there is
    /// room (or a lower priority's last pending ahead slot to evict), and
    /// its cursor moves to where it stopped. Safe to call with a scan made
    /// before the window changed: what it no longer needs is ignored.
    /// Whether some priority stopped short for want of room.
    pub fn offer_ahead(&mut self, from: u64, known_to: u64, found: &[(u64, u8)]) -> bool {
        if self.cfg.orderly {
            return false;
        }
        // A pass that ran short may have freed room later on (finished
        // slots it covered were forgotten): the stopped priorities go on.
        let mut short = false;
        for _ in 0..OFFER_PASSES_MAX {
            let s = self.offer_pass(from, known_to, found);
            short |= s;
            if !s || self.ahead.len() >= self.ahead_max() {
                break;
            }
        }
        short
    }

    /// One pass of [`DeliveryWindow::offer_ahead`] over what the scan found.
    fn offer_pass(&mut self, from: u64, known_to: u64, found: &[(u64, u8)]) -> bool {
        let mut short = false;
        let next = self.next();
        // The priorities this scan covers.
        let mut covered = [false; PRIORITIES];
        for (p, c) in covered.iter_mut().enumerate().skip(1) {
            *c = self.ahead_cursor[p].max(next) >= from;
        }
        for &(offset, priority) in found {
            let p = usize::from(priority.min(PRIORITY_MAX));
            if p == 0
                || !covered[p]
                || offset < next
                || offset >= known_to
                || offset < self.ahead_cursor[p]
            {
                continue;
            }
            if self.ahead.contains_key(&offset) {
                // Known already (a replay made it): covered now, and
                // forgotten if finished and first.
                self.ahead_cursor[p] = offset + 1;
                self.compact(p);
                continue;
            }
            if self.ahead.len() >= self.ahead_max() {
                let Some((q, e)) = (1..p).find_map(|q| self.evictable(q).map(|e| (q, e))) else {
                    // Full: this priority knows up to here.
                    short = true;
                    covered[p] = false;
                    self.ahead_cursor[p] = offset;
                    continue;
                };
                self.evict(q, e);
                // It knows no further than the slot it lost.
                covered[q] = false;
                short = true;
            }
            self.add_ahead(offset, p as u8);
            self.ahead_cursor[p] = offset + 1;
        }
        for (p, &c) in covered.iter().enumerate().skip(1) {
            if c {
                self.ahead_cursor[p] = self.ahead_cursor[p].max(known_to);
            }
            self.compact(p);
        }
        short
    }

    /// A pending ahead slot for `offset`, of `priority` (above 0), taken
    /// now.
    fn add_ahead(&mut self, offset: u64, priority: u8) {
        self.ahead.insert(
            offset,
            Slot {
                state: State::Pending,
                attempt: 0,
                lease: 0,
                group: self.now_ms.max(1),
                priority,
            },
        );
        self.ahead_of[usize::from(priority)].insert(offset);
        self.pending.insert(offset);
        self.pending_by_priority.insert((Reverse(priority), offset));
    }

    /// Forgets the ahead slot at `offset`, with whatever names it (the
    /// pending, ready and timer sets).
    fn drop_ahead(&mut self, offset: u64) -> Option<Slot> {
        let s = self.ahead.remove(&offset)?;
        let key = (Reverse(s.priority), offset);
        self.ahead_of[usize::from(s.priority)].remove(&offset);
        self.pending.remove(&offset);
        self.pending_by_priority.remove(&key);
        self.ready.remove(&offset);
        self.ready_by_priority.remove(&key);
        if let State::InFlight { deadline_ms: t } | State::Retry { not_before_ms: t } = s.state {
            self.timers.remove(&(t, offset));
        }
        Some(s)
    }

    /// Forgets the pending ahead slot `e`, the last of priority `q`: the
    /// scan will find it again.
    fn evict(&mut self, q: usize, e: u64) {
        self.drop_ahead(e);
        self.ahead_cursor[q] = self.ahead_cursor[q].min(e);
    }

    /// Drops the finished ahead slots at the front of priority `p` that the
    /// scan covered: `ahead_done[p]` says they are finished.
    fn compact(&mut self, p: usize) {
        while let Some(&o) = self.ahead_of[p].first() {
            if o >= self.ahead_cursor[p] || self.ahead[&o].state != State::Done {
                break;
            }
            self.drop_ahead(o);
            self.ahead_done[p] = o + 1;
        }
    }

    /// Takes an ahead slot into the window's run of slots (`offset` is the
    /// window's next); what it was stays.
    fn take_ahead(&mut self, offset: u64) -> Option<Slot> {
        let slot = self.ahead.remove(&offset)?;
        self.ahead_of[usize::from(slot.priority)].remove(&offset);
        self.slots.push_back(slot);
        self.trim();
        Some(slot)
    }

    /// Passes the floor over the finished slots at the front.
    fn trim(&mut self) {
        while self.slots.front().is_some_and(|s| s.state == State::Done) {
            self.slots.pop_front();
            self.floor += 1;
        }
    }

    /// The next message [`DeliveryWindow::receive_prioritized`] leases.
    fn pick(&self) -> Option<u64> {
        let best = match (
            self.ready_by_priority.first(),
            self.pending_by_priority.first(),
        ) {
            (Some(a), Some(b)) => *a.min(b),
            (Some(a), None) => *a,
            (None, Some(b)) => *b,
            (None, None) => return None,
        };
        let oldest = match (self.ready.first(), self.pending.first()) {
            (Some(&a), Some(&b)) => a.min(b),
            (Some(&a), None) => a,
            (None, Some(&b)) => b,
            (None, None) => return None,
        };
        let boost = self.cfg.priority_age_boost_ms;
        if oldest == best.1 || boost == 0 {
            return Some(best.1);
        }
        let slot = self.slot(oldest).expect("a deliverable slot");
        let since = match slot.state {
            State::Retry { not_before_ms } => not_before_ms,
            _ => slot.group,
        };
        let waited = self.now_ms.saturating_sub(since) / boost;
        let aged = u64::from(slot.priority).saturating_add(waited);
        if aged >= u64::from(best.0 .0) {
            Some(oldest)
        } else {
            Some(best.1)
        }
    }

    /// Takes the next offset into the window; false when it must wait for
    /// its message group (orderly). With `priority_of` (a non-orderly
    /// window taking ahead, or a replay), the slot gets its priority and
    /// waits among the pending ones until leased; without, the caller
    /// leases it at once.
    fn take(
        &mut self,
        group_of: &mut impl FnMut(u64) -> MessageGroup,
        priority_of: Option<&mut dyn FnMut(u64) -> u8>,
    ) -> bool {
        let offset = self.next();
        if self.take_ahead(offset).is_some() {
            // Known ahead: it keeps its state (and, pending, its place
            // among the pending ones).
            debug_assert!(priority_of.is_some(), "ahead slots only by priority");
            return false;
        }
        let orderly = self.cfg.orderly;
        debug_assert!(
            orderly || priority_of.is_some() || self.ahead_done.iter().all(|&d| d <= offset),
            "a window with finished ahead slots takes by priority"
        );
        let (group, priority) = match priority_of {
            _ if orderly => (group_of(offset), 0),
            Some(p) => (self.now_ms.max(1), p(offset).min(PRIORITY_MAX)),
            None => (0, 0),
        };
        if priority > 0 && offset < self.ahead_done[usize::from(priority)] {
            // Leased ahead and finished.
            self.slots.push_back(Slot {
                state: State::Done,
                attempt: 0,
                lease: 0,
                group,
                priority,
            });
            self.trim();
            return false;
        }
        self.slots.push_back(Slot {
            state: State::Pending,
            attempt: 0,
            lease: 0,
            group,
            priority,
        });
        if !orderly && group != 0 {
            self.pending.insert(offset);
            self.pending_by_priority.insert((Reverse(priority), offset));
        }
        if self.cfg.orderly && self.busy.contains_key(&group) {
            self.waiting.entry(group).or_default().push_back(offset);
            return false;
        }
        true
    }

    fn deliver(&mut self, offset: u64, invisible_ms: u64) -> Lease {
        let slot = *self.slot(offset).expect("a window slot");
        let l = Lease {
            offset,
            attempt: slot.attempt + 1,
            lease: self.next_lease,
            deadline_ms: self.now_ms.saturating_add(invisible_ms),
            due_ms: match slot.state {
                State::Retry { not_before_ms } => Some(not_before_ms),
                _ => None,
            },
        };
        self.deliver_as(l);
        self.journaled(Event::Deliver {
            offset,
            lease: l.lease,
            attempt: l.attempt,
            deadline_ms: l.deadline_ms,
            now_ms: self.now_ms,
            count: 1,
        });
        l
    }

    /// Journals a transition, extending the last record's run when it
    /// continues it.
    fn journaled(&mut self, e: Event) {
        if !self.journal.last_mut().is_some_and(|last| last.extend(&e)) {
            self.journal.push(e);
        }
    }

    /// Leases a due slot (already out of the ready or unblocked set).
    fn deliver_as(&mut self, l: Lease) {
        self.next_lease = self.next_lease.max(l.lease + 1);
        let orderly = self.cfg.orderly;
        if self.pending.remove(&l.offset) {
            let p = self.slot(l.offset).map_or(0, |s| s.priority);
            self.pending_by_priority.remove(&(Reverse(p), l.offset));
        }
        let slot = self.slot_mut(l.offset);
        debug_assert!(matches!(slot.state, State::Pending | State::Retry { .. }));
        slot.attempt = l.attempt;
        slot.lease = l.lease;
        slot.state = State::InFlight {
            deadline_ms: l.deadline_ms,
        };
        let group = slot.group;
        if orderly {
            self.busy.insert(group, l.offset);
        }
        self.timers.insert((l.deadline_ms, l.offset));
    }

    /// The leased slot for a handle's (offset, lease), or why not.
    fn check(&self, offset: u64, lease: u64) -> Result<Slot, LeaseError> {
        if offset < self.floor {
            return Err(LeaseError::Finished(offset));
        }
        let Some(slot) = self.slot(offset) else {
            if offset >= self.next() && self.ahead_done.iter().any(|&d| offset < d) {
                // Most likely leased ahead and finished since.
                return Err(LeaseError::Finished(offset));
            }
            return Err(LeaseError::NotDelivered(offset));
        };
        match slot.state {
            State::Done => Err(LeaseError::Finished(offset)),
            State::Pending => Err(LeaseError::NotDelivered(offset)),
            _ if slot.lease != lease => Err(LeaseError::Stale(offset)),
            State::DeadLettering => Err(LeaseError::DeadLettering(offset)),
            _ => Ok(*slot),
        }
    }

    /// Acknowledges a delivery. A late ack (its invisible time passed but
    /// nobody received it again) still counts.
    pub fn ack(&mut self, offset: u64, lease: u64) -> Result<(), LeaseError> {
        let slot = self.check(offset, lease)?;
        match slot.state {
            State::InFlight { deadline_ms } => {
                self.timers.remove(&(deadline_ms, offset));
            }
            State::Retry { not_before_ms } => {
                self.timers.remove(&(not_before_ms, offset));
                self.ready_remove(offset);
            }
            _ => unreachable!("checked"),
        }
        self.finish(offset);
        self.journaled(Event::Ack {
            offset,
            lease,
            now_ms: self.now_ms,
            count: 1,
        });
        Ok(())
    }

    /// Fails a leased delivery: retried after `delay_ms`, or after the
    /// backoff for its attempt when `None`; dead-lettered when it was the
    /// last attempt.
    pub fn nack(
        &mut self,
        offset: u64,
        lease: u64,
        delay_ms: Option<u64>,
    ) -> Result<(), LeaseError> {
        let slot = self.check(offset, lease)?;
        let delay = delay_ms.unwrap_or_else(|| self.cfg.backoff.delay_ms(slot.attempt));
        self.nack_until(offset, lease, self.now_ms.saturating_add(delay))
    }

    fn nack_until(
        &mut self,
        offset: u64,
        lease: u64,
        not_before_ms: u64,
    ) -> Result<(), LeaseError> {
        let slot = self.check(offset, lease)?;
        let State::InFlight { deadline_ms } = slot.state else {
            return Err(LeaseError::NotLeased(offset));
        };
        self.timers.remove(&(deadline_ms, offset));
        self.fail(offset, not_before_ms);
        self.journal.push(Event::Nack {
            offset,
            lease,
            not_before_ms,
            now_ms: self.now_ms,
        });
        Ok(())
    }

    /// Moves a leased delivery's deadline to `invisible_ms` from now.
    pub fn change_invisible(
        &mut self,
        offset: u64,
        lease: u64,
        invisible_ms: u64,
    ) -> Result<u64, LeaseError> {
        let deadline_ms = self.now_ms.saturating_add(invisible_ms);
        self.invisible_until(offset, lease, deadline_ms)?;
        Ok(deadline_ms)
    }

    fn invisible_until(
        &mut self,
        offset: u64,
        lease: u64,
        deadline_ms: u64,
    ) -> Result<(), LeaseError> {
        let slot = self.check(offset, lease)?;
        let State::InFlight { deadline_ms: old } = slot.state else {
            return Err(LeaseError::NotLeased(offset));
        };
        self.timers.remove(&(old, offset));
        self.slot_mut(offset).state = State::InFlight { deadline_ms };
        self.timers.insert((deadline_ms, offset));
        self.journal.push(Event::Invisible {
            offset,
            lease,
            deadline_ms,
            now_ms: self.now_ms,
        });
        Ok(())
    }

    /// Messages whose attempts ran out since the last call.
    pub fn take_dead_letters(&mut self) -> Vec<DeadLetter> {
        std::mem::take(&mut self.dead_letters)
    }

    /// The shard stored `offset` in the dead-letter topic: it is finished.
    pub fn dead_lettered(&mut self, offset: u64) {
        if self.is_dead_lettering(offset) {
            self.finish(offset);
            self.journal.push(Event::DeadLettered {
                offset,
                now_ms: self.now_ms,
            });
        }
    }

    fn is_dead_lettering(&self, offset: u64) -> bool {
        self.slot(offset)
            .is_some_and(|s| s.state == State::DeadLettering)
    }

    /// Leaves `n` lease numbers unused (after a restart: leases handed out
    /// in deliveries the journal lost must never be handed out again).
    pub fn skip_leases(&mut self, n: u64) {
        self.next_lease = self.next_lease.saturating_add(n);
    }

    /// Moves an empty window's floor up to `offset` (the messages below are
    /// gone: retention deleted them). False, and nothing changes, when the
    /// window holds slots. Not journaled: the shard stores a snapshot.
    pub fn skip_to(&mut self, offset: u64) -> bool {
        if !self.slots.is_empty() {
            return false;
        }
        self.floor = self.floor.max(offset);
        // Ahead slots of messages retention deleted go too.
        while let Some(o) = self.ahead.first_key_value().map(|(&o, _)| o) {
            if o >= self.floor {
                break;
            }
            self.drop_ahead(o);
        }
        true
    }

    /// Where a message stands, for describing the group: (in flight or
    /// waiting to be retried, dead-lettering).
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for (_, s) in self.all_slots() {
            match s.state {
                State::InFlight { .. } => c.0 += 1,
                State::Retry { .. } => c.1 += 1,
                State::DeadLettering => c.2 += 1,
                _ => {}
            }
        }
        c
    }

    /// Transitions since the last call, to journal (in order).
    pub fn take_journal(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.journal)
    }

    /// Replays one journaled transition on the window rebuilt so far (after
    /// a restart): the clock first advances to when it happened, so the
    /// timeouts before it fire again, then it is applied as it was.
    /// `group_of` gives the message group of offsets taken into the window
    /// (orderly). A record that does not fit is refused and changes nothing
    /// but the clock.
    pub fn apply(
        &mut self,
        e: &Event,
        group_of: impl FnMut(u64) -> MessageGroup,
    ) -> Result<(), JournalError> {
        self.apply_with(e, group_of, |_| 0)
    }

    /// [`DeliveryWindow::apply`], with `priority_of` giving the priority of
    /// offsets a non-orderly window takes in.
    pub fn apply_with(
        &mut self,
        e: &Event,
        group_of: impl FnMut(u64) -> MessageGroup,
        priority_of: impl FnMut(u64) -> u8,
    ) -> Result<(), JournalError> {
        self.apply_from(e, 0, group_of, priority_of)
    }

    /// [`DeliveryWindow::apply_with`] for the transitions of a journal
    /// record (a run) after its first `skip`.
    pub fn apply_from(
        &mut self,
        e: &Event,
        skip: usize,
        mut group_of: impl FnMut(u64) -> MessageGroup,
        mut priority_of: impl FnMut(u64) -> u8,
    ) -> Result<(), JournalError> {
        e.each()
            .skip(skip)
            .try_for_each(|one| self.apply_one(&one, &mut group_of, &mut priority_of, u64::MAX))
    }

    /// [`DeliveryWindow::apply_with`] where `priority_of` knows only the
    /// offsets below `known_to` (and those of the record itself): a
    /// delivery takes the window in no further. When that is not far
    /// enough, the transition is refused with how many of the record's
    /// went in before it: retry the rest ([`DeliveryWindow::apply_from`])
    /// knowing more.
    pub fn apply_known(
        &mut self,
        e: &Event,
        mut group_of: impl FnMut(u64) -> MessageGroup,
        mut priority_of: impl FnMut(u64) -> u8,
        known_to: u64,
    ) -> Result<(), (usize, JournalError)> {
        for (i, one) in e.each().enumerate() {
            self.apply_one(&one, &mut group_of, &mut priority_of, known_to)
                .map_err(|err| (i, err))?;
        }
        Ok(())
    }

    fn apply_one(
        &mut self,
        e: &Event,
        group_of: &mut impl FnMut(u64) -> MessageGroup,
        priority_of: &mut impl FnMut(u64) -> u8,
        known_to: u64,
    ) -> Result<(), JournalError> {
        self.advance(e.now_ms());
        let journaled = self.journal.len();
        let r = match *e {
            Event::Deliver {
                offset,
                lease,
                attempt,
                deadline_ms,
                ..
            } => self.apply_deliver(
                Lease {
                    offset,
                    attempt,
                    lease,
                    deadline_ms,
                    due_ms: None,
                },
                group_of,
                priority_of,
                known_to,
            ),
            Event::Ack { offset, lease, .. } => self.ack(offset, lease).map_err(|_| "ack"),
            Event::Nack {
                offset,
                lease,
                not_before_ms,
                ..
            } => self
                .nack_until(offset, lease, not_before_ms)
                .map_err(|_| "nack"),
            Event::Invisible {
                offset,
                lease,
                deadline_ms,
                ..
            } => self
                .invisible_until(offset, lease, deadline_ms)
                .map_err(|_| "invisible"),
            Event::DeadLettered { offset, .. } => {
                if self.is_dead_lettering(offset) {
                    self.finish(offset);
                    Ok(())
                } else {
                    Err("dead-lettered")
                }
            }
        };
        self.journal.truncate(journaled);
        r.map_err(JournalError::Inconsistent)
    }

    fn apply_deliver(
        &mut self,
        l: Lease,
        group_of: &mut impl FnMut(u64) -> MessageGroup,
        priority_of: &mut impl FnMut(u64) -> u8,
        known_to: u64,
    ) -> Result<(), &'static str> {
        if l.offset < self.floor || l.lease < self.next_lease {
            return Err("deliver of a finished offset or with an old lease");
        }
        // Take in up to it while there is room (finished slots taken in
        // move the floor), as the receive that leased it did.
        while self.next() <= l.offset
            && self.next() < known_to
            && self.slots.len() < self.cfg.inflight_max as usize
        {
            self.take(group_of, Some(&mut *priority_of));
        }
        if self.next() <= l.offset {
            // Leased ahead of the window by priority.
            if self.cfg.orderly {
                return Err("deliver beyond the window");
            }
            if !self.ahead.contains_key(&l.offset) {
                let p = priority_of(l.offset).min(PRIORITY_MAX);
                if p == 0 || l.offset < self.ahead_done[usize::from(p)] {
                    return Err("deliver beyond the window of no priority or finished");
                }
                self.add_ahead(l.offset, p);
            }
        }
        let slot = *self.slot(l.offset).expect("taken");
        let due = match slot.state {
            State::Pending if !self.cfg.orderly => true,
            State::Pending => {
                self.unblocked.contains(&l.offset)
                    || !self
                        .waiting
                        .get(&slot.group)
                        .is_some_and(|w| w.contains(&l.offset))
            }
            State::Retry { .. } => self.ready.contains(&l.offset),
            _ => false,
        };
        if !due || l.attempt != slot.attempt + 1 {
            return Err("deliver of a message that was not due");
        }
        self.ready_remove(l.offset);
        self.unblocked.remove(&l.offset);
        self.deliver_as(l);
        Ok(())
    }

    /// After a restore and replay: the dead letters to store are the ones
    /// not stored yet.
    pub fn replayed(&mut self) {
        self.journal.clear();
        self.dead_letters = self
            .all_slots()
            .filter(|(_, s)| s.state == State::DeadLettering)
            .map(|(offset, s)| DeadLetter {
                offset,
                attempts: s.attempt,
            })
            .collect();
    }

    /// What a restart must rebuild: the floor, the lease counter, every
    /// slot that is not merely pending, the timers and the ready set
    /// (the simulation compares it).
    #[cfg(test)]
    pub(crate) fn durable_view(&self, end: u64, priority_of: impl Fn(u64) -> u8) -> DurableView {
        let mut slots: Vec<_> = self
            .all_slots()
            .filter(|(_, s)| !matches!(s.state, State::Pending | State::Done))
            .map(|(o, s)| (o, s.state, s.attempt, s.lease))
            .collect();
        slots.sort_unstable_by_key(|s| s.0);
        // Finished slots not yet taken in are as good as passed.
        let floor = (self.floor..end)
            .find(|&o| !self.is_finished(o, priority_of(o)))
            .unwrap_or(end.max(self.floor));
        DurableView {
            floor,
            next_lease: self.next_lease,
            slots,
            finished: (floor..end)
                .filter(|&o| self.is_finished(o, priority_of(o)))
                .collect(),
            timers: self.timers.iter().copied().collect(),
            ready: self.ready.iter().copied().collect(),
        }
    }

    /// Whether the message at `offset` (of `priority`) is acked or
    /// dead-lettered, as far as the window knows.
    #[cfg(test)]
    pub(crate) fn is_finished(&self, offset: u64, priority: u8) -> bool {
        match self.slot(offset) {
            Some(s) => s.state == State::Done,
            None => {
                offset < self.floor
                    || offset >= self.next()
                        && offset < self.ahead_done[usize::from(priority.min(PRIORITY_MAX))]
            }
        }
    }

    /// Whether `offset` has an ahead slot (the simulation checks the scan's
    /// promise).
    #[cfg(test)]
    pub(crate) fn is_ahead(&self, offset: u64) -> bool {
        self.ahead.contains_key(&offset)
    }

    /// Where the scan of `priority` stands: every offset of it in
    /// `[max(next, done), cursor)` is an ahead slot.
    #[cfg(test)]
    pub(crate) fn ahead_cursor(&self, priority: u8) -> (u64, u64) {
        let p = usize::from(priority);
        (self.ahead_done[p], self.ahead_cursor[p])
    }

    fn finish(&mut self, offset: u64) {
        let slot = self.slot_mut(offset);
        slot.state = State::Done;
        let group = slot.group;
        if self.cfg.orderly && self.busy.get(&group) == Some(&offset) {
            self.busy.remove(&group);
            if let Some(w) = self.waiting.get_mut(&group) {
                if let Some(next) = w.pop_front() {
                    self.unblocked.insert(next);
                    // Held for the unblocked one until it is delivered.
                    self.busy.insert(group, next);
                }
                if w.is_empty() {
                    self.waiting.remove(&group);
                }
            }
        }
        if offset >= self.next() {
            let p = usize::from(self.ahead[&offset].priority);
            self.compact(p);
        } else {
            self.trim();
        }
    }
}

/// Bytes of a window snapshot's header.
pub const SNAPSHOT_HEADER_BYTES: usize = 40;
/// Bytes per slot in a window snapshot.
pub const SNAPSHOT_SLOT_BYTES: usize = 32;
/// Bytes of a snapshot's priority part (version 2): per priority 1 to 9,
/// its done mark and scan cursor (u64 each).
pub const SNAPSHOT_PRIORITY_BYTES: usize = 16 * (PRIORITIES - 1);
/// Bytes per ahead slot in a snapshot: its offset (u64), then a slot.
pub const SNAPSHOT_AHEAD_BYTES: usize = 8 + SNAPSHOT_SLOT_BYTES;
const SNAPSHOT_VERSION: u8 = 2;

/// Most bytes of a window snapshot under `inflight_max` (the group's
/// journal stores it as one record).
pub fn snapshot_bytes_max(inflight_max: u32) -> u64 {
    let ahead = inflight_max.min(PRIORITY_AHEAD_MAX);
    SNAPSHOT_HEADER_BYTES as u64
        + u64::from(inflight_max) * SNAPSHOT_SLOT_BYTES as u64
        + SNAPSHOT_PRIORITY_BYTES as u64
        + u64::from(ahead) * SNAPSHOT_AHEAD_BYTES as u64
}

/// CRC-32 of a snapshot's header but the CRC field, then the rest
/// (version 1: header bytes 36..40 were reserved and left out).
fn snapshot_crc(b: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..32]);
    if b[0] == 1 {
        h.update(&b[SNAPSHOT_HEADER_BYTES..]);
    } else {
        h.update(&b[36..]);
    }
    h.finalize()
}

/// Why a window snapshot was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("window snapshot of {0} bytes is cut short or too long")]
    Length(usize),
    #[error("window snapshot version {0} is not known")]
    Version(u8),
    #[error("window snapshot checksum mismatch")]
    Checksum,
    #[error("window snapshot slot {0} has an unknown state {1}")]
    State(u32, u8),
    #[error("window snapshot holds {0} slots, more than {INFLIGHT_MESSAGES_MAX_LIMIT}")]
    TooManySlots(u32),
    #[error("window snapshot field `{0}` must be zero")]
    NonZero(&'static str),
    #[error("window snapshot ahead slot at {0} is not past the window or has no priority")]
    Ahead(u64),
}

fn encode_slot(s: &Slot) -> [u8; SNAPSHOT_SLOT_BYTES] {
    let (kind, time) = match s.state {
        State::Pending => (1u8, 0),
        State::InFlight { deadline_ms } => (2, deadline_ms),
        State::Retry { not_before_ms } => (3, not_before_ms),
        State::DeadLettering => (4, 0),
        State::Done => (5, 0),
    };
    let mut r = [0u8; SNAPSHOT_SLOT_BYTES];
    r[0] = kind;
    r[1] = s.priority;
    r[4..8].copy_from_slice(&s.attempt.to_le_bytes());
    r[8..16].copy_from_slice(&s.lease.to_le_bytes());
    r[16..24].copy_from_slice(&time.to_le_bytes());
    r[24..32].copy_from_slice(&s.group.to_le_bytes());
    r
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().unwrap())
}

/// A slot record (`i` names it in errors).
fn decode_slot(i: u32, r: &[u8]) -> Result<Slot, SnapshotError> {
    if r[1] > PRIORITY_MAX || r[2..4] != [0, 0] {
        return Err(SnapshotError::NonZero("slot reserved"));
    }
    let time = u64_at(r, 16);
    let state = match r[0] {
        1 => State::Pending,
        2 => State::InFlight { deadline_ms: time },
        3 => State::Retry {
            not_before_ms: time,
        },
        4 => State::DeadLettering,
        5 => State::Done,
        k => return Err(SnapshotError::State(i, k)),
    };
    Ok(Slot {
        state,
        attempt: u32_at(r, 4),
        lease: u64_at(r, 8),
        group: u64_at(r, 24),
        priority: r[1],
    })
}

impl DeliveryWindow {
    /// The whole window as bytes: a 40-byte header (version u8 2, 3
    /// reserved, slot count u32, floor u64, next lease u64, clock u64,
    /// CRC-32 u32 of every other byte, ahead slot count u32), one 32-byte
    /// record per slot from the floor (state u8: 1 pending, 2 in flight,
    /// 3 retry, 4 dead-lettering, 5 done; priority u8; 2 reserved; attempt
    /// u32; lease u64; deadline or retry time u64; message group u64, or for
    /// a non-orderly pending slot when it was taken), the priority part
    /// (per priority 1 to 9: done mark u64, scan cursor u64) and one 40-byte
    /// record per ahead slot (offset u64, then a slot record). Restored,
    /// with the journal after it replayed, it is the window that ran.
    /// Version 1 (no ahead slots, no priority part, bytes 36..40 reserved
    /// and outside the CRC) is still read.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(
            SNAPSHOT_HEADER_BYTES
                + self.slots.len() * SNAPSHOT_SLOT_BYTES
                + SNAPSHOT_PRIORITY_BYTES
                + self.ahead.len() * SNAPSHOT_AHEAD_BYTES,
        );
        b.resize(SNAPSHOT_HEADER_BYTES, 0);
        b[0] = SNAPSHOT_VERSION;
        b[4..8].copy_from_slice(&(self.slots.len() as u32).to_le_bytes());
        b[8..16].copy_from_slice(&self.floor.to_le_bytes());
        b[16..24].copy_from_slice(&self.next_lease.to_le_bytes());
        b[24..32].copy_from_slice(&self.now_ms.to_le_bytes());
        b[36..40].copy_from_slice(&(self.ahead.len() as u32).to_le_bytes());
        for s in &self.slots {
            b.extend_from_slice(&encode_slot(s));
        }
        for p in 1..PRIORITIES {
            b.extend_from_slice(&self.ahead_done[p].to_le_bytes());
            b.extend_from_slice(&self.ahead_cursor[p].to_le_bytes());
        }
        for (o, s) in &self.ahead {
            b.extend_from_slice(&o.to_le_bytes());
            b.extend_from_slice(&encode_slot(s));
        }
        let crc = snapshot_crc(&b);
        b[32..36].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// The window a snapshot holds, under `cfg` (the group's settings now).
    /// Apply the journal after it, then call [`DeliveryWindow::replayed`].
    pub fn restore(cfg: WindowConfig, b: &[u8]) -> Result<DeliveryWindow, SnapshotError> {
        if b.len() < SNAPSHOT_HEADER_BYTES {
            return Err(SnapshotError::Length(b.len()));
        }
        let version = b[0];
        if version != 1 && version != SNAPSHOT_VERSION {
            return Err(SnapshotError::Version(version));
        }
        let count = u32_at(b, 4);
        let ahead = if version == 1 { 0 } else { u32_at(b, 36) };
        if count > INFLIGHT_MESSAGES_MAX_LIMIT {
            return Err(SnapshotError::TooManySlots(count));
        }
        if ahead > INFLIGHT_MESSAGES_MAX_LIMIT {
            return Err(SnapshotError::TooManySlots(ahead));
        }
        let slots_end = SNAPSHOT_HEADER_BYTES + count as usize * SNAPSHOT_SLOT_BYTES;
        let len = if version == 1 {
            slots_end
        } else {
            slots_end + SNAPSHOT_PRIORITY_BYTES + ahead as usize * SNAPSHOT_AHEAD_BYTES
        };
        if b.len() != len {
            return Err(SnapshotError::Length(b.len()));
        }
        if snapshot_crc(b) != u32_at(b, 32) {
            return Err(SnapshotError::Checksum);
        }
        if b[1..4] != [0, 0, 0] || version == 1 && b[36..40] != [0, 0, 0, 0] {
            return Err(SnapshotError::NonZero("reserved"));
        }
        let mut w = DeliveryWindow::new(cfg, u64_at(b, 8), u64_at(b, 16));
        w.now_ms = u64_at(b, 24);
        for (i, r) in b[SNAPSHOT_HEADER_BYTES..slots_end]
            .chunks_exact(SNAPSHOT_SLOT_BYTES)
            .enumerate()
        {
            w.slots.push_back(decode_slot(i as u32, r)?);
        }
        if version > 1 {
            let part = &b[slots_end..slots_end + SNAPSHOT_PRIORITY_BYTES];
            for p in 1..PRIORITIES {
                w.ahead_done[p] = u64_at(part, (p - 1) * 16);
                w.ahead_cursor[p] = u64_at(part, (p - 1) * 16 + 8);
            }
            let next = w.next();
            for (i, r) in b[slots_end + SNAPSHOT_PRIORITY_BYTES..]
                .chunks_exact(SNAPSHOT_AHEAD_BYTES)
                .enumerate()
            {
                let offset = u64_at(r, 0);
                let s = decode_slot(count + i as u32, &r[8..])?;
                if offset < next || s.priority == 0 || w.cfg.orderly {
                    return Err(SnapshotError::Ahead(offset));
                }
                w.ahead.insert(offset, s);
                w.ahead_of[usize::from(s.priority)].insert(offset);
            }
        }
        // What the slots imply: timers, the ready set, orderly blocking.
        let all: Vec<(u64, Slot)> = w.all_slots().map(|(o, s)| (o, *s)).collect();
        let mut heads: HashMap<MessageGroup, ()> = HashMap::new();
        for (offset, s) in all {
            match s.state {
                State::InFlight { deadline_ms } => {
                    w.timers.insert((deadline_ms, offset));
                }
                State::Retry { not_before_ms } if not_before_ms <= w.now_ms => {
                    w.ready_insert(offset);
                }
                State::Pending if !w.cfg.orderly => {
                    w.pending.insert(offset);
                    w.pending_by_priority.insert((Reverse(s.priority), offset));
                }
                State::Retry { not_before_ms } => {
                    w.timers.insert((not_before_ms, offset));
                }
                _ => {}
            }
            if !w.cfg.orderly || s.state == State::Done {
                continue;
            }
            if heads.insert(s.group, ()).is_none() {
                w.busy.insert(s.group, offset);
                if s.state == State::Pending {
                    w.unblocked.insert(offset);
                }
            } else if s.state == State::Pending {
                w.waiting.entry(s.group).or_default().push_back(offset);
            }
        }
        Ok(w)
    }
}

/// The part of a window a restart rebuilds (tests compare it).
#[cfg(test)]
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct DurableView {
    floor: u64,
    next_lease: u64,
    slots: Vec<(u64, State, u32, u64)>,
    finished: Vec<u64>,
    timers: Vec<(u64, u64)>,
    ready: Vec<u64>,
}

#[cfg(test)]
mod sim;

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(orderly: bool) -> WindowConfig {
        WindowConfig {
            inflight_max: 8,
            attempts_max: 3,
            orderly,
            backoff: Backoff::new(vec![100, 200]).unwrap(),
            priority_age_boost_ms: 1000,
        }
    }

    #[test]
    fn a_lease_expires_into_a_retry_and_its_old_handle_is_refused() {
        let mut w = DeliveryWindow::new(cfg(false), 0, 1);
        let a = w.receive(0, 2, 50, 10, |_| 0);
        assert_eq!(a.iter().map(|l| l.offset).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(a[0].deadline_ms, 50);
        // Not due yet: only new offsets come.
        let b = w.receive(49, 1, 50, 10, |_| 0);
        assert_eq!(b[0].offset, 2);
        assert_eq!(w.next_due_ms(), Some(50));
        // At the deadline offset 0 is due again, attempt 2, a new lease.
        let c = w.receive(50, 1, 50, 10, |_| 0);
        assert_eq!((c[0].offset, c[0].attempt), (0, 2));
        assert!(c[0].lease > b[0].lease);
        assert_eq!(w.ack(0, a[0].lease), Err(LeaseError::Stale(0)));
        w.ack(0, c[0].lease).unwrap();
        assert_eq!(w.ack(0, c[0].lease), Err(LeaseError::Finished(0)));
        assert_eq!(w.floor(), 1);
        assert_eq!(w.ack(7, 99), Err(LeaseError::NotDelivered(7)));
    }

    #[test]
    fn a_nack_waits_its_backoff_and_the_last_attempt_is_dead_lettered() {
        let mut w = DeliveryWindow::new(cfg(false), 0, 1);
        let l1 = w.receive(0, 1, 1000, 1, |_| 0)[0];
        w.nack(0, l1.lease, None).unwrap();
        assert!(w.receive(99, 1, 1000, 1, |_| 0).is_empty());
        let l2 = w.receive(100, 1, 1000, 1, |_| 0)[0];
        assert_eq!(l2.attempt, 2);
        w.nack(0, l2.lease, Some(5)).unwrap();
        assert!(w.receive(104, 1, 1000, 1, |_| 0).is_empty());
        let l3 = w.receive(105, 1, 1000, 1, |_| 0)[0];
        assert_eq!(l3.attempt, 3);
        assert_eq!(w.nack(0, l2.lease, None), Err(LeaseError::Stale(0)));
        // The third and last attempt times out: dead letter.
        w.advance(1105);
        assert_eq!(
            w.take_dead_letters(),
            [DeadLetter {
                offset: 0,
                attempts: 3
            }]
        );
        assert_eq!(w.ack(0, l3.lease), Err(LeaseError::DeadLettering(0)));
        assert!(w.receive(5000, 1, 1000, 1, |_| 0).is_empty());
        w.dead_lettered(0);
        assert_eq!(w.floor(), 1);
    }

    #[test]
    fn receive_due_takes_only_what_is_due_and_has_due_says_so_first() {
        let mut w = DeliveryWindow::new(cfg(false), 0, 1);
        let got = w.receive(0, 2, 1000, 10, |_| 0);
        w.nack(0, got[0].lease, Some(50)).unwrap();
        assert!(!w.has_due(49));
        assert!(w.receive_due(49, 8, 1000).is_empty());
        // Due at 50: told before the clock moves, then leased alone (new
        // offsets 2.. wait for `receive`).
        assert!(w.has_due(50));
        let due = w.receive_due(50, 8, 1000);
        assert_eq!(
            due.iter()
                .map(|l| (l.offset, l.attempt))
                .collect::<Vec<_>>(),
            [(0, 2)]
        );
        assert!(!w.has_due(50));
        // An expired lease is due at its deadline.
        assert!(!w.has_due(999));
        assert!(w.has_due(1000));
        assert_eq!(w.receive_due(1000, 8, 1000)[0].offset, 1);
    }

    #[test]
    fn a_full_window_pauses_the_queue_and_a_late_ack_counts() {
        let mut w = DeliveryWindow::new(cfg(false), 0, 1);
        let got = w.receive(0, 100, 10, 100, |_| 0);
        assert_eq!(got.len(), 8);
        assert!(w.receive(1, 100, 10, 100, |_| 0).is_empty());
        w.advance(20);
        // Expired, not yet received again: the original lease may still ack.
        w.ack(0, got[0].lease).unwrap();
        assert_eq!(w.floor(), 1);
        let more = w.receive(20, 100, 10, 100, |_| 0);
        // Seven retries first, then one new offset in the freed slot.
        assert_eq!(
            more.iter().map(|l| l.offset).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5, 6, 7, 8]
        );
    }

    #[test]
    fn priority_beyond_a_full_window_goes_first_and_finished_ones_are_forgotten() {
        let c = WindowConfig {
            inflight_max: 4,
            priority_age_boost_ms: 0,
            ..cfg(false)
        };
        // 0..20 visible; 9 at 10 and 15, 5 at 12, the rest 0.
        let prio = |o: u64| match o {
            10 | 15 => 9,
            12 => 5,
            _ => 0,
        };
        let found: Vec<(u64, u8)> = (0..20)
            .filter(|&o| prio(o) > 0)
            .map(|o| (o, prio(o)))
            .collect();
        let mut w = DeliveryWindow::new(c.clone(), 0, 1);
        w.take_prioritized(0, 20, prio);
        assert_eq!(w.next(), 4, "the window is full");
        let from = w.ahead_scan_from(20).expect("a scan beyond the window");
        assert_eq!(from, 4);
        w.offer_ahead(from, 20, &found);
        assert_eq!(w.ahead_scan_from(20), None, "all known");
        let mut got = Vec::new();
        w.receive_prioritized(0, 3, 100, 20, prio, &mut got);
        assert_eq!(
            got.iter().map(|l| l.offset).collect::<Vec<_>>(),
            [10, 15, 12]
        );
        // Acked, the two of priority 9 are forgotten (10 was the first of
        // its priority, then 15), the 5 stays until 12 is done.
        for l in &got[..2] {
            w.ack(l.offset, l.lease).unwrap();
        }
        assert_eq!(w.ahead_len(), 1);
        assert_eq!(w.ack(10, got[0].lease), Err(LeaseError::Finished(10)));
        // A snapshot keeps what is finished ahead.
        let mut r = DeliveryWindow::restore(c.clone(), &w.snapshot()).unwrap();
        r.replayed();
        assert_eq!(r.durable_view(20, prio), w.durable_view(20, prio));
        // The window moves on over them without delivering them again.
        w.ack(12, got[2].lease).unwrap();
        let mut rest = Vec::new();
        for _ in 0..20 {
            w.receive_prioritized(1, 4, 100, 20, prio, &mut rest);
            for l in rest.drain(..) {
                assert!(![10, 12, 15].contains(&l.offset), "{l:?} again");
                w.ack(l.offset, l.lease).unwrap();
            }
        }
        assert_eq!((w.floor(), w.ahead_len()), (20, 0));
    }

    #[test]
    fn a_better_priority_evicts_a_lower_pending_one_from_full_ahead_slots() {
        let c = WindowConfig {
            inflight_max: 2,
            priority_age_boost_ms: 0,
            ..cfg(false)
        };
        let prio = |o: u64| match o {
            5 | 6 => 1,
            9 => 8,
            _ => 0,
        };
        let mut w = DeliveryWindow::new(c, 0, 1);
        w.take_prioritized(0, 12, prio);
        // A first scan finds the two of priority 1: the ahead slots are full.
        w.offer_ahead(2, 8, &[(5, 1), (6, 1)]);
        assert_eq!(w.ahead_len(), 2);
        let from = w.ahead_scan_from(12).expect("8 may evict");
        w.offer_ahead(from, 12, &[(5, 1), (6, 1), (9, 8)]);
        let mut got = Vec::new();
        w.receive_prioritized(0, 2, 100, 12, prio, &mut got);
        assert_eq!(got.iter().map(|l| l.offset).collect::<Vec<_>>(), [9, 5]);
        // 6 was forgotten and its priority's scan goes back to it.
        assert_eq!(w.ahead_cursor(1).1, 6);
    }

    #[test]
    fn a_snapshot_restores_the_window_and_refuses_damage() {
        let mut w = DeliveryWindow::new(cfg(true), 10, 1);
        let got = w.receive(5, 10, 100, 16, |o| o % 3);
        w.nack(got[0].offset, got[0].lease, Some(50)).unwrap();
        w.ack(got[1].offset, got[1].lease).unwrap();
        let snap = w.snapshot();
        assert_eq!(
            snap.len(),
            SNAPSHOT_HEADER_BYTES + w.len() * SNAPSHOT_SLOT_BYTES + SNAPSHOT_PRIORITY_BYTES
        );
        let mut r = DeliveryWindow::restore(cfg(true), &snap).unwrap();
        r.replayed();
        assert_eq!(r.durable_view(16, |_| 0), w.durable_view(16, |_| 0));
        // Both go on the same way.
        let a = w.receive(60, 10, 100, 16, |o| o % 3);
        let b = r.receive(60, 10, 100, 16, |o| o % 3);
        assert_eq!(a, b);
        assert_eq!(
            DeliveryWindow::restore(cfg(true), &snap[..39]).unwrap_err(),
            SnapshotError::Length(39)
        );
        assert_eq!(
            DeliveryWindow::restore(cfg(true), &snap[..snap.len() - 1]).unwrap_err(),
            SnapshotError::Length(snap.len() - 1)
        );
        let mut bad = snap.clone();
        bad[SNAPSHOT_HEADER_BYTES + 9] ^= 1;
        assert_eq!(
            DeliveryWindow::restore(cfg(true), &bad).unwrap_err(),
            SnapshotError::Checksum
        );
        let mut v = snap.clone();
        v[0] = 3;
        assert_eq!(
            DeliveryWindow::restore(cfg(true), &v).unwrap_err(),
            SnapshotError::Version(3)
        );
        let mut huge = snap;
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            DeliveryWindow::restore(cfg(true), &huge).unwrap_err(),
            SnapshotError::TooManySlots(u32::MAX)
        );
    }

    #[test]
    fn orderly_holds_a_group_behind_its_unfinished_message_and_not_the_others() {
        let mut w = DeliveryWindow::new(cfg(true), 0, 1);
        // Offsets 0, 2, 4 are group A; 1, 3 group B.
        let group = |o: u64| o % 2;
        let first = w.receive(0, 10, 100, 5, group);
        assert_eq!(first.iter().map(|l| l.offset).collect::<Vec<_>>(), [0, 1]);
        w.nack(0, first[0].lease, None).unwrap();
        w.ack(1, first[1].lease).unwrap();
        // B moves on; A waits for its retry of 0, never skipping to 2.
        let second = w.receive(1, 10, 100, 5, group);
        assert_eq!(second.iter().map(|l| l.offset).collect::<Vec<_>>(), [3]);
        let third = w.receive(100, 10, 100, 5, group);
        assert_eq!(
            third
                .iter()
                .map(|l| (l.offset, l.attempt))
                .collect::<Vec<_>>(),
            [(0, 2)]
        );
        w.ack(0, third[0].lease).unwrap();
        let fourth = w.receive(100, 10, 100, 5, group);
        assert_eq!(fourth.iter().map(|l| l.offset).collect::<Vec<_>>(), [2]);
    }
}
