//! Memory under a backlog: EVENTS events wait in Kafka while the generator cannot keep up. The
//! worker stops reading at `kafka.max_in_flight` unfinished messages (and pauses its partitions,
//! polling on, when that lasts `kafka.pause_after`), so its memory is bounded by that setting and
//! not by the backlog. This bench measures the worker's peak RSS while it works on the backlog.
//!
//! `cargo bench --profile dev --features test-util --bench backlog -- [EVENTS] [SECONDS]`
//! (defaults 1000000, 60). The broker (`ragar broker`) and the producer (`ragar produce`) run as
//! their own processes, so this process's RSS is the worker's alone. Needs Redis on
//! 127.0.0.1:6379 (or `RAGAR_BENCH_REDIS_URL`). Prints figures; asserts nothing.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use ragar::config::Config;
use ragar::model::testutil::SlowGenerator;
use ragar::model::CosineRanker;
use ragar::worker::Models;

const DIM: usize = 384;
const ITEMS: usize = 50;
const USERS: usize = 5_000;
const RAGAR: &str = env!("CARGO_BIN_EXE_ragar");

/// `VmRSS` and `VmHWM` (peak) of this process, in MiB.
fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn png_base64(shade: u8) -> String {
    let img = image::RgbImage::from_pixel(16, 16, image::Rgb([shade, 255 - shade, 128]));
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    base64::engine::general_purpose::STANDARD.encode(png)
}

fn produce(bootstrap: &str, topic: &str, file: &std::path::Path) {
    let status = Command::new(RAGAR)
        .args(["produce", "--brokers", bootstrap, "--topic", topic])
        .arg(file)
        .stdout(Stdio::null())
        .status()
        .expect("ragar produce runs");
    assert!(status.success(), "ragar produce failed");
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let events: usize = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let seconds: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(60);
    let dir = tempfile::tempdir().unwrap();

    // The broker in its own process.
    let mut broker = Command::new(RAGAR)
        .args(["broker", "--partitions", "16"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ragar broker starts");
    let mut first = String::new();
    BufReader::new(broker.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let bootstrap = first
        .trim()
        .strip_prefix("bootstrap.servers=")
        .expect("the broker prints bootstrap.servers first")
        .to_string();

    // Items with embeddings and images; then interactions that name an item (no embedding of
    // their own) and one display request in ten.
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let items_file = dir.path().join("items.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&items_file).unwrap());
    for i in 0..ITEMS {
        let emb: Vec<String> = (0..DIM)
            .map(|_| format!("{:.3}", rng.random_range(-1.0f32..1.0)))
            .collect();
        writeln!(
            f,
            r#"{{"schema":"ragar.event.v1","type":"item","event_id":"item-{i}","item_id":"it{i}","embedding":[{}],"image":{{"base64":"{}"}}}}"#,
            emb.join(","),
            png_base64((i * 5) as u8)
        )
        .unwrap();
    }
    drop(f);
    let events_file = dir.path().join("events.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&events_file).unwrap());
    for i in 0..events {
        let user = i % USERS;
        let item = rng.random_range(0..ITEMS);
        if i % 10 == 9 {
            writeln!(f, r#"{{"schema":"ragar.event.v1","type":"display","event_id":"d{i}","request_id":"r{i}","user_id":"u{user}","item_id":"it{item}","candidates":2}}"#).unwrap();
        } else {
            writeln!(f, r#"{{"schema":"ragar.event.v1","type":"interaction","event_id":"e{i}","user_id":"u{user}","item_id":"it{item}","action":"click","ts":{}}}"#, 1_700_000_000_000i64 + i as i64).unwrap();
        }
    }
    drop(f);
    let t = Instant::now();
    produce(&bootstrap, "ragar.items", &items_file);
    produce(&bootstrap, "ragar.events", &events_file);
    println!(
        "backlog: {events} events produced in {:.1} s ({:.0} MB file)",
        t.elapsed().as_secs_f64(),
        std::fs::metadata(&events_file).unwrap().len() as f64 / 1e6
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut cfg = Config::load(None).expect("configuration");
        cfg.kafka.brokers = bootstrap.clone();
        cfg.kafka.group_id = "bench-backlog".into();
        cfg.kafka.session_timeout = Duration::from_secs(6);
        cfg.redis.url = std::env::var("RAGAR_BENCH_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
        cfg.redis.key_prefix = format!("ragar-backlog-{}", std::process::id());
        cfg.lance.uri = dir.path().join("lancedb").to_string_lossy().into_owned();
        cfg.telemetry.listen = "127.0.0.1:0".parse().unwrap();
        cfg.models.dim = DIM;
        let max_in_flight = cfg.kafka.max_in_flight;
        let models = Models {
            encoder: None,
            generator: Arc::new(SlowGenerator {
                per_request: Duration::from_millis(20),
            }),
            ranker: Arc::new(CosineRanker {
                personalization_weight: 0.5,
                encoder: None,
            }),
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (rss0, _) = rss_mib();
        let worker = tokio::spawn(ragar::worker::run(
            cfg,
            models,
            async move {
                let _ = stop_rx.await;
            },
            Some(started_tx),
        ));
        started_rx.await.expect("worker starts");
        let handle = ragar::telemetry::metrics_handle();
        let sample = |name: &str| {
            let page = handle.render();
            page.lines()
                .filter(|l| l.starts_with(name))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        };
        let t = Instant::now();
        let (mut peak_in_flight, mut paused_samples, mut samples) = (0.0f64, 0, 0);
        while t.elapsed() < Duration::from_secs(seconds) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            peak_in_flight = peak_in_flight.max(sample("ragar_in_flight_messages"));
            paused_samples += (sample("ragar_consumer_paused") > 0.0) as usize;
            samples += 1;
        }
        let done = sample("ragar_events_total{");
        let outputs = sample("ragar_outputs_total{");
        let (rss, peak) = rss_mib();
        let _ = stop_tx.send(());
        worker.await.unwrap().unwrap();
        println!(
            "worker over {seconds} s with a generator taking 20 ms a request: {done:.0} messages \
             finished ({outputs:.0} outputs), backlog left {:.0}",
            events as f64 - done
        );
        println!(
            "  in flight: peak {peak_in_flight:.0} (kafka.max_in_flight = {max_in_flight}); \
             paused in {paused_samples} of {samples} samples"
        );
        println!(
            "  RSS: {rss0:.0} MiB before the worker, {rss:.0} MiB at the end, peak {peak:.0} MiB"
        );
    });
    let _ = broker.kill();
    let _ = broker.wait();
}
