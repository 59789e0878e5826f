//! A hierarchical timing wheel with 1 ms ticks (the shape of Kafka's
//! `SystemTimer` and tokio's timer): six levels of 64 slots, level `l`'s
//! slots `64^l` ms wide, so it covers 2^36 ms (795 days). Inserting and
//! cancelling are O(1); an entry moves down a level at most five times
//! before it fires, so firing a million entries costs a few million
//! moves however far ahead they were set. No I/O and no clock of its own:
//! the caller says what time it is.
//!
//! Rules (checked by `schedule::sim`):
//! - an entry never fires before its due time;
//! - [`TimerWheel::advance`] to `t` fires every live entry due at or
//!   before `t`, in (due, key order) order, each once;
//! - a cancelled entry never fires.
//!
//! An entry further ahead than the wheel's range waits in a side list and
//! enters the wheel once it is within range (the broker caps delays well
//! below the range, so the list holds entries only after a clock jump).

/// Levels of the wheel.
pub const LEVELS: usize = 6;
const SLOT_BITS: u32 = 6;
const SLOTS: usize = 1 << SLOT_BITS;
/// Milliseconds the wheel's levels span: 2^36 (795 days).
const LEVELS_SPAN_MS: u64 = 1 << (SLOT_BITS as usize * LEVELS);
/// Milliseconds ahead of its time the wheel takes an entry: the span less
/// one top-level slot (so an entry's top-level slot, even in the next
/// cycle, is never the current one): 2^36 - 2^30 ms, about 782 days.
pub const WHEEL_RANGE_MS: u64 = LEVELS_SPAN_MS - (LEVELS_SPAN_MS >> SLOT_BITS);

/// An entry of the wheel, valid until it fires or is cancelled (a slot
/// reused later gets a new generation, so an old key never names it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerKey {
    idx: u32,
    generation: u32,
}

impl TimerKey {
    fn packed(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.idx)
    }
    fn unpack(v: u64) -> TimerKey {
        TimerKey {
            idx: v as u32,
            generation: (v >> 32) as u32,
        }
    }
}

struct Node<T> {
    due: u64,
    generation: u32,
    value: Option<T>,
}

/// The wheel; `T` is what an entry carries, `Ord` for the order of
/// entries due in the same millisecond.
pub struct TimerWheel<T> {
    now: u64,
    /// `slots[level * SLOTS + slot]`: packed keys.
    slots: Vec<Vec<u64>>,
    occupied: [u64; LEVELS],
    nodes: Vec<Node<T>>,
    free: Vec<u32>,
    /// Entries inserted already due: they fire at the next advance.
    expired: Vec<u64>,
    /// Entries due beyond the wheel's range, and the earliest due of them.
    far: Vec<u64>,
    far_min: u64,
    len: usize,
}

impl<T: Ord> TimerWheel<T> {
    /// An empty wheel whose time is `now_ms`.
    pub fn new(now_ms: u64) -> TimerWheel<T> {
        TimerWheel {
            now: now_ms,
            slots: (0..LEVELS * SLOTS).map(|_| Vec::new()).collect(),
            occupied: [0; LEVELS],
            nodes: Vec::new(),
            free: Vec::new(),
            expired: Vec::new(),
            far: Vec::new(),
            far_min: u64::MAX,
            len: 0,
        }
    }

    /// The wheel's time: every entry due at or before it has fired.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Live entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no entry is live.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds an entry due at `due_ms` (at or before the wheel's time: it
    /// fires at the next advance).
    pub fn insert(&mut self, due_ms: u64, value: T) -> TimerKey {
        let key = match self.free.pop() {
            Some(idx) => {
                let n = &mut self.nodes[idx as usize];
                n.generation = n.generation.wrapping_add(1);
                n.due = due_ms;
                n.value = Some(value);
                TimerKey {
                    idx,
                    generation: n.generation,
                }
            }
            None => {
                let idx = u32::try_from(self.nodes.len()).expect("fewer than 2^32 timers");
                self.nodes.push(Node {
                    due: due_ms,
                    generation: 0,
                    value: Some(value),
                });
                TimerKey { idx, generation: 0 }
            }
        };
        self.len += 1;
        self.place(key.packed(), due_ms);
        key
    }

    /// The entry of `key`, if it is live.
    pub fn get(&self, key: TimerKey) -> Option<(u64, &T)> {
        let n = self.nodes.get(key.idx as usize)?;
        (n.generation == key.generation)
            .then_some(())
            .and_then(|_| n.value.as_ref().map(|v| (n.due, v)))
    }

    /// Removes a live entry; `None` if it fired or was cancelled.
    pub fn cancel(&mut self, key: TimerKey) -> Option<(u64, T)> {
        let n = self.nodes.get_mut(key.idx as usize)?;
        if n.generation != key.generation {
            return None;
        }
        let v = n.value.take()?;
        let due = n.due;
        self.free.push(key.idx);
        self.len -= 1;
        Some((due, v))
    }

    /// When the wheel next has work: the due time of its earliest entry
    /// if that lies in the lowest level, else the start of a slot whose
    /// entries move down (no later than any entry's due time).
    pub fn next_wake(&self) -> Option<u64> {
        if !self.expired.is_empty() {
            return Some(self.now);
        }
        let far = (!self.far.is_empty()).then(|| self.far_min - (WHEEL_RANGE_MS - 1));
        let wheel = (0..LEVELS).find_map(|l| self.level_next(l).map(|(_, at)| at));
        match (wheel, far) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Moves the wheel's time to `to_ms` (never back) and returns every
    /// live entry due by then, in (due, value) order.
    pub fn advance(&mut self, to_ms: u64) -> Vec<(u64, T)> {
        let mut fired = Vec::new();
        for k in std::mem::take(&mut self.expired) {
            self.take_into(k, &mut fired);
        }
        loop {
            let next = (0..LEVELS).find_map(|l| self.level_next(l));
            let far_at = (!self.far.is_empty()).then(|| self.far_min - (WHEEL_RANGE_MS - 1));
            // Far entries come into range before the next slot: move them in
            // first (they may land before it).
            if let Some(f) = far_at.filter(|&f| f <= to_ms && next.is_none_or(|(_, at)| f <= at)) {
                self.now = self.now.max(f);
                self.far_min = u64::MAX;
                for k in std::mem::take(&mut self.far) {
                    let key = TimerKey::unpack(k);
                    let n = &self.nodes[key.idx as usize];
                    if n.generation == key.generation && n.value.is_some() {
                        let due = n.due;
                        self.place(k, due);
                    }
                }
                continue;
            }
            let Some((slot, at)) = next else {
                break;
            };
            if at > to_ms {
                break;
            }
            self.now = self.now.max(at);
            let level = slot / SLOTS;
            self.occupied[level] &= !(1u64 << (slot % SLOTS));
            let keys = std::mem::take(&mut self.slots[slot]);
            for k in keys {
                let key = TimerKey::unpack(k);
                let n = &self.nodes[key.idx as usize];
                if n.generation != key.generation || n.value.is_none() {
                    continue; // cancelled
                }
                if n.due <= self.now {
                    self.take_into(k, &mut fired);
                } else {
                    let due = n.due;
                    self.place(k, due);
                }
            }
        }
        self.now = self.now.max(to_ms);
        fired.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        fired
    }

    fn take_into(&mut self, k: u64, fired: &mut Vec<(u64, T)>) {
        let key = TimerKey::unpack(k);
        if let Some(v) = self.cancel(key) {
            fired.push(v);
        }
    }

    /// Puts a key in the slot its due time falls in, relative to now.
    fn place(&mut self, k: u64, due: u64) {
        if due <= self.now {
            self.expired.push(k);
            return;
        }
        if due - self.now >= WHEEL_RANGE_MS {
            self.far.push(k);
            self.far_min = self.far_min.min(due);
            return;
        }
        let significant = (self.now ^ due) | (SLOTS as u64 - 1);
        // Crossing the top level's cycle: the top level (the slot is in
        // its next cycle, before the current one).
        let level = (((63 - significant.leading_zeros()) / SLOT_BITS) as usize).min(LEVELS - 1);
        let slot = ((due >> (level as u32 * SLOT_BITS)) as usize) % SLOTS;
        self.slots[level * SLOTS + slot].push(k);
        self.occupied[level] |= 1u64 << slot;
    }

    /// The next occupied slot of a level at or after now, and when it
    /// starts.
    fn level_next(&self, level: usize) -> Option<(usize, u64)> {
        let occupied = self.occupied[level];
        if occupied == 0 {
            return None;
        }
        let shift = level as u32 * SLOT_BITS;
        let slot_range = 1u64 << shift;
        let level_range = slot_range << SLOT_BITS;
        let now_slot = ((self.now >> shift) as usize) % SLOTS;
        let zeros = occupied.rotate_right(now_slot as u32).trailing_zeros() as usize;
        let slot = (zeros + now_slot) % SLOTS;
        let level_start = self.now & !(level_range - 1);
        let mut at = level_start + slot as u64 * slot_range;
        if slot < now_slot {
            at += level_range;
        }
        Some((level * SLOTS + slot, at))
    }

    /// Appends every live entry due in `[from, to)` to `out` (order
    /// unspecified), looking only at the slots whose span meets it: to
    /// read ahead what is about to come due.
    pub fn peek_due(&self, from: u64, to: u64, out: &mut Vec<(u64, T)>)
    where
        T: Copy,
    {
        let from = from.max(self.now + 1);
        if from >= to {
            return;
        }
        for level in 0..LEVELS {
            let shift = level as u32 * SLOT_BITS;
            let slot_range = 1u64 << shift;
            let level_range = slot_range << SLOT_BITS;
            let now_slot = ((self.now >> shift) as usize) % SLOTS;
            let level_start = self.now & !(level_range - 1);
            let mut occupied = self.occupied[level];
            while occupied != 0 {
                let slot = occupied.trailing_zeros() as usize;
                occupied &= occupied - 1;
                let mut start = level_start + slot as u64 * slot_range;
                if slot < now_slot {
                    start += level_range;
                }
                let end = start + slot_range;
                if end <= from || start >= to {
                    continue;
                }
                for &k in &self.slots[level * SLOTS + slot] {
                    let key = TimerKey::unpack(k);
                    let n = &self.nodes[key.idx as usize];
                    if n.generation != key.generation {
                        continue;
                    }
                    if let Some(v) = n.value {
                        if (from..to).contains(&n.due) {
                            out.push((n.due, v));
                        }
                    }
                }
            }
        }
    }

    /// Every live entry (order unspecified).
    pub fn iter(&self) -> impl Iterator<Item = (u64, &T)> {
        self.nodes
            .iter()
            .filter_map(|n| n.value.as_ref().map(|v| (n.due, v)))
    }

    /// Bytes the wheel holds besides its entries' own heap data.
    pub fn memory_bytes(&self) -> usize {
        self.nodes.capacity() * std::mem::size_of::<Node<T>>()
            + self.free.capacity() * 4
            + self.slots.iter().map(|s| s.capacity() * 8).sum::<usize>()
            + self.expired.capacity() * 8
            + self.far.capacity() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_fire_on_time_in_order_and_cancelled_ones_never() {
        let mut w: TimerWheel<u32> = TimerWheel::new(1_000);
        let a = w.insert(1_005, 1);
        w.insert(1_005, 0);
        w.insert(1_000 + 70_000, 2);
        w.insert(1_000 + 5 * 3_600_000, 3);
        w.insert(500, 4); // already due
        let c = w.insert(1_003, 5);
        assert_eq!(w.cancel(c), Some((1_003, 5)));
        assert_eq!(w.cancel(c), None, "a key cancels once");
        assert_eq!(w.next_wake(), Some(1_000));
        assert_eq!(w.advance(1_004), vec![(500, 4)]);
        assert_eq!(w.get(a), Some((1_005, &1)));
        assert_eq!(w.next_wake(), Some(1_005));
        assert_eq!(w.advance(1_005), vec![(1_005, 0), (1_005, 1)]);
        assert_eq!(w.get(a), None);
        assert!(w.advance(1_000 + 69_999).is_empty());
        assert_eq!(w.advance(1_000 + 70_000), vec![(71_000, 2)]);
        // A jump far past several levels fires what is due, once.
        assert_eq!(
            w.advance(u64::from(u32::MAX)),
            vec![(1_000 + 5 * 3_600_000, 3)]
        );
        assert!(w.is_empty());
        assert_eq!(w.next_wake(), None);
    }

    #[test]
    fn an_entry_beyond_the_range_waits_and_fires_on_time() {
        let mut w: TimerWheel<u8> = TimerWheel::new(0);
        let far = WHEEL_RANGE_MS * 3 + 17;
        let near_edge = WHEEL_RANGE_MS - 1;
        w.insert(near_edge, 8);
        w.insert(far, 9);
        let mut t = 0;
        while let Some(at) = w.next_wake() {
            assert!(at <= far, "woken at {at}, after the due time {far}");
            let fired = w.advance(at);
            if fired == vec![(near_edge, 8)] {
                assert_eq!(at, near_edge);
                continue;
            }
            if !fired.is_empty() {
                assert_eq!(fired, vec![(far, 9)]);
                t = at;
                break;
            }
        }
        assert_eq!(t, far);
    }

    #[test]
    fn peek_finds_exactly_the_entries_due_in_a_span() {
        let mut w: TimerWheel<u32> = TimerWheel::new(1_000_000);
        let dues = [
            1_000_001u64,
            1_000_050,
            1_000_900,
            1_003_000,
            1_010_000,
            1_500_000,
            9_000_000,
            1_000_000 + 3 * 86_400_000,
        ];
        for (i, d) in dues.iter().enumerate() {
            w.insert(*d, i as u32);
        }
        for (from, to) in [
            (1_000_000, 1_001_000),
            (1_000_500, 1_004_000),
            (1_002_000, 1_600_000),
            (1_000_000, u64::MAX),
            (5_000_000, 9_000_001),
        ] {
            let mut got = Vec::new();
            w.peek_due(from, to, &mut got);
            got.sort_unstable();
            let want: Vec<(u64, u32)> = dues
                .iter()
                .enumerate()
                .filter(|(_, d)| (from..to).contains(*d))
                .map(|(i, d)| (*d, i as u32))
                .collect();
            assert_eq!(got, want, "[{from}, {to})");
        }
    }

    #[test]
    fn a_reused_slot_does_not_answer_to_an_old_key() {
        let mut w: TimerWheel<u8> = TimerWheel::new(0);
        let a = w.insert(10, 1);
        w.cancel(a);
        let b = w.insert(20, 2);
        assert_eq!(w.get(a), None);
        assert_eq!(w.cancel(a), None);
        assert_eq!(w.advance(30), vec![(20, 2)]);
        assert_eq!(w.get(b), None);
    }
}
