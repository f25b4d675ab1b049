//! Opening the NATS journal: the connection to `journal.nats.servers`, the stream
//! created when missing (file storage, `journal.nats.replicas` copies, limits
//! retention: only the owner's purge after an applied batch removes records), and the
//! recovery read of every record after the ledger's applied sequence number.
//!
//! Invariant: recovery returns the stream's records from `applied + 1` to the stream's
//! last sequence number as it was when the read started, in order; the log's
//! `durable_seq` starts at that last sequence number, so the engine's ledger check
//! sees exactly what the stream holds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{self, pull};
use async_nats::jetstream::{self, stream};
use async_nats::{ConnectOptions, ServerAddr};
use spillway_policies::config::NatsJournalConfig;
use spillway_policies::journal::Record;
use tokio::sync::mpsc;

use super::{Foreign, MessageIds, NatsLog, OwnAppends, followed_own};

/// How long startup waits for the cluster's JetStream (a meta leader, the stream's
/// leader) before it gives up.
const READY_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("journal.nats.servers: {0}")]
    Address(String),
    #[error("connecting to NATS ({servers}): {error}")]
    Connect { servers: String, error: String },
    #[error("JetStream stream {stream} is not available: {error}")]
    Stream { stream: String, error: String },
    #[error("reading record {seq} of stream {stream}: {error}")]
    Read {
        stream: String,
        seq: u64,
        error: String,
    },
}

/// Connects, makes sure the stream exists, and reads the records after `applied`;
/// `epoch` is the ledger epoch this instance took.
pub async fn open(
    config: &NatsJournalConfig,
    epoch: u64,
    applied: u64,
) -> Result<(NatsLog, Vec<Record>), NatsError> {
    let addrs = config
        .servers
        .iter()
        .map(|s| s.parse::<ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| NatsError::Address(e.to_string()))?;
    let client = ConnectOptions::new()
        .name("spillway journal")
        .connection_timeout(Duration::from_secs(5))
        .connect(addrs)
        .await
        .map_err(|e| NatsError::Connect {
            servers: config.servers.join(", "),
            error: e.to_string(),
        })?;
    let mut js = jetstream::new(client.clone());
    js.set_timeout(config.ack_timeout);
    let stream_error = |error: String| NatsError::Stream {
        stream: config.stream.clone(),
        error,
    };
    let wanted = stream::Config {
        name: config.stream.clone(),
        subjects: vec![format!("{}.w.>", config.stream)],
        num_replicas: config.replicas,
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        ..Default::default()
    };
    // A cluster that just started elects its JetStream leaders first: retry a while.
    let started = Instant::now();
    let mut stream = loop {
        match js.get_or_create_stream(wanted.clone()).await {
            Ok(s) => break s,
            Err(e) if started.elapsed() < READY_WAIT => {
                tracing::debug!(error = %e, "journal: JetStream not ready yet");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(stream_error(e.to_string())),
        }
    };
    let state = loop {
        match stream.info().await {
            Ok(info) => break info.state.clone(),
            Err(e) if started.elapsed() < READY_WAIT => {
                tracing::debug!(error = %e, "journal: stream info not available yet");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(stream_error(e.to_string())),
        }
    };
    let last = state.last_sequence;
    let mut records = Vec::new();
    for seq in (applied + 1).max(state.first_sequence)..=last {
        let message = stream
            .get_raw_message(seq)
            .await
            .map_err(|e| NatsError::Read {
                stream: config.stream.clone(),
                seq,
                error: e.to_string(),
            })?;
        records.push(Record {
            seq,
            payload: message.payload,
        });
    }
    tracing::info!(
        stream = %config.stream, first = state.first_sequence, last, applied,
        records = records.len(), "journal: JetStream stream opened"
    );
    let nonce = format!("{:016x}-{epoch}", rand::random::<u64>());
    let own: OwnAppends = Arc::default();
    let poisoned: Arc<OnceLock<String>> = Arc::default();
    let follower = follow(
        &stream,
        last + 1,
        nonce.clone(),
        own.clone(),
        poisoned.clone(),
    )
    .await
    .map_err(stream_error)?;
    let log = NatsLog {
        js,
        stream: config.stream.clone(),
        epoch,
        ids: MessageIds {
            nonce,
            next: AtomicU64::new(0),
        },
        durable: AtomicU64::new(last),
        poisoned,
        own,
        client,
        follower: Mutex::new(Some(follower.1)),
        durable_feed: follower.0,
        subjects: Mutex::new(HashMap::new()),
        in_flight: tokio::sync::Mutex::new(HashMap::new()),
        ack_timeout: config.ack_timeout,
        to_purge: Mutex::new(std::collections::VecDeque::new()),
        refused: Mutex::new(None),
    };
    Ok((log, records))
}

/// Records other instances append, from `start` on, in stream order: an ordered
/// consumer (recreated by the client after a gap or a lost connection). This process's
/// own publishes (their message ids start with `nonce`) are skipped, since `append`
/// makes them pending itself, except those whose append was given up as indeterminate
/// (`own`, see `followed_own`): the engine gets them like another instance's. Returns
/// the highest sequence number seen (shared with the log's `durable_seq`) and the
/// receiver the write service drains into the engine; sets `poisoned` if the consumer
/// ends, since nothing would settle a given-up append any more.
async fn follow(
    stream: &jetstream::stream::Stream,
    start: u64,
    nonce: String,
    own: OwnAppends,
    poisoned: Arc<OnceLock<String>>,
) -> Result<(Arc<AtomicU64>, Foreign), String> {
    use futures_util::StreamExt;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::unbounded_channel();
    let seen = Arc::new(AtomicU64::new(start.saturating_sub(1)));
    let high = seen.clone();
    tokio::spawn(async move {
        while let Some(next) = messages.next().await {
            let message = match next {
                Ok(m) => m,
                Err(err) => {
                    tracing::debug!(%err, "journal: following the stream");
                    continue;
                }
            };
            let Ok(info) = message.info() else { continue };
            let seq = info.stream_sequence;
            let id = message
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|id| id.as_str());
            let forward = match id {
                Some(id) if id.starts_with(&nonce) => followed_own(&own, id, seq),
                _ => true,
            };
            let subject = message.subject.to_string();
            if forward && tx.send((seq, subject, message.payload.clone())).is_err() {
                return;
            }
            high.fetch_max(seq, Ordering::AcqRel);
        }
        let cause = "the follower of the stream ended: an append without an answer could \
                     not be settled any more; appends stopped until a restart"
            .to_owned();
        tracing::error!("journal: {cause}");
        let _ = poisoned.set(cause);
    });
    Ok((seen, rx))
}
