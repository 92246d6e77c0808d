//! Faults, with the worker as a separate process: the LanceDB volume turning read-only stalls
//! the worker (it says why, and acknowledges nothing it could not write) and it resumes by itself
//! once the volume is writable again; the broker going away and coming back likewise.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;

/// A tmpfs mounted for the test and unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    /// `None` where this process may not mount (not root, or no CAP_SYS_ADMIN).
    fn tmpfs(at: &Path) -> Option<Mount> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256m", "tmpfs"])
            .arg(at)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Mount(at.to_path_buf()))
    }

    fn remount(&self, mode: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success(), "remount {mode}");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_lancedb_volume_stalls_the_worker_until_it_is_writable() {
    let dir = tempfile::tempdir().unwrap();
    let Some(volume) = Mount::tmpfs(&dir.path().join("volume")) else {
        println!("skipped: this process cannot mount a tmpfs to make read-only (needs root)");
        return;
    };
    let broker = broker();
    let mut cfg = config(
        broker.bootstrap_servers(),
        dir.path(),
        "readonly",
        &shared_redis_url(),
    );
    cfg.lance.uri = volume.0.join("lancedb").to_string_lossy().into_owned();
    // No display in this stream: only history writes.
    let s = stream(3, 10, 8, 30, 1_000);
    let (first, second) = s.events.split_at(s.events.len() / 2);

    let mut worker = Proc::spawn(&cfg, dir.path(), 0);
    let p = producer(broker.bootstrap_servers());
    produce_items(&p, &cfg, &s.items).await;
    produce_all(&p, EVENTS, first).await;
    wait_stored(&cfg, first.len(), "the first half is stored").await;

    volume.remount("ro");
    produce_all(&p, EVENTS, second).await;
    until(
        "the worker reports failing writes",
        Duration::from_secs(60),
        async || {
            let page = worker.metrics();
            page.map_or(0.0, |p| metric(&p, "ragar_lance_write_errors_total")) >= 2.0
        },
    )
    .await;
    assert_eq!(
        lance_count(&cfg).await,
        first.len(),
        "nothing written while read-only"
    );
    let page = worker.metrics().unwrap();
    assert_eq!(
        metric(&page, "ragar_dlq_messages_total"),
        0.0,
        "nothing dead-lettered"
    );
    let stored_ok: f64 = page
        .lines()
        .filter(|l| l.starts_with("ragar_events_total{"))
        .filter(|l| l.contains("type=\"interaction\"") && l.contains("outcome=\"ok\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(
        stored_ok as usize,
        first.len(),
        "nothing acknowledged that was not written"
    );

    volume.remount("rw");
    wait_stored(&cfg, s.events.len(), "the worker resumes").await;
    let status = worker.terminate();
    assert!(status.success(), "clean stop: {status}");
    assert_eq!(
        lance_count(&cfg).await,
        s.events.len(),
        "each interaction once"
    );
    let reader = reader(broker.bootstrap_servers(), DLQ);
    assert_eq!(dlq_messages(&reader), 0, "no message reached the DLQ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_stalls_the_worker_until_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker();
    let cfg = config(
        broker.bootstrap_servers(),
        dir.path(),
        "brokerdown",
        &shared_redis_url(),
    );
    let s = stream(4, 10, 6, 20, 5);
    let (first, second) = s.events.split_at(s.events.len() / 2);
    let interactions = |events: &[(String, serde_json::Value)]| {
        events
            .iter()
            .filter(|(_, v)| v["type"] == "interaction")
            .count()
    };

    let mut worker = Proc::spawn(&cfg, dir.path(), 0);
    let p = producer(broker.bootstrap_servers());
    produce_items(&p, &cfg, &s.items).await;
    produce_all(&p, EVENTS, first).await;
    wait_stored(&cfg, interactions(first), "the first half is stored").await;

    broker.set_reachable(false).unwrap();
    // The worker notices (its consumer reports the lost connection) and keeps running.
    until(
        "the worker notices the broker going away",
        Duration::from_secs(60),
        async || {
            let page = worker.metrics().expect("the worker keeps serving /metrics");
            metric(
                &page,
                "ragar_events_total{type=\"unknown\",outcome=\"consumer_error\"}",
            ) > 0.0
        },
    )
    .await;
    broker.set_reachable(true).unwrap();

    produce_all(&p, EVENTS, second).await;
    let out = reader(broker.bootstrap_servers(), IMAGES);
    let reads = read_outputs(&out, &s.displays, Duration::from_secs(120)).await;
    wait_stored(&cfg, s.interactions, "the worker resumes").await;
    let status = worker.terminate();
    assert!(status.success(), "clean stop: {status}");
    assert_eq!(
        lance_count(&cfg).await,
        s.interactions,
        "each interaction once"
    );
    let answered: std::collections::HashSet<String> = reads
        .iter()
        .map(|r| r.json()["request_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(answered.len(), s.displays.len(), "every display answered");
}
