//! Consumer groups: the decision logic of server-side delivery, as plain
//! state machines without I/O (the shards drive them with time, the log's
//! visible end and requests).
//!
//! - `backoff`: retry schedules (RocketMQ's by default);
//! - `config`: a group's settings and their validation;
//! - `entry`: the records of a shard's group journal in its commit log;
//! - `journal`: the delivery window's transitions as 40-byte records;
//! - `membership`: members, sessions, generations and the two-step,
//!   epoch-fenced queue assignment of queue delivery (coordinator shard);
//! - `receipt`: receipt handles (what names a delivery, MAC'd);
//! - `window`: the delivery window of one (group, queue) in message
//!   delivery: leases, deadlines, retries, dead letters, orderly blocking.

pub mod backoff;
pub mod config;
pub mod entry;
pub mod journal;
pub mod membership;
pub mod receipt;
#[cfg(test)]
pub(crate) mod sim;
pub mod window;
