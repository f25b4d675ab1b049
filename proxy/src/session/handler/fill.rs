//! A result being captured for the cache: the RowDescription (and what a Describe of
//! the statement answered, if the cycle had one) and the rows of one statement's answer, as PostgreSQL sent them, with the version counters read before
//! the statement went upstream.
//!
//! Invariants: a result is stored only when it ends with a SELECT's CommandComplete
//! (anything else means the statement upstream was not the one the key names), and
//! only up to `cache.max_entry_bytes` (a larger one is abandoned, and streams on).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use spillway_policies::cache::{CachedResult, Deps, FillTicket};

/// A result being captured for the cache.
pub struct Fill {
    pub ticket: FillTicket,
    pub deps: Deps,
    pub ttl: Duration,
    pub row_description: Option<Bytes>,
    /// ParameterDescription and RowDescription of a Describe of the statement.
    pub statement: Option<Bytes>,
    pub body: BytesMut,
}

impl Fill {
    pub fn new(ticket: FillTicket, deps: Deps, ttl: Duration) -> Box<Self> {
        Box::new(Self {
            ticket,
            deps,
            ttl,
            row_description: None,
            statement: None,
            body: BytesMut::new(),
        })
    }

    /// Stores the result if it ends with a SELECT's CommandComplete (anything else means
    /// the statement upstream was not the one the key names: never cache that).
    pub fn finish(mut self, complete: Option<&[u8]>) {
        match complete {
            Some(m) if m.get(5..12) == Some(b"SELECT ".as_slice()) && self.push(m) => {
                self.complete();
            }
            Some(m) if m.get(5..12) != Some(b"SELECT ".as_slice()) => {
                tracing::warn!("a cached statement's result did not end as a SELECT; not stored");
            }
            _ => self.ticket.abandon_too_large(),
        }
    }

    /// Appends a message; false (and the fill is to be dropped) once over the limit.
    pub fn push(&mut self, msg: &[u8]) -> bool {
        if self.body.len() + msg.len() > self.ticket.max_entry_bytes() {
            return false;
        }
        self.body.extend_from_slice(msg);
        true
    }

    fn complete(self) {
        let Fill {
            ticket,
            deps,
            ttl,
            row_description,
            statement,
            body,
        } = self;
        ticket.complete(CachedResult {
            row_description,
            statement,
            body: body.freeze(),
            deps,
            ttl,
        });
    }
}

/// What the Describes since the last Bind answered, for that portal's fill.
#[derive(Default)]
pub struct Described {
    /// The portal's RowDescription.
    pub portal: Option<Bytes>,
    /// The statement's ParameterDescription, until its RowDescription or NoData.
    pub parameters: Option<Bytes>,
    /// The statement's ParameterDescription and RowDescription (or NoData).
    pub statement: Option<Bytes>,
}

impl Described {
    pub fn hand_to(&mut self, fill: &mut Fill) {
        if fill.row_description.is_none() {
            fill.row_description = self.portal.take();
        }
        if fill.statement.is_none() {
            fill.statement = self.statement.take();
        }
    }
}
