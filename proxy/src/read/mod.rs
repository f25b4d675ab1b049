//! The read path: what a statement is ([`classify`], pg_query), what the database's
//! relations and functions are ([`catalog`]), and the read cache with its
//! per-database state and service connection ([`cache`]).
//!
//! Invariant: nothing here knows about sessions or the write path; the write path and
//! sessions use it.

pub mod cache;
pub mod catalog;
pub mod classify;
