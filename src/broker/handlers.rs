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

type HResult = Result<Vec<Bytes>, HandlerError>;

fn herr(code: ErrorCode, message: impl Into<String>) -> HandlerError {
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

fn reply(r: HResult) -> Reply {
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

fn ready(r: HResult) -> Pending {
    Pending::Ready(reply(r))
}

fn later(f: impl Future<Output = HResult> + 'static) -> Pending {
    Pending::Later(Box::pin(async move { reply(f.await) }))
}

fn body(f: impl FnOnce(&mut BytesMut)) -> Vec<Bytes> {
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
        Op::Handshake | Op::Metadata | Op::DescribeTopic | Op::Stats => Ok((shard.id, None)),
        Op::CreateTopic | Op::DeleteTopic => Ok((0, None)),
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
        Op::GetMessage => {
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
        (Some(Op::CommitOffset), _) => ready(group_offset(shard, body, true)),
        (Some(Op::FetchOffset), _) => ready(group_offset(shard, body, false)),
        (Some(Op::GetMessage), _) => later(async move { get_message(&s, body).await }),
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

fn metadata(shard: &Shard, body: Bytes) -> HResult {
    let req = MetadataRequest::decode(body)?;
    let meta = shard.metadata.borrow();
    let topics = if req.topics.is_empty() {
        meta.topics
            .keys()
            .filter_map(|n| meta.topic_info(n))
            .collect()
    } else {
        req.topics
            .iter()
            .filter_map(|n| meta.topic_info(n))
            .collect()
    };
    let resp = MetadataResponse {
        shard_count: shard.shard_count,
        topics,
    };
    Ok(body_of(|b| resp.encode(b)))
}

/// Persists `new` and installs it on every shard (shard 0 only).
async fn publish_metadata(shard: &Rc<Shard>, new: Metadata) -> Result<(), HandlerError> {
    assert_eq!(shard.id, 0, "metadata changes run on shard 0");
    let dir = shard.data_dir.clone();
    let doc = new.clone();
    crate::runtime::blocking(move || doc.store(&dir))
        .await
        .map_err(|e| {
            herr(
                ErrorCode::StorageError,
                format!("cannot store metadata: {e}"),
            )
        })?;
    let json = Bytes::from(new.to_json());
    let mut waits = Vec::new();
    for peer in 1..shard.shard_count {
        let rx = shard
            .mesh
            .request(peer, OP_INTERNAL_APPLY_METADATA, None, json.clone())
            .await
            .map_err(|e| herr(ErrorCode::ShuttingDown, e.to_string()))?;
        waits.push(rx);
    }
    for rx in waits {
        match rx.await {
            Some((0, _)) => {}
            _ => {
                return Err(herr(
                    ErrorCode::Internal,
                    "a shard did not apply the metadata change",
                ))
            }
        }
    }
    shard.apply_metadata(new);
    Ok(())
}

/// Applies `change` to a copy of the metadata and publishes it, one change
/// at a time (shard 0 only).
async fn change_metadata<T>(
    shard: &Rc<Shard>,
    change: impl FnOnce(&mut Metadata) -> Result<T, MetadataError>,
) -> Result<T, HandlerError> {
    let _permit = shard
        .meta_lock
        .acquire_permit(1)
        .await
        .map_err(|e| herr(ErrorCode::Internal, e.to_string()))?;
    let mut new = shard.metadata.borrow().clone();
    let out = change(&mut new)?;
    publish_metadata(shard, new).await?;
    Ok(out)
}

async fn create_topic(shard: &Rc<Shard>, body: Bytes) -> HResult {
    let req = CreateTopicRequest::decode(body)?;
    let durability = req
        .durability
        .unwrap_or(shard.config.broker.durability_default);
    let limits = &shard.config.limits;
    let topic_limits = crate::shard::metadata::TopicLimits {
        topic_queues_max: limits.topic_queues_max,
        topics_max: limits.topics_max,
        queues_max: limits.queues_max,
    };
    let info = change_metadata(shard, |m| {
        m.create_topic(
            &req.name,
            req.queues,
            durability,
            topic_limits,
            crate::runtime::now_ms(),
        )
    })
    .await?;
    tracing::info!(topic = %req.name, queues = req.queues, durability = durability.name(), "created topic");
    Ok(body_of(|b| info.encode(b)))
}

async fn delete_topic(shard: &Rc<Shard>, body: Bytes) -> HResult {
    let req = TopicRequest::decode(body)?;
    change_metadata(shard, |m| m.delete_topic(&req.name)).await?;
    tracing::info!(topic = %req.name, "deleted topic");
    Ok(Vec::new())
}

fn apply_metadata(shard: &Shard, body: Bytes) -> HResult {
    let text = std::str::from_utf8(&body)
        .map_err(|_| herr(ErrorCode::Malformed, "metadata is not UTF-8"))?;
    let new = Metadata::from_json(text).map_err(|e| herr(ErrorCode::Malformed, e))?;
    shard.apply_metadata(new);
    Ok(Vec::new())
}

fn queue_offsets(shard: &Shard, body: Bytes) -> HResult {
    let mut r = Reader::new(body);
    let n = r.u32("count")?;
    let mut out = BytesMut::new();
    let mut w = Writer(&mut out);
    for _ in 0..n {
        let id = r.u32("queue_id")?;
        let o = shard.store.offsets(QueueId(id)).unwrap_or_default();
        w.u64(o.earliest).u64(o.latest);
    }
    r.finish()?;
    Ok(vec![out.freeze()])
}

async fn describe_topic(shard: &Rc<Shard>, body: Bytes) -> HResult {
    let req = TopicRequest::decode(body)?;
    let info = shard
        .metadata
        .borrow()
        .topic_info(&req.name)
        .ok_or_else(|| HandlerError::from(MetadataError::UnknownTopic(req.name.clone())))?;
    let mut offsets = vec![QueueOffsets::default(); info.queues.len()];
    for owner in 0..shard.shard_count {
        let idx: Vec<usize> = (0..info.queues.len())
            .filter(|&i| info.queues[i].shard == owner)
            .collect();
        if idx.is_empty() {
            continue;
        }
        if owner == shard.id {
            for &i in &idx {
                offsets[i] = shard
                    .store
                    .offsets(QueueId(info.queues[i].queue_id))
                    .unwrap_or_default();
            }
            continue;
        }
        let mut b = BytesMut::new();
        Writer(&mut b).u32(idx.len() as u32);
        for &i in &idx {
            Writer(&mut b).u32(info.queues[i].queue_id);
        }
        let rx = shard
            .mesh
            .request(owner, OP_INTERNAL_OFFSETS, None, b.freeze())
            .await
            .map_err(|e| herr(ErrorCode::ShuttingDown, e.to_string()))?;
        let Some((0, chunks)) = rx.await else {
            return Err(herr(
                ErrorCode::Internal,
                format!("shard {owner} did not report offsets"),
            ));
        };
        let mut r = Reader::new(chunks.concat().into());
        for &i in &idx {
            offsets[i] = QueueOffsets {
                earliest: r.u64("earliest")?,
                latest: r.u64("latest")?,
            };
        }
    }
    let resp = DescribeTopicResponse {
        topic: info,
        offsets,
    };
    Ok(body_of(|b| resp.encode(b)))
}

async fn produce(shard: &Rc<Shard>, queue: Option<QueueIndex>, body: Bytes) -> Pending {
    match produce_append(shard, queue, body).await {
        Err(e) => {
            shard.metrics.borrow_mut().errors += 1;
            ready(Err(e))
        }
        Ok((receipt, durability, queue, t0)) => {
            let s = shard.clone();
            later(async move {
                s.store.wait_durable(&receipt, durability).await?;
                s.store.publish(&receipt);
                let _ = s
                    .metrics
                    .borrow_mut()
                    .append_us
                    .record(t0.elapsed().as_micros() as u64);
                let resp = ProduceResponse {
                    queue: queue.0,
                    base_offset: receipt.base_offset.0,
                    count: receipt.count,
                    shard: s.id,
                    position: receipt.position.0,
                    append_time_ms: receipt.append_time_ms,
                };
                Ok(body_of(|b| resp.encode(b)))
            })
        }
    }
}

/// The in-order half of produce: validate, wait for the log to take the
/// batch (the disk behind, or the next segment being prepared: at most
/// `storage.memory_pending_wait_ms`, then `busy`), stamp, append.
async fn produce_append(
    shard: &Shard,
    queue: Option<QueueIndex>,
    body: Bytes,
) -> Result<
    (
        crate::storage::AppendReceipt,
        Durability,
        QueueIndex,
        Instant,
    ),
    HandlerError,
> {
    let t0 = Instant::now();
    let req = ProduceRequest::decode(body)?;
    let queue = match queue {
        Some(q) => q,
        None => resolve_produce_queue(shard, &shard.metadata.borrow(), &req)?,
    };
    let route = shard.metadata.borrow().route(&req.topic, queue)?;
    if route.shard != shard.id {
        return Err(herr(
            ErrorCode::Internal,
            format!("queue {queue} moved to shard {}", route.shard),
        ));
    }
    let header: BatchHeader =
        batch::validate_produced(&req.batch, shard.config.limits.batch_bytes_max as usize)?;
    let wait = Duration::from_millis(shard.config.storage.memory_pending_wait_ms);
    shard
        .store
        .wait_appendable(req.batch.len() as u64, wait)
        .await?;
    let receipt = shard
        .store
        .append(route.queue_id, &req.batch, &header, route.durability)?;
    let mut m = shard.metrics.borrow_mut();
    m.produce_requests += 1;
    m.messages_in += u64::from(header.record_count);
    m.bytes_in += req.batch.len() as u64;
    Ok((receipt, route.durability, queue, t0))
}

async fn fetch(shard: &Rc<Shard>, body: Bytes) -> HResult {
    let req = FetchRequest::decode(body)?;
    let route = shard
        .metadata
        .borrow()
        .route(&req.topic, QueueIndex(req.queue))?;
    let offset = QueueOffset(req.offset);
    let limits = &shard.config.limits;
    let max_bytes = req.max_bytes.clamp(1, limits.fetch_bytes_max);
    let wait = Duration::from_millis(u64::from(req.wait_ms.min(limits.fetch_wait_ms_max)));
    let o = shard.store.offsets(route.queue_id)?;
    if req.offset == o.latest {
        shard
            .store
            .wait_visible(route.queue_id, offset, wait)
            .await?;
    }
    let (offsets, batches) = shard.store.read(route.queue_id, offset, max_bytes).await?;
    let total: usize = batches.iter().map(Bytes::len).sum();
    let mut head = BytesMut::with_capacity(20);
    Writer(&mut head)
        .u64(offsets.earliest)
        .u64(offsets.latest)
        .u32(total as u32);
    let mut m = shard.metrics.borrow_mut();
    m.fetch_requests += 1;
    m.bytes_out += total as u64;
    m.messages_out += messages_from(&batches, req.offset);
    let mut out = Vec::with_capacity(batches.len() + 1);
    out.push(head.freeze());
    out.extend(batches);
    Ok(out)
}

/// Messages a fetch from `offset` hands out in `batches` (the first batch
/// may start before `offset`).
fn messages_from(batches: &[Bytes], offset: u64) -> u64 {
    batches
        .iter()
        .filter_map(|b| batch::BatchHeader::parse(b).ok())
        .map(|h| h.next_offset().saturating_sub(offset.max(h.base_offset)))
        .sum()
}

/// Fetch over many queues of this shard: one scan in request order, one
/// long poll (woken by any publish on the shard) when nothing is there.
async fn fetch_many(shard: &Rc<Shard>, body: Bytes) -> HResult {
    let req = FetchManyRequest::decode(body)?;
    let limits = &shard.config.limits;
    let max_bytes = u64::from(req.max_bytes.clamp(1, limits.fetch_bytes_max));
    let wait = Duration::from_millis(u64::from(req.wait_ms.min(limits.fetch_wait_ms_max)));
    let deadline = Instant::now() + wait;
    // Resolve every queue once: its id here, or why it cannot be served.
    let resolved: Vec<(u32, Result<QueueId, ErrorCode>, u64)> = {
        let meta = shard.metadata.borrow();
        let queues = meta.queues(&req.topic)?;
        req.queues
            .iter()
            .map(|&(q, offset)| {
                let id = match queues.get(q as usize) {
                    Some(&(id, owner)) if owner == ShardId(shard.id) => Ok(id),
                    // The client sends one request per owning shard.
                    Some(_) => Err(ErrorCode::InvalidArgument),
                    None => Err(ErrorCode::UnknownQueue),
                };
                (q, id, offset)
            })
            .collect()
    };
    let entry =
        |queue: u32, error: ErrorCode, offsets: QueueOffsets, batches: Vec<Bytes>| FetchManyEntry {
            queue,
            error: error as u16,
            offsets,
            batches,
        };
    let no_offsets = QueueOffsets {
        earliest: 0,
        latest: 0,
    };
    // A long poll is woken only by publishes on its own queues, and then
    // looks only at those.
    let waiter = (!wait.is_zero()).then(|| {
        let ids: Vec<QueueId> = resolved.iter().filter_map(|(_, id, _)| id.ok()).collect();
        shard.store.watch_queues(&ids)
    });
    let mut look_at: Vec<usize> = (0..resolved.len()).collect();
    loop {
        let mut entries = Vec::new();
        let (mut bytes, mut messages) = (0u64, 0u64);
        for &i in &look_at {
            let (queue, id, offset) = resolved[i];
            if bytes >= max_bytes {
                break;
            }
            let id = match id {
                Ok(id) => id,
                Err(code) => {
                    entries.push(entry(queue, code, no_offsets, Vec::new()));
                    continue;
                }
            };
            match shard.store.has_news(id, QueueOffset(offset)) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    entries.push(entry(
                        queue,
                        HandlerError::from(e).code,
                        no_offsets,
                        Vec::new(),
                    ));
                    continue;
                }
            }
            match shard
                .store
                .read(id, QueueOffset(offset), (max_bytes - bytes) as u32)
                .await
            {
                Ok((o, batches)) => {
                    bytes += batches.iter().map(|b| b.len() as u64).sum::<u64>();
                    messages += messages_from(&batches, offset);
                    if !batches.is_empty() {
                        entries.push(entry(queue, ErrorCode::Ok, o, batches));
                    }
                }
                Err(StoreError::OffsetOutOfRange {
                    earliest, latest, ..
                }) => entries.push(entry(
                    queue,
                    ErrorCode::OffsetOutOfRange,
                    QueueOffsets { earliest, latest },
                    Vec::new(),
                )),
                Err(e) => return Err(e.into()),
            }
        }
        let now = Instant::now();
        let Some(waiter) = waiter
            .as_ref()
            .filter(|_| entries.is_empty() && now < deadline)
        else {
            let mut m = shard.metrics.borrow_mut();
            m.fetch_requests += 1;
            m.bytes_out += bytes;
            m.messages_out += messages;
            let mut out = Vec::with_capacity(entries.len() * 2 + 1);
            FetchManyResponse { entries }.encode_parts(&mut out);
            return Ok(out);
        };
        shard.store.wait_watched(waiter, deadline - now).await;
        let woken = waiter.take_woken();
        look_at = (0..resolved.len())
            .filter(|&i| resolved[i].1.is_ok_and(|id| woken.contains(&id)))
            .collect();
    }
}

fn list_offsets(shard: &Shard, body: Bytes) -> HResult {
    let req = ListOffsetsRequest::decode(body)?;
    let route = shard
        .metadata
        .borrow()
        .route(&req.topic, QueueIndex(req.queue))?;
    let o = shard.store.offsets(route.queue_id)?;
    let v = match req.spec {
        OffsetSpec::Earliest => o.earliest,
        OffsetSpec::Latest => o.latest,
        OffsetSpec::Timestamp(t) => shard.store.offset_for_time(route.queue_id, t)?.0,
    };
    Ok(body_of(|b| encode_u64(b, v)))
}

fn group_offset(shard: &Shard, body: Bytes, commit: bool) -> HResult {
    let req = GroupOffsetRequest::decode(body, commit)?;
    if req.group.is_empty() {
        return Err(herr(ErrorCode::InvalidArgument, "group name is empty"));
    }
    let route = shard
        .metadata
        .borrow()
        .route(&req.topic, QueueIndex(req.queue))?;
    match req.offset {
        Some(o) => {
            shard
                .groups
                .borrow_mut()
                .commit(
                    &req.group,
                    route.queue_id,
                    o,
                    shard.config.limits.group_offsets_max,
                )
                .map_err(|e| herr(ErrorCode::InvalidArgument, e.to_string()))?;
            Ok(Vec::new())
        }
        None => {
            let v = shard.groups.borrow().get(&req.group, route.queue_id);
            Ok(body_of(|b| encode_opt_u64(b, v)))
        }
    }
}

async fn get_message(shard: &Rc<Shard>, body: Bytes) -> HResult {
    let id: MessageId = decode_message_id(body)?;
    let not_found = || {
        herr(
            ErrorCode::MessageNotFound,
            format!("message {id} not found"),
        )
    };
    let batch = shard
        .store
        .batch_at(id.position)
        .await
        .map_err(|e| match e {
            StoreError::Log(LogError::NotFound(_)) => not_found(),
            e => HandlerError::from(e),
        })?;
    let h = BatchHeader::parse(&batch).map_err(|_| not_found())?;
    if id.index >= h.record_count {
        return Err(not_found());
    }
    let (topic, queue) = shard
        .metadata
        .borrow()
        .locate(QueueId(h.queue_id))
        .map(|(t, q)| (t.to_owned(), q))
        .ok_or_else(not_found)?;
    let resp = GetMessageResponse {
        topic,
        queue: queue.0,
        index: id.index,
        batch,
    };
    Ok(body_of(|b| resp.encode(b)))
}

fn body_json(v: &serde_json::Value) -> Vec<Bytes> {
    vec![Bytes::from(v.to_string())]
}

/// This shard's stats as JSON.
pub fn shard_stats(shard: &Shard) -> serde_json::Value {
    let m = shard.metrics.borrow();
    let log = shard.store.log();
    let (write_us, fsync_us) = log.latency_histograms();
    let segments = log.segments();
    serde_json::json!({
        "shard": shard.id,
        "queues": shard.store.queue_count(),
        "counters": m.counters_json(),
        "append_latency": histogram_json(&m.append_us),
        "write_latency": histogram_json(&write_us),
        "fsync_latency": histogram_json(&fsync_us),
        "log": {
            "segments": segments.len(),
            "segment_bytes": segments.iter().map(|s| s.capacity).sum::<u64>(),
            "append_position": log.append_position(),
            "written_position": log.written_position(),
            "synced_position": log.synced_position(),
            "tail_cache_bytes": shard.store.tail_cache_bytes(),
            "pending_bytes": log.pending_bytes(),
            "free_bytes": shard.store.free_bytes(),
            "full": log.full().map(|f| f.to_string()),
            "failed": log.failed().map(|f| f.to_string()),
        },
    })
}

async fn stats(shard: &Rc<Shard>) -> HResult {
    let mut shards = vec![serde_json::Value::Null; shard.shard_count as usize];
    shards[shard.id as usize] = shard_stats(shard);
    for peer in (0..shard.shard_count).filter(|&p| p != shard.id) {
        let rx = shard
            .mesh
            .request(peer, OP_INTERNAL_STATS, None, Bytes::new())
            .await
            .map_err(|e| herr(ErrorCode::ShuttingDown, e.to_string()))?;
        if let Some((0, chunks)) = rx.await {
            shards[peer as usize] =
                serde_json::from_slice(&chunks.concat()).unwrap_or(serde_json::Value::Null);
        }
    }
    let doc = serde_json::json!({
        "broker_version": env!("CARGO_PKG_VERSION"),
        "shard_count": shard.shard_count,
        "topics": shard.metadata.borrow().topics.len(),
        "shards": shards,
    });
    Ok(body_json(&doc))
}
