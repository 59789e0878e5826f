//! Message operations: produce, fetch, fetch-many, list offsets, get by id.

use super::*;
use crate::codec::{DecodeError, Reader, Writer};
use bytes::{Bytes, BytesMut};

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
/// `wait_ms` when nothing is there yet; with a filter, only the records it
/// passes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchRequest {
    pub topic: String,
    pub queue: u32,
    pub offset: u64,
    pub max_bytes: u32,
    pub wait_ms: u32,
    pub filter: Option<FilterSpec>,
}

impl FetchRequest {
    pub fn encode(&self, out: &mut BytesMut) {
        let mut w = Writer(out);
        w.str(&self.topic)
            .u32(self.queue)
            .u64(self.offset)
            .u32(self.max_bytes)
            .u32(self.wait_ms);
        encode_filter(&mut w, self.filter.as_ref());
    }
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let v = FetchRequest {
            topic: r.str("topic")?,
            queue: r.u32("queue")?,
            offset: r.u64("offset")?,
            max_bytes: r.u32("max_bytes")?,
            wait_ms: r.u32("wait_ms")?,
            filter: decode_filter(&mut r)?,
        };
        r.finish()?;
        Ok(v)
    }
}

/// The filter language of an expression.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FilterType {
    /// `*` or tags joined by `||`.
    Tag = 1,
    /// RocketMQ's SQL92 over properties and built-ins, plus `LIKE`.
    Sql92 = 2,
}

impl FilterType {
    pub fn name(self) -> &'static str {
        match self {
            FilterType::Tag => "TAG",
            FilterType::Sql92 => "SQL92",
        }
    }
    /// `TAG` or `SQL92` (any case; `SQL` also names SQL92).
    pub fn parse(s: &str) -> Option<FilterType> {
        match s.to_ascii_uppercase().as_str() {
            "TAG" => Some(FilterType::Tag),
            "SQL92" | "SQL" => Some(FilterType::Sql92),
            _ => None,
        }
    }
}

/// A filter as a request carries it: its language and its text (parsed by
/// the broker, which refuses a bad one with where and why).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FilterSpec {
    pub kind: FilterType,
    pub expression: String,
}

impl FilterSpec {
    pub fn tag(expression: impl Into<String>) -> FilterSpec {
        FilterSpec {
            kind: FilterType::Tag,
            expression: expression.into(),
        }
    }
    pub fn sql(expression: impl Into<String>) -> FilterSpec {
        FilterSpec {
            kind: FilterType::Sql92,
            expression: expression.into(),
        }
    }
}

/// `filter_type: u8` (0 none, 1 TAG, 2 SQL92), `filter: string` (empty
/// when none).
pub(crate) fn encode_filter(w: &mut Writer, f: Option<&FilterSpec>) {
    match f {
        None => w.u8(0).str(""),
        Some(f) => w.u8(f.kind as u8).str(&f.expression),
    };
}

pub(crate) fn decode_filter(r: &mut Reader) -> Result<Option<FilterSpec>, DecodeError> {
    let kind = r.u8("filter_type")?;
    let expression = r.str("filter")?;
    let kind = match kind {
        0 if expression.is_empty() => return Ok(None),
        1 => FilterType::Tag,
        2 => FilterType::Sql92,
        v => {
            return Err(DecodeError::BadValue {
                field: "filter_type",
                value: u64::from(v),
            })
        }
    };
    Ok(Some(FilterSpec { kind, expression }))
}

/// Fetch response: whole stored batches (or, under a filter, filtered
/// copies of the batches it keeps only some records of), back to back. The
/// first batch may start before the requested offset; the client skips
/// those records. `next` is where to fetch from next: past the last batch
/// returned, or, under a filter, past every record the broker looked at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchResponse {
    pub offsets: QueueOffsets,
    pub next: u64,
    pub batches: Vec<Bytes>,
}

impl FetchResponse {
    /// Encodes the fixed part; the batches follow as `u32 total` + bytes.
    pub fn encode(&self, out: &mut BytesMut) {
        let total: usize = self.batches.iter().map(Bytes::len).sum();
        Writer(out)
            .u64(self.offsets.earliest)
            .u64(self.offsets.latest)
            .u64(self.next)
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
        let next = r.u64("next")?;
        let all = r.bytes32("batches")?;
        r.finish()?;
        Ok(FetchResponse {
            offsets: QueueOffsets { earliest, latest },
            next,
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
    /// One filter for every queue named.
    pub filter: Option<FilterSpec>,
    /// (queue, offset)
    pub queues: Vec<(u32, u64)>,
}

impl FetchManyRequest {
    pub fn encode(&self, out: &mut BytesMut) {
        let mut w = Writer(out);
        w.str(&self.topic).u32(self.max_bytes).u32(self.wait_ms);
        encode_filter(&mut w, self.filter.as_ref());
        w.u32(self.queues.len() as u32);
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
        decode_filter(&mut r)?;
        let n = bounded_count(&mut r, "queue_count", FETCH_MANY_QUEUES_MAX)?;
        let first = if n > 0 { Some(r.u32("queue")?) } else { None };
        Ok((topic, first))
    }
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let topic = r.str("topic")?;
        let max_bytes = r.u32("max_bytes")?;
        let wait_ms = r.u32("wait_ms")?;
        let filter = decode_filter(&mut r)?;
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
            filter,
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
    /// Where to fetch this queue from next (as in [`FetchResponse`]).
    pub next: u64,
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
                .u64(e.next)
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
            let next = r.u64("next")?;
            let all = r.bytes32("batches")?;
            entries.push(FetchManyEntry {
                queue,
                error,
                offsets: QueueOffsets { earliest, latest },
                next,
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
