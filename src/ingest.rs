//! Ingest: the Kafka consumer group, at-least-once.
//!
//! `enable.auto.offset.store` is off: an offset is stored only when [`Acks`] says every message up
//! to it is done, and librdkafka commits the stored offsets on a timer (`kafka.commit_interval`).
//! In exactly-once mode the consumer commits nothing itself: the offsets go into the producer's
//! transaction ([`crate::publish::Publisher::commit_transaction`]) on the same timer, on revoke
//! and on shutdown.
//! On partition revoke the callback waits (up to `kafka.rebalance_drain`) for the revoked
//! partitions' work to finish, stores their watermarks and commits synchronously; on shutdown the
//! worker does the same for everything. At `kafka.max_in_flight` messages in flight the consumer
//! stops reading; if that lasts `kafka.pause_after`, it pauses its partitions and keeps polling,
//! so it stays in its group without buffering, and resumes at half the limit.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::KafkaConfig;
use crate::offsets::{AckToken, Acks, TopicPartition};
use crate::publish::{CommitError, Publisher};
use crate::telemetry::{names, now_ms, Health};

/// The most messages the consumer loop takes in one go without awaiting (those librdkafka has
/// already fetched), between its checks of failures, offsets and the in-flight limit.
const DRAIN_MAX: usize = 256;

/// Time the consumer spends throttled by backpressure (holding off reading, or paused), on the
/// loop's own clock: whatever state an iteration leaves lasts until the next one. Exported as a
/// counter of whole seconds, so that "throttled most of the last 15 minutes" is a rate, whether
/// the consumer stays paused or cycles between pausing and resuming.
#[derive(Debug)]
struct ThrottleClock {
    last: Instant,
    throttled: bool,
    /// Throttled time not yet exported (under a second).
    pending: Duration,
}

impl ThrottleClock {
    fn new(now: Instant) -> ThrottleClock {
        ThrottleClock {
            last: now,
            throttled: false,
            pending: Duration::ZERO,
        }
    }

    /// Records the state the loop is in from `now` on; returns the throttled time since the last
    /// call and the whole seconds of it (with earlier remainders) that are due to the counter.
    fn observe(&mut self, throttled: bool, now: Instant) -> (Duration, u64) {
        let mut elapsed = Duration::ZERO;
        if self.throttled {
            elapsed = now.saturating_duration_since(self.last);
            self.pending += elapsed;
        }
        self.last = now;
        self.throttled = throttled;
        let whole = self.pending.as_secs();
        self.pending -= Duration::from_secs(whole);
        (elapsed, whole)
    }
}

/// A consumed message, owned, with the token that completes it.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub token: AckToken,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// The Kafka timestamp, else the time it was received.
    pub timestamp_ms: i64,
    pub received: Instant,
}

/// The settings every client of the worker shares: brokers and the pass-through options.
pub fn base_client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    for (k, v) in &cfg.options {
        c.set(k, v);
    }
    c
}

/// librdkafka callbacks: rebalance handling and consumer-lag statistics.
pub struct IngestContext {
    acks: Arc<Acks>,
    drain: Duration,
    /// Set while partitions are paused, so newly assigned ones are paused too.
    paused: Arc<AtomicBool>,
    /// Exactly-once mode: the transactional producer that commits the offsets.
    txn: Option<Publisher>,
    /// A transaction commit failed in a callback; the consumer loop stops the worker with it.
    failed: Arc<std::sync::Mutex<Option<CommitError>>>,
}

impl ClientContext for IngestContext {
    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                if *partition >= 0 && p.consumer_lag >= 0 {
                    metrics::gauge!(names::CONSUMER_LAG, "topic" => topic.clone(), "partition" => partition.to_string())
                        .set(p.consumer_lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for IngestContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let tps: Vec<TopicPartition> = tpl
            .elements()
            .iter()
            .map(|e| TopicPartition::new(e.topic(), e.partition()))
            .collect();
        // librdkafka runs this callback inside the consumer's poll, on a runtime thread: let the
        // runtime move its other tasks away while this thread waits for the stages to finish.
        let deadline = Instant::now() + self.drain;
        let drained = blocking(|| self.acks.wait_drained(&tps, deadline));
        if let Some(publisher) = &self.txn {
            // The revoked partitions' offsets go into the transaction, with their outputs.
            if !consumer.assignment_lost() {
                let result = blocking(|| {
                    publisher.commit_transaction(
                        &self.acks,
                        consumer.group_metadata(),
                        true,
                        self.drain,
                    )
                });
                match result {
                    Ok(_) => metrics::counter!(names::COMMITS, "reason" => "revoke").increment(1),
                    Err(e) => {
                        tracing::error!(error = %e, "committing the transaction on revoke");
                        *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    }
                }
            }
            self.acks.remove(&tps);
        } else {
            let marks = self.acks.remove(&tps);
            if !consumer.assignment_lost() {
                commit_on_revoke(consumer, &marks);
            }
        }
        // This member no longer reports these partitions' lag: do not leave a stale value behind
        // (the new owner reports its own).
        for tp in &tps {
            metrics::gauge!(names::CONSUMER_LAG, "topic" => tp.topic.clone(), "partition" => tp.partition.to_string())
                .set(0.0);
        }
        tracing::info!(partitions = tps.len(), drained, "partitions revoked");
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            tracing::info!(partitions = tpl.count(), "partitions assigned");
            if self.paused.load(Ordering::SeqCst) {
                if let Err(e) = consumer.pause(tpl) {
                    tracing::warn!(error = %e, "pausing newly assigned partitions");
                }
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        match result {
            Ok(()) => metrics::counter!(names::COMMITS, "reason" => "timer").increment(1),
            Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => tracing::warn!(error = %e, "offset commit failed"),
        }
    }
}

/// At-least-once mode's commit on revoke: the revoked partitions' watermarks, synchronously.
fn commit_on_revoke(consumer: &BaseConsumer<IngestContext>, marks: &[(TopicPartition, i64)]) {
    if let Err(e) = store(consumer, marks) {
        tracing::warn!(error = %e, "storing offsets on revoke");
    }
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {
            metrics::counter!(names::COMMITS, "reason" => "revoke").increment(1);
        }
        Err(e) => tracing::warn!(error = %e, "committing offsets on revoke"),
    }
}

/// Runs a blocking wait, telling a multi-threaded tokio runtime about it when there is one.
pub(crate) fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

fn store<C: Consumer<X>, X: ConsumerContext>(
    consumer: &C,
    marks: &[(TopicPartition, i64)],
) -> KafkaResult<()> {
    if marks.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    for (tp, offset) in marks {
        tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*offset))?;
    }
    consumer.store_offsets(&tpl)
}

/// How long librdkafka stops fetching a partition whose prefetch queue is over its thresholds
/// (`queued.max.messages.kbytes`, 64 MiB, is the one that binds here), unless `kafka.options`
/// says otherwise. librdkafka's own default, 1 s, starves a consumer that is slower than its
/// brokers, which a worker catching up on a backlog always is: the fetcher fills the queue in a
/// fraction of a second, every partition then waits the full second, and the worker drains the
/// queue and sits idle for the rest of it. In the ingest bench (128 partitions, 2.6 kB events)
/// that capped the worker at ~39k events/s with one of two cores idle; at 10 ms the queue is
/// refilled as soon as it has room and the pipeline, not the fetcher, sets the rate.
const FETCH_QUEUE_BACKOFF_MS: &str = "10";

/// The consumer's librdkafka configuration: the shared settings, then the group's, with
/// defaults for the properties `kafka.options` may override.
fn consumer_config(cfg: &KafkaConfig, exactly_once: bool) -> ClientConfig {
    let mut c = base_client_config(cfg);
    c.set("group.id", &cfg.group_id)
        .set("enable.auto.commit", (!exactly_once).to_string())
        .set("enable.auto.offset.store", "false")
        .set(
            "auto.commit.interval.ms",
            cfg.commit_interval.as_millis().to_string(),
        )
        .set(
            "session.timeout.ms",
            cfg.session_timeout.as_millis().to_string(),
        );
    // Defaults for what `kafka.options` (already set by `base_client_config`) leaves out.
    for (key, default) in [
        ("auto.offset.reset", "earliest"),
        ("statistics.interval.ms", "5000"),
        ("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS),
    ] {
        if c.get(key).is_none() {
            c.set(key, default);
        }
    }
    c
}

/// The consumer and the shared completion state.
pub struct Ingest {
    consumer: StreamConsumer<IngestContext>,
    acks: Arc<Acks>,
    paused: Arc<AtomicBool>,
    /// Microseconds spent throttled ([`ThrottleClock`]).
    throttled_us: AtomicU64,
    max_in_flight: usize,
    pause_after: Duration,
    commit_interval: Duration,
    txn_wait: Duration,
}

impl Ingest {
    /// `txn`: the transactional publisher in exactly-once mode (`kafka.exactly_once`).
    pub fn new(cfg: &KafkaConfig, acks: Arc<Acks>, txn: Option<Publisher>) -> KafkaResult<Ingest> {
        let paused = Arc::new(AtomicBool::new(false));
        let exactly_once = txn.is_some();
        let context = IngestContext {
            acks: acks.clone(),
            drain: cfg.rebalance_drain,
            paused: paused.clone(),
            txn,
            failed: Arc::default(),
        };
        let consumer: StreamConsumer<IngestContext> =
            consumer_config(cfg, exactly_once).create_with_context(context)?;
        let topics: Vec<&str> = cfg.input_topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        Ok(Ingest {
            consumer,
            acks,
            paused,
            throttled_us: AtomicU64::new(0),
            max_in_flight: cfg.max_in_flight,
            pause_after: cfg.pause_after,
            commit_interval: cfg.commit_interval,
            txn_wait: cfg.transaction_timeout / 2,
        })
    }

    /// Consumes until `stop` is cancelled, handing each message to `out` in partition order.
    /// Returns when stopped or when `out` is closed; stored offsets are not committed here
    /// (see [`Ingest::commit_final`]). In exactly-once mode it also commits the transaction every
    /// `kafka.commit_interval`, and returns the error when a commit fails.
    pub async fn run(
        &self,
        out: mpsc::Sender<Consumed>,
        stop: CancellationToken,
        health: Arc<Health>,
    ) -> Result<(), CommitError> {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut commit_tick = tokio::time::interval(self.commit_interval);
        commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut committing: Option<tokio::task::JoinHandle<Result<(), CommitError>>> = None;
        let exactly_once = self.consumer.context().txn.is_some();
        // When the in-flight limit was reached with the partitions still flowing.
        let mut held_since: Option<Instant> = None;
        let mut clock = ThrottleClock::new(Instant::now());
        loop {
            if let Some(e) = self.take_failure() {
                return Err(e);
            }
            if !exactly_once {
                self.store_advanced();
            }
            let holding = self.apply_backpressure(&mut held_since);
            let (elapsed, seconds) = clock.observe(holding || self.paused(), Instant::now());
            self.throttled_us
                .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
            if seconds > 0 {
                metrics::counter!(names::THROTTLED_SECONDS).increment(seconds);
            }
            // While holding, wake when the hold has lasted long enough to pause instead.
            let hold_deadline =
                held_since.map(|t| tokio::time::Instant::from_std(t + self.pause_after));
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(()),
                _ = async { tokio::time::sleep_until(hold_deadline.expect("guarded")).await }, if hold_deadline.is_some() => {}
                done = async { committing.as_mut().expect("guarded").await }, if committing.is_some() => {
                    committing = None;
                    match done {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Err(e),
                        Err(e) => tracing::error!(error = %e, "transaction commit task failed"),
                    }
                }
                _ = commit_tick.tick(), if exactly_once && committing.is_none() => {
                    committing = Some(self.spawn_commit());
                }
                _ = self.acks.notify.notified() => {}
                _ = tick.tick() => health.beat(),
                msg = self.consumer.recv(), if !holding => {
                    if !self.forward(msg, &out).await {
                        return Ok(());
                    }
                    // Take what librdkafka already holds, within the room left under the
                    // in-flight limit, before the bookkeeping above runs again: it costs the
                    // same for one message as for a run of them.
                    let room = self.max_in_flight.saturating_sub(self.acks.in_flight());
                    for _ in 0..room.min(DRAIN_MAX) {
                        let Some(msg) = self.consumer.recv().now_or_never() else {
                            break;
                        };
                        if !self.forward(msg, &out).await {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }

    /// Hands a consumed message downstream; `false` once downstream has gone.
    async fn forward(
        &self,
        msg: KafkaResult<rdkafka::message::BorrowedMessage<'_>>,
        out: &mpsc::Sender<Consumed>,
    ) -> bool {
        match msg {
            Ok(m) => out.send(self.own(&m)).await.is_ok(),
            Err(e) => {
                tracing::warn!(error = %e, "consumer error");
                metrics::counter!(names::EVENTS, "type" => "unknown", "outcome" => "consumer_error").increment(1);
                true
            }
        }
    }

    fn take_failure(&self) -> Option<CommitError> {
        self.consumer
            .context()
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Commits the transaction on a blocking thread (it waits for the work below its barrier);
    /// the consumer keeps polling meanwhile.
    fn spawn_commit(&self) -> tokio::task::JoinHandle<Result<(), CommitError>> {
        let ctx = self.consumer.context();
        let publisher = ctx.txn.clone().expect("exactly-once mode");
        let acks = self.acks.clone();
        let group = self.consumer.group_metadata();
        let wait = self.txn_wait;
        tokio::task::spawn_blocking(move || {
            publisher
                .commit_transaction(&acks, group, true, wait)
                .map(|_| ())
        })
    }

    fn own(&self, m: &rdkafka::message::BorrowedMessage<'_>) -> Consumed {
        let tp = TopicPartition::new(m.topic(), m.partition());
        let token = self.acks.start(&tp, m.offset());
        let headers = m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Consumed {
            token,
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers,
            timestamp_ms: m.timestamp().to_millis().unwrap_or_else(now_ms),
            received: Instant::now(),
        }
    }

    fn store_advanced(&self) {
        let marks = self.acks.take_advanced();
        if let Err(e) = store(&self.consumer, &marks) {
            // A partition revoked between completion and storing: its new owner replays from
            // the last commit, which at-least-once allows.
            tracing::debug!(error = %e, "storing offsets");
        }
    }

    /// Keeps work in flight under `kafka.max_in_flight`; returns whether to hold off reading.
    ///
    /// At the limit the loop first stops taking messages (librdkafka keeps what it prefetched,
    /// bounded by `queued.max.messages.kbytes`), which rides out a slow write or a burst without
    /// refetching anything. Past `kafka.pause_after` at the limit, the partitions are paused so
    /// that the loop can go on polling (rebalances, group membership) for as long as the
    /// pipeline stays behind; they resume at half the limit.
    fn apply_backpressure(&self, held_since: &mut Option<Instant>) -> bool {
        let in_flight = self.acks.in_flight();
        metrics::gauge!(names::IN_FLIGHT).set(in_flight as f64);
        if self.paused.load(Ordering::SeqCst) {
            if in_flight <= self.max_in_flight / 2 {
                self.set_paused(false, in_flight);
            }
            return false;
        }
        if in_flight < self.max_in_flight {
            *held_since = None;
            return false;
        }
        let since = *held_since.get_or_insert_with(Instant::now);
        if since.elapsed() < self.pause_after {
            return true;
        }
        *held_since = None;
        self.set_paused(true, in_flight);
        false
    }

    /// Pauses or resumes every assigned partition.
    fn set_paused(&self, pause: bool, in_flight: usize) {
        let assignment = match self.consumer.assignment() {
            Ok(a) => a,
            Err(e) => return tracing::warn!(error = %e, "reading assignment"),
        };
        let result = if pause {
            self.consumer.pause(&assignment)
        } else {
            self.consumer.resume(&assignment)
        };
        match result {
            Ok(()) => {
                self.paused.store(pause, Ordering::SeqCst);
                metrics::gauge!(names::PAUSED).set(if pause { 1.0 } else { 0.0 });
                tracing::debug!(in_flight, pause, "backpressure");
            }
            Err(e) => tracing::warn!(error = %e, pause, "pausing/resuming partitions"),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.acks.in_flight()
    }

    /// Time spent holding off reading or paused at `kafka.max_in_flight` so far.
    pub fn throttled(&self) -> Duration {
        Duration::from_micros(self.throttled_us.load(Ordering::Relaxed))
    }

    /// Whether backpressure has the partitions paused right now.
    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Stores every watermark and commits synchronously (shutdown); in exactly-once mode commits
    /// the last transaction at the point everything finished reached.
    pub fn commit_final(&self) {
        if let Some(publisher) = &self.consumer.context().txn {
            let result = blocking(|| {
                publisher.commit_transaction(
                    &self.acks,
                    self.consumer.group_metadata(),
                    false,
                    Duration::ZERO,
                )
            });
            match result {
                Ok(_) => metrics::counter!(names::COMMITS, "reason" => "shutdown").increment(1),
                Err(e) => {
                    tracing::warn!(error = %e, "final transaction commit failed; unfinished work will be replayed");
                    blocking(|| publisher.abort_transaction());
                }
            }
            self.acks.clear();
            return;
        }
        if let Err(e) = store(&self.consumer, &self.acks.watermarks()) {
            tracing::warn!(error = %e, "storing final offsets");
        }
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(())
            | Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {
                metrics::counter!(names::COMMITS, "reason" => "shutdown").increment(1);
            }
            Err(e) => tracing::warn!(error = %e, "final commit failed"),
        }
        // Work that did not finish is replayed by the partitions' next owner; the revoke that
        // closing the consumer triggers must not wait for it.
        self.acks.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_config_defaults_and_overrides() {
        let mut cfg = KafkaConfig::default();
        let c = consumer_config(&cfg, false);
        assert_eq!(
            c.get("fetch.queue.backoff.ms"),
            Some(FETCH_QUEUE_BACKOFF_MS)
        );
        assert_eq!(c.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(c.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(c.get("enable.auto.commit"), Some("true"));
        assert_eq!(
            consumer_config(&cfg, true).get("enable.auto.commit"),
            Some("false")
        );

        cfg.options
            .insert("fetch.queue.backoff.ms".into(), "250".into());
        cfg.options
            .insert("auto.offset.reset".into(), "latest".into());
        let c = consumer_config(&cfg, false);
        assert_eq!(c.get("fetch.queue.backoff.ms"), Some("250"));
        assert_eq!(c.get("auto.offset.reset"), Some("latest"));
    }

    #[test]
    fn throttle_clock_counts_only_throttled_spans_and_carries_fractions() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut c = ThrottleClock::new(t0);
        // Flowing time is not counted.
        assert_eq!(c.observe(true, at(5_000)), (Duration::ZERO, 0));
        // 700 ms throttled: counted, under a second so nothing exported yet.
        assert_eq!(c.observe(false, at(5_700)), (Duration::from_millis(700), 0));
        assert_eq!(c.observe(true, at(9_000)), (Duration::ZERO, 0));
        // Another 700 ms: 1.4 s in all, one whole second exported, 0.4 s carried.
        assert_eq!(c.observe(true, at(9_700)), (Duration::from_millis(700), 1));
        // Cycling between held and paused stays throttled: 2.6 s more makes 3 s.
        assert_eq!(
            c.observe(true, at(12_300)),
            (Duration::from_millis(2_600), 3)
        );
        assert_eq!(c.pending, Duration::ZERO);
        // A clock that went backwards adds nothing.
        assert_eq!(c.observe(false, at(12_000)), (Duration::ZERO, 0));
    }
}
