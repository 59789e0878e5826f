//! Broker metadata: topics, their queues, the stable queue → shard
//! mapping, and consumer groups (their settings, ids and coordinator
//! shard). Shard 0 owns the authoritative copy and persists it
//! (`metadata.json` in the data directory, written atomically); every other
//! shard holds a copy updated over the mesh. Pure logic, no I/O beyond the
//! load and store helpers.

use crate::group::config::GroupConfig;
use crate::ids::{GroupId, QueueId, QueueIndex, ShardId};
use crate::protocol::{Durability, QueueInfo, TopicInfo};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// File name of the metadata in the data directory.
pub const METADATA_FILE: &str = "metadata.json";
/// Format of a data directory (metadata and logs) this version reads and
/// writes. 2: segment header pages, keyed batch MACs, two-slot checkpoints,
/// index snapshots.
pub const DATA_FORMAT: u32 = 2;
pub use crate::ids::TOPIC_NAME_BYTES_MAX;

/// Why a metadata change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    #[error("invalid topic name '{0}': use 1-200 characters from A-Z a-z 0-9 . _ -")]
    InvalidName(String),
    #[error("topic '{0}' already exists")]
    Exists(String),
    #[error("unknown topic '{0}'")]
    UnknownTopic(String),
    #[error("topic '{topic}' has {queues} queues; queue {queue} does not exist")]
    UnknownQueue {
        topic: String,
        queue: u32,
        queues: u32,
    },
    #[error("queue count {0} is outside 1..={1}")]
    QueueCount(u32, u32),
    #[error("the broker holds {0} topics, limits.topics_max")]
    TooManyTopics(u32),
    #[error("{queues} more queues would exceed limits.queues_max ({max}) for the broker")]
    TooManyQueues { queues: u32, max: u32 },
    #[error("queue ids are exhausted: the broker hands out each id once (4,294,967,295 in all)")]
    QueueIdsExhausted,
    #[error("group '{0}' already exists")]
    GroupExists(String),
    #[error("unknown group '{0}'")]
    UnknownGroup(String),
    #[error("the broker holds {GROUPS_MAX} groups, the most it may")]
    TooManyGroups,
    #[error("group ids are exhausted: the broker hands out each id once")]
    GroupIdsExhausted,
    #[error("group '{group}' subscribes to unknown topic '{topic}'")]
    UnknownSubscription { group: String, topic: String },
    #[error(transparent)]
    Group(#[from] crate::group::config::GroupConfigError),
}

/// Most consumer groups one broker holds.
pub const GROUPS_MAX: usize = 10_000;

/// A consumer group's stored definition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMeta {
    /// Broker-wide id, handed out once.
    pub id: u32,
    pub config: GroupConfig,
    pub created_ms: i64,
}

/// Limits a topic creation is checked against.
#[derive(Clone, Copy, Debug)]
pub struct TopicLimits {
    pub topic_queues_max: u32,
    pub topics_max: u32,
    pub queues_max: u32,
}

/// A topic's stored definition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicMeta {
    pub durability: Durability,
    /// Queue `i` of the topic: (broker-wide queue id, owning shard).
    pub queues: Vec<(u32, u16)>,
    pub created_ms: i64,
}

/// The whole metadata document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// Format version of this document.
    pub format: u32,
    /// Shards the data directory was created with; fixed for its lifetime.
    pub shard_count: u16,
    /// Next queue id to hand out; ids are never reused.
    pub next_queue_id: u32,
    /// Bumped on every change.
    pub epoch: u64,
    pub topics: BTreeMap<String, TopicMeta>,
    /// Next group id to hand out; ids are never reused.
    #[serde(default = "first_group_id")]
    pub next_group_id: u32,
    #[serde(default)]
    pub groups: BTreeMap<String, GroupMeta>,
    /// queue id → (topic, queue index); derived, rebuilt on load.
    #[serde(skip)]
    by_queue_id: HashMap<u32, (String, u32)>,
}

/// Where one queue lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueRoute {
    pub queue_id: QueueId,
    pub shard: u16,
    pub durability: Durability,
    pub queue_count: u32,
}

fn valid_name(name: &str) -> bool {
    crate::ids::is_valid_name(name, TOPIC_NAME_BYTES_MAX)
}

impl Metadata {
    /// Empty metadata for a new data directory.
    pub fn new(shard_count: u16) -> Metadata {
        Metadata {
            format: DATA_FORMAT,
            shard_count,
            next_queue_id: 1,
            epoch: 0,
            topics: BTreeMap::new(),
            next_group_id: first_group_id(),
            groups: BTreeMap::new(),
            by_queue_id: HashMap::new(),
        }
    }

    /// Creates a consumer group (validated; its topics must exist).
    pub fn create_group(
        &mut self,
        config: GroupConfig,
        now_ms: i64,
    ) -> Result<GroupId, MetadataError> {
        config.validate()?;
        if self.groups.contains_key(&config.name) {
            return Err(MetadataError::GroupExists(config.name));
        }
        if self.groups.len() >= GROUPS_MAX {
            return Err(MetadataError::TooManyGroups);
        }
        if let Some(s) = config
            .subscriptions
            .iter()
            .find(|s| !self.topics.contains_key(&s.topic))
        {
            return Err(MetadataError::UnknownSubscription {
                group: config.name.clone(),
                topic: s.topic.clone(),
            });
        }
        let id = self.next_group_id;
        self.next_group_id = id.checked_add(1).ok_or(MetadataError::GroupIdsExhausted)?;
        self.epoch += 1;
        self.groups.insert(
            config.name.clone(),
            GroupMeta {
                id,
                config,
                created_ms: now_ms,
            },
        );
        Ok(GroupId(id))
    }

    /// Deletes a consumer group; its id is never handed out again.
    pub fn delete_group(&mut self, name: &str) -> Result<GroupMeta, MetadataError> {
        let g = self
            .groups
            .remove(name)
            .ok_or_else(|| MetadataError::UnknownGroup(name.to_owned()))?;
        self.epoch += 1;
        Ok(g)
    }

    /// The shard that coordinates a group's membership: stable for its
    /// name and the broker's shard count.
    pub fn coordinator_of(&self, group: &str) -> ShardId {
        ShardId(queue_for_key(group.as_bytes(), u32::from(self.shard_count)).0 as u16)
    }

    fn reindex(&mut self) {
        self.by_queue_id = self
            .topics
            .iter()
            .flat_map(|(name, t)| {
                t.queues
                    .iter()
                    .enumerate()
                    .map(move |(i, (id, _))| (*id, (name.clone(), i as u32)))
            })
            .collect();
    }

    /// Parses a stored document.
    pub fn from_json(text: &str) -> Result<Metadata, String> {
        let mut m: Metadata = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if m.format != DATA_FORMAT {
            return Err(format!(
                "written in data format {}, and this KeelMQ reads format {DATA_FORMAT} (its logs are not readable here): move the data directory aside or start with an empty --data-dir",
                m.format
            ));
        }
        m.reindex();
        Ok(m)
    }

    /// Serialises for storage and for the mesh.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("metadata serialises")
    }

    /// Loads `metadata.json` from `data_dir`, if present (blocking).
    pub fn load(data_dir: &Path) -> Result<Option<Metadata>, String> {
        let path = data_dir.join(METADATA_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => Metadata::from_json(&text)
                .map(Some)
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Stores atomically and durably (blocking).
    pub fn store(&self, data_dir: &Path) -> std::io::Result<()> {
        crate::storage::write_atomic(data_dir, METADATA_FILE, self.to_json().as_bytes())
    }

    /// Creates a topic, spreading its queues over the least-loaded shards.
    /// Queue ids are handed out once, never wrapping: when the `u32` space
    /// is used up, creation is refused.
    pub fn create_topic(
        &mut self,
        name: &str,
        queues: u32,
        durability: Durability,
        limits: TopicLimits,
        now_ms: i64,
    ) -> Result<TopicInfo, MetadataError> {
        let dlq = name
            .strip_prefix(crate::group::config::DLQ_TOPIC_PREFIX)
            .is_some_and(|g| self.groups.contains_key(g));
        if !valid_name(name) && !dlq {
            return Err(MetadataError::InvalidName(name.to_owned()));
        }
        if self.topics.contains_key(name) {
            return Err(MetadataError::Exists(name.to_owned()));
        }
        if queues == 0 || queues > limits.topic_queues_max {
            return Err(MetadataError::QueueCount(queues, limits.topic_queues_max));
        }
        if self.topics.len() as u64 >= u64::from(limits.topics_max) {
            return Err(MetadataError::TooManyTopics(limits.topics_max));
        }
        let held: u64 = self.topics.values().map(|t| t.queues.len() as u64).sum();
        if held + u64::from(queues) > u64::from(limits.queues_max) {
            return Err(MetadataError::TooManyQueues {
                queues,
                max: limits.queues_max,
            });
        }
        if self.next_queue_id.checked_add(queues).is_none() {
            return Err(MetadataError::QueueIdsExhausted);
        }
        let mut load = vec![0u64; self.shard_count as usize];
        for t in self.topics.values() {
            for (_, s) in &t.queues {
                load[*s as usize] += 1;
            }
        }
        let mut assigned = Vec::with_capacity(queues as usize);
        for _ in 0..queues {
            let shard = (0..load.len())
                .min_by_key(|&s| (load[s], s))
                .expect("at least one shard");
            load[shard] += 1;
            assigned.push((self.next_queue_id, shard as u16));
            self.next_queue_id += 1;
        }
        self.topics.insert(
            name.to_owned(),
            TopicMeta {
                durability,
                queues: assigned,
                created_ms: now_ms,
            },
        );
        self.epoch += 1;
        self.reindex();
        Ok(self.topic_info(name).expect("just created"))
    }

    /// Creates a group's dead-letter topic `%DLQ%<group>` (one queue) unless
    /// it exists; `%` names are refused to anyone else.
    pub fn ensure_dlq_topic(
        &mut self,
        group: &str,
        durability: Durability,
        limits: TopicLimits,
        now_ms: i64,
    ) -> Result<(), MetadataError> {
        let name = format!("{}{group}", crate::group::config::DLQ_TOPIC_PREFIX);
        if self.topics.contains_key(&name) {
            return Ok(());
        }
        self.create_topic(&name, 1, durability, limits, now_ms)
            .map(|_| ())
    }

    /// Deletes a topic; returns its queue ids.
    pub fn delete_topic(&mut self, name: &str) -> Result<Vec<(u32, u16)>, MetadataError> {
        let t = self
            .topics
            .remove(name)
            .ok_or_else(|| MetadataError::UnknownTopic(name.to_owned()))?;
        self.epoch += 1;
        self.reindex();
        Ok(t.queues)
    }

    /// The wire description of a topic.
    pub fn topic_info(&self, name: &str) -> Option<TopicInfo> {
        self.topics.get(name).map(|t| TopicInfo {
            name: name.to_owned(),
            durability: t.durability,
            queues: t
                .queues
                .iter()
                .map(|&(queue_id, shard)| QueueInfo { queue_id, shard })
                .collect(),
        })
    }

    /// Routes (topic, queue index) to its queue.
    pub fn route(&self, topic: &str, queue: QueueIndex) -> Result<QueueRoute, MetadataError> {
        let t = self
            .topics
            .get(topic)
            .ok_or_else(|| MetadataError::UnknownTopic(topic.to_owned()))?;
        let &(queue_id, shard) =
            t.queues
                .get(queue.0 as usize)
                .ok_or(MetadataError::UnknownQueue {
                    topic: topic.to_owned(),
                    queue: queue.0,
                    queues: t.queues.len() as u32,
                })?;
        Ok(QueueRoute {
            queue_id: QueueId(queue_id),
            shard,
            durability: t.durability,
            queue_count: t.queues.len() as u32,
        })
    }

    /// Queue `i` of a topic: (broker-wide queue id, owning shard).
    pub fn queues(&self, topic: &str) -> Result<Vec<(QueueId, ShardId)>, MetadataError> {
        self.topics
            .get(topic)
            .map(|t| {
                t.queues
                    .iter()
                    .map(|&(q, s)| (QueueId(q), ShardId(s)))
                    .collect()
            })
            .ok_or_else(|| MetadataError::UnknownTopic(topic.to_owned()))
    }

    /// Number of queues of a topic.
    pub fn queue_count(&self, topic: &str) -> Result<u32, MetadataError> {
        self.topics
            .get(topic)
            .map(|t| t.queues.len() as u32)
            .ok_or_else(|| MetadataError::UnknownTopic(topic.to_owned()))
    }

    /// (topic, queue index) of a queue id.
    pub fn locate(&self, queue_id: QueueId) -> Option<(&str, QueueIndex)> {
        self.by_queue_id
            .get(&queue_id.0)
            .map(|(t, i)| (t.as_str(), QueueIndex(*i)))
    }

    /// Queue ids owned by `shard`.
    pub fn queues_of_shard(&self, shard: u16) -> Vec<QueueId> {
        self.topics
            .values()
            .flat_map(|t| t.queues.iter())
            .filter(|(_, s)| *s == shard)
            .map(|(id, _)| QueueId(*id))
            .collect()
    }
}

fn first_group_id() -> u32 {
    1
}

/// The queue a routing key maps to: CRC32 of the key, modulo the count.
/// Clients may compute it to reach the owning shard directly.
pub fn queue_for_key(key: &[u8], queue_count: u32) -> QueueIndex {
    QueueIndex(crc32fast::hash(key) % queue_count.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: TopicLimits = TopicLimits {
        topic_queues_max: 100,
        topics_max: 100,
        queues_max: 1000,
    };

    #[test]
    fn queue_ids_never_wrap_and_the_broker_limits_hold() {
        let mut m = Metadata::new(1);
        m.next_queue_id = u32::MAX - 3;
        m.create_topic("a", 2, Durability::Fsync, L, 0).unwrap();
        assert_eq!(
            m.create_topic("b", 2, Durability::Fsync, L, 0),
            Err(MetadataError::QueueIdsExhausted),
            "ids would wrap to 0 and alias old batches"
        );
        m.create_topic("c", 1, Durability::Fsync, L, 0).unwrap();
        let small = TopicLimits {
            topic_queues_max: 10,
            topics_max: 3,
            queues_max: 5,
        };
        let mut m = Metadata::new(1);
        m.create_topic("a", 4, Durability::Fsync, small, 0).unwrap();
        assert!(matches!(
            m.create_topic("b", 2, Durability::Fsync, small, 0),
            Err(MetadataError::TooManyQueues { .. })
        ));
        m.create_topic("b", 1, Durability::Fsync, small, 0).unwrap();
        m.create_topic(
            "c",
            1,
            Durability::Fsync,
            TopicLimits {
                queues_max: 100,
                ..small
            },
            0,
        )
        .unwrap();
        assert_eq!(
            m.create_topic(
                "d",
                1,
                Durability::Fsync,
                TopicLimits {
                    queues_max: 100,
                    ..small
                },
                0
            ),
            Err(MetadataError::TooManyTopics(3))
        );
    }

    #[test]
    fn queues_spread_evenly_and_ids_are_never_reused() {
        let mut m = Metadata::new(2);
        let t = m
            .create_topic(
                "a",
                3,
                Durability::Fsync,
                TopicLimits {
                    topic_queues_max: 100,
                    ..L
                },
                0,
            )
            .unwrap();
        let shards: Vec<u16> = t.queues.iter().map(|q| q.shard).collect();
        assert_eq!(shards, vec![0, 1, 0]);
        let t2 = m
            .create_topic(
                "b",
                3,
                Durability::Memory,
                TopicLimits {
                    topic_queues_max: 100,
                    ..L
                },
                0,
            )
            .unwrap();
        let shards: Vec<u16> = t2.queues.iter().map(|q| q.shard).collect();
        assert_eq!(shards, vec![1, 0, 1], "the lighter shard is filled first");
        let ids_a: Vec<u32> = t.queues.iter().map(|q| q.queue_id).collect();
        m.delete_topic("a").unwrap();
        let t3 = m
            .create_topic(
                "a",
                3,
                Durability::Fsync,
                TopicLimits {
                    topic_queues_max: 100,
                    ..L
                },
                0,
            )
            .unwrap();
        assert!(t3.queues.iter().all(|q| !ids_a.contains(&q.queue_id)));
        assert_eq!(
            m.locate(QueueId(t3.queues[2].queue_id)),
            Some(("a", QueueIndex(2)))
        );
        assert_eq!(m.locate(QueueId(ids_a[0])), None);
    }

    #[test]
    fn refusals_name_the_problem() {
        let mut m = Metadata::new(1);
        assert!(matches!(
            m.create_topic(
                "bad name",
                1,
                Durability::Fsync,
                TopicLimits {
                    topic_queues_max: 10,
                    ..L
                },
                0
            ),
            Err(MetadataError::InvalidName(_))
        ));
        assert!(matches!(
            m.create_topic(
                "",
                1,
                Durability::Fsync,
                TopicLimits {
                    topic_queues_max: 10,
                    ..L
                },
                0
            ),
            Err(MetadataError::InvalidName(_))
        ));
        assert_eq!(
            m.create_topic(
                "t",
                0,
                Durability::Fsync,
                TopicLimits {
                    topic_queues_max: 10,
                    ..L
                },
                0
            ),
            Err(MetadataError::QueueCount(0, 10))
        );
        assert_eq!(
            m.create_topic(
                "t",
                11,
                Durability::Fsync,
                TopicLimits {
                    topic_queues_max: 10,
                    ..L
                },
                0
            ),
            Err(MetadataError::QueueCount(11, 10))
        );
        m.create_topic(
            "t",
            2,
            Durability::Fsync,
            TopicLimits {
                topic_queues_max: 10,
                ..L
            },
            0,
        )
        .unwrap();
        assert_eq!(
            m.create_topic(
                "t",
                2,
                Durability::Fsync,
                TopicLimits {
                    topic_queues_max: 10,
                    ..L
                },
                0
            ),
            Err(MetadataError::Exists("t".into()))
        );
        assert!(matches!(
            m.route("t", QueueIndex(2)),
            Err(MetadataError::UnknownQueue { .. })
        ));
        assert!(matches!(
            m.route("u", QueueIndex(0)),
            Err(MetadataError::UnknownTopic(_))
        ));
        assert!(m.delete_topic("u").is_err());
    }

    #[test]
    fn a_data_dir_of_another_format_is_refused_with_what_to_do() {
        let mut m = Metadata::new(1);
        m.format = 1;
        let err = Metadata::from_json(&m.to_json()).unwrap_err();
        assert!(err.contains("data format 1"), "{err}");
        assert!(err.contains("empty --data-dir"), "{err}");
    }

    #[test]
    fn json_round_trip_rebuilds_the_queue_index() {
        let mut m = Metadata::new(2);
        m.create_topic(
            "x",
            4,
            Durability::Written,
            TopicLimits {
                topic_queues_max: 10,
                ..L
            },
            5,
        )
        .unwrap();
        let back = Metadata::from_json(&m.to_json()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.locate(QueueId(3)), Some(("x", QueueIndex(2))));
        let dir = tempfile::tempdir().unwrap();
        m.store(dir.path()).unwrap();
        assert_eq!(Metadata::load(dir.path()).unwrap(), Some(m));
    }

    #[test]
    fn groups_are_created_once_with_ids_never_reused_and_checked_subscriptions() {
        use crate::group::config::{GroupConfigError, Subscription};
        let mut m = Metadata::new(2);
        m.create_topic("orders", 2, Durability::Fsync, L, 0)
            .unwrap();
        let sub = |t: &str| Subscription {
            topic: t.into(),
            filter: "*".into(),
            filter_type: Default::default(),
        };
        let g = GroupConfig::new("risk", vec![sub("orders")]);
        let id = m.create_group(g.clone(), 5).unwrap();
        assert_eq!(id, GroupId(1));
        assert_eq!(
            m.create_group(g.clone(), 6),
            Err(MetadataError::GroupExists("risk".into()))
        );
        assert_eq!(
            m.create_group(GroupConfig::new("x", vec![sub("nope")]), 6),
            Err(MetadataError::UnknownSubscription {
                group: "x".into(),
                topic: "nope".into()
            })
        );
        assert_eq!(
            m.create_group(GroupConfig::new("x", vec![]), 6),
            Err(MetadataError::Group(GroupConfigError::Subscriptions(0)))
        );
        m.delete_group("risk").unwrap();
        assert_eq!(
            m.delete_group("risk"),
            Err(MetadataError::UnknownGroup("risk".into()))
        );
        assert_eq!(
            m.create_group(g, 7).unwrap(),
            GroupId(2),
            "ids are not reused"
        );
        // Persisted, and a document from before groups still loads.
        let back = Metadata::from_json(&m.to_json()).unwrap();
        assert_eq!(back.groups, m.groups);
        assert_eq!(back.next_group_id, 3);
        let mut old: serde_json::Value = serde_json::from_str(&m.to_json()).unwrap();
        old.as_object_mut().unwrap().remove("groups");
        old.as_object_mut().unwrap().remove("next_group_id");
        let old = Metadata::from_json(&old.to_string()).unwrap();
        assert!(old.groups.is_empty());
        assert_eq!(old.next_group_id, 1);
        // The coordinator is stable and within the shards.
        assert_eq!(m.coordinator_of("risk"), back.coordinator_of("risk"));
        assert!(m.coordinator_of("risk").0 < 2);
    }

    #[test]
    fn key_hash_is_stable() {
        assert_eq!(
            queue_for_key(b"order-42", 8),
            QueueIndex(crc32fast::hash(b"order-42") % 8)
        );
        assert!(queue_for_key(b"", 3).0 < 3);
    }
}
