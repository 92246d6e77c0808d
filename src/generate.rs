//! Generate → rank → publish: the display path after preference extraction.
//!
//! Display jobs that arrive together are batched (up to `generate.batch_max`, waiting at most
//! `generate.batch_delay` for the first one's companions). The generator and the ranker run on a
//! blocking thread with a cancellation token, so the reactor (and the Kafka consumer) keeps
//! going while the model works. The best candidate of each job is published; its display event is
//! acknowledged once the broker has the output, and its request id is remembered in Redis so a
//! replay does not publish it again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use rdkafka::error::KafkaError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::{DecodeError, DisplayEvent, DlqKind};
use crate::history::store::History;
use crate::ingest::Consumed;
use crate::model::{
    best, Candidate, GenerationRequest, Generator, Image, ModelError, Ranker, Scores,
};
use crate::offsets::Acks;
use crate::preference::Params;
use crate::publish::{
    CandidateOut, HistoryOut, ImageMessage, ImagePayload, LatencyOut, ModelsOut, Publisher,
    ScoresOut, WeightingOut, IMAGE_SCHEMA,
};
use crate::telemetry::{names, now_ms};

/// A display request with its history resolved, waiting for the generator.
pub struct DisplayJob {
    pub msg: Consumed,
    pub event: DisplayEvent,
    pub reference_image: Arc<Image>,
    pub reference_embedding: Arc<[f32]>,
    pub preference: Option<Arc<[f32]>>,
    /// How far the history items behind `preference` agree ([`crate::preference::preference`]).
    pub preference_agreement: Option<f32>,
    /// The history items that took part, with their weights.
    pub used: Vec<HistoryOut>,
    pub history_len: usize,
    pub source: &'static str,
    pub seed: u64,
    pub seeds: Vec<u64>,
    /// The reference's text and the used history items' texts with their weights, resolved
    /// only for generators that want them ([`Generator::wants_texts`]).
    pub reference_text: Option<Arc<str>>,
    pub prompt_hints: Vec<(String, f32)>,
    /// Filled in stage by stage.
    pub latency: LatencyOut,
}

pub struct GenerateStage {
    pub generator: Arc<dyn Generator>,
    pub ranker: Arc<dyn Ranker>,
    pub encoder_version: String,
    pub history: Arc<History>,
    pub publisher: Publisher,
    pub acks: Arc<Acks>,
    pub params: Params,
    pub batch_max: usize,
    pub batch_delay: Duration,
    /// Cancelled when the worker stops waiting: the model stops between steps.
    pub cancel: CancellationToken,
    /// Every candidate's image goes into the output (`generate.publish_candidate_images`).
    pub candidate_images: bool,
}

fn png_payload(img: &Image, png: &[u8]) -> ImagePayload {
    ImagePayload {
        format: "png",
        width: img.width,
        height: img.height,
        base64: base64::engine::general_purpose::STANDARD.encode(png),
    }
}

/// Dynamic batching: waits for a first job, then takes whatever else arrives within `delay` of
/// it, up to `max` jobs. `None` once the channel is closed and empty.
pub async fn next_batch<T>(
    rx: &mut mpsc::Receiver<T>,
    max: usize,
    delay: Duration,
) -> Option<Vec<T>> {
    let first = rx.recv().await?;
    let mut batch = vec![first];
    let deadline = tokio::time::Instant::now() + delay;
    while batch.len() < max {
        // What is already queued joins without waiting; then wait out the delay for the rest.
        match rx.try_recv() {
            Ok(job) => {
                batch.push(job);
                continue;
            }
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) => {}
        }
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(job)) => batch.push(job),
            Ok(None) | Err(_) => break,
        }
    }
    Some(batch)
}

type ModelOutput = (Vec<Vec<Candidate>>, Vec<Vec<Scores>>, f64, f64);

impl GenerateStage {
    pub async fn run(self, mut rx: mpsc::Receiver<DisplayJob>) {
        while let Some(batch) = next_batch(&mut rx, self.batch_max, self.batch_delay).await {
            metrics::histogram!(names::GENERATION_BATCH).record(batch.len() as f64);
            if self.process(batch).await.is_err() {
                return;
            }
        }
    }

    async fn process(&self, batch: Vec<DisplayJob>) -> Result<(), ModelError> {
        let requests: Vec<GenerationRequest> = batch
            .iter()
            .map(|j| GenerationRequest {
                reference: j.reference_image.clone(),
                reference_embedding: j.reference_embedding.clone(),
                preference: j.preference.clone(),
                preference_agreement: j.preference_agreement,
                seeds: j.seeds.clone(),
                reference_text: j.reference_text.clone(),
                prompt_hints: j.prompt_hints.clone(),
            })
            .collect();
        let (generator, ranker, cancel) = (
            self.generator.clone(),
            self.ranker.clone(),
            self.cancel.clone(),
        );
        let result = tokio::task::spawn_blocking(move || -> Result<ModelOutput, ModelError> {
            let t = Instant::now();
            let candidates = generator.generate(&requests, &cancel)?;
            let generate_s = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let scores = requests
                .iter()
                .zip(&candidates)
                .map(|(r, c)| ranker.score(r, c))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((candidates, scores, generate_s, t.elapsed().as_secs_f64()))
        })
        .await
        .unwrap_or_else(|e| Err(ModelError::Other(format!("model task failed: {e}"))));

        let (candidates, scores, generate_s, rank_s) = match result {
            Ok(out) => out,
            Err(ModelError::Cancelled) => return Err(ModelError::Cancelled),
            Err(e) => {
                tracing::error!(error = %e, jobs = batch.len(), "generation failed; dead-lettering the batch");
                for job in batch {
                    self.fail(job, format!("generation failed: {e}")).await;
                }
                return Ok(());
            }
        };
        metrics::histogram!(names::STAGE_SECONDS, "stage" => "generate").record(generate_s);
        metrics::histogram!(names::STAGE_SECONDS, "stage" => "rank").record(rank_s);

        let publishes = batch
            .into_iter()
            .zip(candidates)
            .zip(scores)
            .map(|((job, cands), scores)| self.publish_one(job, cands, scores, generate_s, rank_s));
        futures::future::join_all(publishes).await;
        Ok(())
    }

    async fn publish_one(
        &self,
        mut job: DisplayJob,
        cands: Vec<Candidate>,
        scores: Vec<Scores>,
        generate_s: f64,
        rank_s: f64,
    ) {
        let Some(chosen) =
            best(&scores).filter(|_| cands.len() == scores.len() && cands.len() == job.seeds.len())
        else {
            return self
                .fail(
                    job,
                    "the generator or ranker returned the wrong number of candidates".into(),
                )
                .await;
        };
        let png = match cands[chosen].image.to_png() {
            Ok(p) => p,
            Err(e) => {
                return self
                    .fail(job, format!("encoding the chosen image: {e}"))
                    .await
            }
        };
        job.latency.generate = generate_s * 1e3;
        job.latency.rank = rank_s * 1e3;
        let received = job.msg.received;
        job.latency.total = received.elapsed().as_secs_f64() * 1e3;
        job.latency.queue = (job.latency.total
            - job.latency.history
            - job.latency.preference
            - job.latency.generate
            - job.latency.rank)
            .max(0.0);
        let s = scores[chosen];
        let img = &cands[chosen].image;
        let message = ImageMessage {
            schema: IMAGE_SCHEMA,
            request_id: job.event.request_id.clone(),
            event_id: job.event.event_id.clone(),
            user_id: job.event.user_id.clone(),
            item_id: job.event.item_id.clone(),
            image: png_payload(img, &png),
            chosen,
            scores: ScoresOut {
                personalization: s.personalization,
                fidelity: s.fidelity,
                total: s.total,
            },
            candidates: scores
                .iter()
                .enumerate()
                .map(|(index, s)| CandidateOut {
                    index,
                    seed: job.seeds[index],
                    personalization: s.personalization,
                    fidelity: s.fidelity,
                    total: s.total,
                    image: if !self.candidate_images || index == chosen {
                        None
                    } else {
                        cands[index]
                            .image
                            .to_png()
                            .ok()
                            .map(|png| png_payload(&cands[index].image, &png))
                    },
                })
                .collect(),
            history: std::mem::take(&mut job.used),
            weighting: WeightingOut {
                mode: self.params.mode.as_str(),
                k: self.params.k,
                tau: self.params.tau,
                history_len: job.history_len,
                source: job.source,
            },
            models: ModelsOut {
                encoder: self.encoder_version.clone(),
                generator: self.generator.version().to_string(),
                ranker: self.ranker.version().to_string(),
            },
            seed: job.seed,
            latency_ms: job.latency,
            produced_at_ms: now_ms(),
        };
        let t = Instant::now();
        let txn = self.publisher.enter(&job.msg.token).await;
        match self.publisher.publish(&message).await {
            Ok(()) => {
                metrics::histogram!(names::STAGE_SECONDS, "stage" => "publish")
                    .record(t.elapsed().as_secs_f64());
                // With transactions a replay only follows an aborted output: never skip it.
                if !self.publisher.transactional() {
                    self.history.mark_output_done(&message.request_id).await;
                }
                metrics::counter!(names::OUTPUTS, "outcome" => "published").increment(1);
                metrics::counter!(names::EVENTS, "type" => "display", "outcome" => "ok")
                    .increment(1);
                metrics::histogram!(names::END_TO_END_SECONDS)
                    .record(received.elapsed().as_secs_f64());
                self.acks.complete(&job.msg.token);
            }
            // Aborting: not acknowledged, so the display is replayed.
            Err(KafkaError::Canceled) => {}
            Err(e) => {
                drop(txn);
                self.fail(job, format!("the output topic refused the message: {e}"))
                    .await
            }
        }
    }

    async fn fail(&self, job: DisplayJob, reason: String) {
        let error = DecodeError::new(DlqKind::Processing, reason);
        metrics::counter!(names::EVENTS, "type" => "display", "outcome" => "dlq").increment(1);
        let _txn = self.publisher.enter(&job.msg.token).await;
        match self.publisher.dead_letter(&job.msg, &error).await {
            Ok(()) => self.acks.complete(&job.msg.token),
            Err(KafkaError::Canceled) => {}
            Err(e) => {
                tracing::error!(error = %e, "the DLQ refused this display itself; acknowledging it to keep the partition flowing");
                self.acks.complete(&job.msg.token);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batches_take_what_is_queued_up_to_the_maximum() {
        let (tx, mut rx) = mpsc::channel(16);
        for i in 0..7 {
            tx.send(i).await.unwrap();
        }
        // A long delay is not waited out once the batch is full.
        let long = Duration::from_secs(3600);
        assert_eq!(next_batch(&mut rx, 4, long).await, Some(vec![0, 1, 2, 3]));
        drop(tx);
        // A closed channel ends the batch early, then ends the stream.
        assert_eq!(next_batch(&mut rx, 4, long).await, Some(vec![4, 5, 6]));
        assert_eq!(next_batch(&mut rx, 4, long).await, None);
    }

    #[tokio::test]
    async fn a_zero_delay_still_takes_what_is_already_queued() {
        let (tx, mut rx) = mpsc::channel(16);
        tx.send(1).await.unwrap();
        assert_eq!(next_batch(&mut rx, 8, Duration::ZERO).await, Some(vec![1]));
        tx.send(2).await.unwrap();
        let sender = tokio::spawn(async move {
            tx.send(3).await.unwrap();
            tx
        });
        let _tx = sender.await.unwrap();
        // Both are queued now: a zero delay still takes what is already there.
        assert_eq!(
            next_batch(&mut rx, 8, Duration::ZERO).await,
            Some(vec![2, 3])
        );
    }
}
