//! KeelMQ: a thread-per-core, io_uring message broker.
//!
//! The crate holds the broker (`broker`, `shard`, `storage`), the wire
//! protocol (`protocol`, `batch`), and a blocking Rust client (`client`)
//! that a plain `fn main` can use without glommio.

pub mod batch;
pub mod broker;
pub mod client;
pub mod config;
pub mod group;
pub mod ids;
pub mod protocol;
pub mod runtime;
pub mod shard;
pub mod storage;

#[cfg(test)]
mod fuzz_tests;
