//! Exactly-once mode over the real Kafka protocol: outputs and dead letters go out in
//! transactions that also carry the consumed offsets.
//!
//! librdkafka's mock cluster answers every transactional request, so the whole path runs here
//! (InitProducerId, AddPartitionsToTxn, AddOffsetsToTxn, TxnOffsetCommit, EndTxn), but it keeps
//! no transactional state: TxnOffsetCommit does not store the offsets and Fetch reports no aborted
//! transactions. Zero duplicates across crashes to a read_committed consumer needs an Apache
//! Kafka broker; what this test shows is that the mode works end to end.

use std::time::Duration;

use crate::common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_carry_outputs_dead_letters_and_offsets() {
    let broker = broker();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(
        broker.bootstrap_servers(),
        dir.path(),
        "eos",
        &shared_redis_url(),
    );
    cfg.kafka.exactly_once = true;
    cfg.kafka.transactional_id = format!("ragar-test-eos-{}", std::process::id());
    cfg.kafka.transaction_timeout = Duration::from_secs(10);
    let worker = RunningWorker::start(cfg.clone(), test_models());
    let p = producer(broker.bootstrap_servers());
    let s = stream(9, 12, 4, 10, 3);
    produce_stream(&p, &cfg, &s).await;
    send(&p, EVENTS, "user0", b"{not json").await;
    send_json(
        &p,
        EVENTS,
        "user1",
        &json!({"schema": "ragar.event.v1", "type": "display", "event_id": "dx", "request_id": "rx",
                "user_id": "user1", "item_id": "no-such-item"}),
    )
    .await;

    // The reader's default isolation level is read_committed.
    let out = reader(broker.bootstrap_servers(), IMAGES);
    let reads = read_outputs(&out, &s.displays, Duration::from_secs(90)).await;
    let extra = read_until(&out, Duration::from_secs(2), |_| false).await;
    let mut requests: Vec<String> = reads
        .iter()
        .chain(&extra)
        .map(|r| r.json()["request_id"].as_str().unwrap().to_string())
        .collect();
    requests.sort();
    let mut wanted = s.displays.clone();
    wanted.sort();
    assert_eq!(requests, wanted, "one output per display");

    let dlq = reader(broker.bootstrap_servers(), DLQ);
    let dead = read_until(&dlq, Duration::from_secs(30), |r| r.len() >= 2).await;
    let mut kinds: Vec<&str> = dead
        .iter()
        .map(|r| r.headers["ragar.error.kind"].as_str())
        .collect();
    kinds.sort();
    assert_eq!(kinds, ["invalid_json", "unknown_item"]);

    let page = worker.metrics();
    assert!(
        metric(&page, "ragar_offset_commits_total{reason=\"transaction\"}") >= 1.0,
        "offsets went into transactions"
    );
    worker.stop();
    assert_eq!(lance_count(&cfg).await, s.interactions);
}
