//! The worker end to end over the real Kafka protocol (librdkafka's mock cluster over TCP), the
//! real Redis and LanceDB in a temp dir.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::common::{self, *};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(90);

fn outputs_by_request(reads: &[Read]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in reads {
        *m.entry(r.json()["request_id"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactions_then_displays_give_one_valid_output_per_display() {
    let broker = broker();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        broker.bootstrap_servers(),
        dir.path(),
        "e2e",
        &shared_redis_url(),
    );
    let worker = RunningWorker::start(cfg.clone(), test_models());
    let p = producer(broker.bootstrap_servers());
    let s = stream(7, 20, 4, 12, 4);
    produce_stream(&p, &cfg, &s).await;

    let out = reader(broker.bootstrap_servers(), IMAGES);
    let reads = read_until(&out, WAIT, |r| r.len() >= s.displays.len()).await;
    // Anything beyond one per display would show up within a short extra wait.
    let extra = read_until(&out, Duration::from_secs(2), |_| false).await;
    assert!(extra.is_empty(), "duplicate outputs: {}", extra.len());
    let by_request = outputs_by_request(&reads);
    assert_eq!(by_request.len(), s.displays.len());
    assert!(by_request.values().all(|&n| n == 1));

    let schema = validator("ragar.image.v1.json");
    for r in &reads {
        let v = r.json();
        assert_valid(&schema, &v);
        assert_eq!(
            r.key.as_deref(),
            Some(v["user_id"].as_str().unwrap().as_bytes())
        );
        assert_eq!(v["candidates"].as_array().unwrap().len(), 3);
        assert_eq!(v["models"]["generator"], "test-tint");
        let history = v["history"].as_array().unwrap();
        assert!(
            !history.is_empty(),
            "every display follows interactions: {v}"
        );
        let total: f64 = history.iter().map(|h| h["weight"].as_f64().unwrap()).sum();
        assert!((total - 1.0).abs() < 1e-4, "weights sum to 1: {total}");
        // Only this user's interactions take part, and never more than k.
        let user = v["user_id"].as_str().unwrap();
        let prefix = format!("ev-{}-", user.trim_start_matches("user"));
        assert!(history
            .iter()
            .all(|h| h["event_id"].as_str().unwrap().starts_with(&prefix)));
        assert!(history.len() <= cfg.preference.k);
        // The chosen candidate is the best one.
        let best = v["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["total"].as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert_eq!(v["scores"]["total"].as_f64().unwrap(), best);
        let png = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            v["image"]["base64"].as_str().unwrap(),
        )
        .unwrap();
        assert!(image::load_from_memory(&png).is_ok());
    }
    // Seeds given by the display are used as is.
    let first = reads
        .iter()
        .map(Read::json)
        .find(|v| v["request_id"] == "req-0-3")
        .unwrap();
    assert_eq!(first["seed"], 3);

    let page = worker.metrics();
    assert!(metric(&page, "ragar_outputs_total{outcome=\"published\"}") >= s.displays.len() as f64);
    assert!(page.contains("ragar_stage_seconds_bucket{stage=\"generate\""));
    assert!(http_get(worker.telemetry, "/readyz")
        .lines()
        .next()
        .unwrap()
        .contains(" 200 "));
    assert!(http_get(worker.telemetry, "/healthz")
        .lines()
        .next()
        .unwrap()
        .contains(" 200 "));
    worker.stop();
    assert_eq!(lance_count(&cfg).await, s.interactions);
}

/// The tint generator, asking for texts and keeping every request's texts.
struct PromptRecorder {
    seen: std::sync::Arc<std::sync::Mutex<Vec<(Option<String>, Vec<(String, f32)>)>>>,
}

impl ragar::model::Generator for PromptRecorder {
    fn version(&self) -> &str {
        "test-prompt-recorder"
    }

    fn wants_texts(&self) -> bool {
        true
    }

    fn generate(
        &self,
        batch: &[ragar::model::GenerationRequest],
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<Vec<Vec<ragar::model::Candidate>>, ragar::model::ModelError> {
        let mut seen = self.seen.lock().unwrap();
        for r in batch {
            seen.push((
                r.reference_text.as_deref().map(str::to_string),
                r.prompt_hints.clone(),
            ));
        }
        ragar::model::testutil::TintGenerator.generate(batch, cancel)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_conditioned_generator_gets_the_reference_and_history_texts() {
    use rand::SeedableRng;
    let broker = broker();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        broker.bootstrap_servers(),
        dir.path(),
        "texts",
        &shared_redis_url(),
    );
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut models = test_models();
    models.generator = std::sync::Arc::new(PromptRecorder { seen: seen.clone() });
    let worker = RunningWorker::start(cfg.clone(), models);
    let p = producer(broker.bootstrap_servers());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let items: Vec<(String, Value)> = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, id)| {
            (
                id.to_string(),
                item_event(id, &embedding(&mut rng), i as u8),
            )
        })
        .collect();
    produce_items(&p, &cfg, &items).await;
    // Interactions without embeddings: the worker resolves them from the items.
    send_json(
        &p,
        EVENTS,
        "u1",
        &interaction_event("ev-1", "u1", "a", 1_000, None),
    )
    .await;
    send_json(
        &p,
        EVENTS,
        "u1",
        &interaction_event("ev-2", "u1", "b", 2_000, None),
    )
    .await;
    send_json(
        &p,
        EVENTS,
        "u1",
        &display_event("d-1", "req-1", "u1", "c", 5),
    )
    .await;

    let out = reader(broker.bootstrap_servers(), IMAGES);
    let reads = read_until(&out, WAIT, |r| !r.is_empty()).await;
    worker.stop();
    let output = reads[0].json();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1, "one request: {seen:?}");
    let (reference, hints) = &seen[0];
    assert_eq!(reference.as_deref(), Some("item c"));
    // One hint per history item used, with the weight the output reports for it.
    let used: HashMap<String, f64> = output["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                format!("item {}", h["item_id"].as_str().unwrap()),
                h["weight"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(used.len(), 2, "{output}");
    assert_eq!(hints.len(), used.len(), "{hints:?}");
    for (text, weight) in hints {
        let expected = used
            .get(text)
            .unwrap_or_else(|| panic!("hint {text} not used: {used:?}"));
        assert!(
            (*weight as f64 - expected).abs() < 1e-6,
            "{text}: {weight} vs {expected}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_stream_adds_no_duplicate_history_or_output() {
    let broker = broker();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        broker.bootstrap_servers(),
        dir.path(),
        "replay",
        &shared_redis_url(),
    );
    let worker = RunningWorker::start(cfg.clone(), test_models());
    let p = producer(broker.bootstrap_servers());
    let s = stream(11, 10, 3, 10, 5);
    produce_stream(&p, &cfg, &s).await;
    let out = reader(broker.bootstrap_servers(), IMAGES);
    let first = read_until(&out, WAIT, |r| r.len() >= s.displays.len()).await;
    assert_eq!(first.len(), s.displays.len());

    // The same stream again: same event ids, same request ids.
    produce_stream(&p, &cfg, &s).await;
    // A marker display after the replay: once its output arrives, the replay has been processed.
    send_json(
        &p,
        EVENTS,
        "user0",
        &display_event("d-marker", "req-marker", "user0", "it1", 1),
    )
    .await;
    let rest = read_until(&out, WAIT, |r| {
        r.iter().any(|m| m.json()["request_id"] == "req-marker")
    })
    .await;
    assert_eq!(
        rest.len(),
        1,
        "replayed displays are not published again: {:?}",
        outputs_by_request(&rest)
    );
    let page = worker.metrics();
    assert!(
        metric(&page, "ragar_outputs_total{outcome=\"skipped_replay\"}") >= s.displays.len() as f64
    );
    worker.stop();
    assert_eq!(
        lance_count(&cfg).await,
        s.interactions,
        "replayed interactions are stored once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_events_go_to_the_dlq_with_their_reason() {
    let broker = broker();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        broker.bootstrap_servers(),
        dir.path(),
        "dlq",
        &shared_redis_url(),
    );
    let worker = RunningWorker::start(cfg.clone(), test_models());
    let p = producer(broker.bootstrap_servers());

    let good_emb = vec![0.5f32; DIM];
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("invalid_json", b"{not json".to_vec()),
        ("invalid_utf8", vec![0xff, 0xfe, 0xfd]),
        ("schema", br#"{"schema":"ragar.event.v1","type":"interaction","event_id":"x1","user_id":"u"}"#.to_vec()),
        ("unknown_type", br#"{"schema":"ragar.event.v1","type":"teleport","event_id":"x2"}"#.to_vec()),
        ("embedding_dim", json!({"schema":"ragar.event.v1","type":"interaction","event_id":"x3","user_id":"u","item_id":"i","action":"like","embedding":[1.0,2.0]}).to_string().into_bytes()),
        ("non_finite", format!(r#"{{"schema":"ragar.event.v1","type":"interaction","event_id":"x4","user_id":"u","item_id":"i","action":"like","embedding":[1e39{}]}}"#, ",0".repeat(DIM - 1)).into_bytes()),
        ("oversize", json!({"schema":"ragar.event.v1","type":"item","event_id":"x5","item_id":"i","text":"x".repeat(5000)}).to_string().into_bytes()),
        ("image_decode", json!({"schema":"ragar.event.v1","type":"item","event_id":"x6","item_id":"i","embedding":good_emb,"image":{"base64":"aGVsbG8="}}).to_string().into_bytes()),
        ("unknown_item", json!({"schema":"ragar.event.v1","type":"interaction","event_id":"x7","user_id":"u","item_id":"nope","action":"like"}).to_string().into_bytes()),
        ("unknown_item", json!({"schema":"ragar.event.v1","type":"display","event_id":"x8","request_id":"r8","user_id":"u","item_id":"nope"}).to_string().into_bytes()),
        ("no_encoder", json!({"schema":"ragar.event.v1","type":"item","event_id":"x9","item_id":"i9","text":"only text"}).to_string().into_bytes()),
    ];
    // All on one partition (same key), interleaved with good events that must still flow.
    produce_items(
        &p,
        &cfg,
        &[("it0".to_string(), item_event("it0", &good_emb, 1))],
    )
    .await;
    for (i, (_, payload)) in cases.iter().enumerate() {
        common::send(&p, EVENTS, "u", payload).await;
        send_json(
            &p,
            EVENTS,
            "u",
            &interaction_event(&format!("ok-{i}"), "u", "it0", i as i64, Some(&good_emb)),
        )
        .await;
    }
    send_json(
        &p,
        EVENTS,
        "u",
        &display_event("d-final", "req-final", "u", "it0", 5),
    )
    .await;

    let dlq = reader(broker.bootstrap_servers(), DLQ);
    let dead = read_until(&dlq, WAIT, |r| r.len() >= cases.len()).await;
    assert_eq!(dead.len(), cases.len());
    let schema = validator("ragar.dlq.v1.json");
    let originals: HashSet<Vec<u8>> = cases.iter().map(|(_, p)| p.clone()).collect();
    let mut kinds: Vec<String> = Vec::new();
    for d in &dead {
        let headers: serde_json::Map<String, Value> = d
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        assert_valid(&schema, &Value::Object(headers));
        assert!(
            originals.contains(&d.payload),
            "the original bytes are kept"
        );
        assert_eq!(d.key.as_deref(), Some(&b"u"[..]));
        assert_eq!(d.headers["ragar.source.topic"], EVENTS);
        assert!(!d.headers["ragar.error"].is_empty());
        kinds.push(d.headers["ragar.error.kind"].clone());
    }
    kinds.sort();
    let mut expected: Vec<String> = cases.iter().map(|(k, _)| k.to_string()).collect();
    expected.sort();
    assert_eq!(kinds, expected);

    // The partition kept flowing: the final display is published with every good interaction.
    let out = reader(broker.bootstrap_servers(), IMAGES);
    let outputs = read_until(&out, WAIT, |r| !r.is_empty()).await;
    assert_eq!(outputs.len(), 1);
    assert_eq!(outputs[0].json()["weighting"]["history_len"], cases.len());
    let page = worker.metrics();
    assert!(metric(&page, "ragar_dlq_messages_total") >= cases.len() as f64);
    worker.stop();
    assert_eq!(lance_count(&cfg).await, cases.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_going_away_does_not_stop_the_worker() {
    let broker = broker();
    let dir = tempfile::tempdir().unwrap();
    let mut redis = OwnRedis::start();
    let cfg = config(
        broker.bootstrap_servers(),
        dir.path(),
        "redis-down",
        &redis.url(),
    );
    let worker = RunningWorker::start(cfg.clone(), test_models());
    let p = producer(broker.bootstrap_servers());
    let out = reader(broker.bootstrap_servers(), IMAGES);

    let fallbacks_before = metric(&worker.metrics(), "ragar_redis_fallbacks_total");
    let s = stream(3, 10, 2, 8, 4);
    produce_stream(&p, &cfg, &s).await;
    let before = read_until(&out, WAIT, |r| r.len() >= s.displays.len()).await;
    assert_eq!(before.len(), s.displays.len());
    assert!(before
        .iter()
        .all(|r| r.json()["weighting"]["source"] == "redis"
            || r.json()["weighting"]["source"] == "lancedb"));

    redis.stop();
    let during = stream(4, 10, 2, 8, 4);
    // Different ids from the first stream.
    let during = relabel(during, "down");
    produce_stream(&p, &cfg, &during).await;
    let outs = read_until(&out, WAIT, |r| r.len() >= during.displays.len()).await;
    assert_eq!(
        outs.len(),
        during.displays.len(),
        "every display is served while Redis is down"
    );
    assert!(outs
        .iter()
        .all(|r| r.json()["weighting"]["source"] == "lancedb"));
    // History from before and during the outage is all there: the newest display of user0 sees both.
    let last = outs
        .iter()
        .map(Read::json)
        .filter(|v| v["user_id"] == "user0")
        .last()
        .unwrap();
    assert!(last["weighting"]["history_len"].as_u64().unwrap() as usize >= 8 + 8);
    let page = worker.metrics();
    assert!(metric(&page, "ragar_redis_fallbacks_total") > fallbacks_before);

    // Redis comes back (empty, as after a restart): the worker uses it again.
    redis.restart();
    let after = relabel(stream(5, 10, 2, 4, 4), "back");
    produce_stream(&p, &cfg, &after).await;
    let outs = read_until(&out, WAIT, |r| r.len() >= after.displays.len()).await;
    assert_eq!(outs.len(), after.displays.len());
    // Redis is retried once `redis.retry_interval` has passed since the last failure: send probe
    // displays until one has been served through the recovered Redis (its window is rebuilt there).
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut windows: Vec<String> = Vec::new();
    for probe in 0..50 {
        let request = format!("probe-{probe}");
        send_json(
            &p,
            EVENTS,
            "user0",
            &display_event(&format!("dp-{probe}"), &request, "user0", "it1", 1),
        )
        .await;
        let got = read_until(&out, WAIT, |r| {
            r.iter().any(|m| m.json()["request_id"] == request.as_str())
        })
        .await;
        assert!(!got.is_empty(), "probe {probe} answered");
        windows = redis::cmd("KEYS")
            .arg(format!("{}:win:*", cfg.redis.key_prefix))
            .query_async(&mut conn)
            .await
            .unwrap();
        if !windows.is_empty() {
            break;
        }
    }
    assert!(
        !windows.is_empty(),
        "windows are rebuilt in the recovered Redis"
    );
    worker.stop();
    assert_eq!(
        lance_count(&cfg).await,
        s.interactions + during.interactions + after.interactions
    );
}

/// Gives a stream's event and request ids a prefix, so streams can be sent one after another.
fn relabel(mut s: Stream, tag: &str) -> Stream {
    for (_, v) in &mut s.events {
        let id = format!("{tag}-{}", v["event_id"].as_str().unwrap());
        v["event_id"] = json!(id);
        if let Some(r) = v
            .get("request_id")
            .and_then(Value::as_str)
            .map(|r| format!("{tag}-{r}"))
        {
            v["request_id"] = json!(r);
        }
        if let Some(ts) = v.get("ts").and_then(Value::as_i64) {
            v["ts"] = json!(ts + 10_000);
        }
    }
    s.displays = s.displays.iter().map(|r| format!("{tag}-{r}")).collect();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_worker_resumes_from_committed_offsets() {
    let broker = broker();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        broker.bootstrap_servers(),
        dir.path(),
        "restart",
        &shared_redis_url(),
    );
    let p = producer(broker.bootstrap_servers());
    let out = reader(broker.bootstrap_servers(), IMAGES);
    let s = stream(21, 10, 4, 20, 5);
    let (first_half, second_half) = s.events.split_at(s.events.len() / 2);

    let worker = RunningWorker::start(cfg.clone(), test_models());
    produce_items(&p, &cfg, &s.items).await;
    for (k, v) in first_half {
        send_json(&p, EVENTS, k, v).await;
    }
    // Stop mid-stream, as soon as some outputs are out (more events are still in flight).
    let early = read_until(&out, WAIT, |r| !r.is_empty()).await;
    assert!(!early.is_empty());
    worker.stop();

    // Events produced while no worker runs are picked up from the committed offsets.
    for (k, v) in second_half {
        send_json(&p, EVENTS, k, v).await;
    }
    let worker = RunningWorker::start(cfg.clone(), test_models());
    let ids = |r: &[Read]| -> HashSet<String> {
        r.iter()
            .map(|m| m.json()["request_id"].as_str().unwrap().to_string())
            .collect()
    };
    let before = ids(&early);
    let missing: Vec<&String> = s.displays.iter().filter(|d| !before.contains(*d)).collect();
    let later = read_until(&out, WAIT, |r| {
        let seen = ids(r);
        missing.iter().all(|d| seen.contains(*d))
    })
    .await;
    let seen: HashSet<String> = before.union(&ids(&later)).cloned().collect();
    for d in &s.displays {
        assert!(seen.contains(d), "display {d} has an output");
    }
    worker.stop();
    assert_eq!(
        lance_count(&cfg).await,
        s.interactions,
        "nothing lost, nothing doubled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_command_serves_the_topics() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ragar"))
        .args(["broker", "--partitions", "3"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let bootstrap = first
        .trim()
        .strip_prefix("bootstrap.servers=")
        .expect("first line names the bootstrap servers")
        .to_string();
    let client: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    let md = client
        .fetch_metadata(None, Duration::from_secs(10))
        .unwrap();
    let topics: HashMap<String, usize> = md
        .topics()
        .iter()
        .map(|t| (t.name().to_string(), t.partitions().len()))
        .collect();
    for t in [ITEMS, EVENTS, IMAGES, DLQ] {
        assert_eq!(topics.get(t), Some(&3), "{t} in {topics:?}");
    }
    // A real client round trip through it.
    let p = producer(&bootstrap);
    send(&p, EVENTS, "k", b"hello").await;
    let r = reader(&bootstrap, EVENTS);
    let got = read_until(&r, WAIT, |m| !m.is_empty()).await;
    assert_eq!(got[0].payload, b"hello");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_bad_config_stops_start_up_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[preference]\ntau = -1\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ragar"))
        .args(["run", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("preference.tau"), "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ragar"))
        .args(["config"])
        .env("RAGAR_REDIS__WINDOW", "zero")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("redis.window"));
}
