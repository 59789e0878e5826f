//! Admin handlers: stats.

use super::*;

pub(super) fn body_json(v: &serde_json::Value) -> Vec<Bytes> {
    vec![Bytes::from(v.to_string())]
}

/// This shard's stats as JSON.
pub fn shard_stats(shard: &Shard) -> serde_json::Value {
    let m = shard.metrics.borrow();
    let log = shard.store.log();
    let (write_us, fsync_us) = log.latency_histograms();
    let (append_written_us, written_synced_us) = log.stage_histograms();
    let segments = log.segments();
    serde_json::json!({
        "shard": shard.id,
        "queues": shard.metadata.borrow().queues_of_shard(shard.id).len(),
        "counters": m.counters_json(),
        "append_latency": histogram_json(&m.append_us),
        "redelivery_lateness": crate::shard::metrics::histogram_ms_json(&m.redelivery_lateness_ms),
        "redelivery_fire_lateness": crate::shard::metrics::histogram_ms_json(&m.redelivery_fire_lateness_ms),
        "schedule": shard.timer.stats_json(),
        "write_latency": histogram_json(&write_us),
        "fsync_latency": histogram_json(&fsync_us),
        "append_written_latency": histogram_json(&append_written_us),
        "written_synced_latency": histogram_json(&written_synced_us),
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

pub(super) async fn stats(shard: &Rc<Shard>) -> HResult {
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
    // How the executors slept: sleeps that ran to the reactor's 1 ms bound
    // with completions waiting are wake-ups glommio's ring link lost
    // (`vendor/glommio/PATCHES.md`).
    let (sleeps, bounded, lost) = glommio::reactor_sleep_stats();
    let doc = serde_json::json!({
        "broker_version": env!("CARGO_PKG_VERSION"),
        "shard_count": shard.shard_count,
        "topics": shard.metadata.borrow().topics.len(),
        "reactor": {"sleeps": sleeps, "sleeps_to_bound": bounded, "lost_wakeups": lost},
        "shards": shards,
    });
    Ok(body_json(&doc))
}
