//! Workloads: from flags, or from an OpenMessaging Benchmark workload file.

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// Durability of the benchmark topics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Memory,
    Written,
    Fsync,
}

impl Level {
    pub fn parse(s: &str) -> Result<Level> {
        Ok(match s {
            "memory" => Level::Memory,
            "written" => Level::Written,
            "fsync" => Level::Fsync,
            _ => bail!("--durability must be memory, written or fsync, not '{s}'"),
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Level::Memory => "memory",
            Level::Written => "written",
            Level::Fsync => "fsync",
        }
    }
}

/// How the consumers consume, when as a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GroupMode {
    /// Any member receives any message and acks each ("pop").
    Message,
    /// One member per queue, offsets committed.
    Queue,
    /// Every member (instance) reads every queue, offsets per instance.
    Broadcast,
}

impl GroupMode {
    pub fn name(self) -> &'static str {
        match self {
            GroupMode::Message => "message",
            GroupMode::Queue => "queue",
            GroupMode::Broadcast => "broadcast",
        }
    }
}

/// What to run.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    pub name: String,
    pub topics: u32,
    pub queues: u32,
    pub size: usize,
    /// Messages per second over all producers; `None` = as fast as possible.
    pub rate: Option<f64>,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub producers: u32,
    /// Consumers per topic (one subscription).
    pub consumers: u32,
    pub batch_max: usize,
    pub linger_us: u64,
    pub durability: Level,
    /// Distinct keys messages are spread over (0: no keys, queues round-robin).
    pub keys: u32,
    /// Consume as one consumer group instead of by offset.
    pub group: Option<GroupMode>,
    /// Message delivery: the share of deliveries nacked (retried after
    /// `nack_delay_ms`; never a third time).
    pub nack_ratio: f64,
    pub nack_delay_ms: u64,
    /// Message delivery: the broker pushes (credit-based) instead of long
    /// polls.
    pub push: bool,
    /// Consume-only: produce this many messages at full speed before the
    /// consumers start, then measure how fast they drain it (0: off).
    pub backlog: u64,
    /// Scheduled burst: produce this many messages as fast as possible,
    /// all due at the run's start + `shape.due`'s delay (and spread), while
    /// the consumers wait for them (0: off).
    pub due_burst: u64,
    /// Due times, priorities and filter of the messages.
    pub shape: crate::shape::Shape,
    /// Message delivery: the members together take at most this many
    /// messages a second (`None`: as fast as they can).
    pub consume_rate: Option<f64>,
}

/// The OpenMessaging Benchmark workload format (the fields KeelMQ uses).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OmbWorkload {
    name: Option<String>,
    topics: u32,
    partitions_per_topic: u32,
    message_size: usize,
    producer_rate: f64,
    #[serde(default = "one")]
    subscriptions_per_topic: u32,
    #[serde(default = "one")]
    consumer_per_subscription: u32,
    #[serde(default)]
    producers_per_topic: Option<u32>,
    #[serde(default)]
    key_distributor: Option<String>,
    test_duration_minutes: f64,
    #[serde(default)]
    warmup_duration_minutes: f64,
}

fn one() -> u32 {
    1
}

impl Workload {
    /// Reads an OMB workload (YAML, which includes JSON).
    pub fn from_omb(
        text: &str,
        durability: Level,
        batch_max: usize,
        linger_us: u64,
    ) -> Result<Workload> {
        let w: OmbWorkload =
            serde_yaml::from_str(text).context("not an OpenMessaging Benchmark workload")?;
        if w.subscriptions_per_topic > 1 {
            bail!("subscriptionsPerTopic > 1 needs consumer groups (not yet in KeelMQ)");
        }
        if w.topics == 0 || w.partitions_per_topic == 0 || w.message_size < 24 {
            bail!("topics and partitionsPerTopic must be > 0 and messageSize >= 24");
        }
        let keys = match w.key_distributor.as_deref() {
            None | Some("NO_KEY") => 0,
            Some(_) => 10_000,
        };
        Ok(Workload {
            name: w.name.unwrap_or_else(|| "omb".into()),
            topics: w.topics,
            queues: w.partitions_per_topic,
            size: w.message_size,
            rate: (w.producer_rate > 0.0).then_some(w.producer_rate),
            duration_s: w.test_duration_minutes * 60.0,
            warmup_s: w.warmup_duration_minutes * 60.0,
            producers: w.producers_per_topic.unwrap_or(1).max(1) * w.topics,
            consumers: w.consumer_per_subscription.max(1),
            batch_max,
            linger_us,
            durability,
            keys,
            group: None,
            nack_ratio: 0.0,
            push: false,
            nack_delay_ms: 100,
            backlog: 0,
            due_burst: 0,
            shape: crate::shape::Shape::default(),
            consume_rate: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn omb_workload_maps_to_ours() {
        let text = "name: 1 topic / 16 partitions / 100b\ntopics: 1\npartitionsPerTopic: 16\nmessageSize: 100\nsubscriptionsPerTopic: 1\nconsumerPerSubscription: 1\nproducerRate: 50000\ntestDurationMinutes: 1\nwarmupDurationMinutes: 0.5\n";
        let w = Workload::from_omb(text, Level::Written, 100, 0).unwrap();
        assert_eq!(w.queues, 16);
        assert_eq!(w.size, 100);
        assert_eq!(w.rate, Some(50_000.0));
        assert_eq!(w.duration_s, 60.0);
        assert_eq!(w.warmup_s, 30.0);
        assert!(Workload::from_omb("topics: 1\n", Level::Memory, 1, 0).is_err());
    }

    #[test]
    fn shipped_workloads_parse() {
        for text in [
            include_str!("../workloads/1-topic-1-partition-100b.yaml"),
            include_str!("../workloads/1-topic-16-partitions-1kb.yaml"),
            include_str!("../workloads/max-rate-100b-keys.yaml"),
        ] {
            let w = Workload::from_omb(text, Level::Written, 1000, 0).unwrap();
            assert!(w.duration_s > 0.0);
        }
    }
}
