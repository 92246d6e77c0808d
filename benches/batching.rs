//! Dynamic batching of generation: throughput and latency against offered load.
//!
//! Display requests arrive open-loop (seeded exponential gaps) at a set rate; the worker's own
//! batching ([`ragar::generate::next_batch`], `generate.batch_max` and `generate.batch_delay`)
//! groups them and one model thread renders each batch, as in the worker. For each maximum batch
//! (1, 2, 4, 8) and each offered rate (multiples of the batch-1 capacity measured first) it prints
//! completed images/s, p50/p99 latency from arrival to rendered image, and the mean batch.
//!
//! `cargo bench --profile dev --features test-util --bench batching -- [BUNDLE] [REQUESTS]`
//! (defaults `models/generator`, 400; one candidate per request). Prints figures; asserts nothing.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use ragar::generate::next_batch;
use ragar::model::diffusion::StyleDiffusion;
use ragar::model::{GenerationRequest, Generator};

mod common;
use common::requests;

/// The allocator the `ragar` binary uses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH_DELAY: Duration = Duration::from_millis(5);

struct Run {
    images_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    mean_batch: f64,
}

async fn run(
    generator: Arc<StyleDiffusion>,
    reqs: &[GenerationRequest],
    rate: f64,
    batch_max: usize,
) -> Run {
    let (tx, mut rx) = mpsc::channel::<(Instant, GenerationRequest)>(reqs.len());
    let gaps = Exp::new(rate).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let offsets: Vec<f64> = reqs
        .iter()
        .scan(0.0, |t, _| {
            *t += gaps.sample(&mut rng);
            Some(*t)
        })
        .collect();
    let start = tokio::time::Instant::now();
    let to_send: Vec<GenerationRequest> = reqs.to_vec();
    let producer = tokio::spawn(async move {
        for (at, r) in offsets.into_iter().zip(to_send) {
            tokio::time::sleep_until(start + Duration::from_secs_f64(at)).await;
            tx.send((Instant::now(), r)).await.unwrap();
        }
    });
    let cancel = CancellationToken::new();
    let (mut latencies, mut batches, mut images) = (Vec::new(), 0usize, 0usize);
    while let Some(batch) = next_batch(&mut rx, batch_max, BATCH_DELAY).await {
        let (arrivals, batch): (Vec<Instant>, Vec<GenerationRequest>) = batch.into_iter().unzip();
        let (g, c) = (generator.clone(), cancel.clone());
        let out = tokio::task::spawn_blocking(move || g.generate(&batch, &c).unwrap())
            .await
            .unwrap();
        let done = Instant::now();
        images += out.iter().map(Vec::len).sum::<usize>();
        batches += 1;
        latencies.extend(arrivals.iter().map(|a| (done - *a).as_secs_f64() * 1e3));
    }
    producer.await.unwrap();
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    Run {
        images_per_s: images as f64 / elapsed,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        mean_batch: latencies.len() as f64 / batches as f64,
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let dir = PathBuf::from(args.first().map_or("models/generator", |s| s.as_str()));
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(400);
    let generator = Arc::new(StyleDiffusion::load(&dir, None).expect("generator bundle"));
    let cfg = generator.config().clone();
    let reqs = requests(n, cfg.embedding_dim, cfg.resolution, 3);
    let cancel = CancellationToken::new();

    // Capacity at batch 1, back to back: the unit of offered load.
    generator.generate(&reqs[..1], &cancel).unwrap();
    let t = Instant::now();
    for r in reqs.iter().take(50) {
        generator
            .generate(std::slice::from_ref(r), &cancel)
            .unwrap();
    }
    let capacity = 50.0 / t.elapsed().as_secs_f64();
    println!(
        "generator {} on CPU; batch-1 capacity {capacity:.1} images/s; batch_delay {} ms; {n} requests per point",
        generator.version(),
        BATCH_DELAY.as_millis()
    );
    println!(
        "{:>9} {:>13} {:>9} {:>9} {:>9} {:>10}",
        "batch_max", "offered/s", "images/s", "p50 ms", "p99 ms", "mean batch"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    for batch_max in [1usize, 2, 4, 8] {
        for load in [0.5, 1.0, 2.0, 4.0] {
            let rate = load * capacity;
            let r = rt.block_on(run(generator.clone(), &reqs, rate, batch_max));
            println!(
                "{:>9} {:>13.1} {:>9.1} {:>9.1} {:>9.1} {:>10.2}",
                batch_max, rate, r.images_per_s, r.p50_ms, r.p99_ms, r.mean_batch
            );
        }
    }
}
