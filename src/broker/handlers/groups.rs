//! Consumer-group handlers: offset commit and fetch.

use super::*;

pub(super) fn group_offset(shard: &Shard, body: Bytes, commit: bool) -> HResult {
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
