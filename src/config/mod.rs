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
        if u64::from(l.batch_bytes_max) > s.segment_bytes_max {
            return bad(
                "limits.batch_bytes_max",
                format!("{} exceeds storage.segment_bytes_max", l.batch_bytes_max),
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
        Ok(())
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
