//! The write side of the deferred policies (SPEC §6) as the proxy runs it: the
//! deferred tables checked against the catalog at startup ([`tables`]), statements
//! turned into journal records ([`convert`], [`params`], [`types`] for casts and
//! declared types, [`datetime`] for date/time values) and their RETURNING answered
//! from the statement's own values ([`returning`]), key values reserved from `serial`
//! and identity sequences for INSERTs that leave the key out ([`sequences`]), the
//! facade the session handler calls ([`service`]), the journal it runs on ([`log`]: the
//! local journal or the NATS JetStream stream of [`nats`]), rate-limited fallback log
//! lines ([`fallbacks`]), the
//! exactly-once application of records upstream ([`apply`]: the engine's `Sink`; the
//! ledger it advances, [`ledger`]), the
//! check connections ([`checks`]: the engine's `Checks`), and startup/shutdown
//! ([`start`]).
//!
//! The rules (pending state, decisions, due rules, back-pressure, barriers, the flush
//! loop) are the engine's, in `spillway_policies::engine`; the data model (records,
//! set-based plans) is in `spillway_policies::writes`. This module owns the
//! PostgreSQL side: catalog checks, the ledger compare-and-set, dead letters.

pub mod apply;
pub mod checks;
pub mod convert;
pub mod datetime;
pub mod fallbacks;
pub mod ledger;
pub mod log;
pub mod nats;
pub mod overlay;
pub mod params;
pub mod returning;
pub mod schema;
pub mod sequences;
pub mod service;
pub mod start;
pub mod tables;
pub mod types;
