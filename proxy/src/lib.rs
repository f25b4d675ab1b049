//! spillway: a PostgreSQL-wire-compatible caching proxy.
//!
//! This crate owns how bytes move — configuration, the listener, TLS, sessions, the
//! wire protocol and upstream connections. What happens to data (cache, write
//! policies, journal) lives in `spillway-policies`. See `ARCHITECTURE.md` for the map.
//!
//! The folders follow the data path, and each layer uses only the layers below it
//! (checked by `tests/layers.rs`):
//!
//! | layer | modules |
//! |---|---|
//! | operations | [`ops`]: listener and wiring, admin console, `/metrics`, reload, demo |
//! | sessions | [`session`]: startup, the relay loop, the handler |
//! | write path | [`write`]: deferred tables, statements → records, the flush worker's PostgreSQL side |
//! | read path | [`read`]: statement classification, the catalog, the read cache |
//! | plumbing | [`net`]: streams, TLS, upstream connections, cancel keys, workers, shutdown signals |
//! | foundations | [`protocol`], [`config`], [`metrics`], [`error`] |
//!
//! By default every client session gets its own upstream connection (session mode),
//! so session state behaves exactly as on a direct connection. Transaction mode
//! (`pool.mode`, ADR 0025) makes it a transaction pooler for the databases and users
//! configured so: spillway authenticates those clients itself and leases a pooled
//! server connection per transaction. Named protocol-level prepared statements and
//! session-level SET are carried across leases (ADR 0028); LISTEN goes through one
//! listener connection per database, outside a transaction at once (ADR 0031), inside
//! one at its COMMIT (ADR 0033); other session state pins the session to its
//! connection.

pub mod config;
pub mod error;
pub mod metrics;
pub mod net;
pub mod ops;
pub mod protocol;
pub mod read;
pub mod session;
pub mod write;
