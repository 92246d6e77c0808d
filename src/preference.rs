//! Preference: retrieval-weighted preference extraction (RAGAR, arXiv 2505.01657).
//!
//! Given the reference item about to be shown and the user's history, each history item gets
//! `w_i = softmax(cos(ref, h_i) / τ)` over the `k` items most similar to the reference, so items
//! unlike the reference do not dilute the preference; optional action and recency multipliers
//! follow, and the weights are renormalized. `uniform` mode gives every (non-excluded) item the same
//! weight: the paper's baseline, kept for the ablation. The preference vector is the weighted sum
//! of the history embeddings, L2-normalized; its agreement (how far those embeddings point one
//! way) goes with it to the generator. Pure functions, no I/O.

use serde::{Deserialize, Serialize};

use crate::history::HistoryEntry;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightingMode {
    Retrieval,
    Uniform,
}

impl WeightingMode {
    pub fn as_str(&self) -> &'static str {
        match self {
            WeightingMode::Retrieval => "retrieval",
            WeightingMode::Uniform => "uniform",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Params {
    pub mode: WeightingMode,
    pub k: usize,
    pub tau: f32,
    /// Multiplier per action, indexed by [`crate::event::Action::index`]; 0 excludes the action.
    pub action_weights: [f32; 5],
    /// Halves an item's weight every this many milliseconds of age; `None` disables recency.
    pub recency_half_life_ms: Option<f64>,
    /// Similarity to the reference uses the first `match_dims` values of each embedding (0: all),
    /// for embeddings whose leading block says what an item depicts and the rest how it looks:
    /// history is then retrieved by subject, and the preference still averages whole embeddings.
    pub match_dims: usize,
}

impl Params {
    pub fn from_config(c: &crate::config::PreferenceConfig) -> Self {
        let half = c.recency_half_life.as_secs_f64() * 1000.0;
        Params {
            mode: c.mode,
            k: c.k,
            tau: c.tau,
            action_weights: c.action_weights.as_array(),
            recency_half_life_ms: (half > 0.0).then_some(half),
            match_dims: c.match_dims,
        }
    }
}

/// One history item's part in the preference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weighted {
    /// Index into the history slice.
    pub index: usize,
    /// Cosine similarity to the reference.
    pub similarity: f32,
    /// Weight in the preference; the weights sum to 1.
    pub weight: f32,
}

/// Cosine similarity; 0 when either vector has zero length (a zero vector is like nothing).
///
/// Sums in [`LANES`] independent partial sums, which the compiler keeps in SIMD registers; one
/// running sum is a chain of dependent additions that cannot be vectorized (it was 0.10 ms of
/// weighing 500 history items against 0.02 ms now, `benches/preference.rs`).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    // Over the common prefix when the lengths differ.
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let (mut dot, mut na, mut nb) = ([0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES]);
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            dot[i] += x[i] * y[i];
            na[i] += x[i] * x[i];
            nb[i] += y[i] * y[i];
        }
    }
    let (mut dot, mut na, mut nb): (f32, f32, f32) =
        (dot.iter().sum(), na.iter().sum(), nb.iter().sum());
    for (x, y) in ra.iter().zip(rb) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    (dot / (na.sqrt() * nb.sqrt())).clamp(-1.0, 1.0)
}

/// Partial sums in [`cosine`]: two AVX registers of f32 per quantity.
const LANES: usize = 16;

/// Weighs `history` (newest first) against `reference` at time `now_ms`.
///
/// Returns the items that take part, most similar first (ties: newer first), with weights summing
/// to 1; empty when nothing takes part (empty history, every action excluded).
pub fn weigh(
    reference: &[f32],
    history: &[HistoryEntry],
    now_ms: i64,
    params: &Params,
) -> Vec<Weighted> {
    let m = match params.match_dims {
        0 => reference.len(),
        m => m.min(reference.len()),
    };
    let mut items: Vec<Weighted> = history
        .iter()
        .enumerate()
        .filter(|(_, h)| params.action_weights[h.action.index()] > 0.0)
        .map(|(index, h)| Weighted {
            index,
            similarity: cosine(&reference[..m], &h.embedding[..m.min(h.embedding.len())]),
            weight: 0.0,
        })
        .collect();
    if items.is_empty() {
        return items;
    }
    let by_similarity = |a: &Weighted, b: &Weighted| {
        b.similarity
            .total_cmp(&a.similarity)
            .then(a.index.cmp(&b.index))
    };
    match params.mode {
        WeightingMode::Retrieval => {
            let k = params.k.min(items.len());
            if k < items.len() {
                items.select_nth_unstable_by(k - 1, by_similarity);
                items.truncate(k);
            }
            items.sort_unstable_by(by_similarity);
            // Softmax with the maximum subtracted, so large 1/τ cannot overflow.
            let max = items[0].similarity;
            for w in &mut items {
                w.weight = ((w.similarity - max) / params.tau).exp();
            }
        }
        WeightingMode::Uniform => {
            items.sort_unstable_by(by_similarity);
            for w in &mut items {
                w.weight = 1.0;
            }
        }
    }
    for w in &mut items {
        let h = &history[w.index];
        w.weight *= params.action_weights[h.action.index()];
        if let Some(half) = params.recency_half_life_ms {
            let age = (now_ms - h.ts_ms).max(0) as f64;
            w.weight *= 0.5f64.powf(age / half) as f32;
        }
    }
    let total: f32 = items.iter().map(|w| w.weight).sum();
    if !(total > 0.0 && total.is_finite()) {
        // Recency can underflow every weight to 0 for very old histories: fall back to equal shares.
        let n = items.len() as f32;
        items.iter_mut().for_each(|w| w.weight = 1.0 / n);
    } else {
        items.iter_mut().for_each(|w| w.weight /= total);
    }
    items
}

/// The weighted sum of the chosen embeddings, L2-normalized; `None` when nothing takes part or
/// the sum is the zero vector.
pub fn preference_vector(
    history: &[HistoryEntry],
    weighted: &[Weighted],
    dim: usize,
) -> Option<Vec<f32>> {
    preference(history, weighted, dim).map(|(p, _)| p)
}

/// [`preference_vector`] and the *agreement* of the items behind it: the length of their weighted
/// mean relative to the weighted mean of their lengths, `|Σ wᵢ hᵢ| / Σ wᵢ |hᵢ|`, in [0, 1] — 1 when
/// they all point one way, smaller as they disagree (the mean resultant length of directional
/// statistics). Normalizing the sum discards it; a generator can read from it how settled the
/// preference is.
pub fn preference(
    history: &[HistoryEntry],
    weighted: &[Weighted],
    dim: usize,
) -> Option<(Vec<f32>, f32)> {
    if weighted.is_empty() {
        return None;
    }
    let mut p = vec![0.0f32; dim];
    let mut lengths = 0.0f32;
    for w in weighted {
        let mut square = 0.0f32;
        for (acc, x) in p.iter_mut().zip(history[w.index].embedding.iter()) {
            *acc += w.weight * x;
            square += x * x;
        }
        lengths += w.weight * square.sqrt();
    }
    let norm = p.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm == 0.0 || !norm.is_finite() {
        return None;
    }
    p.iter_mut().for_each(|x| *x /= norm);
    Some((p, (norm / lengths).min(1.0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Action;

    fn entry(i: usize, emb: &[f32], action: Action, ts: i64) -> HistoryEntry {
        HistoryEntry {
            event_id: format!("e{i}"),
            user_id: "u".into(),
            item_id: format!("i{i}"),
            action,
            ts_ms: ts,
            embedding: emb.into(),
        }
    }

    fn params(mode: WeightingMode, k: usize) -> Params {
        Params {
            mode,
            k,
            tau: 0.1,
            action_weights: [1.0, 1.0, 1.0, 1.0, 0.0],
            recency_half_life_ms: None,
            match_dims: 0,
        }
    }

    fn sum(ws: &[Weighted]) -> f32 {
        ws.iter().map(|w| w.weight).sum()
    }

    #[test]
    fn cosine_matches_a_double_precision_reference_at_every_length() {
        let reference = |a: &[f32], b: &[f32]| {
            let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
            let nb: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
            dot / (na.sqrt() * nb.sqrt())
        };
        // Lengths below, at and between multiples of the lane count (the remainder path).
        for n in [1usize, 3, 15, 16, 17, 33, 384, 391] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 7 + 3) % 11) as f32 - 5.0).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 5 + 1) % 13) as f32 - 6.5).collect();
            let got = cosine(&a, &b) as f64;
            assert!((got - reference(&a, &b)).abs() < 1e-5, "n={n}: {got}");
            assert!((cosine(&a, &a) - 1.0).abs() < 1e-6, "n={n}");
        }
        // Different lengths: over the common prefix.
        let long: Vec<f32> = (0..40).map(|i| (i % 7) as f32 - 3.0).collect();
        let short = &long[..19];
        let other: Vec<f32> = (0..19).map(|i| (i % 5) as f32 - 2.0).collect();
        assert_eq!(cosine(&long, &other), cosine(short, &other));
        assert_eq!(cosine(&other, &long), cosine(&other, short));
        assert_eq!(cosine(&[0.0; 20], &[1.0; 20]), 0.0);
        assert_eq!(cosine(&[], &[]), 0.0);
    }

    #[test]
    fn empty_history_gives_nothing() {
        assert!(weigh(&[1.0, 0.0], &[], 0, &params(WeightingMode::Retrieval, 4)).is_empty());
        assert_eq!(preference_vector(&[], &[], 2), None);
    }

    #[test]
    fn similar_items_dominate_and_dissimilar_are_cut_by_k() {
        let h = vec![
            entry(0, &[0.0, 1.0], Action::Click, 3),
            entry(1, &[1.0, 0.1], Action::Click, 2),
            entry(2, &[1.0, 0.0], Action::Click, 1),
        ];
        let w = weigh(&[1.0, 0.0], &h, 10, &params(WeightingMode::Retrieval, 2));
        assert_eq!(w.iter().map(|w| w.index).collect::<Vec<_>>(), vec![2, 1]);
        assert!((sum(&w) - 1.0).abs() < 1e-6);
        assert!(w[0].weight > w[1].weight);
        let p = preference_vector(&h, &w, 2).unwrap();
        assert!(p[0] > 0.99 && p[1] > 0.0 && p[1] < 0.1, "{p:?}");
    }

    #[test]
    fn agreement_is_the_weighted_mean_s_length() {
        let all =
            |h: &[HistoryEntry]| weigh(&[1.0, 0.0], h, 10, &params(WeightingMode::Uniform, 8));
        let same = vec![
            entry(0, &[0.6, 0.8], Action::Click, 1),
            entry(1, &[0.6, 0.8], Action::Click, 1),
        ];
        let (p, a) = preference(&same, &all(&same), 2).unwrap();
        assert!(
            (a - 1.0).abs() < 1e-6 && (p[1] - 0.8).abs() < 1e-6,
            "{p:?} {a}"
        );
        // Orthogonal halves: |(e₁ + e₂) / 2| = 1/√2.
        let apart = vec![
            entry(0, &[1.0, 0.0], Action::Click, 1),
            entry(1, &[0.0, 1.0], Action::Click, 1),
        ];
        let (_, a) = preference(&apart, &all(&apart), 2).unwrap();
        assert!((a - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6, "{a}");
        // Relative to the items' own lengths: scaling them changes nothing.
        let long = vec![
            entry(0, &[3.0, 0.0], Action::Click, 1),
            entry(1, &[0.0, 3.0], Action::Click, 1),
        ];
        let (_, b) = preference(&long, &all(&long), 2).unwrap();
        assert!((a - b).abs() < 1e-6, "{a} {b}");
    }

    #[test]
    fn uniform_weighs_all_equally() {
        let h = vec![
            entry(0, &[0.0, 1.0], Action::View, 1),
            entry(1, &[1.0, 0.0], Action::Like, 1),
        ];
        let w = weigh(&[1.0, 0.0], &h, 10, &params(WeightingMode::Uniform, 1));
        assert_eq!(w.len(), 2, "uniform ignores k");
        assert!(w.iter().all(|w| (w.weight - 0.5).abs() < 1e-6));
        let p = preference_vector(&h, &w, 2).unwrap();
        assert!((p[0] - p[1]).abs() < 1e-6);
    }

    #[test]
    fn k_larger_than_history_takes_all() {
        let h = vec![
            entry(0, &[1.0, 0.0], Action::View, 1),
            entry(1, &[0.5, 0.5], Action::View, 1),
        ];
        let w = weigh(&[1.0, 0.0], &h, 10, &params(WeightingMode::Retrieval, 100));
        assert_eq!(w.len(), 2);
        assert!((sum(&w) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn ties_prefer_newer_items_and_share_weight() {
        let h = vec![
            entry(0, &[1.0, 0.0], Action::View, 3),
            entry(1, &[2.0, 0.0], Action::View, 2),
            entry(2, &[3.0, 0.0], Action::View, 1),
        ];
        let w = weigh(&[1.0, 0.0], &h, 10, &params(WeightingMode::Retrieval, 2));
        assert_eq!(w.iter().map(|w| w.index).collect::<Vec<_>>(), vec![0, 1]);
        assert!((w[0].weight - 0.5).abs() < 1e-6 && (w[1].weight - 0.5).abs() < 1e-6);
    }

    #[test]
    fn zero_vectors_are_harmless() {
        let h = vec![
            entry(0, &[0.0, 0.0], Action::View, 1),
            entry(1, &[0.0, 1.0], Action::View, 1),
        ];
        let w = weigh(&[0.0, 0.0], &h, 10, &params(WeightingMode::Retrieval, 2));
        assert!(w
            .iter()
            .all(|w| w.similarity == 0.0 && w.weight.is_finite()));
        let p = preference_vector(&h, &w, 2).unwrap();
        assert_eq!(p, vec![0.0, 1.0]);
        let only_zero = vec![entry(0, &[0.0, 0.0], Action::View, 1)];
        let w = weigh(
            &[1.0, 0.0],
            &only_zero,
            10,
            &params(WeightingMode::Retrieval, 2),
        );
        assert_eq!(preference_vector(&only_zero, &w, 2), None);
    }

    #[test]
    fn actions_and_recency_reweigh() {
        let h = vec![
            entry(0, &[1.0, 0.0], Action::Dislike, 100),
            entry(1, &[1.0, 0.0], Action::Purchase, 100),
            entry(2, &[1.0, 0.0], Action::View, 0),
        ];
        let mut p = params(WeightingMode::Retrieval, 10);
        p.action_weights = [1.0, 1.0, 1.0, 3.0, 0.0];
        p.recency_half_life_ms = Some(100.0);
        let w = weigh(&[1.0, 0.0], &h, 100, &p);
        assert_eq!(w.len(), 2, "dislikes are excluded");
        let purchase = w.iter().find(|w| w.index == 1).unwrap().weight;
        let view = w.iter().find(|w| w.index == 2).unwrap().weight;
        // purchase: ×3, age 0; view: ×1, one half-life old.
        assert!((purchase / view - 6.0).abs() < 1e-4, "{purchase} {view}");
        // Ages far beyond the half-life underflow every weight: equal shares, not NaN.
        let w = weigh(&[1.0, 0.0], &h, i64::MAX / 2, &p);
        assert!(w.iter().all(|w| (w.weight - 0.5).abs() < 1e-6));
    }

    #[test]
    fn large_inverse_temperature_does_not_overflow() {
        let h = vec![
            entry(0, &[1.0, 0.0], Action::View, 1),
            entry(1, &[-1.0, 0.0], Action::View, 1),
        ];
        let mut p = params(WeightingMode::Retrieval, 2);
        p.tau = 1e-6;
        let w = weigh(&[1.0, 0.0], &h, 10, &p);
        assert!((w[0].weight - 1.0).abs() < 1e-6 && w[1].weight == 0.0);
    }

    #[test]
    fn match_dims_retrieves_by_the_leading_block_only() {
        // Leading block: what the item depicts; the rest: how it looks.
        let reference = [1.0, 0.0, 0.0, 1.0];
        let same_subject = entry(0, &[1.0, 0.0, 0.0, -1.0], Action::Like, 0);
        let same_look = entry(1, &[0.0, 1.0, 0.0, 1.0], Action::Like, 0);
        let history = [same_subject, same_look];
        let whole = weigh(
            &reference,
            &history,
            0,
            &params(WeightingMode::Retrieval, 1),
        );
        assert_eq!(
            whole[0].index, 1,
            "whole embeddings: the same look is nearer"
        );
        let leading = Params {
            match_dims: 2,
            ..params(WeightingMode::Retrieval, 1)
        };
        let by_subject = weigh(&reference, &history, 0, &leading);
        assert_eq!(
            by_subject[0].index, 0,
            "leading block: the same subject is nearer"
        );
        assert_eq!(by_subject[0].similarity, 1.0);
        // The preference still averages whole embeddings.
        let p = preference_vector(&history, &by_subject, 4).unwrap();
        assert_eq!(p.len(), 4);
        assert!(p[3] < 0.0);
    }
}
