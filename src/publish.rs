//! Publish: the output topic (`ragar.image.v1`) and the dead-letter topic.
//!
//! One idempotent producer (`enable.idempotence`, `acks=all`) serves both. A send is retried until
//! the broker confirms it, because the message's offset is acknowledged only after that; a
//! dead-lettered message keeps its original key, value and headers, and gains `ragar.*` headers
//! naming the error and where it came from (`schemas/ragar.dlq.v1.json`).
//!
//! In exactly-once mode (`kafka.exactly_once`) the producer is transactional: a transaction is
//! always open, every send goes into it, and the consumer side commits it together with the
//! offsets completed meanwhile ([`Publisher::commit_transaction`]). A send and the
//! acknowledgement of the message it completes happen under one [`Publisher::enter`] guard, and a
//! commit takes the guard exclusively, so no commit falls between an output and its offset.

use std::time::Duration;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use tokio::sync::{Notify, OwnedRwLockReadGuard, RwLock};
use tokio_util::sync::CancellationToken;

use crate::config::KafkaConfig;
use crate::event::DecodeError;
use crate::ingest::{base_client_config, Consumed};
use crate::offsets::{AckToken, Acks, TopicPartition};
use crate::telemetry::{names, now_ms};

pub const IMAGE_SCHEMA: &str = "ragar.image.v1";
pub const DLQ_SCHEMA: &str = "ragar.dlq.v1";

/// The output message, one per display request.
#[derive(Debug, Clone, Serialize)]
pub struct ImageMessage {
    pub schema: &'static str,
    pub request_id: String,
    pub event_id: String,
    pub user_id: String,
    pub item_id: String,
    pub image: ImagePayload,
    /// Index of the published candidate.
    pub chosen: usize,
    pub scores: ScoresOut,
    pub candidates: Vec<CandidateOut>,
    pub history: Vec<HistoryOut>,
    pub weighting: WeightingOut,
    pub models: ModelsOut,
    pub seed: u64,
    pub latency_ms: LatencyOut,
    pub produced_at_ms: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImagePayload {
    pub format: &'static str,
    pub width: u32,
    pub height: u32,
    pub base64: String,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct ScoresOut {
    pub personalization: f32,
    pub fidelity: f32,
    pub total: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct CandidateOut {
    pub index: usize,
    pub seed: u64,
    pub personalization: f32,
    pub fidelity: f32,
    pub total: f32,
    /// The candidate's image, with `generate.publish_candidate_images`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<ImagePayload>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HistoryOut {
    pub event_id: String,
    pub item_id: String,
    pub action: crate::event::Action,
    pub similarity: f32,
    pub weight: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct WeightingOut {
    pub mode: &'static str,
    pub k: usize,
    pub tau: f32,
    pub history_len: usize,
    pub source: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelsOut {
    pub encoder: String,
    pub generator: String,
    pub ranker: String,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LatencyOut {
    pub queue: f64,
    pub history: f64,
    pub preference: f64,
    pub generate: f64,
    pub rank: f64,
    pub total: f64,
}

/// Builds the `ragar.*` headers of a dead-lettered message.
pub fn dlq_headers(msg: &Consumed, error: &DecodeError) -> Vec<(String, String)> {
    vec![
        ("ragar.dlq.schema".into(), DLQ_SCHEMA.into()),
        ("ragar.error.kind".into(), error.kind.as_str().into()),
        ("ragar.error".into(), truncate(&error.message, 4096)),
        ("ragar.source.topic".into(), msg.token.tp.topic.clone()),
        (
            "ragar.source.partition".into(),
            msg.token.tp.partition.to_string(),
        ),
        ("ragar.source.offset".into(), msg.token.offset.to_string()),
        ("ragar.failed_at_ms".into(), now_ms().to_string()),
    ]
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// The producer for outputs and dead letters.
#[derive(Clone)]
pub struct Publisher {
    producer: FutureProducer,
    output_topic: String,
    dlq_topic: String,
    /// Cancelled when the worker stops waiting: sends stop retrying and nothing more is acknowledged.
    abort: CancellationToken,
    /// Exactly-once mode: the open transaction's gate.
    txn: Option<Arc<TxnGate>>,
    txn_timeout: Duration,
}

/// Held from a send until the acknowledgement of what it completes (see the module header).
pub type SendGuard = Option<OwnedRwLockReadGuard<()>>;

/// Why a transaction could not be committed; the worker stops on it.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("the work below the transaction's barrier did not complete within {0:?}")]
    Timeout(Duration),
    #[error("committing the transaction: {0}")]
    Kafka(#[from] KafkaError),
}

/// What orders sends and commits in exactly-once mode.
///
/// A commit sets a *barrier*: per partition, the offset below which every message had been
/// handed out. Sends for messages below it go on; sends for messages at or past it wait until
/// the commit is done. Once everything below the barrier is complete, the transaction commits
/// with the barrier as the consumed offsets: so a transaction holds exactly the outputs of the
/// offsets it commits, even though messages complete out of order.
struct TxnGate {
    /// Sends hold it shared from the send until their acknowledgement; a commit exclusively.
    sends: Arc<RwLock<()>>,
    barrier: std::sync::Mutex<Option<HashMap<TopicPartition, i64>>>,
    lifted: Notify,
    /// One commit at a time (the timer's and a rebalance's).
    commits: std::sync::Mutex<()>,
    /// Set after the final commit: nothing more is committed.
    closed: std::sync::atomic::AtomicBool,
}

impl TxnGate {
    fn blocks(&self, token: &AckToken) -> bool {
        match &*self.barrier.lock().unwrap_or_else(|p| p.into_inner()) {
            None => false,
            Some(barrier) => barrier.get(&token.tp).is_none_or(|&b| token.offset >= b),
        }
    }

    fn set_barrier(&self, barrier: Option<HashMap<TopicPartition, i64>>) {
        *self.barrier.lock().unwrap_or_else(|p| p.into_inner()) = barrier;
    }
}

impl Publisher {
    /// `max_payload_bytes` is the largest input the worker accepts; the producer must be able to
    /// send such a message on to the DLQ with its headers.
    pub fn new(
        cfg: &KafkaConfig,
        max_payload_bytes: usize,
        abort: CancellationToken,
    ) -> Result<Publisher, KafkaError> {
        let max_message = (max_payload_bytes + (64 << 10)).max(1_000_000).to_string();
        let mut config = base_client_config(cfg);
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set(
                "linger.ms",
                cfg.options.get("linger.ms").map_or("5", String::as_str),
            )
            .set(
                "message.max.bytes",
                cfg.options.get("message.max.bytes").unwrap_or(&max_message),
            );
        if cfg.exactly_once {
            config.set("transactional.id", cfg.transactional_id()).set(
                "transaction.timeout.ms",
                cfg.transaction_timeout.as_millis().to_string(),
            );
        }
        let producer: FutureProducer = config.create()?;
        let txn_timeout = cfg.transaction_timeout;
        if cfg.exactly_once {
            // Fences an earlier instance with the same id and aborts its open transaction.
            crate::ingest::blocking(|| producer.init_transactions(txn_timeout))?;
            producer.begin_transaction()?;
            tracing::info!(transactional_id = %cfg.transactional_id(), "exactly-once mode: transactions on");
        }
        Ok(Publisher {
            producer,
            output_topic: cfg.output_topic.clone(),
            dlq_topic: cfg.dlq_topic.clone(),
            abort,
            txn: cfg.exactly_once.then(|| {
                Arc::new(TxnGate {
                    sends: Arc::new(RwLock::new(())),
                    barrier: std::sync::Mutex::new(None),
                    lifted: Notify::new(),
                    commits: std::sync::Mutex::new(()),
                    closed: std::sync::atomic::AtomicBool::new(false),
                })
            }),
            txn_timeout,
        })
    }

    /// Whether outputs go out in transactions (`kafka.exactly_once`).
    pub fn transactional(&self) -> bool {
        self.txn.is_some()
    }

    /// Keeps the open transaction from being committed until the guard is dropped: take it before
    /// the send for `token`'s message and drop it after acknowledging that message. While a
    /// commit's barrier stands, a message at or past it waits here for the next transaction.
    pub async fn enter(&self, token: &AckToken) -> SendGuard {
        let gate = self.txn.as_ref()?;
        loop {
            let lifted = gate.lifted.notified();
            tokio::pin!(lifted);
            lifted.as_mut().enable();
            if !gate.blocks(token) {
                return Some(Arc::clone(&gate.sends).read_owned().await);
            }
            lifted.await;
        }
    }

    /// Commits the open transaction at a barrier and begins the next (`reopen`), or closes it
    /// for good. Blocking (librdkafka's transactional calls are), so it runs on a blocking
    /// thread or in the rebalance callback. Waits at most `wait` for the work below the barrier;
    /// returns the offsets committed (none when nothing moved). An error leaves the transaction
    /// unusable: the caller stops the worker, and the next instance replays from the last
    /// committed offsets, its `init_transactions` aborting this one's open transaction.
    pub fn commit_transaction(
        &self,
        acks: &Acks,
        group: Option<ConsumerGroupMetadata>,
        reopen: bool,
        wait: Duration,
    ) -> Result<Vec<(TopicPartition, i64)>, CommitError> {
        let Some(gate) = &self.txn else {
            return Ok(Vec::new());
        };
        let _one = gate.commits.lock().unwrap_or_else(|p| p.into_inner());
        if gate.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(Vec::new());
        }
        let barrier = acks.positions();
        gate.set_barrier(Some(barrier.iter().cloned().collect()));
        let result = (|| -> Result<Vec<(TopicPartition, i64)>, CommitError> {
            let reached = acks
                .wait_reached(&barrier, Instant::now() + wait)
                .ok_or(CommitError::Timeout(wait))?;
            let _no_sends = gate.sends.blocking_write();
            let mut offsets = TopicPartitionList::new();
            for (tp, offset) in &reached {
                offsets.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*offset))?;
            }
            if offsets.count() > 0 {
                let group = group.ok_or_else(|| {
                    KafkaError::Subscription("the consumer has no group metadata".into())
                })?;
                self.producer
                    .send_offsets_to_transaction(&offsets, &group, self.txn_timeout)?;
            }
            self.producer.commit_transaction(self.txn_timeout)?;
            metrics::counter!(names::COMMITS, "reason" => "transaction").increment(1);
            if reopen {
                self.producer.begin_transaction()?;
            } else {
                gate.closed.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            Ok(reached)
        })();
        if result.is_err() {
            // Nothing more may be acknowledged into a broken transaction: keep the barrier up.
            gate.closed.store(true, std::sync::atomic::Ordering::SeqCst);
            return result;
        }
        gate.set_barrier(None);
        gate.lifted.notify_waiters();
        result
    }

    /// Aborts the open transaction (exactly-once mode, when the worker stops without committing
    /// it): read_committed consumers never see its outputs, and its offsets are replayed.
    pub fn abort_transaction(&self) {
        if let Some(gate) = &self.txn {
            gate.closed.store(true, std::sync::atomic::Ordering::SeqCst);
            if let Err(e) = self.producer.abort_transaction(self.txn_timeout) {
                tracing::warn!(error = %e, "aborting the transaction");
            }
        }
    }

    /// Publishes an output, keyed by user, retrying until the broker confirms it.
    pub async fn publish(&self, msg: &ImageMessage) -> Result<(), KafkaError> {
        let payload = serde_json::to_vec(msg).expect("output messages serialize");
        self.send(
            &self.output_topic,
            Some(msg.user_id.as_bytes()),
            &payload,
            OwnedHeaders::new(),
        )
        .await
    }

    /// Sends the original message to the DLQ with headers naming `error`, retrying until confirmed.
    pub async fn dead_letter(&self, msg: &Consumed, error: &DecodeError) -> Result<(), KafkaError> {
        let mut headers = OwnedHeaders::new_with_capacity(msg.headers.len() + 7);
        for (k, v) in msg.headers.iter().filter(|(k, _)| !k.starts_with("ragar.")) {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        for (k, v) in dlq_headers(msg, error) {
            headers = headers.insert(Header {
                key: &k,
                value: Some(&v),
            });
        }
        metrics::counter!(names::DLQ, "kind" => error.kind.as_str()).increment(1);
        tracing::debug!(topic = %msg.token.tp.topic, partition = msg.token.tp.partition, offset = msg.token.offset, %error, "dead-lettering");
        self.send(
            &self.dlq_topic,
            msg.key.as_deref(),
            msg.payload.as_deref().unwrap_or_default(),
            headers,
        )
        .await
    }

    /// Sends until the broker confirms. Fails with [`KafkaError::Canceled`] when the worker aborts,
    /// or with the broker's error when it refuses this very message (retrying cannot help).
    async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: OwnedHeaders,
    ) -> Result<(), KafkaError> {
        let mut backoff = Duration::from_millis(50);
        loop {
            let mut record = FutureRecord::<[u8], [u8]>::to(topic)
                .payload(payload)
                .headers(headers.clone());
            if let Some(k) = key {
                record = record.key(k);
            }
            let result = tokio::select! {
                _ = self.abort.cancelled() => return Err(KafkaError::Canceled),
                r = self.producer.send(record, Duration::from_secs(30)) => r,
            };
            match result {
                Ok(_) => return Ok(()),
                Err((e, _)) if refuses_message(&e) => return Err(e),
                Err((e, _)) => {
                    tracing::warn!(topic, error = %e, "send failed; retrying");
                    tokio::select! {
                        _ = self.abort.cancelled() => return Err(KafkaError::Canceled),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Errors about the message itself, which no retry fixes (authorization and the like are
/// configuration problems: those are retried until an operator fixes them).
fn refuses_message(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(C::MessageSizeTooLarge) | Some(C::InvalidMessageSize) | Some(C::InvalidMessage)
    )
}
