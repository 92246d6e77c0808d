//! `ragar train encoder|ranker|generator`: the learned models behind the [`crate::model`] traits.
//!
//! The encoder ([`crate::model::emoji`]) is trained here; the ranker below it; the generator in
//! [`generator`]. All share one run layout ([`Run`]): seeded initialization, a checkpoint after
//! every epoch, `--resume`, `curves.csv`, and the bundle at the end.
//!
//! ## The encoder
//!
//! Data: every train-split emoji drawn by every vendor, at the bundle's resolution. Each step
//! takes a batch of distinct emoji, each drawn by a random vendor, and minimizes
//! - InfoNCE between the image's content head and the MiniLM embeddings of the batch's names
//!   (temperature [`TEMPERATURE`]): the content block says *what* is drawn, in text space;
//! - cross-entropy of the vendor logits: the style block says *how* it is drawn.
//!
//! Seeded: weights are initialized from the seed (candle's CPU RNG cannot be seeded) and epoch
//! `e` shuffles with a generator seeded from (seed, e), so a run is repeatable on one machine. After
//! every epoch the weights and `state.json` go to `OUT/checkpoint/` and a row to `OUT/curves.csv`
//! (train loss, val style accuracy, val identity top-1); `--resume` continues from the checkpoint
//! (the optimizer's moments start afresh). The bundle (`config.json`, `model.safetensors`) is
//! written to `OUT/` at the end.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::{EmojiEntry, Manifest, Split};
use crate::model::emoji::{argmax_rows, images_to_tensor, EmojiEncoderConfig, EmojiNet};
use crate::model::minilm::{l2_normalize, MiniLm};
use crate::model::Image;

pub mod generator;

/// InfoNCE temperature.
pub const TEMPERATURE: f64 = 0.05;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EncoderTraining {
    pub data_dir: PathBuf,
    pub minilm_dir: PathBuf,
    pub out: PathBuf,
    pub resolution: u32,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
    pub resume: bool,
    pub progress: bool,
    /// Use only the first `limit` emoji of each split (smoke runs and tests).
    pub limit: Option<usize>,
}

/// One line of `curves.csv`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpochStats {
    pub epoch: usize,
    pub train_loss: f32,
    pub val_style_acc: f32,
    pub val_identity_top1: f32,
}

/// A row of a run's `curves.csv`.
pub trait Curve: Serialize + serde::de::DeserializeOwned {
    const HEADER: &'static str;
    fn csv(&self) -> String;
}

impl Curve for EpochStats {
    const HEADER: &'static str = "epoch,train_loss,val_style_acc,val_identity_top1";
    fn csv(&self) -> String {
        format!(
            "{},{:.5},{:.4},{:.4}",
            self.epoch, self.train_loss, self.val_style_acc, self.val_identity_top1
        )
    }
}

/// `OUT/checkpoint/state.json`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(bound(deserialize = "C: serde::de::DeserializeOwned"))]
struct State<C> {
    epochs_done: usize,
    seed: u64,
    curves: Vec<C>,
}

/// A training run's files under OUT: `checkpoint/` (weights and [`State`] after every epoch),
/// `curves.csv`, and at the end the bundle (`config.json`, `model.safetensors`).
struct Run<C> {
    out: PathBuf,
    state: State<C>,
}

impl<C: Curve> Run<C> {
    /// Continues from `OUT/checkpoint` when `resume` and one is there (same seed only), else
    /// initializes `varmap` from `seed`.
    fn start(out: &Path, varmap: &mut VarMap, seed: u64, resume: bool) -> anyhow::Result<Self> {
        let ckpt = out.join("checkpoint");
        let state_path = ckpt.join("state.json");
        let state = if resume && state_path.is_file() {
            let state: State<C> = serde_json::from_slice(&std::fs::read(&state_path)?)
                .with_context(|| state_path.display().to_string())?;
            if state.seed != seed {
                bail!(
                    "the checkpoint in {} was trained with seed {}, not {seed}",
                    ckpt.display(),
                    state.seed
                );
            }
            varmap.load(ckpt.join("model.safetensors"))?;
            tracing::info!(
                epochs_done = state.epochs_done,
                "resuming from the checkpoint"
            );
            state
        } else {
            seeded_init(varmap, seed)?;
            State {
                epochs_done: 0,
                seed,
                curves: Vec::new(),
            }
        };
        std::fs::create_dir_all(&ckpt)?;
        Ok(Run {
            out: out.to_path_buf(),
            state,
        })
    }

    fn epochs_done(&self) -> usize {
        self.state.epochs_done
    }

    /// Records an epoch and writes the checkpoint and the curves.
    fn epoch_done(&mut self, varmap: &VarMap, stats: C) -> anyhow::Result<()> {
        self.state.curves.push(stats);
        self.state.epochs_done += 1;
        let ckpt = self.out.join("checkpoint");
        varmap.save(ckpt.join("model.safetensors"))?;
        std::fs::write(
            ckpt.join("state.json"),
            serde_json::to_vec_pretty(&self.state)?,
        )?;
        self.write_curves()
    }

    /// Writes the bundle; returns every epoch's figures.
    fn finish(self, varmap: &VarMap, config: &impl Serialize) -> anyhow::Result<Vec<C>> {
        varmap.save(self.out.join("model.safetensors"))?;
        std::fs::write(
            self.out.join("config.json"),
            serde_json::to_vec_pretty(config)?,
        )?;
        self.write_curves()?;
        Ok(self.state.curves)
    }

    fn write_curves(&self) -> anyhow::Result<()> {
        let path = self.out.join("curves.csv");
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        writeln!(f, "{}", C::HEADER)?;
        for c in &self.state.curves {
            writeln!(f, "{}", c.csv())?;
        }
        f.flush()?;
        Ok(())
    }
}

/// An exponential moving average of a model's weights (`shadow ← d · shadow + (1 − d) · w` after
/// every optimizer step), the weights a diffusion model is evaluated and shipped with: single
/// steps of a small model move its samples a lot, the average is steadier.
pub struct Ema {
    decay: f64,
    shadow: HashMap<String, Tensor>,
}

impl Ema {
    /// Starts the average at the current weights.
    pub fn new(varmap: &VarMap, decay: f64) -> candle_core::Result<Ema> {
        let data = varmap.data().lock().expect("varmap lock");
        let shadow = data
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().copy()?)))
            .collect::<candle_core::Result<_>>()?;
        Ok(Ema {
            decay: decay.clamp(0.0, 1.0),
            shadow,
        })
    }

    /// Continues an average saved by [`Ema::save`]; refuses one whose tensors differ.
    pub fn load(varmap: &VarMap, decay: f64, path: &Path) -> anyhow::Result<Ema> {
        let mut ema = Ema::new(varmap, decay)?;
        let saved = candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("reading {}", path.display()))?;
        for (name, t) in ema.shadow.iter_mut() {
            let s = saved
                .get(name)
                .with_context(|| format!("{} lacks `{name}`", path.display()))?;
            if s.shape() != t.shape() {
                bail!("`{name}` in {} has another shape", path.display());
            }
            *t = s.to_device(t.device())?;
        }
        Ok(ema)
    }

    /// One step of the average.
    pub fn update(&mut self, varmap: &VarMap) -> candle_core::Result<()> {
        let data = varmap.data().lock().expect("varmap lock");
        for (name, shadow) in self.shadow.iter_mut() {
            if let Some(var) = data.get(name) {
                *shadow =
                    ((&*shadow * self.decay)? + (var.as_tensor().detach() * (1.0 - self.decay))?)?;
            }
        }
        Ok(())
    }

    /// Swaps the average into the model (and the model's weights into the average): call twice
    /// to undo, e.g. around an evaluation.
    pub fn swap(&mut self, varmap: &VarMap) -> candle_core::Result<()> {
        let data = varmap.data().lock().expect("varmap lock");
        for (name, shadow) in self.shadow.iter_mut() {
            if let Some(var) = data.get(name) {
                let current = var.as_tensor().detach().copy()?;
                var.set(shadow)?;
                *shadow = current;
            }
        }
        Ok(())
    }

    pub fn save(&self, path: &Path) -> candle_core::Result<()> {
        candle_core::safetensors::save(&self.shadow, path)
    }
}

/// AdamW with the weight decay both trainers use.
fn optimizer(varmap: &VarMap, lr: f64) -> candle_core::Result<AdamW> {
    AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr,
            weight_decay: 1e-4,
            ..Default::default()
        },
    )
}

/// A bar of `len` steps (hidden unless `show`) labelled `what`.
fn progress_bar(show: bool, len: usize, what: &str) -> ProgressBar {
    let bar = if show {
        ProgressBar::new(len as u64)
    } else {
        ProgressBar::hidden()
    };
    let template = format!("{{spinner}} {what} [{{bar:30}}] {{pos}}/{{len}} {{msg}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}

/// A split's images (every vendor) and name embeddings, ready as tensors.
struct SplitData {
    /// `[n_emoji * vendors, 3, res, res]`, image of emoji `i` by vendor `v` at row `i * vendors + v`.
    images: Tensor,
    /// `[n_emoji, 384]`, L2-normalized.
    text: Tensor,
    n: usize,
}

fn load_split(
    manifest: &Manifest,
    data_dir: &Path,
    entries: &[&EmojiEntry],
    res: u32,
    minilm: &MiniLm,
    device: &Device,
) -> anyhow::Result<SplitData> {
    let images = split_images(manifest, data_dir, entries, res)?;
    let refs: Vec<&Image> = images.iter().collect();
    let images = images_to_tensor(&refs, res, device)?;
    let names: Vec<String> = entries.iter().map(|e| e.name.to_lowercase()).collect();
    let mut text = Vec::with_capacity(names.len());
    for chunk in names.chunks(64) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        text.extend(minilm.embed(&refs)?);
    }
    let dim = text.first().map_or(0, Vec::len);
    let text = Tensor::from_vec(text.concat(), (entries.len(), dim), device)?;
    Ok(SplitData {
        images,
        text,
        n: entries.len(),
    })
}

/// Every vendor's drawing of `entries` at `res`: emoji `i` by vendor `v` at `i * vendors + v`.
fn split_images(
    manifest: &Manifest,
    data_dir: &Path,
    entries: &[&EmojiEntry],
    res: u32,
) -> anyhow::Result<Vec<Image>> {
    let vendors: Vec<&str> = manifest.vendor_names().collect();
    let mut images = Vec::with_capacity(entries.len() * vendors.len());
    for e in entries {
        for v in &vendors {
            let path = manifest.image_path(data_dir, v, res, &e.id);
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            images.push(Image::from_png(&bytes).with_context(|| path.display().to_string())?);
        }
    }
    Ok(images)
}

/// Uniform(-1/√fan_in, 1/√fan_in) for weights, zeros for biases, from `seed` in name order.
pub fn seeded_init(varmap: &VarMap, seed: u64) -> candle_core::Result<()> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for name in names {
        let var: &Var = &data[name];
        let dims = var.dims().to_vec();
        let count: usize = dims.iter().product();
        let values: Vec<f32> = if name.ends_with("bias") {
            vec![0.0; count]
        } else {
            let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
            let bound = 1.0 / (fan_in as f32).sqrt();
            (0..count)
                .map(|_| rng.random_range(-bound..bound))
                .collect()
        };
        var.set(&Tensor::from_vec(values, dims, var.device())?)?;
    }
    Ok(())
}

/// Loss of one batch: InfoNCE(content, names) + cross-entropy(vendor).
fn batch_loss(
    net: &EmojiNet,
    split: &SplitData,
    emoji: &[u32],
    vendors: &[u32],
    n_vendors: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let rows: Vec<u32> = emoji
        .iter()
        .zip(vendors)
        .map(|(e, v)| e * n_vendors as u32 + v)
        .collect();
    let x = split.images.index_select(&Tensor::new(rows, device)?, 0)?;
    let text = split.text.index_select(&Tensor::new(emoji, device)?, 0)?;
    let f = net.forward(&x)?;
    let content = l2_normalize(&f.content)?;
    let logits = (content.matmul(&text.t()?)? / TEMPERATURE)?;
    let targets = Tensor::arange(0u32, emoji.len() as u32, device)?;
    let nce = candle_nn::loss::cross_entropy(&logits, &targets)?;
    let style = candle_nn::loss::cross_entropy(&f.vendor_logits, &Tensor::new(vendors, device)?)?;
    nce + style
}

/// Val style accuracy (every drawing's vendor) and identity top-1 (each drawing's content against
/// every val name).
fn evaluate(
    net: &EmojiNet,
    split: &SplitData,
    n_vendors: usize,
) -> candle_core::Result<(f32, f32)> {
    let total = split.n * n_vendors;
    let (mut style_ok, mut id_ok) = (0usize, 0usize);
    for start in (0..total).step_by(256) {
        let len = (total - start).min(256);
        let f = net.forward(&split.images.narrow(0, start, len)?)?;
        let vendors = argmax_rows(&f.vendor_logits)?;
        let sims = l2_normalize(&f.content)?.matmul(&split.text.t()?)?;
        let ids = argmax_rows(&sims)?;
        for k in 0..len {
            let row = start + k;
            style_ok += (vendors[k] as usize == row % n_vendors) as usize;
            id_ok += (ids[k] as usize == row / n_vendors) as usize;
        }
    }
    Ok((style_ok as f32 / total as f32, id_ok as f32 / total as f32))
}

/// Trains (or resumes) and writes the bundle; returns the per-epoch figures.
pub fn train_encoder(opts: &EncoderTraining) -> anyhow::Result<Vec<EpochStats>> {
    let device = Device::Cpu;
    let manifest = Manifest::load(&opts.data_dir)?;
    if !manifest.resolutions.contains(&opts.resolution) {
        bail!(
            "the data set has no {}px images (built: {:?}): run `ragar data build --resolution {}`",
            opts.resolution,
            manifest.resolutions,
            opts.resolution
        );
    }
    let minilm = MiniLm::load(&opts.minilm_dir, &device)?;
    let take = |split: Split| -> Vec<&EmojiEntry> {
        let all: Vec<&EmojiEntry> = manifest.split(split).collect();
        match opts.limit {
            Some(n) => all.into_iter().take(n).collect(),
            None => all,
        }
    };
    let (train_entries, val_entries) = (take(Split::Train), take(Split::Val));
    let vendors: Vec<String> = manifest.vendor_names().map(str::to_string).collect();
    let nv = vendors.len();
    let train = load_split(
        &manifest,
        &opts.data_dir,
        &train_entries,
        opts.resolution,
        &minilm,
        &device,
    )?;
    let val = load_split(
        &manifest,
        &opts.data_dir,
        &val_entries,
        opts.resolution,
        &minilm,
        &device,
    )?;

    let mut config = EmojiEncoderConfig::new(vendors, opts.resolution);
    config.provenance = format!(
        "ragar train encoder --resolution {} --epochs {} --batch {} --lr {} --seed {}{} (data: emojistyle split seed {}, vendors {})",
        opts.resolution,
        opts.epochs,
        opts.batch,
        opts.lr,
        opts.seed,
        opts.limit.map_or(String::new(), |n| format!(" --limit {n}")),
        manifest.seed,
        config.vendors.join(",")
    );
    let mut varmap = VarMap::new();
    let net = EmojiNet::new(
        config.clone(),
        VarBuilder::from_varmap(&varmap, DType::F32, &device),
    )?;
    let mut run = Run::<EpochStats>::start(&opts.out, &mut varmap, opts.seed, opts.resume)?;
    let mut opt = optimizer(&varmap, opts.lr)?;

    let batch = opts.batch.clamp(2, train.n.max(2));
    let steps_per_epoch = nv * train.n.div_ceil(batch);
    let bar = progress_bar(
        opts.progress,
        opts.epochs.saturating_sub(run.epochs_done()) * steps_per_epoch,
        "train encoder",
    );
    for epoch in run.epochs_done()..opts.epochs {
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ ((epoch as u64 + 1) << 32));
        let (mut loss_sum, mut steps) = (0f32, 0usize);
        for _pass in 0..nv {
            let mut order: Vec<u32> = (0..train.n as u32).collect();
            order.shuffle(&mut rng);
            for chunk in order.chunks(batch) {
                if chunk.len() < 2 {
                    continue;
                }
                let vendor_of: Vec<u32> = chunk
                    .iter()
                    .map(|_| rng.random_range(0..nv as u32))
                    .collect();
                let loss = batch_loss(&net, &train, chunk, &vendor_of, nv, &device)?;
                opt.backward_step(&loss)?;
                loss_sum += loss.to_scalar::<f32>()?;
                steps += 1;
                bar.inc(1);
            }
        }
        let (style_acc, identity) = evaluate(&net, &val, nv)?;
        let stats = EpochStats {
            epoch: epoch + 1,
            train_loss: loss_sum / steps.max(1) as f32,
            val_style_acc: style_acc,
            val_identity_top1: identity,
        };
        bar.set_message(format!(
            "epoch {} loss {:.3} val style {:.3} identity {:.3}",
            stats.epoch, stats.train_loss, style_acc, identity
        ));
        run.epoch_done(&varmap, stats)?;
    }
    bar.finish();
    run.finish(&varmap, &config)
}

/// `ragar train ranker`: the learned ranker ([`crate::model::ranker`]) on simulated interaction logs.
#[derive(Debug, Clone)]
pub struct RankerTraining {
    pub data_dir: PathBuf,
    pub encoder_dir: PathBuf,
    pub minilm_dir: PathBuf,
    pub out: PathBuf,
    /// Simulated users whose logs train the ranker (held-out users are drawn with another seed).
    pub users: usize,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
    pub resume: bool,
    pub progress: bool,
}

/// One line of the ranker's `curves.csv`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RankerEpoch {
    pub epoch: usize,
    pub train_loss: f32,
    pub heldout_auc: f32,
    /// Best-of-vendors accuracy on held-out displays (val emoji), category-dependent users.
    pub heldout_best_of_vendors: f32,
}

impl Curve for RankerEpoch {
    const HEADER: &'static str = "epoch,train_loss,heldout_auc,heldout_best_of_vendors";
    fn csv(&self) -> String {
        format!(
            "{},{:.5},{:.4},{:.4}",
            self.epoch, self.train_loss, self.heldout_auc, self.heldout_best_of_vendors
        )
    }
}

/// Pairwise logistic loss: softplus(−(s(p, pos) − s(p, neg))), averaged.
pub fn pairwise_loss(
    net: &crate::model::ranker::RankerNet,
    p: &Tensor,
    pos: &Tensor,
    neg: &Tensor,
) -> candle_core::Result<Tensor> {
    let margin = (net.personalization(p, pos)? - net.personalization(p, neg)?)?;
    // softplus(-m) = log(1 + exp(-m)), computed stably as relu(-m) + log(1 + exp(-|m|)).
    let neg_m = margin.neg()?;
    let stable = (neg_m.relu()? + (margin.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    stable.mean_all()
}

pub fn train_ranker(opts: &RankerTraining) -> anyhow::Result<Vec<RankerEpoch>> {
    use crate::data::simulate::{simulate, SimConfig};
    use crate::eval::{best_of_vendors, embed_items, pairwise_auc, ranker_pairs};
    use crate::model::emoji::EmojiEncoder;
    use crate::model::ranker::{RankerConfig, RankerNet};
    use crate::preference::Params;

    let device = Device::Cpu;
    let manifest = Manifest::load(&opts.data_dir)?;
    let encoder = EmojiEncoder::load(
        &opts.encoder_dir,
        Some(MiniLm::load(&opts.minilm_dir, &device)?),
    )?;
    let train_sim = simulate(
        &manifest,
        &SimConfig {
            users: opts.users,
            seed: opts.seed,
            ..SimConfig::default()
        },
    )?;
    let held_sim = simulate(
        &manifest,
        &SimConfig {
            users: (opts.users / 2).max(1),
            seed: opts.seed.wrapping_add(1000),
            display_split: Split::Val,
            ..SimConfig::default()
        },
    )?;
    let mut ids: Vec<String> = Vec::new();
    for e in &manifest.emoji {
        for v in manifest.vendor_names() {
            ids.push(crate::data::simulate::item_id(v, &e.id));
        }
    }
    tracing::info!(
        items = ids.len(),
        "embedding every drawing (with and without its name)"
    );
    let full = embed_items(&encoder, &manifest, &opts.data_dir, &ids, true)?;
    let image_only = embed_items(&encoder, &manifest, &opts.data_dir, &ids, false)?;
    let params = Params::from_config(&crate::config::PreferenceConfig::default());
    let train_pairs = ranker_pairs(&train_sim, &full, &image_only, &params, opts.seed);
    let held_pairs = ranker_pairs(
        &held_sim,
        &full,
        &image_only,
        &params,
        opts.seed.wrapping_add(1),
    );
    if train_pairs.n == 0 {
        bail!("the simulated logs gave no training pairs");
    }
    let dim = train_pairs.dim;
    let t = |v: &[f32], n: usize| Tensor::from_slice(v, (n, dim), &device);
    let (tp, tpos, tneg) = (
        t(&train_pairs.preference, train_pairs.n)?,
        t(&train_pairs.positive, train_pairs.n)?,
        t(&train_pairs.negative, train_pairs.n)?,
    );
    let (hp, hpos, hneg) = (
        t(&held_pairs.preference, held_pairs.n)?,
        t(&held_pairs.positive, held_pairs.n)?,
        t(&held_pairs.negative, held_pairs.n)?,
    );

    let mut config = RankerConfig::new(dim);
    config.provenance = format!(
        "ragar train ranker --users {} --epochs {} --batch {} --lr {} --seed {} (encoder {})",
        opts.users,
        opts.epochs,
        opts.batch,
        opts.lr,
        opts.seed,
        opts.encoder_dir.display()
    );
    let mut varmap = VarMap::new();
    let net = RankerNet::new(
        config.clone(),
        VarBuilder::from_varmap(&varmap, DType::F32, &device),
    )?;
    let mut run = Run::<RankerEpoch>::start(&opts.out, &mut varmap, opts.seed, opts.resume)?;
    let mut opt = optimizer(&varmap, opts.lr)?;
    let bar = progress_bar(
        opts.progress,
        opts.epochs.saturating_sub(run.epochs_done()),
        "train ranker",
    );
    let batch = opts.batch.max(1);
    for epoch in run.epochs_done()..opts.epochs {
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ ((epoch as u64 + 1) << 32));
        let mut order: Vec<u32> = (0..train_pairs.n as u32).collect();
        order.shuffle(&mut rng);
        let (mut loss_sum, mut steps) = (0f32, 0usize);
        for chunk in order.chunks(batch) {
            let idx = Tensor::new(chunk, &device)?;
            let loss = pairwise_loss(
                &net,
                &tp.index_select(&idx, 0)?,
                &tpos.index_select(&idx, 0)?,
                &tneg.index_select(&idx, 0)?,
            )?;
            opt.backward_step(&loss)?;
            loss_sum += loss.to_scalar::<f32>()?;
            steps += 1;
        }
        let pos_s = net.personalization(&hp, &hpos)?.to_vec1::<f32>()?;
        let neg_s = net.personalization(&hp, &hneg)?.to_vec1::<f32>()?;
        let auc = pairwise_auc(&pos_s, &neg_s);
        let score = |p: &[f32], _r: &[f32], c: &[Vec<f32>]| -> Vec<f32> {
            let n = c.len();
            let pt = Tensor::from_slice(p, (1, dim), &device).and_then(|t| t.repeat((n, 1)));
            let ct = Tensor::from_vec(c.concat(), (n, dim), &device);
            match (pt, ct) {
                (Ok(pt), Ok(ct)) => net
                    .personalization(&pt, &ct)
                    .and_then(|s| s.to_vec1::<f32>())
                    .unwrap_or_else(|_| vec![0.0; n]),
                _ => vec![0.0; n],
            }
        };
        let best = best_of_vendors(&held_sim, &full, &image_only, &params, &score);
        let stats = RankerEpoch {
            epoch: epoch + 1,
            train_loss: loss_sum / steps.max(1) as f32,
            heldout_auc: auc,
            heldout_best_of_vendors: best.category_dependent,
        };
        bar.set_message(format!(
            "epoch {} loss {:.4} held-out AUC {:.3} best-of-vendors {:.3}",
            stats.epoch, stats.train_loss, auc, best.category_dependent
        ));
        bar.inc(1);
        run.epoch_done(&varmap, stats)?;
    }
    bar.finish();
    run.finish(&varmap, &config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_averages_swaps_and_reloads() {
        let zeros = |len: usize| {
            let vm = VarMap::new();
            let w = vm
                .get(
                    len,
                    "w",
                    candle_nn::Init::Const(0.0),
                    DType::F32,
                    &Device::Cpu,
                )
                .unwrap();
            (vm, w)
        };
        let (vm, w) = zeros(2);
        let read = |t: &Tensor| t.to_vec1::<f32>().unwrap();
        let mut ema = Ema::new(&vm, 0.75).unwrap();
        let var = vm.data().lock().unwrap()["w"].clone();
        var.set(&Tensor::new(&[4f32, 8.], &Device::Cpu).unwrap())
            .unwrap();
        ema.update(&vm).unwrap();
        ema.update(&vm).unwrap();
        // [0, 0] → [1, 2] → [1.75, 3.5]: each step 0.75 · average + 0.25 · [4, 8].
        ema.swap(&vm).unwrap();
        assert_eq!(read(var.as_tensor()), vec![1.75, 3.5]);
        assert_eq!(read(&w), vec![1.75, 3.5], "the model reads the average");
        ema.swap(&vm).unwrap();
        assert_eq!(read(var.as_tensor()), vec![4., 8.]);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ema.safetensors");
        ema.save(&path).unwrap();
        let mut again = Ema::load(&vm, 0.75, &path).unwrap();
        again.swap(&vm).unwrap();
        assert_eq!(read(var.as_tensor()), vec![1.75, 3.5]);

        let (other, _) = zeros(3);
        let err = Ema::load(&other, 0.75, &path).err().unwrap().to_string();
        assert!(err.contains("`w`"), "{err}");
    }

    #[test]
    fn seeded_init_is_repeatable() {
        let cfg = EmojiEncoderConfig {
            channels: [4, 4, 4, 4],
            style_dim: 2,
            ..EmojiEncoderConfig::new(vec!["a".into(), "b".into()], 8)
        };
        let weights = |seed| {
            let vm = VarMap::new();
            EmojiNet::new(
                cfg.clone(),
                VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
            )
            .unwrap();
            seeded_init(&vm, seed).unwrap();
            let data = vm.data().lock().unwrap();
            data["conv1.weight"]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(weights(1), weights(1));
        assert_ne!(weights(1), weights(2));
    }

    #[test]
    fn ranker_steps_lower_the_pairwise_loss() {
        use crate::model::ranker::{RankerConfig, RankerNet};
        let device = Device::Cpu;
        let mut cfg = RankerConfig::new(6);
        cfg.rank = 4;
        let vm = VarMap::new();
        let net = RankerNet::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &device)).unwrap();
        seeded_init(&vm, 2).unwrap();
        // Preferences point along one of two style axes; the positive shares it, the negative not.
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let (mut p, mut pos, mut neg) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..64 {
            let axis = 4 + i % 2;
            let content: Vec<f32> = (0..4).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let with = |a: usize| {
                let mut v = content.clone();
                v.extend([0.0, 0.0]);
                v[a] = 1.0;
                v
            };
            p.extend(with(axis));
            pos.extend(with(axis));
            neg.extend(with(9 - axis));
        }
        let t = |v: &[f32]| Tensor::from_slice(v, (64, 6), &device).unwrap();
        let (p, pos, neg) = (t(&p), t(&pos), t(&neg));
        let mut opt = AdamW::new(
            vm.all_vars(),
            ParamsAdamW {
                lr: 1e-2,
                ..Default::default()
            },
        )
        .unwrap();
        let first = pairwise_loss(&net, &p, &pos, &neg)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        for _ in 0..50 {
            let loss = pairwise_loss(&net, &p, &pos, &neg).unwrap();
            opt.backward_step(&loss).unwrap();
        }
        let last = pairwise_loss(&net, &p, &pos, &neg)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(last < 0.5 * first, "loss {first} -> {last}");
    }

    /// A few steps on synthetic drawings lower the loss (no data set, no MiniLM needed).
    #[test]
    fn a_few_steps_lower_the_loss() {
        let device = Device::Cpu;
        let cfg = EmojiEncoderConfig {
            channels: [8, 8, 16, 16],
            style_dim: 4,
            ..EmojiEncoderConfig::new(vec!["flat".into(), "striped".into()], 8)
        };
        let vm = VarMap::new();
        let net = EmojiNet::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &device)).unwrap();
        seeded_init(&vm, 5).unwrap();
        // Four "emoji" (a colour each), two "vendors" (flat or striped); random unit text targets.
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut images = Vec::new();
        for e in 0..4u8 {
            for v in 0..2 {
                let rgb = (0..8 * 8)
                    .flat_map(|i| {
                        let stripe = v == 1 && (i / 8) % 2 == 0;
                        let base = [60 * e, 255 - 60 * e, 128];
                        base.map(|c| if stripe { c / 3 } else { c })
                    })
                    .collect();
                images.push(Image {
                    width: 8,
                    height: 8,
                    rgb,
                });
            }
        }
        let refs: Vec<&Image> = images.iter().collect();
        let text: Vec<f32> = (0..4 * 384)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let split = SplitData {
            images: images_to_tensor(&refs, 8, &device).unwrap(),
            text: l2_normalize(&Tensor::from_vec(text, (4, 384), &device).unwrap()).unwrap(),
            n: 4,
        };
        let mut opt = AdamW::new(
            vm.all_vars(),
            ParamsAdamW {
                lr: 3e-3,
                ..Default::default()
            },
        )
        .unwrap();
        let emoji = [0u32, 1, 2, 3];
        let vendors = [0u32, 1, 1, 0];
        let first = batch_loss(&net, &split, &emoji, &vendors, 2, &device)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let swapped = [1u32, 0, 0, 1];
        for step in 0..120 {
            let v = if step % 2 == 0 { &vendors } else { &swapped };
            let loss = batch_loss(&net, &split, &emoji, v, 2, &device).unwrap();
            opt.backward_step(&loss).unwrap();
        }
        let last = batch_loss(&net, &split, &emoji, &vendors, 2, &device)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(last < 0.5 * first, "loss {first} -> {last}");
        let (style, identity) = evaluate(&net, &split, 2).unwrap();
        assert!(
            style >= 0.75 && identity >= 0.75,
            "style {style} identity {identity}"
        );
    }
}
