//! Operation codes and their request and response bodies.
//!
//! Each body type has `encode` (append to a buffer) and `decode` (from a
//! body, rejecting trailing bytes). All operations are at version 1.

use super::codec::{DecodeError, Reader, Writer};
use crate::ids::{MessageId, MESSAGE_ID_BYTES};
use bytes::{Bytes, BytesMut};

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
}

/// Every operation this broker serves, for the handshake.
pub const ALL_OPS: [Op; 13] = [
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

/// One queue of a topic as metadata describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueInfo {
    /// Broker-wide queue id.
    pub queue_id: u32,
    /// Shard that owns the queue.
    pub shard: u16,
}

/// A topic as metadata describes it; queue `i` is `queues[i]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicInfo {
    pub name: String,
    pub durability: Durability,
    pub queues: Vec<QueueInfo>,
}

impl TopicInfo {
    pub fn encode(&self, out: &mut BytesMut) {
        let mut w = Writer(out);
        w.str(&self.name)
            .u8(self.durability as u8)
            .u32(self.queues.len() as u32);
        for q in &self.queues {
            w.u32(q.queue_id).u16(q.shard);
        }
    }
    pub fn decode_from(r: &mut Reader) -> Result<Self, DecodeError> {
        let name = r.str("topic")?;
        let durability = durability(r)?;
        let n = r.u32("queue count")?;
        let mut queues = Vec::with_capacity(n.min(1 << 16) as usize);
        for _ in 0..n {
            queues.push(QueueInfo {
                queue_id: r.u32("queue_id")?,
                shard: r.u16("shard")?,
            });
        }
        Ok(TopicInfo {
            name,
            durability,
            queues,
        })
    }
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let t = Self::decode_from(&mut r)?;
        r.finish()?;
        Ok(t)
    }
}

/// Metadata request: the named topics, or every topic when empty.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct MetadataRequest {
    pub topics: Vec<String>,
}

impl MetadataRequest {
    pub fn encode(&self, out: &mut BytesMut) {
        let mut w = Writer(out);
        w.u16(self.topics.len() as u16);
        for t in &self.topics {
            w.str(t);
        }
    }
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let n = r.u16("topic count")?;
        let topics = (0..n).map(|_| r.str("topic")).collect::<Result<_, _>>()?;
        r.finish()?;
        Ok(MetadataRequest { topics })
    }
}

/// Metadata response: shard count and the topics found (unknown names are
/// left out).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetadataResponse {
    pub shard_count: u16,
    pub topics: Vec<TopicInfo>,
}

impl MetadataResponse {
    pub fn encode(&self, out: &mut BytesMut) {
        Writer(out)
            .u16(self.shard_count)
            .u32(self.topics.len() as u32);
        for t in &self.topics {
            t.encode(out);
        }
    }
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let shard_count = r.u16("shard_count")?;
        let n = r.u32("topic count")?;
        let mut topics = Vec::new();
        for _ in 0..n {
            topics.push(TopicInfo::decode_from(&mut r)?);
        }
        r.finish()?;
        Ok(MetadataResponse {
            shard_count,
            topics,
        })
    }
}

/// Create topic request; `durability: None` takes the broker default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateTopicRequest {
    pub name: String,
    pub queues: u32,
    pub durability: Option<Durability>,
}

impl CreateTopicRequest {
    pub fn encode(&self, out: &mut BytesMut) {
        Writer(out)
            .str(&self.name)
            .u32(self.queues)
            .u8(self.durability.map_or(0, |d| d as u8));
    }
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let name = r.str("topic")?;
        let queues = r.u32("queues")?;
        let d = r.u8("durability")?;
        let durability = match d {
            0 => None,
            v => Some(Durability::from_u8(v).ok_or(DecodeError::BadValue {
                field: "durability",
                value: u64::from(v),
            })?),
        };
        r.finish()?;
        Ok(CreateTopicRequest {
            name,
            queues,
            durability,
        })
    }
}

/// A request naming only a topic (delete, describe).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicRequest {
    pub name: String,
}

impl TopicRequest {
    pub fn encode(&self, out: &mut BytesMut) {
        Writer(out).str(&self.name);
    }
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let name = r.str("topic")?;
        r.finish()?;
        Ok(TopicRequest { name })
    }
}

/// Offsets of one queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct QueueOffsets {
    /// Oldest offset still stored.
    pub earliest: u64,
    /// Offset the next visible message will get (high watermark).
    pub latest: u64,
}

/// Describe topic response: the topic and each queue's offsets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DescribeTopicResponse {
    pub topic: TopicInfo,
    pub offsets: Vec<QueueOffsets>,
}

impl DescribeTopicResponse {
    pub fn encode(&self, out: &mut BytesMut) {
        self.topic.encode(out);
        let mut w = Writer(out);
        w.u32(self.offsets.len() as u32);
        for o in &self.offsets {
            w.u64(o.earliest).u64(o.latest);
        }
    }
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let topic = TopicInfo::decode_from(&mut r)?;
        let n = r.u32("queue count")?;
        let mut offsets = Vec::new();
        for _ in 0..n {
            offsets.push(QueueOffsets {
                earliest: r.u64("earliest")?,
                latest: r.u64("latest")?,
            });
        }
        r.finish()?;
        Ok(DescribeTopicResponse { topic, offsets })
    }
}

/// Produce request: one batch to one queue (or to the queue its routing
/// key hashes to when `queue == QUEUE_BY_KEY`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProduceRequest {
    pub topic: String,
    pub queue: u32,
    pub routing_key: Bytes,
    pub batch: Bytes,
}

impl ProduceRequest {
    pub fn encode(&self, out: &mut BytesMut) {
        Writer(out)
            .str(&self.topic)
            .u32(self.queue)
            .bytes16(&self.routing_key)
            .bytes32(&self.batch);
    }
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let topic = r.str("topic")?;
        let queue = r.u32("queue")?;
        let routing_key = r.bytes16("routing_key")?;
        let batch = r.bytes32("batch")?;
        r.finish()?;
        Ok(ProduceRequest {
            topic,
            queue,
            routing_key,
            batch,
        })
    }
}

/// Produce response: where the batch went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProduceResponse {
    pub queue: u32,
    pub base_offset: u64,
    pub count: u32,
    pub shard: u16,
    pub position: u64,
    pub append_time_ms: i64,
}

impl ProduceResponse {
    pub fn encode(&self, out: &mut BytesMut) {
        Writer(out)
            .u32(self.queue)
            .u64(self.base_offset)
            .u32(self.count)
            .u16(self.shard)
            .u64(self.position)
            .i64(self.append_time_ms);
    }
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let v = ProduceResponse {
            queue: r.u32("queue")?,
            base_offset: r.u64("base_offset")?,
            count: r.u32("count")?,
            shard: r.u16("shard")?,
            position: r.u64("position")?,
            append_time_ms: r.i64("append_time_ms")?,
        };
        r.finish()?;
        Ok(v)
    }
    /// Id of the `index`-th message of the produced batch.
    pub fn message_id(&self, index: u32) -> MessageId {
        MessageId {
            shard: crate::ids::ShardId(self.shard),
            position: crate::ids::LogPosition(self.position),
            index,
        }
    }
}

/// Fetch request: batches of one queue from `offset`, waiting up to
/// `wait_ms` when nothing is there yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchRequest {
    pub topic: String,
    pub queue: u32,
    pub offset: u64,
    pub max_bytes: u32,
    pub wait_ms: u32,
}

impl FetchRequest {
    pub fn encode(&self, out: &mut BytesMut) {
        Writer(out)
            .str(&self.topic)
            .u32(self.queue)
            .u64(self.offset)
            .u32(self.max_bytes)
            .u32(self.wait_ms);
    }
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let v = FetchRequest {
            topic: r.str("topic")?,
            queue: r.u32("queue")?,
            offset: r.u64("offset")?,
            max_bytes: r.u32("max_bytes")?,
            wait_ms: r.u32("wait_ms")?,
        };
        r.finish()?;
        Ok(v)
    }
}

/// Fetch response: whole stored batches, back to back. The first batch may
/// start before the requested offset; the client skips those records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchResponse {
    pub offsets: QueueOffsets,
    pub batches: Vec<Bytes>,
}

impl FetchResponse {
    /// Encodes the fixed part; the batches follow as `u32 total` + bytes.
    pub fn encode(&self, out: &mut BytesMut) {
        let total: usize = self.batches.iter().map(Bytes::len).sum();
        Writer(out)
            .u64(self.offsets.earliest)
            .u64(self.offsets.latest)
            .u32(total as u32);
        for b in &self.batches {
            out.extend_from_slice(b);
        }
    }
    /// Decodes and splits the batches (by their length fields, zero-copy).
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let earliest = r.u64("earliest")?;
        let latest = r.u64("latest")?;
        let all = r.bytes32("batches")?;
        r.finish()?;
        Ok(FetchResponse {
            offsets: QueueOffsets { earliest, latest },
            batches: split_batches(all)?,
        })
    }
}

/// Most queues one fetch-many request may name.
pub const FETCH_MANY_QUEUES_MAX: usize = 16_384;

/// Fetch-many request: batches of many queues of one topic, all owned by
/// the shard that serves it, in one request and one long poll. The broker
/// reads the queues in request order until `max_bytes` is reached (at
/// least one batch when any queue has one), so a client rotates the order
/// for fairness; it waits up to `wait_ms` only when no queue has anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchManyRequest {
    pub topic: String,
    pub max_bytes: u32,
    pub wait_ms: u32,
    /// (queue, offset)
    pub queues: Vec<(u32, u64)>,
}

impl FetchManyRequest {
    pub fn encode(&self, out: &mut BytesMut) {
        let mut w = Writer(out);
        w.str(&self.topic)
            .u32(self.max_bytes)
            .u32(self.wait_ms)
            .u32(self.queues.len() as u32);
        for &(q, o) in &self.queues {
            w.u32(q).u64(o);
        }
    }
    /// The topic and the first queue named (which pick the serving shard),
    /// without decoding the rest.
    pub fn decode_route(body: Bytes) -> Result<(String, Option<u32>), DecodeError> {
        let mut r = Reader::new(body);
        let topic = r.str("topic")?;
        r.u32("max_bytes")?;
        r.u32("wait_ms")?;
        let n = bounded_count(&mut r, "queue_count", FETCH_MANY_QUEUES_MAX)?;
        let first = if n > 0 { Some(r.u32("queue")?) } else { None };
        Ok((topic, first))
    }
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let topic = r.str("topic")?;
        let max_bytes = r.u32("max_bytes")?;
        let wait_ms = r.u32("wait_ms")?;
        let n = bounded_count(&mut r, "queue_count", FETCH_MANY_QUEUES_MAX)?;
        let mut queues = Vec::with_capacity(n);
        for _ in 0..n {
            queues.push((r.u32("queue")?, r.u64("offset")?));
        }
        r.finish()?;
        Ok(FetchManyRequest {
            topic,
            max_bytes,
            wait_ms,
            queues,
        })
    }
}

/// A `u32` element count, refused above `max` before anything is allocated.
fn bounded_count(r: &mut Reader, field: &'static str, max: usize) -> Result<usize, DecodeError> {
    let n = r.u32(field)? as usize;
    if n > max {
        return Err(DecodeError::BadValue {
            field,
            value: n as u64,
        });
    }
    Ok(n)
}

/// One queue's part of a fetch-many response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchManyEntry {
    pub queue: u32,
    /// [`super::ErrorCode`] for this queue (0: ok).
    pub error: u16,
    pub offsets: QueueOffsets,
    pub batches: Vec<Bytes>,
}

/// Fetch-many response: an entry for each queue that had batches or an
/// error; queues with nothing new are left out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchManyResponse {
    pub entries: Vec<FetchManyEntry>,
}

impl FetchManyResponse {
    /// Encodes the response as a list of buffers (batches are not copied).
    pub fn encode_parts(&self, out: &mut Vec<Bytes>) {
        let mut head = BytesMut::new();
        Writer(&mut head).u32(self.entries.len() as u32);
        for e in &self.entries {
            let total: usize = e.batches.iter().map(Bytes::len).sum();
            Writer(&mut head)
                .u32(e.queue)
                .u16(e.error)
                .u64(e.offsets.earliest)
                .u64(e.offsets.latest)
                .u32(total as u32);
            out.push(head.split().freeze());
            out.extend(e.batches.iter().cloned());
        }
        if !head.is_empty() {
            out.push(head.freeze());
        }
    }
    /// Decodes and splits every entry's batches (zero-copy).
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let n = bounded_count(&mut r, "entry_count", FETCH_MANY_QUEUES_MAX)?;
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let queue = r.u32("queue")?;
            let error = r.u16("error")?;
            let earliest = r.u64("earliest")?;
            let latest = r.u64("latest")?;
            let all = r.bytes32("batches")?;
            entries.push(FetchManyEntry {
                queue,
                error,
                offsets: QueueOffsets { earliest, latest },
                batches: split_batches(all)?,
            });
        }
        r.finish()?;
        Ok(FetchManyResponse { entries })
    }
}

/// Splits back-to-back batches by their length fields (zero-copy).
fn split_batches(mut all: Bytes) -> Result<Vec<Bytes>, DecodeError> {
    let mut batches = Vec::new();
    while !all.is_empty() {
        let len = crate::batch::peek_batch_len(&all).ok_or(DecodeError::Truncated("batch"))?;
        let len = len as usize;
        if len < crate::batch::BATCH_HEADER_BYTES || len > all.len() {
            return Err(DecodeError::BadValue {
                field: "batch_len",
                value: len as u64,
            });
        }
        batches.push(all.split_to(len));
    }
    Ok(batches)
}

/// Which offset a list-offsets request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffsetSpec {
    Earliest,
    Latest,
    /// First offset whose broker timestamp is at or after this time.
    Timestamp(i64),
}

/// List offsets request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListOffsetsRequest {
    pub topic: String,
    pub queue: u32,
    pub spec: OffsetSpec,
}

impl ListOffsetsRequest {
    pub fn encode(&self, out: &mut BytesMut) {
        let (kind, ts) = match self.spec {
            OffsetSpec::Earliest => (0, 0),
            OffsetSpec::Latest => (1, 0),
            OffsetSpec::Timestamp(t) => (2, t),
        };
        Writer(out)
            .str(&self.topic)
            .u32(self.queue)
            .u8(kind)
            .i64(ts);
    }
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let topic = r.str("topic")?;
        let queue = r.u32("queue")?;
        let kind = r.u8("spec")?;
        let ts = r.i64("timestamp_ms")?;
        r.finish()?;
        let spec = match kind {
            0 => OffsetSpec::Earliest,
            1 => OffsetSpec::Latest,
            2 => OffsetSpec::Timestamp(ts),
            v => {
                return Err(DecodeError::BadValue {
                    field: "spec",
                    value: u64::from(v),
                })
            }
        };
        Ok(ListOffsetsRequest { topic, queue, spec })
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

/// Commit (with `offset`) or fetch (without) a consumer group's offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupOffsetRequest {
    pub group: String,
    pub topic: String,
    pub queue: u32,
    /// Present for commit, absent for fetch.
    pub offset: Option<u64>,
}

impl GroupOffsetRequest {
    pub fn encode(&self, out: &mut BytesMut) {
        let mut w = Writer(out);
        w.str(&self.group).str(&self.topic).u32(self.queue);
        if let Some(o) = self.offset {
            w.u64(o);
        }
    }
    /// `with_offset`: true for commit.
    pub fn decode(body: Bytes, with_offset: bool) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let group = r.str("group")?;
        let topic = r.str("topic")?;
        let queue = r.u32("queue")?;
        let offset = if with_offset {
            Some(r.u64("offset")?)
        } else {
            None
        };
        r.finish()?;
        Ok(GroupOffsetRequest {
            group,
            topic,
            queue,
            offset,
        })
    }
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

/// Get-message response: where the message lives and its whole batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GetMessageResponse {
    pub topic: String,
    pub queue: u32,
    pub index: u32,
    pub batch: Bytes,
}

impl GetMessageResponse {
    pub fn encode(&self, out: &mut BytesMut) {
        Writer(out)
            .str(&self.topic)
            .u32(self.queue)
            .u32(self.index)
            .bytes32(&self.batch);
    }
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let v = GetMessageResponse {
            topic: r.str("topic")?,
            queue: r.u32("queue")?,
            index: r.u32("index")?,
            batch: r.bytes32("batch")?,
        };
        r.finish()?;
        Ok(v)
    }
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
            },
            FetchRequest::encode,
            FetchRequest::decode,
        );
        round(
            FetchManyRequest {
                topic: "t".into(),
                max_bytes: 3,
                wait_ms: 4,
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
                    batches: vec![b1.clone(), b1.clone()],
                },
                FetchManyEntry {
                    queue: 9,
                    error: super::super::ErrorCode::OffsetOutOfRange as u16,
                    offsets: QueueOffsets {
                        earliest: 5,
                        latest: 6,
                    },
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
        Writer(&mut huge).str("t").u32(1).u32(0).u32(u32::MAX);
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
