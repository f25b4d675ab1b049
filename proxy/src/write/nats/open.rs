//! Opening the NATS journal: the connection to `journal.nats.servers`, the stream
//! created when missing (file storage, `journal.nats.replicas` copies, limits
//! retention: only the owner's purge after an applied batch removes records), and the
//! recovery read of every record after the ledger's applied sequence number.
//!
//! Invariant: recovery returns the stream's records from `applied + 1` to the stream's
//! last sequence number as it was when the read started, in order; the log's
//! `durable_seq` starts at that last sequence number, so the engine's ledger check
//! sees exactly what the stream holds.

use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use async_nats::{ConnectOptions, ServerAddr};
use spillway_policies::config::NatsJournalConfig;
use spillway_policies::journal::Record;

use super::NatsLog;

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
    let log = NatsLog {
        js,
        stream: config.stream.clone(),
        epoch,
        nonce: format!("{:016x}-{epoch}", rand::random::<u64>()),
        next_id: AtomicU64::new(0),
        durable: AtomicU64::new(last),
        poisoned: OnceLock::new(),
        client,
    };
    Ok((log, records))
}
