//! `JournalLog`: the engine's `Log` as `journal.backend` chose it, the local journal or
//! the NATS stream ([`super::nats`]). One enum so the engine's type stays one type.
//!
//! Invariant: every call goes to the one backend chosen at start; nothing here adds
//! behaviour of its own.

use bytes::Bytes;
use spillway_policies::engine::Log;
use spillway_policies::journal::{Journal, JournalError};

use super::nats::NatsLog;

pub enum JournalLog {
    Local(Journal),
    /// Boxed: the client and stream handles are large beside the journal's handle.
    Nats(Box<NatsLog>),
}

impl JournalLog {
    /// The local journal, for its disk gauges.
    pub fn local(&self) -> Option<&Journal> {
        match self {
            JournalLog::Local(j) => Some(j),
            JournalLog::Nats(_) => None,
        }
    }

    /// Why this log cannot take writes now, beyond a poisoned journal (`/readyz`).
    pub fn unavailable(&self) -> Option<String> {
        match self {
            JournalLog::Local(_) => None,
            JournalLog::Nats(n) => n
                .stopped()
                .or_else(|| (!n.connected()).then(|| "not connected to NATS".to_owned())),
        }
    }
}

impl Log for JournalLog {
    async fn append(&self, payload: Bytes) -> Result<u64, JournalError> {
        match self {
            JournalLog::Local(j) => Log::append(j, payload).await,
            JournalLog::Nats(n) => Log::append(n.as_ref(), payload).await,
        }
    }

    async fn append_keyed(
        &self,
        payload: Bytes,
        key: Option<(String, u64)>,
    ) -> Result<u64, JournalError> {
        match self {
            JournalLog::Local(j) => Log::append(j, payload).await,
            JournalLog::Nats(n) => Log::append_keyed(n.as_ref(), payload, key).await,
        }
    }

    fn key_mark(&self, key: &str) -> u64 {
        match self {
            JournalLog::Local(_) => 0,
            JournalLog::Nats(n) => n.key_mark(key),
        }
    }

    async fn confirm(&self, seq: u64) -> Result<(), JournalError> {
        match self {
            JournalLog::Local(j) => Log::confirm(j, seq).await,
            JournalLog::Nats(n) => Log::confirm(n.as_ref(), seq).await,
        }
    }

    fn durable_seq(&self) -> u64 {
        match self {
            JournalLog::Local(j) => Log::durable_seq(j),
            JournalLog::Nats(n) => n.durable_seq(),
        }
    }

    fn is_poisoned(&self) -> bool {
        match self {
            JournalLog::Local(j) => Log::is_poisoned(j),
            JournalLog::Nats(n) => n.is_poisoned(),
        }
    }

    fn id(&self) -> String {
        match self {
            JournalLog::Local(j) => Log::id(j),
            JournalLog::Nats(n) => n.id(),
        }
    }

    fn epoch(&self) -> u64 {
        match self {
            JournalLog::Local(j) => Log::epoch(j),
            JournalLog::Nats(n) => n.epoch(),
        }
    }
}
