//! Deferred writes as data: what a journal record holds ([`record`]), and how a run of
//! records becomes a few set-based statements for PostgreSQL ([`plan`]), after
//! write-back tables' operations are folded per key ([`coalesce`]).
//!
//! Values are kept as PostgreSQL text (what a type's input function accepts) with the
//! cast the client wrote, never as Rust values: the flusher hands them to PostgreSQL as
//! `text[]` arrays and PostgreSQL converts them with the column's own type, exactly as
//! it would have converted the client's literal or text parameter.
//!
//! It is not: the journal's storage, the upstream connection, or the decision whether a
//! statement may be deferred (the proxy makes that with the catalog).

pub mod arith;
pub mod coalesce;
pub mod meta;
pub mod order;
pub mod plan;
pub mod record;
pub mod replay;

pub use coalesce::coalesce;
pub use plan::{Group, GroupKind, TableMeta, plan_batch};
pub use record::{Assign, AssignOp, Cmp, CodecError, Guard, Record, RowOp, Val};
