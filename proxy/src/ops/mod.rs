//! Operating spillway: the listener that wires every part together and runs the
//! shutdown sequence ([`server`]), the admin console ([`admin`]), `/metrics`,
//! `/healthz` and `/readyz` ([`http`]), hot reload ([`reload`]), and the throwaway
//! PostgreSQL and `spillway demo` ([`throwaway`], [`demo`]).
//!
//! Invariant: the top layer. Nothing below (`session`, `write`, `read`, `net`) uses
//! it.

pub mod admin;
pub mod demo;
pub mod http;
pub mod reload;
pub mod server;
pub mod throwaway;
