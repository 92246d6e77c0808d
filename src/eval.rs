//! `ragar eval`: the EmojiStyle evaluation, written as a Markdown and an HTML report.
//!
//! Preference level: simulated users ([`crate::data::simulate`]) with histories from the train
//! split; their display requests show val emoji (for choosing k and τ) or test emoji (for the
//! reported figures, never tuned on). Every item is embedded by the item encoder; each display's
//! history is weighed against the reference ([`crate::preference`]) and the preference vector's
//! style block is matched to the nearest vendor prototype (the mean style block of the vendor's
//! train-split drawings). A display counts as right when that vendor is the one the user prefers
//! for the reference's category. Rows: uniform weighting vs retrieval weighting, by user kind.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use crate::data::simulate::{simulate, SimConfig, Simulation, UserKind};
use crate::data::{Manifest, Split};
use crate::event::Action;
use crate::history::HistoryEntry;
use crate::model::emoji::EmojiEncoder;
use crate::model::{Image, Ranker};
use crate::preference::{self, cosine, Params, WeightingMode};

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub data_dir: PathBuf,
    pub out: PathBuf,
    pub sim: SimConfig,
    /// Grid searched on val (retrieval weighting).
    pub ks: Vec<usize>,
    pub taus: Vec<f32>,
    /// `preference.match_dims` values tried (0: whole embeddings).
    pub match_dims: Vec<usize>,
    /// Candidates per display in the best-of-N generation rows.
    pub best_of: usize,
    /// The displays the generation rows are measured on: `Test` for the report, `Val` for
    /// choosing the generator's sampling settings.
    pub generation_split: Split,
}

/// The models an evaluation measures; absent ones leave their rows out.
#[derive(Clone, Copy)]
pub struct EvalModels<'a> {
    pub encoder: &'a EmojiEncoder,
    pub encoder_name: &'a str,
    pub ranker: Option<&'a crate::model::ranker::LearnedRanker>,
    /// An encoder trained in a separate run; the generation rows need it.
    pub judge: Option<&'a EmojiEncoder>,
    pub generator: Option<&'a dyn crate::model::Generator>,
    /// The generator after rank-task fine-tuning.
    pub finetuned: Option<&'a dyn crate::model::Generator>,
    /// More sampling settings, each measured with uniform and retrieval weighting after the
    /// rows above: a scan of settings on val in one run, sharing its set-up.
    pub variants: &'a [(String, &'a dyn crate::model::Generator)],
}

/// Accuracy of one weighting on one population, by user kind.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Accuracy {
    pub category_dependent: f32,
    pub global: f32,
    pub all: f32,
    pub displays: usize,
}

/// Counts right answers by user kind.
#[derive(Debug, Default)]
struct Tally {
    cd_ok: usize,
    cd_n: usize,
    g_ok: usize,
    g_n: usize,
}

impl Tally {
    fn add(&mut self, kind: UserKind, ok: bool) {
        match kind {
            UserKind::CategoryDependent => {
                self.cd_n += 1;
                self.cd_ok += ok as usize;
            }
            UserKind::Global => {
                self.g_n += 1;
                self.g_ok += ok as usize;
            }
        }
    }

    fn accuracy(&self) -> Accuracy {
        let rate = |ok: usize, n: usize| if n == 0 { 0.0 } else { ok as f32 / n as f32 };
        Accuracy {
            category_dependent: rate(self.cd_ok, self.cd_n),
            global: rate(self.g_ok, self.g_n),
            all: rate(self.cd_ok + self.g_ok, self.cd_n + self.g_n),
            displays: self.cd_n + self.g_n,
        }
    }
}

#[derive(Debug, Clone)]
pub struct PreferenceReport {
    pub encoder: String,
    pub k: usize,
    pub tau: f32,
    pub match_dims: usize,
    /// (k, τ, match_dims, val accuracy on category-dependent users) for every grid point.
    pub sweep: Vec<(usize, f32, usize, f32)>,
    pub val_uniform: Accuracy,
    pub val_retrieval: Accuracy,
    pub test_uniform: Accuracy,
    pub test_retrieval: Accuracy,
    pub sim: SimConfig,
    pub ranker: Option<RankerEval>,
    pub judge: Option<JudgeAccuracy>,
    pub generation: Vec<GenerationRow>,
    pub generation_split: Split,
}

/// One generation setting's row: how its published images fare, on test displays.
#[derive(Debug, Clone)]
pub struct GenerationRow {
    pub name: String,
    /// The judge's vendor for the image is the one the user prefers for the category.
    pub style: Accuracy,
    /// The judge's content is nearest to the reference emoji's (mean over vendors), among every
    /// test emoji.
    pub identity: f32,
    /// The judge's content is nearest to the reference emoji's name, among every test name.
    pub text_agreement: f32,
    /// Mean SSIM and image-embedding cosine to the ground-truth drawing.
    pub ssim: f32,
    pub truth_cosine: f32,
    /// Mean σ(ranker personalization) against the retrieval-weighted preference.
    pub ranker_score: Option<f32>,
    /// Mean cosine to the user's history drawings (CIS-style).
    pub history_similarity: f32,
    /// Generation (and ranking, for best-of-N) per published image, batch 1, this CPU.
    pub seconds_per_image: f32,
}

/// The judges (an encoder trained in a separate run) on the ground-truth drawings themselves.
#[derive(Debug, Clone, Copy)]
pub struct JudgeAccuracy {
    pub style: f32,
    pub identity: f32,
    pub text_agreement: f32,
    pub images: usize,
}

/// The ranker on held-out (test-population) logs and displays.
#[derive(Debug, Clone)]
pub struct RankerEval {
    pub version: String,
    pub auc: f32,
    pub pairs: usize,
    /// Best-of-vendors accuracy by the learned ranker's total, and by the cosine baseline.
    pub best_of_vendors: Accuracy,
    pub cosine_best_of_vendors: Accuracy,
}

/// Every item a simulation refers to, embedded; plus per-vendor style prototypes.
struct Embedded {
    items: HashMap<String, Arc<[f32]>>,
    prototypes: Vec<(String, Vec<f32>)>,
    style_from: usize,
}

/// Embeds items `vendor.emoji` from their drawings, with the emoji's name as text when `with_text`
/// (catalog items) or from the image alone (as a generated candidate is embedded).
pub fn embed_items(
    encoder: &EmojiEncoder,
    manifest: &Manifest,
    data_dir: &Path,
    ids: &[String],
    with_text: bool,
) -> anyhow::Result<HashMap<String, Arc<[f32]>>> {
    let res = encoder.config().resolution;
    let res = if manifest.resolutions.contains(&res) {
        res
    } else {
        crate::data::BASE_RESOLUTION
    };
    let names: HashMap<&str, String> = manifest
        .emoji
        .iter()
        .map(|e| (e.id.as_str(), crate::data::simulate::item_text(e)))
        .collect();
    let mut out = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(128) {
        let mut images = Vec::with_capacity(chunk.len());
        for id in chunk {
            let (vendor, emoji) = id.split_once('.').context("item ids are vendor.emoji")?;
            let path = manifest.image_path(data_dir, vendor, res, emoji);
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            images.push(Image::from_png(&bytes)?);
        }
        let batch: Vec<(Option<&Image>, Option<&str>)> = chunk
            .iter()
            .zip(&images)
            .map(|(id, img)| {
                let emoji = id.split_once('.').map_or("", |p| p.1);
                let text = names.get(emoji).map(String::as_str).filter(|_| with_text);
                (Some(img), text)
            })
            .collect();
        for (id, e) in chunk.iter().zip(encoder.encode_batch(&batch)?) {
            out.insert(id.clone(), Arc::from(e));
        }
    }
    Ok(out)
}

/// Each user's interactions as history entries, with the items' embeddings.
pub fn histories<'a>(
    sim: &'a Simulation,
    items: &HashMap<String, Arc<[f32]>>,
) -> HashMap<&'a str, Vec<HistoryEntry>> {
    let mut histories: HashMap<&str, Vec<HistoryEntry>> = HashMap::new();
    for i in &sim.interactions {
        histories
            .entry(i.user_id.as_str())
            .or_default()
            .push(HistoryEntry {
                event_id: i.event_id.clone(),
                user_id: i.user_id.clone(),
                item_id: i.item_id.clone(),
                action: Action::parse(&i.action).unwrap_or(Action::View),
                ts_ms: i.ts_ms,
                embedding: items[&i.item_id].clone(),
            });
    }
    histories
}

/// How often the preference points at the user's vendor; `histories` are `sim`'s ([`histories`]).
fn accuracy(
    sim: &Simulation,
    histories: &HashMap<&str, Vec<HistoryEntry>>,
    emb: &Embedded,
    params: &Params,
) -> Accuracy {
    let dim = emb.items.values().next().map_or(0, |e| e.len());
    let mut tally = Tally::default();
    let empty = Vec::new();
    for d in &sim.displays {
        let history = histories.get(d.user_id.as_str()).unwrap_or(&empty);
        let reference = &emb.items[&d.item_id];
        let weighted = preference::weigh(reference, history, d.ts_ms, params);
        let predicted = preference::preference_vector(history, &weighted, dim)
            .map(|p| nearest_vendor(&p[emb.style_from..], &emb.prototypes));
        let ok = predicted.as_deref() == Some(d.preferred_vendor.as_str());
        tally.add(d.user_kind, ok);
    }
    tally.accuracy()
}

/// Pairs for the ranker's pairwise loss, from interaction logs: for each engaged interaction
/// (click, like, purchase), the preference from the user's *other* interactions (weighed against
/// the emoji drawn by a random vendor, as a display would show it), the engaged drawing (positive)
/// and the same emoji drawn by another vendor (negative). Candidates are embedded from the image
/// alone (`image_only`), as generated images are.
pub struct Pairs {
    pub preference: Vec<f32>,
    pub positive: Vec<f32>,
    pub negative: Vec<f32>,
    pub n: usize,
    pub dim: usize,
}

pub fn ranker_pairs(
    sim: &Simulation,
    full: &HashMap<String, Arc<[f32]>>,
    image_only: &HashMap<String, Arc<[f32]>>,
    params: &Params,
    seed: u64,
) -> Pairs {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let hist = histories(sim, full);
    let dim = full.values().next().map_or(0, |e| e.len());
    let mut out = Pairs {
        preference: Vec::new(),
        positive: Vec::new(),
        negative: Vec::new(),
        n: 0,
        dim,
    };
    let mut users: Vec<&&str> = hist.keys().collect();
    users.sort();
    for user in users {
        let h = &hist[*user];
        for (i, entry) in h.iter().enumerate() {
            if matches!(entry.action, Action::View | Action::Dislike) {
                continue;
            }
            let Some((vendor, emoji)) = entry.item_id.split_once('.') else {
                continue;
            };
            let others: Vec<&String> = sim.vendors.iter().filter(|v| *v != vendor).collect();
            let negative =
                crate::data::simulate::item_id(others[rng.random_range(0..others.len())], emoji);
            let shown = crate::data::simulate::item_id(
                &sim.vendors[rng.random_range(0..sim.vendors.len())],
                emoji,
            );
            let rest: Vec<HistoryEntry> = h
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, e)| e.clone())
                .collect();
            let weighted = preference::weigh(&full[&shown], &rest, entry.ts_ms, params);
            let Some(p) = preference::preference_vector(&rest, &weighted, dim) else {
                continue;
            };
            out.preference.extend(p);
            out.positive.extend(image_only[&entry.item_id].iter());
            out.negative.extend(image_only[&negative].iter());
            out.n += 1;
        }
    }
    out
}

/// How often the candidate with the highest `score` among the display's emoji drawn by every
/// vendor is the drawing by the vendor the user prefers (by user kind).
pub fn best_of_vendors(
    sim: &Simulation,
    full: &HashMap<String, Arc<[f32]>>,
    image_only: &HashMap<String, Arc<[f32]>>,
    params: &Params,
    score: &dyn Fn(&[f32], &[f32], &[Vec<f32>]) -> Vec<f32>,
) -> Accuracy {
    let hist = histories(sim, full);
    let dim = full.values().next().map_or(0, |e| e.len());
    let empty = Vec::new();
    let mut tally = Tally::default();
    for d in &sim.displays {
        let h = hist.get(d.user_id.as_str()).unwrap_or(&empty);
        let reference = &full[&d.item_id];
        let weighted = preference::weigh(reference, h, d.ts_ms, params);
        let p = preference::preference_vector(h, &weighted, dim).unwrap_or_else(|| vec![0.0; dim]);
        let candidates: Vec<Vec<f32>> = sim
            .vendors
            .iter()
            .map(|v| image_only[&crate::data::simulate::item_id(v, &d.emoji_id)].to_vec())
            .collect();
        let scores = score(&p, reference, &candidates);
        let best = scores
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| sim.vendors[i].as_str());
        let ok = best == Some(d.preferred_vendor.as_str());
        tally.add(d.user_kind, ok);
    }
    tally.accuracy()
}

/// Pairwise AUC: the share of pairs whose positive outscores its negative (ties count half).
pub fn pairwise_auc(positive: &[f32], negative: &[f32]) -> f32 {
    let n = positive.len().max(1) as f32;
    positive
        .iter()
        .zip(negative)
        .map(|(p, q)| {
            if p > q {
                1.0
            } else if p == q {
                0.5
            } else {
                0.0
            }
        })
        .sum::<f32>()
        / n
}

/// One setting of the generation table.
pub struct GenerationSpec<'a> {
    pub name: String,
    pub generator: &'a dyn crate::model::Generator,
    /// How the history is weighed into the preference the generator gets.
    pub params: Params,
    /// Candidates per display (seeds `seed`, `seed + 1`, ...); above one, the ranker publishes the
    /// best of them (best-of-N).
    pub candidates: usize,
}

/// Judges a published image against its display's ground truth.
struct Judging<'a> {
    judge: &'a EmojiEncoder,
    /// The encoder that embeds images (image only) for the cosine, CIS and ranker columns.
    encoder: &'a EmojiEncoder,
    vendor_index: HashMap<&'a str, usize>,
    test_index: HashMap<&'a str, usize>,
    /// Per test emoji: the judge's mean content over every vendor's drawing (image identity).
    prototypes: Vec<Vec<f32>>,
    /// Per test emoji: MiniLM of its name (text agreement).
    names: Vec<Vec<f32>>,
}

/// What the judges say about one image.
struct Verdict {
    style_right: bool,
    identity_right: bool,
    text_right: bool,
}

impl Judging<'_> {
    fn argmax(rows: &[Vec<f32>], v: &[f32]) -> usize {
        rows.iter()
            .enumerate()
            .max_by(|a, b| cosine(v, a.1).total_cmp(&cosine(v, b.1)))
            .map_or(usize::MAX, |(i, _)| i)
    }

    fn verdicts(
        &self,
        images: &[&Image],
        displays: &[&crate::data::simulate::SimDisplay],
    ) -> anyhow::Result<Vec<Verdict>> {
        let (vendors, contents) = self.judge.judge(images)?;
        Ok(displays
            .iter()
            .zip(vendors)
            .zip(contents)
            .map(|((d, v), c)| {
                let want = self.test_index.get(d.emoji_id.as_str()).copied();
                Verdict {
                    style_right: self.vendor_index.get(d.preferred_vendor.as_str()) == Some(&v),
                    identity_right: want == Some(Self::argmax(&self.prototypes, &c)),
                    text_right: want == Some(Self::argmax(&self.names, &c)),
                }
            })
            .collect())
    }
}

/// Structural similarity (mean SSIM over 8×8 windows, luma) of two images, resized to `b`'s size.
pub fn ssim(a: &Image, b: &Image) -> anyhow::Result<f32> {
    let luma = |img: &Image, w: u32, h: u32| -> anyhow::Result<image::GrayImage> {
        let rgb = image::RgbImage::from_raw(img.width, img.height, img.rgb.clone())
            .context("pixel buffer does not match its size")?;
        let gray = image::DynamicImage::ImageRgb8(rgb).to_luma8();
        Ok(if (gray.width(), gray.height()) == (w, h) {
            gray
        } else {
            image::imageops::resize(&gray, w, h, image::imageops::FilterType::Triangle)
        })
    };
    let (ga, gb) = (luma(a, b.width, b.height)?, luma(b, b.width, b.height)?);
    let s =
        image_compare::gray_similarity_structure(&image_compare::Algorithm::MSSIMSimple, &ga, &gb)?;
    Ok(s.score as f32)
}

/// Runs every generation setting on every test display and judges the published images: style
/// (the judge's vendor is the user's vendor for the category), identity (the judge's content is
/// nearest to the reference emoji's, among every test emoji's mean over vendors), text agreement
/// (nearest to its name among every test name), SSIM and embedding cosine to the ground truth,
/// the ranker's personalization score (against the retrieval-weighted preference, the same
/// yardstick for every row) and similarity to the user's history (CIS-style: mean cosine of
/// image embeddings). Also returns the judges' accuracy on the ground truth itself.
#[allow(clippy::too_many_arguments)]
pub fn generation_rows(
    sim: &Simulation,
    manifest: &Manifest,
    data_dir: &Path,
    items: &HashMap<String, Arc<[f32]>>,
    image_only: &HashMap<String, Arc<[f32]>>,
    retrieval: &Params,
    judge: &EmojiEncoder,
    encoder: &EmojiEncoder,
    ranker: Option<&crate::model::ranker::LearnedRanker>,
    specs: &[GenerationSpec],
    split: Split,
) -> anyhow::Result<(JudgeAccuracy, Vec<GenerationRow>)> {
    use crate::model::{GenerationRequest, Ranker};
    let res = judge.config().resolution;
    let res = if manifest.resolutions.contains(&res) {
        res
    } else {
        crate::data::BASE_RESOLUTION
    };
    let load = |id: &str| -> anyhow::Result<Image> {
        let (vendor, emoji) = id.split_once('.').context("item ids are vendor.emoji")?;
        let path = manifest.image_path(data_dir, vendor, res, emoji);
        Ok(Image::from_png(
            &std::fs::read(&path).with_context(|| path.display().to_string())?,
        )?)
    };
    // The emoji the displays show (`sim`'s display split): identity is chosen among them.
    let test: Vec<&crate::data::EmojiEntry> = manifest.split(split).collect();
    let names: Vec<String> = test.iter().map(|e| e.name.to_lowercase()).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut prototypes = Vec::with_capacity(test.len());
    for e in &test {
        let drawings: Vec<Image> = manifest
            .vendor_names()
            .map(|v| load(&crate::data::simulate::item_id(v, &e.id)))
            .collect::<anyhow::Result<_>>()?;
        let refs: Vec<&Image> = drawings.iter().collect();
        let (_, contents) = judge.judge(&refs)?;
        let mut mean = vec![0f32; contents.first().map_or(0, Vec::len)];
        for c in &contents {
            mean.iter_mut().zip(c).for_each(|(m, x)| *m += x);
        }
        prototypes.push(mean);
    }
    let judging = Judging {
        judge,
        encoder,
        vendor_index: judge
            .config()
            .vendors
            .iter()
            .enumerate()
            .map(|(i, v)| (v.as_str(), i))
            .collect(),
        test_index: test
            .iter()
            .enumerate()
            .map(|(i, e)| (e.id.as_str(), i))
            .collect(),
        prototypes,
        names: encoder.embed_texts(&name_refs)?,
    };

    // The judges on the ground truth.
    let truths: Vec<Image> = sim
        .displays
        .iter()
        .map(|d| load(&d.truth_item_id))
        .collect::<anyhow::Result<_>>()?;
    let (mut style_ok, mut id_ok, mut text_ok) = (0usize, 0usize, 0usize);
    for (chunk_d, chunk_i) in sim.displays.chunks(128).zip(truths.chunks(128)) {
        let refs: Vec<&Image> = chunk_i.iter().collect();
        let displays: Vec<_> = chunk_d.iter().collect();
        for v in judging.verdicts(&refs, &displays)? {
            style_ok += v.style_right as usize;
            id_ok += v.identity_right as usize;
            text_ok += v.text_right as usize;
        }
    }
    let n = sim.displays.len().max(1) as f32;
    let judge_acc = JudgeAccuracy {
        style: style_ok as f32 / n,
        identity: id_ok as f32 / n,
        text_agreement: text_ok as f32 / n,
        images: sim.displays.len(),
    };

    let hist = histories(sim, items);
    let empty = Vec::new();
    let dim = items.values().next().map_or(0, |e| e.len());
    // Item texts by emoji id, for generators that read the preference as a prompt.
    let texts: HashMap<&str, Arc<str>> = manifest
        .emoji
        .iter()
        .map(|e| {
            (
                e.id.as_str(),
                Arc::from(crate::data::simulate::item_text(e)),
            )
        })
        .collect();
    let text_of = |item_id: &str| -> Option<Arc<str>> {
        let emoji = item_id.split_once('.').map_or(item_id, |(_, e)| e);
        texts.get(emoji).cloned()
    };
    // Per display, the same for every setting: the reference drawing and the retrieval-weighted
    // preference the ranker column is measured against.
    let references: Vec<Arc<Image>> = sim
        .displays
        .iter()
        .map(|d| load(&d.item_id).map(Arc::new))
        .collect::<anyhow::Result<_>>()?;
    let retrieval_preferences: Vec<Option<Vec<f32>>> = sim
        .displays
        .iter()
        .map(|d| {
            let h = hist.get(d.user_id.as_str()).unwrap_or(&empty);
            let w = preference::weigh(&items[&d.item_id], h, d.ts_ms, retrieval);
            preference::preference_vector(h, &w, dim)
        })
        .collect();
    let cancel = tokio_util::sync::CancellationToken::new();
    let mut rows = Vec::new();
    for spec in specs {
        let (mut tally, mut id_ok, mut text_ok) = (Tally::default(), 0usize, 0usize);
        let (mut ssim_sum, mut truth_cos, mut cis, mut rank_sum) = (0f64, 0f64, 0f64, 0f64);
        let mut seconds = 0f64;
        for (i, (d, truth)) in sim.displays.iter().zip(&truths).enumerate() {
            let h = hist.get(d.user_id.as_str()).unwrap_or(&empty);
            let reference = &items[&d.item_id];
            let weighted = preference::weigh(reference, h, d.ts_ms, &spec.params);
            let (pref, agreement) = preference::preference(h, &weighted, dim).unzip();
            let request = GenerationRequest {
                reference: references[i].clone(),
                reference_embedding: reference.clone(),
                preference: pref.map(Arc::from),
                preference_agreement: agreement,
                seeds: (0..spec.candidates.max(1) as u64)
                    .map(|i| d.seed.wrapping_add(i))
                    .collect(),
                reference_text: texts.get(d.emoji_id.as_str()).cloned(),
                prompt_hints: weighted
                    .iter()
                    .filter_map(|w| text_of(&h[w.index].item_id).map(|t| (t.to_string(), w.weight)))
                    .collect(),
            };
            let started = std::time::Instant::now();
            let mut out = spec
                .generator
                .generate(std::slice::from_ref(&request), &cancel)?
                .remove(0);
            let pick = match (out.len(), ranker) {
                (0, _) => anyhow::bail!("{} gave no candidate", spec.name),
                (1, _) | (_, None) => 0,
                (_, Some(r)) => crate::model::best(&r.score(&request, &out)?).unwrap_or(0),
            };
            seconds += started.elapsed().as_secs_f64();
            let image = out.swap_remove(pick).image;
            let v = judging.verdicts(&[&image], &[d])?.remove(0);
            tally.add(d.user_kind, v.style_right);
            id_ok += v.identity_right as usize;
            text_ok += v.text_right as usize;
            ssim_sum += ssim(&image, truth)? as f64;
            let emb = judging
                .encoder
                .encode_batch(&[(Some(&image), None)])?
                .remove(0);
            truth_cos += cosine(&emb, &image_only[&d.truth_item_id]) as f64;
            if !h.is_empty() {
                cis += h
                    .iter()
                    .map(|e| cosine(&emb, &image_only[&e.item_id]) as f64)
                    .sum::<f64>()
                    / h.len() as f64;
            }
            if let (Some(r), Some(p)) = (ranker, &retrieval_preferences[i]) {
                let s = r.personalization(p, &[emb])?[0];
                rank_sum += 1.0 / (1.0 + (-s as f64).exp());
            }
        }
        let style = tally.accuracy();
        let n = style.displays.max(1) as f64;
        rows.push(GenerationRow {
            name: spec.name.clone(),
            style,
            identity: (id_ok as f64 / n) as f32,
            text_agreement: (text_ok as f64 / n) as f32,
            ssim: (ssim_sum / n) as f32,
            truth_cosine: (truth_cos / n) as f32,
            ranker_score: ranker.map(|_| (rank_sum / n) as f32),
            history_similarity: (cis / n) as f32,
            seconds_per_image: (seconds / n) as f32,
        });
    }
    Ok((judge_acc, rows))
}

/// The vendor whose prototype is closest (cosine) to `style`.
pub fn nearest_vendor(style: &[f32], prototypes: &[(String, Vec<f32>)]) -> String {
    prototypes
        .iter()
        .max_by(|a, b| cosine(style, &a.1).total_cmp(&cosine(style, &b.1)))
        .map(|p| p.0.clone())
        .unwrap_or_default()
}

/// The sampling settings of a diffusion generator that `ragar eval` varies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Style guidance scale (`None`: the bundle's default).
    pub guidance: Option<f32>,
    pub encoder: crate::model::diffusion::EncoderScales,
    /// Whether the fidelity guard (`ragar eval --fidelity-guard`) judges the floor.
    pub guard: bool,
    /// The agreement ramp (`ragar eval --agreement-ramp LOW:HIGH`), `None`: off.
    pub agreement: Option<crate::model::diffusion::AgreementRamp>,
    /// The style snap's temperature (`ragar eval --snap T`), `None`: off.
    pub snap: Option<f32>,
    /// The own-style gate (`ragar eval --keep-own-style`).
    pub keep_own: bool,
}

/// `LOW:HIGH` as an agreement ramp (checked), or `off`.
pub fn parse_agreement_ramp(
    text: &str,
) -> anyhow::Result<Option<crate::model::diffusion::AgreementRamp>> {
    let text = text.trim();
    if text == "off" {
        return Ok(None);
    }
    let (low, high) = text
        .split_once(':')
        .with_context(|| format!("agreement ramp {text:?} is not LOW:HIGH or off"))?;
    let number = |v: &str| {
        v.trim()
            .parse::<f32>()
            .with_context(|| format!("agreement ramp {text:?}: {v:?} is not a number"))
    };
    let ramp = crate::model::diffusion::AgreementRamp {
        low: number(low)?,
        high: number(high)?,
    };
    ramp.check().map_err(anyhow::Error::msg)?;
    Ok(Some(ramp))
}

impl Sampling {
    /// These settings with those a scan spec names changed: comma-separated `key=value` with the
    /// keys `g` (style guidance), `id` (identity guidance), `st` (encoder style guidance), `x`
    /// (climbs per step), `floor` (fidelity floor), `share` (the floor's largest share), `guard`
    /// (1: the fidelity guard judges the floor, 0: the guided encoder), `agree` (the agreement
    /// ramp, `LOW:HIGH` or `off`), `draws` (draws per candidate) and `snap` (the style snap's
    /// temperature, or `off`), e.g.
    /// `g=0.5,id=60,st=40,x=2,floor=0.7,share=1.5,guard=1,agree=0.6:0.8,draws=4,snap=0`.
    pub fn with(self, spec: &str) -> anyhow::Result<Sampling> {
        let mut s = self;
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .with_context(|| format!("scan spec {spec:?}: {part:?} is not key=value"))?;
            let number = |what: &str| -> anyhow::Result<f32> {
                value.trim().parse::<f32>().with_context(|| {
                    format!("scan spec {spec:?}: {what} {value:?} is not a number")
                })
            };
            let count = |what: &str| -> anyhow::Result<usize> {
                value
                    .trim()
                    .parse::<usize>()
                    .with_context(|| format!("scan spec {spec:?}: {what} {value:?} is not a count"))
            };
            let flag = |what: &str| -> anyhow::Result<bool> {
                match value.trim() {
                    "1" => Ok(true),
                    "0" => Ok(false),
                    _ => anyhow::bail!("scan spec {spec:?}: {what} {value:?} is not 0 or 1"),
                }
            };
            match key.trim() {
                "g" => s.guidance = Some(number("g")?),
                "id" => s.encoder.identity = number("id")?,
                "st" => s.encoder.style = number("st")?,
                "floor" => s.encoder.fidelity_floor = number("floor")?,
                "share" => s.encoder.floor_max_share = number("share")?,
                "agree" => {
                    s.agreement = parse_agreement_ramp(value)
                        .map_err(|e| anyhow::anyhow!("scan spec {spec:?}: {e}"))?
                }
                "guard" => s.guard = flag("guard")?,
                "x" => s.encoder.iters = count("x")?,
                "draws" => s.encoder.draws = count("draws")?,
                "keep" => s.keep_own = flag("keep")?,
                "snap" => {
                    s.snap = match value.trim() {
                        "off" => None,
                        _ => Some(number("snap")?),
                    }
                }
                other => anyhow::bail!(
                    "scan spec {spec:?}: unknown key {other:?} (keys: g, id, st, x, floor, share, guard, agree, draws, snap, keep)"
                ),
            }
        }
        if let Some(g) = s.guidance {
            crate::model::diffusion::check_guidance(g)
                .map_err(|e| anyhow::anyhow!("scan spec {spec:?}: {e}"))?;
        }
        s.encoder
            .check()
            .map_err(|e| anyhow::anyhow!("scan spec {spec:?}: {e}"))?;
        if let Some(t) = s.snap {
            crate::model::diffusion::check_snap_temperature(t)
                .map_err(|e| anyhow::anyhow!("scan spec {spec:?}: {e}"))?;
        }
        Ok(s)
    }
}

/// Runs the preference-level evaluation and writes `OUT/report.md` and `OUT/report.html`.
pub fn run(opts: &EvalOptions, models: &EvalModels) -> anyhow::Result<PreferenceReport> {
    let EvalModels {
        encoder,
        encoder_name,
        ranker,
        judge,
        generator,
        finetuned,
        variants,
    } = *models;
    let manifest = Manifest::load(&opts.data_dir)?;
    let val_sim = simulate(
        &manifest,
        &SimConfig {
            display_split: Split::Val,
            ..opts.sim.clone()
        },
    )?;
    let test_sim = simulate(
        &manifest,
        &SimConfig {
            display_split: Split::Test,
            seed: opts.sim.seed.wrapping_add(1),
            ..opts.sim.clone()
        },
    )?;
    let mut ids = val_sim.item_ids();
    ids.extend(test_sim.item_ids());
    // Prototypes from every train-split drawing of every vendor.
    let vendors: Vec<String> = manifest.vendor_names().map(str::to_string).collect();
    for e in manifest.split(Split::Train) {
        for v in &vendors {
            ids.push(crate::data::simulate::item_id(v, &e.id));
        }
    }
    // Every vendor's drawing of each display's emoji: the candidates of best-of-vendors.
    for d in val_sim.displays.iter().chain(&test_sim.displays) {
        for v in &vendors {
            ids.push(crate::data::simulate::item_id(v, &d.emoji_id));
        }
    }
    ids.sort_unstable();
    ids.dedup();
    let items = embed_items(encoder, &manifest, &opts.data_dir, &ids, true)?;
    let style_from = crate::model::emoji::CONTENT_DIM;
    let prototypes = vendors
        .iter()
        .map(|v| {
            let mut sum = vec![0f32; encoder.config().style_dim];
            for e in manifest.split(Split::Train) {
                let emb = &items[&crate::data::simulate::item_id(v, &e.id)];
                for (s, x) in sum.iter_mut().zip(&emb[style_from..]) {
                    *s += x;
                }
            }
            (v.clone(), sum)
        })
        .collect();
    let emb = Embedded {
        items,
        prototypes,
        style_from,
    };

    let (val_hist, test_hist) = (
        histories(&val_sim, &emb.items),
        histories(&test_sim, &emb.items),
    );
    let base = Params::from_config(&crate::config::PreferenceConfig::default());
    let uniform = Params {
        mode: WeightingMode::Uniform,
        ..base.clone()
    };
    let mut sweep = Vec::new();
    let match_grid = if opts.match_dims.is_empty() {
        vec![0]
    } else {
        opts.match_dims.clone()
    };
    for &match_dims in &match_grid {
        for &k in &opts.ks {
            for &tau in &opts.taus {
                let p = Params {
                    mode: WeightingMode::Retrieval,
                    k,
                    tau,
                    match_dims,
                    ..base.clone()
                };
                sweep.push((
                    k,
                    tau,
                    match_dims,
                    accuracy(&val_sim, &val_hist, &emb, &p).category_dependent,
                ));
            }
        }
    }
    // Ties go to the smaller k, then to matching whole embeddings.
    let &(k, tau, match_dims, _) = sweep
        .iter()
        .max_by(|a, b| a.3.total_cmp(&b.3).then(b.0.cmp(&a.0)).then(b.2.cmp(&a.2)))
        .context("the k/τ grid is empty")?;
    let retrieval = Params {
        mode: WeightingMode::Retrieval,
        k,
        tau,
        match_dims,
        ..base
    };
    let image_only = if ranker.is_some() || judge.is_some() {
        embed_items(encoder, &manifest, &opts.data_dir, &ids, false)?
    } else {
        HashMap::new()
    };
    let ranker_eval = match ranker {
        None => None,
        Some(r) => {
            let pairs = ranker_pairs(
                &test_sim,
                &emb.items,
                &image_only,
                &retrieval,
                opts.sim.seed,
            );
            let (mut pos, mut neg) = (Vec::with_capacity(pairs.n), Vec::with_capacity(pairs.n));
            for i in 0..pairs.n {
                let at = |v: &[f32]| v[i * pairs.dim..(i + 1) * pairs.dim].to_vec();
                let p = at(&pairs.preference);
                let s = r.personalization(&p, &[at(&pairs.positive), at(&pairs.negative)])?;
                pos.push(s[0]);
                neg.push(s[1]);
            }
            let learned = |p: &[f32], reference: &[f32], c: &[Vec<f32>]| -> Vec<f32> {
                r.totals(p, reference, c)
                    .unwrap_or_else(|_| vec![0.0; c.len()])
            };
            let w = r.config().personalization_weight;
            let cosine_total = |p: &[f32], reference: &[f32], c: &[Vec<f32>]| -> Vec<f32> {
                c.iter()
                    .map(|c| w * cosine(c, p) + (1.0 - w) * cosine(c, reference))
                    .collect()
            };
            Some(RankerEval {
                version: r.version().to_string(),
                auc: pairwise_auc(&pos, &neg),
                pairs: pairs.n,
                best_of_vendors: best_of_vendors(
                    &test_sim,
                    &emb.items,
                    &image_only,
                    &retrieval,
                    &learned,
                ),
                cosine_best_of_vendors: best_of_vendors(
                    &test_sim,
                    &emb.items,
                    &image_only,
                    &retrieval,
                    &cosine_total,
                ),
            })
        }
    };
    let (judge_acc, generation) = match judge {
        Some(j) => {
            let passthrough = crate::model::Passthrough;
            let n = opts.best_of.max(1);
            let mut specs = vec![GenerationSpec {
                name: "no personalization (reference passed through)".into(),
                generator: &passthrough,
                params: retrieval.clone(),
                candidates: 1,
            }];
            if let Some(g) = generator {
                specs.push(GenerationSpec {
                    name: "diffusion, uniform weighting".into(),
                    generator: g,
                    params: uniform.clone(),
                    candidates: 1,
                });
                specs.push(GenerationSpec {
                    name: "diffusion, retrieval weighting".into(),
                    generator: g,
                    params: retrieval.clone(),
                    candidates: 1,
                });
                if ranker.is_some() {
                    specs.push(GenerationSpec {
                        name: format!("diffusion, retrieval weighting + ranker best-of-{n}"),
                        generator: g,
                        params: retrieval.clone(),
                        candidates: n,
                    });
                }
            }
            if let Some(g) = finetuned {
                let candidates = if ranker.is_some() { n } else { 1 };
                specs.push(GenerationSpec {
                    name: format!("+ rank-task fine-tuning (retrieval, best-of-{candidates})"),
                    generator: g,
                    params: retrieval.clone(),
                    candidates,
                });
            }
            for (name, g) in variants {
                for (weighting, params) in [("uniform", &uniform), ("retrieval", &retrieval)] {
                    specs.push(GenerationSpec {
                        name: format!("{name}, {weighting} weighting"),
                        generator: *g,
                        params: params.clone(),
                        candidates: 1,
                    });
                }
            }
            let sim = match opts.generation_split {
                Split::Val => &val_sim,
                _ => &test_sim,
            };
            let (acc, rows) = generation_rows(
                sim,
                &manifest,
                &opts.data_dir,
                &emb.items,
                &image_only,
                &retrieval,
                j,
                encoder,
                ranker,
                &specs,
                opts.generation_split,
            )?;
            (Some(acc), rows)
        }
        None => (None, Vec::new()),
    };
    let report = PreferenceReport {
        ranker: ranker_eval,
        judge: judge_acc,
        generation,
        generation_split: opts.generation_split,
        encoder: encoder_name.to_string(),
        k,
        tau,
        match_dims,
        val_uniform: accuracy(&val_sim, &val_hist, &emb, &uniform),
        val_retrieval: accuracy(&val_sim, &val_hist, &emb, &retrieval),
        test_uniform: accuracy(&test_sim, &test_hist, &emb, &uniform),
        test_retrieval: accuracy(&test_sim, &test_hist, &emb, &retrieval),
        sweep,
        sim: opts.sim.clone(),
    };
    std::fs::create_dir_all(&opts.out)?;
    std::fs::write(opts.out.join("report.md"), markdown(&report))?;
    std::fs::write(opts.out.join("report.html"), html(&report))?;
    Ok(report)
}

fn pct(x: f32) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// The report as Markdown.
pub fn markdown(r: &PreferenceReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# EmojiStyle evaluation\n");
    let _ = writeln!(
        s,
        "Encoder `{}`. Simulated users: {} (history {}, {} displays each, {:.0}% global, noise {:.0}%, seed {}).\n",
        r.encoder,
        r.sim.users,
        r.sim.history,
        r.sim.displays,
        100.0 * r.sim.global_share,
        100.0 * r.sim.noise,
        r.sim.seed
    );
    let _ = writeln!(
        s,
        "## Preference level: does the preference vector point at the user's vendor?\n"
    );
    let _ = writeln!(
        s,
        "Retrieval weighting uses k = {}, τ = {}, similarity over {} (chosen on val).\n",
        r.k,
        r.tau,
        match_label(r.match_dims)
    );
    let _ = writeln!(
        s,
        "| split | weighting | category-dependent users | global users | all | displays |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for (split, name, a) in [
        ("test", "uniform", r.test_uniform),
        ("test", "retrieval", r.test_retrieval),
        ("val", "uniform", r.val_uniform),
        ("val", "retrieval", r.val_retrieval),
    ] {
        let _ = writeln!(
            s,
            "| {split} | {name} | {} | {} | {} | {} |",
            pct(a.category_dependent),
            pct(a.global),
            pct(a.all),
            a.displays
        );
    }
    let gain = 100.0 * (r.test_retrieval.category_dependent - r.test_uniform.category_dependent);
    let _ = writeln!(
        s,
        "\nRetrieval − uniform on category-dependent users (test): **{gain:+.1} points** (target ≥ +15).\n"
    );
    if let Some(rk) = &r.ranker {
        let _ = writeln!(s, "## Ranker (`{}`), test population\n", rk.version);
        let _ = writeln!(
            s,
            "Pairwise AUC on held-out interactions (engaged drawing vs the same emoji by another vendor): **{:.3}** over {} pairs.\n",
            rk.auc, rk.pairs
        );
        let _ = writeln!(
            s,
            "Best of vendors: the ranker picks among the display's emoji drawn by every vendor.\n"
        );
        let _ = writeln!(
            s,
            "| ranker | category-dependent users | global users | all | displays |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|");
        for (name, a) in [
            ("learned", rk.best_of_vendors),
            ("cosine baseline", rk.cosine_best_of_vendors),
        ] {
            let _ = writeln!(
                s,
                "| {name} | {} | {} | {} | {} |",
                pct(a.category_dependent),
                pct(a.global),
                pct(a.all),
                a.displays
            );
        }
        let _ = writeln!(s);
    }
    if let Some(j) = &r.judge {
        let split = r.generation_split.as_str();
        let _ = writeln!(s, "## Generation, {split} displays\n");
        let _ = writeln!(
            s,
            "Judges (an encoder trained in a separate run): on the {} ground-truth drawings, style {}, identity {}, text agreement {}.\n",
            j.images,
            pct(j.style),
            pct(j.identity),
            pct(j.text_agreement)
        );
        let _ = writeln!(s, "| setting | style, category-dependent | style, global | style, all | identity | text agreement | SSIM to truth | cosine to truth | ranker score | history similarity | s/image (this CPU) |");
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
        for g in &r.generation {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {:.3} | {:.3} | {} | {:.3} | {:.4} |",
                g.name,
                pct(g.style.category_dependent),
                pct(g.style.global),
                pct(g.style.all),
                pct(g.identity),
                pct(g.text_agreement),
                g.ssim,
                g.truth_cosine,
                g.ranker_score.map_or("–".into(), |x| format!("{x:.3}")),
                g.history_similarity,
                g.seconds_per_image
            );
        }
        let _ = writeln!(
            s,
            "\nStyle: the judge's vendor is the user's for the category. Identity: the judge's content is nearest to the reference emoji's (mean over vendors) among every {split} emoji; text agreement: nearest to its name. Ranker score: σ(personalization) against the retrieval-weighted preference. History similarity: mean cosine to the user's history drawings (CIS-style)."
        );
        let _ = writeln!(s);
    }
    let _ = writeln!(
        s,
        "### k, τ and similarity on val (category-dependent users)\n"
    );
    let _ = writeln!(s, "| k | τ | similarity over | accuracy |");
    let _ = writeln!(s, "|---|---|---|---|");
    for (k, tau, m, a) in &r.sweep {
        let _ = writeln!(s, "| {k} | {tau} | {} | {} |", match_label(*m), pct(*a));
    }
    s
}

fn match_label(match_dims: usize) -> String {
    match match_dims {
        0 => "whole embeddings".into(),
        m => format!("the first {m} values"),
    }
}

/// Text made safe for HTML content and attribute values.
pub(crate) fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The report as a standalone HTML page (the Markdown's tables, rendered).
pub fn html(r: &PreferenceReport) -> String {
    let md = markdown(r);
    let mut body = String::new();
    let mut in_table = false;
    for line in md.lines() {
        if line.starts_with('|') {
            if line.starts_with("|---") {
                continue;
            }
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            if !in_table {
                body.push_str("<table>\n<tr>");
                for c in &cells {
                    let _ = write!(body, "<th>{}</th>", html_escape(c));
                }
                body.push_str("</tr>\n");
                in_table = true;
            } else {
                body.push_str("<tr>");
                for c in &cells {
                    let _ = write!(body, "<td>{}</td>", html_escape(c));
                }
                body.push_str("</tr>\n");
            }
            continue;
        }
        if in_table {
            body.push_str("</table>\n");
            in_table = false;
        }
        if let Some(h) = line.strip_prefix("### ") {
            let _ = writeln!(body, "<h3>{}</h3>", html_escape(h));
        } else if let Some(h) = line.strip_prefix("## ") {
            let _ = writeln!(body, "<h2>{}</h2>", html_escape(h));
        } else if let Some(h) = line.strip_prefix("# ") {
            let _ = writeln!(body, "<h1>{}</h1>", html_escape(h));
        } else if !line.trim().is_empty() {
            let _ = writeln!(body, "<p>{}</p>", html_escape(line).replace("**", ""));
        }
    }
    if in_table {
        body.push_str("</table>\n");
    }
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>EmojiStyle evaluation</title>\
         <style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}</style></head><body>\n{body}</body></html>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_vendor_by_cosine() {
        let protos = vec![
            ("a".to_string(), vec![1.0, 0.0]),
            ("b".to_string(), vec![0.0, 3.0]),
        ];
        assert_eq!(nearest_vendor(&[0.2, 0.9], &protos), "b");
        assert_eq!(nearest_vendor(&[0.9, 0.2], &protos), "a");
    }

    #[test]
    fn scan_specs_change_only_what_they_name_and_refuse_bad_values() {
        use crate::model::diffusion::EncoderScales;
        let base = Sampling {
            guidance: None,
            encoder: EncoderScales {
                identity: 40.0,
                ..Default::default()
            },
            guard: false,
            agreement: None,
            snap: None,
            keep_own: false,
        };
        let s = base
            .with("g=0.5, st=40,x=2,floor=0.7,share=1.5,guard=1,agree=0.6:0.8,draws=4,snap=0.05")
            .unwrap();
        assert!(s.guard);
        assert_eq!(s.snap, Some(0.05));
        assert_eq!(s.with("snap=off").unwrap().snap, None);
        assert_eq!(
            s.agreement,
            Some(crate::model::diffusion::AgreementRamp {
                low: 0.6,
                high: 0.8
            })
        );
        assert_eq!(s.with("agree=off").unwrap().agreement, None);
        assert_eq!(s.guidance, Some(0.5));
        assert_eq!(
            s.encoder,
            EncoderScales {
                identity: 40.0,
                style: 40.0,
                iters: 2,
                fidelity_floor: 0.7,
                floor_max_share: 1.5,
                draws: 4
            }
        );
        assert_eq!(base.with("").unwrap(), base);
        for (spec, says) in [
            ("id", "not key=value"),
            ("id=many", "not a number"),
            ("x=1.5", "not a count"),
            ("speed=2", "unknown key"),
            ("floor=1", "fidelity floor"),
            ("x=0", "1..=16"),
            ("share=0.5", "largest share"),
            ("guard=yes", "not 0 or 1"),
            ("agree=0.6", "LOW:HIGH"),
            ("agree=0.8:0.6", "low < high"),
            ("agree=a:1", "not a number"),
            ("draws=0", "draws per candidate"),
            ("draws=2.5", "not a count"),
            ("snap=2", "snap temperature"),
            ("snap=near", "not a number"),
        ] {
            let e = base.with(spec).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains(spec), "{spec}: {e}");
        }
    }

    /// End to end on a tiny synthetic data set with an untrained encoder: it runs, sweeps the
    /// grid, and writes both reports with sane figures.
    #[test]
    fn smoke_on_a_tiny_subset() {
        use crate::data::simulate::testdata;
        let dir = tempfile::tempdir().unwrap();
        let m = testdata::dataset(dir.path(), 16);
        let bundle = dir.path().join("enc");
        testdata::tiny_encoder(&bundle, &m, 16);
        let encoder = EmojiEncoder::load(&bundle, None).unwrap();
        let opts = EvalOptions {
            data_dir: dir.path().to_path_buf(),
            out: dir.path().join("report"),
            sim: SimConfig {
                users: 12,
                history: 20,
                displays: 2,
                ..SimConfig::default()
            },
            ks: vec![4, 8],
            taus: vec![0.1],
            match_dims: vec![0, 384],
            best_of: 2,
            generation_split: Split::Test,
        };
        let r = run(
            &opts,
            &EvalModels {
                encoder: &encoder,
                encoder_name: "tiny",
                ranker: None,
                judge: None,
                generator: None,
                finetuned: None,
                variants: &[],
            },
        )
        .unwrap();
        assert_eq!(r.sweep.len(), 4);
        assert_eq!(r.test_uniform.displays, 24);
        for a in [
            r.val_uniform,
            r.val_retrieval,
            r.test_uniform,
            r.test_retrieval,
        ] {
            assert!((0.0..=1.0).contains(&a.all));
        }
        assert!(std::fs::read_to_string(opts.out.join("report.md"))
            .unwrap()
            .contains("| test | retrieval |"));
        assert!(opts.out.join("report.html").is_file());
    }

    #[test]
    fn reports_render_every_row() {
        let a = Accuracy {
            category_dependent: 0.5,
            global: 0.9,
            all: 0.6,
            displays: 10,
        };
        let r = PreferenceReport {
            encoder: "e".into(),
            k: 8,
            tau: 0.1,
            match_dims: 0,
            sweep: vec![(8, 0.1, 0, 0.5), (8, 0.1, 384, 0.6)],
            val_uniform: a,
            val_retrieval: a,
            test_uniform: a,
            test_retrieval: Accuracy {
                category_dependent: 0.7,
                ..a
            },
            sim: SimConfig::default(),
            ranker: None,
            judge: Some(JudgeAccuracy {
                style: 0.8,
                identity: 0.9,
                text_agreement: 0.2,
                images: 10,
            }),
            generation: vec![GenerationRow {
                name: "diffusion <retrieval>".into(),
                style: a,
                identity: 0.85,
                text_agreement: 0.15,
                ssim: 0.5,
                truth_cosine: 0.75,
                ranker_score: None,
                history_similarity: 0.4,
                seconds_per_image: 0.01,
            }],
            generation_split: Split::Val,
        };
        let md = markdown(&r);
        assert!(md.contains("## Generation, val displays"), "{md}");
        assert!(md.contains("+20.0 points"), "{md}");
        assert_eq!(md.lines().filter(|l| l.starts_with("| test")).count(), 2);
        assert!(
            md.contains("| 85.0% | 15.0% | 0.500 | 0.750 | – | 0.400 |"),
            "{md}"
        );
        let page = html(&r);
        assert_eq!(page.matches("<table>").count(), 3);
        assert!(page.contains("<td>70.0%</td>"));
        assert!(page.contains("diffusion &lt;retrieval&gt;"));
    }
}
