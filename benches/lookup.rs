//! The stored-id lookup that precedes every LanceDB append, against a table whose newest rows no
//! index covers yet. Lance answers a filter through the index on the fragments it covers and scans
//! every other fragment, so the lookup's cost grows with the rows written since the index last
//! took them in: at 100k events/s and a compaction a minute, up to 6M rows per write.
//!
//! The table starts established (200,000 rows, compacted and indexed), then grows by 8,000-row
//! appends (one fragment each, as the worker writes) to each step of unindexed rows; at each
//! step it times the lookup of an 8,000-event batch of new ids. Then it times what
//! `lance.index_interval` does (`index_new_rows`: the new rows as an index segment of their own)
//! and the lookup after it, the lookup after 12 such segments (a minute at a 5 s interval), and
//! compaction (`optimize`, which merges the segments).
//!
//! `cargo bench --profile dev --bench lookup -- [MAX_UNINDEXED]` (default 1,600,000; 384-dim).
//! Prints figures; asserts nothing.

use std::sync::Arc;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use ragar::event::Action;
use ragar::history::lance::LanceStore;
use ragar::history::HistoryEntry;

/// The allocator the `ragar` binary uses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DIM: usize = 384;
const BATCH: usize = 8_000;
const USERS: usize = 1_000;
const ESTABLISHED: usize = 200_000;
const REPS: usize = 5;

/// Rows with consecutive event ids from `next`; embeddings from a shared pool.
struct Rows {
    next: usize,
    pool: Vec<Arc<[f32]>>,
}

impl Rows {
    fn new(rng: &mut ChaCha8Rng) -> Rows {
        let pool = (0..256)
            .map(|_| (0..DIM).map(|_| rng.random_range(-1.0..1.0)).collect())
            .collect();
        Rows { next: 0, pool }
    }

    fn batch(&mut self, n: usize) -> Vec<HistoryEntry> {
        let rows = (self.next..self.next + n)
            .map(|i| HistoryEntry {
                event_id: format!("evt-{i:012}"),
                user_id: format!("user-{}", i % USERS),
                item_id: format!("item-{}", i % 997),
                action: Action::ALL[i % 4],
                ts_ms: 1_700_000_000_000 + i as i64,
                embedding: self.pool[i % self.pool.len()].clone(),
            })
            .collect();
        self.next += n;
        rows
    }
}

async fn append(store: &LanceStore, rows: &mut Rows, n: usize) {
    for _ in 0..n / BATCH {
        let batch = rows.batch(BATCH);
        let refs: Vec<&HistoryEntry> = batch.iter().collect();
        store.append_interactions(&refs).await.unwrap();
    }
}

/// Median and maximum milliseconds of looking up a batch of ids the table does not hold.
async fn time_lookup(store: &LanceStore, rows: &mut Rows) -> (f64, f64) {
    let mut ms = Vec::with_capacity(REPS);
    for _ in 0..REPS {
        // Ids past every stored one, not consumed: each repetition asks for the same batch.
        let next = rows.next;
        let batch = rows.batch(BATCH);
        rows.next = next;
        let t = Instant::now();
        let fresh = store.fresh_interactions(&batch, &[]).await.unwrap();
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(fresh.len(), BATCH);
    }
    ms.sort_by(f64::total_cmp);
    (ms[REPS / 2], ms[REPS - 1])
}

async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, f64) {
    let t = Instant::now();
    let out = f.await;
    (out, t.elapsed().as_secs_f64())
}

fn main() {
    let max_unindexed: usize = std::env::args()
        .nth(1)
        .filter(|a| !a.starts_with('-'))
        .map(|a| a.parse().expect("MAX_UNINDEXED is a number"))
        .unwrap_or(1_600_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = LanceStore::open(dir.path().to_str().unwrap(), DIM)
            .await
            .unwrap();
        let mut rows = Rows::new(&mut ChaCha8Rng::seed_from_u64(11));
        append(&store, &mut rows, ESTABLISHED).await;
        store.optimize().await.unwrap();

        println!(
            "{:<44} {:>12} {:>10} {:>10}",
            "state", "unindexed", "lookup ms", "max ms"
        );
        let row = |state: &str, unindexed: usize, (median, max): (f64, f64)| {
            println!("{state:<44} {unindexed:>12} {median:>10.1} {max:>10.1}")
        };
        let mut step = 0;
        loop {
            let unindexed = store.unindexed_rows().await.unwrap();
            if unindexed < step {
                append(&store, &mut rows, step - unindexed).await;
            }
            let unindexed = store.unindexed_rows().await.unwrap();
            row(
                "no index since compaction",
                unindexed,
                time_lookup(&store, &mut rows).await,
            );
            if step >= max_unindexed {
                break;
            }
            step = if step == 0 { 100_000 } else { step * 4 };
            step = step.min(max_unindexed);
        }

        let ((), secs) = timed(async { store.index_new_rows().await.unwrap() }).await;
        println!(
            "index_new_rows over {} rows: {secs:.2} s",
            rows.next - ESTABLISHED
        );
        row(
            "after index_new_rows (2 segments)",
            store.unindexed_rows().await.unwrap(),
            time_lookup(&store, &mut rows).await,
        );

        // A minute at 100k events/s with a 5 s index interval: 12 segments of ~500k rows each,
        // here of 40,000 (a segment's lookup is a B-tree search, not a scan).
        let mut index_secs = Vec::new();
        for _ in 0..11 {
            append(&store, &mut rows, 40_000).await;
            let (indexed, secs) = timed(store.index_new_rows()).await;
            indexed.unwrap();
            index_secs.push(secs);
        }
        index_secs.sort_by(f64::total_cmp);
        println!(
            "index_new_rows over 40,000 rows: median {:.2} s, max {:.2} s",
            index_secs[index_secs.len() / 2],
            index_secs[index_secs.len() - 1]
        );
        row(
            "after 12 index segments",
            store.unindexed_rows().await.unwrap(),
            time_lookup(&store, &mut rows).await,
        );

        let before = store.fragment_count().await.unwrap();
        let ((), secs) = timed(async { store.optimize().await.unwrap() }).await;
        println!(
            "optimize (merging the segments, compaction) over {} rows: {secs:.2} s, fragments {before} -> {}",
            rows.next,
            store.fragment_count().await.unwrap()
        );
        row(
            "after optimize (1 segment)",
            store.unindexed_rows().await.unwrap(),
            time_lookup(&store, &mut rows).await,
        );
    });
}
