//! What the generator benches share: seeded display requests for a generator bundle.

use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use ragar::model::{GenerationRequest, Image};

/// Seeded requests: a random reference picture and embeddings of the bundle's length.
pub fn requests(n: usize, dim: usize, res: u32, seed: u64) -> Vec<GenerationRequest> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let unit = |rng: &mut ChaCha8Rng| -> Arc<[f32]> {
        let v: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    };
    (0..n)
        .map(|i| GenerationRequest {
            reference: Arc::new(Image {
                width: res,
                height: res,
                rgb: (0..3 * res * res).map(|_| rng.random()).collect(),
            }),
            reference_embedding: unit(&mut rng),
            preference: Some(unit(&mut rng)),
            preference_agreement: None,
            seeds: vec![seed.wrapping_add(i as u64)],
            reference_text: None,
            prompt_hints: Vec::new(),
        })
        .collect()
}
