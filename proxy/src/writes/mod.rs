//! The write side of the deferred policies (SPEC §6) as the proxy runs it: the
//! deferred tables checked against the catalog at startup ([`tables`]) and the
//! exactly-once application of journal records upstream ([`apply`]).
//!
//! The data model (records, set-based plans) is in `spillway_policies::writes`; this
//! module owns the PostgreSQL side: catalog queries, the ledger compare-and-set, dead
//! letters.

pub mod apply;
pub mod tables;
