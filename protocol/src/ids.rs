//! Strong types for the numbers that must never be mixed up: a queue offset
//! is not a log position, and a shard index is not a queue id. Every type
//! has a fixed width on disk and on the wire.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

/// Longest topic name in bytes.
pub const TOPIC_NAME_BYTES_MAX: usize = 200;

/// Whether `name` can name a topic or a group: 1 to `max_bytes` bytes of
/// ASCII letters, digits, `.`, `_` and `-` (so `%DLQ%…` and other internal
/// names can never collide with a user's).
pub fn is_valid_name(name: &str, max_bytes: usize) -> bool {
    !name.is_empty()
        && name.len() <= max_bytes
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Index of a shard (one pinned core). Fixed at `u16` on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub u16);

/// Broker-wide id of one queue of one topic, assigned once by metadata and
/// never reused (so old log records of a deleted topic never alias a new one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(pub u32);

/// The queue id each shard keeps its group journal in (`group::entry`):
/// never handed out to a topic (metadata starts at 1), never listed,
/// fetched or looked up by clients.
pub const GROUP_JOURNAL_QUEUE: QueueId = QueueId(0);

/// The queue id each shard keeps its timer in (`schedule`): scheduled
/// messages until they fire, and the timer's journal. Metadata never hands
/// it out (queue ids stop below `u32::MAX`); never listed or fetched by
/// clients.
pub const TIMER_QUEUE: QueueId = QueueId(u32::MAX);

/// Broker-wide id of one consumer group, assigned once by metadata and
/// never reused (a receipt handle of a deleted group never names a new one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(pub u32);

/// Index of a queue within its topic: queue `i` of `orders` (what clients
/// name). Not a [`QueueId`]: metadata maps one to the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueIndex(pub u32);

/// Byte position in a shard's commit log (spans segments: segment base +
/// offset inside the segment).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct LogPosition(pub u64);

/// Logical offset of a message inside its queue: 0, 1, 2, ... with no gaps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct QueueOffset(pub u64);

impl QueueOffset {
    /// The offset `n` records later.
    pub fn plus(self, n: u64) -> QueueOffset {
        QueueOffset(self.0 + n)
    }
}

impl LogPosition {
    /// The position `n` bytes later.
    pub fn plus(self, n: u64) -> LogPosition {
        LogPosition(self.0 + n)
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for QueueIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A broker-assigned message id: enough to locate the message again, as
/// RocketMQ's id is broker + commit-log offset. Printed as 28 hex digits:
/// shard (4), batch log position (16), index inside the batch (8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MessageId {
    /// Shard whose commit log holds the message.
    pub shard: ShardId,
    /// Log position of the batch holding the message.
    pub position: LogPosition,
    /// Index of the message inside its batch.
    pub index: u32,
}

/// Wire width of an encoded [`MessageId`].
pub const MESSAGE_ID_BYTES: usize = 14;

impl MessageId {
    /// Encodes as shard u16, position u64, index u32, little-endian.
    pub fn to_bytes(&self) -> [u8; MESSAGE_ID_BYTES] {
        let mut out = [0u8; MESSAGE_ID_BYTES];
        out[0..2].copy_from_slice(&self.shard.0.to_le_bytes());
        out[2..10].copy_from_slice(&self.position.0.to_le_bytes());
        out[10..14].copy_from_slice(&self.index.to_le_bytes());
        out
    }

    /// Decodes the 14-byte form of [`MessageId::to_bytes`].
    pub fn from_bytes(b: &[u8; MESSAGE_ID_BYTES]) -> MessageId {
        MessageId {
            shard: ShardId(u16::from_le_bytes([b[0], b[1]])),
            position: LogPosition(u64::from_le_bytes(b[2..10].try_into().unwrap())),
            index: u32::from_le_bytes(b[10..14].try_into().unwrap()),
        }
    }

    /// Parses the 28-hex-digit text form.
    pub fn parse(text: &str) -> Option<MessageId> {
        let text = text.trim();
        if text.len() != 28 || !text.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        Some(MessageId {
            shard: ShardId(u16::from_str_radix(&text[0..4], 16).ok()?),
            position: LogPosition(u64::from_str_radix(&text[4..20], 16).ok()?),
            index: u32::from_str_radix(&text[20..28], 16).ok()?,
        })
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04X}{:016X}{:08X}",
            self.shard.0, self.position.0, self.index
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_id_text_and_bytes_round_trip() {
        let id = MessageId {
            shard: ShardId(3),
            position: LogPosition(0x1234_5678_9abc),
            index: 77,
        };
        let text = id.to_string();
        assert_eq!(text.len(), 28);
        assert_eq!(MessageId::parse(&text), Some(id));
        assert_eq!(MessageId::parse(&text.to_lowercase()), Some(id));
        assert_eq!(MessageId::from_bytes(&id.to_bytes()), id);
        assert_eq!(MessageId::parse("xyz"), None);
        assert_eq!(MessageId::parse(&"g".repeat(28)), None);
    }
}

/// Hasher for maps keyed by queue ids and indexes: small integers assigned by
/// the broker, not attacker-chosen keys, so a multiplicative hash beats
/// SipHash on the fetch path (a fetch over ten thousand queues looks each
/// one up, on the broker and in the consumer).
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.0 = u64::from(v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A map keyed by queue id or queue index.
pub type IdMap<V> = HashMap<u32, V, BuildHasherDefault<IdHasher>>;
