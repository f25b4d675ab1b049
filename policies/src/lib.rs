//! `spillway-policies`: what spillway does with data — read cache, write policies,
//! journal, pending-write state and flush logic.
//!
//! It is not: network code. It never opens a socket; it reaches PostgreSQL only through
//! traits the proxy implements, so every rule here can be tested with a paused clock and
//! a fake sink.
//!
//! Today it owns the configuration of those subsystems (`config`); the engines that
//! consume it arrive with the read-cache and write-policy work.

pub mod config;

pub use config::{
    CacheConfig, Consistency, FlushConfig, FsyncMode, Invalidation, JournalConfig, Policy,
    RowCounts, TableConfig, TableName, WhenFull,
};
