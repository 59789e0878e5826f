//! The records of a shard's group journal: what the shard appends to its
//! own commit log (internal queue [`crate::ids::GROUP_JOURNAL_QUEUE`]) so
//! that consumer-group state survives a crash: the delivery windows'
//! transitions, their snapshots, committed offsets, and the markers of a
//! *generation* (a complete copy of the state, written in one go, after
//! which older records are not needed).
//!
//! Each entry is the payload of one record of a stored batch (so it has the
//! batch's CRC, MAC and recovery rules). Little-endian; the first byte is
//! the kind (`docs/PROTOCOL.md`, "Group journal"):
//!
//! | kind | entry | body after the kind byte |
//! |---|---|---|
//! | 1 | window event | group id u32, queue id u32, 40-byte [`Event`] |
//! | 2 | window snapshot | group id u32, queue id u32, the window snapshot |
//! | 3 | committed offset | queue id u32, offset u64, group name (u16 length, bytes), instance (u16 length, bytes; empty unless broadcast) |
//! | 4 | generation begins | generation u64 |
//! | 5 | generation ends | generation u64, journal offset of its begin u64 |
//! | 6 | group dropped | group id u32, group name (u16 length, bytes) |

use super::journal::{Event, JournalError, JOURNAL_RECORD_BYTES};
use crate::ids::{GroupId, QueueId};

/// Longest broadcast instance id, in bytes.
pub const INSTANCE_ID_BYTES_MAX: usize = 128;

/// One record of the group journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Window {
        group: GroupId,
        queue: QueueId,
        event: Event,
    },
    Snapshot {
        group: GroupId,
        queue: QueueId,
        snapshot: Vec<u8>,
    },
    Offset {
        group: String,
        instance: String,
        queue: QueueId,
        offset: u64,
    },
    Begin {
        generation: u64,
    },
    End {
        generation: u64,
        begin_offset: u64,
    },
    Dropped {
        group: GroupId,
        name: String,
    },
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], JournalError> {
        if self.0.len() < n {
            return Err(JournalError::Length(self.0.len()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, JournalError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, JournalError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn str(&mut self, max: usize) -> Result<String, JournalError> {
        let n = u16::from_le_bytes(self.take(2)?.try_into().unwrap()) as usize;
        if n > max {
            return Err(JournalError::Inconsistent("name too long"));
        }
        std::str::from_utf8(self.take(n)?)
            .map(str::to_owned)
            .map_err(|_| JournalError::Inconsistent("name is not UTF-8"))
    }
    fn done(self) -> Result<(), JournalError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(JournalError::Inconsistent("trailing bytes"))
        }
    }
}

impl Entry {
    /// Appends the entry's bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Entry::Window {
                group,
                queue,
                event,
            } => {
                out.push(1);
                out.extend_from_slice(&group.0.to_le_bytes());
                out.extend_from_slice(&queue.0.to_le_bytes());
                out.extend_from_slice(&event.encode());
            }
            Entry::Snapshot {
                group,
                queue,
                snapshot,
            } => {
                out.push(2);
                out.extend_from_slice(&group.0.to_le_bytes());
                out.extend_from_slice(&queue.0.to_le_bytes());
                out.extend_from_slice(snapshot);
            }
            Entry::Offset {
                group,
                instance,
                queue,
                offset,
            } => {
                out.push(3);
                out.extend_from_slice(&queue.0.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                put_str(out, group);
                put_str(out, instance);
            }
            Entry::Begin { generation } => {
                out.push(4);
                out.extend_from_slice(&generation.to_le_bytes());
            }
            Entry::End {
                generation,
                begin_offset,
            } => {
                out.push(5);
                out.extend_from_slice(&generation.to_le_bytes());
                out.extend_from_slice(&begin_offset.to_le_bytes());
            }
            Entry::Dropped { group, name } => {
                out.push(6);
                out.extend_from_slice(&group.0.to_le_bytes());
                put_str(out, name);
            }
        }
    }

    /// The entry a record's payload holds.
    pub fn decode(b: &[u8]) -> Result<Entry, JournalError> {
        let Some((&kind, rest)) = b.split_first() else {
            return Err(JournalError::Length(0));
        };
        let mut c = Cursor(rest);
        let names = super::config::GROUP_NAME_BYTES_MAX;
        let e = match kind {
            1 => {
                let group = GroupId(c.u32()?);
                let queue = QueueId(c.u32()?);
                let event = Event::decode(c.take(JOURNAL_RECORD_BYTES)?)?;
                Entry::Window {
                    group,
                    queue,
                    event,
                }
            }
            2 => {
                let group = GroupId(c.u32()?);
                let queue = QueueId(c.u32()?);
                let snapshot = c.0.to_vec();
                c.0 = &[];
                Entry::Snapshot {
                    group,
                    queue,
                    snapshot,
                }
            }
            3 => {
                let queue = QueueId(c.u32()?);
                let offset = c.u64()?;
                let group = c.str(names)?;
                let instance = c.str(INSTANCE_ID_BYTES_MAX)?;
                Entry::Offset {
                    group,
                    instance,
                    queue,
                    offset,
                }
            }
            4 => Entry::Begin {
                generation: c.u64()?,
            },
            5 => Entry::End {
                generation: c.u64()?,
                begin_offset: c.u64()?,
            },
            6 => {
                let group = GroupId(c.u32()?);
                let name = c.str(names)?;
                Entry::Dropped { group, name }
            }
            k => return Err(JournalError::Kind(k)),
        };
        c.done()?;
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_damage_is_refused() {
        let entries = [
            Entry::Window {
                group: GroupId(3),
                queue: QueueId(9),
                event: Event::Ack {
                    offset: 5,
                    lease: 6,
                    now_ms: 7,
                    count: 3,
                },
            },
            Entry::Snapshot {
                group: GroupId(3),
                queue: QueueId(9),
                snapshot: vec![1, 2, 3],
            },
            Entry::Offset {
                group: "g".into(),
                instance: "host-1".into(),
                queue: QueueId(2),
                offset: 1 << 40,
            },
            Entry::Begin { generation: 4 },
            Entry::End {
                generation: 4,
                begin_offset: 77,
            },
            Entry::Dropped {
                group: GroupId(3),
                name: "g".into(),
            },
        ];
        for e in &entries {
            let mut b = Vec::new();
            e.encode(&mut b);
            assert_eq!(&Entry::decode(&b).unwrap(), e);
            if !matches!(e, Entry::Snapshot { .. }) {
                assert!(Entry::decode(&b[..b.len() - 1]).is_err(), "{e:?} cut");
                let mut long = b.clone();
                long.push(0);
                assert!(Entry::decode(&long).is_err(), "{e:?} trailing");
            }
        }
        assert_eq!(Entry::decode(&[9]), Err(JournalError::Kind(9)));
        assert_eq!(Entry::decode(&[]), Err(JournalError::Length(0)));
    }
}
