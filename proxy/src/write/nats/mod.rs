//! The deferred-write log on NATS JetStream (`journal.backend = "nats"`, ADR 0026):
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
//! - Every sequence number in the stream reaches the engine, or the contiguous flush
//!   prefix stops at it for good (ADR 0037): an append answered with a PubAck returns
//!   its sequence number; an append whose attempts were all refused outright (no
//!   JetStream answering) stored nothing; an append with an unanswered attempt (the
//!   connection or the stream leader lost while the PubAck was on its way) is settled
//!   by what the stream holds: the follower saw its message id stored (or the key
//!   subject's last message carries it) and it succeeds with that sequence number, or
//!   it returns `JournalError::Indeterminate` (the client is told the outcome is
//!   unknown) and the follower hands it to the engine like another instance's record
//!   if it is, or ever becomes, stored. The log stops accepting appends only when the
//!   follower ends (nothing could settle such a record any more).
//! - Every instance follows the stream from where its recovery read ended (an ordered
//!   consumer): others' records become pending here too (`Engine::note_foreign`), so
//!   the contiguous flush prefix, barriers and the key overlay include them.
//! - A record of one key goes to the key's subject with JetStream's expected last
//!   subject sequence set to the last record of that key this instance's engine has:
//!   JetStream refuses it when another instance wrote the key meanwhile, and the
//!   engine decides the statement again once the follower delivered that write
//!   (`JournalError::Conflict`). This process's own writes to one key go one at a time.
//! - `confirm(seq)` purges the stream below `seq + 1` once `PURGE_DELAY` passed: only
//!   records the ledger holds as applied leave it, so a new owner always finds every
//!   record after the ledger's; and a keyed append publishes within half that delay of
//!   its decision, so no record its decision did not see was purged from its subject.

mod open;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use spillway_policies::journal::JournalError;
use spillway_policies::writes::Record;
use tokio::sync::mpsc;

pub use open::{NatsError, open};

/// Attempts of one append under its message id before its outcome counts as unknown.
const ATTEMPTS: u32 = 3;

/// How long an append given up as indeterminate is remembered: if its message shows up
/// in the stream meanwhile, the follower hands it to the engine. Far beyond any attempt
/// still travelling (JetStream's duplicate window is two minutes).
const GIVEN_UP_FOR: Duration = Duration::from_secs(600);

/// How long settling an unanswered append asks the stream for its subject's last
/// message before giving the append up.
const SETTLE_LOOKUP: Duration = Duration::from_secs(1);

/// How long an applied record stays in the stream before `confirm` purges it. A purged
/// key subject has no last sequence, so a keyed append decided before the purged
/// record reached its instance would pass the compare-and-set: a keyed append
/// publishes only within half of this after its decision (else it is decided again),
/// and the record was then applied upstream long before the decision read the key.
const PURGE_DELAY: Duration = Duration::from_secs(10);

/// The journal on a JetStream stream.
pub struct NatsLog {
    js: jetstream::Context,
    stream: String,
    epoch: u64,
    /// This process's message ids.
    ids: MessageIds,
    /// The highest sequence number JetStream acknowledged (or recovery found).
    durable: AtomicU64,
    /// Why appends stopped, once they did (the follower ended).
    poisoned: Arc<OnceLock<String>>,
    /// This process's appends not settled yet, by message id (shared with the
    /// follower).
    own: OwnAppends,
    client: async_nats::Client,
    /// Other instances' records in stream order, until the write service takes it.
    follower: Mutex<Option<Foreign>>,
    /// The highest sequence number the follower saw (others' records are durable too).
    durable_feed: Arc<AtomicU64>,
    /// Per key subject, the last sequence number this instance's engine has (its own
    /// acknowledged appends, others' records once noted): a keyed append's expected
    /// last subject sequence. Entries at or below the purged sequence are dropped.
    subjects: Mutex<HashMap<String, Seen>>,
    /// One keyed append per subject at a time from this process, so this instance's
    /// own writes to a key never conflict with each other.
    in_flight: tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    ack_timeout: Duration,
    /// Why the last append was refused, until one succeeds (`/readyz`).
    refused: Mutex<Option<String>>,
    /// Applied sequence numbers not purged yet, with when they were confirmed.
    to_purge: Mutex<std::collections::VecDeque<(tokio::time::Instant, u64)>>,
}

/// The `Nats-Msg-Id`s of this process's appends: a nonce that distinguishes them from
/// every other process's (the follower skips its own by it), then a counter.
struct MessageIds {
    nonce: String,
    next: AtomicU64,
}

impl MessageIds {
    fn next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{}-{}", self.nonce, n)
    }
}

/// What this instance's engine has of one key subject.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    /// The subject's last record here: an append's expected last subject sequence.
    last: u64,
    /// The last INSERT or DELETE of them another instance wrote: a decision taken
    /// before it is stale.
    foreign: u64,
}

/// Other instances' records: (stream sequence, subject, payload).
pub type Foreign = mpsc::UnboundedReceiver<(u64, String, Bytes)>;

/// Where one of this process's appends stands, as far as the follower is concerned.
#[derive(Debug, Clone, Copy)]
enum Own {
    /// Being published: the follower notes where it was stored if it sees it first.
    Publishing,
    /// The follower saw it stored at this sequence number before its append settled.
    Stored(u64),
    /// Its append returned `Indeterminate` at this moment: if it is stored, the
    /// follower hands it to the engine like another instance's record.
    GivenUp(Instant),
}

/// This process's unsettled appends by message id, shared by the log and its follower.
type OwnAppends = Arc<Mutex<HashMap<String, Own>>>;

/// The follower met one of this process's messages (`id`, stored at `seq`): true when
/// the engine must be given it (its append was given up as indeterminate); otherwise
/// its append returns, or returned, `seq` itself.
fn followed_own(own: &OwnAppends, id: &str, seq: u64) -> bool {
    let mut own = lock(own);
    match own.get(id) {
        Some(Own::Publishing) => {
            own.insert(id.to_owned(), Own::Stored(seq));
            false
        }
        Some(Own::GivenUp(_)) => {
            own.remove(id);
            true
        }
        Some(Own::Stored(_)) | None => false,
    }
}

/// How one publish, over all its attempts, ended.
enum Published {
    /// JetStream acknowledged it with this sequence number.
    Stored(u64),
    /// Refused by every attempt's answer: nothing was stored.
    Refused(JournalError),
    /// Some attempt got no answer (or a refusal that an earlier unanswered attempt may
    /// have caused): it may be stored.
    Unanswered(String),
}

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

    /// The engine has the record `seq` on `subject` (its own, or noted from another
    /// instance): keyed appends on the subject expect it from now on. `foreign`:
    /// another instance's INSERT or DELETE, which makes earlier decisions on the key
    /// stale (its UPDATEs leave existence as it was).
    pub fn seen(&self, subject: &str, seq: u64, foreign: bool) {
        if subject.matches('.').count() < 3 {
            return;
        }
        let mut subjects = lock(&self.subjects);
        let at = subjects.entry(subject.to_owned()).or_default();
        at.last = at.last.max(seq);
        if foreign {
            at.foreign = at.foreign.max(seq);
        }
    }

    /// Why appends stopped, or the last one was refused, if so.
    pub fn stopped(&self) -> Option<String> {
        match self.poisoned.get() {
            Some(cause) => Some(cause.clone()),
            None => lock(&self.refused).clone(),
        }
    }

    /// The subject of a record: the stream's prefix, then its first operation's table
    /// (as one subject token). Ordering comes from the stream's single sequence.
    fn subject_of(&self, payload: &[u8]) -> String {
        let table = Record::decode(payload)
            .ok()
            .and_then(|r| r.ops.first().map(|op| op.table().to_owned()))
            .unwrap_or_default();
        self.table_subject(&table)
    }

    fn table_subject(&self, table: &str) -> String {
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

    /// A keyed record's subject: the table's, then a hash of the key, so JetStream's
    /// per-subject last sequence is the key's.
    fn key_subject(&self, key: &str) -> String {
        let table = key.split('\u{0}').next().unwrap_or_default();
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        format!("{}.{:016x}", self.table_subject(table), hasher.finish())
    }

    fn key_mark_inner(&self, key: &str) -> u64 {
        let subject = self.key_subject(key);
        lock(&self.subjects).get(&subject).map_or(0, |s| s.foreign)
    }

    async fn publish_once(
        &self,
        subject: &str,
        id: &str,
        payload: &Bytes,
        expected: Option<u64>,
    ) -> Result<u64, PublishErrorKind> {
        let mut message = PublishMessage::build()
            .payload(payload.clone())
            .message_id(id);
        if let Some(seq) = expected {
            message = message.expected_last_subject_sequence(seq);
        }
        let ack = self
            .js
            .send_publish(subject.to_owned(), message)
            .await
            .map_err(|e| e.kind())?
            .await
            .map_err(|e| e.kind())?;
        Ok(ack.sequence)
    }

    async fn append_keyed_inner(
        &self,
        payload: Bytes,
        key: Option<(String, u64)>,
    ) -> Result<u64, JournalError> {
        let Some((key, mark)) = key else {
            return self.append_inner(payload, None).await;
        };
        let decided = tokio::time::Instant::now();
        let subject = self.key_subject(&key);
        let turn = lock_async(&self.in_flight)
            .await
            .entry(subject.clone())
            .or_default()
            .clone();
        let guard = turn.lock().await;
        let seen = lock(&self.subjects)
            .get(&subject)
            .copied()
            .unwrap_or_default();
        let result = if seen.foreign == mark && decided.elapsed() < PURGE_DELAY / 2 {
            self.append_inner(payload, Some((subject.clone(), seen.last)))
                .await
        } else {
            // Another instance's write of the key reached the engine after the
            // decision: decided again, no publish needed to know.
            Err(JournalError::Conflict(subject.clone()))
        };
        if let Ok(seq) = result {
            self.seen(&subject, seq, false);
        }
        drop(guard);
        {
            let mut in_flight = lock_async(&self.in_flight).await;
            if Arc::strong_count(&turn) == 2 {
                in_flight.remove(&subject);
            }
        }
        if let Err(JournalError::Conflict(_)) = &result {
            self.catch_up(&subject).await;
        }
        result
    }

    /// After a conflict: waits until this instance's engine has the subject's last
    /// record (the follower delivers it), so the statement is decided again on it.
    async fn catch_up(&self, subject: &str) {
        let last = match self.js.get_stream_no_info(&self.stream).await {
            Ok(stream) => stream
                .get_last_raw_message_by_subject(subject)
                .await
                .map_or(0, |m| m.sequence),
            Err(_) => 0,
        };
        let until = tokio::time::Instant::now() + self.ack_timeout;
        while lock(&self.subjects).get(subject).map_or(0, |s| s.last) < last
            && tokio::time::Instant::now() < until
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn append_inner(
        &self,
        payload: Bytes,
        keyed: Option<(String, u64)>,
    ) -> Result<u64, JournalError> {
        if let Some(cause) = self.poisoned.get() {
            return Err(JournalError::Unavailable(cause.clone()));
        }
        let (subject, expected) = match keyed {
            Some((subject, expected)) => (subject, Some(expected)),
            None => (self.subject_of(&payload), None),
        };
        let id = self.ids.next();
        // Before the first attempt: the follower may see it stored before any answer.
        lock(&self.own).insert(id.clone(), Own::Publishing);
        let published = self.publish(&subject, &id, &payload, expected).await;
        let result = match published {
            Published::Stored(seq) => {
                if let Some(Own::Stored(other)) = lock(&self.own).remove(&id)
                    && other != seq
                {
                    // JetStream's duplicate window should make this impossible: the
                    // flusher would wait for `other` forever.
                    tracing::error!(id, seq, other, "journal: one publish stored twice");
                }
                Ok(seq)
            }
            Published::Refused(err) => {
                lock(&self.own).remove(&id);
                if let JournalError::Unavailable(why) = &err {
                    *lock(&self.refused) = Some(why.clone());
                }
                Err(err)
            }
            Published::Unanswered(why) => self.settle(&subject, &id, why).await,
        };
        if let Ok(seq) = result {
            *lock(&self.refused) = None;
            self.durable.fetch_max(seq, Ordering::AcqRel);
        }
        result
    }

    /// Publishes under message id `id`, retrying for `ack_timeout` (at least
    /// `ATTEMPTS` times) until an attempt is answered.
    async fn publish(
        &self,
        subject: &str,
        id: &str,
        payload: &Bytes,
        expected: Option<u64>,
    ) -> Published {
        let mut last = PublishErrorKind::Other;
        // Whether an attempt may have been stored (no answer, rather than a refusal).
        let mut maybe_stored = false;
        let started = Instant::now();
        let mut attempt = 0;
        // At least `ATTEMPTS`, and for `ack_timeout`: a stream leader's election after
        // a node's loss answers "no responders" for a moment.
        while attempt < ATTEMPTS || started.elapsed() < self.ack_timeout {
            attempt += 1;
            match self.publish_once(subject, id, payload, expected).await {
                Ok(seq) => return Published::Stored(seq),
                // The subject moved on since the decision; unless an unanswered
                // attempt of this very message is what moved it.
                Err(PublishErrorKind::WrongLastSequence) if maybe_stored => {
                    return Published::Unanswered(format!(
                        "a retry found the key written after an attempt that got no \
                         answer ({last})"
                    ));
                }
                Err(PublishErrorKind::WrongLastSequence) => {
                    return Published::Refused(JournalError::Conflict(subject.to_owned()));
                }
                Err(PublishErrorKind::MaxPayloadExceeded) if !maybe_stored => {
                    return Published::Refused(JournalError::Unavailable(
                        PublishErrorKind::MaxPayloadExceeded.to_string(),
                    ));
                }
                Err(kind) => {
                    tracing::debug!(%kind, attempt, "journal: publish to JetStream failed");
                    // Nobody answered: no stream leader took it, nothing stored.
                    maybe_stored |= kind != PublishErrorKind::StreamNotFound;
                    last = kind;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        if maybe_stored {
            Published::Unanswered(format!("no answer to a publish ({last})"))
        } else {
            Published::Refused(JournalError::Unavailable(format!(
                "the last publish was refused: {last}"
            )))
        }
    }

    /// An append some attempt of which got no answer: its sequence number if the
    /// stream shows it stored (the follower saw it, or it is the last message of its
    /// subject), else `Indeterminate`, and the follower hands it to the engine if it
    /// is stored after all.
    async fn settle(&self, subject: &str, id: &str, why: String) -> Result<u64, JournalError> {
        if let Some(seq) = self.last_of_subject_if(subject, id).await {
            lock(&self.own).remove(id);
            tracing::info!(seq, id, "journal: an unanswered publish was stored");
            return Ok(seq);
        }
        let now = Instant::now();
        let mut own = lock(&self.own);
        if let Some(Own::Stored(seq)) = own.get(id).copied() {
            own.remove(id);
            tracing::info!(seq, id, "journal: an unanswered publish was stored");
            return Ok(seq);
        }
        own.retain(|_, o| !matches!(o, Own::GivenUp(at) if now.duration_since(*at) > GIVEN_UP_FOR));
        own.insert(id.to_owned(), Own::GivenUp(now));
        drop(own);
        let cause =
            format!("{why}; the write's outcome is unknown until the stream is followed past it");
        tracing::warn!(id, "journal: {cause}");
        *lock(&self.refused) = Some(cause.clone());
        Err(JournalError::Indeterminate(cause))
    }

    /// The sequence number of `subject`'s last message if it is message `id` (asked for
    /// `SETTLE_LOOKUP` at most: the stream just failed to answer for `ack_timeout`).
    async fn last_of_subject_if(&self, subject: &str, id: &str) -> Option<u64> {
        let stream = self.js.get_stream_no_info(&self.stream).await.ok()?;
        let lookup = stream.get_last_raw_message_by_subject(subject);
        let message = tokio::time::timeout(SETTLE_LOOKUP, lookup)
            .await
            .ok()?
            .ok()?;
        let headers = message.headers;
        let ours = headers.get("Nats-Msg-Id").is_some_and(|v| v.as_str() == id);
        ours.then_some(message.sequence)
    }

    async fn confirm_inner(&self, seq: u64) -> Result<(), JournalError> {
        let now = tokio::time::Instant::now();
        let seq = {
            let mut queue = lock(&self.to_purge);
            queue.push_back((now, seq));
            let mut through = None;
            while let Some((at, s)) = queue.front().copied() {
                if now.duration_since(at) < PURGE_DELAY {
                    break;
                }
                through = Some(s);
                queue.pop_front();
            }
            match through {
                Some(s) => s,
                None => return Ok(()),
            }
        };
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
        // Purged subjects have no last sequence in the stream any more.
        lock(&self.subjects).retain(|_, at| at.last > seq);
        Ok(())
    }
}

impl spillway_policies::engine::Log for NatsLog {
    fn append(
        &self,
        payload: Bytes,
    ) -> impl std::future::Future<Output = Result<u64, JournalError>> + Send {
        self.append_inner(payload, None)
    }

    fn append_keyed(
        &self,
        payload: Bytes,
        key: Option<(String, u64)>,
    ) -> impl std::future::Future<Output = Result<u64, JournalError>> + Send {
        self.append_keyed_inner(payload, key)
    }

    fn key_mark(&self, key: &str) -> u64 {
        self.key_mark_inner(key)
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

async fn lock_async<T>(m: &tokio::sync::Mutex<T>) -> tokio::sync::MutexGuard<'_, T> {
    m.lock().await
}
