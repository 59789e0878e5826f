//! A blocking Rust client over std sockets: no glommio, no async runtime,
//! usable from a plain `fn main`. One [`Connection`] pipelines requests
//! (many in flight, replies matched by request id); [`Producer`],
//! [`Consumer`], [`GroupConsumer`] and [`Admin`] build on it.
//!
//! ```no_run
//! use keelmq_client::{Admin, Consumer, Producer, Record, SeekTo};
//! let mut admin = Admin::connect("127.0.0.1:7400")?;
//! admin.create_topic("orders", 4, None)?;
//! let mut producer = Producer::connect("127.0.0.1:7400")?;
//! let receipt = producer.send("orders", Record::new("hello").with_key("customer-7"))?;
//! let mut consumer = Consumer::connect("127.0.0.1:7400")?;
//! consumer.assign_all("orders")?;
//! consumer.seek(SeekTo::Earliest)?;
//! let messages = consumer.poll(std::time::Duration::from_secs(1))?;
//! # Ok::<(), keelmq_client::ClientError>(())
//! ```

#![warn(missing_docs)]

// The wire formats, under the paths the modules use.
use keelmq_protocol as protocol;
use keelmq_protocol::{batch, ids};

mod admin;
mod conn;
mod consumer;
mod group;
mod member;
mod producer;

pub use crate::batch::Record;
pub use crate::ids::MessageId;
pub use crate::protocol::{Durability, ErrorCode, FilterSpec, FilterType, QueueOffsets, TopicInfo};
pub use admin::Admin;
pub use conn::{Connection, Incoming};
pub use consumer::{Consumer, SeekTo};
pub use group::{
    Delivery, GroupConsumer, Outcome, PUSH_CREDIT_BYTES_DEFAULT, PUSH_CREDIT_MESSAGES_DEFAULT,
};
pub use member::{AssignmentListener, GroupMember};
pub use producer::{Producer, QueueSelector, SendReceipt};

use bytes::Bytes;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The socket failed or the broker closed the connection.
    #[error("connection: {0}")]
    Io(std::io::Error),
    /// The broker answered with an error code.
    #[error("broker error {}: {message}", code.name())]
    Broker {
        /// The wire error code.
        code: ErrorCode,
        /// The broker's message.
        message: String,
    },
    /// The broker's reply could not be understood.
    #[error("protocol: {0}")]
    Protocol(String),
    /// No reply within the time allowed.
    #[error("timed out waiting for the broker")]
    Timeout,
    /// The call's arguments cannot be sent (too large, empty, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        ClientError::Io(e)
    }
}

impl From<crate::protocol::DecodeError> for ClientError {
    fn from(e: crate::protocol::DecodeError) -> Self {
        ClientError::Protocol(e.to_string())
    }
}

/// A consumed message with every field the broker stores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Topic it was produced to (shared by every message of a fetch).
    pub topic: std::sync::Arc<str>,
    /// Queue index within the topic.
    pub queue: u32,
    /// Offset within the queue.
    pub offset: u64,
    /// Broker-assigned id (shard + log position + index).
    pub id: MessageId,
    /// Optional key.
    pub key: Option<Bytes>,
    /// Optional tag.
    pub tag: Option<String>,
    /// User properties.
    pub properties: Vec<(String, String)>,
    /// The payload (shares the fetched buffer, no copy).
    pub payload: Bytes,
    /// Producer clock at send, ms since the epoch.
    pub producer_timestamp_ms: i64,
    /// Broker clock at append, ms since the epoch.
    pub broker_timestamp_ms: i64,
    /// Priority (0 = default).
    pub priority: u8,
    /// Scheduled delivery time (0 = immediate).
    pub deliver_at_ms: i64,
}

impl Message {
    /// The message as one JSON object (payload as UTF-8 text when it is
    /// valid UTF-8, else as `payload_hex`).
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "topic": &*self.topic,
            "queue": self.queue,
            "offset": self.offset,
            "id": self.id.to_string(),
            "key": self.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned()),
            "tag": self.tag,
            "properties": self.properties.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "producer_timestamp_ms": self.producer_timestamp_ms,
            "broker_timestamp_ms": self.broker_timestamp_ms,
            "priority": self.priority,
            "deliver_at_ms": self.deliver_at_ms,
        });
        match std::str::from_utf8(&self.payload) {
            Ok(s) => v["payload"] = s.into(),
            Err(_) => {
                v["payload_hex"] = self
                    .payload
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
                    .into()
            }
        }
        v
    }
}

/// The filter a group's settings (the `settings` of a describe) give its
/// subscription to `topic`; `None` for `*` or no such subscription.
pub fn subscription_filter(settings: &serde_json::Value, topic: &str) -> Option<FilterSpec> {
    let s = settings["subscriptions"]
        .as_array()?
        .iter()
        .find(|s| s["topic"] == topic)?;
    let expression = s["filter"].as_str().unwrap_or("*");
    if expression.trim() == "*" {
        return None;
    }
    let kind = s["filter_type"]
        .as_str()
        .and_then(FilterType::parse)
        .unwrap_or(FilterType::Tag);
    Some(FilterSpec {
        kind,
        expression: expression.to_owned(),
    })
}

/// Decodes the records of a stored batch (or of a view: a filter's
/// selection, or fired scheduled messages) into messages, skipping those
/// before `from_offset`. `shard` owns the queue (part of the message id).
pub fn decode_batch(
    topic: &std::sync::Arc<str>,
    queue: u32,
    shard: u16,
    batch: &Bytes,
    from_offset: u64,
) -> Result<Vec<Message>, ClientError> {
    let h = crate::batch::check_fetched(batch)
        .map_err(|e| ClientError::Protocol(format!("fetched batch: {e}")))?;
    let mut out = Vec::with_capacity(h.record_count as usize);
    for r in crate::batch::RecordIter::new(batch) {
        let r = r.map_err(|e| ClientError::Protocol(format!("fetched batch: {e}")))?;
        let i = r.index;
        let offset = h.base_offset + u64::from(i);
        if offset < from_offset {
            continue;
        }
        out.push(Message {
            topic: topic.clone(),
            queue,
            offset,
            id: MessageId {
                shard: crate::ids::ShardId(shard),
                position: crate::ids::LogPosition(r.origin_position),
                index: r.origin_index,
            },
            key: r.key.map(|k| batch.slice_ref(k)),
            tag: r.tag.map(str::to_owned),
            properties: r
                .properties
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            payload: batch.slice(r.payload_range.clone()),
            producer_timestamp_ms: r.timestamp_ms,
            broker_timestamp_ms: h.append_time_ms,
            priority: r.priority,
            deliver_at_ms: r.deliver_at_ms,
        });
    }
    Ok(out)
}
