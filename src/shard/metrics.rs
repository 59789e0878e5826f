//! Per-shard counters and latency histograms, served by the stats
//! operation. Single-threaded: each shard owns its own.

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// Counters of one shard.
pub struct ShardMetrics {
    pub messages_in: u64,
    pub bytes_in: u64,
    pub messages_out: u64,
    pub bytes_out: u64,
    pub produce_requests: u64,
    pub fetch_requests: u64,
    pub forwarded_requests: u64,
    pub errors: u64,
    pub connections_open: u64,
    pub connections_total: u64,
    /// Connections refused at `connections_max`.
    pub connections_refused: u64,
    /// Connections closed for a missed first-frame deadline or idleness.
    pub connections_timed_out: u64,
    /// Produce receipt → durability level reached, µs.
    pub append_us: Histogram<u64>,
    /// Group deliveries (receive), redeliveries among them, acks, nacks,
    /// dead letters stored.
    pub group_deliveries: u64,
    pub group_redeliveries: u64,
    /// Frames pushed to subscriptions.
    pub push_frames: u64,
    /// Messages leased for a subscription that had stopped, handed back.
    pub push_handed_back: u64,
    pub group_acks: u64,
    pub group_nacks: u64,
    pub group_dead_letters: u64,
    /// A redelivery's receive time − the time it became due, ms (the
    /// broker's clock; a redelivery waits for a receive to ask).
    pub redelivery_lateness_ms: Histogram<u64>,
    /// Group timers (redeliveries, invisible times running out): how long
    /// after its due time each fired, ms (the timer's own precision; the
    /// redelivery itself waits for a receive).
    pub redelivery_fire_lateness_ms: Histogram<u64>,
}

impl Default for ShardMetrics {
    fn default() -> Self {
        ShardMetrics {
            messages_in: 0,
            bytes_in: 0,
            messages_out: 0,
            bytes_out: 0,
            produce_requests: 0,
            fetch_requests: 0,
            forwarded_requests: 0,
            errors: 0,
            connections_open: 0,
            connections_total: 0,
            connections_refused: 0,
            connections_timed_out: 0,
            append_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds"),
            group_deliveries: 0,
            group_redeliveries: 0,
            push_frames: 0,
            push_handed_back: 0,
            group_acks: 0,
            group_nacks: 0,
            group_dead_letters: 0,
            redelivery_lateness_ms: Histogram::new_with_bounds(1, 86_400_000, 2)
                .expect("static bounds"),
            redelivery_fire_lateness_ms: Histogram::new_with_bounds(1, 86_400_000, 2)
                .expect("static bounds"),
        }
    }
}

/// Summary of a histogram in milliseconds.
pub fn histogram_ms_json(h: &Histogram<u64>) -> Value {
    json!({
        "count": h.len(),
        "p50_ms": h.value_at_quantile(0.50),
        "p99_ms": h.value_at_quantile(0.99),
        "p999_ms": h.value_at_quantile(0.999),
        "max_ms": h.max(),
    })
}

/// Summary of a latency histogram in microseconds.
pub fn histogram_json(h: &Histogram<u64>) -> Value {
    json!({
        "count": h.len(),
        "p50_us": h.value_at_quantile(0.50),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
        "max_us": h.max(),
    })
}

impl ShardMetrics {
    /// The counters as JSON.
    pub fn counters_json(&self) -> Value {
        json!({
            "messages_in": self.messages_in,
            "bytes_in": self.bytes_in,
            "messages_out": self.messages_out,
            "bytes_out": self.bytes_out,
            "produce_requests": self.produce_requests,
            "fetch_requests": self.fetch_requests,
            "forwarded_requests": self.forwarded_requests,
            "errors": self.errors,
            "connections_open": self.connections_open,
            "connections_total": self.connections_total,
            "connections_refused": self.connections_refused,
            "connections_timed_out": self.connections_timed_out,
            "group_deliveries": self.group_deliveries,
            "group_redeliveries": self.group_redeliveries,
            "push_frames": self.push_frames,
            "push_handed_back": self.push_handed_back,
            "group_acks": self.group_acks,
            "group_nacks": self.group_nacks,
            "group_dead_letters": self.group_dead_letters,
        })
    }
}
