//! Message handlers: produce, fetch, fetch-many, list offsets, get by id.

use super::*;

pub(super) async fn produce(shard: &Rc<Shard>, queue: Option<QueueIndex>, body: Bytes) -> Pending {
    match produce_append(shard, queue, body).await {
        Err(e) => {
            shard.metrics.borrow_mut().errors += 1;
            ready(Err(e))
        }
        Ok((receipt, durability, queue, t0)) => {
            // A `memory` batch is visible at once (long polls wake now, not
            // after the reply's task gets its turn).
            let published =
                durability == Durability::Memory && shard.store.publish_if_ready(&receipt);
            let s = shard.clone();
            later(async move {
                if !published {
                    s.store.wait_durable(&receipt, durability).await?;
                    s.store.publish(&receipt);
                }
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
pub(super) async fn produce_append(
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

pub(super) async fn fetch(shard: &Rc<Shard>, body: Bytes) -> HResult {
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
pub(super) fn messages_from(batches: &[Bytes], offset: u64) -> u64 {
    batches
        .iter()
        .filter_map(|b| batch::BatchHeader::parse(b).ok())
        .map(|h| h.next_offset().saturating_sub(offset.max(h.base_offset)))
        .sum()
}

/// Fetch over many queues of this shard: one scan in request order, one
/// long poll (woken by any publish on the shard) when nothing is there.
pub(super) async fn fetch_many(shard: &Rc<Shard>, body: Bytes) -> HResult {
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

pub(super) fn list_offsets(shard: &Shard, body: Bytes) -> HResult {
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

pub(super) async fn get_message(shard: &Rc<Shard>, body: Bytes) -> HResult {
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
