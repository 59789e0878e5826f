//! Topic operations: metadata, create, delete, describe.

use super::*;
use crate::codec::{DecodeError, Reader, Writer};
use bytes::{Bytes, BytesMut};

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
