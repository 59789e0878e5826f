//! Message handlers: produce, fetch, fetch-many, list offsets, get by id.

use super::*;

pub(super) async fn produce(shard: &Rc<Shard>, queue: Option<QueueIndex>, body: Bytes) -> Pending {
    match produce_append(shard, queue, body).await {
        Err(e) => {
            shard.metrics.borrow_mut().errors += 1;
            ready(Err(e))
        }
        Ok((receipt, durability, queue, t0, scheduled)) => {
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
                    base_offset: if scheduled {
                        crate::protocol::SCHEDULED_OFFSET
                    } else {
                        receipt.base_offset.0
                    },
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
        bool,
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
    let produced =
        batch::validate_produced_tags(&req.batch, shard.config.limits.batch_bytes_max as usize)?;
    let header: BatchHeader = produced.header;
    let scheduled = produced.timed && check_schedule(shard, &req.batch, header.record_count)?;
    let wait = Duration::from_millis(shard.config.storage.memory_pending_wait_ms);
    shard
        .store
        .wait_appendable(req.batch.len() as u64, wait)
        .await?;
    let receipt = if scheduled {
        shard
            .timer
            .schedule(&shard.store, route.queue_id, &req.batch, route.durability)?
    } else {
        shard.store.append(
            route.queue_id,
            &req.batch,
            &header,
            produced.summary,
            route.durability,
        )?
    };
    let mut m = shard.metrics.borrow_mut();
    m.produce_requests += 1;
    m.messages_in += u64::from(header.record_count);
    m.bytes_in += req.batch.len() as u64;
    Ok((receipt, route.durability, queue, t0, scheduled))
}

/// Whether a produced batch whose records carry `deliver_at_ms` holds one
/// due later than now (broker clock): then the whole batch is scheduled.
/// A record due beyond `limits.schedule_delay_ms_max` is refused, and so
/// is a batch past the shard's `limits.scheduled_messages_max`.
fn check_schedule(shard: &Shard, b: &[u8], count: u32) -> Result<bool, HandlerError> {
    let now = crate::runtime::now_ms();
    let max = shard.config.limits.schedule_delay_ms_max;
    let mut later = false;
    for (i, r) in batch::RecordIter::new(b).map_while(Result::ok).enumerate() {
        let due = batch::due_ms(r.deliver_at_ms, now);
        let ahead = due.saturating_sub(now);
        if ahead > i64::try_from(max).unwrap_or(i64::MAX) {
            return Err(herr(
                ErrorCode::InvalidArgument,
                format!(
                    "record {i} is due in {ahead} ms, beyond limits.schedule_delay_ms_max ({max} ms)"
                ),
            ));
        }
        later |= ahead > 0;
    }
    if later && shard.timer.pending() as u64 + u64::from(count) > shard.timer.pending_max {
        return Err(herr(
            ErrorCode::Busy,
            format!(
                "shard {} holds limits.scheduled_messages_max ({}) scheduled messages",
                shard.id, shard.timer.pending_max
            ),
        ));
    }
    Ok(later)
}

pub(super) async fn fetch(shard: &Rc<Shard>, body: Bytes) -> HResult {
    let req = FetchRequest::decode(body)?;
    let filter = parse_filter(req.filter.as_ref())?;
    let route = shard
        .metadata
        .borrow()
        .route(&req.topic, QueueIndex(req.queue))?;
    let limits = &shard.config.limits;
    let max_bytes = req.max_bytes.clamp(1, limits.fetch_bytes_max);
    let wait = Duration::from_millis(u64::from(req.wait_ms.min(limits.fetch_wait_ms_max)));
    let deadline = Instant::now() + wait;
    let mut offset = req.offset;
    let r = loop {
        let o = shard.store.offsets(route.queue_id)?;
        let now = Instant::now();
        if offset == o.latest {
            shard
                .store
                .wait_visible(
                    route.queue_id,
                    QueueOffset(offset),
                    deadline.saturating_duration_since(now),
                )
                .await?;
        }
        let r = read_queue(shard, route.queue_id, offset, max_bytes, filter.as_ref()).await?;
        // Under a filter, a read that kept nothing but reached the end
        // waits for more within the same long poll.
        if filter.is_none()
            || !r.batches.is_empty()
            || r.next < r.offsets.latest
            || Instant::now() >= deadline
        {
            break r;
        }
        offset = r.next;
    };
    let total: usize = r.batches.iter().map(Bytes::len).sum();
    let mut head = BytesMut::with_capacity(28);
    Writer(&mut head)
        .u64(r.offsets.earliest)
        .u64(r.offsets.latest)
        .u64(r.next)
        .u32(total as u32);
    let mut m = shard.metrics.borrow_mut();
    m.fetch_requests += 1;
    m.bytes_out += total as u64;
    m.messages_out += r.messages;
    let mut out = Vec::with_capacity(r.batches.len() + 1);
    out.push(head.freeze());
    out.extend(r.batches);
    Ok(out)
}

/// Most bytes one filtered fetch (or one queue of a fetch-many) reads from
/// the log looking for records its filter passes, before it replies with
/// what it found and where it stopped.
pub const FILTER_READ_BYTES_MAX: u64 = 16 << 20;
/// Most consume-index entries (batches) one filtered read looks at,
/// skipped by their tag summary or read.
pub const FILTER_LOOK_BATCHES_MAX: usize = 65_536;

/// Most queues a filtered fetch-many answers with only a new position (the
/// others are looked at again by the next request).
pub const FETCH_MANY_MOVED_MAX: usize = 64;

/// Parses a request's filter (`None` also for `*`): `invalid_filter` names
/// where and why.
pub(super) fn parse_filter(
    f: Option<&FilterSpec>,
) -> Result<Option<crate::filter::MessageFilter>, HandlerError> {
    let Some(f) = f else {
        return Ok(None);
    };
    crate::filter::MessageFilter::parse(f.kind.into(), &f.expression).map_err(|e| {
        herr(
            ErrorCode::InvalidFilter,
            format!("{} filter `{}`: {e}", f.kind.name(), shown(&f.expression)),
        )
    })
}

/// An expression as error messages show it (at most 200 characters).
pub(super) fn shown(e: &str) -> String {
    match e.char_indices().nth(200) {
        Some((at, _)) => format!("{}…", &e[..at]),
        None => e.to_owned(),
    }
}

/// What one queue's read returned.
pub(super) struct QueueRead {
    pub offsets: QueueOffsets,
    /// Where the next read of the queue starts.
    pub next: u64,
    /// Stored batches, or filtered copies of them.
    pub batches: Vec<Bytes>,
    /// Records handed out.
    pub messages: u64,
}

/// Reads a queue from `offset`, up to `max_bytes`, through `filter`:
/// batches the consume index's tag summary rules out are skipped unread,
/// the others are read and sent whole when every record passes, as a
/// filtered copy when some do, not at all when none do; at most
/// [`FILTER_READ_BYTES_MAX`] read and [`FILTER_LOOK_BATCHES_MAX`] looked at.
pub(super) async fn read_queue(
    shard: &Shard,
    queue: QueueId,
    offset: u64,
    max_bytes: u32,
    filter: Option<&crate::filter::MessageFilter>,
) -> Result<QueueRead, StoreError> {
    let Some(f) = filter else {
        let (offsets, batches) = shard
            .store
            .read(queue, QueueOffset(offset), max_bytes)
            .await?;
        let next = batches
            .last()
            .and_then(|b| BatchHeader::parse(b).ok())
            .map_or(offset, |h| h.next_offset());
        let messages = messages_from(&batches, offset);
        return Ok(QueueRead {
            offsets,
            next,
            batches,
            messages,
        });
    };
    let (mut next, mut read, mut looked, mut kept) = (offset, 0u64, 0usize, 0u64);
    let mut out = QueueRead {
        offsets: shard.store.offsets(queue)?,
        next,
        batches: Vec::new(),
        messages: 0,
    };
    loop {
        let budget = (u64::from(max_bytes) - kept).min(FILTER_READ_BYTES_MAX - read) as u32;
        let (offsets, looked_to, batches) = shard
            .store
            .read_where(
                queue,
                QueueOffset(next),
                budget,
                FILTER_LOOK_BATCHES_MAX - looked,
                |tags| f.may_match_tags(tags),
            )
            .await?;
        out.offsets = offsets;
        for b in batches {
            read += b.len() as u64;
            let Ok(h) = BatchHeader::parse(&b) else {
                continue;
            };
            let from = next.max(h.base_offset);
            let sent = match f.select(&b, from) {
                crate::filter::Selection::None => continue,
                crate::filter::Selection::All => {
                    out.messages += h.next_offset() - from;
                    b
                }
                crate::filter::Selection::Some(keep) => {
                    out.messages += keep.len() as u64;
                    batch::select_records(&b, &keep)
                }
            };
            kept += sent.len() as u64;
            out.batches.push(sent);
        }
        // Entries looked at, roughly: a batch read or skipped each.
        looked += usize::try_from(looked_to.0 - next)
            .unwrap_or(usize::MAX)
            .min(FILTER_LOOK_BATCHES_MAX);
        next = looked_to.0;
        let done = next >= offsets.latest
            || kept >= u64::from(max_bytes)
            || read >= FILTER_READ_BYTES_MAX
            || looked >= FILTER_LOOK_BATCHES_MAX;
        if done {
            out.next = next;
            return Ok(out);
        }
    }
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
/// Under a filter, queues whose reads kept nothing but moved on are
/// answered with their new position (and no batches) in the same reply.
pub(super) async fn fetch_many(shard: &Rc<Shard>, body: Bytes) -> HResult {
    let req = FetchManyRequest::decode(body)?;
    let filter = parse_filter(req.filter.as_ref())?;
    let limits = &shard.config.limits;
    let max_bytes = u64::from(req.max_bytes.clamp(1, limits.fetch_bytes_max));
    let wait = Duration::from_millis(u64::from(req.wait_ms.min(limits.fetch_wait_ms_max)));
    let deadline = Instant::now() + wait;
    // Resolve every queue once: its id here, or why it cannot be served.
    let mut resolved: Vec<(u32, Result<QueueId, ErrorCode>, u64)> = {
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
        |queue: u32, error: ErrorCode, offsets: QueueOffsets, next: u64, batches: Vec<Bytes>| {
            FetchManyEntry {
                queue,
                error: error as u16,
                offsets,
                next,
                batches,
            }
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
    // Queues a filtered read moved past records it did not keep: (index in
    // `resolved`, offsets), answered with the reply whatever else it holds.
    let mut moved: Vec<(usize, QueueOffsets)> = Vec::new();
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
                    entries.push(entry(queue, code, no_offsets, offset, Vec::new()));
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
                        offset,
                        Vec::new(),
                    ));
                    continue;
                }
            }
            match read_queue(
                shard,
                id,
                offset,
                (max_bytes - bytes) as u32,
                filter.as_ref(),
            )
            .await
            {
                Ok(r) => {
                    bytes += r.batches.iter().map(|b| b.len() as u64).sum::<u64>();
                    messages += r.messages;
                    if !r.batches.is_empty() {
                        moved.retain(|&(j, _)| j != i);
                        entries.push(entry(queue, ErrorCode::Ok, r.offsets, r.next, r.batches));
                        resolved[i].2 = r.next;
                    } else if r.next > offset {
                        if let Some(m) = moved.iter_mut().find(|(j, _)| *j == i) {
                            m.1 = r.offsets;
                            resolved[i].2 = r.next;
                        } else if moved.len() < FETCH_MANY_MOVED_MAX {
                            moved.push((i, r.offsets));
                            resolved[i].2 = r.next;
                        }
                    }
                }
                Err(StoreError::OffsetOutOfRange {
                    earliest, latest, ..
                }) => entries.push(entry(
                    queue,
                    ErrorCode::OffsetOutOfRange,
                    QueueOffsets { earliest, latest },
                    offset,
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
            for (i, offsets) in moved {
                let (queue, _, next) = resolved[i];
                entries.push(entry(queue, ErrorCode::Ok, offsets, next, Vec::new()));
            }
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
    let origin = crate::schedule::RecordAt {
        position: id.position.0,
        index: id.index,
    };
    // A scheduled message may have been carried away from where it was
    // produced.
    let at = shard.timer.location_of(origin).unwrap_or(origin);
    let found = if at != origin {
        shard
            .store
            .timer_batch_at(crate::ids::LogPosition(at.position))
            .await
    } else {
        shard.store.batch_at(id.position).await.map(Some)
    };
    let batch = match found {
        Ok(Some(b)) => b,
        Ok(None) | Err(StoreError::Log(LogError::NotFound(_))) => return Err(not_found()),
        Err(e) => return Err(e.into()),
    };
    let h = BatchHeader::parse(&batch).map_err(|_| not_found())?;
    if at.index >= h.record_count {
        return Err(not_found());
    }
    // A scheduled (or carried) message: the queue it is for, and a view of
    // its record under its id.
    let (queue_id, batch, index) = if h.attributes == 0 {
        (h.queue_id, batch, id.index)
    } else {
        let target = shard.timer.get(origin).map(|t| t.pending.target);
        let raw = batch::RecordIter::new(&batch)
            .map_while(Result::ok)
            .nth(at.index as usize)
            .map(|r| r.raw)
            .ok_or_else(not_found)?;
        let mut view = BytesMut::from(
            &batch::build_view(
                &batch,
                1,
                &[batch::ViewRecord {
                    delta: 0,
                    origin_position: origin.position,
                    origin_index: origin.index,
                    raw,
                }],
            )[..],
        );
        // No queue offset: it gets one when it is delivered.
        view[16..24].copy_from_slice(&crate::protocol::SCHEDULED_OFFSET.to_le_bytes());
        let view = view.freeze();
        let queue = target.unwrap_or(if h.attributes == batch::BATCH_ATTR_SCHEDULED {
            h.extra
        } else {
            u32::MAX
        });
        (queue, view, 0)
    };
    let (topic, queue) = shard
        .metadata
        .borrow()
        .locate(QueueId(queue_id))
        .map(|(t, q)| (t.to_owned(), q))
        .ok_or_else(not_found)?;
    let resp = GetMessageResponse {
        topic,
        queue: queue.0,
        index,
        batch,
    };
    Ok(body_of(|b| resp.encode(b)))
}

/// Cancels a scheduled message that is not due yet: it is never
/// delivered. `message_not_found` when it is not pending (unknown,
/// delivered already, or cancelled).
pub(super) async fn cancel_message(shard: &Rc<Shard>, body: Bytes) -> HResult {
    let id: MessageId = decode_message_id(body)?;
    let origin = crate::schedule::RecordAt {
        position: id.position.0,
        index: id.index,
    };
    let level = shard
        .timer
        .get(origin)
        .and_then(|t| {
            let meta = shard.metadata.borrow();
            let (topic, index) = meta.locate(QueueId(t.pending.target))?;
            meta.route(topic, index).ok().map(|r| r.durability)
        })
        .unwrap_or(Durability::Fsync);
    match shard.timer.cancel(&shard.store, origin, level).await? {
        crate::shard::timer::Cancelled::Done => Ok(Vec::new()),
        crate::shard::timer::Cancelled::NotPending => Err(herr(
            ErrorCode::MessageNotFound,
            format!("message {id} is not scheduled: unknown, delivered already or cancelled"),
        )),
    }
}
