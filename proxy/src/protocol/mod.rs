//! The PostgreSQL wire protocol, as spillway needs it: framing, the untyped startup
//! phase, and the few messages spillway builds or inspects itself.
//!
//! This layer does no I/O. Every parser has the shape
//! `parse(&mut BytesMut) -> Result<Option<T>, ProtocolError>` where `Ok(None)` means
//! "not enough bytes yet" and leaves the buffer untouched. Names follow the PostgreSQL
//! documentation: *frontend* messages travel client → server, *backend* messages
//! server → client; *client* and *upstream* name connection roles, not directions.
//!
//! Message types spillway does not need to understand are never decoded: they are
//! framed by their length and passed through byte for byte (SPEC §3, "Framing").
//! The SCRAM-SHA-256 server exchange and PostgreSQL-format verifiers ([`scram`]) are here
//! for the same reason: message contents, no I/O.

pub mod backend;
pub mod frame;
pub mod frontend;
pub mod pgoutput;
pub mod prepared;
pub mod scram;
pub mod sqlstate;
pub mod startup;

pub use frame::{Header, ProtocolError, peek_header};
