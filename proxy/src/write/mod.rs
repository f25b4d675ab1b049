//! The write side of the deferred policies (SPEC §6) as the proxy runs it: the
//! deferred tables checked against the catalog at startup ([`tables`]), statements
//! turned into journal records ([`convert`], [`params`]) and their RETURNING answered
//! from the statement's own values ([`returning`]), the journal, pending state
//! and flush worker ([`service`]; which tables are deferred and how a reload changes
//! that: `service/table_set.rs`), rate-limited fallback log lines ([`fallbacks`]), the exactly-once application of records upstream
//! ([`apply`]), and startup/shutdown ([`start`]).
//!
//! The data model (records, set-based plans) is in `spillway_policies::writes`; this
//! module owns the PostgreSQL side: catalog queries, the ledger compare-and-set, dead
//! letters.

pub mod apply;
pub mod convert;
pub mod fallbacks;
pub mod params;
pub mod returning;
pub mod schema;
pub mod service;
pub mod start;
pub mod tables;
