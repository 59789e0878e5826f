//! Topic handlers: metadata, create, delete, describe, queue offsets.

use super::*;

pub(super) fn metadata(shard: &Shard, body: Bytes) -> HResult {
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
pub(super) async fn publish_metadata(shard: &Rc<Shard>, new: Metadata) -> Result<(), HandlerError> {
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
pub(super) async fn change_metadata<T>(
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

pub(super) async fn create_topic(shard: &Rc<Shard>, body: Bytes) -> HResult {
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

pub(super) async fn delete_topic(shard: &Rc<Shard>, body: Bytes) -> HResult {
    let req = TopicRequest::decode(body)?;
    change_metadata(shard, |m| m.delete_topic(&req.name)).await?;
    tracing::info!(topic = %req.name, "deleted topic");
    Ok(Vec::new())
}

pub(super) fn apply_metadata(shard: &Shard, body: Bytes) -> HResult {
    let text = std::str::from_utf8(&body)
        .map_err(|_| herr(ErrorCode::Malformed, "metadata is not UTF-8"))?;
    let new = Metadata::from_json(text).map_err(|e| herr(ErrorCode::Malformed, e))?;
    shard.apply_metadata(new);
    Ok(Vec::new())
}

pub(super) fn queue_offsets(shard: &Shard, body: Bytes) -> HResult {
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

pub(super) async fn describe_topic(shard: &Rc<Shard>, body: Bytes) -> HResult {
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
