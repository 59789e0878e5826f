//! KeelMQ: a thread-per-core, io_uring message broker.
//!
//! The crate holds the broker (`broker`, `shard`, `storage`, `group`). The
//! wire protocol (`protocol`, `batch`, `ids`) is the `keelmq-protocol`
//! crate and the blocking Rust client (`client`) the `keelmq-client` crate,
//! which depends on neither glommio nor clap; both are re-exported here
//! under their old paths.

pub use keelmq_client as client;
pub use keelmq_protocol as protocol;
pub use keelmq_protocol::{batch, ids};

pub mod broker;
pub mod config;
pub mod filter;
pub mod group;
pub mod runtime;
pub mod schedule;
pub mod shard;
pub mod storage;

#[cfg(test)]
mod fuzz_tests;
