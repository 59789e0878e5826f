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
//! | 1..4 | reserved, zero |
//! | 4..8 | attempt u32 (deliver; else zero) |
//! | 8..16 | offset u64 |
//! | 16..24 | lease u64 (zero for dead-lettered) |
//! | 24..32 | time u64: deadline (deliver, invisible), retry time (nack), else zero |
//! | 32..40 | the window's clock when it happened, ms |

/// Size of one journal record.
pub const JOURNAL_RECORD_BYTES: usize = 40;

/// One transition of a delivery window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Deliver {
        offset: u64,
        lease: u64,
        attempt: u32,
        deadline_ms: u64,
        now_ms: u64,
    },
    Ack {
        offset: u64,
        lease: u64,
        now_ms: u64,
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

    pub fn encode(&self) -> [u8; JOURNAL_RECORD_BYTES] {
        let (kind, attempt, offset, lease, time, now) = match *self {
            Event::Deliver {
                offset,
                lease,
                attempt,
                deadline_ms,
                now_ms,
            } => (1, attempt, offset, lease, deadline_ms, now_ms),
            Event::Ack {
                offset,
                lease,
                now_ms,
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
        if b[1..4] != [0, 0, 0] {
            return Err(JournalError::NonZero("reserved"));
        }
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
            },
            2 => {
                zero(time, "time")?;
                Event::Ack {
                    offset,
                    lease,
                    now_ms,
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
            },
            Event::Ack {
                offset: 5,
                lease: 9,
                now_ms: 11,
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
        let mut r = ack;
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
}
