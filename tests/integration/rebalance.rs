//! Rebalance: two `ragar run` processes in one consumer group, one joining mid-stream and the
//! first leaving mid-stream. Nothing is lost, each user's displays are answered in order with all
//! of the user's earlier interactions in view, and the revoke path drains and commits.
//!
//! The mock cluster refuses every OffsetCommit while its group is rebalancing (its JOINING state,
//! `rd_kafka_mock_cgrp_classic_check_state` in librdkafka), where Apache Kafka accepts commits of
//! the current generation until the rebalance completes; so here the commit on revoke is refused,
//! the partitions' new owner replays from the previous timer commit, and the replays are counted
//! (the stores absorb them) instead of being required to be zero. The leaving process commits
//! before it leaves, while the group is stable.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::common::*;
use ragar::history::lance::LanceStore;

fn duplicates(page: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with("ragar_events_total{") && l.contains("outcome=\"duplicate\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_joining_and_leaving_lose_nothing_and_keep_each_users_order() {
    let users = 24;
    let s = stream(5, 30, users, 40, 5);
    let broker = broker();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(
        broker.bootstrap_servers(),
        dir.path(),
        "rebalance",
        &shared_redis_url(),
    );
    cfg.models.generator = "passthrough".into();
    cfg.models.ranker = "cosine".into();
    cfg.preference.deep_search = false;
    let p = producer(broker.bootstrap_servers());
    let thirds: Vec<&[(String, serde_json::Value)]> =
        s.events.chunks(s.events.len().div_ceil(3)).collect();
    let interactions_in = |events: &[(String, serde_json::Value)]| {
        events
            .iter()
            .filter(|(_, v)| v["type"] == "interaction")
            .count()
    };

    let mut a = Proc::spawn(&cfg, dir.path(), 0);
    produce_items(&p, &cfg, &s.items).await;
    produce_all(&p, EVENTS, thirds[0]).await;
    let first = interactions_in(thirds[0]);
    wait_stored(&cfg, first, "A has stored the first third").await;

    // B joins: the group rebalances, A commits what it revokes.
    let mut b = Proc::spawn(&cfg, dir.path(), 1);
    produce_all(&p, EVENTS, thirds[1]).await;
    let second = first + interactions_in(thirds[1]);
    until(
        "B has taken partitions and worked",
        Duration::from_secs(90),
        async || b.processed() > 0 && lance_count(&cfg).await >= second,
    )
    .await;
    let a_page = a.metrics().unwrap();
    let a_duplicates = duplicates(&a_page);

    // A leaves: B takes everything over.
    let status = a.terminate();
    assert!(status.success(), "A stops cleanly: {status}");
    produce_all(&p, EVENTS, thirds[2]).await;

    let out = reader(broker.bootstrap_servers(), IMAGES);
    let reads = read_outputs(&out, &s.displays, Duration::from_secs(120)).await;
    wait_stored(&cfg, s.interactions, "every interaction is stored").await;
    let b_page = b.metrics().unwrap();
    let status = b.terminate();
    assert!(status.success(), "B stops cleanly: {status}");
    let log =
        |n: usize| std::fs::read_to_string(dir.path().join(format!("worker-{n}.log"))).unwrap();
    let (a_log, b_log) = (log(0), log(1));
    assert!(
        a_log.contains("partitions revoked") && a_log.contains("drained=true"),
        "A drained what B took over:\n{a_log}"
    );
    assert!(
        !a_log.contains("final commit failed"),
        "A committed before leaving:\n{a_log}"
    );
    assert!(
        b_log.contains("partitions revoked"),
        "B rebalanced when A left:\n{b_log}"
    );

    // Nothing lost, nothing stored twice.
    let store = LanceStore::open(&cfg.lance.uri, cfg.models.dim)
        .await
        .unwrap();
    assert_eq!(
        store.count_interactions(None).await.unwrap(),
        s.interactions
    );
    let replayed = a_duplicates + duplicates(&b_page);

    // Each user's outputs in display order, each seeing all the user's earlier interactions.
    let mut prior: HashMap<String, usize> = HashMap::new();
    let mut expected_len: HashMap<String, usize> = HashMap::new();
    let mut order: HashMap<String, Vec<String>> = HashMap::new();
    for (user, v) in &s.events {
        match v["type"].as_str().unwrap() {
            "interaction" => *prior.entry(user.clone()).or_default() += 1,
            _ => {
                let r = v["request_id"].as_str().unwrap().to_string();
                expected_len.insert(r.clone(), prior.get(user).copied().unwrap_or(0));
                order.entry(user.clone()).or_default().push(r);
            }
        }
    }
    let mut seen_order: HashMap<String, Vec<String>> = HashMap::new();
    let mut seen = HashSet::new();
    for r in &reads {
        let v = r.json();
        let request = v["request_id"].as_str().unwrap().to_string();
        let history_len = v["weighting"]["history_len"].as_u64().unwrap() as usize;
        let expected = expected_len[&request].min(cfg.redis.window);
        assert_eq!(
            history_len, expected,
            "{request}: history seen by the display"
        );
        if seen.insert(request.clone()) {
            seen_order
                .entry(v["user_id"].as_str().unwrap().to_string())
                .or_default()
                .push(request);
        }
    }
    assert_eq!(seen_order, order, "each user's displays answered in order");
    println!(
        "rebalance: {} events, {} displays answered in order, nothing lost; {replayed} messages \
         replayed after the mock refused the commits on revoke",
        s.events.len(),
        seen.len()
    );
}
