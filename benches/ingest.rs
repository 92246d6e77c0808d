//! Ingest throughput: interaction events with 384-dim embeddings through decode + Redis + LanceDB,
//! against the raw rdkafka consume rate measured in the same run (the ceiling).
//!
//! `cargo bench --profile dev --bench ingest -- [EVENTS] [USERS]` (defaults 100000, 1000);
//! `RAGAR_BENCH_EMBEDDING=base64` sends the embeddings as base64 float32 (`ragar.event.v2`)
//! instead of JSON numbers. Needs
//! Redis on 127.0.0.1:6379 (or `RAGAR_BENCH_REDIS_URL`). Prints figures; asserts nothing.
//! `RAGAR_BENCH_PERF=FILE` records the timed span with `perf record -g` into FILE
//! (`RAGAR_BENCH_PERF_GRAPH=dwarf`: `--call-graph dwarf`, for callers through code built without
//! frame pointers).

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};

use ragar::broker::MockBroker;
use ragar::config::Config;
use ragar::model::testutil::TintGenerator;
use ragar::model::CosineRanker;
use ragar::worker::Models;

/// The allocator the `ragar` binary uses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DIM: usize = 384;
const PARTITIONS: i32 = 128;
const TOPIC: &str = "ragar.events";

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let events: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let users: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(events, users));
}

async fn run(n: usize, users: usize) {
    let topics: Vec<(String, i32)> = ["ragar.items", TOPIC, "ragar.images", "ragar.events.dlq"]
        .iter()
        .map(|t| (t.to_string(), if *t == TOPIC { PARTITIONS } else { 2 }))
        .collect();
    let broker = MockBroker::start(&topics).unwrap();
    let bootstrap = broker.bootstrap_servers().to_string();

    // Payloads: 384 floats with 3 decimals, as a producer that rounds its embeddings would send
    // (`ragar.event.v1`), or with `RAGAR_BENCH_EMBEDDING=base64` the same values as base64
    // float32 (`ragar.event.v2`).
    let base64 = match std::env::var("RAGAR_BENCH_EMBEDDING").as_deref() {
        Ok("base64") => true,
        Ok("json") | Err(_) => false,
        Ok(other) => panic!("RAGAR_BENCH_EMBEDDING: `{other}` is neither json nor base64"),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let payloads: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let user = format!("user{}", i % users);
            let emb: Vec<String> = (0..DIM).map(|_| format!("{:.3}", rng.random_range(-1.0f32..1.0))).collect();
            let (schema, embedding) = if base64 {
                let bytes: Vec<u8> = emb
                    .iter()
                    .flat_map(|v| v.parse::<f32>().unwrap().to_le_bytes())
                    .collect();
                ("ragar.event.v2", format!("\"{}\"", BASE64.encode(bytes)))
            } else {
                ("ragar.event.v1", format!("[{}]", emb.join(",")))
            };
            let p = format!(
                r#"{{"schema":"{schema}","type":"interaction","event_id":"ev{i}","user_id":"{user}","item_id":"it{}","action":"click","ts":{},"embedding":{embedding}}}"#,
                i % 5000,
                1_700_000_000_000i64 + i as i64,
            );
            (user, p.into_bytes())
        })
        .collect();
    let bytes: usize = payloads.iter().map(|(_, p)| p.len()).sum();
    println!(
        "events: {n}, users: {users}, embeddings as {}, mean payload {} bytes, {PARTITIONS} partitions",
        if base64 { "base64 float32" } else { "JSON numbers" },
        bytes / n
    );

    // Decode alone, single thread.
    let limits = ragar::event::Limits::for_dim(DIM);
    let t = Instant::now();
    for (_, p) in &payloads {
        ragar::event::decode(p, 0, &limits).unwrap();
    }
    let decode_s = t.elapsed().as_secs_f64();
    println!(
        "decode only (1 thread): {:.0} events/s",
        n as f64 / decode_s
    );
    // The same, keeping every result alive (as the pipeline does until the events are durable).
    let t = Instant::now();
    let kept: Vec<_> = payloads
        .iter()
        .map(|(_, p)| ragar::event::decode(p, 0, &limits).unwrap())
        .collect();
    println!(
        "decode only, results kept (1 thread): {:.0} events/s",
        n as f64 / t.elapsed().as_secs_f64()
    );
    drop(kept);
    // For comparison: serde converting the embedding itself (what decode avoids).
    #[derive(serde::Deserialize)]
    struct SerdeFloats {
        #[allow(dead_code)]
        embedding: Vec<f32>,
    }
    if !base64 {
        let t = Instant::now();
        for (_, p) in &payloads {
            serde_json::from_slice::<SerdeFloats>(p).unwrap();
        }
        println!(
            "  reference: serde parsing the embedding alone: {:.0} events/s",
            n as f64 / t.elapsed().as_secs_f64()
        );
    }

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "2000000")
        .create()
        .unwrap();
    let t = Instant::now();
    let sends: Vec<_> = payloads
        .iter()
        .map(|(k, p)| {
            producer
                .send_result(
                    FutureRecord::to(TOPIC)
                        .key(k.as_str())
                        .payload(p.as_slice()),
                )
                .unwrap()
        })
        .collect();
    for s in sends {
        s.await.unwrap().unwrap();
    }
    println!(
        "produce: {:.0} events/s",
        n as f64 / t.elapsed().as_secs_f64()
    );

    // The ceiling: a plain consumer reading (and copying) every message.
    let raw: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "bench-raw")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    raw.subscribe(&[TOPIC]).unwrap();
    let first = raw.recv().await.unwrap().payload().map(<[u8]>::to_vec);
    let t = Instant::now();
    let mut got = 1usize;
    let mut sink = first.map_or(0, |p| p.len());
    while got < n {
        let m = raw.recv().await.unwrap();
        sink += m.payload().map(<[u8]>::to_vec).map_or(0, |p| p.len());
        got += 1;
    }
    let raw_rate = (n - 1) as f64 / t.elapsed().as_secs_f64();
    println!(
        "raw rdkafka consume: {raw_rate:.0} events/s ({} MB copied)",
        sink / 1_000_000
    );
    drop(raw);

    // The worker: decode + Redis windows + LanceDB, every event acknowledged only once durable.
    let dir = tempfile::tempdir().unwrap();
    // Defaults, then RAGAR_* variables (e.g. RAGAR_LANCE__BATCH_MAX_ROWS=5000), then the bench's own.
    let mut cfg = Config::load(None).expect("configuration");
    cfg.kafka.brokers = bootstrap.clone();
    cfg.kafka.group_id = "bench-worker".into();
    cfg.kafka.input_topics = vec![TOPIC.into()];
    cfg.kafka.session_timeout = Duration::from_secs(6);
    cfg.redis.url =
        std::env::var("RAGAR_BENCH_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    cfg.redis.key_prefix = format!("ragar-bench-{}", std::process::id());
    cfg.lance.uri = dir.path().join("lancedb").to_string_lossy().into_owned();
    cfg.telemetry.listen = "127.0.0.1:0".parse().unwrap();
    cfg.models.dim = DIM;

    // An established deployment: earlier history in LanceDB, compacted and indexed (the worker's
    // background maintenance builds the BTree indices a minute after start), so each write's
    // lookup of stored event ids goes through the event_id index as it does in production.
    // `RAGAR_BENCH_FRESH=1` starts from an empty, unindexed table instead.
    let mut earlier_rows = 0;
    if std::env::var_os("RAGAR_BENCH_FRESH").is_none() {
        let store = ragar::history::lance::LanceStore::open(&cfg.lance.uri, DIM)
            .await
            .unwrap();
        let earlier: Vec<ragar::history::HistoryEntry> = (0..n / 10)
            .map(|i| ragar::history::HistoryEntry {
                event_id: format!("earlier{i}"),
                user_id: format!("user{}", i % users),
                item_id: format!("it{}", i % 5000),
                action: ragar::event::Action::Click,
                ts_ms: 1_600_000_000_000 + i as i64,
                embedding: (0..DIM).map(|_| rng.random_range(-1.0f32..1.0)).collect(),
            })
            .collect();
        store.insert_interactions(&earlier).await.unwrap();
        store.optimize().await.unwrap();
        earlier_rows = earlier.len();
        println!("LanceDB: {earlier_rows} earlier rows, indexed");
    }

    // Every user has a complete hot window, so each event really lands in Redis.
    let hot = ragar::history::hot::Hot::new(&cfg.redis).unwrap();
    for u in 0..users {
        hot.fill_window(&format!("user{u}"), &[]).await.unwrap();
    }

    let models = Models {
        encoder: None,
        generator: Arc::new(TintGenerator),
        ranker: Arc::new(CosineRanker {
            personalization_weight: 0.5,
            encoder: None,
        }),
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let worker_cfg = cfg.clone();
    let worker = tokio::spawn(async move {
        ragar::worker::run(
            worker_cfg,
            models,
            async move {
                let _ = stop_rx.await;
            },
            None,
        )
        .await
        .unwrap();
    });
    let handle = ragar::telemetry::metrics_handle();
    let done = || {
        let page = handle.render();
        page.lines()
            .filter(|l| l.starts_with("ragar_events_total{") && l.contains("type=\"interaction\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as usize
    };
    // Time from the first event processed to the last one durable.
    while done() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t = Instant::now();
    let start_count = done();
    // RAGAR_BENCH_PERF=FILE: profile the process with `perf record` over the timed span alone.
    let perf = std::env::var("RAGAR_BENCH_PERF").ok().map(|out| {
        let graph = std::env::var("RAGAR_BENCH_PERF_GRAPH").unwrap_or_else(|_| "fp".into());
        std::process::Command::new("perf")
            .args([
                "record",
                "-F",
                "1999",
                "--call-graph",
                &graph,
                "-o",
                &out,
                "-p",
            ])
            .arg(std::process::id().to_string())
            .spawn()
            .expect("perf runs")
    });
    let (threads_before, redis_before, written_before) =
        (thread_cpu(), redis_cpu(&cfg.redis.url), bytes_written());
    // Sampled every 20 ms: how often backpressure had the partitions paused, and work in flight.
    let (mut samples, mut paused, mut in_flight) = (0usize, 0usize, 0.0);
    while done() < n {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let page = handle.render();
        samples += 1;
        paused += (value(&page, "ragar_consumer_paused ") > 0.0) as usize;
        in_flight += value(&page, "ragar_in_flight_messages ");
    }
    let elapsed = t.elapsed().as_secs_f64();
    if let Some(mut perf) = perf {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &perf.id().to_string()])
            .status();
        let _ = perf.wait();
    }
    let (threads_after, redis_after, written_after) =
        (thread_cpu(), redis_cpu(&cfg.redis.url), bytes_written());
    let worker_rate = (n - start_count) as f64 / elapsed;
    let _ = stop_tx.send(());
    worker.await.unwrap();
    let store = ragar::history::lance::LanceStore::open(&cfg.lance.uri, DIM)
        .await
        .unwrap();
    let rows = store.count_interactions(None).await.unwrap();
    let window = hot.window("user0").await.unwrap().map_or(0, |w| w.len());
    println!("worker (decode + Redis + LanceDB, acked when durable): {worker_rate:.0} events/s");
    // Where the time goes: the worker's own stage histograms.
    let page = handle.render();
    for stage in ["decode", "history_cache", "history_write"] {
        let pick = |suffix: &str| {
            value(
                &page,
                &format!("ragar_stage_seconds_{suffix}{{stage=\"{stage}\"}}"),
            )
        };
        let (sum, count) = (pick("sum"), pick("count"));
        println!(
            "  stage {stage:<14} {count:>5.0} batches, {sum:>7.2} s total, {:>7.2} ms/batch",
            1e3 * sum / count.max(1.0)
        );
    }
    println!(
        "  partitions paused {:.0}% of the time; mean in flight {:.0} messages (kafka.max_in_flight {})",
        100.0 * paused as f64 / samples.max(1) as f64,
        in_flight / samples.max(1) as f64,
        cfg.kafka.max_in_flight
    );
    // CPU per event by thread group (this process) and in redis-server, over the timed span.
    let events = (n - start_count) as f64;
    let mut groups: Vec<(String, f64)> = threads_after
        .iter()
        .map(|(name, after)| {
            (
                name.clone(),
                after - threads_before.get(name).copied().unwrap_or(0.0),
            )
        })
        .filter(|(_, s)| *s > 0.0)
        .collect();
    groups.push(("redis-server".into(), redis_after - redis_before));
    groups.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = groups.iter().map(|g| g.1).sum();
    println!(
        "  CPU over {elapsed:.2} s: {:.2} cores busy, {:.1} µs per event",
        total / elapsed,
        1e6 * total / events
    );
    for (name, secs) in &groups {
        println!("    {name:<22} {:>6.1} µs/event", 1e6 * secs / events);
    }
    println!(
        "  written to files and sockets: {:.0} bytes/event",
        (written_after - written_before) as f64 / events
    );
    println!("ratio raw consume / worker: {:.2}", raw_rate / worker_rate);
    let expected = earlier_rows + n;
    println!("LanceDB rows: {rows} (expected {expected}); user0 window: {window} entries");
    assert_eq!(rows, expected, "every event stored once");
}

/// The value of the first sample in a Prometheus text page whose line starts with `prefix`; 0 if none.
fn value(page: &str, prefix: &str) -> f64 {
    page.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// CPU seconds (user + system) of this process's live threads, summed by name with digits removed
/// (`tokio-runtime-w`, `rdk:broker`, ...). The mock cluster's threads are among them.
fn thread_cpu() -> std::collections::HashMap<String, f64> {
    let tick = 100.0; // USER_HZ on Linux
    let mut out = std::collections::HashMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name: String = stat[open + 1..close]
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .collect();
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        // After the name: state is field 3 of stat(5), utime 14 and stime 15.
        let cpu = fields
            .get(11)
            .and_then(|u| u.parse::<f64>().ok())
            .unwrap_or(0.0)
            + fields
                .get(12)
                .and_then(|s| s.parse::<f64>().ok())
                .unwrap_or(0.0);
        *out.entry(name).or_insert(0.0) += cpu / tick;
    }
    out
}

/// redis-server's CPU seconds so far (`INFO cpu`: used_cpu_user + used_cpu_sys).
fn redis_cpu(url: &str) -> f64 {
    let Ok(mut c) = redis::Client::open(url).and_then(|c| c.get_connection()) else {
        return 0.0;
    };
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query(&mut c)
        .unwrap_or_default();
    info.lines()
        .filter(|l| l.starts_with("used_cpu_user:") || l.starts_with("used_cpu_sys:"))
        .filter_map(|l| l.split(':').nth(1)?.trim().parse::<f64>().ok())
        .sum()
}

/// Bytes this process has handed to write(2) and friends so far (`wchar` of /proc/self/io).
fn bytes_written() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("wchar:").map(|v| v.trim().parse().ok()))
                .flatten()
        })
        .unwrap_or(0)
}
