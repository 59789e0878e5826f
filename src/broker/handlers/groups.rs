//! Consumer-group handlers: create, delete, list, describe; offset commit
//! and fetch; receive, ack, nack and change-invisible (message delivery);
//! and the group timer (redelivery wake-ups, dead letters).

use super::*;
use crate::batch::{BatchBuilder, Record as BatchRecord, RecordIter};
use crate::filter::MessageFilter;
use crate::group::config::{Delivery, GroupConfig};
use crate::group::receipt::{Receipt, RECEIPT_HANDLE_BYTES};
use crate::group::window::{Lease, LeaseError, INVISIBLE_MS_MAX, INVISIBLE_MS_MIN};
use crate::ids::GroupId;
use crate::shard::groups::message_groups;
use crate::shard::metadata::TopicLimits;
use std::collections::HashMap;

/// Longest an ack, nack or commit whose change is applied waits for a busy
/// log to take its journal entry before replying (`busy`).
pub const SETTLE_WAIT_MAX: Duration = Duration::from_secs(10);
/// Most messages one receive returns.
pub const RECEIVE_MESSAGES_MAX: u32 = 4096;
/// Properties a dead letter gets, beside its own.
pub const DLQ_PROPERTY_TOPIC: &str = "DLQ_ORIGIN_TOPIC";
pub const DLQ_PROPERTY_QUEUE: &str = "DLQ_ORIGIN_QUEUE";
pub const DLQ_PROPERTY_OFFSET: &str = "DLQ_ORIGIN_OFFSET";
pub const DLQ_PROPERTY_MESSAGE_ID: &str = "DLQ_ORIGIN_MESSAGE_ID";
pub const DLQ_PROPERTY_ATTEMPTS: &str = "DLQ_ATTEMPTS";
pub const DLQ_PROPERTY_TIME: &str = "DLQ_TIME_MS";
pub const DLQ_PROPERTY_GROUP: &str = "DLQ_GROUP";
/// Internal operation: one shard's part of a group description (JSON).
pub const OP_INTERNAL_DESCRIBE_GROUP: u16 = 0x8004;

fn now_ms() -> u64 {
    crate::runtime::now_ms().max(0) as u64
}

fn topic_limits(shard: &Shard) -> TopicLimits {
    let l = &shard.config.limits;
    TopicLimits {
        topic_queues_max: l.topic_queues_max,
        topics_max: l.topics_max,
        queues_max: l.queues_max,
    }
}

fn group_by_name(shard: &Shard, name: &str) -> Result<(GroupId, GroupConfig), HandlerError> {
    shard
        .metadata
        .borrow()
        .groups
        .get(name)
        .map(|g| (GroupId(g.id), g.config.clone()))
        .ok_or_else(|| herr(ErrorCode::UnknownGroup, format!("no group `{name}`")))
}

/// Waits (up to `storage.memory_pending_wait_ms`, then `busy`) until the
/// log takes `bytes` more: a journal entry is appended only once it fits.
async fn wait_room(shard: &Shard, bytes: u64) -> Result<(), HandlerError> {
    let wait = Duration::from_millis(shard.config.storage.memory_pending_wait_ms);
    Ok(shard.store.wait_appendable(bytes, wait).await?)
}

fn store_err(e: crate::storage::StoreError) -> HandlerError {
    HandlerError::from(e)
}

pub(super) async fn create_group(shard: &Rc<Shard>, body: Bytes) -> HResult {
    let req = CreateGroupRequest::decode(body)?;
    let mut cfg: GroupConfig = if req.settings_json.trim().is_empty() {
        GroupConfig::default()
    } else {
        serde_json::from_str(&req.settings_json)
            .map_err(|e| herr(ErrorCode::InvalidArgument, format!("group settings: {e}")))?
    };
    if !cfg.name.is_empty() && cfg.name != req.name {
        return Err(herr(
            ErrorCode::InvalidArgument,
            format!("settings name `{}` is not `{}`", cfg.name, req.name),
        ));
    }
    cfg.name = req.name.clone();
    let snapshot_bytes = crate::group::window::snapshot_bytes_max(cfg.inflight_messages_max) + 256;
    if snapshot_bytes > u64::from(shard.config.limits.batch_bytes_max) {
        return Err(herr(
            ErrorCode::InvalidArgument,
            format!(
                "inflight_messages_max {} needs a {snapshot_bytes}-byte window snapshot, over limits.batch_bytes_max",
                cfg.inflight_messages_max
            ),
        ));
    }
    let level = cfg
        .durability
        .unwrap_or(shard.config.broker.durability_default);
    let limits = topic_limits(shard);
    let now = crate::runtime::now_ms();
    let c = cfg.clone();
    let id = change_metadata(shard, move |m| {
        let id = m.create_group(c.clone(), now)?;
        m.ensure_dlq_topic(&c.name, level, limits, now)?;
        Ok(id)
    })
    .await?;
    let coordinator = shard.metadata.borrow().coordinator_of(&cfg.name).0;
    tracing::info!(group = %cfg.name, id = id.0, "created group");
    Ok(body_json(&serde_json::json!({
        "name": cfg.name,
        "id": id.0,
        "coordinator": coordinator,
        "dlq_topic": cfg.dlq_topic(),
        "settings": cfg,
    })))
}

pub(super) async fn delete_group(shard: &Rc<Shard>, body: Bytes) -> HResult {
    let req = GroupRequest::decode(body)?;
    change_metadata(shard, |m| m.delete_group(&req.name)).await?;
    tracing::info!(group = %req.name, "deleted group");
    Ok(Vec::new())
}

pub(super) fn list_groups(shard: &Shard, body: Bytes) -> HResult {
    Reader::new(body).finish()?;
    let meta = shard.metadata.borrow();
    let groups: Vec<_> = meta
        .groups
        .values()
        .map(|g| {
            serde_json::json!({
                "name": g.config.name,
                "id": g.id,
                "mode": g.config.mode,
                "delivery": g.config.delivery,
                "orderly": g.config.orderly,
                "topics": g.config.subscriptions.iter().map(|s| s.topic.clone()).collect::<Vec<_>>(),
                "created_ms": g.created_ms,
            })
        })
        .collect();
    Ok(body_json(&serde_json::Value::Array(groups)))
}

/// This shard's part of a group's description.
fn describe_local(shard: &Shard, name: &str) -> serde_json::Value {
    let meta = shard.metadata.borrow();
    let Some(g) = meta.groups.get(name) else {
        return serde_json::Value::Null;
    };
    let mut queues = Vec::new();
    for key in shard.groups.window_keys() {
        if key.0 .0 != g.id {
            continue;
        }
        let latest = shard.store.offsets(key.1).map_or(0, |o| o.latest);
        if let Some(v) = shard.groups.with_window(key.0, key.1, |w| {
            let (in_flight, retrying, dead_lettering) = w.w.counts();
            serde_json::json!({
                "topic": w.topic,
                "queue": w.index.0,
                "shard": shard.id,
                "acked_below": w.w.floor(),
                "delivered_below": w.w.next(),
                "latest": latest,
                "lag": latest.saturating_sub(w.w.floor()),
                "in_flight": in_flight,
                "retrying": retrying,
                "dead_lettering": dead_lettering,
            })
        }) {
            queues.push(v);
        }
    }
    for (q, instance, committed) in shard.groups.offsets_of(name) {
        let Some((topic, index)) = meta.locate(q) else {
            continue;
        };
        let latest = shard.store.offsets(q).map_or(0, |o| o.latest);
        queues.push(serde_json::json!({
            "topic": topic,
            "queue": index.0,
            "shard": shard.id,
            "instance": instance,
            "committed": committed,
            "latest": latest,
            "lag": latest.saturating_sub(committed),
        }));
    }
    let members: Vec<serde_json::Value> = shard
        .groups
        .coordinated
        .borrow()
        .get(&GroupId(g.id))
        .map(|c| {
            c.m.members()
                .map(|(id, instance)| {
                    let held: Vec<serde_json::Value> =
                        c.m.queues()
                            .filter(|&q| c.m.owner(q).is_some_and(|(m, _)| m == id))
                            .filter_map(|q| meta.locate(q))
                            .map(|(t, i)| serde_json::json!({"topic": t, "queue": i.0}))
                            .collect();
                    serde_json::json!({"member": id, "instance": instance, "queues": held})
                })
                .collect()
        })
        .unwrap_or_default();
    let dlq = g.config.dlq_topic();
    let dlq_depth = meta
        .route(&dlq, QueueIndex(0))
        .ok()
        .filter(|r| r.shard == shard.id)
        .and_then(|r| shard.store.offsets(r.queue_id).ok())
        .map(|o| o.latest);
    serde_json::json!({ "queues": queues, "dlq_depth": dlq_depth, "members": members })
}

pub(super) fn describe_group_internal(shard: &Shard, body: Bytes) -> HResult {
    let name = std::str::from_utf8(&body)
        .map_err(|_| herr(ErrorCode::Malformed, "group name is not UTF-8"))?;
    Ok(body_json(&describe_local(shard, name)))
}

pub(super) async fn describe_group(shard: &Rc<Shard>, body: Bytes) -> HResult {
    let req = GroupRequest::decode(body)?;
    let (id, cfg) = group_by_name(shard, &req.name)?;
    let mut parts = vec![describe_local(shard, &req.name)];
    for peer in (0..shard.shard_count).filter(|&p| p != shard.id) {
        let rx = shard
            .mesh
            .request(
                peer,
                OP_INTERNAL_DESCRIBE_GROUP,
                None,
                Bytes::from(req.name.clone()),
            )
            .await
            .map_err(|e| herr(ErrorCode::ShuttingDown, e.to_string()))?;
        if let Some((0, body)) = rx.await {
            let bytes: Vec<u8> = body.iter().flat_map(|b| b.iter().copied()).collect();
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) {
                parts.push(v);
            }
        }
    }
    let mut queues: Vec<serde_json::Value> = parts
        .iter()
        .filter_map(|p| p.get("queues").and_then(|q| q.as_array()))
        .flatten()
        .cloned()
        .collect();
    queues.sort_by_key(|q| {
        (
            q["topic"].as_str().unwrap_or("").to_owned(),
            q["queue"].as_u64().unwrap_or(0),
            q["instance"].as_str().unwrap_or("").to_owned(),
        )
    });
    let dlq_depth = parts
        .iter()
        .filter_map(|p| p.get("dlq_depth").and_then(|d| d.as_u64()))
        .sum::<u64>();
    let members: Vec<serde_json::Value> = parts
        .iter()
        .filter_map(|p| p.get("members").and_then(|m| m.as_array()))
        .flatten()
        .cloned()
        .collect();
    let coordinator = shard.metadata.borrow().coordinator_of(&req.name).0;
    Ok(body_json(&serde_json::json!({
        "name": req.name,
        "id": id.0,
        "coordinator": coordinator,
        "settings": cfg,
        "dlq_topic": cfg.dlq_topic(),
        "dlq_depth": dlq_depth,
        "members": members,
        "queues": queues,
    })))
}

pub(super) async fn group_offset(shard: &Rc<Shard>, body: Bytes, commit: bool) -> HResult {
    let req = GroupOffsetRequest::decode(body, commit)?;
    if !crate::ids::is_valid_name(&req.group, crate::group::config::GROUP_NAME_BYTES_MAX) {
        return Err(herr(
            ErrorCode::InvalidArgument,
            format!("group name `{}` is not valid", req.group),
        ));
    }
    let (route, level) = {
        let meta = shard.metadata.borrow();
        let route = meta.route(&req.topic, QueueIndex(req.queue))?;
        let level = meta
            .groups
            .get(&req.group)
            .and_then(|g| g.config.durability)
            .unwrap_or(route.durability);
        (route, level)
    };
    match req.offset {
        Some(o) => {
            wait_room(shard, 512).await?;
            let entry = shard
                .groups
                .commit(
                    &req.group,
                    route.queue_id,
                    "",
                    o,
                    shard.config.limits.group_offsets_max,
                )
                .map_err(|e| herr(ErrorCode::InvalidArgument, e.to_string()))?;
            let r = shard
                .groups
                .append_waiting(&shard.store, &[entry], level, SETTLE_WAIT_MAX)
                .await?;
            if let Some(r) = r {
                shard.store.wait_durable(&r, level).await?;
            }
            Ok(Vec::new())
        }
        None => {
            let v = shard.groups.offset(&req.group, route.queue_id, "");
            Ok(body_of(|b| encode_opt_u64(b, v)))
        }
    }
}

/// A message group's worth of leases, with the batch each message is in.
struct Leased {
    queue: QueueId,
    index: QueueIndex,
    lease: Lease,
    batch: u32,
}

/// The batch of `queue` holding `offset`, unless the offset holds no
/// message (a gap, or deleted by retention).
async fn batch_holding(
    shard: &Shard,
    queue: QueueId,
    offset: u64,
) -> Result<Option<Bytes>, HandlerError> {
    match shard.store.read(queue, QueueOffset(offset), 1).await {
        Ok((_, batches)) => Ok(batches.into_iter().next().filter(|b| {
            BatchHeader::parse(b).is_ok_and(|h| h.base_offset <= offset && offset < h.next_offset())
        })),
        Err(crate::storage::StoreError::OffsetOutOfRange { .. }) => Ok(None),
        Err(e) => Err(store_err(e)),
    }
}

/// Whether `group` may receive `topic`'s messages now, with this invisible
/// time (0: the group's default): the group, and the invisible time to use.
/// Receives and push subscriptions check the same.
pub fn receive_target(
    shard: &Shard,
    group: &str,
    topic: &str,
    invisible_ms: u64,
) -> Result<(GroupId, u64, Option<Rc<MessageFilter>>), HandlerError> {
    let (gid, cfg) = group_by_name(shard, group)?;
    if cfg.delivery != Delivery::Message {
        return Err(herr(
            ErrorCode::InvalidArgument,
            format!(
                "group `{}` uses queue delivery: join, then fetch and commit offsets",
                group
            ),
        ));
    }
    let Some(subscription) = cfg.subscriptions.iter().find(|s| s.topic == topic) else {
        return Err(herr(
            ErrorCode::InvalidArgument,
            format!("group `{group}` does not subscribe to `{topic}`"),
        ));
    };
    let invisible = if invisible_ms == 0 {
        cfg.invisible_ms
    } else {
        invisible_ms
    };
    if !(INVISIBLE_MS_MIN..=INVISIBLE_MS_MAX).contains(&invisible) {
        return Err(herr(
            ErrorCode::InvalidArgument,
            format!("invisible_ms {invisible} must be {INVISIBLE_MS_MIN} to {INVISIBLE_MS_MAX}"),
        ));
    }
    if shard.groups.outbox_len() >= crate::shard::groups::OUTBOX_ENTRIES_MAX {
        return Err(herr(
            ErrorCode::Busy,
            "the group journal is behind (the disk is behind the producers)",
        ));
    }
    if !shard.groups.leases_safe() {
        return Err(herr(
            ErrorCode::StorageFull,
            "the group journal could not store its state (the disk is full); receives resume once it does",
        ));
    }
    let filter = subscription_filter(shard, gid, subscription)?;
    Ok((gid, invisible, filter))
}

/// Most parsed subscription filters a shard keeps (past it the cache is
/// emptied and filled again as receives come).
pub const FILTER_CACHE_ENTRIES_MAX: usize = 1024;

/// A group subscription's parsed filter (`None` for `*`), parsed once per
/// shard: group ids are never reused and settings do not change.
fn subscription_filter(
    shard: &Shard,
    gid: GroupId,
    s: &crate::group::config::Subscription,
) -> Result<Option<Rc<MessageFilter>>, HandlerError> {
    let key = (gid, s.topic.clone());
    if let Some(f) = shard.filters.borrow().get(&key) {
        return Ok(f.clone());
    }
    let f = s
        .message_filter()
        .map_err(|e| {
            herr(
                ErrorCode::InvalidFilter,
                format!("filter of `{}`: {e}", s.topic),
            )
        })?
        .map(Rc::new);
    let mut cache = shard.filters.borrow_mut();
    if cache.len() >= FILTER_CACHE_ENTRIES_MAX {
        cache.clear();
    }
    cache.insert(key, f.clone());
    Ok(f)
}

pub(super) async fn receive(shard: &Rc<Shard>, body: Bytes) -> HResult {
    let req = ReceiveRequest::decode(body)?;
    let (gid, invisible, filter) = receive_target(shard, &req.group, &req.topic, req.invisible_ms)?;
    let max = req.max_messages.clamp(1, RECEIVE_MESSAGES_MAX) as usize;
    let queues: Vec<QueueId> = shard
        .metadata
        .borrow()
        .queues(&req.topic)?
        .into_iter()
        .filter(|(_, s)| s.0 == shard.id)
        .map(|(q, _)| q)
        .collect();
    let limits = &shard.config.limits;
    let wait = Duration::from_millis(u64::from(req.wait_ms.min(limits.fetch_wait_ms_max)));
    let deadline = Instant::now() + wait;
    let bytes_max = u64::from(limits.fetch_bytes_max);
    loop {
        let seen = shard.groups.ready.get();
        let waiter = shard.store.watch_queues(&queues);
        let (leased, batches, entries, level, before, filtered) = receive_once(
            shard,
            gid,
            &queues,
            max,
            invisible,
            bytes_max,
            filter.as_deref(),
        )
        .await?;
        let now = Instant::now();
        if leased.is_empty() && filtered > 0 && now < deadline {
            // Everything this pass leased was filtered out (and is
            // finished): look again at once, after letting others run.
            if !entries.is_empty() {
                let _ = shard.groups.append(&shard.store, &entries, level);
            }
            futures_lite::future::yield_now().await;
            continue;
        }
        if !leased.is_empty() || now >= deadline {
            if let Some(d) = leased.iter().map(|l| l.lease.deadline_ms).min() {
                shard.groups.kick_for(d);
            }
            if !entries.is_empty() {
                if before {
                    // A busy log keeps the entries in the journal's outbox
                    // (stored before anything later); the reply waits for
                    // them to be durable.
                    let r = shard.groups.append(&shard.store, &entries, level);
                    if r.is_err() {
                        shard.groups.kick_for(0);
                    }
                    if let Some(r) = r? {
                        shard.store.wait_durable(&r, level).await?;
                    }
                } else if shard.groups.defer(&entries, level) {
                    // Alongside: appended by a task that runs after this
                    // one, so the reply is written first (any append before
                    // then stores them first).
                    let s = shard.clone();
                    crate::runtime::spawn_local_into(
                        async move {
                            if s.groups.flush_outbox(&s.store).is_err() {
                                // They wait in the outbox: the timer retries.
                                s.groups.kick_for(0);
                            }
                        },
                        shard.tq.data,
                    )
                    .expect("data queue")
                    .detach();
                }
            }
            return Ok(receive_reply(shard, gid, leased, batches));
        }
        if !entries.is_empty() {
            let _ = shard.groups.append(&shard.store, &entries, level);
        }
        let left = deadline - now;
        futures_lite::future::or(shard.store.wait_watched(&waiter, left), async {
            shard
                .groups
                .ready
                .wait_for_within(seen + 1, crate::runtime::sleep(left))
                .await;
        })
        .await;
    }
}

/// Leases, batches, journal entries (at a level, before the reply or
/// not), and how many leased messages the filter finished unsent.
type Received = (
    Vec<Leased>,
    Vec<Bytes>,
    Vec<crate::group::entry::Entry>,
    Durability,
    bool,
    usize,
);

/// What one receive has gathered so far.
struct Gathered {
    leased: Vec<Leased>,
    batches: Vec<Bytes>,
    /// (queue, base offset, next offset, index in `batches`) of each batch.
    spans: Vec<(QueueId, u64, u64, u32)>,
    /// Batches still to read, and their index in `batches` (read together
    /// at the end, so the disk reads of retries overlap).
    reads: Vec<(u32, crate::storage::store::BatchLocation)>,
    bytes: u64,
    entries: Vec<crate::group::entry::Entry>,
    level: Durability,
    before: bool,
    /// Messages the filter finished without sending.
    filtered: usize,
}

impl Gathered {
    fn new() -> Gathered {
        Gathered {
            leased: Vec::new(),
            batches: Vec::new(),
            spans: Vec::new(),
            reads: Vec::new(),
            bytes: 0,
            entries: Vec::new(),
            level: Durability::Memory,
            before: false,
            filtered: 0,
        }
    }

    fn full(&self, max: usize, bytes_max: u64) -> bool {
        self.leased.len() >= max
            || self.bytes >= bytes_max
            || self.filtered >= FILTERED_PER_PASS_MAX
    }
}

/// Most messages one receive pass finishes unsent because its filter does
/// not pass them (then the receive yields and looks again).
pub const FILTERED_PER_PASS_MAX: usize = 65_536;

/// A span's batch index meaning "skipped unread by its tag summary".
const SKIPPED_BATCH: u32 = u32::MAX;

/// Which messages a pass over one queue's window leases.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Take {
    /// Only those already in the window and due: retries whose time came,
    /// orderly messages whose group became free.
    Due,
    /// Due ones, then new offsets below `visible_end` (the window's next
    /// offset is `next`).
    All {
        visible_end: u64,
        next: u64,
        orderly: bool,
    },
    /// By priority (`DeliveryWindow::receive_prioritized`): retries, the
    /// messages taken ahead and new ones below `visible_end`, the highest
    /// priority first.
    Prioritized { visible_end: u64, next: u64 },
}

/// Most bytes of batches holding priorities a receive reads ahead of its
/// window's next offset to learn them (the window takes in only what it
/// knows the priorities of).
pub const PRIORITY_READ_AHEAD_BYTES: u64 = 4 << 20;
/// Bytes a scan past the window may read per free ahead slot, and at least
/// (the scan goes on from where it stopped at the next receive).
pub const PRIORITY_SCAN_BYTES_PER_SLOT: u64 = 1024;
pub const PRIORITY_SCAN_BYTES_MIN: u64 = 64 << 10;

/// Whether a (group, queue) window delivers by priority now: not orderly,
/// and messages of priority above 0 are waiting in it or visible ahead of
/// it (else FIFO gives the same order, for less).
fn by_priority(shard: &Shard, gid: GroupId, q: QueueId, visible_end: u64) -> bool {
    shard
        .groups
        .with_window(gid, q, |w| {
            !w.orderly
                && (w.w.has_priorities() || shard.store.has_prioritized(q, w.w.next(), visible_end))
        })
        .unwrap_or(false)
}

/// One pass over the queues: leases what is ready, with the batches.
/// Messages already due in any queue go first (a pass over every queue
/// that has some), then new ones queue by queue from a rotating start, so
/// a consumer behind on new messages still gets its retries on time.
async fn receive_once(
    shard: &Rc<Shard>,
    gid: GroupId,
    queues: &[QueueId],
    max: usize,
    invisible: u64,
    bytes_max: u64,
    filter: Option<&MessageFilter>,
) -> Result<Received, HandlerError> {
    use crate::group::entry::Entry;
    let mut g = Gathered::new();
    let n = queues.len().max(1);
    let start = shard.round_robin.get() as usize % n;
    shard
        .round_robin
        .set(shard.round_robin.get().wrapping_add(1));
    let now = now_ms();
    for k in 0..queues.len() {
        if g.full(max, bytes_max) {
            break;
        }
        let q = queues[(start + k) % n];
        if shard.groups.with_window(gid, q, |w| w.w.has_due(now)) == Some(true)
            && !by_priority(
                shard,
                gid,
                q,
                shard.store.offsets(q).map_or(0, |o| o.latest),
            )
        {
            lease_from(
                shard,
                gid,
                q,
                Take::Due,
                invisible,
                max,
                bytes_max,
                filter,
                &mut g,
            )
            .await?;
        }
    }
    for k in 0..queues.len() {
        if g.full(max, bytes_max) {
            break;
        }
        let q = queues[(start + k) % n];
        let Ok(o) = shard.store.offsets(q) else {
            continue;
        };
        let Some((mut next, empty, orderly, due)) = shard.groups.with_window(gid, q, |w| {
            (w.w.next(), w.w.is_empty(), w.orderly, w.w.has_due(now))
        }) else {
            continue;
        };
        // Offsets that hold no message (a crash's gap, retention) are
        // skipped by an empty window; a busy one stops before them.
        let mut visible_end = o.latest;
        if next < o.latest {
            let first = shard
                .store
                .first_offset_from(q, QueueOffset(next))
                .map_or(o.latest, |f| f.0.min(o.latest));
            if first > next {
                if empty {
                    shard.groups.with_window(gid, q, |w| w.w.skip_to(first));
                    next = first;
                    let snap = shard
                        .groups
                        .with_window(gid, q, |w| w.w.snapshot())
                        .expect("window");
                    g.entries.push(Entry::Snapshot {
                        group: gid,
                        queue: q,
                        snapshot: snap,
                    });
                } else {
                    visible_end = next;
                }
            }
        }
        let take = if by_priority(shard, gid, q, visible_end) {
            Take::Prioritized { visible_end, next }
        } else {
            if next >= visible_end && !due {
                continue;
            }
            Take::All {
                visible_end,
                next,
                orderly,
            }
        };
        if let Err(e) = lease_from(
            shard, gid, q, take, invisible, max, bytes_max, filter, &mut g,
        )
        .await
        {
            // As below: what was leased stands, so its journal is stored.
            take_window_journal(shard, gid, q, &mut g.entries);
            let _ = shard.groups.append(&shard.store, &g.entries, g.level);
            return Err(e);
        }
    }
    // Every batch not in the tail cache is read from the disk at once.
    let read = futures_util::future::try_join_all(
        g.reads.iter().map(|(_, at)| shard.store.read_located(at)),
    )
    .await;
    let read = match read {
        Ok(r) => r,
        Err(e) => {
            // The leases stand (they time out and come back): their
            // journal entries must be stored all the same.
            let _ = shard.groups.append(&shard.store, &g.entries, g.level);
            return Err(store_err(e));
        }
    };
    for ((i, _), b) in g.reads.iter().zip(read) {
        g.batches[*i as usize] = b;
    }
    settle_batches(shard, gid, filter, &mut g);
    Ok((
        g.leased, g.batches, g.entries, g.level, g.before, g.filtered,
    ))
}

/// Finishes (acks) every leased message that is not to be sent, so it
/// never comes back: those the group's filter does not pass, and those a
/// view lacks (a fired scheduled message whose record retention removed).
/// Sends what is left: whole batches where every record goes, views of
/// the records that go where only some do, nothing where none does.
fn settle_batches(shard: &Shard, gid: GroupId, filter: Option<&MessageFilter>, g: &mut Gathered) {
    use crate::filter::Selection;
    let views = g
        .batches
        .iter()
        .any(|b| BatchHeader::parse(b).is_ok_and(|h| h.is_view()));
    if filter.is_none() && !views {
        return;
    }
    // Per batch: what goes (the filter's selection), and the offset deltas
    // of the records that go (`None`: every offset of a stored batch).
    let mut selections = Vec::with_capacity(g.batches.len());
    let mut sendable: Vec<Option<Vec<u32>>> = Vec::with_capacity(g.batches.len());
    for b in &g.batches {
        let sel = filter.map_or(Selection::All, |f| f.select(b, 0));
        let view = BatchHeader::parse(b).is_ok_and(|h| h.is_view());
        let deltas = || RecordIter::new(b).map_while(Result::ok).map(|r| r.index);
        sendable.push(match &sel {
            Selection::All if !view => None,
            Selection::All => Some(deltas().collect()),
            Selection::None => Some(Vec::new()),
            Selection::Some(keep) => {
                let all: Vec<u32> = deltas().collect();
                Some(keep.iter().map(|&k| all[k as usize]).collect())
            }
        });
        selections.push(sel);
    }
    let passes = |batch: u32, offset: u64| match &sendable[batch as usize] {
        None => true,
        Some(d) => BatchHeader::parse(&g.batches[batch as usize])
            .is_ok_and(|h| d.binary_search(&((offset - h.base_offset) as u32)).is_ok()),
    };
    let mut dropped: Vec<QueueId> = Vec::new();
    let mut kept = Vec::with_capacity(g.leased.len());
    for l in g.leased.drain(..) {
        if passes(l.batch, l.lease.offset) {
            kept.push(l);
            continue;
        }
        shard
            .groups
            .with_window(gid, l.queue, |w| w.w.ack(l.lease.offset, l.lease.lease));
        g.filtered += 1;
        if !dropped.contains(&l.queue) {
            dropped.push(l.queue);
        }
    }
    g.leased = kept;
    for q in dropped {
        take_window_journal(shard, gid, q, &mut g.entries);
    }
    // Only batches some lease still points into go out, renumbered.
    let mut used = vec![false; g.batches.len()];
    for l in &g.leased {
        used[l.batch as usize] = true;
    }
    let mut renumber = vec![0u32; g.batches.len()];
    let mut out = Vec::with_capacity(g.batches.len());
    for (i, b) in std::mem::take(&mut g.batches).into_iter().enumerate() {
        if !used[i] {
            continue;
        }
        renumber[i] = out.len() as u32;
        out.push(match &selections[i] {
            Selection::Some(keep) => batch::select_records(&b, keep),
            _ => b,
        });
    }
    for l in &mut g.leased {
        l.batch = renumber[l.batch as usize];
    }
    g.batches = out;
}

/// Leases from one queue's window into `g` until it is full or the window
/// has nothing more to give, then takes the window's journal events.
#[allow(clippy::too_many_arguments)]
async fn lease_from(
    shard: &Rc<Shard>,
    gid: GroupId,
    q: QueueId,
    take: Take,
    invisible: u64,
    max: usize,
    bytes_max: u64,
    filter: Option<&MessageFilter>,
    g: &mut Gathered,
) -> Result<(), HandlerError> {
    let mut priorities: HashMap<u64, u8> = HashMap::new();
    let (visible_end, groups) = match take {
        Take::Due => (0, Default::default()),
        Take::Prioritized { visible_end, next } => {
            // The priorities of what the window may take in: it takes no
            // further than it knows them.
            let cap = shard
                .groups
                .with_window(gid, q, |w| {
                    w.w.floor() + u64::from(w.w.config().inflight_max)
                })
                .unwrap_or(next);
            let (known_to, p) = shard
                .store
                .priorities(q, next, visible_end.min(cap), PRIORITY_READ_AHEAD_BYTES)
                .await?;
            priorities.extend(p);
            let end = known_to.max(next).min(visible_end);
            // Take in, then learn what of priority above 0 waits beyond
            // the window (the window remembers how far it looked).
            let now = now_ms();
            let scan = shard
                .groups
                .with_window(gid, q, |w| {
                    w.w.take_prioritized(now, end, |o| priorities.get(&o).copied().unwrap_or(0));
                    w.w.ahead_scan_from(visible_end)
                        .map(|from| (from, w.w.ahead_max().saturating_sub(w.w.ahead_len())))
                })
                .flatten();
            if let Some((from, room)) = scan {
                // What a scan may read: in proportion to the room it can
                // fill (a few freed slots are not worth 4 MiB each time).
                let budget = (room as u64 * PRIORITY_SCAN_BYTES_PER_SLOT)
                    .clamp(PRIORITY_SCAN_BYTES_MIN, PRIORITY_READ_AHEAD_BYTES);
                // Best effort: a failed scan leaves the window as it was.
                match shard.store.priorities(q, from, visible_end, budget).await {
                    Ok((to, found)) => {
                        shard
                            .groups
                            .with_window(gid, q, |w| w.w.offer_ahead(from, to, &found));
                    }
                    Err(e) => tracing::debug!(shard = shard.id, "priority scan: {e}"),
                }
            }
            (end, Default::default())
        }
        Take::All {
            visible_end,
            next,
            orderly,
        } => {
            if orderly && next < visible_end {
                let to = visible_end.min(next + 100_000);
                let m = message_groups(&shard.store, q, next, to).await?;
                let mut end = next;
                while m.contains_key(&end) {
                    end += 1;
                }
                (end, m)
            } else {
                (visible_end, Default::default())
            }
        }
    };
    let now = now_ms();
    // Due ones first, one per window call (they may lie in any batch); then
    // new offsets, as many per call as the batch holding the next one has
    // (so one window call and one batch lookup per run of a batch).
    let mut due = true;
    let mut got: Vec<Lease> = Vec::new();
    loop {
        if g.full(max, bytes_max) {
            break;
        }
        let left = max - g.leased.len();
        let span = g.spans.last().filter(|s| s.0 == q).map(|s| (s.1, s.2));
        got.clear();
        let prioritized = matches!(take, Take::Prioritized { .. });
        let meta = shard.groups.with_window(gid, q, |w| {
            if prioritized {
                w.w.receive_prioritized(
                    now,
                    left,
                    invisible,
                    visible_end,
                    |o| priorities.get(&o).copied().unwrap_or(0),
                    &mut got,
                );
                due = false;
                return (w.index, w.level, w.journal_before);
            }
            if due {
                got = w.w.receive_due(now, 1, invisible);
            }
            if got.is_empty() && take != Take::Due {
                due = false;
                let next = w.w.next();
                let n = match span {
                    Some((base, end)) if base <= next && next < end => {
                        left.min((end - next) as usize)
                    }
                    _ => 1,
                };
                w.w.receive_new(
                    now,
                    n,
                    invisible,
                    visible_end,
                    |o| groups.get(&o).copied().unwrap_or(0),
                    &mut got,
                );
            }
            (w.index, w.level, w.journal_before)
        });
        let Some((index, lvl, jb)) = meta else {
            break;
        };
        if got.is_empty() {
            break;
        }
        g.level = g.level.max_level(lvl);
        g.before |= jb;
        for lease in got.drain(..) {
            let off = lease.offset;
            let known = |s: &&(QueueId, u64, u64, u32)| s.0 == q && s.1 <= off && off < s.2;
            let batch = match g
                .spans
                .last()
                .filter(known)
                .or_else(|| g.spans.iter().rev().find(known))
            {
                Some(s) if s.3 == SKIPPED_BATCH => {
                    g.filtered += 1;
                    None
                }
                Some(s) => Some(s.3),
                None => match shard.store.locate(q, QueueOffset(off)) {
                    // A batch whose tag summary rules the filter out is
                    // finished unread.
                    Some(at) if filter.is_some_and(|f| !f.may_match_tags(at.tags)) => {
                        g.spans
                            .push((q, at.base_offset.0, at.next_offset.0, SKIPPED_BATCH));
                        g.filtered += 1;
                        None
                    }
                    Some(at) => {
                        let i = g.batches.len() as u32;
                        g.bytes += u64::from(at.read_len());
                        g.spans.push((q, at.base_offset.0, at.next_offset.0, i));
                        g.batches.push(Bytes::new());
                        g.reads.push((i, at));
                        Some(i)
                    }
                    None => None,
                },
            };
            match batch {
                Some(batch) => g.leased.push(Leased {
                    queue: q,
                    index,
                    lease,
                    batch,
                }),
                None => {
                    // Nothing to deliver at this offset: finished.
                    shard
                        .groups
                        .with_window(gid, q, |w| w.w.ack(off, lease.lease));
                }
            }
        }
    }
    take_window_journal(shard, gid, q, &mut g.entries);
    Ok(())
}

/// Moves a window's journal events into a request's entries.
fn take_window_journal(
    shard: &Shard,
    gid: GroupId,
    q: QueueId,
    entries: &mut Vec<crate::group::entry::Entry>,
) {
    if let Some(events) = shard.groups.with_window(gid, q, |w| w.w.take_journal()) {
        entries.extend(
            events
                .into_iter()
                .map(|event| crate::group::entry::Entry::Window {
                    group: gid,
                    queue: q,
                    event,
                }),
        );
    }
}

fn receive_reply(
    shard: &Shard,
    gid: GroupId,
    leased: Vec<Leased>,
    batches: Vec<Bytes>,
) -> Vec<Bytes> {
    // Every handle in one allocation, each a slice of it.
    let mut handles = BytesMut::with_capacity(leased.len() * RECEIPT_HANDLE_BYTES);
    let leases: Vec<LeaseInfo> = leased
        .iter()
        .map(|l| {
            let handle = Receipt {
                shard: crate::ids::ShardId(shard.id),
                group: gid,
                queue: l.queue,
                offset: QueueOffset(l.lease.offset),
                lease: l.lease.lease,
                attempt: l.lease.attempt,
            }
            .seal(&shard.groups.key);
            LeaseInfo {
                queue: l.index.0,
                offset: l.lease.offset,
                attempt: l.lease.attempt,
                deadline_ms: l.lease.deadline_ms,
                handle: {
                    handles.extend_from_slice(&handle);
                    handles.split().freeze()
                },
                batch: l.batch,
            }
        })
        .collect();
    {
        let now = now_ms();
        let mut m = shard.metrics.borrow_mut();
        for l in &leased {
            if let Some(due) = l.lease.due_ms {
                m.group_redeliveries += 1;
                let _ = m
                    .redelivery_lateness_ms
                    .record(now.saturating_sub(due).max(1));
            }
        }
        m.group_deliveries += leases.len() as u64;
        m.fetch_requests += 1;
        m.messages_out += leases.len() as u64;
        m.bytes_out += batches.iter().map(|b| b.len() as u64).sum::<u64>();
    }
    let mut head = BytesMut::new();
    ReceiveResponse::encode_head(&leases, &batches, &mut head);
    let mut out = Vec::with_capacity(batches.len() + 1);
    out.push(head.freeze());
    out.extend(batches);
    out
}

/// Adds a window's transition to a request's journal entries, extending
/// the last entry's run when it continues it (a batch of acks in delivery
/// order is then one record per run).
fn journal_event(
    entries: &mut Vec<crate::group::entry::Entry>,
    group: GroupId,
    queue: QueueId,
    event: crate::group::journal::Event,
) {
    use crate::group::entry::Entry;
    if let Some(Entry::Window {
        group: g,
        queue: q,
        event: last,
    }) = entries.last_mut()
    {
        if *g == group && *q == queue && last.extend(&event) {
            return;
        }
    }
    entries.push(Entry::Window {
        group,
        queue,
        event,
    });
}

fn lease_code(e: LeaseError) -> ErrorCode {
    match e {
        LeaseError::Finished(_) => ErrorCode::AlreadyAcked,
        LeaseError::NotDelivered(_)
        | LeaseError::Stale(_)
        | LeaseError::NotLeased(_)
        | LeaseError::DeadLettering(_) => ErrorCode::StaleReceipt,
    }
}

/// Ack (or nack) handles of this shard; one code per handle.
pub(super) async fn settle(shard: &Rc<Shard>, body: Bytes, nack: bool) -> HResult {
    let req = SettleRequest::decode(body, nack)?;
    let delay = match req.delay_ms {
        Some(d) if d < 0 => {
            return Err(herr(
                ErrorCode::InvalidArgument,
                format!("nack delay_ms {d} is negative"),
            ))
        }
        Some(d) if d as u64 > crate::group::backoff::BACKOFF_STEP_MS_MAX => {
            return Err(herr(
                ErrorCode::InvalidArgument,
                format!(
                    "nack delay_ms {d} is over {}",
                    crate::group::backoff::BACKOFF_STEP_MS_MAX
                ),
            ))
        }
        d => d.map(|d| d as u64),
    };
    wait_room(shard, (req.handles.len() * 64) as u64).await?;
    let now = now_ms();
    let mut codes = Vec::with_capacity(req.handles.len());
    let mut entries = Vec::new();
    let mut level = Durability::Memory;
    let mut wake = false;
    for h in &req.handles {
        let code = match Receipt::open(h, &shard.groups.key) {
            Err(_) => ErrorCode::InvalidReceipt,
            Ok(r) if r.shard.0 != shard.id => ErrorCode::InvalidReceipt,
            Ok(r) => {
                let res = shard.groups.with_window(r.group, r.queue, |w| {
                    w.w.advance(now);
                    let res = if nack {
                        w.w.nack(r.offset.0, r.lease, delay)
                    } else {
                        w.w.ack(r.offset.0, r.lease)
                    };
                    if res.is_ok() {
                        level = level.max_level(w.level);
                    }
                    // An ack can free an ordered message group, a nack make a
                    // retry due at once: only then do waiting receives wake.
                    wake |= w.w.has_ready();
                    for event in w.w.take_journal() {
                        journal_event(&mut entries, r.group, r.queue, event);
                    }
                    res
                });
                match res {
                    None => ErrorCode::UnknownGroup,
                    Some(Ok(())) => ErrorCode::Ok,
                    Some(Err(e)) => lease_code(e),
                }
            }
        };
        if code == ErrorCode::Ok {
            let mut m = shard.metrics.borrow_mut();
            if nack {
                m.group_nacks += 1;
            } else {
                m.group_acks += 1;
            }
        }
        codes.push(code as u16);
    }
    if !entries.is_empty() {
        let r = shard
            .groups
            .append_waiting(&shard.store, &entries, level, SETTLE_WAIT_MAX)
            .await?;
        let g = &shard.groups;
        if wake {
            g.ready.advance(g.ready.get() + 1);
        }
        if nack {
            g.kick.advance(g.kick.get() + 1);
        }
        if let Some(r) = r {
            shard.store.wait_durable(&r, level).await?;
        }
    }
    Ok(body_of(|b| encode_codes(b, &codes)))
}

pub(super) async fn change_invisible(shard: &Rc<Shard>, body: Bytes) -> HResult {
    use crate::group::entry::Entry;
    let req = ChangeInvisibleRequest::decode(body)?;
    if !(INVISIBLE_MS_MIN..=INVISIBLE_MS_MAX).contains(&req.invisible_ms) {
        return Err(herr(
            ErrorCode::InvalidArgument,
            format!(
                "invisible_ms {} must be {INVISIBLE_MS_MIN} to {INVISIBLE_MS_MAX}",
                req.invisible_ms
            ),
        ));
    }
    let r = Receipt::open(&req.handle, &shard.groups.key)
        .map_err(|e| herr(ErrorCode::InvalidReceipt, e.to_string()))?;
    if r.shard.0 != shard.id {
        return Err(herr(
            ErrorCode::InvalidReceipt,
            format!("the handle names shard {}", r.shard.0),
        ));
    }
    wait_room(shard, 64).await?;
    let now = now_ms();
    let (deadline, entries, level) = shard
        .groups
        .with_window(r.group, r.queue, |w| {
            w.w.advance(now);
            let d = w.w.change_invisible(r.offset.0, r.lease, req.invisible_ms);
            let entries: Vec<Entry> =
                w.w.take_journal()
                    .into_iter()
                    .map(|event| Entry::Window {
                        group: r.group,
                        queue: r.queue,
                        event,
                    })
                    .collect();
            (d, entries, w.level)
        })
        .ok_or_else(|| herr(ErrorCode::UnknownGroup, "the handle's group is gone"))?;
    let deadline = deadline.map_err(|e| herr(lease_code(e), e.to_string()))?;
    if let Some(rc) = shard
        .groups
        .append_waiting(&shard.store, &entries, level, SETTLE_WAIT_MAX)
        .await?
    {
        shard.groups.kick.advance(shard.groups.kick.get() + 1);
        shard.store.wait_durable(&rc, level).await?;
    }
    Ok(body_of(|b| encode_u64(b, deadline)))
}

/// Per shard: wakes at the next deadline or retry time, fires what is due
/// (retries become ready, long polls wake), and stores dead letters.
pub async fn group_timer(shard: Rc<Shard>) {
    let mut pending: Vec<(GroupId, QueueId, u64, u32)> = Vec::new();
    while !shard.stopping.get() {
        let now = now_ms();
        let (dead, ready) = {
            let mut m = shard.metrics.borrow_mut();
            shard.groups.advance_all(now, |late| {
                let _ = m.redelivery_fire_lateness_ms.record(late);
            })
        };
        let g = &shard.groups;
        if ready {
            g.ready.advance(g.ready.get() + 1);
        }
        pending.extend(dead);
        let _ = shard.groups.flush_outbox(&shard.store);
        if !pending.is_empty() {
            let batch = std::mem::take(&mut pending);
            for d in batch {
                if let Err(e) = store_dead_letter(&shard, d).await {
                    tracing::warn!(
                        shard = shard.id,
                        "dead letter not stored yet: {}",
                        e.message
                    );
                    pending.push(d);
                }
            }
        }
        let expiry = expire_members(&shard).await;
        let g = &shard.groups;
        let next = match (g.next_due_ms(), expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let sleep_ms = if pending.is_empty() {
            next.map_or(1000, |d| d.saturating_sub(now_ms()).min(1000))
        } else {
            200
        };
        let seen = g.kick.get();
        g.timer_wake_ms.set(now_ms() + sleep_ms);
        g.kick
            .wait_for_within(
                seen + 1,
                crate::runtime::sleep(Duration::from_millis(sleep_ms)),
            )
            .await;
    }
}

/// Appends a dead letter to its group's `%DLQ%` topic (wherever that
/// queue lives), then finishes it in the window.
async fn store_dead_letter(
    shard: &Rc<Shard>,
    (gid, q, offset, attempts): (GroupId, QueueId, u64, u32),
) -> Result<(), HandlerError> {
    use crate::group::entry::Entry;
    let Some((dlq, group_name)) = shard
        .metadata
        .borrow()
        .groups
        .values()
        .find(|g| g.id == gid.0)
        .map(|g| (g.config.dlq_topic(), g.config.name.clone()))
    else {
        return Ok(()); // the group is gone
    };
    let Some((topic, index)) = shard
        .groups
        .with_window(gid, q, |w| (w.topic.clone(), w.index))
    else {
        return Ok(());
    };
    if let Some(b) = batch_holding(shard, q, offset).await? {
        let h = BatchHeader::parse(&b).expect("checked");
        // By offset: a view (fired scheduled messages) holds its records
        // under their own ids.
        let delta = (offset - h.base_offset) as u32;
        let rec = RecordIter::new(&b)
            .map_while(Result::ok)
            .find(|r| r.index == delta)
            .ok_or_else(|| herr(ErrorCode::StorageError, "stored record does not decode"))?;
        let id = MessageId {
            shard: crate::ids::ShardId(shard.id),
            position: crate::ids::LogPosition(rec.origin_position),
            index: rec.origin_index,
        };
        let mut properties: Vec<(String, String)> = rec
            .properties
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        properties.extend([
            (DLQ_PROPERTY_GROUP.to_owned(), group_name),
            (DLQ_PROPERTY_TOPIC.to_owned(), topic),
            (DLQ_PROPERTY_QUEUE.to_owned(), index.0.to_string()),
            (DLQ_PROPERTY_OFFSET.to_owned(), offset.to_string()),
            (DLQ_PROPERTY_MESSAGE_ID.to_owned(), id.to_string()),
            (DLQ_PROPERTY_ATTEMPTS.to_owned(), attempts.to_string()),
            (DLQ_PROPERTY_TIME.to_owned(), now_ms().to_string()),
        ]);
        let record = BatchRecord {
            key: rec.key.map(Bytes::copy_from_slice),
            tag: rec.tag.map(str::to_owned),
            properties,
            payload: Bytes::copy_from_slice(rec.payload),
            timestamp_ms: rec.timestamp_ms,
            priority: rec.priority,
            deliver_at_ms: 0,
        };
        let mut builder = BatchBuilder::new();
        builder.push(&record);
        let mut body = BytesMut::new();
        ProduceRequest {
            topic: dlq.clone(),
            queue: 0,
            routing_key: Bytes::new(),
            batch: builder.finish(),
        }
        .encode(&mut body);
        let owner = shard.metadata.borrow().route(&dlq, QueueIndex(0))?.shard;
        let pending = if owner == shard.id {
            produce(shard, Some(QueueIndex(0)), body.freeze()).await
        } else {
            forward(
                shard,
                owner,
                Op::Produce as u16,
                Some(QueueIndex(0)),
                body.freeze(),
            )
            .await
        };
        let reply = pending.resolve().await;
        if reply.code != ErrorCode::Ok {
            return Err(herr(reply.code, format!("storing into {dlq}")));
        }
    }
    let stored = shard.groups.with_window(gid, q, |w| {
        w.w.dead_lettered(offset);
        (w.w.take_journal(), w.level)
    });
    if let Some((events, level)) = stored {
        let entries: Vec<Entry> = events
            .into_iter()
            .map(|event| Entry::Window {
                group: gid,
                queue: q,
                event,
            })
            .collect();
        shard.groups.append(&shard.store, &entries, level)?;
        shard.metrics.borrow_mut().group_dead_letters += 1;
        let g = &shard.groups;
        g.ready.advance(g.ready.get() + 1);
    }
    Ok(())
}

/// Internal operation: the holders of some of a group's queues on the
/// receiving shard (coordinator → queue shard).
pub const OP_INTERNAL_HOLDERS: u16 = 0x8005;
/// Longest instance id of a member, in bytes.
pub use crate::group::entry::INSTANCE_ID_BYTES_MAX;

/// Where a membership or group-offset request goes: the coordinator for
/// join, heartbeat and leave; the queue's shard for commits.
pub(super) fn group_route(
    _shard: &Shard,
    meta: &Metadata,
    op: Op,
    body: &Bytes,
) -> Result<(u16, Option<QueueIndex>), HandlerError> {
    let mut r = Reader::new(body.clone());
    let group = r.str("group")?;
    match op {
        Op::Join | Op::Heartbeat | Op::Leave => Ok((meta.coordinator_of(&group).0, None)),
        _ => {
            let queue = QueueId(r.u32("queue_id")?);
            let (topic, index) = meta
                .locate(queue)
                .ok_or_else(|| herr(ErrorCode::UnknownQueue, format!("no queue id {}", queue.0)))?;
            Ok((meta.route(topic, index)?.shard, None))
        }
    }
}

fn queue_group(shard: &Shard, name: &str) -> Result<(GroupId, GroupConfig), HandlerError> {
    let (gid, cfg) = group_by_name(shard, name)?;
    if cfg.delivery != Delivery::Queue {
        return Err(herr(
            ErrorCode::InvalidArgument,
            format!("group `{name}` uses message delivery: receive and ack"),
        ));
    }
    if cfg.mode != crate::group::config::GroupMode::Clustering {
        return Err(herr(
            ErrorCode::InvalidArgument,
            format!("group `{name}` is a broadcast group: every instance reads every queue and commits its own offsets, without joining"),
        ));
    }
    Ok((gid, cfg))
}

/// Runs a membership operation on the coordinator, then tells the queues'
/// shards who holds what (and waits for them) before answering: a member
/// learns of a grant only once its commits would be taken.
async fn membership_op<T>(
    shard: &Rc<Shard>,
    name: &str,
    op: impl FnOnce(&mut crate::group::membership::Membership, u64) -> Result<T, HandlerError>,
) -> Result<(T, GroupConfig), HandlerError> {
    let (gid, cfg) = queue_group(shard, name)?;
    let queues: Vec<QueueId> = {
        let meta = shard.metadata.borrow();
        cfg.subscriptions
            .iter()
            .filter_map(|s| meta.queues(&s.topic).ok())
            .flatten()
            .map(|(q, _)| q)
            .collect()
    };
    let out = {
        let mut all = shard.groups.coordinated.borrow_mut();
        let c = all
            .entry(gid)
            .or_insert_with(|| crate::shard::groups::Coordinated {
                m: crate::group::membership::Membership::numbered_from(
                    cfg.membership(),
                    now_ms() * 1000,
                ),
                pushed: Default::default(),
            });
        let mut have: Vec<QueueId> = c.m.queues().collect();
        let mut want = queues.clone();
        have.sort_unstable();
        want.sort_unstable();
        if have != want {
            c.m.set_queues(queues);
        }
        op(&mut c.m, now_ms())?
    };
    push_holders(shard, gid).await?;
    Ok((out, cfg))
}

/// Sends the holders that changed since the last push to their shards.
async fn push_holders(shard: &Rc<Shard>, gid: GroupId) -> Result<(), HandlerError> {
    let changes: Vec<(QueueId, (u64, u64))> = {
        let all = shard.groups.coordinated.borrow();
        let Some(c) = all.get(&gid) else {
            return Ok(());
        };
        let mut out = Vec::new();
        for q in c.m.queues() {
            let now = c.m.owner(q).unwrap_or((0, 0));
            if c.pushed.get(&q).copied().unwrap_or((0, 0)) != now {
                out.push((q, now));
            }
        }
        for (&q, _) in c.pushed.iter() {
            if !c.m.queues().any(|x| x == q) {
                out.push((q, (0, 0)));
            }
        }
        out
    };
    if changes.is_empty() {
        return Ok(());
    }
    type Changes = Vec<(QueueId, (u64, u64))>;
    let mut by_shard: HashMap<u16, Changes> = HashMap::new();
    {
        let meta = shard.metadata.borrow();
        for &(q, h) in &changes {
            let Some((topic, index)) = meta.locate(q) else {
                continue;
            };
            if let Ok(r) = meta.route(topic, index) {
                by_shard.entry(r.shard).or_default().push((q, h));
            }
        }
    }
    let mut waits = Vec::new();
    for (s, list) in by_shard {
        let mut b = BytesMut::new();
        let mut w = Writer(&mut b);
        w.u32(gid.0).u32(list.len() as u32);
        for (q, (m, e)) in &list {
            w.u32(q.0).u64(*m).u64(*e);
        }
        if s == shard.id {
            apply_holders(shard, b.freeze())?;
        } else {
            let rx = shard
                .mesh
                .request(s, OP_INTERNAL_HOLDERS, None, b.freeze())
                .await
                .map_err(|e| herr(ErrorCode::ShuttingDown, e.to_string()))?;
            waits.push(rx);
        }
    }
    for rx in waits {
        match rx.await {
            Some((0, _)) => {}
            _ => {
                return Err(herr(
                    ErrorCode::Internal,
                    "a shard did not take the group's assignment",
                ))
            }
        }
    }
    let mut all = shard.groups.coordinated.borrow_mut();
    if let Some(c) = all.get_mut(&gid) {
        for (q, h) in changes {
            if h == (0, 0) {
                c.pushed.remove(&q);
            } else {
                c.pushed.insert(q, h);
            }
        }
    }
    Ok(())
}

pub(super) fn apply_holders(shard: &Shard, body: Bytes) -> HResult {
    let mut r = Reader::new(body);
    let gid = GroupId(r.u32("group")?);
    let n = r.u32("count")?;
    let mut holders = shard.groups.holders.borrow_mut();
    for _ in 0..n {
        let q = QueueId(r.u32("queue")?);
        let m = r.u64("member")?;
        let e = r.u64("epoch")?;
        if m == 0 {
            holders.remove(&(gid, q));
        } else {
            holders.insert((gid, q), (m, e));
        }
    }
    r.finish()?;
    Ok(Vec::new())
}

fn assignment_body(a: crate::group::membership::Assignment, cfg: &GroupConfig) -> Vec<Bytes> {
    let grant = |g: &crate::group::membership::Grant| GrantInfo {
        queue_id: g.queue.0,
        epoch: g.epoch,
    };
    let resp = AssignmentResponse {
        member: a.member,
        generation: a.generation,
        session_timeout_ms: cfg.session_timeout_ms,
        heartbeat_interval_ms: crate::group::membership::HEARTBEAT_INTERVAL_MS_DEFAULT
            .min(cfg.session_timeout_ms / 3),
        granted: a.granted.iter().map(grant).collect(),
        revoke: a.revoke.iter().map(grant).collect(),
    };
    body_of(|b| resp.encode(b))
}

fn membership_err(e: crate::group::membership::MembershipError) -> HandlerError {
    use crate::group::membership::MembershipError as M;
    match e {
        M::UnknownMember(m) => herr(
            ErrorCode::StaleGeneration,
            format!("member {m} is not in the group (expired or left): join again"),
        ),
        e => herr(ErrorCode::InvalidArgument, e.to_string()),
    }
}

pub(super) async fn join(shard: &Rc<Shard>, body: Bytes) -> HResult {
    let req = JoinRequest::decode(body)?;
    if req.instance.is_empty() || req.instance.len() > INSTANCE_ID_BYTES_MAX {
        return Err(herr(
            ErrorCode::InvalidArgument,
            format!("instance id must be 1 to {INSTANCE_ID_BYTES_MAX} bytes"),
        ));
    }
    let (a, cfg) = membership_op(shard, &req.group, |m, now| {
        m.join(now, &req.instance).map_err(membership_err)
    })
    .await?;
    Ok(assignment_body(a, &cfg))
}

pub(super) async fn heartbeat(shard: &Rc<Shard>, body: Bytes, leave: bool) -> HResult {
    let req = HeartbeatRequest::decode(body)?;
    let released: Vec<crate::group::membership::Grant> = req
        .released
        .iter()
        .map(|g| crate::group::membership::Grant {
            queue: QueueId(g.queue_id),
            epoch: g.epoch,
        })
        .collect();
    if leave {
        membership_op(shard, &req.group, |m, _| {
            m.leave(req.member).map_err(membership_err)
        })
        .await?;
        return Ok(Vec::new());
    }
    let (a, cfg) = membership_op(shard, &req.group, |m, now| {
        m.heartbeat(now, req.member, &released)
            .map_err(membership_err)
    })
    .await?;
    Ok(assignment_body(a, &cfg))
}

/// Coordinator timer: expires members whose sessions ran out.
pub(super) async fn expire_members(shard: &Rc<Shard>) -> Option<u64> {
    let now = now_ms();
    let mut changed = Vec::new();
    let mut next = None::<u64>;
    for (gid, c) in shard.groups.coordinated.borrow_mut().iter_mut() {
        if !c.m.expire(now).is_empty() {
            changed.push(*gid);
        }
        if let Some(t) = c.m.next_expiry_ms() {
            next = Some(next.map_or(t, |n: u64| n.min(t)));
        }
    }
    for gid in changed {
        if let Err(e) = push_holders(shard, gid).await {
            tracing::warn!(
                shard = shard.id,
                "group assignment not pushed: {}",
                e.message
            );
        }
    }
    next
}

pub(super) async fn group_commit(shard: &Rc<Shard>, body: Bytes) -> HResult {
    let req = GroupCommitRequest::decode(body)?;
    let (gid, cfg) = group_by_name(shard, &req.group)?;
    let queue = QueueId(req.queue_id);
    let reset = req.member == 0 && req.epoch == 0;
    if cfg.delivery != Delivery::Queue {
        if !reset {
            return Err(herr(
                ErrorCode::InvalidArgument,
                format!("group `{}` uses message delivery: ack messages", req.group),
            ));
        }
        return reset_window(shard, gid, queue, req.offset).await;
    }
    let broadcast = cfg.mode == crate::group::config::GroupMode::Broadcast;
    if reset && !broadcast {
        if let Some((m, _)) = shard.groups.holders.borrow().get(&(gid, queue)) {
            return Err(herr(
                ErrorCode::InvalidArgument,
                format!(
                    "member {m} holds queue id {}: stop the group's members before a reset",
                    queue.0
                ),
            ));
        }
    }
    if broadcast {
        if req.instance.is_empty() || req.instance.len() > INSTANCE_ID_BYTES_MAX {
            return Err(herr(
                ErrorCode::InvalidArgument,
                format!(
                    "a broadcast commit names its instance (1 to {INSTANCE_ID_BYTES_MAX} bytes)"
                ),
            ));
        }
    } else if !reset
        && shard.groups.holders.borrow().get(&(gid, queue)) != Some(&(req.member, req.epoch))
    {
        return Err(herr(
            ErrorCode::StaleGeneration,
            format!(
                "member {} under epoch {} does not hold queue id {}: its assignment moved",
                req.member, req.epoch, req.queue_id
            ),
        ));
    }
    let (topic, level) = {
        let meta = shard.metadata.borrow();
        let (topic, index) = meta
            .locate(queue)
            .ok_or_else(|| herr(ErrorCode::UnknownQueue, format!("no queue id {}", queue.0)))?;
        let route = meta.route(topic, index)?;
        if !cfg.subscriptions.iter().any(|s| s.topic == topic) {
            return Err(herr(
                ErrorCode::InvalidArgument,
                format!("group `{}` does not subscribe to `{topic}`", req.group),
            ));
        }
        (topic.to_owned(), cfg.durability.unwrap_or(route.durability))
    };
    let _ = topic;
    wait_room(shard, 512).await?;
    let instance = if broadcast { req.instance.as_str() } else { "" };
    let entry = shard
        .groups
        .commit(
            &req.group,
            queue,
            instance,
            req.offset,
            shard.config.limits.group_offsets_max,
        )
        .map_err(|e| herr(ErrorCode::InvalidArgument, e.to_string()))?;
    if let Some(r) = shard
        .groups
        .append_waiting(&shard.store, &[entry], level, SETTLE_WAIT_MAX)
        .await?
    {
        shard.store.wait_durable(&r, level).await?;
    }
    Ok(Vec::new())
}

/// An operator's reset of a message-delivery queue: a fresh window at
/// `offset` (leases out now become stale; their messages below `offset`
/// are finished, those above delivered again).
async fn reset_window(shard: &Rc<Shard>, gid: GroupId, queue: QueueId, offset: u64) -> HResult {
    use crate::group::entry::Entry;
    let o = shard.store.offsets(queue)?;
    if offset > o.latest {
        return Err(herr(
            ErrorCode::OffsetOutOfRange,
            format!("offset {offset} is past the queue's latest {}", o.latest),
        ));
    }
    wait_room(shard, 4096).await?;
    let done = shard.groups.with_window(gid, queue, |w| {
        let mut fresh = crate::group::window::DeliveryWindow::new(
            w.w.config().clone(),
            offset,
            w.w.next_lease(),
        );
        fresh.advance(now_ms());
        w.w = fresh;
        (w.w.snapshot(), w.level)
    });
    let Some((snapshot, level)) = done else {
        return Err(herr(
            ErrorCode::UnknownQueue,
            format!("the group does not consume queue id {}", queue.0),
        ));
    };
    let entry = Entry::Snapshot {
        group: gid,
        queue,
        snapshot,
    };
    if let Some(r) = shard
        .groups
        .append_waiting(&shard.store, &[entry], level, SETTLE_WAIT_MAX)
        .await?
    {
        shard.store.wait_durable(&r, level).await?;
    }
    shard.groups.ready.advance(shard.groups.ready.get() + 1);
    Ok(Vec::new())
}

pub(super) fn group_fetch_offset(shard: &Shard, body: Bytes) -> HResult {
    let req = GroupCommitRequest::decode(body)?;
    let (_, cfg) = group_by_name(shard, &req.group)?;
    let broadcast = cfg.mode == crate::group::config::GroupMode::Broadcast;
    let instance = if broadcast { req.instance.as_str() } else { "" };
    let v = shard
        .groups
        .offset(&req.group, QueueId(req.queue_id), instance);
    Ok(body_of(|b| encode_opt_u64(b, v)))
}
