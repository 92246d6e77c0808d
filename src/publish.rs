//! Publish: the output topic (`ragar.image.v1`) and the dead-letter topic.
//!
//! One idempotent producer (`enable.idempotence`, `acks=all`) serves both. A send is retried until
//! the broker confirms it, because the message's offset is acknowledged only after that; a
//! dead-lettered message keeps its original key, value and headers, and gains `ragar.*` headers
//! naming the error and where it came from (`schemas/ragar.dlq.v1.json`).

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::KafkaConfig;
use crate::event::DecodeError;
use crate::ingest::{base_client_config, Consumed};
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
        let producer: FutureProducer = base_client_config(cfg)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set(
                "linger.ms",
                cfg.options.get("linger.ms").map_or("5", String::as_str),
            )
            .set(
                "message.max.bytes",
                cfg.options.get("message.max.bytes").unwrap_or(&max_message),
            )
            .create()?;
        Ok(Publisher {
            producer,
            output_topic: cfg.output_topic.clone(),
            dlq_topic: cfg.dlq_topic.clone(),
            abort,
        })
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
