//! The small EmojiStyle generator on CPU: images/s at a batch of 1 and of 8 requests, one
//! candidate each, the bundle's sampling steps.
//!
//! `cargo bench --profile dev --bench generator -- [BUNDLE] [SECONDS]` (defaults
//! `models/generator`, 5). With `--once N` it renders N images once and exits, for an
//! instruction profile that does not depend on the machine's load:
//!
//! ```sh
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/gen.cg \
//!     $CARGO_TARGET_DIR/debug/deps/generator-* --once 8
//! callgrind_annotate /tmp/gen.cg | head -40
//! ```
//! Prints figures; asserts nothing.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use ragar::model::diffusion::StyleDiffusion;
use ragar::model::Generator;

mod common;
use common::requests;

/// The allocator the `ragar` binary uses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let once = args
        .iter()
        .position(|a| a == "--once")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse::<usize>().ok());
    let positional: Vec<&String> = args
        .iter()
        .enumerate()
        .filter(|(i, a)| !a.starts_with("--") && !(*i > 0 && args[i - 1] == "--once"))
        .map(|(_, a)| a)
        .collect();
    let dir = PathBuf::from(
        positional
            .first()
            .map_or("models/generator", |s| s.as_str()),
    );
    let seconds: f64 = positional
        .get(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);

    let generator = StyleDiffusion::load(&dir, None).expect("generator bundle");
    let cfg = generator.config().clone();
    let cancel = CancellationToken::new();
    if let Some(n) = once {
        let batch = requests(n, cfg.embedding_dim, cfg.resolution, 1);
        let out = generator.generate(&batch, &cancel).unwrap();
        println!(
            "rendered {} images",
            out.iter().map(Vec::len).sum::<usize>()
        );
        return;
    }
    println!(
        "generator {} ({}x{}, {} channels, {} steps)",
        generator.version(),
        cfg.resolution,
        cfg.resolution,
        cfg.channels,
        cfg.steps
    );
    println!("{:>6} {:>10} {:>12}", "batch", "images/s", "ms/batch");
    for batch_size in [1usize, 8] {
        let batch = requests(batch_size, cfg.embedding_dim, cfg.resolution, 1);
        generator.generate(&batch, &cancel).unwrap(); // warm-up
        let (mut images, mut batches) = (0usize, 0usize);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs_f64(seconds) {
            let out = generator.generate(&batch, &cancel).unwrap();
            images += out.iter().map(Vec::len).sum::<usize>();
            batches += 1;
        }
        let s = start.elapsed().as_secs_f64();
        println!(
            "{:>6} {:>10.1} {:>12.2}",
            batch_size,
            images as f64 / s,
            1e3 * s / batches as f64
        );
    }
}
