//! The deferred-write log on NATS JetStream (`journal.backend = "nats"`, ADR 0025):
//! [`NatsLog`] is the engine's `Log` over one stream per spillway cluster, so an
//! acknowledged deferred write lives on a quorum of NATS servers, not on this
//! machine's disk. [`open`] connects, creates the stream if needed and reads back the
//! records the ledger does not hold (recovery after this instance, or its machine, was
//! lost).
//!
//! Invariants:
//! - `append` returns a sequence number only after JetStream's PubAck, which the stream
//!   leader sends once a majority of `journal.nats.replicas` stored the message; that
//!   stream sequence number is the record's sequence number (one stream, so one total
//!   order: per-key order holds whatever the subject).
//! - Every append carries a message id unique to it (`Nats-Msg-Id`): an attempt whose
//!   answer was lost is retried under the same id, and JetStream's duplicate window
//!   answers with the first copy's sequence number instead of storing a second one.
//! - An append whose outcome stays unknown (no answer to any attempt) may still be
//!   stored, and this instance's flusher would then wait forever for its sequence
//!   number: the log stops accepting appends (`is_poisoned`, `/readyz` says why) and a
//!   restart recovers every stored record from the stream. A publish refused outright
//!   (no JetStream answering) is just refused: nothing was stored.
//! - Every instance follows the stream from where its recovery read ended (an ordered
//!   consumer): others' records become pending here too (`Engine::note_foreign`), so
//!   the contiguous flush prefix, barriers and the key overlay include them.
//! - `confirm(seq)` purges the stream below `seq + 1`: only records the ledger holds as
//!   applied leave it, so a new owner always finds every record after the ledger's.

mod open;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use spillway_policies::journal::JournalError;
use spillway_policies::writes::Record;
use tokio::sync::mpsc;

pub use open::{NatsError, open};

/// Attempts of one append under its message id before its outcome counts as unknown.
const ATTEMPTS: u32 = 3;

/// The journal on a JetStream stream.
pub struct NatsLog {
    js: jetstream::Context,
    stream: String,
    epoch: u64,
    /// Distinguishes this process's message ids from every other's.
    nonce: String,
    next_id: AtomicU64,
    /// The highest sequence number JetStream acknowledged (or recovery found).
    durable: AtomicU64,
    /// Why appends stopped, once they did.
    poisoned: OnceLock<String>,
    client: async_nats::Client,
    /// Other instances' records in stream order, until the write service takes it.
    follower: Mutex<Option<Foreign>>,
    /// The highest sequence number the follower saw (others' records are durable too).
    durable_feed: Arc<AtomicU64>,
}

/// Other instances' records: (stream sequence, payload).
pub type Foreign = mpsc::UnboundedReceiver<(u64, Bytes)>;

impl NatsLog {
    /// The journal id in `spillway.flush_ledger` of the stream `stream`.
    pub fn journal_id(stream: &str) -> String {
        format!("nats:{stream}")
    }

    /// Whether the client is connected to some server now (`/readyz`).
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// The follower's records (once: the write service feeds them to the engine).
    pub fn take_follower(&self) -> Option<Foreign> {
        match self.follower.lock() {
            Ok(mut f) => f.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        }
    }

    /// Why appends stopped, if they did.
    pub fn stopped(&self) -> Option<&str> {
        self.poisoned.get().map(String::as_str)
    }

    /// The subject of a record: the stream's prefix, then its first operation's table
    /// (as one subject token). Ordering comes from the stream's single sequence.
    fn subject_of(&self, payload: &[u8]) -> String {
        let table = Record::decode(payload)
            .ok()
            .and_then(|r| r.ops.first().map(|op| op.table().to_owned()))
            .unwrap_or_default();
        let token: String = table
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        format!(
            "{}.w.{}",
            self.stream,
            if token.is_empty() { "_" } else { &token }
        )
    }

    async fn publish_once(
        &self,
        subject: &str,
        id: &str,
        payload: &Bytes,
    ) -> Result<u64, PublishErrorKind> {
        let message = PublishMessage::build()
            .payload(payload.clone())
            .message_id(id);
        let ack = self
            .js
            .send_publish(subject.to_owned(), message)
            .await
            .map_err(|e| e.kind())?
            .await
            .map_err(|e| e.kind())?;
        Ok(ack.sequence)
    }

    async fn append_inner(&self, payload: Bytes) -> Result<u64, JournalError> {
        if let Some(cause) = self.poisoned.get() {
            return Err(JournalError::Unavailable(cause.clone()));
        }
        let subject = self.subject_of(&payload);
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{}", self.nonce, n);
        let mut last = PublishErrorKind::Other;
        for attempt in 0..ATTEMPTS {
            match self.publish_once(&subject, &id, &payload).await {
                Ok(seq) => {
                    self.durable.fetch_max(seq, Ordering::AcqRel);
                    return Ok(seq);
                }
                // Nobody answered the publish: no stream leader took it, nothing stored.
                Err(
                    kind
                    @ (PublishErrorKind::StreamNotFound | PublishErrorKind::MaxPayloadExceeded),
                ) if attempt == 0 => {
                    return Err(JournalError::Unavailable(kind.to_string()));
                }
                Err(kind) => {
                    tracing::debug!(%kind, attempt, "journal: publish to JetStream failed");
                    last = kind;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let cause = format!(
            "a publish to stream {} got no acknowledgement ({last}) and may be stored: appends \
             stopped until a restart recovers the stream",
            self.stream
        );
        tracing::error!("journal: {cause}");
        let _ = self.poisoned.set(cause.clone());
        Err(JournalError::Unavailable(cause))
    }

    async fn confirm_inner(&self, seq: u64) -> Result<(), JournalError> {
        let stream = self
            .js
            .get_stream_no_info(&self.stream)
            .await
            .map_err(|e| JournalError::Unavailable(e.to_string()))?;
        stream
            .purge()
            .sequence(seq + 1)
            .await
            .map_err(|e| JournalError::Unavailable(e.to_string()))?;
        Ok(())
    }
}

impl spillway_policies::engine::Log for NatsLog {
    fn append(
        &self,
        payload: Bytes,
    ) -> impl std::future::Future<Output = Result<u64, JournalError>> + Send {
        self.append_inner(payload)
    }

    fn confirm(
        &self,
        seq: u64,
    ) -> impl std::future::Future<Output = Result<(), JournalError>> + Send {
        self.confirm_inner(seq)
    }

    fn durable_seq(&self) -> u64 {
        self.durable
            .load(Ordering::Acquire)
            .max(self.durable_feed.load(Ordering::Acquire))
    }

    fn is_poisoned(&self) -> bool {
        self.poisoned.get().is_some()
    }

    fn id(&self) -> String {
        Self::journal_id(&self.stream)
    }

    fn epoch(&self) -> u64 {
        self.epoch
    }
}
