//! Crash harness: the `ragar` binary as a separate process, SIGKILLed at seeded random points
//! while it works through a stream and restarted each time, then left to finish. Afterwards:
//! every interaction is in LanceDB exactly once, each user's Redis window equals the newest N
//! of LanceDB, and every display request has an output message (the duplicates that
//! at-least-once allows are counted and printed, not forbidden).
//!
//! CI runs a reduced stream; the full run is the same test with a bigger stream:
//! `RAGAR_CRASH_EVENTS=100000 RAGAR_CRASH_KILLS=5 cargo test --features test-util --test
//! integration crash -- --nocapture`.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::common::*;
use ragar::history::hot::Hot;
use ragar::history::lance::LanceStore;

const SEED: u64 = 11;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_worker_loses_nothing_and_stores_history_once() {
    let events = env_usize("RAGAR_CRASH_EVENTS", 3_000);
    let kills = env_usize("RAGAR_CRASH_KILLS", 5);
    let users = env_usize("RAGAR_CRASH_USERS", 40).max(1);
    let display_every = 10;
    // users × per_user interactions plus one display per `display_every` of them.
    let per_user = (events * display_every / (display_every + 1) / users).max(display_every);
    let s = stream(SEED, 60, users, per_user, display_every);

    let broker = broker();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(
        broker.bootstrap_servers(),
        dir.path(),
        "crash",
        &shared_redis_url(),
    );
    cfg.models.generator = "passthrough".into();
    cfg.models.ranker = "cosine".into();
    let started = Instant::now();

    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let mut n = 0;
    let mut current = Proc::spawn(&cfg, dir.path(), n);
    let p = producer(broker.bootstrap_servers());
    produce_items(&p, &cfg, &s.items).await;

    // The stream arrives in kills + 1 parts. Each process gets a part and is SIGKILLed once it
    // has finished a seeded random number of messages (up to the part's size), so the kills fall
    // anywhere in the stream; the next process takes over its partitions (replaying whatever was
    // not committed) and gets the next part.
    let parts: Vec<&[(String, serde_json::Value)]> = s
        .events
        .chunks(s.events.len().div_ceil(kills + 1))
        .collect();
    let mut killed_after = Vec::new();
    for part in &parts[..parts.len() - 1] {
        produce_all(&p, EVENTS, part).await;
        let target = rng.random_range(1..=part.len());
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut done = 0;
        while done < target {
            assert!(
                done > 0 || Instant::now() < deadline,
                "worker {n} made no progress"
            );
            if done > 0 && Instant::now() >= deadline {
                break; // it finished what it had: kill it idle
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            done = current.processed();
        }
        killed_after.push(done);
        current.child.kill().unwrap(); // SIGKILL
        current.child.wait().unwrap();
        n += 1;
        current = Proc::spawn(&cfg, dir.path(), n);
    }
    produce_all(&p, EVENTS, parts[parts.len() - 1]).await;
    let mut last = current;

    // The last process finishes the stream: every display answered, every interaction stored.
    let out = reader(broker.bootstrap_servers(), IMAGES);
    let wanted: HashSet<&str> = s.displays.iter().map(String::as_str).collect();
    let reads = read_outputs(&out, &s.displays, Duration::from_secs(300)).await;
    wait_stored(&cfg, s.interactions, "every interaction reaches LanceDB").await;
    let final_processed = last.processed();
    let status = last.terminate();
    assert!(
        status.success(),
        "the last worker stops cleanly on SIGTERM: {status}"
    );
    // Whatever it had not yet answered when the reader stopped is counted too.
    let late = read_until(&out, Duration::from_secs(2), |_| false).await;

    // History: once each in LanceDB, and each user's window is LanceDB's newest N.
    let store = LanceStore::open(&cfg.lance.uri, cfg.models.dim)
        .await
        .unwrap();
    let rows = store.count_interactions(None).await.unwrap();
    let hot = Hot::new(&cfg.redis).unwrap();
    let mut windows_checked = 0;
    let mut stored = HashSet::new();
    for u in 0..users {
        let user = format!("user{u}");
        let all = store.recent(&user, per_user * 2).await.unwrap();
        for e in &all {
            assert!(
                stored.insert(e.event_id.clone()),
                "{} stored twice",
                e.event_id
            );
        }
        if let Some(window) = hot.window(&user).await.unwrap() {
            let newest: Vec<&str> = all
                .iter()
                .take(cfg.redis.window)
                .map(|e| e.event_id.as_str())
                .collect();
            let cached: Vec<&str> = window.iter().map(|e| e.event_id.as_str()).collect();
            assert_eq!(cached, newest, "{user}: Redis window vs LanceDB newest");
            windows_checked += 1;
        }
    }
    assert_eq!(
        rows, s.interactions,
        "every interaction stored exactly once"
    );
    assert_eq!(stored.len(), s.interactions);
    assert!(windows_checked > 0, "no Redis window to compare");

    // Outputs: every display answered; duplicates counted.
    let mut per_request: HashMap<String, usize> = HashMap::new();
    for r in reads.iter().chain(&late) {
        *per_request
            .entry(r.json()["request_id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let lost: Vec<&&str> = wanted
        .iter()
        .filter(|w| !per_request.contains_key(**w))
        .collect();
    assert!(lost.is_empty(), "displays without output: {lost:?}");
    let outputs: usize = per_request.values().sum();
    assert_eq!(dlq_messages(&out), 0, "nothing was dead-lettered");

    println!(
        "crash harness: {} events ({} interactions, {} displays, {} users) in {:.1} s; \
         {kills} SIGKILLs (after {killed_after:?} messages each), last process {final_processed} messages; \
         lost 0; LanceDB rows {rows}, duplicate history rows 0; {windows_checked} Redis windows equal \
         LanceDB's newest {}; outputs {outputs} for {} displays: {} duplicates (at-least-once)",
        s.events.len(),
        s.interactions,
        s.displays.len(),
        users,
        started.elapsed().as_secs_f64(),
        cfg.redis.window,
        s.displays.len(),
        outputs - s.displays.len(),
    );
}
