//! [`History`]: LanceDB as the record, Redis as the cache in front of it, and the fallback between them.
//!
//! Every Redis call goes through a small circuit breaker: after a failure Redis is considered
//! down for `redis.retry_interval` and reads are served from LanceDB (a log line on each
//! transition, `ragar_redis_up` and `ragar_redis_fallbacks_total` say so). Windows and cached items
//! written while Redis was down are remembered as dirty and dropped when it comes back, before
//! anything reads them, so a recovered Redis never serves stale history.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::hot::Hot;
use super::lance::{LanceError, LanceStore};
use super::{newest_first, HistoryEntry, Item};
use crate::telemetry::names;

/// Where a display's history came from (reported in the output message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Redis,
    LanceDb,
    None,
}

impl Source {
    pub fn as_str(&self) -> &'static str {
        match self {
            Source::Redis => "redis",
            Source::LanceDb => "lancedb",
            Source::None => "none",
        }
    }
}

/// Dirty keys remembered during an outage before giving up and dropping every window.
const MAX_DIRTY: usize = 100_000;

#[derive(Default)]
struct Health {
    /// `Some(t)`: Redis failed; do not try again before `t`.
    down_until: Option<Instant>,
    /// Counts failures, so a recovery only declares Redis up if nothing failed while it ran.
    failures: u64,
    dirty_users: HashSet<String>,
    dirty_items: HashSet<String>,
    /// Too many dirty keys to list: drop every window on recovery.
    overflow: bool,
}

pub struct History {
    hot: Hot,
    lance: LanceStore,
    health: Mutex<Health>,
    retry_interval: Duration,
    deep_search: bool,
}

impl History {
    pub fn new(hot: Hot, lance: LanceStore, retry_interval: Duration, deep_search: bool) -> Self {
        metrics::gauge!(names::REDIS_UP).set(1.0);
        History {
            hot,
            lance,
            health: Mutex::new(Health::default()),
            retry_interval,
            deep_search,
        }
    }

    pub fn lance(&self) -> &LanceStore {
        &self.lance
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether Redis is believed reachable right now.
    pub fn redis_up(&self) -> bool {
        self.health().down_until.is_none()
    }

    /// Runs one Redis operation through the breaker; `None` means "serve without Redis".
    async fn redis<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        let recovering = match self.health().down_until {
            None => false,
            Some(t) if Instant::now() < t => {
                metrics::counter!(names::REDIS_FALLBACKS, "op" => op).increment(1);
                return None;
            }
            Some(_) => true,
        };
        if recovering && !self.recover().await {
            metrics::counter!(names::REDIS_FALLBACKS, "op" => op).increment(1);
            return None;
        }
        match fut.await {
            Ok(v) => Some(v),
            Err(e) => {
                self.mark_down(op, &e);
                metrics::counter!(names::REDIS_FALLBACKS, "op" => op).increment(1);
                None
            }
        }
    }

    fn mark_down(&self, op: &str, e: &redis::RedisError) {
        let mut h = self.health();
        if h.down_until.is_none() {
            tracing::warn!(op, error = %e, "Redis unreachable: serving history from LanceDB");
            metrics::gauge!(names::REDIS_UP).set(0.0);
        }
        h.failures += 1;
        h.down_until = Some(Instant::now() + self.retry_interval);
    }

    /// Drops what went stale while Redis was down, then marks it up. Returns whether Redis is usable.
    async fn recover(&self) -> bool {
        let (users, items, overflow, failures) = {
            let h = self.health();
            (
                h.dirty_users.iter().cloned().collect::<Vec<_>>(),
                h.dirty_items.iter().cloned().collect::<Vec<_>>(),
                h.overflow,
                h.failures,
            )
        };
        let result = async {
            // The first command after an outage may return the connection manager's last failed
            // reconnect attempt; a second ping uses the fresh connection.
            if self.hot.ping().await.is_err() {
                self.hot.ping().await?;
            }
            if overflow {
                self.hot.invalidate_all().await?;
            } else {
                for chunk in users.chunks(1000) {
                    self.hot.invalidate_windows(chunk).await?;
                }
            }
            for chunk in items.chunks(1000) {
                self.hot.forget_items(chunk).await?;
            }
            Ok::<_, redis::RedisError>(())
        }
        .await;
        let mut h = self.health();
        match result {
            // Only what was dropped is forgotten; anything marked dirty meanwhile stays dirty, and
            // a failure meanwhile keeps Redis down.
            Ok(()) if h.failures == failures => {
                for u in &users {
                    h.dirty_users.remove(u);
                }
                for i in &items {
                    h.dirty_items.remove(i);
                }
                if overflow {
                    h.overflow = false;
                }
                if h.dirty_users.is_empty() && h.dirty_items.is_empty() && !h.overflow {
                    h.down_until = None;
                    metrics::gauge!(names::REDIS_UP).set(1.0);
                    tracing::info!(
                        stale_windows = users.len(),
                        stale_items = items.len(),
                        "Redis is back"
                    );
                    return true;
                }
                false
            }
            Ok(()) => false,
            Err(e) => {
                h.down_until = Some(Instant::now() + self.retry_interval);
                tracing::debug!(error = %e, "Redis still unreachable");
                false
            }
        }
    }

    fn mark_dirty(
        &self,
        users: impl IntoIterator<Item = String>,
        items: impl IntoIterator<Item = String>,
    ) {
        let mut h = self.health();
        if h.overflow {
            return;
        }
        h.dirty_users.extend(users);
        h.dirty_items.extend(items);
        if h.dirty_users.len() + h.dirty_items.len() > MAX_DIRTY {
            h.dirty_users.clear();
            h.dirty_items.clear();
            h.overflow = true;
        }
    }

    /// Makes items durable in LanceDB, then refreshes the cache.
    pub async fn write_items(&self, items: &[Item]) -> Result<(), LanceError> {
        if items.is_empty() {
            return Ok(());
        }
        self.lance.upsert_items(items).await?;
        let refs: Vec<&Item> = items.iter().collect();
        if self
            .redis("put_items", self.hot.put_items(&refs))
            .await
            .is_none()
        {
            self.mark_dirty(None, items.iter().map(|i| i.item_id.clone()));
        }
        Ok(())
    }

    /// The item, from the cache or LanceDB (which then refills the cache).
    pub async fn item(&self, item_id: &str) -> Result<Option<Item>, LanceError> {
        if let Some(Some(item)) = self.redis("item", self.hot.item(item_id)).await {
            return Ok(Some(item));
        }
        let item = self.lance.item(item_id).await?;
        if let Some(it) = &item {
            if self
                .redis("put_items", self.hot.put_items(&[it]))
                .await
                .is_none()
            {
                self.mark_dirty(None, Some(it.item_id.clone()));
            }
        }
        Ok(item)
    }

    /// Adds interactions to the users' hot windows (before they are durable: displays that follow
    /// them must see them). Replays are harmless: a window member is its entry.
    pub async fn cache_interactions(&self, entries: &[&HistoryEntry]) {
        if entries.is_empty() {
            return;
        }
        if self
            .redis("append", self.hot.append(entries))
            .await
            .is_none()
        {
            self.mark_dirty(entries.iter().map(|e| e.user_id.clone()), None);
        }
    }

    /// Makes interactions durable; an event id already stored is skipped. Returns rows inserted.
    pub async fn persist_interactions(&self, entries: &[HistoryEntry]) -> Result<u64, LanceError> {
        self.lance.insert_interactions(entries).await
    }

    /// [`Self::persist_interactions`] in two steps, so that the next write's query for stored
    /// event ids can run while this write's append does: the positions of the entries to append
    /// (leaving out stored event ids and those of `skip`, the appends in flight), then the append.
    pub async fn fresh_interactions(
        &self,
        entries: &[HistoryEntry],
        skip: &[&HashSet<String>],
    ) -> Result<Vec<usize>, LanceError> {
        self.lance.fresh_interactions(entries, skip).await
    }

    pub async fn append_interactions(&self, entries: &[&HistoryEntry]) -> Result<u64, LanceError> {
        self.lance.append_interactions(entries).await
    }

    /// The user's history for a display, newest first: the Redis window, else LanceDB (merged with
    /// `pending`, this batch's earlier interactions that are not durable yet). When the window is
    /// full, the user's `k` entries most similar to `reference` are searched in LanceDB too.
    pub async fn load(
        &self,
        user_id: &str,
        reference: &[f32],
        k: usize,
        pending: &[&HistoryEntry],
    ) -> Result<(Vec<HistoryEntry>, Source), LanceError> {
        let window = self.hot.window_size();
        let (mut entries, source) = match self.redis("window", self.hot.window(user_id)).await {
            Some(Some(w)) => (w, Source::Redis),
            cached => {
                let mut entries = self.lance.recent(user_id, window).await?;
                let known: HashSet<String> = entries.iter().map(|e| e.event_id.clone()).collect();
                entries.extend(
                    pending
                        .iter()
                        .filter(|p| p.user_id == user_id && !known.contains(&p.event_id))
                        .map(|p| (*p).clone()),
                );
                entries.sort_by(newest_first);
                entries.truncate(window);
                if cached.is_some()
                    && self
                        .redis("fill_window", self.hot.fill_window(user_id, &entries))
                        .await
                        .is_none()
                {
                    self.mark_dirty(Some(user_id.to_string()), None);
                }
                (entries, Source::LanceDb)
            }
        };
        if self.deep_search && entries.len() >= window {
            let known: HashSet<String> = entries.iter().map(|e| e.event_id.clone()).collect();
            let older = self.lance.nearest(user_id, reference, k).await?;
            entries.extend(older.into_iter().filter(|e| !known.contains(&e.event_id)));
            entries.sort_by(newest_first);
        }
        let source = if entries.is_empty() {
            Source::None
        } else {
            source
        };
        Ok((entries, source))
    }

    /// Whether a display's output was already published (false when Redis cannot say).
    pub async fn output_done(&self, request_id: &str) -> bool {
        self.redis("output_done", self.hot.output_done(request_id))
            .await
            .unwrap_or(false)
    }

    pub async fn mark_output_done(&self, request_id: &str) {
        self.redis("mark_output_done", self.hot.mark_output_done(request_id))
            .await;
    }

    /// Runs `pass` while holding the Redis lease `name` for `holder` (renewed every third of
    /// `ttl` while it runs, given up after), so that of several workers sharing the tables one
    /// at a time runs it; `None`, without running it, when another holder has the lease. Without
    /// Redis the pass runs anyway: overlapping another worker's pass costs a conflicting commit,
    /// not data. When `stop` is cancelled first, the pass is dropped (each of its Lance commits
    /// is atomic, so the tables stay consistent and the next pass finishes the work) and the
    /// lease given up at once, so that another worker need not wait out `ttl`: `None`. A lease
    /// whose holder dies runs out after `ttl`.
    pub async fn leased<T>(
        &self,
        name: &'static str,
        holder: &str,
        ttl: Duration,
        stop: &CancellationToken,
        pass: impl Future<Output = T>,
    ) -> Option<T> {
        if stop.is_cancelled() {
            return None;
        }
        let taken = self
            .redis("take_lease", self.hot.take_lease(name, holder, ttl))
            .await;
        match taken {
            Some(false) => return None,
            // Redis cannot say: run it, with no lease to keep.
            None => {
                return tokio::select! {
                    biased;
                    out = pass => Some(out),
                    _ = stop.cancelled() => None,
                }
            }
            Some(true) => {}
        }
        let every = (ttl / 3).max(Duration::from_millis(1));
        let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let mut pass = std::pin::pin!(pass);
        // Stopped while the lease was being taken: nothing runs, and it is given back below.
        let out = if stop.is_cancelled() {
            None
        } else {
            loop {
                tokio::select! {
                    // A pass that has finished keeps its result, stopping or not.
                    biased;
                    out = &mut pass => break Some(out),
                    _ = stop.cancelled() => break None,
                    _ = renew.tick() => {
                        let renewed = self
                            .redis("renew_lease", self.hot.renew_lease(name, holder, ttl))
                            .await;
                        if renewed == Some(false) {
                            tracing::warn!(lease = name, "the lease ran out during the pass; another worker may run one too");
                        }
                    }
                }
            }
        };
        self.redis("release_lease", self.hot.release_lease(name, holder))
            .await;
        out
    }

    /// Compacts LanceDB and refreshes the fragment and unindexed-rows gauges.
    pub async fn maintain(&self) -> Result<(), LanceError> {
        let started = Instant::now();
        let compacted = self.lance.optimize().await;
        metrics::histogram!(names::STAGE_SECONDS, "stage" => "compact")
            .record(started.elapsed().as_secs_f64());
        match self.lance.fragment_count().await {
            Ok(n) => metrics::gauge!(names::LANCE_FRAGMENTS).set(n as f64),
            Err(e) => tracing::warn!(error = %e, "counting LanceDB fragments failed"),
        }
        self.report_unindexed().await;
        compacted
    }

    /// Indexes the rows written since the last maintenance (a segment of their own), and
    /// refreshes the unindexed-rows gauge (also when indexing failed, so that the backlog shows).
    pub async fn index_new_rows(&self) -> Result<(), LanceError> {
        let started = Instant::now();
        let indexed = self.lance.index_new_rows().await;
        metrics::histogram!(names::STAGE_SECONDS, "stage" => "index")
            .record(started.elapsed().as_secs_f64());
        self.report_unindexed().await;
        indexed
    }

    async fn report_unindexed(&self) {
        match self.lance.unindexed_rows().await {
            Ok(rows) => metrics::gauge!(names::LANCE_UNINDEXED_ROWS).set(rows as f64),
            Err(e) => tracing::warn!(error = %e, "counting unindexed LanceDB rows failed"),
        }
    }
}
