//! spillway: a PostgreSQL-wire-compatible caching proxy.
//!
//! This crate owns how bytes move — configuration, the listener, TLS, sessions, the
//! wire protocol and upstream connections. What happens to data (cache, write
//! policies, journal) lives in `spillway-policies`. See `ARCHITECTURE.md` for the map.
//!
//! It is not: a connection pooler. Every client session gets its own upstream
//! connection (session mode), so session state always behaves exactly as on a direct
//! connection.

pub mod admin;
pub mod cache;
pub mod cancel;
pub mod catalog;
pub mod classify;
pub mod config;
pub mod demo;
pub mod error;
pub mod metrics;
pub mod protocol;
pub mod reload;
pub mod schema;
pub mod server;
pub mod session;
pub mod stream;
pub mod throwaway;
pub mod tls;
pub mod upstream;
pub mod workers;
pub mod writes;
