//! `spillway-policies`: what spillway does with data — read cache, write policies,
//! journal, pending-write state and flush logic.
//!
//! It is not: network code. It never opens a socket; it reaches PostgreSQL only through
//! traits the proxy implements, so every rule here can be tested with a paused clock and
//! a fake sink.
//!
//! It owns the configuration of those subsystems (`config`), the read cache (`cache`),
//! the durable write journal (`journal`), deferred writes as data (`writes`: journal
//! records and set-based flush statements) and the write-policy engine (`engine`:
//! pending writes, decisions, due rules, back-pressure, barriers, the flush loop),
//! which reaches PostgreSQL through `engine::upstream`'s traits.

pub mod cache;
pub mod changes;
pub mod config;
pub mod engine;
pub mod journal;
pub mod writes;

pub use config::{
    CacheConfig, Consistency, FlushConfig, FsyncMode, Invalidation, JournalBackend, JournalConfig,
    KeyIndexConfig, Policy, RowCounts, TableConfig, TableName, WhenFull,
};
