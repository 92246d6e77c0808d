//! The history stores against the real Redis and LanceDB in a temp dir: windows, rebuilds,
//! fallback while Redis is down and recovery after it returns.

use std::time::Duration;

use ragar::config::RedisConfig;
use ragar::event::Action;
use ragar::history::hot::Hot;
use ragar::history::lance::LanceStore;
use ragar::history::store::{History, Source};
use ragar::history::{newest_first, HistoryEntry};
use tokio_util::sync::CancellationToken;

use crate::common::{shared_redis_url, OwnRedis};

const DIM: usize = 4;

fn redis_cfg(url: &str, name: &str, window: usize) -> RedisConfig {
    RedisConfig {
        url: url.to_string(),
        key_prefix: format!("ragar-hist-{name}-{}", std::process::id()),
        window,
        timeout: Duration::from_millis(300),
        retry_interval: Duration::from_millis(100),
        ..RedisConfig::default()
    }
}

fn entry(user: &str, i: usize, emb: [f32; DIM]) -> HistoryEntry {
    HistoryEntry {
        event_id: format!("{user}-e{i:04}"),
        user_id: user.to_string(),
        item_id: format!("item{i}"),
        action: Action::Like,
        ts_ms: 1_000 + i as i64,
        embedding: emb.to_vec().into(),
    }
}

fn sorted(mut v: Vec<HistoryEntry>) -> Vec<HistoryEntry> {
    v.sort_by(newest_first);
    v
}

#[tokio::test]
async fn windows_append_only_when_complete_and_keep_the_newest() {
    let hot = Hot::new(&redis_cfg(&shared_redis_url(), "win", 3)).unwrap();
    let e: Vec<HistoryEntry> = (0..5)
        .map(|i| entry("u", i, [i as f32, 1.0, 0.0, 0.0]))
        .collect();
    hot.invalidate_windows(&["u".to_string()]).await.unwrap();
    assert_eq!(
        hot.append(&[&e[0]]).await.unwrap(),
        0,
        "no window yet: nothing is added"
    );
    assert_eq!(hot.window("u").await.unwrap(), None);

    hot.fill_window("u", &[]).await.unwrap();
    assert_eq!(
        hot.window("u").await.unwrap(),
        Some(vec![]),
        "an empty complete window"
    );
    let refs: Vec<&HistoryEntry> = e.iter().collect();
    assert_eq!(hot.append(&refs).await.unwrap(), 5);
    // Replaying changes nothing.
    hot.append(&refs).await.unwrap();
    let w = hot.window("u").await.unwrap().unwrap();
    assert_eq!(
        w,
        sorted(e.clone())[..3].to_vec(),
        "newest 3, newest first, once each"
    );
    // A replay that resolved another time and embedding adds a second member for its event:
    // reads keep the newest of them.
    let mut again = e[4].clone();
    again.ts_ms += 10;
    again.embedding = vec![9.0, 1.0, 0.0, 0.0].into();
    assert_eq!(hot.append(&[&again]).await.unwrap(), 1);
    assert_eq!(
        hot.window("u").await.unwrap().unwrap(),
        vec![again, e[3].clone()],
        "one entry per event, the newest"
    );
    hot.invalidate_windows(&["u".to_string()]).await.unwrap();

    // A window that expired between an append's EXISTS and its ZADD comes back without the
    // sentinel: reads treat it as missing (and drop it), so it is rebuilt from LanceDB.
    let mut raw = redis::Client::open(shared_redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = hot.window_key("u");
    redis::cmd("ZADD")
        .arg(&key)
        .arg(e[4].ts_ms)
        .arg(ragar::history::hot::encode_member(&e[4]))
        .query_async::<()>(&mut raw)
        .await
        .unwrap();
    assert_eq!(hot.window("u").await.unwrap(), None);
    let left: bool = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(!left, "the incomplete window is dropped");
}

#[tokio::test]
async fn load_rebuilds_from_lancedb_and_searches_older_history() {
    let dir = tempfile::tempdir().unwrap();
    let lance = LanceStore::open(dir.path().to_str().unwrap(), DIM)
        .await
        .unwrap();
    let hot = Hot::new(&redis_cfg(&shared_redis_url(), "load", 4)).unwrap();
    let history = History::new(hot.clone(), lance.clone(), Duration::from_millis(100), true);

    // 10 stored interactions: the oldest one points where the reference will.
    let mut stored: Vec<HistoryEntry> = (1..10)
        .map(|i| entry("v", i, [0.0, 1.0, i as f32 * 0.01, 0.0]))
        .collect();
    stored.push(entry("v", 0, [1.0, 0.0, 0.0, 0.0]));
    history.persist_interactions(&stored).await.unwrap();
    hot.invalidate_windows(&["v".to_string()]).await.unwrap();
    // Not durable yet, from the current batch.
    let pending = entry("v", 10, [0.0, 1.0, 0.5, 0.0]);

    let (h, source) = history
        .load("v", &[1.0, 0.0, 0.0, 0.0], 2, &[&pending])
        .await
        .unwrap();
    assert_eq!(source, Source::LanceDb);
    let ids: Vec<&str> = h.iter().map(|e| e.event_id.as_str()).collect();
    // The window (newest 4, pending included) plus the most similar older item from the search.
    assert_eq!(&ids[..4], &["v-e0010", "v-e0009", "v-e0008", "v-e0007"]);
    assert!(
        ids.contains(&"v-e0000"),
        "deep search found the similar old item: {ids:?}"
    );

    // The rebuilt window is in Redis now.
    let w = hot.window("v").await.unwrap().expect("window filled");
    assert_eq!(w.len(), 4);
    let (_, source) = history
        .load("v", &[1.0, 0.0, 0.0, 0.0], 2, &[])
        .await
        .unwrap();
    assert_eq!(source, Source::Redis);
    hot.invalidate_windows(&["v".to_string()]).await.unwrap();
}

#[tokio::test]
async fn falls_back_while_redis_is_down_and_drops_stale_windows_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = OwnRedis::start();
    let lance = LanceStore::open(dir.path().to_str().unwrap(), DIM)
        .await
        .unwrap();
    let hot = Hot::new(&redis_cfg(&redis.url(), "down", 10)).unwrap();
    // A zero retry interval: every call tries Redis again, so the test need not wait for a timer.
    let history = History::new(hot.clone(), lance, Duration::ZERO, false);

    let first: Vec<HistoryEntry> = (0..3)
        .map(|i| entry("w", i, [1.0, 0.0, 0.0, i as f32]))
        .collect();
    history.persist_interactions(&first).await.unwrap();
    let (h, source) = history
        .load("w", &[1.0, 0.0, 0.0, 0.0], 4, &[])
        .await
        .unwrap();
    assert_eq!((h.len(), source), (3, Source::LanceDb));
    assert!(history.redis_up());

    // Redis goes away with the window in it; the old process's data would be stale.
    redis.stop();
    let more: Vec<HistoryEntry> = (3..6)
        .map(|i| entry("w", i, [1.0, 0.0, 0.0, i as f32]))
        .collect();
    let refs: Vec<&HistoryEntry> = more.iter().collect();
    history.cache_interactions(&refs).await;
    history.persist_interactions(&more).await.unwrap();
    assert!(!history.redis_up());
    let (h, source) = history
        .load("w", &[1.0, 0.0, 0.0, 0.0], 4, &[])
        .await
        .unwrap();
    assert_eq!(
        (h.len(), source),
        (6, Source::LanceDb),
        "served from LanceDB while Redis is down"
    );
    assert!(
        !history.output_done("req").await,
        "unknown while down, not an error"
    );
    assert_eq!(
        history
            .leased(
                "upkeep",
                "w1",
                Duration::from_secs(30),
                &CancellationToken::new(),
                async { 7 }
            )
            .await,
        Some(7),
        "a leased pass runs while Redis cannot say who holds the lease"
    );

    // Back, and restored with the old window (as a Redis with persistence would be).
    redis.restart();
    hot.fill_window("w", &sorted(first.clone())).await.unwrap();
    // The next call recovers, dropping the stale window before anything reads it.
    let (h, _) = history
        .load("w", &[1.0, 0.0, 0.0, 0.0], 4, &[])
        .await
        .unwrap();
    assert!(history.redis_up());
    let all = sorted(first.into_iter().chain(more).collect());
    assert_eq!(
        h, all,
        "the stale window was dropped and rebuilt from LanceDB"
    );
    assert_eq!(hot.window("w").await.unwrap().unwrap(), all);
}

#[tokio::test]
async fn one_holder_at_a_time_runs_a_leased_pass() {
    let url = shared_redis_url();
    let cfg = redis_cfg(&url, "lease", 4);
    let ttl = Duration::from_secs(30);
    let (a, b) = (Hot::new(&cfg).unwrap(), Hot::new(&cfg).unwrap());
    let lease = format!("{}:lease:upkeep", cfg.key_prefix);
    let mut raw = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();

    assert!(a.take_lease("upkeep", "a", ttl).await.unwrap());
    assert!(!b.take_lease("upkeep", "b", ttl).await.unwrap());
    // The holder takes it again (a renewal); the other can neither renew nor release it.
    assert!(a.take_lease("upkeep", "a", ttl).await.unwrap());
    assert!(!b.renew_lease("upkeep", "b", ttl).await.unwrap());
    b.release_lease("upkeep", "b").await.unwrap();
    assert!(!b.take_lease("upkeep", "b", ttl).await.unwrap());
    // It runs out on its own if the holder dies.
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&lease)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(pttl > 0 && pttl <= 30_000, "{pttl}");
    a.release_lease("upkeep", "a").await.unwrap();
    assert!(b.take_lease("upkeep", "b", ttl).await.unwrap());
    b.release_lease("upkeep", "b").await.unwrap();

    // Two workers' passes: while the first runs, the second is skipped; after it, it runs.
    let dir = tempfile::tempdir().unwrap();
    let lance = LanceStore::open(dir.path().to_str().unwrap(), DIM)
        .await
        .unwrap();
    let w1 = std::sync::Arc::new(History::new(
        a,
        lance.clone(),
        Duration::from_millis(100),
        false,
    ));
    let w2 = History::new(b, lance, Duration::from_millis(100), false);
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let first = tokio::spawn({
        let w1 = w1.clone();
        async move {
            w1.leased("upkeep", "w1", ttl, &CancellationToken::new(), async move {
                started_tx.send(()).unwrap();
                finish_rx.await.unwrap();
                1
            })
            .await
        }
    });
    started_rx.await.unwrap();
    let stop = CancellationToken::new();
    assert_eq!(
        w2.leased("upkeep", "w2", ttl, &stop, async { 2 }).await,
        None
    );
    finish_tx.send(()).unwrap();
    assert_eq!(first.await.unwrap(), Some(1));
    let left: bool = redis::cmd("EXISTS")
        .arg(&lease)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(!left, "the lease is given up after the pass");
    assert_eq!(
        w2.leased("upkeep", "w2", ttl, &stop, async { 2 }).await,
        Some(2)
    );

    // Stopping mid-pass drops the pass and gives the lease up at once: the other worker does
    // not wait out its 30 s.
    let w1_stop = CancellationToken::new();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let stopped = tokio::spawn({
        let (w1, w1_stop) = (w1.clone(), w1_stop.clone());
        async move {
            w1.leased("upkeep", "w1", ttl, &w1_stop, async move {
                started_tx.send(()).unwrap();
                std::future::pending::<()>().await;
                1
            })
            .await
        }
    });
    started_rx.await.unwrap();
    assert_eq!(
        w2.leased("upkeep", "w2", ttl, &stop, async { 2 }).await,
        None
    );
    w1_stop.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(10), stopped)
        .await
        .expect("the stopped pass returns");
    assert_eq!(stopped.unwrap(), None, "the stopped pass gives no result");
    let left: bool = redis::cmd("EXISTS")
        .arg(&lease)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(!left, "a stopped holder gives the lease up");
    assert_eq!(
        w2.leased("upkeep", "w2", ttl, &stop, async { 2 }).await,
        Some(2)
    );
    // Stopped before it starts: nothing runs.
    assert_eq!(
        w2.leased("upkeep", "w2", ttl, &w1_stop, async { 2 }).await,
        None
    );
}
