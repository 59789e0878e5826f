//! One handler per operation, and the routing that sends a request to the
//! shard owning its queue.
//!
//! [`submit`] runs on the shard whose connection received the request: it
//! routes, and either executes locally or forwards over the mesh (awaiting
//! channel capacity, in arrival order). [`execute_local`] runs on the owning
//! shard. Both return a [`Pending`]: the synchronous part (for produce: the
//! validation and the append) has already happened in order; what is left
//! (waiting for durability, reading) is the future.

use bytes::{Bytes, BytesMut};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::batch::{self, BatchError, BatchHeader};
use crate::ids::{MessageId, QueueId, QueueIndex, QueueOffset, ShardId};
use crate::protocol::codec::{Reader, Writer};
use crate::protocol::*;
use crate::shard::metadata::{queue_for_key, Metadata, MetadataError};
use crate::shard::metrics::histogram_json;
use crate::shard::Shard;
use crate::storage::commit_log::LogError;
use crate::storage::StoreError;

mod admin;
mod groups;
mod messages;
mod topics;

pub use admin::shard_stats;
use admin::*;
use groups::*;
pub use groups::{group_timer, receive_target, RECEIVE_MESSAGES_MAX};
use messages::*;
use topics::*;

/// Internal operation: apply this metadata document (shard 0 → others).
pub const OP_INTERNAL_APPLY_METADATA: u16 = 0x8001;
/// Internal operation: this shard's stats as JSON.
pub const OP_INTERNAL_STATS: u16 = 0x8002;
/// Internal operation: offsets of the listed queue ids.
pub const OP_INTERNAL_OFFSETS: u16 = 0x8003;

/// A finished response: code and body chunks (sent back to back).
pub struct Reply {
    pub code: ErrorCode,
    pub body: Vec<Bytes>,
}

/// A response now, or one still being produced.
pub enum Pending {
    Ready(Reply),
    Later(Pin<Box<dyn Future<Output = Reply>>>),
}

impl Pending {
    /// Waits for the reply.
    pub async fn resolve(self) -> Reply {
        match self {
            Pending::Ready(r) => r,
            Pending::Later(f) => f.await,
        }
    }
}

/// A handler failure, as it goes on the wire.
#[derive(Debug)]
pub struct HandlerError {
    pub code: ErrorCode,
    pub message: String,
}

pub(in crate::broker) type HResult = Result<Vec<Bytes>, HandlerError>;

pub(in crate::broker) fn herr(code: ErrorCode, message: impl Into<String>) -> HandlerError {
    HandlerError {
        code,
        message: message.into(),
    }
}

impl From<DecodeError> for HandlerError {
    fn from(e: DecodeError) -> Self {
        herr(ErrorCode::Malformed, e.to_string())
    }
}

impl From<MetadataError> for HandlerError {
    fn from(e: MetadataError) -> Self {
        let code = match e {
            MetadataError::InvalidName(_) | MetadataError::QueueCount(..) => {
                ErrorCode::InvalidArgument
            }
            MetadataError::Exists(_) => ErrorCode::TopicExists,
            MetadataError::TooManyTopics(_)
            | MetadataError::TooManyQueues { .. }
            | MetadataError::QueueIdsExhausted => ErrorCode::InvalidArgument,
            MetadataError::UnknownTopic(_) => ErrorCode::UnknownTopic,
            MetadataError::UnknownQueue { .. } => ErrorCode::UnknownQueue,
            MetadataError::UnknownSubscription { .. } => ErrorCode::UnknownTopic,
            MetadataError::GroupExists(_) => ErrorCode::GroupExists,
            MetadataError::UnknownGroup(_) => ErrorCode::UnknownGroup,
            MetadataError::Group(crate::group::config::GroupConfigError::Filter { .. }) => {
                ErrorCode::InvalidFilter
            }
            MetadataError::TooManyGroups
            | MetadataError::GroupIdsExhausted
            | MetadataError::Group(_) => ErrorCode::InvalidArgument,
        };
        herr(code, e.to_string())
    }
}

impl From<StoreError> for HandlerError {
    fn from(e: StoreError) -> Self {
        let code = match &e {
            StoreError::UnknownQueue(_) => ErrorCode::UnknownQueue,
            StoreError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
            StoreError::Log(LogError::NotFound(_)) => ErrorCode::MessageNotFound,
            StoreError::Log(LogError::Closing) => ErrorCode::ShuttingDown,
            StoreError::Log(LogError::Full(_)) => ErrorCode::StorageFull,
            StoreError::Log(LogError::Busy(_)) => ErrorCode::Busy,
            StoreError::Log(LogError::Failed(_) | LogError::Read(_))
            | StoreError::Corrupt { .. }
            | StoreError::Recovery(_) => ErrorCode::StorageError,
        };
        herr(code, e.to_string())
    }
}

impl From<BatchError> for HandlerError {
    fn from(e: BatchError) -> Self {
        let code = match e {
            BatchError::TooLarge(..) => ErrorCode::BatchTooLarge,
            _ => ErrorCode::InvalidBatch,
        };
        herr(code, e.to_string())
    }
}

pub(in crate::broker) fn reply(r: HResult) -> Reply {
    match r {
        Ok(body) => Reply {
            code: ErrorCode::Ok,
            body,
        },
        Err(e) => {
            let mut b = BytesMut::new();
            encode_error(&mut b, &e.message);
            Reply {
                code: e.code,
                body: vec![b.freeze()],
            }
        }
    }
}

pub(in crate::broker) fn ready(r: HResult) -> Pending {
    Pending::Ready(reply(r))
}

fn later(f: impl Future<Output = HResult> + 'static) -> Pending {
    Pending::Later(Box::pin(async move { reply(f.await) }))
}

pub(in crate::broker) fn body(f: impl FnOnce(&mut BytesMut)) -> Vec<Bytes> {
    let mut b = BytesMut::new();
    f(&mut b);
    vec![b.freeze()]
}

/// Routes a client request received on this shard's connection.
pub async fn submit(shard: &Rc<Shard>, op_code: u16, version: u16, body: Bytes) -> Pending {
    let Some(op) = Op::from_u16(op_code) else {
        return ready(Err(herr(
            ErrorCode::UnknownOperation,
            format!("unknown operation {op_code}"),
        )));
    };
    if !(OP_VERSION_MIN..=OP_VERSION_MAX).contains(&version) {
        return ready(Err(herr(
            ErrorCode::UnsupportedVersion,
            format!("operation {op:?} supports versions {OP_VERSION_MIN}..={OP_VERSION_MAX}, not {version}"),
        )));
    }
    match route(shard, op, &body) {
        Err(e) => ready(Err(e)),
        Ok((owner, queue)) if owner == shard.id => {
            execute_local(shard, op_code, queue, body, false).await
        }
        Ok((owner, queue)) => forward(shard, owner, op_code, queue, body).await,
    }
}

/// Which shard serves a request, and (for produce) the resolved queue.
fn route(shard: &Shard, op: Op, body: &Bytes) -> Result<(u16, Option<QueueIndex>), HandlerError> {
    let meta = shard.metadata.borrow();
    let owner = |topic: &str, queue: u32| -> Result<(u16, Option<QueueIndex>), HandlerError> {
        Ok((meta.route(topic, QueueIndex(queue))?.shard, None))
    };
    match op {
        Op::Handshake
        | Op::Metadata
        | Op::DescribeTopic
        | Op::Stats
        | Op::ListGroups
        | Op::DescribeGroup => Ok((shard.id, None)),
        Op::CreateTopic | Op::DeleteTopic | Op::CreateGroup | Op::DeleteGroup => Ok((0, None)),
        Op::Receive => {
            let req = ReceiveRequest::decode(body.clone())?;
            let s = if req.shard == ANY_SHARD {
                shard.id
            } else {
                req.shard
            };
            if s >= shard.shard_count {
                return Err(herr(
                    ErrorCode::InvalidArgument,
                    format!("no shard {s}: the broker has {}", shard.shard_count),
                ));
            }
            Ok((s, None))
        }
        Op::Join | Op::Heartbeat | Op::Leave | Op::GroupCommit | Op::GroupFetchOffset => {
            group_route(shard, &meta, op, body)
        }
        // Served by the connection itself (`broker::push`), never routed.
        Op::Subscribe | Op::Credit | Op::Unsubscribe => Err(herr(
            ErrorCode::InvalidArgument,
            format!("{op:?} is served by the client's connection, not forwarded"),
        )),
        Op::Ack | Op::Nack | Op::ChangeInvisible => {
            let s = if op == Op::ChangeInvisible {
                body.get(2..4).map(|b| u16::from_le_bytes([b[0], b[1]]))
            } else {
                SettleRequest::shard_of(body, op == Op::Nack)
            };
            match s {
                Some(s) if s < shard.shard_count => Ok((s, None)),
                Some(s) => Err(herr(
                    ErrorCode::InvalidReceipt,
                    format!("the receipt handle names shard {s}, which does not exist"),
                )),
                None => Err(herr(ErrorCode::Malformed, "no receipt handle")),
            }
        }
        Op::Produce => {
            let req = ProduceRequest::decode(body.clone())?;
            let queue = resolve_produce_queue(shard, &meta, &req)?;
            Ok((meta.route(&req.topic, queue)?.shard, Some(queue)))
        }
        Op::Fetch => {
            let req = FetchRequest::decode(body.clone())?;
            owner(&req.topic, req.queue)
        }
        Op::FetchMany => {
            // Only the topic and the first queue decide the shard; the
            // (possibly long) queue list is decoded once, by the handler.
            let (topic, first) = FetchManyRequest::decode_route(body.clone())?;
            let queue = first
                .ok_or_else(|| herr(ErrorCode::InvalidArgument, "fetch_many names no queue"))?;
            owner(&topic, queue)
        }
        Op::ListOffsets => {
            let req = ListOffsetsRequest::decode(body.clone())?;
            owner(&req.topic, req.queue)
        }
        Op::CommitOffset | Op::FetchOffset => {
            let req = GroupOffsetRequest::decode(body.clone(), op == Op::CommitOffset)?;
            owner(&req.topic, req.queue)
        }
        Op::GetMessage | Op::CancelMessage => {
            let id = decode_message_id(body.clone())?;
            if id.shard.0 >= shard.shard_count {
                return Err(herr(
                    ErrorCode::MessageNotFound,
                    format!("no shard {} for message {id}", id.shard.0),
                ));
            }
            Ok((id.shard.0, None))
        }
    }
}

fn resolve_produce_queue(
    shard: &Shard,
    meta: &Metadata,
    req: &ProduceRequest,
) -> Result<QueueIndex, HandlerError> {
    if req.queue != QUEUE_BY_KEY {
        return Ok(QueueIndex(req.queue));
    }
    let n = meta.queue_count(&req.topic)?;
    if req.routing_key.is_empty() {
        let q = shard.round_robin.get() % n;
        shard
            .round_robin
            .set(shard.round_robin.get().wrapping_add(1));
        Ok(QueueIndex(q))
    } else {
        Ok(queue_for_key(&req.routing_key, n))
    }
}

async fn forward(
    shard: &Rc<Shard>,
    owner: u16,
    op: u16,
    queue: Option<QueueIndex>,
    body: Bytes,
) -> Pending {
    shard.metrics.borrow_mut().forwarded_requests += 1;
    match shard.mesh.request(owner, op, queue, body).await {
        Err(e) => ready(Err(herr(ErrorCode::ShuttingDown, e.to_string()))),
        Ok(rx) => Pending::Later(Box::pin(async move {
            match rx.await {
                Some((code, body)) => Reply {
                    code: ErrorCode::from_u16(code),
                    body,
                },
                None => reply(Err(herr(
                    ErrorCode::ShuttingDown,
                    format!("shard {owner} went away"),
                ))),
            }
        })),
    }
}

/// Executes a request on the shard that owns its data. `queue` is the
/// resolved produce queue (if it was resolved); internal operations are accepted
/// only `from_mesh`. Resolves once the request's synchronous part is done
/// (for produce: admitted and appended, so requests run in arrival order);
/// at once except when a produce waits for the disk.
pub async fn execute_local(
    shard: &Rc<Shard>,
    op: u16,
    queue: Option<QueueIndex>,
    body: Bytes,
    from_mesh: bool,
) -> Pending {
    let s = shard.clone();
    match (Op::from_u16(op), op) {
        (Some(Op::Handshake), _) => ready(handshake(shard, body)),
        (Some(Op::Metadata), _) => ready(metadata(shard, body)),
        (Some(Op::CreateTopic), _) => later(async move { create_topic(&s, body).await }),
        (Some(Op::DeleteTopic), _) => later(async move { delete_topic(&s, body).await }),
        (Some(Op::DescribeTopic), _) => later(async move { describe_topic(&s, body).await }),
        (Some(Op::Produce), _) => produce(shard, queue, body).await,
        (Some(Op::Fetch), _) => later(async move { fetch(&s, body).await }),
        (Some(Op::FetchMany), _) => later(async move { fetch_many(&s, body).await }),
        (Some(Op::ListOffsets), _) => ready(list_offsets(shard, body)),
        (Some(Op::CommitOffset), _) => later(async move { group_offset(&s, body, true).await }),
        (Some(Op::FetchOffset), _) => later(async move { group_offset(&s, body, false).await }),
        (Some(Op::CreateGroup), _) => later(async move { create_group(&s, body).await }),
        (Some(Op::DeleteGroup), _) => later(async move { delete_group(&s, body).await }),
        (Some(Op::ListGroups), _) => ready(list_groups(shard, body)),
        (Some(Op::DescribeGroup), _) => later(async move { describe_group(&s, body).await }),
        (Some(Op::Receive), _) => later(async move { receive(&s, body).await }),
        (Some(Op::Ack), _) => later(async move { settle(&s, body, false).await }),
        (Some(Op::Nack), _) => later(async move { settle(&s, body, true).await }),
        (Some(Op::ChangeInvisible), _) => later(async move { change_invisible(&s, body).await }),
        (Some(Op::Join), _) => later(async move { join(&s, body).await }),
        (Some(Op::Heartbeat), _) => later(async move { heartbeat(&s, body, false).await }),
        (Some(Op::Leave), _) => later(async move { heartbeat(&s, body, true).await }),
        (Some(Op::GroupCommit), _) => later(async move { group_commit(&s, body).await }),
        (Some(Op::GroupFetchOffset), _) => ready(group_fetch_offset(shard, body)),
        (None, OP_INTERNAL_HOLDERS) if from_mesh => ready(apply_holders(shard, body)),
        (None, OP_INTERNAL_DESCRIBE_GROUP) if from_mesh => {
            ready(describe_group_internal(shard, body))
        }
        (Some(Op::GetMessage), _) => later(async move { get_message(&s, body).await }),
        (Some(Op::CancelMessage), _) => later(async move { cancel_message(&s, body).await }),
        (Some(Op::Stats), _) => later(async move { stats(&s).await }),
        (None, OP_INTERNAL_APPLY_METADATA) if from_mesh => ready(apply_metadata(shard, body)),
        (None, OP_INTERNAL_STATS) if from_mesh => ready(Ok(body_json(&shard_stats(shard)))),
        (None, OP_INTERNAL_OFFSETS) if from_mesh => ready(queue_offsets(shard, body)),
        _ => ready(Err(herr(
            ErrorCode::UnknownOperation,
            format!("unknown operation {op}"),
        ))),
    }
}

fn handshake(shard: &Shard, body: Bytes) -> HResult {
    HandshakeRequest::decode(body)?;
    let l = &shard.config.limits;
    let resp = HandshakeResponse {
        broker_version: format!("keelmq {}", env!("CARGO_PKG_VERSION")),
        shard_count: shard.shard_count,
        shard: shard.id,
        frame_bytes_max: l.frame_bytes_max,
        batch_bytes_max: l.batch_bytes_max,
        ops: ALL_OPS
            .iter()
            .map(|op| (*op as u16, OP_VERSION_MIN, OP_VERSION_MAX))
            .collect(),
    };
    Ok(body_of(|b| resp.encode(b)))
}

fn body_of(f: impl FnOnce(&mut BytesMut)) -> Vec<Bytes> {
    body(f)
}
