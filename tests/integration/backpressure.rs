//! Backpressure at the consumer, over the real Kafka protocol: work in flight never passes
//! `kafka.max_in_flight`; a short stall only holds reading, a long one pauses the partitions
//! (and the consumer keeps polling); completions resume it and nothing is lost or reordered; the
//! time spent throttled is counted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ragar::ingest::{Consumed, Ingest};
use ragar::offsets::Acks;
use ragar::telemetry::Health;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::common::*;

const MAX_IN_FLIGHT: usize = 10;

/// The next message, failing the test if none comes within a minute.
async fn next(rx: &mut mpsc::Receiver<Consumed>) -> Consumed {
    tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .expect("a message within a minute")
        .expect("the consumer is running")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_work_is_capped_then_paused_then_resumed_without_loss() {
    let broker = broker();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(
        broker.bootstrap_servers(),
        dir.path(),
        "backpressure",
        &shared_redis_url(),
    );
    cfg.kafka.input_topics = vec![EVENTS.into()];
    cfg.kafka.max_in_flight = MAX_IN_FLIGHT;
    cfg.kafka.pause_after = Duration::from_secs(1);
    let p = producer(broker.bootstrap_servers());
    // One key, so one partition and one order.
    let total = 5 * MAX_IN_FLIGHT;
    for i in 0..total {
        send(&p, EVENTS, "k", format!("m{i}").as_bytes()).await;
    }

    let acks = Arc::new(Acks::new());
    let ingest = Arc::new(Ingest::new(&cfg.kafka, acks.clone(), None).unwrap());
    let (tx, mut rx) = mpsc::channel(total + 1);
    let stop = CancellationToken::new();
    let run = {
        let (ingest, stop) = (ingest.clone(), stop.clone());
        tokio::spawn(async move { ingest.run(tx, stop, Arc::new(Health::default())).await })
    };

    let mut got: Vec<Consumed> = Vec::new();
    let mut payloads = Vec::new();
    let mut rounds = 0;
    while payloads.len() < total {
        // Take everything the consumer hands out without completing any of it: exactly the limit.
        for _ in 0..MAX_IN_FLIGHT {
            got.push(next(&mut rx).await);
        }
        assert_eq!(ingest.in_flight(), MAX_IN_FLIGHT);
        let held = Instant::now();
        if rounds == 0 {
            // At the limit the consumer first only holds off reading: librdkafka keeps its
            // prefetched messages.
            assert!(!ingest.paused(), "paused before kafka.pause_after");
            // Held past `pause_after`, the partitions are paused; the consumer keeps polling.
            while !ingest.paused() {
                assert!(held.elapsed() < Duration::from_secs(30), "never paused");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // Nothing beyond the limit arrives while it is full.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), rx.recv())
                .await
                .is_err(),
            "a message beyond kafka.max_in_flight"
        );
        for m in got.drain(..) {
            payloads.push(String::from_utf8(m.payload.clone().unwrap()).unwrap());
            acks.complete(&m.token);
        }
        rounds += 1;
    }
    // Completions resumed the partitions; every message came once, in order.
    let expected: Vec<String> = (0..total).map(|i| format!("m{i}")).collect();
    assert_eq!(payloads, expected);
    let done = Instant::now();
    while ingest.paused() {
        assert!(done.elapsed() < Duration::from_secs(30), "never resumed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    run.await.unwrap().unwrap();
    // The hold before the pause alone lasted `pause_after`; the throttled-time counter saw it.
    assert!(
        ingest.throttled() + Duration::from_millis(50) >= cfg.kafka.pause_after,
        "throttled {:?}",
        ingest.throttled()
    );
}
