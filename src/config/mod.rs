//! Broker configuration: embedded defaults, then a tuning profile, then a
//! TOML file, then command-line flags, each overriding the one before.
//! Unknown keys and bad values are errors that name the key.

use crate::protocol::Durability;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The tuning profiles shipped in `tuning/`, embedded so `--profile NAME`
/// works wherever the binary runs.
pub const PROFILES: [(&str, &str); 3] = [
    ("low-latency", include_str!("../../tuning/low-latency.toml")),
    ("throughput", include_str!("../../tuning/throughput.toml")),
    ("durable", include_str!("../../tuning/durable.toml")),
];

/// Why a configuration could not be built.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("unknown profile '{0}' (known: low-latency, throughput, durable, or a path to a .toml file)")]
    UnknownProfile(String),
    #[error("bad value for {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// The complete broker configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub broker: BrokerConfig,
    pub limits: LimitsConfig,
    pub storage: StorageConfig,
    pub runtime: RuntimeConfig,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BrokerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Shards to run; 0 means one per available core.
    pub shards: u16,
    /// Durability of topics created without one.
    pub durability_default: Durability,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LimitsConfig {
    pub frame_bytes_max: u32,
    pub batch_bytes_max: u32,
    pub fetch_bytes_max: u32,
    pub fetch_wait_ms_max: u32,
    pub in_flight_requests_max: u32,
    pub topic_queues_max: u32,
    pub connections_max: u32,
    /// Topics per broker.
    pub topics_max: u32,
    /// Queues per broker, over every topic.
    pub queues_max: u32,
    /// A connection with nothing in flight and nothing read for this long
    /// is closed (0: never).
    pub connection_idle_ms_max: u64,
    /// A connection must complete its first frame within this time.
    pub connection_first_frame_ms_max: u64,
    /// Reply bytes one connection may have owed (queued or being produced)
    /// before the broker stops reading its requests.
    pub connection_reply_bytes_max: u64,
    /// Committed group offsets per shard.
    pub group_offsets_max: u32,
    /// Furthest a scheduled message may be due, from when the broker takes
    /// it (at most `schedule::WHEEL_RANGE_MS`, about 782 days).
    pub schedule_delay_ms_max: u64,
    /// Scheduled messages pending per shard (each costs about 80 bytes of
    /// memory, never its payload); past it, scheduled produces get `busy`.
    pub scheduled_messages_max: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct StorageConfig {
    pub segment_bytes_max: u64,
    pub write_bytes_max: u32,
    pub tail_cache_bytes_max: u64,
    /// 0 keeps data forever (by age).
    pub retention_ms: u64,
    /// Per shard; 0 means no size limit.
    pub retention_bytes: u64,
    pub retention_check_interval_ms: u64,
    pub checkpoint_interval_ms: u64,
    /// Longest a memory-level append waits to share a write (0: at once).
    pub memory_write_delay_us: u64,
    /// Per shard: most bytes appended but not yet written (producers wait).
    pub memory_pending_bytes_max: u64,
    /// How long a producer waits for the disk to catch up before `busy`.
    pub memory_pending_wait_ms: u64,
    /// Per shard: most bytes written but not synced (0: derived, see
    /// [`Config::unsynced_bytes_max`]).
    pub unsynced_bytes_max: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RuntimeConfig {
    pub spin_before_park_us: u64,
    pub preempt_timer_us: u64,
    /// Per shard; 0 sizes it to fit RLIMIT_MEMLOCK.
    pub io_memory_bytes: u64,
    pub ring_depth: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            broker: BrokerConfig {
                listen: "127.0.0.1:7400".parse().unwrap(),
                data_dir: PathBuf::from("./keelmq-data"),
                shards: 0,
                durability_default: Durability::Fsync,
            },
            limits: LimitsConfig {
                frame_bytes_max: 8 << 20,
                batch_bytes_max: 4 << 20,
                fetch_bytes_max: 4 << 20,
                fetch_wait_ms_max: 30_000,
                in_flight_requests_max: 1024,
                topic_queues_max: 65_536,
                connections_max: 10_000,
                topics_max: 10_000,
                queues_max: 1_000_000,
                connection_idle_ms_max: 600_000,
                connection_first_frame_ms_max: 10_000,
                connection_reply_bytes_max: 64 << 20,
                group_offsets_max: 1_000_000,
                schedule_delay_ms_max: 365 * 24 * 3600 * 1000,
                scheduled_messages_max: 10_000_000,
            },
            storage: StorageConfig {
                segment_bytes_max: 1 << 30,
                write_bytes_max: 1 << 20,
                tail_cache_bytes_max: 64 << 20,
                retention_ms: 7 * 24 * 3600 * 1000,
                retention_bytes: 0,
                retention_check_interval_ms: 10_000,
                checkpoint_interval_ms: 1_000,
                memory_write_delay_us: 1_000,
                memory_pending_bytes_max: 64 << 20,
                memory_pending_wait_ms: 1_000,
                unsynced_bytes_max: 0,
            },
            runtime: RuntimeConfig {
                spin_before_park_us: 200,
                preempt_timer_us: 500,
                io_memory_bytes: 0,
                ring_depth: 256,
            },
        }
    }
}

/// The TOML shape: every field optional, unknown keys rejected.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    broker: Option<FileBroker>,
    limits: Option<FileLimits>,
    storage: Option<FileStorage>,
    runtime: Option<FileRuntime>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileBroker {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    shards: Option<u16>,
    durability_default: Option<Durability>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    frame_bytes_max: Option<u32>,
    batch_bytes_max: Option<u32>,
    fetch_bytes_max: Option<u32>,
    fetch_wait_ms_max: Option<u32>,
    in_flight_requests_max: Option<u32>,
    topic_queues_max: Option<u32>,
    connections_max: Option<u32>,
    topics_max: Option<u32>,
    queues_max: Option<u32>,
    connection_idle_ms_max: Option<u64>,
    connection_first_frame_ms_max: Option<u64>,
    connection_reply_bytes_max: Option<u64>,
    group_offsets_max: Option<u32>,
    schedule_delay_ms_max: Option<u64>,
    scheduled_messages_max: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileStorage {
    segment_bytes_max: Option<u64>,
    write_bytes_max: Option<u32>,
    tail_cache_bytes_max: Option<u64>,
    retention_ms: Option<u64>,
    retention_bytes: Option<u64>,
    retention_check_interval_ms: Option<u64>,
    checkpoint_interval_ms: Option<u64>,
    memory_write_delay_us: Option<u64>,
    memory_pending_bytes_max: Option<u64>,
    memory_pending_wait_ms: Option<u64>,
    unsynced_bytes_max: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileRuntime {
    spin_before_park_us: Option<u64>,
    preempt_timer_us: Option<u64>,
    io_memory_bytes: Option<u64>,
    ring_depth: Option<u32>,
}

macro_rules! set {
    ($dst:expr, $src:expr) => {
        if let Some(v) = $src {
            $dst = v;
        }
    };
}

impl Config {
    /// Applies a TOML document over this configuration. `origin` names the
    /// document in errors (a path or a profile name).
    pub fn apply_toml(&mut self, text: &str, origin: &str) -> Result<(), ConfigError> {
        let f: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_owned(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        if let Some(b) = f.broker {
            if let Some(l) = b.listen {
                self.broker.listen = parse_listen(&l)?;
            }
            set!(self.broker.data_dir, b.data_dir);
            set!(self.broker.shards, b.shards);
            set!(self.broker.durability_default, b.durability_default);
        }
        if let Some(l) = f.limits {
            set!(self.limits.frame_bytes_max, l.frame_bytes_max);
            set!(self.limits.batch_bytes_max, l.batch_bytes_max);
            set!(self.limits.fetch_bytes_max, l.fetch_bytes_max);
            set!(self.limits.fetch_wait_ms_max, l.fetch_wait_ms_max);
            set!(self.limits.in_flight_requests_max, l.in_flight_requests_max);
            set!(self.limits.topic_queues_max, l.topic_queues_max);
            set!(self.limits.connections_max, l.connections_max);
            set!(self.limits.topics_max, l.topics_max);
            set!(self.limits.queues_max, l.queues_max);
            set!(self.limits.connection_idle_ms_max, l.connection_idle_ms_max);
            set!(
                self.limits.connection_first_frame_ms_max,
                l.connection_first_frame_ms_max
            );
            set!(
                self.limits.connection_reply_bytes_max,
                l.connection_reply_bytes_max
            );
            set!(self.limits.group_offsets_max, l.group_offsets_max);
            set!(self.limits.schedule_delay_ms_max, l.schedule_delay_ms_max);
            set!(self.limits.scheduled_messages_max, l.scheduled_messages_max);
        }
        if let Some(s) = f.storage {
            set!(self.storage.segment_bytes_max, s.segment_bytes_max);
            set!(self.storage.write_bytes_max, s.write_bytes_max);
            set!(self.storage.tail_cache_bytes_max, s.tail_cache_bytes_max);
            set!(self.storage.retention_ms, s.retention_ms);
            set!(self.storage.retention_bytes, s.retention_bytes);
            set!(
                self.storage.retention_check_interval_ms,
                s.retention_check_interval_ms
            );
            set!(
                self.storage.checkpoint_interval_ms,
                s.checkpoint_interval_ms
            );
            set!(self.storage.memory_write_delay_us, s.memory_write_delay_us);
            set!(
                self.storage.memory_pending_bytes_max,
                s.memory_pending_bytes_max
            );
            set!(
                self.storage.memory_pending_wait_ms,
                s.memory_pending_wait_ms
            );
            set!(self.storage.unsynced_bytes_max, s.unsynced_bytes_max);
        }
        if let Some(r) = f.runtime {
            set!(self.runtime.spin_before_park_us, r.spin_before_park_us);
            set!(self.runtime.preempt_timer_us, r.preempt_timer_us);
            set!(self.runtime.io_memory_bytes, r.io_memory_bytes);
            set!(self.runtime.ring_depth, r.ring_depth);
        }
        Ok(())
    }

    /// Applies a named profile (or a path to a profile file).
    pub fn apply_profile(&mut self, name: &str) -> Result<(), ConfigError> {
        if let Some((_, text)) = PROFILES.iter().find(|(n, _)| *n == name) {
            return self.apply_toml(text, &format!("profile {name}"));
        }
        let path = Path::new(name);
        if path.extension().is_some_and(|e| e == "toml") {
            return self.apply_file(path);
        }
        Err(ConfigError::UnknownProfile(name.to_owned()))
    }

    /// Applies a TOML file.
    pub fn apply_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        self.apply_toml(&text, &path.display().to_string())
    }

    /// Checks relationships between values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        let s = &self.storage;
        let l = &self.limits;
        if s.segment_bytes_max < 64 * 1024 || s.segment_bytes_max % 4096 != 0 {
            return bad(
                "storage.segment_bytes_max",
                format!(
                    "{} must be a multiple of 4096 and at least 65536",
                    s.segment_bytes_max
                ),
            );
        }
        if self.segment_bytes_min() > s.segment_bytes_max {
            return bad(
                "limits.batch_bytes_max",
                format!(
                    "{} does not fit storage.segment_bytes_max with the segment's header page",
                    l.batch_bytes_max
                ),
            );
        }
        if l.batch_bytes_max < 1024 {
            return bad("limits.batch_bytes_max", "must be at least 1024".into());
        }
        if l.frame_bytes_max < l.batch_bytes_max.saturating_add(1024) {
            return bad(
                "limits.frame_bytes_max",
                format!(
                    "{} must exceed limits.batch_bytes_max by at least 1024",
                    l.frame_bytes_max
                ),
            );
        }
        if s.write_bytes_max < 4096 || s.write_bytes_max % 4096 != 0 {
            return bad(
                "storage.write_bytes_max",
                "must be a multiple of 4096".into(),
            );
        }
        if l.in_flight_requests_max == 0 {
            return bad("limits.in_flight_requests_max", "must be at least 1".into());
        }
        if l.schedule_delay_ms_max == 0 || l.schedule_delay_ms_max > crate::schedule::WHEEL_RANGE_MS
        {
            return bad(
                "limits.schedule_delay_ms_max",
                format!(
                    "{} must be between 1 and {} (782 days)",
                    l.schedule_delay_ms_max,
                    crate::schedule::WHEEL_RANGE_MS
                ),
            );
        }
        if l.topic_queues_max == 0 {
            return bad("limits.topic_queues_max", "must be at least 1".into());
        }
        if s.retention_check_interval_ms == 0 || s.checkpoint_interval_ms == 0 {
            return bad(
                "storage.retention_check_interval_ms",
                "intervals must be at least 1 ms".into(),
            );
        }
        if s.memory_write_delay_us > 100_000 {
            return bad(
                "storage.memory_write_delay_us",
                "must be at most 100000 (100 ms)".into(),
            );
        }
        if self.runtime.ring_depth < 8 {
            return bad("runtime.ring_depth", "must be at least 8".into());
        }
        if s.memory_pending_bytes_max < u64::from(l.batch_bytes_max) {
            return bad(
                "storage.memory_pending_bytes_max",
                format!(
                    "{} must be at least limits.batch_bytes_max",
                    s.memory_pending_bytes_max
                ),
            );
        }
        let unsynced_min = self.unsynced_bytes_min();
        if s.unsynced_bytes_max != 0 && s.unsynced_bytes_max < unsynced_min {
            return bad(
                "storage.unsynced_bytes_max",
                format!(
                    "{} must be at least {unsynced_min} (4 x the larger of write_bytes_max and batch_bytes_max, plus 64 KiB), or 0 to derive it",
                    s.unsynced_bytes_max
                ),
            );
        }
        if l.connection_reply_bytes_max
            < 2 * u64::from(l.fetch_bytes_max) + u64::from(l.batch_bytes_max)
        {
            return bad(
                "limits.connection_reply_bytes_max",
                format!(
                    "{} must hold two fetches and a batch (2 x fetch_bytes_max + batch_bytes_max)",
                    l.connection_reply_bytes_max
                ),
            );
        }
        if l.connection_first_frame_ms_max == 0 {
            return bad(
                "limits.connection_first_frame_ms_max",
                "must be at least 1".into(),
            );
        }
        if l.topics_max == 0 || l.queues_max == 0 {
            return bad(
                "limits.topics_max",
                "topics_max and queues_max must be at least 1".into(),
            );
        }
        Ok(())
    }

    /// The smallest unsynced window that lets a write of either limit start.
    fn unsynced_bytes_min(&self) -> u64 {
        let run =
            u64::from(self.storage.write_bytes_max).max(u64::from(self.limits.batch_bytes_max));
        4 * run + (64 << 10)
    }

    /// The unsynced window in effect: the configured one, or the larger of
    /// 32 MiB and the minimum.
    pub fn unsynced_bytes_max(&self) -> u64 {
        match self.storage.unsynced_bytes_max {
            0 => (32 << 20u64).max(self.unsynced_bytes_min()),
            v => v,
        }
    }

    /// The smallest segment a batch of `batch_bytes_max` fits (with the
    /// header page), rounded up to 64 KiB.
    pub fn segment_bytes_min(&self) -> u64 {
        let need = u64::from(self.limits.batch_bytes_max) + 2 * 4096;
        need.div_ceil(64 << 10) * (64 << 10)
    }
}

/// Parses a listen address like `127.0.0.1:7400` or `[::1]:7400`.
pub fn parse_listen(s: &str) -> Result<SocketAddr, ConfigError> {
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or(ConfigError::Invalid {
            key: "broker.listen",
            reason: format!("'{s}' is not a host:port address"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_every_profile_parses() {
        Config::default().validate().unwrap();
        for (name, _) in PROFILES {
            let mut c = Config::default();
            c.apply_profile(name).unwrap();
            c.validate().unwrap();
            assert_ne!(c, Config::default(), "profile {name} changes nothing");
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let mut c = Config::default();
        let err = c
            .apply_toml("[storage]\nsegment_size = 5\n", "test.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("segment_size"), "{err}");
        assert!(err.contains("test.toml"), "{err}");
        let err = c.apply_toml("[nope]\n", "x").unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let mut c = Config::default();
        let err = c
            .apply_toml("[broker]\ndurability_default = \"sometimes\"\n", "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sometimes"), "{err}");
        let err = c
            .apply_toml("[broker]\nlisten = \"nowhere\"\n", "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("broker.listen"), "{err}");
        let mut c = Config::default();
        c.apply_toml("[storage]\nsegment_bytes_max = 1000\n", "x")
            .unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("storage.segment_bytes_max"), "{err}");
        let mut c = Config::default();
        c.apply_toml("[storage]\nmemory_write_delay_us = 0\n", "x")
            .unwrap();
        c.validate().unwrap();
        c.apply_toml("[storage]\nmemory_write_delay_us = 100001\n", "x")
            .unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("storage.memory_write_delay_us"), "{err}");
    }

    #[test]
    fn later_layers_override_earlier_ones() {
        let mut c = Config::default();
        c.apply_profile("durable").unwrap();
        c.apply_toml("[broker]\ndurability_default = \"memory\"\n", "x")
            .unwrap();
        assert_eq!(c.broker.durability_default, Durability::Memory);
    }
}
