//! Shared fixtures for the integration tests: a mock Kafka cluster, a worker on its own runtime,
//! event builders, an output reader and schema validation. Everything runs against the real
//! Kafka protocol, the real Redis and LanceDB in a temp dir.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::{json, Value};

use ragar::broker::MockBroker;
use ragar::config::Config;
use ragar::model::testutil::TintGenerator;
use ragar::model::CosineRanker;
use ragar::worker::Models;

pub const DIM: usize = 8;
pub const EVENTS: &str = "ragar.events";
pub const ITEMS: &str = "ragar.items";
pub const IMAGES: &str = "ragar.images";
pub const DLQ: &str = "ragar.events.dlq";

/// A mock cluster with the worker's topics (enough partitions that none evicts messages).
pub fn broker() -> MockBroker {
    let topics: Vec<(String, i32)> = [(ITEMS, 4), (EVENTS, 8), (IMAGES, 4), (DLQ, 2)]
        .iter()
        .map(|(t, p)| (t.to_string(), *p))
        .collect();
    MockBroker::start(&topics).expect("mock cluster starts")
}

/// A test configuration: small dimension, short timeouts, unique Redis prefix, LanceDB in `dir`.
pub fn config(bootstrap: &str, dir: &Path, name: &str, redis_url: &str) -> Config {
    let mut c = Config::default();
    c.kafka.brokers = bootstrap.to_string();
    c.kafka.group_id = format!("ragar-{name}");
    c.kafka.session_timeout = Duration::from_secs(6);
    c.kafka.commit_interval = Duration::from_millis(200);
    c.kafka.rebalance_drain = Duration::from_secs(2);
    c.kafka
        .options
        .insert("statistics.interval.ms".into(), "1000".into());
    c.redis.url = redis_url.to_string();
    c.redis.key_prefix = format!(
        "ragar-test-{name}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    c.redis.window = 50;
    c.redis.timeout = Duration::from_millis(300);
    c.redis.retry_interval = Duration::from_millis(200);
    c.lance.uri = dir.join("lancedb").to_string_lossy().into_owned();
    c.lance.batch_linger = Duration::from_millis(5);
    c.lance.compact_interval = Duration::from_secs(2);
    c.models.dim = DIM;
    c.generate.candidates = 3;
    c.telemetry.listen = "127.0.0.1:0".parse().unwrap();
    c.shutdown.grace = Duration::from_secs(10);
    c
}

/// The deterministic test generator with the real cosine ranker.
pub fn test_models() -> Models {
    Models {
        encoder: None,
        generator: Arc::new(TintGenerator),
        ranker: Arc::new(CosineRanker {
            personalization_weight: 0.5,
            encoder: None,
        }),
    }
}

/// A worker running on its own runtime and thread, as a separate process would.
pub struct RunningWorker {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
    pub telemetry: std::net::SocketAddr,
}

impl RunningWorker {
    pub fn start(cfg: Config, models: Models) -> RunningWorker {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let shutdown = async move {
                let _ = stop_rx.await;
            };
            rt.block_on(ragar::worker::run(cfg, models, shutdown, Some(started_tx)))
                .map_err(|e| e.to_string())
        });
        // Tests run on a multi-threaded runtime: tell it this thread blocks.
        let started =
            tokio::task::block_in_place(|| started_rx.blocking_recv()).expect("worker starts");
        RunningWorker {
            stop: Some(stop_tx),
            thread: Some(thread),
            telemetry: started.telemetry,
        }
    }

    /// Graceful stop: drain, commit, return.
    pub fn stop(mut self) {
        self.stop.take().map(|s| s.send(()));
        let thread = self.thread.take().unwrap();
        let result = tokio::task::block_in_place(|| thread.join()).expect("worker thread");
        result.expect("worker exits cleanly");
    }

    pub fn metrics(&self) -> String {
        http_get(self.telemetry, "/metrics")
    }
}

impl Drop for RunningWorker {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::block_in_place(|| t.join());
        }
    }
}

/// A minimal HTTP/1.0 GET, enough for the telemetry endpoints.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The value of an unlabelled or labelled sample in a Prometheus text page (summed over matches).
pub fn metric(page: &str, name_and_labels: &str) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name_and_labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn producer(bootstrap: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .create()
        .expect("producer")
}

pub async fn send(p: &FutureProducer, topic: &str, key: &str, payload: &[u8]) {
    p.send(
        FutureRecord::to(topic).key(key).payload(payload),
        Duration::from_secs(10),
    )
    .await
    .expect("produced");
}

pub async fn send_json(p: &FutureProducer, topic: &str, key: &str, v: &Value) {
    send(p, topic, key, v.to_string().as_bytes()).await;
}

/// Produces every (key, value) to `topic` with many sends in flight, and waits for them all.
pub async fn produce_all(p: &FutureProducer, topic: &str, events: &[(String, Value)]) {
    for chunk in events.chunks(2_000) {
        let payloads: Vec<String> = chunk.iter().map(|(_, v)| v.to_string()).collect();
        let sends = chunk.iter().zip(&payloads).map(|((k, _), v)| {
            p.send(
                FutureRecord::to(topic).key(k.as_str()).payload(v.as_str()),
                Duration::from_secs(30),
            )
        });
        for result in futures::future::join_all(sends).await {
            result.expect("produced");
        }
    }
}

/// A consumer of `topic` from the beginning, in its own group.
pub fn reader(bootstrap: &str, topic: &str) -> StreamConsumer {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set(
            "group.id",
            format!("reader-{topic}-{}", rand::random::<u64>()),
        )
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    c.subscribe(&[topic]).unwrap();
    c
}

/// A message read back: value and headers.
#[derive(Debug, Clone)]
pub struct Read {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: HashMap<String, String>,
}

impl Read {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).expect("json payload")
    }
}

/// Reads until `done` says so or `within` passes (then returns what it has).
pub async fn read_until(
    c: &StreamConsumer,
    within: Duration,
    mut done: impl FnMut(&[Read]) -> bool,
) -> Vec<Read> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while !done(&out) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left, c.recv()).await {
            Ok(Ok(m)) => out.push(Read {
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().unwrap_or_default().to_vec(),
                headers: m
                    .headers()
                    .map(|hs| {
                        hs.iter()
                            .map(|h| {
                                (
                                    h.key.to_string(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            }),
            Ok(Err(e)) => panic!("reading: {e}"),
            Err(_) => break,
        }
    }
    out
}

/// Reads output messages until every request in `wanted` has one (or `within` passes).
pub async fn read_outputs(c: &StreamConsumer, wanted: &[String], within: Duration) -> Vec<Read> {
    let mut missing: std::collections::HashSet<&str> = wanted.iter().map(String::as_str).collect();
    let mut checked = 0;
    read_until(c, within, |rs| {
        for r in &rs[checked..] {
            if let Some(id) = r.json()["request_id"].as_str() {
                missing.remove(id);
            }
        }
        checked = rs.len();
        missing.is_empty()
    })
    .await
}

/// Deterministic unit-length embeddings; users lean toward one of two directions.
pub fn embedding(rng: &mut ChaCha8Rng) -> Vec<f32> {
    let mut v: Vec<f32> = (0..DIM).map(|_| rng.random_range(-1.0..1.0)).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
    v
}

pub fn png_base64(seed: u8) -> String {
    let img = image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([seed, x as u8 * 30, y as u8 * 30]));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    base64::engine::general_purpose::STANDARD.encode(out)
}

pub fn item_event(item: &str, emb: &[f32], seed: u8) -> Value {
    json!({"schema": "ragar.event.v1", "type": "item", "event_id": format!("item-{item}"), "item_id": item,
           "embedding": emb, "image": {"base64": png_base64(seed)}, "text": format!("item {item}")})
}

pub fn interaction_event(id: &str, user: &str, item: &str, ts: i64, emb: Option<&[f32]>) -> Value {
    let mut v = json!({"schema": "ragar.event.v1", "type": "interaction", "event_id": id, "user_id": user,
                       "item_id": item, "action": "click", "ts": ts});
    if let Some(e) = emb {
        v["embedding"] = json!(e);
    }
    v
}

pub fn display_event(id: &str, request: &str, user: &str, item: &str, seed: u64) -> Value {
    json!({"schema": "ragar.event.v1", "type": "display", "event_id": id, "request_id": request,
           "user_id": user, "item_id": item, "seed": seed})
}

/// A deterministic stream: `items` items, `users` users with `per_user` interactions each, and a
/// display after every `display_every` interactions. Returns (items, events) with keys.
pub struct Stream {
    pub items: Vec<(String, Value)>,
    pub events: Vec<(String, Value)>,
    pub interactions: usize,
    pub displays: Vec<String>,
}

pub fn stream(
    seed: u64,
    n_items: usize,
    users: usize,
    per_user: usize,
    display_every: usize,
) -> Stream {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let embs: Vec<Vec<f32>> = (0..n_items).map(|_| embedding(&mut rng)).collect();
    let items = (0..n_items)
        .map(|i| {
            (
                format!("it{i}"),
                item_event(&format!("it{i}"), &embs[i], i as u8),
            )
        })
        .collect();
    let mut events = Vec::new();
    let mut displays = Vec::new();
    let mut interactions = 0;
    for step in 0..per_user {
        for u in 0..users {
            let user = format!("user{u}");
            let i = rng.random_range(0..n_items);
            // Half the interactions carry their embedding, half rely on the item store.
            let emb = if step % 2 == 0 {
                Some(embs[i].as_slice())
            } else {
                None
            };
            events.push((
                user.clone(),
                interaction_event(
                    &format!("ev-{u}-{step}"),
                    &user,
                    &format!("it{i}"),
                    1_000 + step as i64,
                    emb,
                ),
            ));
            interactions += 1;
            if (step + 1) % display_every == 0 {
                let r = format!("req-{u}-{step}");
                let item = format!("it{}", rng.random_range(0..n_items));
                events.push((
                    user.clone(),
                    display_event(&format!("d-{u}-{step}"), &r, &user, &item, step as u64),
                ));
                displays.push(r);
            }
        }
    }
    Stream {
        items,
        events,
        interactions,
        displays,
    }
}

/// Produces the items, waits until the worker has stored them (items and events travel on
/// different topics, so nothing else orders them), then produces the events.
pub async fn produce_stream(p: &FutureProducer, cfg: &Config, s: &Stream) {
    produce_items(p, cfg, &s.items).await;
    for (k, v) in &s.events {
        send_json(p, EVENTS, k, v).await;
    }
}

pub async fn produce_items(p: &FutureProducer, cfg: &Config, items: &[(String, Value)]) {
    for (k, v) in items {
        send_json(p, ITEMS, k, v).await;
    }
    let store = ragar::history::lance::LanceStore::open(&cfg.lance.uri, cfg.models.dim)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    for (id, _) in items {
        // LanceDB offers no change notification: poll the table until the item is there.
        while store.item(id).await.unwrap().is_none() {
            assert!(Instant::now() < deadline, "item {id} was not stored");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub fn validator(schema_file: &str) -> jsonschema::Validator {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("schemas")
        .join(schema_file);
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    jsonschema::validator_for(&schema).expect("schema compiles")
}

pub fn assert_valid(v: &jsonschema::Validator, instance: &Value) {
    let errors: Vec<String> = v.iter_errors(instance).map(|e| e.to_string()).collect();
    assert!(
        errors.is_empty(),
        "invalid against schema: {errors:?}\n{instance}"
    );
}

/// A private redis-server on a free port, for tests that stop it.
pub struct OwnRedis {
    pub port: u16,
    /// Settings after the listener's: TLS files, a password.
    extra: Vec<String>,
    /// `port` is a TLS port (the plain one is off).
    tls: bool,
    child: Option<Child>,
}

impl OwnRedis {
    pub fn start() -> OwnRedis {
        OwnRedis::start_with(false, Vec::new())
    }

    /// A server listening on TLS only (`tls`) or plain TCP, with `extra` settings.
    pub fn start_with(tls: bool, extra: Vec<String>) -> OwnRedis {
        let mut r = OwnRedis {
            port: free_port().port(),
            extra,
            tls,
            child: None,
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn restart(&mut self) {
        let port = self.port.to_string();
        let listen = if self.tls {
            vec!["--port", "0", "--tls-port", &port]
        } else {
            vec!["--port", &port]
        };
        let child = Command::new("redis-server")
            .args(listen)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn shared_redis_url() -> String {
    std::env::var("RAGAR_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

/// Polls until `cond` holds (the stores and the worker processes offer no event to await),
/// failing after `within`.
pub async fn until(what: &str, within: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until LanceDB holds at least `n` interactions; `what` names the wait in the failure.
pub async fn wait_stored(cfg: &Config, n: usize, what: &str) {
    let store = ragar::history::lance::LanceStore::open(&cfg.lance.uri, cfg.models.dim)
        .await
        .unwrap();
    until(what, Duration::from_secs(120), async || {
        store.count_interactions(None).await.unwrap() >= n
    })
    .await;
}

/// Messages in the dead-letter topic (both its partitions), read from the watermarks.
pub fn dlq_messages(c: &StreamConsumer) -> i64 {
    (0..2)
        .map(|part| {
            let (lo, hi) = c
                .fetch_watermarks(DLQ, part, Duration::from_secs(5))
                .unwrap();
            hi - lo
        })
        .sum()
}

pub async fn lance_count(cfg: &Config) -> usize {
    let store = ragar::history::lance::LanceStore::open(&cfg.lance.uri, DIM)
        .await
        .unwrap();
    store.count_interactions(None).await.unwrap()
}

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A free port on 127.0.0.1 for a child's telemetry listener, so the harness can poll it.
pub fn free_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// One `ragar run` process.
pub struct Proc {
    pub child: Child,
    pub telemetry: std::net::SocketAddr,
}

impl Proc {
    pub fn spawn(cfg: &Config, dir: &Path, n: usize) -> Proc {
        let mut cfg = cfg.clone();
        cfg.telemetry.listen = free_port();
        let file = dir.join(format!("worker-{n}.toml"));
        std::fs::write(&file, toml::to_string(&cfg).unwrap()).unwrap();
        let log = std::fs::File::create(dir.join(format!("worker-{n}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ragar"))
            .args(["run", "--config"])
            .arg(&file)
            .env("RUST_LOG", "ragar=info,warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("ragar run starts");
        Proc {
            child,
            telemetry: cfg.telemetry.listen,
        }
    }

    /// The process's /metrics page, once its listener is up.
    pub fn metrics(&mut self) -> Option<String> {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("the worker exited on its own: {status}");
        }
        std::net::TcpStream::connect_timeout(&self.telemetry, Duration::from_millis(200))
            .ok()
            .map(|_| http_get(self.telemetry, "/metrics"))
    }

    /// SIGTERM, then waits: the graceful stop (drain, commit, leave the group).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        self.child.wait().unwrap()
    }

    /// Messages this process has finished (any type, any outcome).
    pub fn processed(&mut self) -> usize {
        self.metrics()
            .map_or(0, |page| metric(&page, "ragar_events_total{") as usize)
    }
}
