//! The timer's journal: records the shard's timer appends to its timer
//! queue ([`crate::ids::TIMER_QUEUE`]) besides the scheduled and carried
//! batches themselves, so the pending set survives a crash: cancels,
//! carried locations, and *generations* (a snapshot of every pending entry
//! and pin, after which older records are not needed).
//!
//! Each entry is the payload of one record of a plain batch (attributes 0)
//! of the timer queue. Little-endian; the first byte is the kind
//! (`docs/PROTOCOL.md`, "Timer journal"):
//!
//! | kind | entry | body after the kind byte |
//! |---|---|---|
//! | 1 | cancelled | origin position u64, origin index u32 |
//! | 2 | carried | origin position u64, origin index u32, location position u64, location index u32, location offset u32 |
//! | 3 | generation begins | generation u64 |
//! | 4 | snapshot part | generation u64, count u32, count × 53-byte timer |
//! | 5 | pins part | generation u64, count u32, count × (bucket u64, lowest position u64) |
//! | 6 | generation ends | generation u64, timer-queue offset of its begin u64 |
//!
//! A timer: due ms u64, origin (position u64, index u32), location
//! (position u64, index u32, offset u32), target queue u32, tag bits u32,
//! record bytes u32, record CRC-32 u32, priority u8.

use super::{Location, Pending, RecordAt, Timer};

/// Bytes of one timer in a snapshot part.
pub const TIMER_BYTES: usize = 53;

/// One record of the timer journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TimerEntry {
    Cancelled {
        origin: RecordAt,
    },
    Carried {
        origin: RecordAt,
        location: Location,
    },
    Begin {
        generation: u64,
    },
    Snapshot {
        generation: u64,
        timers: Vec<Timer>,
    },
    Pins {
        generation: u64,
        pins: Vec<(u64, u64)>,
    },
    End {
        generation: u64,
        begin_offset: u64,
    },
}

/// Why a journal record did not decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TimerEntryError {
    #[error("timer journal record of {0} bytes is short")]
    Short(usize),
    #[error("unknown timer journal kind {0}")]
    Kind(u8),
    #[error("timer journal record has trailing bytes")]
    Trailing,
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TimerEntryError> {
        if self.0.len() < n {
            return Err(TimerEntryError::Short(self.0.len()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, TimerEntryError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, TimerEntryError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, TimerEntryError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn at(&mut self) -> Result<RecordAt, TimerEntryError> {
        Ok(RecordAt {
            position: self.u64()?,
            index: self.u32()?,
        })
    }
    fn location(&mut self) -> Result<Location, TimerEntryError> {
        Ok(Location {
            position: self.u64()?,
            index: self.u32()?,
            offset: self.u32()?,
        })
    }
    /// A count of items of `size` bytes each, no more than the bytes left
    /// hold (so a damaged count never allocates).
    fn count(&mut self, size: usize) -> Result<usize, TimerEntryError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(size) > self.0.len() {
            return Err(TimerEntryError::Short(self.0.len()));
        }
        Ok(n)
    }
}

fn put_at(out: &mut Vec<u8>, a: RecordAt) {
    out.extend_from_slice(&a.position.to_le_bytes());
    out.extend_from_slice(&a.index.to_le_bytes());
}

fn put_location(out: &mut Vec<u8>, l: Location) {
    out.extend_from_slice(&l.position.to_le_bytes());
    out.extend_from_slice(&l.index.to_le_bytes());
    out.extend_from_slice(&l.offset.to_le_bytes());
}

impl TimerEntry {
    /// Appends the entry's bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            TimerEntry::Cancelled { origin } => {
                out.push(1);
                put_at(out, *origin);
            }
            TimerEntry::Carried { origin, location } => {
                out.push(2);
                put_at(out, *origin);
                put_location(out, *location);
            }
            TimerEntry::Begin { generation } => {
                out.push(3);
                out.extend_from_slice(&generation.to_le_bytes());
            }
            TimerEntry::Snapshot { generation, timers } => {
                out.push(4);
                out.extend_from_slice(&generation.to_le_bytes());
                out.extend_from_slice(&(timers.len() as u32).to_le_bytes());
                for t in timers {
                    out.extend_from_slice(&t.due_ms.to_le_bytes());
                    put_at(out, t.pending.origin);
                    put_location(out, t.location);
                    out.extend_from_slice(&t.pending.target.to_le_bytes());
                    out.extend_from_slice(&t.pending.tags.to_le_bytes());
                    out.extend_from_slice(&t.pending.len.to_le_bytes());
                    out.extend_from_slice(&t.pending.crc.to_le_bytes());
                    out.push(t.pending.priority);
                }
            }
            TimerEntry::Pins { generation, pins } => {
                out.push(5);
                out.extend_from_slice(&generation.to_le_bytes());
                out.extend_from_slice(&(pins.len() as u32).to_le_bytes());
                for (b, m) in pins {
                    out.extend_from_slice(&b.to_le_bytes());
                    out.extend_from_slice(&m.to_le_bytes());
                }
            }
            TimerEntry::End {
                generation,
                begin_offset,
            } => {
                out.push(6);
                out.extend_from_slice(&generation.to_le_bytes());
                out.extend_from_slice(&begin_offset.to_le_bytes());
            }
        }
    }

    /// Decodes one entry.
    pub fn decode(b: &[u8]) -> Result<TimerEntry, TimerEntryError> {
        let mut c = Cursor(b);
        let e = match c.u8()? {
            1 => TimerEntry::Cancelled { origin: c.at()? },
            2 => TimerEntry::Carried {
                origin: c.at()?,
                location: c.location()?,
            },
            3 => TimerEntry::Begin {
                generation: c.u64()?,
            },
            4 => {
                let generation = c.u64()?;
                let n = c.count(TIMER_BYTES)?;
                let mut timers = Vec::with_capacity(n);
                for _ in 0..n {
                    let due_ms = c.u64()?;
                    let origin = c.at()?;
                    let location = c.location()?;
                    let (target, tags, len, crc) = (c.u32()?, c.u32()?, c.u32()?, c.u32()?);
                    timers.push(Timer {
                        due_ms,
                        pending: Pending {
                            origin,
                            target,
                            tags,
                            len,
                            crc,
                            // Where it was produced: only its location is
                            // read, and an entry not carried is stored there.
                            offset: if location.record() == origin {
                                location.offset
                            } else {
                                0
                            },
                            priority: c.u8()?,
                        },
                        location,
                    });
                }
                TimerEntry::Snapshot { generation, timers }
            }
            5 => {
                let generation = c.u64()?;
                let n = c.count(16)?;
                let mut pins = Vec::with_capacity(n);
                for _ in 0..n {
                    pins.push((c.u64()?, c.u64()?));
                }
                TimerEntry::Pins { generation, pins }
            }
            6 => TimerEntry::End {
                generation: c.u64()?,
                begin_offset: c.u64()?,
            },
            k => return Err(TimerEntryError::Kind(k)),
        };
        if !c.0.is_empty() {
            return Err(TimerEntryError::Trailing);
        }
        Ok(e)
    }

    /// Encoded size.
    pub fn encoded_len(&self) -> usize {
        1 + match self {
            TimerEntry::Cancelled { .. } => 12,
            TimerEntry::Carried { .. } => 28,
            TimerEntry::Begin { .. } => 8,
            TimerEntry::Snapshot { timers, .. } => 12 + timers.len() * TIMER_BYTES,
            TimerEntry::Pins { pins, .. } => 12 + pins.len() * 16,
            TimerEntry::End { .. } => 16,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_round_trips_and_damage_is_refused() {
        let at = |p: u64, i: u32| RecordAt {
            position: p,
            index: i,
        };
        let timer = Timer {
            due_ms: 1_700_000_000_123,
            pending: Pending {
                origin: at(1 << 33, 4),
                target: 77,
                tags: 0xDEAD_BEEF,
                len: 321,
                crc: 0x1234_5678,
                offset: 0,
                priority: 9,
            },
            location: Location {
                position: 1 << 34,
                index: 1,
                offset: 999,
            },
        };
        let all = [
            TimerEntry::Cancelled { origin: at(5, 6) },
            TimerEntry::Carried {
                origin: at(5, 6),
                location: Location {
                    position: 7,
                    index: 8,
                    offset: 9,
                },
            },
            TimerEntry::Begin { generation: 3 },
            TimerEntry::Snapshot {
                generation: 3,
                timers: vec![timer, timer],
            },
            TimerEntry::Pins {
                generation: 3,
                pins: vec![(1, 2), (3, 4)],
            },
            TimerEntry::End {
                generation: 3,
                begin_offset: 99,
            },
        ];
        for e in all {
            let mut b = Vec::new();
            e.encode(&mut b);
            assert_eq!(b.len(), e.encoded_len(), "{e:?}");
            assert_eq!(TimerEntry::decode(&b), Ok(e.clone()));
            assert!(TimerEntry::decode(&b[..b.len() - 1]).is_err());
            let mut long = b.clone();
            long.push(0);
            assert_eq!(TimerEntry::decode(&long), Err(TimerEntryError::Trailing));
        }
        // A count larger than the bytes left is refused before allocating.
        let mut huge = vec![4u8];
        huge.extend_from_slice(&3u64.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            TimerEntry::decode(&huge),
            Err(TimerEntryError::Short(_))
        ));
        assert_eq!(TimerEntry::decode(&[0]), Err(TimerEntryError::Kind(0)));
    }
}
