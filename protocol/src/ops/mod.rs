//! Operation codes and their request and response bodies, by family:
//! here the codes, the handshake and shared helpers; `topics`, `messages`
//! and `groups` the bodies of each family's operations.
//!
//! Each body type has `encode` (append to a buffer) and `decode` (from a
//! body, rejecting trailing bytes). All operations are at version 1.

use super::codec::{DecodeError, Reader, Writer};
use crate::ids::{MessageId, MESSAGE_ID_BYTES};
use bytes::{Bytes, BytesMut};

mod groups;
mod messages;
mod topics;

pub use groups::*;
pub use messages::*;
pub use topics::*;

/// Operation codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Op {
    Handshake = 1,
    Metadata = 2,
    CreateTopic = 3,
    DeleteTopic = 4,
    DescribeTopic = 5,
    Produce = 6,
    Fetch = 7,
    ListOffsets = 8,
    CommitOffset = 9,
    FetchOffset = 10,
    GetMessage = 11,
    Stats = 12,
    FetchMany = 13,
    CreateGroup = 14,
    DeleteGroup = 15,
    ListGroups = 16,
    DescribeGroup = 17,
    Receive = 18,
    Ack = 19,
    Nack = 20,
    ChangeInvisible = 21,
    Join = 22,
    Heartbeat = 23,
    Leave = 24,
    GroupCommit = 25,
    GroupFetchOffset = 26,
    Subscribe = 27,
    Credit = 28,
    Unsubscribe = 29,
    // 30 is the push frame (`PUSH_FRAME_OP`), never a request.
    CancelMessage = 31,
}

/// Every operation this broker serves, for the handshake.
pub const ALL_OPS: [Op; 30] = [
    Op::Handshake,
    Op::Metadata,
    Op::CreateTopic,
    Op::DeleteTopic,
    Op::DescribeTopic,
    Op::Produce,
    Op::Fetch,
    Op::ListOffsets,
    Op::CommitOffset,
    Op::FetchOffset,
    Op::GetMessage,
    Op::Stats,
    Op::FetchMany,
    Op::CreateGroup,
    Op::DeleteGroup,
    Op::ListGroups,
    Op::DescribeGroup,
    Op::Receive,
    Op::Ack,
    Op::Nack,
    Op::ChangeInvisible,
    Op::Join,
    Op::Heartbeat,
    Op::Leave,
    Op::GroupCommit,
    Op::GroupFetchOffset,
    Op::Subscribe,
    Op::Credit,
    Op::Unsubscribe,
    Op::CancelMessage,
];

/// Lowest and highest version of every operation.
pub const OP_VERSION_MIN: u16 = 1;
pub const OP_VERSION_MAX: u16 = 1;

impl Op {
    /// The operation for a wire code, if known.
    pub fn from_u16(v: u16) -> Option<Op> {
        ALL_OPS.iter().copied().find(|op| *op as u16 == v)
    }
}

/// Queue selector in a produce request meaning "hash the routing key".
pub const QUEUE_BY_KEY: u32 = u32::MAX;

/// `base_offset` of a produce response for a scheduled batch: its
/// messages get their offsets when they are delivered.
pub const SCHEDULED_OFFSET: u64 = u64::MAX;

/// Durability level of a topic, on the wire as a `u8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Acknowledged once appended in memory.
    Memory = 1,
    /// Acknowledged once the io_uring write completed.
    Written = 2,
    /// Acknowledged once fdatasync returned.
    Fsync = 3,
}

impl Durability {
    pub fn from_u8(v: u8) -> Option<Durability> {
        match v {
            1 => Some(Durability::Memory),
            2 => Some(Durability::Written),
            3 => Some(Durability::Fsync),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Durability::Memory => "memory",
            Durability::Written => "written",
            Durability::Fsync => "fsync",
        }
    }
    /// The stronger of two levels.
    pub fn max_level(self, other: Durability) -> Durability {
        if (other as u8) > (self as u8) {
            other
        } else {
            self
        }
    }
    pub fn parse(s: &str) -> Option<Durability> {
        match s {
            "memory" => Some(Durability::Memory),
            "written" => Some(Durability::Written),
            "fsync" => Some(Durability::Fsync),
            _ => None,
        }
    }
}

fn durability(r: &mut Reader) -> Result<Durability, DecodeError> {
    let v = r.u8("durability")?;
    Durability::from_u8(v).ok_or(DecodeError::BadValue {
        field: "durability",
        value: u64::from(v),
    })
}

/// Shard hint of a handshake meaning "whichever shard accepted me".
pub const ANY_SHARD: u16 = u16::MAX;

/// Handshake request: who is calling, and which shard should serve the
/// connection (the broker hands the connection to that shard, so requests
/// for its queues take no cross-core hop).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandshakeRequest {
    pub client: String,
    /// A shard index, or [`ANY_SHARD`].
    pub shard: u16,
}

impl HandshakeRequest {
    pub fn encode(&self, out: &mut BytesMut) {
        Writer(out).str(&self.client).u16(self.shard);
    }
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let client = r.str("client")?;
        let shard = r.u16("shard")?;
        r.finish()?;
        Ok(HandshakeRequest { client, shard })
    }
}

/// Handshake response: the broker's version, shape, limits and operations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandshakeResponse {
    pub broker_version: String,
    pub shard_count: u16,
    /// The shard that accepted this connection.
    pub shard: u16,
    pub frame_bytes_max: u32,
    pub batch_bytes_max: u32,
    /// (op, min version, max version)
    pub ops: Vec<(u16, u16, u16)>,
}

impl HandshakeResponse {
    pub fn encode(&self, out: &mut BytesMut) {
        let mut w = Writer(out);
        w.str(&self.broker_version)
            .u16(self.shard_count)
            .u16(self.shard)
            .u32(self.frame_bytes_max)
            .u32(self.batch_bytes_max)
            .u16(self.ops.len() as u16);
        for (op, lo, hi) in &self.ops {
            w.u16(*op).u16(*lo).u16(*hi);
        }
    }
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let broker_version = r.str("broker_version")?;
        let shard_count = r.u16("shard_count")?;
        let shard = r.u16("shard")?;
        let frame_bytes_max = r.u32("frame_bytes_max")?;
        let batch_bytes_max = r.u32("batch_bytes_max")?;
        let n = r.u16("op count")?;
        let mut ops = Vec::with_capacity(n as usize);
        for _ in 0..n {
            ops.push((r.u16("op")?, r.u16("min")?, r.u16("max")?));
        }
        r.finish()?;
        Ok(HandshakeResponse {
            broker_version,
            shard_count,
            shard,
            frame_bytes_max,
            batch_bytes_max,
            ops,
        })
    }
}

/// A response carrying one `u64` (list offsets).
pub fn encode_u64(out: &mut BytesMut, v: u64) {
    Writer(out).u64(v);
}

/// Decodes a body of exactly one `u64`.
pub fn decode_u64(body: Bytes) -> Result<u64, DecodeError> {
    let mut r = Reader::new(body);
    let v = r.u64("value")?;
    r.finish()?;
    Ok(v)
}

/// Fetch-offset response: the committed offset, if any.
pub fn encode_opt_u64(out: &mut BytesMut, v: Option<u64>) {
    Writer(out).u8(v.is_some() as u8).u64(v.unwrap_or(0));
}

/// Decodes [`encode_opt_u64`].
pub fn decode_opt_u64(body: Bytes) -> Result<Option<u64>, DecodeError> {
    let mut r = Reader::new(body);
    let present = r.u8("present")?;
    let v = r.u64("offset")?;
    r.finish()?;
    Ok((present != 0).then_some(v))
}

/// Get-message request: a message id.
pub fn encode_message_id(out: &mut BytesMut, id: &MessageId) {
    out.extend_from_slice(&id.to_bytes());
}

/// Decodes a get-message request.
pub fn decode_message_id(body: Bytes) -> Result<MessageId, DecodeError> {
    let b: [u8; MESSAGE_ID_BYTES] = body[..]
        .try_into()
        .map_err(|_| DecodeError::Truncated("message id"))?;
    Ok(MessageId::from_bytes(&b))
}

/// Error response body: a human-readable message.
pub fn encode_error(out: &mut BytesMut, message: &str) {
    Writer(out).str(message);
}

/// Decodes an error body; a malformed one yields an empty message.
pub fn decode_error(body: Bytes) -> String {
    Reader::new(body).str("message").unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round<T: PartialEq + std::fmt::Debug>(
        v: T,
        enc: impl Fn(&T, &mut BytesMut),
        dec: impl Fn(Bytes) -> Result<T, DecodeError>,
    ) {
        let mut b = BytesMut::new();
        enc(&v, &mut b);
        let bytes = b.freeze();
        assert_eq!(dec(bytes.clone()).unwrap(), v);
        if !bytes.is_empty() {
            assert!(
                dec(bytes.slice(..bytes.len() - 1)).is_err(),
                "truncated body accepted"
            );
        }
        let mut longer = BytesMut::from(&bytes[..]);
        longer.extend_from_slice(b"x");
        assert!(dec(longer.freeze()).is_err(), "trailing byte accepted");
    }

    #[test]
    fn no_operation_shares_the_push_frames_code() {
        assert!(ALL_OPS
            .iter()
            .all(|op| *op as u16 != super::groups::PUSH_FRAME_OP));
        assert!(Op::from_u16(super::groups::PUSH_FRAME_OP).is_none());
    }

    #[test]
    fn every_body_round_trips_and_rejects_truncation() {
        let topic = TopicInfo {
            name: "orders".into(),
            durability: Durability::Written,
            queues: vec![QueueInfo {
                queue_id: 4,
                shard: 1,
            }],
        };
        round(topic.clone(), TopicInfo::encode, TopicInfo::decode);
        round(
            HandshakeRequest {
                client: "me".into(),
                shard: 1,
            },
            HandshakeRequest::encode,
            HandshakeRequest::decode,
        );
        round(
            HandshakeResponse {
                broker_version: "0.1".into(),
                shard_count: 2,
                shard: 1,
                frame_bytes_max: 10,
                batch_bytes_max: 9,
                ops: vec![(1, 1, 1)],
            },
            HandshakeResponse::encode,
            HandshakeResponse::decode,
        );
        round(
            MetadataRequest {
                topics: vec!["a".into()],
            },
            MetadataRequest::encode,
            MetadataRequest::decode,
        );
        round(
            MetadataResponse {
                shard_count: 2,
                topics: vec![topic.clone()],
            },
            MetadataResponse::encode,
            MetadataResponse::decode,
        );
        round(
            CreateTopicRequest {
                name: "t".into(),
                queues: 8,
                durability: None,
            },
            CreateTopicRequest::encode,
            CreateTopicRequest::decode,
        );
        round(
            DescribeTopicResponse {
                topic,
                offsets: vec![QueueOffsets {
                    earliest: 1,
                    latest: 2,
                }],
            },
            DescribeTopicResponse::encode,
            DescribeTopicResponse::decode,
        );
        round(
            ProduceRequest {
                topic: "t".into(),
                queue: QUEUE_BY_KEY,
                routing_key: Bytes::from_static(b"k"),
                batch: Bytes::from_static(b"batch"),
            },
            ProduceRequest::encode,
            ProduceRequest::decode,
        );
        round(
            ProduceResponse {
                queue: 1,
                base_offset: 2,
                count: 3,
                shard: 4,
                position: 5,
                append_time_ms: 6,
            },
            ProduceResponse::encode,
            ProduceResponse::decode,
        );
        round(
            FetchRequest {
                topic: "t".into(),
                queue: 1,
                offset: 2,
                max_bytes: 3,
                wait_ms: 4,
                filter: None,
            },
            FetchRequest::encode,
            FetchRequest::decode,
        );
        round(
            FetchRequest {
                topic: "t".into(),
                queue: 1,
                offset: 2,
                max_bytes: 3,
                wait_ms: 4,
                filter: Some(FilterSpec::sql("a > 1")),
            },
            FetchRequest::encode,
            FetchRequest::decode,
        );
        round(
            FetchManyRequest {
                topic: "t".into(),
                max_bytes: 3,
                wait_ms: 4,
                filter: Some(FilterSpec::tag("A || B")),
                queues: vec![(1, 2), (7, 0)],
            },
            FetchManyRequest::encode,
            FetchManyRequest::decode,
        );
        round(
            ListOffsetsRequest {
                topic: "t".into(),
                queue: 0,
                spec: OffsetSpec::Timestamp(99),
            },
            ListOffsetsRequest::encode,
            ListOffsetsRequest::decode,
        );
        round(
            GroupOffsetRequest {
                group: "g".into(),
                topic: "t".into(),
                queue: 3,
                offset: Some(7),
            },
            GroupOffsetRequest::encode,
            |b| GroupOffsetRequest::decode(b, true),
        );
        round(
            GetMessageResponse {
                topic: "t".into(),
                queue: 1,
                index: 2,
                batch: Bytes::from_static(b"zz"),
            },
            GetMessageResponse::encode,
            GetMessageResponse::decode,
        );
        round(Some(5u64), |v, b| encode_opt_u64(b, *v), decode_opt_u64);
    }

    fn one_record_batch() -> Bytes {
        let mut b = crate::batch::BatchBuilder::new();
        b.push(&crate::batch::Record {
            payload: Bytes::from_static(b"a"),
            ..Default::default()
        });
        b.finish()
    }

    #[test]
    fn fetch_many_response_round_trips_and_rejects_bad_counts() {
        let b1 = one_record_batch();
        let resp = FetchManyResponse {
            entries: vec![
                FetchManyEntry {
                    queue: 3,
                    error: 0,
                    offsets: QueueOffsets {
                        earliest: 0,
                        latest: 2,
                    },
                    next: 2,
                    batches: vec![b1.clone(), b1.clone()],
                },
                FetchManyEntry {
                    queue: 9,
                    error: super::super::ErrorCode::OffsetOutOfRange as u16,
                    offsets: QueueOffsets {
                        earliest: 5,
                        latest: 6,
                    },
                    next: 5,
                    batches: vec![],
                },
            ],
        };
        let mut parts = Vec::new();
        resp.encode_parts(&mut parts);
        let body: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        let body = Bytes::from(body);
        assert_eq!(FetchManyResponse::decode(body.clone()).unwrap(), resp);
        assert!(FetchManyResponse::decode(body.slice(..body.len() - 1)).is_err());
        // A count beyond the limit is refused before any allocation.
        let mut huge = BytesMut::new();
        Writer(&mut huge)
            .str("t")
            .u32(1)
            .u32(0)
            .u8(0)
            .str("")
            .u32(u32::MAX);
        assert!(FetchManyRequest::decode(huge.freeze()).is_err());
    }

    #[test]
    fn fetch_response_splits_batches_by_length() {
        let b1 = one_record_batch();
        let resp = FetchResponse {
            offsets: QueueOffsets {
                earliest: 0,
                latest: 2,
            },
            next: 2,
            batches: vec![b1.clone(), b1.clone()],
        };
        let mut out = BytesMut::new();
        resp.encode(&mut out);
        assert_eq!(FetchResponse::decode(out.freeze()).unwrap(), resp);
    }

    #[test]
    fn op_codes_are_stable() {
        for op in ALL_OPS {
            assert_eq!(Op::from_u16(op as u16), Some(op));
        }
        assert_eq!(Op::from_u16(0), None);
        assert_eq!(Op::from_u16(999), None);
    }
}
