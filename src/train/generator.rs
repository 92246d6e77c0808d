//! `ragar train generator`: the EmojiStyle diffusion generator ([`crate::model::diffusion`]).
//!
//! **Denoising.** A training example is one train-split emoji `e`, a source vendor `a` (the
//! reference) and a target vendor `b` (the ground truth): the residual `x₀ = image(e, b) −
//! image(e, a)` is noised to `x_t = √ᾱ(t)·x₀ + √(1−ᾱ(t))·ε` with `t ~ U(0, 1)` and the network
//! predicts `x₀` from (reference, `x_t`, style, t) under a squared loss (the posterior mean: under L1
//! the median residual, mostly zero, keeps the reference unchanged). Half the examples take `t = 1`,
//! where sampling starts and the prediction is the deterministic estimate. The style condition is what
//! serving will give it: the normalized mean style block (from the item encoder) of 1 to 8 *other*
//! train emoji drawn by `b` (each, with probability [`STYLE_NOISE`], by a random vendor instead), as
//! a weighted history of the user's vendor would be.
//!
//! **Content term** (`--content-weight w > 0`). The denoising loss learns the vendor's residual,
//! but nothing in it says which changes cost the emoji its identity. This term adds, for the first
//! [`CONTENT_ROWS`] examples of each batch, `w · (1 − cos(content(reference + x̂₀), c(e)))`: the
//! item encoder's content of the redraw the prediction implies, held to `c(e)`, the emoji's
//! normalized mean content over its vendors' drawings (what identity is measured against). The
//! encoder is frozen; only the generator learns from it.
//!
//! **Rank-task fine-tuning** (`--finetune-from BUNDLE`). Starting from a trained bundle, each step
//! adds to the denoising loss (weight 1, which keeps the model on the data) two terms on a full
//! `steps`-step sample from noise, differentiated through the sampler, the item encoder and the
//! ranker:
//! - `rank_weight · softplus(−s(p, c))`: the learned ranker's personalization score of the
//!   sample's image-only embedding `c` against a preference `p = normalize([cw · content(ref),
//!   sw · style])` (what the reference depicts, in the condition's style), raised;
//! - `fidelity_weight · (1 − cos(content(sample), content(reference)))`: what is drawn stays
//!   the reference.
//!
//! Every epoch, val-split emoji are redrawn from another vendor into each vendor's style (the
//! vendor's train prototype as the condition, `steps` sampling steps, fixed seeds): `curves.csv`
//! records the mean L1 to the ground truth, how often the item encoder's vendor head sees the
//! target vendor in the result, and how often its content is nearest to its own emoji (identity).
//!
//! **What ships.** With `--ema-decay d > 0`, val measures and the bundle holds an exponential
//! moving average of the weights ([`Ema`]), as diffusion models are often shipped: the last
//! step's weights of this small model redraw noticeably differently from one epoch to the next
//! (val style 42% after epoch 9, 30% after epoch 10), the average rises steadily.
//! `checkpoint/ema.safetensors` keeps it for `--resume`. With `d = 0` (the default) the bundle is
//! the last weights.

use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{optimizer, progress_bar, split_images, Curve, Ema, Run};
use crate::data::{EmojiEntry, Manifest, Split};
use crate::model::diffusion::{
    alpha_bar, seeded_noise, tensor_to_images, GeneratorConfig, StyleNet,
};
use crate::model::emoji::{argmax_rows, images_to_tensor, load_bundle, EmojiEncoder, CONTENT_DIM};
use crate::model::minilm::l2_normalize;
use crate::model::ranker::{RankerConfig, RankerNet};
use crate::model::Image;

#[derive(Debug, Clone)]
pub struct GeneratorTraining {
    pub data_dir: PathBuf,
    /// The item encoder whose style block conditions the generator (and, when fine-tuning,
    /// embeds the samples for the ranker).
    pub encoder_dir: PathBuf,
    pub out: PathBuf,
    /// Width of the full-resolution blocks.
    pub channels: usize,
    /// Sampling steps: written to the bundle as its default; used by val and fine-tuning.
    pub steps: usize,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    /// Decay of the weights' moving average ([`Ema`]) that val measures and the bundle ships;
    /// 0 ships the last weights.
    pub ema_decay: f64,
    /// Weight of the content term of training from scratch (see the module header); 0 leaves
    /// it out.
    pub content_weight: f64,
    pub seed: u64,
    pub resume: bool,
    pub progress: bool,
    /// Use only the first `limit` emoji of each split (smoke runs and tests).
    pub limit: Option<usize>,
    pub finetune: Option<FineTune>,
}

/// Rank-task fine-tuning of a trained bundle.
#[derive(Debug, Clone)]
pub struct FineTune {
    pub from: PathBuf,
    pub ranker_dir: PathBuf,
    pub rank_weight: f64,
    pub fidelity_weight: f64,
    /// The preference the ranker term scores the samples against.
    pub preference: RankPreference,
}

/// The preference `p` of the fine-tuning's ranker term.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RankPreference {
    /// `normalize([cw · content(reference), sw · style])`: the reference's subject in the
    /// condition's style.
    Reference,
    /// The normalized mean image embedding of the drawings the style condition was taken from:
    /// a history of the user's vendor, as serving weighs one.
    History,
}

impl RankPreference {
    /// Its command-line name (clap's).
    pub fn name(self) -> String {
        use clap::ValueEnum;
        self.to_possible_value()
            .map_or_else(String::new, |v| v.get_name().to_string())
    }
}

/// One line of the generator's `curves.csv`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GeneratorEpoch {
    pub epoch: usize,
    pub train_loss: f32,
    /// Mean absolute pixel error (in [-1, 1] units) of val redraws against the ground truth.
    pub val_l1: f32,
    /// Share of val redraws the encoder's vendor head assigns to the target vendor.
    pub val_style_acc: f32,
    /// Share of val redraws whose content (the encoder's) is nearest to their own emoji's among
    /// the val emoji (each the mean over its vendors' drawings).
    #[serde(default)]
    pub val_identity: f32,
}

impl Curve for GeneratorEpoch {
    const HEADER: &'static str = "epoch,train_loss,val_l1,val_style_acc,val_identity";
    fn csv(&self) -> String {
        format!(
            "{},{:.5},{:.5},{:.4},{:.4}",
            self.epoch, self.train_loss, self.val_l1, self.val_style_acc, self.val_identity
        )
    }
}

/// Val emoji redrawn per epoch at most.
const VAL_EMOJI: usize = 96;
/// Examples of each batch that the content term looks at: the encoder's backward pass costs far
/// more than the generator's, so a quarter of a default batch keeps an epoch under twice as long.
const CONTENT_ROWS: usize = 8;
/// Share of the condition's drawings taken from a random vendor (a history is never pure).
const STYLE_NOISE: f32 = 0.15;

/// A split's drawings as a tensor (emoji `i` by vendor `v` at row `i * vendors + v`) and their
/// normalized style blocks.
struct Drawings {
    images: Tensor,
    styles: Vec<Vec<f32>>,
    n: usize,
}

fn drawings(
    manifest: &Manifest,
    opts: &GeneratorTraining,
    entries: &[&EmojiEntry],
    encoder: &EmojiEncoder,
    res: u32,
    device: &Device,
) -> anyhow::Result<Drawings> {
    let images = split_images(manifest, &opts.data_dir, entries, res)?;
    let refs: Vec<&Image> = images.iter().collect();
    Ok(Drawings {
        images: images_to_tensor(&refs, res, device)?,
        styles: encoder.styles(&refs)?,
        n: entries.len(),
    })
}

/// `[n, 384]`: each emoji's normalized mean content (the encoder's) over its vendors' drawings,
/// what a redraw's content is matched against for identity.
fn identities(encoder: &EmojiEncoder, d: &Drawings, nv: usize) -> candle_core::Result<Tensor> {
    let content = content_of(encoder, &d.images)?;
    l2_normalize(&content.reshape((d.n, nv, CONTENT_DIM))?.mean(1)?)
}

/// Each image's embedding (the encoder's, image only), in chunks.
fn image_embeddings(encoder: &EmojiEncoder, images: &Tensor) -> anyhow::Result<Vec<Vec<f32>>> {
    let n = images.dim(0)?;
    let mut out = Vec::with_capacity(n);
    for start in (0..n).step_by(256) {
        let len = 256.min(n - start);
        let (emb, _) = encoder
            .net()
            .image_embedding(&images.narrow(0, start, len)?)?;
        out.extend(emb.to_vec2::<f32>()?);
    }
    Ok(out)
}

/// `[b, 384]`: the encoder's normalized content of a batch of images (differentiable).
fn content_of(encoder: &EmojiEncoder, images: &Tensor) -> candle_core::Result<Tensor> {
    l2_normalize(&encoder.net().forward(images)?.content)
}

/// Each vendor's prototype: the normalized mean of its drawings' style blocks (`styles` holds
/// emoji `e` by vendor `v` at `e * vendors + v`). What the generator's val redraws are
/// conditioned on, and its bundle's style codebook.
fn vendor_prototypes(styles: &[Vec<f32>], vendors: usize, style_dim: usize) -> Vec<Vec<f32>> {
    let n = styles.len() / vendors.max(1);
    (0..vendors)
        .map(|v| normalized_sum((0..n).map(|e| &styles[e * vendors + v]), style_dim))
        .collect()
}

/// Whether `config` reads the embeddings `encoder` (in `dir`) makes: their length, where the
/// style block lies, and the resolution.
fn check_encoder_fits(
    config: &GeneratorConfig,
    encoder: &crate::model::emoji::EmojiEncoderConfig,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    if config.embedding_dim != encoder.dim()
        || config.resolution != encoder.resolution
        || config.style_offset != CONTENT_DIM
        || config.style_dim != encoder.style_dim
    {
        bail!(
            "the generator reads {}-value embeddings (style block {}..{}) at {}px, the encoder in {} makes {} values (style block {}..{}) at {}px",
            config.embedding_dim,
            config.style_offset,
            config.style_offset + config.style_dim,
            config.resolution,
            dir.display(),
            encoder.dim(),
            CONTENT_DIM,
            CONTENT_DIM + encoder.style_dim,
            encoder.resolution
        );
    }
    Ok(())
}

/// The style codebook of a generator conditioned on `encoder`: every vendor's prototype over the
/// whole train split.
fn train_codebook(
    manifest: &Manifest,
    data_dir: &std::path::Path,
    encoder: &EmojiEncoder,
) -> anyhow::Result<Vec<Vec<f32>>> {
    let entries: Vec<&EmojiEntry> = manifest.split(Split::Train).collect();
    let ecfg = encoder.config();
    let images = split_images(manifest, data_dir, &entries, ecfg.resolution)?;
    let refs: Vec<&Image> = images.iter().collect();
    let styles = encoder.styles(&refs)?;
    Ok(vendor_prototypes(
        &styles,
        manifest.vendors.len(),
        ecfg.style_dim,
    ))
}

/// Writes the style codebook (every vendor's prototype over the train split, read by the
/// encoder in `encoder_dir`, which must be the one the bundle was trained with: its provenance
/// names it) into the generator bundle `bundle`'s `config.json`, leaving its weights as they
/// are: for bundles trained before the codebook was part of one. Returns the number of entries.
pub fn write_codebook(
    data_dir: &std::path::Path,
    encoder_dir: &std::path::Path,
    bundle: &std::path::Path,
) -> anyhow::Result<usize> {
    let path = bundle.join("config.json");
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut config: GeneratorConfig =
        serde_json::from_slice(&bytes).with_context(|| path.display().to_string())?;
    let manifest = Manifest::load(data_dir)?;
    let encoder = EmojiEncoder::load(encoder_dir, None)?;
    check_encoder_fits(&config, encoder.config(), encoder_dir)
        .with_context(|| bundle.display().to_string())?;
    config.style_codebook = train_codebook(&manifest, data_dir, &encoder)?;
    std::fs::write(&path, serde_json::to_vec_pretty(&config)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(config.style_codebook.len())
}

fn normalized_sum<'a>(rows: impl Iterator<Item = &'a Vec<f32>>, dim: usize) -> Vec<f32> {
    let mut sum = vec![0f32; dim];
    for r in rows {
        sum.iter_mut().zip(r).for_each(|(s, x)| *s += x);
    }
    let norm = sum.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    sum.iter_mut().for_each(|x| *x /= norm);
    sum
}

/// The ranker and encoder terms of the fine-tuning loss.
struct RankTerms<'a> {
    encoder: &'a EmojiEncoder,
    ranker: RankerNet,
    rank_weight: f64,
    fidelity_weight: f64,
}

impl RankTerms<'_> {
    /// `history`: the preference rows of [`RankPreference::History`]; without them the
    /// preference is [`RankPreference::Reference`]'s.
    fn loss(
        &self,
        net: &StyleNet,
        reference: &Tensor,
        style: &Tensor,
        history: Option<Tensor>,
        noise: Tensor,
        steps: usize,
    ) -> anyhow::Result<Tensor> {
        let enc = self.encoder.net();
        let ecfg = &enc.config;
        let sample = net.sample(reference, style, noise, steps, None)?;
        let (emb, content) = enc.image_embedding(&sample)?;
        let (_, ref_content) = enc.image_embedding(reference)?;
        let ref_content = ref_content.detach();
        let p = match history {
            Some(p) => p,
            None => l2_normalize(&Tensor::cat(
                &[
                    (&ref_content * ecfg.content_weight as f64)?,
                    (style * ecfg.style_weight as f64)?,
                ],
                1,
            )?)?,
        };
        let s = self.ranker.personalization(&p, &emb)?;
        // softplus(−s), stably.
        let rank = (s.neg()?.relu()? + (s.abs()?.neg()?.exp()? + 1.0)?.log()?)?.mean_all()?;
        let fidelity = ((content * &ref_content)?.sum(1)?.neg()? + 1.0)?.mean_all()?;
        Ok(((rank * self.rank_weight)? + (fidelity * self.fidelity_weight)?)?)
    }
}

/// Trains (or resumes, or fine-tunes) and writes the bundle; returns the per-epoch figures.
pub fn train_generator(opts: &GeneratorTraining) -> anyhow::Result<Vec<GeneratorEpoch>> {
    let device = Device::cuda_if_available(0)?;
    let manifest = Manifest::load(&opts.data_dir)?;
    let encoder = EmojiEncoder::load_on(&opts.encoder_dir, None, device.clone())?;
    let ecfg = encoder.config().clone();
    let res = ecfg.resolution;
    if !manifest.resolutions.contains(&res) {
        bail!(
            "the data set has no {res}px images (built: {:?}): run `ragar data build --resolution {res}`",
            manifest.resolutions
        );
    }
    let take = |split: Split| -> Vec<&EmojiEntry> {
        let all: Vec<&EmojiEntry> = manifest.split(split).collect();
        match opts.limit {
            Some(n) => all.into_iter().take(n).collect(),
            None => all,
        }
    };
    let (train_entries, val_entries) = (take(Split::Train), take(Split::Val));
    if train_entries.len() < 2 || val_entries.is_empty() {
        bail!("the data set has too few train or val emoji");
    }
    let nv = manifest.vendors.len();
    let sd = ecfg.style_dim;
    let train = drawings(&manifest, opts, &train_entries, &encoder, res, &device)?;
    let val_entries: Vec<&EmojiEntry> = val_entries.into_iter().take(VAL_EMOJI).collect();
    let val = drawings(&manifest, opts, &val_entries, &encoder, res, &device)?;
    let val_identities = identities(&encoder, &val, nv)?;
    let train_identities = match opts.content_weight > 0.0 {
        true => Some(identities(&encoder, &train, nv)?),
        false => None,
    };
    // The history preference's rows: each train drawing's image embedding.
    let train_embeddings = match &opts.finetune {
        Some(ft) if ft.preference == RankPreference::History => {
            Some(image_embeddings(&encoder, &train.images)?)
        }
        _ => None,
    };
    let prototypes = vendor_prototypes(&train.styles, nv, sd);

    let (mut config, rank_terms) = match &opts.finetune {
        None => (
            GeneratorConfig {
                channels: opts.channels,
                steps: opts.steps,
                ..GeneratorConfig::new(res, ecfg.dim(), CONTENT_DIM, sd)
            },
            None,
        ),
        Some(ft) => {
            let bytes = std::fs::read(ft.from.join("config.json"))
                .with_context(|| format!("reading {}/config.json", ft.from.display()))?;
            let mut config: GeneratorConfig = serde_json::from_slice(&bytes)?;
            config.steps = opts.steps;
            let (rcfg, vb) = load_bundle::<RankerConfig>(&ft.ranker_dir, &device)?;
            if rcfg.dim != ecfg.dim() {
                bail!(
                    "the ranker in {} reads {}-value embeddings, the encoder gives {}",
                    ft.ranker_dir.display(),
                    rcfg.dim,
                    ecfg.dim()
                );
            }
            let ranker = RankerNet::new(rcfg, vb)?;
            (
                config,
                Some(RankTerms {
                    encoder: &encoder,
                    ranker,
                    rank_weight: ft.rank_weight,
                    fidelity_weight: ft.fidelity_weight,
                }),
            )
        }
    };
    check_encoder_fits(&config, &ecfg, &opts.encoder_dir)?;
    // The styles it is trained to draw (the style snap's and the own-style gate's codebook):
    // over the whole train split, whatever `--limit` says; a fine-tuned bundle keeps its
    // source's.
    if opts.finetune.is_none() || config.style_codebook.is_empty() {
        config.style_codebook = match opts.limit {
            None => prototypes.clone(),
            Some(_) => train_codebook(&manifest, &opts.data_dir, &encoder)?,
        };
    }
    config.provenance = match &opts.finetune {
        None => format!(
            "ragar train generator --channels {} --steps {} --epochs {} --batch {} --lr {} --ema-decay {} --content-weight {} --seed {}{} (encoder {}; data: emojistyle split seed {})",
            opts.channels, opts.steps, opts.epochs, opts.batch, opts.lr, opts.ema_decay, opts.content_weight, opts.seed,
            opts.limit.map_or(String::new(), |n| format!(" --limit {n}")),
            opts.encoder_dir.display(), manifest.seed
        ),
        Some(ft) => format!(
            "ragar train generator --finetune-from {} --ranker-dir {} --rank-weight {} --fidelity-weight {} --rank-preference {} --steps {} --epochs {} --batch {} --lr {} --ema-decay {} --content-weight {} --seed {}{} (encoder {}; data: emojistyle split seed {})",
            ft.from.display(), ft.ranker_dir.display(), ft.rank_weight, ft.fidelity_weight,
            ft.preference.name(),
            opts.steps, opts.epochs, opts.batch, opts.lr, opts.ema_decay, opts.content_weight, opts.seed,
            opts.limit.map_or(String::new(), |n| format!(" --limit {n}")),
            opts.encoder_dir.display(), manifest.seed
        ),
    };

    let mut varmap = VarMap::new();
    let net = StyleNet::new(
        config.clone(),
        VarBuilder::from_varmap(&varmap, DType::F32, &device),
    )?;
    let mut run = Run::<GeneratorEpoch>::start(&opts.out, &mut varmap, opts.seed, opts.resume)?;
    if let (Some(ft), 0) = (&opts.finetune, run.epochs_done()) {
        varmap
            .load(ft.from.join("model.safetensors"))
            .with_context(|| format!("loading {}/model.safetensors", ft.from.display()))?;
    }
    let mut opt = optimizer(&varmap, opts.lr)?;
    let ema_path = opts.out.join("checkpoint").join("ema.safetensors");
    let mut ema = match opts.ema_decay > 0.0 {
        false => None,
        true if run.epochs_done() > 0 && ema_path.is_file() => {
            Some(Ema::load(&varmap, opts.ema_decay, &ema_path)?)
        }
        true => Some(Ema::new(&varmap, opts.ema_decay)?),
    };

    let swap = |ema: &mut Option<Ema>| ema.as_mut().map_or(Ok(()), |e| e.swap(&varmap));

    let r = res as usize;
    let batch = opts.batch.max(1);
    let examples: Vec<(u32, u32)> = (0..train.n as u32)
        .flat_map(|e| (0..nv as u32).map(move |b| (e, b)))
        .collect();
    let steps_per_epoch = examples.len().div_ceil(batch);
    let bar = progress_bar(
        opts.progress,
        opts.epochs.saturating_sub(run.epochs_done()) * steps_per_epoch,
        "train generator",
    );
    for epoch in run.epochs_done()..opts.epochs {
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ ((epoch as u64 + 1) << 32));
        let mut order = examples.clone();
        order.shuffle(&mut rng);
        let (mut loss_sum, mut steps) = (0f32, 0usize);
        for chunk in order.chunks(batch) {
            let n = chunk.len();
            let mut ref_rows = Vec::with_capacity(n);
            let mut target_rows = Vec::with_capacity(n);
            let mut style = Vec::with_capacity(n * sd);
            let mut scale_x = Vec::with_capacity(n);
            let mut scale_e = Vec::with_capacity(n);
            let mut times = Vec::with_capacity(n);
            let mut history = Vec::new();
            for &(e, b) in chunk {
                let a = rng.random_range(0..nv as u32);
                ref_rows.push(e * nv as u32 + a);
                target_rows.push(e * nv as u32 + b);
                let m = rng.random_range(1..=8usize);
                let others: Vec<usize> = (0..m)
                    .map(|_| {
                        let o = rng.random_range(0..train.n - 1);
                        let o = if o >= e as usize { o + 1 } else { o };
                        // A history holds some drawings by other vendors too.
                        let v = if rng.random::<f32>() < STYLE_NOISE {
                            rng.random_range(0..nv)
                        } else {
                            b as usize
                        };
                        o * nv + v
                    })
                    .collect();
                style.extend(normalized_sum(
                    others.iter().map(|&row| &train.styles[row]),
                    sd,
                ));
                if let Some(embeddings) = &train_embeddings {
                    history.extend(normalized_sum(
                        others.iter().map(|&row| &embeddings[row]),
                        ecfg.dim(),
                    ));
                }
                // Half the examples at t = 1, where sampling starts from pure noise and the
                // prediction is the model's deterministic estimate; the rest uniform.
                let t: f64 = if rng.random::<bool>() {
                    1.0
                } else {
                    rng.random()
                };
                let ab = alpha_bar(t);
                scale_x.push(ab.sqrt() as f32);
                scale_e.push((1.0 - ab).sqrt() as f32);
                times.push(t as f32);
            }
            let noise: Vec<f32> = seeded_noise(rng.random(), n * 3 * r * r);
            let noise = Tensor::from_vec(noise, (n, 3, r, r), &device)?;
            let reference = train
                .images
                .index_select(&Tensor::new(ref_rows, &device)?, 0)?;
            let target = train
                .images
                .index_select(&Tensor::new(target_rows, &device)?, 0)?;
            let residual = (&target - &reference)?;
            let sx = Tensor::from_vec(scale_x, (n, 1, 1, 1), &device)?;
            let se = Tensor::from_vec(scale_e, (n, 1, 1, 1), &device)?;
            let x_t = (residual.broadcast_mul(&sx)? + noise.broadcast_mul(&se)?)?;
            let style = Tensor::from_vec(style, (n, sd), &device)?;
            let t = Tensor::from_vec(times, n, &device)?;
            let pred = net.forward(&reference, &x_t, &style, &t)?;
            let mut loss = (&pred - &residual)?.sqr()?.mean_all()?;
            if let Some(ids) = &train_identities {
                let k = n.min(CONTENT_ROWS);
                let redraw =
                    (reference.narrow(0, 0, k)? + pred.narrow(0, 0, k)?)?.clamp(-1f32, 1f32)?;
                let content = content_of(&encoder, &redraw)?;
                let emoji: Vec<u32> = chunk[..k].iter().map(|&(e, _)| e).collect();
                let target = ids.index_select(&Tensor::new(emoji, &device)?, 0)?;
                let cos = (content * target)?.sum(1)?;
                loss = (loss + ((cos.neg()? + 1.0)?.mean_all()? * opts.content_weight)?)?;
            }
            if let Some(terms) = &rank_terms {
                let noise = Tensor::from_vec(
                    seeded_noise(rng.random(), n * 3 * r * r),
                    (n, 3, r, r),
                    &device,
                )?;
                let history = match train_embeddings {
                    Some(_) => Some(Tensor::from_vec(history, (n, ecfg.dim()), &device)?),
                    None => None,
                };
                let terms = terms.loss(&net, &reference, &style, history, noise, config.steps)?;
                loss = (loss + terms)?;
            }
            opt.backward_step(&loss)?;
            if let Some(ema) = &mut ema {
                ema.update(&varmap)?;
            }
            loss_sum += loss.to_scalar::<f32>()?;
            steps += 1;
            bar.inc(1);
        }
        // Val measures the weights a bundle of this epoch would ship: the average, if kept.
        swap(&mut ema)?;
        let measured = evaluate(
            &net,
            &val,
            &val_identities,
            &prototypes,
            &encoder,
            config.steps,
            opts.seed,
            &device,
        );
        swap(&mut ema)?;
        let (val_l1, val_style_acc, val_identity) = measured?;
        let stats = GeneratorEpoch {
            epoch: epoch + 1,
            train_loss: loss_sum / steps.max(1) as f32,
            val_l1,
            val_style_acc,
            val_identity,
        };
        bar.set_message(format!(
            "epoch {} loss {:.4} val L1 {:.4} style {:.3} identity {:.3}",
            stats.epoch, stats.train_loss, val_l1, val_style_acc, val_identity
        ));
        // The average, before state.json names the epoch done.
        if let Some(ema) = &ema {
            ema.save(&ema_path)?;
        }
        run.epoch_done(&varmap, stats)?;
    }
    bar.finish();
    // The bundle holds what val measured.
    swap(&mut ema)?;
    run.finish(&varmap, &config)
}

/// Val redraws: every val emoji from another vendor into each vendor's style (its prototype as
/// the condition); mean L1 to the ground truth, the encoder's vendor agreement and identity
/// (the redraw's content nearest to its emoji's row of `identities`).
#[allow(clippy::too_many_arguments)]
fn evaluate(
    net: &StyleNet,
    val: &Drawings,
    identities: &Tensor,
    prototypes: &[Vec<f32>],
    encoder: &EmojiEncoder,
    steps: usize,
    seed: u64,
    device: &Device,
) -> anyhow::Result<(f32, f32, f32)> {
    let nv = prototypes.len();
    let r = net.config.resolution as usize;
    let sd = net.config.style_dim;
    let cases: Vec<(usize, usize, usize)> = (0..val.n)
        .flat_map(|e| {
            (0..nv).map(move |b| {
                let a = if nv > 1 {
                    (b + 1 + e % (nv - 1)) % nv
                } else {
                    b
                };
                (e, a, b)
            })
        })
        .collect();
    let (mut l1_sum, mut style_ok, mut identity_ok) = (0f64, 0usize, 0usize);
    for chunk in cases.chunks(128) {
        let n = chunk.len();
        let rows = |f: &dyn Fn(&(usize, usize, usize)) -> usize| -> candle_core::Result<Tensor> {
            let idx: Vec<u32> = chunk.iter().map(|c| f(c) as u32).collect();
            val.images.index_select(&Tensor::new(idx, device)?, 0)
        };
        let reference = rows(&|&(e, a, _)| e * nv + a)?;
        let target = rows(&|&(e, _, b)| e * nv + b)?;
        let style: Vec<f32> = chunk.iter().flat_map(|c| prototypes[c.2].clone()).collect();
        let style = Tensor::from_vec(style, (n, sd), device)?;
        let noise: Vec<f32> = chunk
            .iter()
            .flat_map(|&(e, _, b)| seeded_noise(seed ^ ((e * nv + b) as u64) << 8, 3 * r * r))
            .collect();
        let noise = Tensor::from_vec(noise, (n, 3, r, r), device)?;
        let out = net.sample(&reference, &style, noise, steps, None)?;
        l1_sum += (&out - &target)?
            .abs()?
            .mean((1, 2, 3))?
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
        let images = tensor_to_images(&out)?;
        let refs: Vec<&Image> = images.iter().collect();
        let f = encoder.net().forward(&images_to_tensor(
            &refs,
            encoder.config().resolution,
            encoder.device(),
        )?)?;
        let vendors = argmax_rows(&f.vendor_logits)?;
        style_ok += chunk
            .iter()
            .zip(vendors)
            .filter(|(c, v)| c.2 == *v as usize)
            .count();
        let nearest = argmax_rows(&l2_normalize(&f.content)?.matmul(&identities.t()?)?)?;
        identity_ok += chunk
            .iter()
            .zip(nearest)
            .filter(|(c, id)| c.0 == *id as usize)
            .count();
    }
    let n = cases.len().max(1) as f32;
    Ok((
        (l1_sum / n as f64) as f32,
        style_ok as f32 / n,
        identity_ok as f32 / n,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::simulate::testdata;

    #[test]
    fn a_few_steps_lower_the_loss_resume_and_write_a_bundle_that_samples() {
        let dir = tempfile::tempdir().unwrap();
        let m = testdata::dataset(dir.path(), 8);
        let encoder_dir = dir.path().join("encoder");
        testdata::tiny_encoder(&encoder_dir, &m, 8);
        let out = dir.path().join("generator");
        let mut opts = GeneratorTraining {
            data_dir: dir.path().to_path_buf(),
            encoder_dir,
            out: out.clone(),
            channels: 4,
            steps: 2,
            epochs: 6,
            batch: 8,
            lr: 1e-2,
            ema_decay: 0.5,
            content_weight: 0.1,
            seed: 5,
            resume: false,
            progress: false,
            limit: None,
            finetune: None,
        };
        let curves = train_generator(&opts).unwrap();
        assert_eq!(curves.len(), 6);
        assert!(curves.iter().all(|c| (0.0..=1.0).contains(&c.val_identity)));
        assert!(curves.iter().any(|c| c.val_identity > 0.0), "{curves:?}");
        // The bundle holds the averaged weights, not the last ones.
        let load =
            |name: &str| candle_core::safetensors::load(out.join(name), &Device::Cpu).unwrap();
        let (bundle, average, last) = (
            load("model.safetensors"),
            load("checkpoint/ema.safetensors"),
            load("checkpoint/model.safetensors"),
        );
        let gap = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(bundle.len(), average.len());
        assert!(bundle.iter().all(|(k, t)| gap(t, &average[k]) == 0.0));
        assert!(bundle.iter().any(|(k, t)| gap(t, &last[k]) > 0.0));
        assert!(
            curves[5].train_loss < curves[0].train_loss,
            "loss did not fall: {curves:?}"
        );
        // Resuming a finished run trains nothing more and keeps the curves.
        opts.resume = true;
        assert_eq!(train_generator(&opts).unwrap(), curves);
        let csv = std::fs::read_to_string(out.join("curves.csv")).unwrap();
        assert_eq!(csv.lines().count(), 7, "{csv}");

        // The bundle loads and samples end to end, deterministically.
        use crate::model::{GenerationRequest, Generator};
        let g = crate::model::diffusion::StyleDiffusion::load(&out, None).unwrap();
        let path = m.image_path(dir.path(), "google", 8, &m.emoji[0].id);
        let reference = Image::from_png(&std::fs::read(path).unwrap()).unwrap();
        let dim = CONTENT_DIM + 4;
        let mut twitter_style = vec![0.1; dim];
        twitter_style[CONTENT_DIM + 1] = 1.0;
        let request = GenerationRequest {
            reference: std::sync::Arc::new(reference),
            reference_embedding: std::sync::Arc::from(vec![0.1; dim]),
            preference: Some(std::sync::Arc::from(twitter_style)),
            preference_agreement: None,
            seeds: vec![4, 5],
            reference_text: None,
            prompt_hints: Vec::new(),
        };
        let cancel = tokio_util::sync::CancellationToken::new();
        let a = g.generate(std::slice::from_ref(&request), &cancel).unwrap();
        let b = g.generate(std::slice::from_ref(&request), &cancel).unwrap();
        assert_eq!(a[0].len(), 2);
        assert_eq!(a[0][0].image, b[0][0].image);
        assert_eq!((a[0][1].image.width, a[0][1].image.height), (8, 8));

        // The bundle carries each vendor's prototype as its style codebook; `write_codebook`
        // gives a bundle without one the same entries, weights untouched.
        let read = |dir: &std::path::Path| -> GeneratorConfig {
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap()
        };
        let book = read(&out).style_codebook;
        assert_eq!(book.len(), m.vendors.len());
        for e in &book {
            assert_eq!(e.len(), 4);
            assert!(
                (e.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-4,
                "{e:?}"
            );
        }
        assert_ne!(book[0], book[1]);
        let old = dir.path().join("old-generator");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::copy(out.join("model.safetensors"), old.join("model.safetensors")).unwrap();
        let without = GeneratorConfig {
            style_codebook: Vec::new(),
            ..read(&out)
        };
        std::fs::write(
            old.join("config.json"),
            serde_json::to_vec(&without).unwrap(),
        )
        .unwrap();
        assert_eq!(
            write_codebook(dir.path(), &opts.encoder_dir, &old).unwrap(),
            m.vendors.len()
        );
        assert_eq!(read(&old), read(&out));
        let snapped = crate::model::diffusion::StyleDiffusion::load(&old, None)
            .unwrap()
            .with_style_snap(Some(0.0))
            .unwrap();
        assert_eq!(
            snapped
                .generate(std::slice::from_ref(&request), &cancel)
                .unwrap()[0]
                .len(),
            2
        );
        // An encoder the bundle was not conditioned on is refused.
        let other = GeneratorConfig {
            embedding_dim: 99,
            ..without
        };
        std::fs::write(old.join("config.json"), serde_json::to_vec(&other).unwrap()).unwrap();
        let err = format!(
            "{:#}",
            write_codebook(dir.path(), &opts.encoder_dir, &old).unwrap_err()
        );
        assert!(err.contains("the generator reads 99-value"), "{err}");

        // Rank-task fine-tuning runs from the bundle and writes its own.
        let ranker_dir = dir.path().join("ranker");
        std::fs::create_dir_all(&ranker_dir).unwrap();
        let rcfg = RankerConfig {
            rank: 4,
            ..RankerConfig::new(dim)
        };
        let vm = VarMap::new();
        RankerNet::new(
            rcfg.clone(),
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )
        .unwrap();
        super::super::seeded_init(&vm, 8).unwrap();
        vm.save(ranker_dir.join("model.safetensors")).unwrap();
        std::fs::write(
            ranker_dir.join("config.json"),
            serde_json::to_vec(&rcfg).unwrap(),
        )
        .unwrap();
        for preference in [RankPreference::Reference, RankPreference::History] {
            let tuned = dir.path().join(preference.name());
            let ft = GeneratorTraining {
                out: tuned.clone(),
                epochs: 1,
                resume: false,
                finetune: Some(FineTune {
                    from: out.clone(),
                    ranker_dir: ranker_dir.clone(),
                    rank_weight: 0.1,
                    fidelity_weight: 0.1,
                    preference,
                }),
                ..opts.clone()
            };
            let curves = train_generator(&ft).unwrap();
            assert!(curves[0].train_loss.is_finite());
            let cfg: GeneratorConfig =
                serde_json::from_slice(&std::fs::read(tuned.join("config.json")).unwrap()).unwrap();
            assert!(
                cfg.provenance.contains("--finetune-from")
                    && cfg.provenance.contains("--content-weight 0.1")
                    && cfg
                        .provenance
                        .contains(&format!("--rank-preference {}", preference.name())),
                "{}",
                cfg.provenance
            );
            assert_eq!(
                cfg.style_codebook, book,
                "a fine-tuned bundle keeps its codebook"
            );
            crate::model::diffusion::StyleDiffusion::load(&tuned, None).unwrap();
        }
    }
}
