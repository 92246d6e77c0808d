//! The history stage: decodes consumed messages in partition order and applies them.
//!
//! Messages arrive in micro-batches (up to `lance.batch_max_rows`, waiting at most
//! `lance.batch_linger`). For each batch: malformed messages go to the DLQ; items are upserted
//! (LanceDB, then the Redis cache); interactions go to the users' Redis windows as they are met,
//! so a display later in the batch sees them, and are queued for the LanceDB writer, which folds
//! everything queued during its previous write into one deduplicated append (group commit) and
//! runs each write's query for stored event ids while earlier writes append; a
//! display reads the user's history (LanceDB, Redis, and what the writer has not finished yet),
//! weighs it against the reference (preference extraction) and is handed to the generation stage.
//! Items and interactions are acknowledged only once LanceDB has them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::lance::LanceError;
use super::store::History;
use super::{HistoryEntry, Item};
use crate::event::{self, DecodeError, DisplayEvent, DlqKind, Event, ItemEvent, Limits};
use crate::generate::DisplayJob;
use crate::ingest::Consumed;
use crate::model::{Image, ItemEncoder};
use crate::offsets::Acks;
use crate::preference::{self, Params};
use crate::publish::{HistoryOut, LatencyOut, Publisher};
use crate::telemetry::{names, now_ms};

/// Everything the stage needs, built once by the worker.
pub struct HistoryStage {
    pub history: Arc<History>,
    pub publisher: Publisher,
    pub acks: Arc<Acks>,
    pub encoder: Option<Arc<dyn ItemEncoder>>,
    /// Resolve the reference's and the used history items' texts for the generator's prompt.
    pub texts: bool,
    pub limits: Limits,
    pub params: Params,
    pub default_candidates: u32,
    pub seed: u64,
    pub batch_max: usize,
    pub linger: Duration,
    /// Display jobs for the generation stage; bounded, so a slow generator holds this stage back.
    pub jobs: mpsc::Sender<DisplayJob>,
    /// Cancelled when the worker gives up on draining: retries stop, nothing more is acknowledged.
    pub abort: CancellationToken,
    /// Dead-letter sends in flight; the worker waits for them before its final commit.
    pub dlq_tasks: DlqTasks,
}

/// A decoded message with what it still needs to be acknowledged.
struct Decoded {
    msg: Consumed,
    event: Event,
}

impl HistoryStage {
    /// Processes batches from `rx` until it is closed and drained.
    ///
    /// Three things overlap: the next batch is decoded (on the blocking pool) while this one is
    /// applied, and the LanceDB writer works on earlier batches' interactions while later batches
    /// are cached in Redis and their displays resolved. The writer takes everything that queued
    /// up during its last write as one commit (group commit), so writes grow with the load
    /// instead of capping it.
    pub async fn run(self, rx: mpsc::Receiver<Consumed>) {
        let this = Arc::new(self);
        let unwritten = Arc::new(Unwritten::default());
        let (write_tx, write_rx) = mpsc::channel(WRITE_QUEUE);
        let writer = tokio::spawn(Arc::clone(&this).write_loop(write_rx, Arc::clone(&unwritten)));
        // One decoded batch waits while another is applied; more would only hold memory.
        let (decoded_tx, mut decoded_rx) = mpsc::channel(1);
        let batcher = tokio::spawn(batch_and_decode(
            rx,
            decoded_tx,
            this.batch_max,
            this.linger,
            this.limits.clone(),
        ));
        while let Some(decoding) = decoded_rx.recv().await {
            let decoded = match decoding.await {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(error = %e, "decoding a batch failed; the stage stops");
                    batcher.abort();
                    return;
                }
            };
            if this.process(decoded, &write_tx, &unwritten).await.is_err() {
                // Aborting: the consumer side sees the stage gone; nothing more is acknowledged.
                batcher.abort();
                return;
            }
        }
        drop(write_tx);
        let _ = writer.await;
    }

    /// Sends `msg` to the DLQ and acknowledges it once the DLQ has it (in the background: the
    /// watermark keeps later offsets from being committed before it).
    fn dead_letter(&self, msg: Consumed, error: DecodeError, kind: &'static str) {
        metrics::counter!(names::EVENTS, "type" => kind, "outcome" => "dlq").increment(1);
        let publisher = self.publisher.clone();
        let acks = self.acks.clone();
        self.dlq_tasks.spawn(async move {
            let _txn = publisher.enter(&msg.token).await;
            match publisher.dead_letter(&msg, &error).await {
                Ok(()) => acks.complete(&msg.token),
                // The worker is aborting: not acknowledged, so it is replayed.
                Err(KafkaError::Canceled) => {}
                Err(e) => {
                    tracing::error!(error = %e, offset = msg.token.offset, topic = %msg.token.tp.topic,
                        "the DLQ refused this message itself; acknowledging it to keep the partition flowing");
                    acks.complete(&msg.token);
                }
            }
        });
    }

    /// Dead-letters every message of a group whose store write failed for good.
    fn dead_letter_all(&self, msgs: Vec<Consumed>, error: &LanceError, kind: &'static str) {
        tracing::error!(%error, messages = msgs.len(), "LanceDB refused a write for good; dead-lettering its messages");
        for msg in msgs {
            let e = DecodeError::new(
                DlqKind::Processing,
                format!("LanceDB refused the write: {error}"),
            );
            self.dead_letter(msg, e, kind);
        }
    }

    async fn process(
        self: &Arc<Self>,
        batch: Vec<Result<Decoded, (Consumed, DecodeError)>>,
        writer: &mpsc::Sender<WriteGroup>,
        unwritten: &Unwritten,
    ) -> Result<(), Aborted> {
        let mut decoded = Vec::with_capacity(batch.len());
        for d in batch {
            match d {
                Ok(d) => decoded.push(d),
                Err((msg, e)) => self.dead_letter(msg, e, "unknown"),
            }
        }

        // Items first, so interactions and displays of this batch can refer to them.
        let mut items: HashMap<String, Item> = HashMap::new();
        let mut item_msgs = Vec::new();
        let mut rest = Vec::with_capacity(decoded.len());
        for d in decoded {
            match d.event {
                Event::Item(ev) => match self.item_record(ev).await {
                    Ok(item) => {
                        items.insert(item.item_id.clone(), item);
                        item_msgs.push(d.msg);
                    }
                    Err(e) => self.dead_letter(d.msg, e, "item"),
                },
                _ => rest.push(d),
            }
        }
        if !items.is_empty() {
            let records: Vec<Item> = items.values().cloned().collect();
            match self
                .retry("write items", || self.history.write_items(&records))
                .await
            {
                Ok(()) => {
                    metrics::counter!(names::EVENTS, "type" => "item", "outcome" => "ok")
                        .increment(item_msgs.len() as u64);
                    self.complete_all(&item_msgs);
                }
                Err(Failure::Permanent(e)) => {
                    items.clear();
                    self.dead_letter_all(item_msgs, &e, "item");
                }
                Err(Failure::Aborted) => return Err(Aborted),
            }
        }

        let mut entries: Vec<HistoryEntry> = Vec::new();
        let mut entry_msgs: Vec<Consumed> = Vec::new();
        // Entries not yet added to the Redis windows (added before each display and at the end).
        let mut unflushed = 0usize;
        for d in rest {
            match d.event {
                Event::Interaction(ev) => {
                    let embedding = match ev.embedding {
                        Some(e) => e,
                        None => match self.lookup_item(&ev.item_id, &mut items).await {
                            // The store refuses a non-finite embedding in a write group; an
                            // item stored with one fails only its own interactions.
                            Ok(Some(item)) if item.embedding.iter().all(|x| x.is_finite()) => {
                                item.embedding
                            }
                            Ok(found) => {
                                let (kind, what) = match found {
                                    Some(_) => (DlqKind::NonFinite, "has a non-finite embedding"),
                                    None => (DlqKind::UnknownItem, "is unknown"),
                                };
                                let msg = format!(
                                    "item `{}` {what} and the interaction has no embedding",
                                    ev.item_id
                                );
                                self.dead_letter(d.msg, DecodeError::new(kind, msg), "interaction");
                                continue;
                            }
                            Err(Failure::Permanent(e)) => {
                                self.dead_letter_all(vec![d.msg], &e, "interaction");
                                continue;
                            }
                            Err(Failure::Aborted) => return Err(Aborted),
                        },
                    };
                    entries.push(HistoryEntry {
                        event_id: ev.event_id,
                        user_id: ev.user_id,
                        item_id: ev.item_id,
                        action: ev.action,
                        ts_ms: ev.ts_ms,
                        embedding,
                    });
                    entry_msgs.push(d.msg);
                    unflushed += 1;
                }
                Event::Display(ev) => {
                    self.flush_windows(&entries[entries.len() - unflushed..])
                        .await;
                    unflushed = 0;
                    let previous = unwritten.snapshot();
                    match self
                        .display(d.msg, ev, &previous, &entries, &mut items)
                        .await
                    {
                        Ok(()) => {}
                        Err((msg, Failure::Permanent(e))) => {
                            self.dead_letter_all(vec![msg], &e, "display")
                        }
                        Err((_, Failure::Aborted)) => return Err(Aborted),
                    }
                }
                Event::Item(_) => unreachable!("items were taken out above"),
            }
        }
        self.flush_windows(&entries[entries.len() - unflushed..])
            .await;

        if !entries.is_empty() {
            let entries = Arc::new(entries);
            unwritten.push(Arc::clone(&entries));
            let group = WriteGroup {
                entries,
                msgs: entry_msgs,
            };
            // A full queue holds this stage back (and with it the consumer): backpressure.
            writer.send(group).await.map_err(|_| Aborted)?;
        }
        Ok(())
    }

    /// The LanceDB writer. Each write takes every group queued since the last (up to
    /// `WRITE_MAX_BATCHES` micro-batches: group commit), and writes overlap: a write's query for
    /// the event ids stored already runs while earlier writes append, leaving out the ids they are
    /// appending, and up to `APPENDS_IN_FLIGHT` appends run at once (LanceDB commits concurrent
    /// appends one after the other). Writes complete in order. A write whose append fails is done
    /// again whole, with retries ([`Self::persist`]); when one is dead-lettered, the writes that
    /// left out its ids are done again whole too. Stops when the stage closes the queue, or when
    /// the worker aborts (the queue's sender then sees it gone).
    async fn write_loop(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<WriteGroup>,
        unwritten: Arc<Unwritten>,
    ) {
        let mut inflight: VecDeque<Append> = VecDeque::new();
        loop {
            let next = match inflight.front_mut() {
                Some(append) => tokio::select! {
                    done = &mut append.task => Next::Appended(done),
                    group = rx.recv() => Next::Group(group),
                },
                None => Next::Group(rx.recv().await),
            };
            let first = match next {
                Next::Appended(done) => {
                    let append = inflight.pop_front().expect("an append was in flight");
                    if self
                        .finish(append, done, &mut inflight, &unwritten)
                        .await
                        .is_err()
                    {
                        return;
                    }
                    continue;
                }
                Next::Group(None) => break,
                Next::Group(Some(first)) => first,
            };
            let mut groups = vec![first];
            while groups.len() < WRITE_MAX_BATCHES {
                match rx.try_recv() {
                    Ok(g) => groups.push(g),
                    Err(_) => break,
                }
            }
            let n = groups.len();
            let (entries, msgs) = if n == 1 {
                let g = groups.pop().expect("one group");
                (g.entries, g.msgs)
            } else {
                let rows = groups.iter().map(|g| g.entries.len()).sum();
                let mut entries = Vec::with_capacity(rows);
                let mut msgs = Vec::with_capacity(rows);
                for g in groups {
                    entries.extend(g.entries.iter().cloned());
                    msgs.extend(g.msgs);
                }
                (Arc::new(entries), msgs)
            };
            let started = Instant::now();
            let skip: Vec<&HashSet<String>> = inflight.iter().map(|a| &a.ids).collect();
            // An error here is retried below, with the write done whole.
            let mut fresh = self.history.fresh_interactions(&entries, &skip).await.ok();
            let lookup = started.elapsed();
            // Room for this append; a write done whole completes in order, so every append
            // before it finishes first.
            let mut room = if fresh.is_some() {
                APPENDS_IN_FLIGHT - 1
            } else {
                0
            };
            while inflight.len() > room {
                match self.finish_oldest(&mut inflight, &unwritten).await {
                    Ok(true) => {}
                    // This write left out the dead-lettered write's ids too.
                    Ok(false) => {
                        fresh = None;
                        room = 0;
                    }
                    Err(Aborted) => return,
                }
            }
            match fresh {
                Some(positions) => {
                    inflight.push_back(self.start_append(entries, positions, msgs, n, lookup));
                }
                None => {
                    let result = self.persist(&entries, msgs).await;
                    // Durable (or dead-lettered): displays find these in LanceDB from now on.
                    unwritten.pop(n);
                    if result.is_err() {
                        return;
                    }
                }
            }
        }
        while !inflight.is_empty() {
            if self.finish_oldest(&mut inflight, &unwritten).await.is_err() {
                return;
            }
        }
    }

    /// Waits for the oldest append in flight (there is one) and [finishes](Self::finish) it.
    async fn finish_oldest(
        &self,
        inflight: &mut VecDeque<Append>,
        unwritten: &Unwritten,
    ) -> Result<bool, Aborted> {
        let mut oldest = inflight.pop_front().expect("an append is in flight");
        let done = (&mut oldest.task).await;
        self.finish(oldest, done, inflight, unwritten).await
    }

    /// Appends `entries[positions]` in a task of its own.
    fn start_append(
        &self,
        entries: Arc<Vec<HistoryEntry>>,
        positions: Vec<usize>,
        msgs: Vec<Consumed>,
        groups: usize,
        lookup: Duration,
    ) -> Append {
        let ids = positions
            .iter()
            .map(|&i| entries[i].event_id.clone())
            .collect();
        let history = Arc::clone(&self.history);
        let rows = Arc::clone(&entries);
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let refs: Vec<&HistoryEntry> = positions.iter().map(|&i| &rows[i]).collect();
            let result = history.append_interactions(&refs).await;
            (result, lookup + started.elapsed())
        });
        Append {
            task,
            entries,
            msgs,
            groups,
            ids,
            redo: false,
        }
    }

    /// Completes the oldest append: acknowledges its messages, or does the write again whole when
    /// the append failed or left out the ids of a write that was then dead-lettered. Returns
    /// whether its interactions are durable (false: dead-lettered, and every append still in
    /// flight left out its ids, so each is marked to be done again whole).
    async fn finish(
        &self,
        append: Append,
        done: AppendResult,
        later: &mut VecDeque<Append>,
        unwritten: &Unwritten,
    ) -> Result<bool, Aborted> {
        let result = match done {
            _ if append.redo => self.persist(&append.entries, append.msgs).await,
            Ok((Ok(inserted), took)) => {
                self.written(append.entries.len(), inserted, took, &append.msgs);
                Ok(true)
            }
            Ok((Err(e), _)) => {
                tracing::warn!(error = %e, "LanceDB append failed; writing the batch again");
                self.persist(&append.entries, append.msgs).await
            }
            Err(e) => {
                tracing::warn!(error = %e, "LanceDB append task failed; writing the batch again");
                self.persist(&append.entries, append.msgs).await
            }
        };
        // Durable (or dead-lettered): displays find these in LanceDB from now on.
        unwritten.pop(append.groups);
        if let Ok(false) = result {
            for a in later.iter_mut() {
                a.redo = true;
            }
        }
        result
    }

    /// Makes a batch's interactions durable, then acknowledges them; returns whether they are
    /// durable (false: LanceDB refused them for good and they were dead-lettered).
    async fn persist(
        &self,
        entries: &[HistoryEntry],
        msgs: Vec<Consumed>,
    ) -> Result<bool, Aborted> {
        // Times the write alone, not the wait for the previous one nor this batch's other work.
        let started = Instant::now();
        match self
            .retry("write interactions", || {
                self.history.persist_interactions(entries)
            })
            .await
        {
            Ok(inserted) => {
                self.written(entries.len(), inserted, started.elapsed(), &msgs);
                Ok(true)
            }
            Err(Failure::Permanent(e)) => {
                self.dead_letter_all(msgs, &e, "interaction");
                Ok(false)
            }
            Err(Failure::Aborted) => Err(Aborted),
        }
    }

    /// Counts a durable write of `rows` interactions (`inserted` new) and acknowledges `msgs`.
    fn written(&self, rows: usize, inserted: u64, took: Duration, msgs: &[Consumed]) {
        metrics::counter!(names::LANCE_ROWS).increment(inserted);
        let duplicates = rows as u64 - inserted.min(rows as u64);
        metrics::counter!(names::EVENTS, "type" => "interaction", "outcome" => "ok")
            .increment(inserted);
        metrics::counter!(names::EVENTS, "type" => "interaction", "outcome" => "duplicate")
            .increment(duplicates);
        metrics::histogram!(names::STAGE_SECONDS, "stage" => "history_write")
            .record(took.as_secs_f64());
        self.complete_all(msgs);
    }

    fn complete_all(&self, msgs: &[Consumed]) {
        self.acks.complete_all(msgs.iter().map(|m| &m.token));
    }

    async fn flush_windows(&self, entries: &[HistoryEntry]) {
        if entries.is_empty() {
            return;
        }
        let started = Instant::now();
        let refs: Vec<&HistoryEntry> = entries.iter().collect();
        self.history.cache_interactions(&refs).await;
        metrics::histogram!(names::STAGE_SECONDS, "stage" => "history_cache")
            .record(started.elapsed().as_secs_f64());
    }

    /// Turns an item event into a stored item, embedding it when it carries no embedding.
    async fn item_record(&self, ev: ItemEvent) -> Result<Item, DecodeError> {
        let embedding =
            match (ev.embedding, &self.encoder) {
                (Some(e), _) => e,
                (None, Some(encoder)) => {
                    let encoder = encoder.clone();
                    let png = ev.image_png.clone();
                    let text = ev.text.clone();
                    let dim = self.limits.dim;
                    let result = tokio::task::spawn_blocking(move || {
                        let image = png.as_deref().map(Image::from_png).transpose()?;
                        encoder.encode(image.as_ref(), text.as_deref())
                    })
                    .await;
                    match result {
                        Ok(Ok(v)) if v.len() == dim && v.iter().all(|x| x.is_finite()) => v.into(),
                        Ok(Ok(v)) if v.len() == dim => {
                            return Err(DecodeError::new(
                                DlqKind::NonFinite,
                                "the encoder returned a non-finite value",
                            ))
                        }
                        Ok(Ok(v)) => {
                            return Err(DecodeError::new(
                                DlqKind::Processing,
                                format!("the encoder returned {} values, expected {dim}", v.len()),
                            ))
                        }
                        Ok(Err(e)) => {
                            return Err(DecodeError::new(
                                DlqKind::Processing,
                                format!("encoding the item: {e}"),
                            ))
                        }
                        Err(e) => {
                            return Err(DecodeError::new(
                                DlqKind::Processing,
                                format!("encoder task failed: {e}"),
                            ))
                        }
                    }
                }
                (None, None) => return Err(DecodeError::new(
                    DlqKind::NoEncoder,
                    "the item has no embedding and no item encoder is configured (models.encoder)",
                )),
            };
        Ok(Item {
            item_id: ev.item_id,
            event_id: ev.event_id,
            text: ev.text,
            category: ev.category,
            image_png: ev.image_png,
            embedding,
            ts_ms: ev.ts_ms,
        })
    }

    /// An item from this batch, else from the stores (memoized in `items` for the batch).
    async fn lookup_item(
        &self,
        item_id: &str,
        items: &mut HashMap<String, Item>,
    ) -> Result<Option<Item>, Failure> {
        if let Some(it) = items.get(item_id) {
            return Ok(Some(it.clone()));
        }
        let found = self
            .retry("read item", || self.history.item(item_id))
            .await?;
        if let Some(it) = &found {
            items.insert(item_id.to_string(), it.clone());
        }
        Ok(found)
    }

    /// Resolves a display into a generation job. `previous` is the last batch's interactions
    /// (their write may still be running), `batch_entries` this batch's so far. On a store
    /// failure the message comes back.
    async fn display(
        &self,
        msg: Consumed,
        ev: DisplayEvent,
        previous: &[Arc<Vec<HistoryEntry>>],
        batch_entries: &[HistoryEntry],
        items: &mut HashMap<String, Item>,
    ) -> Result<(), (Consumed, Failure)> {
        if !self.publisher.transactional() && self.history.output_done(&ev.request_id).await {
            metrics::counter!(names::OUTPUTS, "outcome" => "skipped_replay").increment(1);
            metrics::counter!(names::EVENTS, "type" => "display", "outcome" => "duplicate")
                .increment(1);
            self.acks.complete(&msg.token);
            return Ok(());
        }
        let reference = match self.lookup_item(&ev.item_id, items).await {
            Ok(r) => r,
            Err(f) => return Err((msg, f)),
        };
        let Some(reference) = reference else {
            let e = DecodeError::new(
                DlqKind::UnknownItem,
                format!("reference item `{}` is unknown", ev.item_id),
            );
            self.dead_letter(msg, e, "display");
            return Ok(());
        };
        let image = match reference.image_png.as_deref().map(Image::from_png) {
            Some(Ok(img)) => Arc::new(img),
            Some(Err(e)) => {
                let e = DecodeError::new(
                    DlqKind::ImageDecode,
                    format!("reference item `{}`: {e}", ev.item_id),
                );
                self.dead_letter(msg, e, "display");
                return Ok(());
            }
            None => {
                let e = DecodeError::new(
                    DlqKind::UnknownItem,
                    format!("reference item `{}` has no image to render", ev.item_id),
                );
                self.dead_letter(msg, e, "display");
                return Ok(());
            }
        };

        let read_started = Instant::now();
        let pending: Vec<&HistoryEntry> = previous
            .iter()
            .flat_map(|group| group.iter())
            .chain(batch_entries)
            .filter(|e| e.user_id == ev.user_id)
            .collect();
        let loaded = self
            .retry("read history", || {
                self.history
                    .load(&ev.user_id, &reference.embedding, self.params.k, &pending)
            })
            .await;
        let (history, source) = match loaded {
            Ok(h) => h,
            Err(f) => return Err((msg, f)),
        };
        let history_s = read_started.elapsed().as_secs_f64();
        metrics::histogram!(names::STAGE_SECONDS, "stage" => "history_read").record(history_s);

        let pref_started = Instant::now();
        let weighted = preference::weigh(&reference.embedding, &history, now_ms(), &self.params);
        let (preference, preference_agreement) =
            preference::preference(&history, &weighted, self.limits.dim)
                .map(|(p, agreement)| (Arc::<[f32]>::from(p), agreement))
                .unzip();
        let pref_s = pref_started.elapsed().as_secs_f64();
        metrics::histogram!(names::STAGE_SECONDS, "stage" => "preference").record(pref_s);

        let used = weighted
            .iter()
            .map(|w| {
                let h = &history[w.index];
                HistoryOut {
                    event_id: h.event_id.clone(),
                    item_id: h.item_id.clone(),
                    action: h.action,
                    similarity: w.similarity,
                    weight: w.weight,
                }
            })
            .collect();
        let mut prompt_hints = Vec::new();
        if self.texts {
            for w in &weighted {
                let h = &history[w.index];
                match self.lookup_item(&h.item_id, items).await {
                    Ok(Some(Item {
                        text: Some(text), ..
                    })) => prompt_hints.push((text, w.weight)),
                    // An item without a text (or gone) only leaves its hint out of the prompt.
                    Ok(_) | Err(Failure::Permanent(_)) => {}
                    Err(Failure::Aborted) => return Err((msg, Failure::Aborted)),
                }
            }
        }
        let seed = ev
            .seed
            .unwrap_or_else(|| event::derive_seed(&ev.request_id, self.seed));
        let n = ev.candidates.unwrap_or(self.default_candidates) as u64;
        let seeds = (0..n).map(|i| (seed + i) & event::MAX_SEED).collect();
        let job = DisplayJob {
            msg,
            event: ev,
            reference_image: image,
            reference_embedding: reference.embedding.clone(),
            preference,
            preference_agreement,
            used,
            history_len: history.len(),
            source: source.as_str(),
            seed,
            seeds,
            reference_text: if self.texts {
                reference.text.as_deref().map(Arc::from)
            } else {
                None
            },
            prompt_hints,
            latency: LatencyOut {
                history: history_s * 1e3,
                preference: pref_s * 1e3,
                ..Default::default()
            },
        };
        if let Err(returned) = self.jobs.send(job).await {
            return Err((returned.0.msg, Failure::Aborted));
        }
        Ok(())
    }

    /// Retries a store operation with backoff while its error is retryable, until it succeeds or
    /// the worker aborts. Nothing is acknowledged meanwhile, so the consumer pauses once enough
    /// work is in flight.
    async fn retry<T, F, Fut>(&self, what: &'static str, mut op: F) -> Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, LanceError>>,
    {
        let mut backoff = Duration::from_millis(100);
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if !e.is_retryable() => return Err(Failure::Permanent(e)),
                Err(e) => {
                    metrics::counter!(names::LANCE_WRITE_ERRORS).increment(1);
                    tracing::error!(error = %e, what, retry_in = ?backoff, "LanceDB operation failed; not acknowledging until it succeeds");
                }
            }
            tokio::select! {
                _ = self.abort.cancelled() => return Err(Failure::Aborted),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
}

/// Collects micro-batches from the consumer (up to `batch_max`, waiting at most `linger` after a
/// batch's first message) and decodes each on the blocking pool, handing the decoding tasks on in
/// order. Stops when the consumer side closes or the stage stops taking batches.
async fn batch_and_decode(
    mut rx: mpsc::Receiver<Consumed>,
    out: mpsc::Sender<tokio::task::JoinHandle<Vec<Result<Decoded, (Consumed, DecodeError)>>>>,
    batch_max: usize,
    linger: Duration,
    limits: Limits,
) {
    let limits = Arc::new(limits);
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + linger;
        while batch.len() < batch_max {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(m)) => batch.push(m),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        }
        let limits = Arc::clone(&limits);
        let decoding = tokio::task::spawn_blocking(move || decode_batch(batch, &limits));
        if out.send(decoding).await.is_err() {
            return;
        }
    }
}

/// Decodes a batch in order; a message that fails comes back with its error for the DLQ.
fn decode_batch(
    batch: Vec<Consumed>,
    limits: &Limits,
) -> Vec<Result<Decoded, (Consumed, DecodeError)>> {
    let started = Instant::now();
    let out = batch
        .into_iter()
        .map(|msg| {
            let result = match &msg.payload {
                Some(p) => event::decode(p, msg.timestamp_ms, limits),
                None => Err(DecodeError::new(
                    DlqKind::InvalidJson,
                    "message has no value",
                )),
            };
            match result {
                Ok(event) => Ok(Decoded { msg, event }),
                Err(e) => Err((msg, e)),
            }
        })
        .collect();
    metrics::histogram!(names::STAGE_SECONDS, "stage" => "decode")
        .record(started.elapsed().as_secs_f64());
    out
}

/// Micro-batches of interactions waiting for the writer; more hold the stage back.
const WRITE_QUEUE: usize = 8;
/// Micro-batches the writer folds into one LanceDB commit at most.
const WRITE_MAX_BATCHES: usize = 16;
/// LanceDB appends the writer runs at once.
const APPENDS_IN_FLIGHT: usize = 2;

/// A write whose append runs: what it acknowledges, and the event ids it appends.
struct Append {
    task: tokio::task::JoinHandle<(Result<u64, LanceError>, Duration)>,
    entries: Arc<Vec<HistoryEntry>>,
    msgs: Vec<Consumed>,
    /// Micro-batches it covers (popped from [`Unwritten`] once it completes).
    groups: usize,
    ids: HashSet<String>,
    /// It left out the ids of an earlier write that was dead-lettered: done again whole.
    redo: bool,
}

/// An append's outcome and how long its write took (the stored-id query included).
type AppendResult = Result<(Result<u64, LanceError>, Duration), tokio::task::JoinError>;

/// What the writer waits for: the append in flight, or the next write's groups.
enum Next {
    Appended(AppendResult),
    Group(Option<WriteGroup>),
}

/// One micro-batch's interactions and the messages they acknowledge once durable.
struct WriteGroup {
    entries: Arc<Vec<HistoryEntry>>,
    msgs: Vec<Consumed>,
}

/// Interactions handed to the writer and not yet durable, oldest first. A display reads them
/// as pending history, since LanceDB does not have them yet.
#[derive(Default)]
struct Unwritten(std::sync::Mutex<std::collections::VecDeque<Arc<Vec<HistoryEntry>>>>);

impl Unwritten {
    fn groups(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::VecDeque<Arc<Vec<HistoryEntry>>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, entries: Arc<Vec<HistoryEntry>>) {
        self.groups().push_back(entries);
    }

    /// Forgets the `n` oldest groups (the writer finished them).
    fn pop(&self, n: usize) {
        let mut groups = self.groups();
        let n = n.min(groups.len());
        groups.drain(..n);
    }

    fn snapshot(&self) -> Vec<Arc<Vec<HistoryEntry>>> {
        self.groups().iter().cloned().collect()
    }
}

/// Dead-letter sends running in the background, counted so shutdown can wait for them.
#[derive(Clone, Default)]
pub struct DlqTasks(Arc<(AtomicUsize, tokio::sync::Notify)>);

impl DlqTasks {
    pub fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        /// Decrements on drop, so a task that panics is still counted out.
        struct Running(DlqTasks);
        impl Drop for Running {
            fn drop(&mut self) {
                if (self.0).0 .0.fetch_sub(1, Ordering::SeqCst) == 1 {
                    (self.0).0 .1.notify_waiters();
                }
            }
        }
        self.0 .0.fetch_add(1, Ordering::SeqCst);
        let running = Running(self.clone());
        tokio::spawn(async move {
            let _running = running;
            task.await;
        });
    }

    /// Resolves once no send is running.
    pub async fn wait(&self) {
        loop {
            let notified = self.0 .1.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.0 .0.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// The worker gave up (shutdown deadline passed or the next stage is gone).
#[derive(Debug)]
pub struct Aborted;

/// Why a store operation did not succeed.
#[derive(Debug)]
enum Failure {
    Aborted,
    /// Retrying cannot help: the messages involved go to the DLQ.
    Permanent(LanceError),
}
