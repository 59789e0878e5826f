//! Scheduled delivery: plain state, no I/O (the shard's timer,
//! `shard::timer`, drives it and stores it).
//!
//! A produced batch holding a record due later is stored, whole, in the
//! shard's timer queue ([`crate::ids::TIMER_QUEUE`]) as a *scheduled
//! batch*; each of its records due later is a *pending* entry here, keyed
//! by its *origin* (the batch's log position and the record's index: its
//! message id). The entry costs the index, never the payload: where the
//! record is stored (its origin, or where it was carried before retention
//! removed its segment), its target queue, its tag bits and its priority.
//! When it falls due, the timer appends a *reference* to the target queue
//! (the record stays where it is; readers resolve the reference into a
//! view of it), so firing a million messages writes a million small index
//! records, not a million copies.
//!
//! [`TimerState`] is the set of pending entries in a [`TimerWheel`], the
//! carried locations, and the retention pins of references (a reference
//! keeps the segment of the record it points at).

pub mod entry;
pub mod wheel;

#[cfg(test)]
mod sim;

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

/// A fast hasher for log positions and record indexes (FxHash's mix): the
/// keys are the broker's own numbers, not a client's, so no SipHash is
/// needed against flooding, and a burst of fires hashes a million of them.
#[derive(Default, Clone, Copy)]
pub struct PositionHasher(u64);

impl Hasher for PositionHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7C_C1_B7_27_22_0A_95);
    }
}

/// A map keyed by log positions or records ([`PositionHasher`]).
pub type PositionMap<K, V> = HashMap<K, V, BuildHasherDefault<PositionHasher>>;

pub use wheel::{TimerKey, TimerWheel, WHEEL_RANGE_MS};

/// A stored record: its batch's log position and its index in the batch
/// (a scheduled message's origin is its id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordAt {
    pub position: u64,
    pub index: u32,
}

/// Where a scheduled message's record is stored now: the batch's log
/// position, the record's index in it and its byte offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Location {
    pub position: u64,
    pub index: u32,
    pub offset: u32,
}

impl Location {
    /// The record it names.
    pub fn record(&self) -> RecordAt {
        RecordAt {
            position: self.position,
            index: self.index,
        }
    }
}

/// A pending entry as the wheel holds it. Ordered by origin, so entries
/// due in the same millisecond fire in the order they were produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pending {
    pub origin: RecordAt,
    /// Queue id the message is delivered in.
    pub target: u32,
    /// Its tag's bits (`batch::tag_bloom`; 0 without a tag).
    pub tags: u32,
    /// Bytes of its record as framed in a batch (what a view of it holds)
    /// and their CRC-32.
    pub len: u32,
    pub crc: u32,
    /// The record's byte offset in its origin batch.
    pub offset: u32,
    pub priority: u8,
}

impl Pending {
    /// Where its record was produced.
    pub fn origin_location(&self) -> Location {
        Location {
            position: self.origin.position,
            index: self.origin.index,
            offset: self.offset,
        }
    }
}

/// A pending entry with its due time and where its record is now: what
/// fires, what a cancel removes, what a snapshot stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timer {
    pub due_ms: u64,
    pub pending: Pending,
    pub location: Location,
}

/// References are pinned by bucket of their own log position: 16 MiB.
const PIN_BUCKET_SHIFT: u32 = 24;

/// The pending entries of one shard and the pins of its references.
pub struct TimerState {
    wheel: TimerWheel<Pending>,
    by_origin: PositionMap<RecordAt, TimerKey>,
    /// Locations of entries carried away from their origin.
    carried: PositionMap<RecordAt, Location>,
    /// Per bucket of reference positions (`position >> 24`), the lowest
    /// record position a reference in it points at.
    pins: BTreeMap<u64, u64>,
}

impl TimerState {
    /// No entries; the wheel's time is `now_ms`.
    pub fn new(now_ms: u64) -> TimerState {
        TimerState {
            wheel: TimerWheel::new(now_ms),
            by_origin: PositionMap::default(),
            carried: PositionMap::default(),
            pins: BTreeMap::new(),
        }
    }

    /// Pending entries.
    pub fn len(&self) -> usize {
        self.wheel.len()
    }

    /// True when nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.wheel.is_empty()
    }

    /// Adds a pending entry (false, and nothing changes, when its origin is
    /// already pending).
    pub fn schedule(&mut self, due_ms: u64, pending: Pending) -> bool {
        if self.by_origin.contains_key(&pending.origin) {
            return false;
        }
        let key = self.wheel.insert(due_ms, pending);
        self.by_origin.insert(pending.origin, key);
        true
    }

    /// Restores an entry (from a snapshot): pending, at its location.
    pub fn restore(&mut self, t: Timer) {
        if self.schedule(t.due_ms, t.pending) && t.location != t.pending.origin_location() {
            self.carried.insert(t.pending.origin, t.location);
        }
    }

    /// The pending entry of `origin`, if any.
    pub fn get(&self, origin: RecordAt) -> Option<Timer> {
        let key = self.by_origin.get(&origin)?;
        let (due_ms, pending) = self.wheel.get(*key)?;
        Some(Timer {
            due_ms,
            pending: *pending,
            location: self.location_of(pending),
        })
    }

    /// Removes the pending entry of `origin` (a cancel, or a reference
    /// found at recovery); `None` if it is not pending.
    pub fn remove(&mut self, origin: RecordAt) -> Option<Timer> {
        let key = self.by_origin.remove(&origin)?;
        let (due_ms, pending) = self.wheel.cancel(key)?;
        let location = self
            .carried
            .remove(&origin)
            .unwrap_or(pending.origin_location());
        Some(Timer {
            due_ms,
            pending,
            location,
        })
    }

    /// Where a pending entry's record is stored now.
    pub fn location_of(&self, p: &Pending) -> Location {
        self.carried
            .get(&p.origin)
            .copied()
            .unwrap_or(p.origin_location())
    }

    /// The record of a pending entry was copied to `location`.
    pub fn carried(&mut self, origin: RecordAt, location: Location) {
        if self.by_origin.contains_key(&origin) {
            self.carried.insert(origin, location);
        }
    }

    /// When the timer next has work (see [`TimerWheel::next_wake`]).
    pub fn next_wake(&self) -> Option<u64> {
        self.wheel.next_wake()
    }

    /// The wheel's time.
    pub fn now(&self) -> u64 {
        self.wheel.now()
    }

    /// Every entry due by `now_ms`, in (due, origin) order, removed.
    pub fn advance(&mut self, now_ms: u64) -> Vec<Timer> {
        let fired = self.wheel.advance(now_ms);
        fired
            .into_iter()
            .map(|(due_ms, pending)| {
                self.by_origin.remove(&pending.origin);
                let carried = if self.carried.is_empty() {
                    None
                } else {
                    self.carried.remove(&pending.origin)
                };
                let location = carried.unwrap_or(pending.origin_location());
                Timer {
                    due_ms,
                    pending,
                    location,
                }
            })
            .collect()
    }

    /// The pending entries due in `[from, to)` (to read their records
    /// ahead), with their locations.
    pub fn upcoming(&self, from: u64, to: u64) -> Vec<Timer> {
        let mut due = Vec::new();
        self.wheel.peek_due(from, to, &mut due);
        due.into_iter()
            .map(|(due_ms, p)| Timer {
                due_ms,
                pending: p,
                location: self.location_of(&p),
            })
            .collect()
    }

    /// A reference batch stored at `position` points at records from
    /// `min_location` on: retention keeps that record's segment while the
    /// reference's is kept.
    pub fn referenced(&mut self, position: u64, min_location: u64) {
        let p = self
            .pins
            .entry(position >> PIN_BUCKET_SHIFT)
            .or_insert(u64::MAX);
        *p = (*p).min(min_location);
    }

    /// The lowest log position retention must keep if it would delete
    /// everything below `cutoff`: the records of pending entries, and those
    /// references that may lie at or after `cutoff` point at. `None`: no
    /// constraint.
    pub fn retention_pin(&self, cutoff: u64) -> Option<u64> {
        let pending = self
            .wheel
            .iter()
            .map(|(_, p)| self.location_of(p).position)
            .min();
        let pinned = self
            .pins
            .range(cutoff >> PIN_BUCKET_SHIFT..)
            .map(|(_, &m)| m)
            .min();
        match (pending, pinned) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Pending entries whose record is stored below `position` (to carry
    /// before retention removes it), in location order.
    pub fn stored_below(&self, position: u64) -> Vec<Timer> {
        let mut out: Vec<Timer> = self
            .wheel
            .iter()
            .filter_map(|(due_ms, p)| {
                let location = self.location_of(p);
                (location.position < position).then_some(Timer {
                    due_ms,
                    pending: *p,
                    location,
                })
            })
            .collect();
        out.sort_by_key(|t| t.location);
        out
    }

    /// Retention removed everything below `position`: pins of references
    /// there go.
    pub fn removed_below(&mut self, position: u64) {
        // A bucket goes once it lies wholly below the cut.
        let keep_from = position >> PIN_BUCKET_SHIFT;
        self.pins = self.pins.split_off(&keep_from);
    }

    /// Drops every pending entry whose target `keep` refuses (its queue is
    /// gone); returns how many.
    pub fn retain_targets(&mut self, keep: impl Fn(u32) -> bool) -> usize {
        let gone: Vec<RecordAt> = self
            .wheel
            .iter()
            .filter(|(_, p)| !keep(p.target))
            .map(|(_, p)| p.origin)
            .collect();
        for o in &gone {
            self.remove(*o);
        }
        gone.len()
    }

    /// Every pending entry (for a snapshot), in origin order.
    pub fn timers(&self) -> Vec<Timer> {
        let mut out: Vec<Timer> = self
            .wheel
            .iter()
            .map(|(due_ms, p)| Timer {
                due_ms,
                pending: *p,
                location: self.location_of(p),
            })
            .collect();
        out.sort_by_key(|t| t.pending.origin);
        out
    }

    /// Every pin: (bucket, lowest record position).
    pub fn pins(&self) -> Vec<(u64, u64)> {
        self.pins.iter().map(|(&b, &m)| (b, m)).collect()
    }

    /// Restores a pin (from a snapshot).
    pub fn restore_pin(&mut self, bucket: u64, min_location: u64) {
        self.referenced(bucket << PIN_BUCKET_SHIFT, min_location);
    }

    /// Approximate bytes held: the wheel, the origin map, carried
    /// locations and pins.
    pub fn memory_bytes(&self) -> usize {
        // hashbrown: a control byte per bucket, buckets at most 8/7 of the
        // entries.
        let map = |cap: usize, entry: usize| cap * (entry + 1);
        self.wheel.memory_bytes()
            + map(
                self.by_origin.capacity(),
                std::mem::size_of::<(RecordAt, TimerKey)>(),
            )
            + map(
                self.carried.capacity(),
                std::mem::size_of::<(RecordAt, Location)>(),
            )
            + self.pins.len() * 48
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(position: u64, index: u32, target: u32) -> Pending {
        Pending {
            origin: RecordAt { position, index },
            target,
            tags: 0,
            len: 40,
            crc: 0,
            offset: 80,
            priority: 0,
        }
    }

    #[test]
    fn entries_fire_in_due_then_origin_order_and_carry_their_location() {
        let mut s = TimerState::new(100);
        assert!(s.schedule(150, p(9000, 1, 7)));
        assert!(s.schedule(150, p(8000, 0, 7)));
        assert!(!s.schedule(999, p(8000, 0, 7)), "an origin is pending once");
        assert!(s.schedule(120, p(9000, 2, 8)));
        let moved = Location {
            position: 20_000,
            index: 4,
            offset: 300,
        };
        s.carried(p(9000, 1, 7).origin, moved);
        assert_eq!(s.get(p(9000, 1, 7).origin).unwrap().location, moved);
        let fired = s.advance(150);
        let order: Vec<(u64, RecordAt, Location)> = fired
            .iter()
            .map(|t| (t.due_ms, t.pending.origin, t.location))
            .collect();
        assert_eq!(
            order,
            vec![
                (120, p(9000, 2, 8).origin, p(9000, 2, 8).origin_location()),
                (150, p(8000, 0, 7).origin, p(8000, 0, 7).origin_location()),
                (150, p(9000, 1, 7).origin, moved),
            ]
        );
        assert!(s.is_empty());
        assert!(s.get(p(9000, 1, 7).origin).is_none());
    }

    #[test]
    fn retention_pins_cover_pending_records_and_references_that_stay() {
        let mut s = TimerState::new(0);
        assert_eq!(s.retention_pin(0), None);
        s.schedule(10_000, p(5 << 24, 0, 1));
        // A reference in bucket 7 points at a record at 2 << 24.
        s.referenced((7 << 24) + 100, 2 << 24);
        assert_eq!(s.retention_pin(0), Some(2 << 24));
        // Cutting past bucket 7 drops the reference's pin.
        assert_eq!(s.retention_pin(8 << 24), Some(5 << 24));
        assert_eq!(s.stored_below(6 << 24).len(), 1);
        assert!(s.stored_below(5 << 24).is_empty());
        s.removed_below(8 << 24);
        assert!(s.pins().is_empty());
        s.remove(p(5 << 24, 0, 1).origin).unwrap();
        assert_eq!(s.retention_pin(0), None);
    }
}
