//! The journal of a delivery window: every transition a request causes,
//! as fixed 40-byte records, so the window after a crash is the window
//! rebuilt from its last snapshot plus the journal since
//! ([`super::window::DeliveryWindow::apply`]). Timeouts are not journaled:
//! each record carries the window's clock, and replay advances to it first,
//! so the expiries in between happen again exactly.
//!
//! | bytes | field |
//! |---|---|
//! | 0 | kind: 1 deliver, 2 ack, 3 nack, 4 invisible, 5 dead-lettered |
//! | 1..4 | deliver, ack: a run, u24 = messages − 1 (offsets and leases both count up from the record's); else zero |
//! | 4..8 | attempt u32 (deliver; else zero) |
//! | 8..16 | offset u64 |
//! | 16..24 | lease u64 (zero for dead-lettered) |
//! | 24..32 | time u64: deadline (deliver, invisible), retry time (nack), else zero |
//! | 32..40 | the window's clock when it happened, ms |

/// Size of one journal record.
pub const JOURNAL_RECORD_BYTES: usize = 40;

/// Most messages one deliver or ack record covers (its run field is 24
/// bits).
pub const JOURNAL_RUN_MAX: u32 = 1 << 24;

/// One transition of a delivery window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// `count` messages from `offset` on, with leases from `lease` on, all
    /// at `attempt` until `deadline_ms`.
    Deliver {
        offset: u64,
        lease: u64,
        attempt: u32,
        deadline_ms: u64,
        now_ms: u64,
        count: u32,
    },
    /// `count` messages from `offset` on, with leases from `lease` on.
    Ack {
        offset: u64,
        lease: u64,
        now_ms: u64,
        count: u32,
    },
    Nack {
        offset: u64,
        lease: u64,
        not_before_ms: u64,
        now_ms: u64,
    },
    Invisible {
        offset: u64,
        lease: u64,
        deadline_ms: u64,
        now_ms: u64,
    },
    DeadLettered {
        offset: u64,
        now_ms: u64,
    },
}

/// Why a journal record was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    #[error("a journal record is {JOURNAL_RECORD_BYTES} bytes, not {0}")]
    Length(usize),
    #[error("unknown journal record kind {0}")]
    Kind(u8),
    #[error("journal record field `{0}` must be zero")]
    NonZero(&'static str),
    #[error("journal record does not fit the window: {0}")]
    Inconsistent(&'static str),
}

impl Event {
    /// The window's clock when it happened.
    pub fn now_ms(&self) -> u64 {
        match *self {
            Event::Deliver { now_ms, .. }
            | Event::Ack { now_ms, .. }
            | Event::Nack { now_ms, .. }
            | Event::Invisible { now_ms, .. }
            | Event::DeadLettered { now_ms, .. } => now_ms,
        }
    }

    /// Messages the record covers (1 but for runs of delivers and acks).
    pub fn count(&self) -> u32 {
        match *self {
            Event::Deliver { count, .. } | Event::Ack { count, .. } => count,
            _ => 1,
        }
    }

    /// Extends this record by `next` when `next` continues its run (the
    /// following offset and lease, at the same clock, and for a deliver
    /// the same attempt and deadline): the journal then holds one record
    /// per run of a receive or an ack batch instead of one per message.
    pub fn extend(&mut self, next: &Event) -> bool {
        match (self, next) {
            (
                Event::Deliver {
                    offset,
                    lease,
                    attempt,
                    deadline_ms,
                    now_ms,
                    count,
                },
                Event::Deliver {
                    offset: o,
                    lease: l,
                    attempt: a,
                    deadline_ms: d,
                    now_ms: n,
                    count: c,
                },
            ) if *offset + u64::from(*count) == *o
                && *lease + u64::from(*count) == *l
                && attempt == a
                && deadline_ms == d
                && now_ms == n
                && *count + c <= JOURNAL_RUN_MAX =>
            {
                *count += c;
                true
            }
            (
                Event::Ack {
                    offset,
                    lease,
                    now_ms,
                    count,
                },
                Event::Ack {
                    offset: o,
                    lease: l,
                    now_ms: n,
                    count: c,
                },
            ) if *offset + u64::from(*count) == *o
                && *lease + u64::from(*count) == *l
                && now_ms == n
                && *count + c <= JOURNAL_RUN_MAX =>
            {
                *count += c;
                true
            }
            _ => false,
        }
    }

    /// The single-message records of a run, in order.
    pub fn each(&self) -> impl Iterator<Item = Event> + '_ {
        (0..self.count()).map(move |i| {
            let i64_ = u64::from(i);
            match *self {
                Event::Deliver {
                    offset,
                    lease,
                    attempt,
                    deadline_ms,
                    now_ms,
                    ..
                } => Event::Deliver {
                    offset: offset + i64_,
                    lease: lease + i64_,
                    attempt,
                    deadline_ms,
                    now_ms,
                    count: 1,
                },
                Event::Ack {
                    offset,
                    lease,
                    now_ms,
                    ..
                } => Event::Ack {
                    offset: offset + i64_,
                    lease: lease + i64_,
                    now_ms,
                    count: 1,
                },
                e => e,
            }
        })
    }

    pub fn encode(&self) -> [u8; JOURNAL_RECORD_BYTES] {
        let (kind, attempt, offset, lease, time, now) = match *self {
            Event::Deliver {
                offset,
                lease,
                attempt,
                deadline_ms,
                now_ms,
                ..
            } => (1, attempt, offset, lease, deadline_ms, now_ms),
            Event::Ack {
                offset,
                lease,
                now_ms,
                ..
            } => (2, 0, offset, lease, 0, now_ms),
            Event::Nack {
                offset,
                lease,
                not_before_ms,
                now_ms,
            } => (3, 0, offset, lease, not_before_ms, now_ms),
            Event::Invisible {
                offset,
                lease,
                deadline_ms,
                now_ms,
            } => (4, 0, offset, lease, deadline_ms, now_ms),
            Event::DeadLettered { offset, now_ms } => (5, 0, offset, 0, 0, now_ms),
        };
        let mut b = [0u8; JOURNAL_RECORD_BYTES];
        b[0] = kind;
        debug_assert!((1..=JOURNAL_RUN_MAX).contains(&self.count()));
        b[1..4].copy_from_slice(&(self.count() - 1).to_le_bytes()[..3]);
        b[4..8].copy_from_slice(&attempt.to_le_bytes());
        b[8..16].copy_from_slice(&offset.to_le_bytes());
        b[16..24].copy_from_slice(&lease.to_le_bytes());
        b[24..32].copy_from_slice(&time.to_le_bytes());
        b[32..40].copy_from_slice(&now.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Event, JournalError> {
        if b.len() != JOURNAL_RECORD_BYTES {
            return Err(JournalError::Length(b.len()));
        }
        let run = u32::from_le_bytes([b[1], b[2], b[3], 0]);
        if run != 0 && !matches!(b[0], 1 | 2) {
            return Err(JournalError::NonZero("reserved"));
        }
        let count = run + 1;
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        let attempt = u32::from_le_bytes(b[4..8].try_into().unwrap());
        let (offset, lease, time, now_ms) = (u64_at(8), u64_at(16), u64_at(24), u64_at(32));
        let zero = |v: u64, name| {
            if v == 0 {
                Ok(())
            } else {
                Err(JournalError::NonZero(name))
            }
        };
        if b[0] != 1 {
            zero(u64::from(attempt), "attempt")?;
        }
        Ok(match b[0] {
            1 => Event::Deliver {
                offset,
                lease,
                attempt,
                deadline_ms: time,
                now_ms,
                count,
            },
            2 => {
                zero(time, "time")?;
                Event::Ack {
                    offset,
                    lease,
                    now_ms,
                    count,
                }
            }
            3 => Event::Nack {
                offset,
                lease,
                not_before_ms: time,
                now_ms,
            },
            4 => Event::Invisible {
                offset,
                lease,
                deadline_ms: time,
                now_ms,
            },
            5 => {
                zero(lease, "lease")?;
                zero(time, "time")?;
                Event::DeadLettered { offset, now_ms }
            }
            k => return Err(JournalError::Kind(k)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_and_bad_records_say_why() {
        let events = [
            Event::Deliver {
                offset: 1 << 40,
                lease: 7,
                attempt: 3,
                deadline_ms: 1_750_000_000_123,
                now_ms: 1_750_000_000_000,
                count: 1,
            },
            Event::Ack {
                offset: 5,
                lease: 9,
                now_ms: 11,
                count: 1,
            },
            Event::Nack {
                offset: 5,
                lease: 9,
                not_before_ms: 40,
                now_ms: 12,
            },
            Event::Invisible {
                offset: 6,
                lease: 10,
                deadline_ms: 99,
                now_ms: 13,
            },
            Event::DeadLettered {
                offset: 8,
                now_ms: 14,
            },
        ];
        for e in events {
            assert_eq!(Event::decode(&e.encode()), Ok(e));
        }
        let ack = events[1].encode();
        assert_eq!(Event::decode(&ack[..39]), Err(JournalError::Length(39)));
        let mut k = ack;
        k[0] = 9;
        assert_eq!(Event::decode(&k), Err(JournalError::Kind(9)));
        let mut r = events[2].encode();
        r[2] = 1;
        assert_eq!(Event::decode(&r), Err(JournalError::NonZero("reserved")));
        let mut a = ack;
        a[4] = 1;
        assert_eq!(Event::decode(&a), Err(JournalError::NonZero("attempt")));
        let mut t = ack;
        t[24] = 1;
        assert_eq!(Event::decode(&t), Err(JournalError::NonZero("time")));
        let mut d = events[4].encode();
        d[16] = 1;
        assert_eq!(Event::decode(&d), Err(JournalError::NonZero("lease")));
    }

    #[test]
    fn runs_extend_only_in_sequence_and_round_trip() {
        let d = |offset, lease, now_ms| Event::Deliver {
            offset,
            lease,
            attempt: 1,
            deadline_ms: 500,
            now_ms,
            count: 1,
        };
        let mut run = d(10, 3, 7);
        assert!(run.extend(&d(11, 4, 7)));
        assert!(run.extend(&d(12, 5, 7)));
        // Not the next offset, not the next lease, another clock.
        assert!(!run.extend(&d(14, 6, 7)));
        assert!(!run.extend(&d(13, 7, 7)));
        assert!(!run.extend(&d(13, 6, 8)));
        assert_eq!(run.count(), 3);
        assert_eq!(Event::decode(&run.encode()), Ok(run));
        assert_eq!(
            run.each().collect::<Vec<_>>(),
            [d(10, 3, 7), d(11, 4, 7), d(12, 5, 7)]
        );
        let a = |offset, lease| Event::Ack {
            offset,
            lease,
            now_ms: 9,
            count: 1,
        };
        let mut acks = a(10, 3);
        assert!(!acks.extend(&d(11, 4, 9)), "kinds do not mix");
        assert!(acks.extend(&a(11, 4)));
        assert_eq!(Event::decode(&acks.encode()), Ok(acks));
        // The longest run the record holds.
        let mut long = a(0, 1);
        assert!(long.extend(&Event::Ack {
            offset: 1,
            lease: 2,
            now_ms: 9,
            count: JOURNAL_RUN_MAX - 1,
        }));
        assert_eq!(long.count(), JOURNAL_RUN_MAX);
        assert_eq!(Event::decode(&long.encode()), Ok(long));
        assert!(!long.extend(&a(JOURNAL_RUN_MAX as u64, u64::from(JOURNAL_RUN_MAX) + 1)));
    }
}
