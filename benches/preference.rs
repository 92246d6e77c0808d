//! Preference extraction latency, Redis read included: read a user's window of 50, 500 and 5,000
//! entries (384-dim) from Redis, weigh it against a reference and build the preference vector.
//!
//! `cargo bench --profile dev --bench preference -- [LENGTH...]` (default 50 500 5000; Redis on
//! 127.0.0.1:6379 or `RAGAR_BENCH_REDIS_URL`). Prints p50/p99 per history length; asserts nothing.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use ragar::config::Config;
use ragar::event::Action;
use ragar::history::hot::Hot;
use ragar::history::HistoryEntry;
use ragar::preference::{preference_vector, weigh, Params, WeightingMode};

/// The allocator the `ragar` binary uses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DIM: usize = 384;

fn unit(rng: &mut ChaCha8Rng) -> Vec<f32> {
    let mut v: Vec<f32> = (0..DIM).map(|_| rng.random_range(-1.0..1.0)).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
    v
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let lengths: Vec<usize> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .map(|a| a.parse().expect("a history length"))
        .collect();
    let lengths = if lengths.is_empty() {
        vec![50, 500, 5_000]
    } else {
        lengths
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let params = Params {
            mode: WeightingMode::Retrieval,
            k: 16,
            tau: 0.1,
            action_weights: [1.0, 1.0, 1.0, 1.0, 0.0],
            recency_half_life_ms: None,
            match_dims: 0,
        };
        println!(
            "{:>8} {:>10} {:>10} {:>10} {:>14}",
            "history", "p50 ms", "p99 ms", "max ms", "compute p50 ms"
        );
        for &len in &lengths {
            let mut cfg = Config::default().redis;
            cfg.url = std::env::var("RAGAR_BENCH_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
            cfg.key_prefix = format!("ragar-bench-pref-{}", std::process::id());
            cfg.window = len;
            let hot = Hot::new(&cfg).unwrap();
            let user = format!("u{len}");
            let entries: Vec<HistoryEntry> = (0..len)
                .map(|i| HistoryEntry {
                    event_id: format!("e{i:06}"),
                    user_id: user.clone(),
                    item_id: format!("i{i}"),
                    action: Action::ALL[i % 4],
                    ts_ms: 1_700_000_000_000 + i as i64,
                    embedding: unit(&mut rng).into(),
                })
                .collect();
            let mut newest_first = entries.clone();
            newest_first.sort_by(ragar::history::newest_first);
            hot.fill_window(&user, &newest_first).await.unwrap();
            let reference = unit(&mut rng);
            let iterations = if len >= 5_000 { 300 } else { 2_000 };
            let mut total = Vec::with_capacity(iterations);
            let mut compute = Vec::with_capacity(iterations);
            for _ in 0..iterations {
                let t = Instant::now();
                let history = hot.window(&user).await.unwrap().expect("window is cached");
                let c = Instant::now();
                let w = weigh(&reference, &history, 1_800_000_000_000, &params);
                let p = preference_vector(&history, &w, DIM).unwrap();
                std::hint::black_box(p);
                compute.push(c.elapsed().as_secs_f64() * 1e3);
                total.push(t.elapsed().as_secs_f64() * 1e3);
                assert_eq!(history.len(), len);
            }
            total.sort_by(f64::total_cmp);
            compute.sort_by(f64::total_cmp);
            println!(
                "{len:>8} {:>10.3} {:>10.3} {:>10.3} {:>14.3}",
                percentile(&total, 0.5),
                percentile(&total, 0.99),
                total[total.len() - 1],
                percentile(&compute, 0.5)
            );
            hot.invalidate_windows(&[user]).await.unwrap();
        }
    });
}
