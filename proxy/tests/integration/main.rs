//! Integration tests: a real PostgreSQL (started by the test) and the real spillway
//! binary. One test binary with modules, so the suite links once.

mod context;
mod wire;

mod auth_tls;
mod bad_input;
mod cache;
mod clients;
mod crash;
mod demo;
mod differential;
mod flush_apply;
mod lifecycle;
mod metrics;
mod model;
mod outage;
mod protocol;
mod triggers;
mod write_behind;
mod write_load;
mod write_options;
