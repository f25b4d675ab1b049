//! Plumbing every session uses and none of it decides anything about data: client and
//! upstream byte streams ([`stream`], [`conn`]), TLS ([`tls`]), upstream connections
//! and cancel forwarding ([`upstream`]), server connections pooled in transaction
//! mode ([`pool`]), the cancel-key registry ([`cancel`]), the
//! session worker threads ([`workers`]) and the shutdown signal sessions watch
//! ([`signal`]).
//!
//! Invariant: nothing here knows about the cache, the write path or sessions' handlers.

pub mod cancel;
pub mod conn;
pub mod notify;
pub mod pool;
pub mod signal;
pub mod stream;
pub mod tls;
pub mod upstream;
pub mod workers;
