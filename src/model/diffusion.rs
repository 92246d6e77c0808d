//! The EmojiStyle generator: a conditional diffusion model that redraws the reference in the style
//! the user's preference points at.
//!
//! Formulation, chosen for the compute it gets (a 2-core CPU; GPU time in runs of minutes):
//! - **Residual.** The model denoises `x = target − reference`, not the image: the reference is a
//!   strong deterministic estimate of the result (it *is* the emoji), and what remains to learn
//!   is how one vendor's drawing differs from another's.
//! - **x₀-prediction, few steps.** The network predicts the clean residual from the noisy one;
//!   sampling is deterministic DDIM (η = 0) over `steps` points of a cosine schedule, from
//!   Gaussian noise drawn from the candidate's seed. One step is the network's direct estimate;
//!   more steps refine it. Same request and seed → the same image.
//! - **Conditioning.** The preference vector's style block (the item encoder's `[style_offset ..
//!   style_offset + style_dim]`, re-normalized) and the time enter every block through FiLM
//!   (`h · (1 + tanh γ) + β`); the reference enters as input channels beside the noisy residual.
//!   Without a preference the reference's own style block is used (the reference comes back
//!   nearly unchanged).
//! - **Network.** A two-level U-Net at the bundle's resolution: 3×3 convolutions at full and half
//!   resolution, a nearest-neighbour upsample and a skip connection.
//!
//! A bundle is `config.json` ([`GeneratorConfig`]) + `model.safetensors`; `ragar train generator`
//! writes it ([`crate::train::generator`]).

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Module, Tensor, Var};
use candle_nn::{conv2d, linear, Conv2d, Conv2dConfig, Linear, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::emoji::{
    bundle_version, images_to_tensor, load_bundle, BundleConfig, EmojiEncoder, EmojiNet,
};
use super::minilm::l2_normalize;
use super::{Candidate, GenerationRequest, Generator, Image, ItemEncoder, ModelError};

/// Layout version of the bundle.
pub const BUNDLE_FORMAT: u32 = 1;

/// `config.json` of a generator bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratorConfig {
    pub format: u32,
    /// Square working resolution; references are resized to it, images come out at it.
    pub resolution: u32,
    /// Width of the full-resolution blocks (the half-resolution ones have twice as many).
    pub channels: usize,
    /// Length of the item embeddings the preference comes in (the encoder's).
    pub embedding_dim: usize,
    /// Where the style block starts in an item embedding, and its length.
    pub style_offset: usize,
    pub style_dim: usize,
    /// Sinusoidal features of the diffusion time.
    pub time_features: usize,
    /// Sampling steps when the caller does not say.
    pub steps: usize,
    /// Style guidance scale `g` when the caller does not say (0: none); see
    /// [`StyleNet::sample_guided`].
    #[serde(default)]
    pub guidance: f32,
    /// The style blocks the generator was trained to draw (each vendor's prototype: the
    /// normalized mean style of its train drawings), which [`StyleSnap`] sharpens a preference
    /// onto; empty in bundles made before it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub style_codebook: Vec<Vec<f32>>,
    /// How the bundle was made (command and seed), for the record.
    #[serde(default)]
    pub provenance: String,
}

impl BundleConfig for GeneratorConfig {
    const FORMAT: u32 = BUNDLE_FORMAT;
    fn format(&self) -> u32 {
        self.format
    }
}

impl GeneratorConfig {
    /// The default shape for an encoder with embeddings of `embedding_dim` values whose style
    /// block is `[style_offset .. style_offset + style_dim]`.
    pub fn new(
        resolution: u32,
        embedding_dim: usize,
        style_offset: usize,
        style_dim: usize,
    ) -> Self {
        GeneratorConfig {
            format: BUNDLE_FORMAT,
            resolution,
            channels: 16,
            embedding_dim,
            style_offset,
            style_dim,
            time_features: 16,
            steps: 4,
            guidance: 0.0,
            style_codebook: Vec::new(),
            provenance: String::new(),
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.resolution % 2 != 0 || self.resolution < 4 {
            return Err(format!(
                "resolution {} must be even and ≥ 4",
                self.resolution
            ));
        }
        if self.style_offset + self.style_dim > self.embedding_dim || self.style_dim == 0 {
            return Err(format!(
                "style block {}..{} does not fit {}-value embeddings",
                self.style_offset,
                self.style_offset + self.style_dim,
                self.embedding_dim
            ));
        }
        if self.time_features == 0 || self.time_features % 2 != 0 || self.steps == 0 {
            return Err("time_features must be even and > 0, steps > 0".into());
        }
        check_guidance(self.guidance)?;
        check_codebook(&self.style_codebook, self.style_dim)
    }
}

/// Below this length a style block has no direction (a missing block is all zeros).
const MIN_NORM: f32 = 1e-6;

/// `v` L2-normalized, and its length before; zeros when it is shorter than [`MIN_NORM`].
fn normalized(v: &[f32]) -> (Vec<f32>, f32) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let unit = if norm > MIN_NORM {
        v.iter().map(|x| x / norm).collect()
    } else {
        vec![0.0; v.len()]
    };
    (unit, norm)
}

/// The index of the largest of `values`, the first on ties (0 when empty).
fn first_max(values: &[f32]) -> usize {
    (0..values.len()).fold(0, |best, i| if values[i] > values[best] { i } else { best })
}

/// A style codebook holds finite entries of `style_dim` values, each with a direction.
pub fn check_codebook(entries: &[Vec<f32>], style_dim: usize) -> Result<(), String> {
    for (i, e) in entries.iter().enumerate() {
        if e.len() != style_dim {
            return Err(format!(
                "style_codebook entry {i} has {} values, the style block {style_dim}",
                e.len()
            ));
        }
        if e.iter().any(|x| !x.is_finite()) || normalized(e).1 <= MIN_NORM {
            return Err(format!(
                "style_codebook entry {i} must be finite and non-zero"
            ));
        }
    }
    Ok(())
}

/// Sharpening of the style condition onto the generator's codebook (`models.generator_snap`).
///
/// A weighted history's style block is a mean of its drawings' looks; where those disagree it
/// points between the styles the generator was trained on, a condition it never saw and renders
/// as a faint change. The snap replaces it by the codebook's entries weighted by
/// `softmax(cos(style, entryᵥ) / temperature)` (renormalized): temperature 0 takes the nearest
/// entry alone, small ones (about 0.1 and below) lean the mixture toward it, and large ones flatten
/// it toward the codebook's mean. What the history votes for is kept; how far its items agree is
/// left to the agreement ramp.
#[derive(Debug, Clone, PartialEq)]
pub struct StyleSnap {
    /// Unit entries.
    entries: Vec<Vec<f32>>,
    temperature: f32,
}

/// A snap temperature is finite and in [0, 1].
pub fn check_snap_temperature(t: f32) -> Result<(), String> {
    if t.is_finite() && (0.0..=1.0).contains(&t) {
        Ok(())
    } else {
        Err(format!("snap temperature {t} must be in [0, 1]"))
    }
}

impl StyleSnap {
    /// Snaps onto `entries` (normalized here) at `temperature`.
    pub fn new(entries: &[Vec<f32>], temperature: f32) -> Result<StyleSnap, String> {
        check_snap_temperature(temperature)?;
        let dim = entries.first().map_or(0, Vec::len);
        if entries.is_empty() || dim == 0 {
            return Err("the style snap needs a non-empty codebook".into());
        }
        check_codebook(entries, dim)?;
        let entries = entries.iter().map(|e| normalized(e).0).collect();
        Ok(StyleSnap {
            entries,
            temperature,
        })
    }

    pub fn temperature(&self) -> f32 {
        self.temperature
    }

    /// Each entry's cosine to `style` (a unit style block), and the nearest entry (the first on
    /// ties).
    fn cosines(&self, style: &[f32]) -> (Vec<f32>, usize) {
        let cos: Vec<f32> = self
            .entries
            .iter()
            .map(|e| e.iter().zip(style).map(|(a, b)| a * b).sum())
            .collect();
        let best = first_max(&cos);
        (cos, best)
    }

    /// The codebook entry nearest `style` (a unit style block).
    pub fn nearest(&self, style: &[f32]) -> usize {
        self.cosines(style).1
    }

    /// `style` (a unit style block) sharpened onto the codebook, as a unit vector (the nearest
    /// entry where the weighted entries cancel out).
    pub fn sharpen(&self, style: &[f32]) -> Vec<f32> {
        let (cos, best) = self.cosines(style);
        if self.temperature == 0.0 {
            return self.entries[best].clone();
        }
        let weights: Vec<f32> = cos
            .iter()
            .map(|&c| ((c - cos[best]) / self.temperature).exp())
            .collect();
        let mut out = vec![0f32; style.len()];
        for (e, w) in self.entries.iter().zip(&weights) {
            out.iter_mut().zip(e).for_each(|(o, x)| *o += w * x);
        }
        // Entries that cancel out (opposite ones, weighed alike) leave the nearest one.
        match normalized(&out) {
            (unit, n) if n > MIN_NORM => unit,
            _ => self.entries[best].clone(),
        }
    }
}

/// A guidance scale is finite and in [0, 8].
pub fn check_guidance(g: f32) -> Result<(), String> {
    if g.is_finite() && (0.0..=8.0).contains(&g) {
        Ok(())
    } else {
        Err(format!("guidance {g} must be in [0, 8]"))
    }
}

/// An identity guidance scale is finite and in [0, 1000] (the gradient of a cosine over every
/// pixel is small; on the EmojiStyle val set tens helped and 150 already overshot).
pub fn check_identity_guidance(s: f32) -> Result<(), String> {
    check_encoder_scale("identity guidance", s)
}

/// An encoder style guidance scale: the same range as identity guidance.
pub fn check_encoder_style_guidance(s: f32) -> Result<(), String> {
    check_encoder_scale("encoder style guidance", s)
}

fn check_encoder_scale(what: &str, s: f32) -> Result<(), String> {
    if s.is_finite() && (0.0..=1000.0).contains(&s) {
        Ok(())
    } else {
        Err(format!("{what} {s} must be in [0, 1000]"))
    }
}

/// Gradient steps of the encoder guidance per sampling step: 1 to 16.
pub fn check_guidance_iters(n: usize) -> Result<(), String> {
    if (1..=16).contains(&n) {
        Ok(())
    } else {
        Err(format!("guidance iterations {n} must be in 1..=16"))
    }
}

/// A fidelity floor is a content cosine in [0, 1).
pub fn check_fidelity_floor(f: f32) -> Result<(), String> {
    if f.is_finite() && (0.0..1.0).contains(&f) {
        Ok(())
    } else {
        Err(format!("fidelity floor {f} must be in [0, 1)"))
    }
}

/// The scales of the guidance through the item encoder (see [`StyleNet::sample_guided`]); the
/// default is none.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncoderScales {
    /// Climb of the content cosine to the reference's (identity guidance).
    pub identity: f32,
    /// Climb of the style cosine to the preference's style block.
    pub style: f32,
    /// Gradient steps per sampling step, each of the full scales.
    pub iters: usize,
    /// Fidelity floor in [0, 1) (0: none): the finished residual is scaled, per image, by the
    /// largest of [`floor_shares`] whose image keeps the encoder's content cosine to the
    /// reference at or above it (the reference itself when none does).
    pub fidelity_floor: f32,
    /// The largest share the floor tries, in [1, 4]: above 1, images whose change keeps the
    /// reference well above the floor get more of it.
    pub floor_max_share: f32,
    /// Draws per candidate, in [1, 16]: each candidate is sampled this many times (from noise
    /// seeded by its seed and the draw) and keeps the draw whose image the encoder's style head
    /// reads closest to the condition's style block, after the fidelity floor (1: one draw).
    pub draws: usize,
}

/// The shares of the residual the fidelity floor tries, largest first: tenths from `max_share`
/// down to 0.1 (a coarser grid, fifths up to 1, gave up more style than the floor needed on val).
pub fn floor_shares(max_share: f32) -> Vec<f32> {
    let tenths = (max_share * 10.0).round().max(1.0) as u32;
    (1..=tenths).rev().map(|i| i as f32 / 10.0).collect()
}

/// The largest share of the fidelity floor is in [1, 4].
pub fn check_floor_max_share(m: f32) -> Result<(), String> {
    if m.is_finite() && (1.0..=4.0).contains(&m) {
        Ok(())
    } else {
        Err(format!(
            "the fidelity floor's largest share {m} must be in [1, 4]"
        ))
    }
}

/// Draws per candidate are in [1, 16].
pub fn check_draws(n: usize) -> Result<(), String> {
    if (1..=16).contains(&n) {
        Ok(())
    } else {
        Err(format!("draws per candidate {n} must be in [1, 16]"))
    }
}

/// The noise seed of draw `j` of the candidate seeded `seed`: draw 0 is the candidate's own seed,
/// so one draw samples what sampling without draws does.
pub fn draw_seed(seed: u64, j: usize) -> u64 {
    seed ^ (j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Of `images` (`[b · draws, 3, r, r]`, each candidate's draws together), each candidate's draw
/// whose style (the encoder's style head, L2-normalized) has the largest cosine to its row of
/// `style` (`[b, style_dim]`, unit rows); the first on ties. One encoder pass.
pub fn pick_draws(
    encoder: &EmojiNet,
    images: &Tensor,
    style: &Tensor,
    draws: usize,
) -> candle_core::Result<Tensor> {
    if draws <= 1 {
        return Ok(images.clone());
    }
    let b = style.dim(0)?;
    let read = l2_normalize(&encoder.forward(images)?.style)?;
    let cos = read
        .reshape((b, draws, ()))?
        .broadcast_mul(&style.unsqueeze(1)?)?
        .sum(2)?
        .to_vec2::<f32>()?;
    let picks: Vec<u32> = cos
        .iter()
        .enumerate()
        .map(|(i, row)| (i * draws + first_max(row)) as u32)
        .collect();
    images.index_select(&Tensor::new(picks.as_slice(), images.device())?, 0)
}

/// The agreement ramp: the share of each image's residual grows with the *style agreement* of
/// the history behind its preference, from 0 at `low` to all of it at `high` (linear between).
/// A history whose drawings share one look gets its full restyle; one whose looks disagree (a
/// mixed history, averaged into a condition between vendors that it does not settle) changes the
/// reference less. The style agreement is the length of the weighted mean of the history's
/// (unit) style blocks, read off the request ([`style_conditions`]). The ramp scales the residual
/// before the fidelity floor, which then tries no share above 1 for an image the ramp scaled down.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AgreementRamp {
    pub low: f32,
    pub high: f32,
}

impl AgreementRamp {
    /// `0 ≤ low < high ≤ 1`.
    pub fn check(&self) -> Result<(), String> {
        let (l, h) = (self.low, self.high);
        if l.is_finite() && h.is_finite() && 0.0 <= l && l < h && h <= 1.0 {
            Ok(())
        } else {
            Err(format!(
                "agreement ramp [{l}, {h}] must have 0 <= low < high <= 1"
            ))
        }
    }

    /// The share of the residual an image whose history has style agreement `r` keeps.
    pub fn share(&self, r: f32) -> f32 {
        ((r - self.low) / (self.high - self.low)).clamp(0.0, 1.0)
    }
}

impl Default for EncoderScales {
    fn default() -> Self {
        EncoderScales {
            identity: 0.0,
            style: 0.0,
            iters: 1,
            fidelity_floor: 0.0,
            floor_max_share: 1.0,
            draws: 1,
        }
    }
}

impl EncoderScales {
    pub fn check(&self) -> Result<(), String> {
        check_identity_guidance(self.identity)?;
        check_encoder_style_guidance(self.style)?;
        check_guidance_iters(self.iters)?;
        check_fidelity_floor(self.fidelity_floor)?;
        check_floor_max_share(self.floor_max_share)?;
        check_draws(self.draws)
    }

    /// Whether the encoder is used at all.
    pub fn active(&self) -> bool {
        self.climbs() || self.fidelity_floor > 0.0 || self.draws > 1
    }

    /// Whether the sampling steps climb the encoder's cosines.
    pub fn climbs(&self) -> bool {
        self.identity > 0.0 || self.style > 0.0
    }
}

/// ᾱ(t) of the cosine schedule, kept inside (0, 1) so every step is defined.
pub fn alpha_bar(t: f64) -> f64 {
    let s = 0.008;
    let f = ((t + s) / (1.0 + s) * std::f64::consts::FRAC_PI_2).cos();
    (f * f).clamp(1e-4, 0.9999)
}

/// The network: x̂₀ = f(reference, x_t, style, t).
pub struct StyleNet {
    pub config: GeneratorConfig,
    cond_hidden: Linear,
    cond_out: Linear,
    inc: Conv2d,
    down: Conv2d,
    mid: Conv2d,
    up: Conv2d,
    out: Conv2d,
    freqs: Tensor,
}

impl StyleNet {
    pub fn new(config: GeneratorConfig, vb: VarBuilder) -> candle_core::Result<StyleNet> {
        config.check().map_err(candle_core::Error::Msg)?;
        let c = config.channels;
        let conv = |name: &str, cin: usize, cout: usize, stride: usize| {
            let cfg = Conv2dConfig {
                padding: 1,
                stride,
                ..Default::default()
            };
            conv2d(cin, cout, 3, cfg, vb.pp(name))
        };
        let cond_in = config.style_dim + config.time_features;
        let half = config.time_features / 2;
        let freqs: Vec<f32> = (0..half)
            .map(|i| (i as f32 * (1000f32).ln() / half as f32).exp())
            .collect();
        Ok(StyleNet {
            cond_hidden: linear(cond_in, 4 * c, vb.pp("cond_hidden"))?,
            // γ and β for inc (c), down (2c), mid (2c) and up (c).
            cond_out: linear(4 * c, 12 * c, vb.pp("cond_out"))?,
            inc: conv("inc", 6, c, 1)?,
            down: conv("down", c, 2 * c, 2)?,
            mid: conv("mid", 2 * c, 2 * c, 1)?,
            up: conv("up", 3 * c, c, 1)?,
            out: conv("out", c, 3, 1)?,
            freqs: Tensor::from_vec(freqs, (1, half), vb.device())?,
            config,
        })
    }

    /// `reference`, `x_t`: `[b, 3, r, r]`; `style`: `[b, style_dim]`; `t`: `[b]` in [0, 1].
    /// Returns the predicted clean residual `[b, 3, r, r]`.
    pub fn forward(
        &self,
        reference: &Tensor,
        x_t: &Tensor,
        style: &Tensor,
        t: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let c = self.config.channels;
        let angles = t.unsqueeze(1)?.broadcast_mul(&self.freqs)?;
        let cond = Tensor::cat(&[style, &angles.sin()?, &angles.cos()?], 1)?;
        let film = self
            .cond_out
            .forward(&self.cond_hidden.forward(&cond)?.silu()?)?;
        let modulate = |h: Tensor, at: usize, width: usize| -> candle_core::Result<Tensor> {
            // γ bounded to (−1, 1): a scale in (0, 2) cannot blow the activations up.
            let gamma = film
                .narrow(1, at, width)?
                .tanh()?
                .unsqueeze(2)?
                .unsqueeze(3)?;
            let beta = film
                .narrow(1, at + width, width)?
                .unsqueeze(2)?
                .unsqueeze(3)?;
            h.broadcast_mul(&(gamma + 1.0)?)?
                .broadcast_add(&beta)?
                .silu()
        };
        let x = Tensor::cat(&[reference, x_t], 1)?;
        let h0 = modulate(conv3x3(&self.inc, &x, 1)?, 0, c)?;
        let h1 = modulate(conv3x3(&self.down, &h0, 2)?, 2 * c, 2 * c)?;
        let h1 = modulate(conv3x3(&self.mid, &h1, 1)?, 6 * c, 2 * c)?;
        let r = self.config.resolution as usize;
        let up = h1.upsample_nearest2d(r, r)?;
        let h2 = modulate(
            conv3x3(&self.up, &Tensor::cat(&[&up, &h0], 1)?, 1)?,
            10 * c,
            c,
        )?;
        conv3x3(&self.out, &h2, 1)
    }

    /// Deterministic DDIM from `noise` (`[b, 3, r, r]`) over `steps` steps; returns the images
    /// (`reference` + residual, clamped to [-1, 1]). Gradients flow through every step, so the
    /// rank-task fine-tuning can differentiate a sample. `cancel` is checked between steps.
    pub fn sample(
        &self,
        reference: &Tensor,
        style: &Tensor,
        noise: Tensor,
        steps: usize,
        cancel: Option<&CancellationToken>,
    ) -> Result<Tensor, ModelError> {
        self.sample_guided(reference, style, Guidance::default(), noise, steps, cancel)
    }

    /// [`Self::sample`] steered by `guide` (see [`Guidance`]).
    ///
    /// Style guidance: given the reference's own style block `own` (`[b, style_dim]`) and a scale
    /// `g > 0`, every step's estimate is pushed along the difference the preference makes,
    /// `x̂₀ = x̂₀(style) + g · (x̂₀(style) − x̂₀(own))`, the guidance of classifier-free sampling
    /// with the reference's own style as the negative condition. What the preference changes is
    /// amplified; what both conditions keep (the emoji) is not. One forward pass over both
    /// conditions per step.
    ///
    /// Identity guidance: given the item encoder and a scale `s > 0`, every step's estimate then
    /// climbs the cosine between the encoder's content of the image it implies and the
    /// reference's, `x̂₀ += s · ∇ Σ cos(content(reference + x̂₀), content(reference))`: the
    /// guidance of classifier-guided sampling with the encoder's content head as the classifier.
    /// The style may change; what is drawn is held to the reference. One forward and backward
    /// pass of the encoder per step.
    ///
    /// Encoder style guidance (scale `u > 0`) adds the climb of the encoder's style cosine to the
    /// preference's style block, `u · ∇ Σ cos(style(reference + x̂₀), style)`, in the same
    /// gradient: the style head as a classifier of the preferred look. With `iters > 1` the
    /// climb is repeated from where the last one ended (smaller scales, more steps, follow the
    /// ascent where one long step overshoots).
    pub fn sample_guided(
        &self,
        reference: &Tensor,
        style: &Tensor,
        guide: Guidance,
        noise: Tensor,
        steps: usize,
        cancel: Option<&CancellationToken>,
    ) -> Result<Tensor, ModelError> {
        let b = reference.dim(0)?;
        let steps = steps.max(1);
        // With style guidance, both conditions in one batch: references twice, styles [style; own].
        let style_guide = match guide.style.filter(|(_, g)| *g > 0.0) {
            Some((own, g)) => Some((
                Tensor::cat(&[reference, reference], 0)?,
                Tensor::cat(&[style, own], 0)?,
                g,
            )),
            None => None,
        };
        // With encoder guidance, the reference's normalized content: what every step holds to
        // (draws alone read the finished images only, in the generator).
        let encoder = match guide
            .encoder
            .filter(|(_, s)| s.climbs() || s.fidelity_floor > 0.0)
        {
            Some((net, scales)) => {
                let target = l2_normalize(&net.forward(reference)?.content)?.detach();
                Some((net, target, scales))
            }
            None => None,
        };
        let mut x = noise;
        for i in 0..steps {
            if cancel.is_some_and(|c| c.is_cancelled()) {
                return Err(ModelError::Cancelled);
            }
            let t = 1.0 - i as f64 / steps as f64;
            let t_next = 1.0 - (i + 1) as f64 / steps as f64;
            let mut x0 = match &style_guide {
                None => {
                    let tt = Tensor::full(t as f32, b, reference.device())?;
                    self.forward(reference, &x, style, &tt)?
                }
                Some((references, styles, g)) => {
                    let tt = Tensor::full(t as f32, 2 * b, reference.device())?;
                    let both =
                        self.forward(references, &Tensor::cat(&[&x, &x], 0)?, styles, &tt)?;
                    let (cond, own) = (both.narrow(0, 0, b)?, both.narrow(0, b, b)?);
                    ((&cond - &own)?.affine(*g as f64, 0.0)? + cond)?
                }
            };
            if let Some((net, target, scales)) = encoder.as_ref().filter(|(_, _, s)| s.climbs()) {
                for _ in 0..scales.iters {
                    x0 = climb_encoder(net, reference, (target, style), x0, scales)?;
                }
            }
            if i + 1 == steps {
                x = x0;
                break;
            }
            let (ab, ab_next) = (alpha_bar(t), alpha_bar(t_next));
            let eps = ((&x - (&x0 * ab.sqrt())?)? / (1.0 - ab).sqrt())?;
            x = ((x0 * ab_next.sqrt())? + (eps * (1.0 - ab_next).sqrt())?)?;
        }
        // The floor may scale a residual up (shares above 1), but not one the ramp scaled down:
        // that would hand the image back the restyle its history did not settle.
        let mut most = None;
        if let Some(kept) = guide.strength {
            let t = Tensor::from_slice(kept, (kept.len(), 1, 1, 1), x.device())?;
            x = x.broadcast_mul(&t)?;
            most = Some(
                kept.iter()
                    .map(|&s| if s < 1.0 { 1.0 } else { f32::INFINITY })
                    .collect::<Vec<f32>>(),
            );
        }
        if let Some((net, target, scales)) = &encoder {
            if scales.fidelity_floor > 0.0 {
                let shares = floor_shares(scales.floor_max_share);
                let floor = (scales.fidelity_floor, most.as_deref());
                x = match guide.guard {
                    // The guard judges against its own content of the reference.
                    Some(guard) => {
                        let own = l2_normalize(&guard.forward(reference)?.content)?;
                        floor_fidelity(guard, reference, &own, &x, floor, &shares)?
                    }
                    None => floor_fidelity(net, reference, target, &x, floor, &shares)?,
                };
            }
        }
        Ok((reference + x)?.clamp(-1f32, 1f32)?)
    }
}

/// What steers [`StyleNet::sample_guided`] besides the preference's style; the default is
/// neither (plain sampling).
#[derive(Clone, Copy, Default)]
pub struct Guidance<'a> {
    /// The reference's own style block (`[b, style_dim]`) and the style guidance scale.
    pub style: Option<(&'a Tensor, f32)>,
    /// The item encoder and the scales of the guidance through it.
    pub encoder: Option<(&'a EmojiNet, EncoderScales)>,
    /// The fidelity guard: a second encoder, never climbed, that judges the fidelity floor in
    /// place of the guided one (`None`: the guided encoder judges). The climbs raise the guided
    /// encoder's content cosine by changes another encoder need not read as the same emoji, so
    /// a floor judged by the encoder they climbed passes images a separate reader would not.
    pub guard: Option<&'a EmojiNet>,
    /// Per image, the share of the finished residual it keeps (the agreement ramp's), applied
    /// before the fidelity floor; `None`: all of it.
    pub strength: Option<&'a [f32]>,
}

/// The fidelity floor: each row of the residual `x` (`[b, 3, r, r]`) times the largest of
/// `shares` (largest first) whose image `reference + share · x` has a content cosine to `target`
/// of at least `floor`, or 0 (the reference) when none has; with `most`, a row takes no share
/// above its entry. One encoder pass over every share.
fn floor_fidelity(
    encoder: &EmojiNet,
    reference: &Tensor,
    target: &Tensor,
    x: &Tensor,
    (floor, most): (f32, Option<&[f32]>),
    shares: &[f32],
) -> candle_core::Result<Tensor> {
    let b = x.dim(0)?;
    let n = shares.len();
    let tried = shares
        .iter()
        .map(|&share| (reference + (x * share as f64)?)?.clamp(-1f32, 1f32))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let content = l2_normalize(&encoder.forward(&Tensor::cat(&tried, 0)?)?.content)?;
    let targets = target.repeat((n, 1))?;
    let cos = (content * targets)?.sum(1)?.to_vec1::<f32>()?;
    let shares: Vec<f32> = (0..b)
        .map(|row| {
            let most = most.map_or(f32::INFINITY, |m| m[row]);
            (0..n)
                .find(|&i| shares[i] <= most && cos[i * b + row] >= floor)
                .map_or(0.0, |i| shares[i])
        })
        .collect();
    let shares = Tensor::from_vec(shares, (b, 1, 1, 1), x.device())?;
    x.broadcast_mul(&shares)
}

/// One encoder guidance step: `x0 + ∇ [s · Σ cos(content(reference + x0), content_target) +
/// u · Σ cos(style(reference + x0), style_target)]` for the identity and style scales `s`, `u`,
/// the gradient taken with respect to `x0` alone (a detached copy; the result carries no graph).
fn climb_encoder(
    encoder: &EmojiNet,
    reference: &Tensor,
    (content_target, style_target): (&Tensor, &Tensor),
    x0: Tensor,
    scales: &EncoderScales,
) -> candle_core::Result<Tensor> {
    let var = Var::from_tensor(&x0.detach())?;
    let features = encoder.forward(&(reference + var.as_tensor())?)?;
    let mut objective = Tensor::zeros((), x0.dtype(), x0.device())?;
    if scales.identity > 0.0 {
        let cos = (l2_normalize(&features.content)? * content_target)?.sum_all()?;
        objective = (objective + (cos * scales.identity as f64)?)?;
    }
    if scales.style > 0.0 {
        let cos = (l2_normalize(&features.style)? * style_target)?.sum_all()?;
        objective = (objective + (cos * scales.style as f64)?)?;
    }
    let grads = objective.backward()?;
    let grad = grads
        .get(var.as_tensor())
        .ok_or_else(|| candle_core::Error::Msg("encoder guidance: no gradient".into()))?;
    Ok((var.as_tensor() + grad)?.detach())
}

/// Values of one patch matrix at most (1 MiB): larger ones ran slower per image, out of cache.
const PATCH_VALUES: usize = 1 << 18;

/// A 3×3 convolution with padding 1 and stride 1 or 2 (every convolution of [`StyleNet`]) as one
/// matrix product: the nine shifted views of the padded input are stacked into the patch matrix
/// `[c_in · 9, b · h · w]` by block copies, then multiplied by the weights `[c_out, c_in · 9]`.
/// The same function as `conv.forward(x)` (up to the order of the sums), and differentiable, so
/// training runs it too. candle's CPU convolution gathers its patches element by element, which
/// was two thirds of the generator's instructions (callgrind); this is the fast path.
pub fn conv3x3(conv: &Conv2d, x: &Tensor, stride: usize) -> candle_core::Result<Tensor> {
    let (b, c_in, h, w) = x.dims4()?;
    let weight = conv.weight();
    let c_out = weight.dim(0)?;
    if weight.dims() != [c_out, c_in, 3, 3]
        || !(stride == 1 || (stride == 2 && h % 2 == 0 && w % 2 == 0))
    {
        return conv.forward(x);
    }
    let (oh, ow) = ((h - 1) / stride + 1, (w - 1) / stride + 1);
    // A few images at a time, so the patch matrix stays in cache.
    let per_image = c_in * 9 * oh * ow;
    let chunk = (PATCH_VALUES / per_image).max(1);
    if b > chunk {
        let parts = (0..b)
            .step_by(chunk)
            .map(|start| conv3x3(conv, &x.narrow(0, start, chunk.min(b - start))?, stride))
            .collect::<candle_core::Result<Vec<_>>>()?;
        return Tensor::cat(&parts, 0);
    }
    // Channels first, so the patch matrix's columns run over batch and pixels together.
    let xp = x
        .transpose(0, 1)?
        .contiguous()?
        .pad_with_zeros(2, 1, 1)?
        .pad_with_zeros(3, 1, 1)?;
    let mut taps = Vec::with_capacity(9);
    for dy in 0..3 {
        for dx in 0..3 {
            let tap = if stride == 1 {
                xp.narrow(2, dy, oh)?.narrow(3, dx, ow)?
            } else {
                // Rows dy, dy + 2, …: split each padded axis into (position, parity).
                xp.reshape((c_in, b, (h + 2) / 2, 2, (w + 2) / 2, 2))?
                    .narrow(2, dy / 2, oh)?
                    .narrow(3, dy % 2, 1)?
                    .narrow(4, dx / 2, ow)?
                    .narrow(5, dx % 2, 1)?
                    .squeeze(5)?
                    .squeeze(3)?
            };
            // Copied one view at a time: a view with rows of `ow` contiguous values copies by
            // blocks, while stacking the views directly would copy value by value.
            taps.push(tap.contiguous()?);
        }
    }
    let patches = Tensor::stack(&taps, 1)?.reshape((c_in * 9, b * oh * ow))?;
    let out = weight
        .reshape((c_out, c_in * 9))?
        .matmul(&patches)?
        .reshape((c_out, b, oh, ow))?;
    let out = match conv.bias() {
        Some(bias) => out.broadcast_add(&bias.reshape((c_out, 1, 1, 1))?)?,
        None => out,
    };
    out.transpose(0, 1)?.contiguous()
}

/// Standard normal noise for one candidate, `3 · r · r` values, from its seed.
pub fn seeded_noise(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len)
        .map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal))
        .collect()
}

/// The style conditions of one request, each L2-normalized (zeros when zero): the preference's
/// style block (else the reference's), and the reference's own (the negative of guidance); and
/// the style agreement of the history behind the preference, in [0, 1].
///
/// Item embeddings are unit vectors whose style block has the same length `b` in every item
/// (the encoder weighs two unit blocks), so the weighted mean `q` of the history's embeddings has
/// the style block `b · Σ wᵢ sᵢ`, and the request's preference is `q / |q|` with `|q|` its
/// agreement `A`. The style agreement `|Σ wᵢ sᵢ|` is therefore `A · |p_style| / b`, with `b` read
/// off the reference's own embedding. It is 1 where that is not known (no agreement on the
/// request, no preference, a reference without a style block).
///
/// With `snap`, the preference's style block is sharpened onto the codebook ([`StyleSnap`]); the
/// reference's own style and the agreement are not.
pub fn style_conditions(
    config: &GeneratorConfig,
    request: &GenerationRequest,
    snap: Option<&StyleSnap>,
) -> Result<StyleConditions, ModelError> {
    // A style block, L2-normalized, and its length before.
    let block = |v: &[f32]| -> Result<(Vec<f32>, f32), ModelError> {
        if v.len() != config.embedding_dim {
            return Err(ModelError::Unsupported(format!(
                "the generator reads {}-value embeddings (its encoder's), got {}",
                config.embedding_dim,
                v.len()
            )));
        }
        Ok(normalized(
            &v[config.style_offset..config.style_offset + config.style_dim],
        ))
    };
    let (own, b) = block(&request.reference_embedding)?;
    let style = match &request.preference {
        Some(p) => Some(block(p)?).filter(|(_, len)| *len > MIN_NORM),
        None => None,
    };
    let agreement = match (&style, request.preference_agreement) {
        (Some((_, len)), Some(a)) if b > MIN_NORM => (a * len / b).clamp(0.0, 1.0),
        _ => 1.0,
    };
    let style = style.map(|(s, _)| match snap {
        Some(snap) => snap.sharpen(&s),
        None => s,
    });
    Ok(StyleConditions {
        style: style.unwrap_or_else(|| own.clone()),
        own,
        agreement,
    })
}

/// What [`style_conditions`] reads off one request.
#[derive(Debug, Clone, PartialEq)]
pub struct StyleConditions {
    /// The condition: the preference's style block, else the reference's (L2-normalized).
    pub style: Vec<f32>,
    /// The reference's own style block (L2-normalized): the negative condition of guidance.
    pub own: Vec<f32>,
    /// The style agreement of the history behind the preference, in [0, 1] (1 when unknown).
    pub agreement: f32,
}

/// Converts `[b, 3, r, r]` values in [-1, 1] to images.
pub fn tensor_to_images(x: &Tensor) -> Result<Vec<Image>, ModelError> {
    let (b, _, h, w) = x.dims4()?;
    let values = x.flatten_all()?.to_vec1::<f32>()?;
    let plane = h * w;
    Ok((0..b)
        .map(|i| {
            let base = i * 3 * plane;
            let mut rgb = Vec::with_capacity(3 * plane);
            for p in 0..plane {
                for ch in 0..3 {
                    let v = values[base + ch * plane + p];
                    rgb.push(((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8);
                }
            }
            Image {
                width: w as u32,
                height: h as u32,
                rgb,
            }
        })
        .collect())
}

/// A loaded generator bundle: the worker's and the evaluation's [`Generator`].
pub struct StyleDiffusion {
    net: StyleNet,
    device: Device,
    steps: usize,
    guidance: f32,
    /// The item encoder and the scales of the guidance through it, when any is on.
    encoder_guide: Option<(Arc<EmojiEncoder>, EncoderScales)>,
    /// The fidelity guard (see [`Guidance::guard`]), when the floor has one.
    guard: Option<Arc<EmojiEncoder>>,
    /// The agreement ramp, when it is on.
    agreement: Option<AgreementRamp>,
    /// The style snap, when it is on.
    snap: Option<StyleSnap>,
    /// The own-style gate's codebook, when it is on: an image whose condition and reference
    /// are nearest the same entry is the reference.
    keep_own: Option<StyleSnap>,
    /// `generator:<dir name>`; `version` adds the sampling settings.
    bundle: String,
    version: String,
}

/// `bundle@steps`, then `+g<scale>` with style guidance, `+id<scale>` with identity guidance,
/// `+st<scale>` with encoder style guidance, `x<iters>` when the encoder's climb repeats and
/// `+floor<f>:<max>` with a fidelity floor over tenths up to `max`, `~<guard>` when a guard
/// judges it, `+agree<low>:<high>` with the agreement ramp and `+snap<temperature>` with the style
/// snap: the version names what makes the images.
fn sampling_version(
    bundle: &str,
    steps: usize,
    guidance: f32,
    encoder: EncoderScales,
    guard: Option<&str>,
    agreement: Option<AgreementRamp>,
    snap: Option<f32>,
) -> String {
    let mut v = format!("{bundle}@{steps}");
    if guidance > 0.0 {
        v.push_str(&format!("+g{guidance}"));
    }
    if encoder.identity > 0.0 {
        v.push_str(&format!("+id{}", encoder.identity));
    }
    if encoder.style > 0.0 {
        v.push_str(&format!("+st{}", encoder.style));
    }
    if encoder.climbs() && encoder.iters > 1 {
        v.push_str(&format!("x{}", encoder.iters));
    }
    if encoder.fidelity_floor > 0.0 {
        v.push_str(&format!(
            "+floor{}:{}",
            encoder.fidelity_floor, encoder.floor_max_share
        ));
        if let Some(guard) = guard {
            v.push_str(&format!("~{guard}"));
        }
    }
    if encoder.draws > 1 {
        v.push_str(&format!("+draws{}", encoder.draws));
    }
    if let Some(ramp) = agreement {
        v.push_str(&format!("+agree{}:{}", ramp.low, ramp.high));
    }
    if let Some(t) = snap {
        v.push_str(&format!("+snap{t}"));
    }
    v
}

/// Candidates sampled together at most (memory stays bounded for large display batches).
const MAX_SAMPLES_PER_PASS: usize = 64;

impl StyleDiffusion {
    /// Loads a bundle; `steps` overrides the bundle's default number of sampling steps.
    pub fn load(dir: &Path, steps: Option<usize>) -> Result<StyleDiffusion, ModelError> {
        let device = Device::Cpu;
        let (config, vb) = load_bundle::<GeneratorConfig>(dir, &device)?;
        let steps = steps.unwrap_or(config.steps);
        if steps == 0 {
            return Err(ModelError::Bundle(
                "sampling steps must be at least 1".into(),
            ));
        }
        let guidance = config.guidance;
        let net = StyleNet::new(config, vb)
            .map_err(|e| ModelError::Bundle(format!("{}: {e}", dir.display())))?;
        let bundle = bundle_version("generator", dir);
        Ok(StyleDiffusion {
            net,
            device,
            steps,
            guidance,
            encoder_guide: None,
            guard: None,
            agreement: None,
            snap: None,
            keep_own: None,
            version: sampling_version(
                &bundle,
                steps,
                guidance,
                EncoderScales::default(),
                None,
                None,
                None,
            ),
            bundle,
        })
    }

    /// Overrides the bundle's style guidance scale (see [`StyleNet::sample_guided`]).
    pub fn with_guidance(mut self, guidance: f32) -> Result<StyleDiffusion, ModelError> {
        check_guidance(guidance).map_err(ModelError::Unsupported)?;
        self.guidance = guidance;
        self.refresh_version();
        Ok(self)
    }

    /// Turns identity guidance on with `encoder`'s content head at scale `scale` (0: off, and
    /// `encoder` unused); see [`StyleNet::sample_guided`]. The encoder must be the one whose
    /// embeddings condition the generator.
    pub fn with_identity_guidance(
        self,
        encoder: Arc<EmojiEncoder>,
        scale: f32,
    ) -> Result<StyleDiffusion, ModelError> {
        let scales = EncoderScales {
            identity: scale,
            ..EncoderScales::default()
        };
        self.with_encoder_guidance(encoder, scales)
    }

    /// Turns the guidance through `encoder` on at `scales` (identity, style, iterations; all
    /// scales 0: off, and `encoder` unused); see [`StyleNet::sample_guided`]. The encoder must be
    /// the one whose embeddings condition the generator.
    pub fn with_encoder_guidance(
        mut self,
        encoder: Arc<EmojiEncoder>,
        scales: EncoderScales,
    ) -> Result<StyleDiffusion, ModelError> {
        scales.check().map_err(ModelError::Unsupported)?;
        let (cfg, enc) = (&self.net.config, encoder.config());
        if scales.active() && (enc.dim() != cfg.embedding_dim || enc.resolution != cfg.resolution) {
            return Err(ModelError::Unsupported(format!(
                "encoder guidance needs the generator's encoder ({}-value embeddings at {}×{}), got {} values at {}×{}",
                cfg.embedding_dim, cfg.resolution, cfg.resolution, enc.dim(), enc.resolution, enc.resolution
            )));
        }
        self.encoder_guide = scales.active().then_some((encoder, scales));
        self.refresh_version();
        Ok(self)
    }

    /// Has `guard`, an encoder bundle the guidance never climbs, judge the fidelity floor in
    /// place of the guided encoder (see [`Guidance::guard`]); it must read the generator's
    /// resolution. Without a floor it is kept but unused.
    pub fn with_fidelity_guard(
        mut self,
        guard: Arc<EmojiEncoder>,
    ) -> Result<StyleDiffusion, ModelError> {
        let (r, g) = (self.net.config.resolution, guard.config().resolution);
        if r != g {
            return Err(ModelError::Unsupported(format!(
                "the fidelity guard reads {g}×{g} images, the generator draws {r}×{r}"
            )));
        }
        self.guard = Some(guard);
        self.refresh_version();
        Ok(self)
    }

    /// Turns the agreement ramp on (`None`: off); see [`AgreementRamp`].
    pub fn with_agreement_ramp(
        mut self,
        ramp: Option<AgreementRamp>,
    ) -> Result<StyleDiffusion, ModelError> {
        if let Some(r) = &ramp {
            r.check().map_err(ModelError::Unsupported)?;
        }
        self.agreement = ramp;
        self.refresh_version();
        Ok(self)
    }

    /// Sharpens each preference's style block onto the bundle's codebook at `temperature`
    /// (`None`: off); see [`StyleSnap`]. A bundle without a codebook refuses it.
    pub fn with_style_snap(
        mut self,
        temperature: Option<f32>,
    ) -> Result<StyleDiffusion, ModelError> {
        self.snap = temperature
            .map(|t| self.codebook("the style snap", t))
            .transpose()?;
        self.refresh_version();
        Ok(self)
    }

    /// Turns the own-style gate on or off: a candidate whose style condition is nearest the
    /// same codebook entry as its reference's own style (the preference asks for the look the
    /// item already has) is the reference, unchanged. A bundle without a codebook refuses it.
    pub fn with_own_style_gate(mut self, on: bool) -> Result<StyleDiffusion, ModelError> {
        self.keep_own = on
            .then(|| self.codebook("the own-style gate", 0.0))
            .transpose()?;
        self.refresh_version();
        Ok(self)
    }

    /// The bundle's codebook at `temperature`, for `what` needs it; refused without one.
    fn codebook(&self, what: &str, temperature: f32) -> Result<StyleSnap, ModelError> {
        let book = &self.net.config.style_codebook;
        if book.is_empty() {
            return Err(ModelError::Unsupported(format!(
                "{what} needs a style codebook, and bundle {} has none (`ragar train generator --codebook-only` adds it)",
                self.bundle
            )));
        }
        StyleSnap::new(book, temperature).map_err(ModelError::Unsupported)
    }

    fn refresh_version(&mut self) {
        let scales = self
            .encoder_guide
            .as_ref()
            .map_or_else(EncoderScales::default, |(_, s)| *s);
        // The guard's bundle directory, from its version `emoji-encoder:<dir>`.
        let guard = self.guard.as_ref().map(|g| {
            let v = g.version();
            v.rsplit(':').next().unwrap_or(v).to_string()
        });
        self.version = sampling_version(
            &self.bundle,
            self.steps,
            self.guidance,
            scales,
            guard.as_deref(),
            self.agreement,
            self.snap.as_ref().map(StyleSnap::temperature),
        );
        if self.keep_own.is_some() {
            self.version.push_str("+keep");
        }
    }

    pub fn config(&self) -> &GeneratorConfig {
        &self.net.config
    }
}

impl Generator for StyleDiffusion {
    fn version(&self) -> &str {
        &self.version
    }

    fn generate(
        &self,
        batch: &[GenerationRequest],
        cancel: &CancellationToken,
    ) -> Result<Vec<Vec<Candidate>>, ModelError> {
        let cfg = &self.net.config;
        let r = cfg.resolution as usize;
        // One row per (request, seed).
        let mut rows: Vec<(usize, u64)> = Vec::new();
        let mut styles = Vec::with_capacity(batch.len());
        for (i, req) in batch.iter().enumerate() {
            styles.push(style_conditions(cfg, req, self.snap.as_ref())?);
            rows.extend(req.seeds.iter().map(|&s| (i, s)));
        }
        // Per request, the share of its restyle each image keeps: the ramp's, and none where the
        // own-style gate keeps the reference.
        let shares: Option<Vec<f32>> =
            (self.agreement.is_some() || self.keep_own.is_some()).then(|| {
                styles
                    .iter()
                    .map(|s| match &self.keep_own {
                        Some(book) if book.nearest(&s.style) == book.nearest(&s.own) => 0.0,
                        _ => self.agreement.map_or(1.0, |ramp| ramp.share(s.agreement)),
                    })
                    .collect()
            });
        let draws = self.encoder_guide.as_ref().map_or(1, |(_, s)| s.draws);
        let mut images = Vec::with_capacity(rows.len());
        // Each chunk's candidates are sampled together, every draw of one in the same pass.
        for chunk in rows.chunks((MAX_SAMPLES_PER_PASS / draws).max(1)) {
            // One row per draw, each candidate's draws together.
            let drawn: Vec<(usize, u64)> = chunk
                .iter()
                .flat_map(|&(i, seed)| (0..draws).map(move |j| (i, draw_seed(seed, j))))
                .collect();
            let chunk = drawn.as_slice();
            let refs: Vec<&Image> = chunk.iter().map(|(i, _)| &*batch[*i].reference).collect();
            let reference = images_to_tensor(&refs, cfg.resolution, &self.device)?;
            let block = |pick: fn(&StyleConditions) -> &Vec<f32>| {
                let v: Vec<f32> = chunk
                    .iter()
                    .flat_map(|(i, _)| pick(&styles[*i]).iter().copied())
                    .collect();
                Tensor::from_vec(v, (chunk.len(), cfg.style_dim), &self.device)
            };
            let style = block(|s| &s.style)?;
            // The negative condition, only when guidance uses it.
            let own = (self.guidance > 0.0)
                .then(|| block(|s| &s.own))
                .transpose()?;
            let strength: Option<Vec<f32>> = shares
                .as_ref()
                .map(|shares| chunk.iter().map(|(i, _)| shares[*i]).collect());
            let noise: Vec<f32> = chunk
                .iter()
                .flat_map(|(_, seed)| seeded_noise(*seed, 3 * r * r))
                .collect();
            let noise = Tensor::from_vec(noise, (chunk.len(), 3, r, r), &self.device)?;
            let guide = Guidance {
                style: own.as_ref().map(|own| (own, self.guidance)),
                encoder: self.encoder_guide.as_ref().map(|(e, s)| (e.net(), *s)),
                guard: self.guard.as_ref().map(|g| g.net()),
                strength: strength.as_deref(),
            };
            let mut out = self.net.sample_guided(
                &reference,
                &style,
                guide,
                noise,
                self.steps,
                Some(cancel),
            )?;
            if let Some((encoder, _)) = self.encoder_guide.as_ref().filter(|_| draws > 1) {
                let wanted = style.reshape((chunk.len() / draws, draws, cfg.style_dim))?;
                let wanted = wanted.narrow(1, 0, 1)?.squeeze(1)?;
                out = pick_draws(encoder.net(), &out, &wanted, draws)?;
            }
            images.extend(tensor_to_images(&out)?);
        }
        Ok(super::per_request(batch, images))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::DType;
    use candle_nn::VarMap;
    use std::sync::Arc;

    #[test]
    fn conv3x3_matches_candles_convolution() {
        let dev = Device::Cpu;
        for (c_in, c_out, stride, res) in [
            (6, 16, 1, 32),
            (16, 32, 2, 32),
            (48, 16, 1, 8),
            (5, 3, 2, 6),
        ] {
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
            let cfg = Conv2dConfig {
                padding: 1,
                stride,
                ..Default::default()
            };
            let conv = conv2d(c_in, c_out, 3, cfg, vb.pp("c")).unwrap();
            crate::train::seeded_init(&vm, 5).unwrap();
            let noise = seeded_noise(9, 2 * c_in * res * res);
            let x = Tensor::from_vec(noise, (2, c_in, res, res), &dev).unwrap();
            let want = conv.forward(&x).unwrap();
            let got = conv3x3(&conv, &x, stride).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                diff < 1e-4,
                "{c_in}->{c_out} stride {stride}: max difference {diff}"
            );
        }
    }

    pub fn tiny_config() -> GeneratorConfig {
        GeneratorConfig {
            channels: 4,
            time_features: 4,
            steps: 3,
            ..GeneratorConfig::new(8, 6, 2, 4)
        }
    }

    /// Writes a seeded random-weight bundle of `config` to `dir`.
    pub fn save_bundle(dir: &Path, config: &GeneratorConfig, seed: u64) {
        let vm = VarMap::new();
        StyleNet::new(
            config.clone(),
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )
        .unwrap();
        crate::train::seeded_init(&vm, seed).unwrap();
        vm.save(dir.join("model.safetensors")).unwrap();
        std::fs::write(dir.join("config.json"), serde_json::to_vec(config).unwrap()).unwrap();
    }

    fn request(seeds: Vec<u64>, style: [f32; 4]) -> GenerationRequest {
        let reference = Image {
            width: 10,
            height: 10,
            rgb: (0..300).map(|i| (i * 7 % 256) as u8).collect(),
        };
        let mut emb = vec![0.5, 0.5];
        emb.extend([0.0, 1.0, 0.0, 0.0]);
        let mut pref = vec![0.5, 0.5];
        pref.extend(style);
        GenerationRequest {
            reference: Arc::new(reference),
            reference_embedding: Arc::from(emb),
            preference: Some(Arc::from(pref)),
            preference_agreement: None,
            seeds,
            reference_text: None,
            prompt_hints: Vec::new(),
        }
    }

    #[test]
    fn shapes_seeds_and_determinism() {
        let dir = tempfile::tempdir().unwrap();
        save_bundle(dir.path(), &tiny_config(), 3);
        let g = StyleDiffusion::load(dir.path(), None).unwrap();
        assert!(g.version().ends_with("@3"), "{}", g.version());
        let cancel = CancellationToken::new();
        let batch = [
            request(vec![1, 2], [1.0, 0.0, 0.0, 0.0]),
            request(vec![1], [0.0, 0.0, 0.0, 2.0]),
        ];
        let out = g.generate(&batch, &cancel).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].len(), 2);
        assert_eq!(out[1].len(), 1);
        let img = &out[0][0].image;
        assert_eq!((img.width, img.height, img.rgb.len()), (8, 8, 8 * 8 * 3));
        // Same request and seed: the same image, alone or in a batch, and after reloading.
        let alone = g.generate(&batch[..1], &cancel).unwrap();
        assert_eq!(alone[0][0].image, out[0][0].image);
        let again = StyleDiffusion::load(dir.path(), None).unwrap();
        assert_eq!(
            again.generate(&batch, &cancel).unwrap()[1][0].image,
            out[1][0].image
        );
        // Another seed or another style: another image.
        assert_ne!(out[0][0].image, out[0][1].image);
        assert_ne!(out[0][0].image, out[1][0].image);
        // Cancelled: stops.
        cancel.cancel();
        assert!(matches!(
            g.generate(&batch, &cancel),
            Err(ModelError::Cancelled)
        ));
    }

    #[test]
    fn style_condition_falls_back_to_the_reference_and_checks_dims() {
        let cfg = tiny_config();
        let mut req = request(vec![1], [0.0, 3.0, 0.0, 4.0]);
        assert_eq!(
            style_conditions(&cfg, &req, None).unwrap().style,
            vec![0.0, 0.6, 0.0, 0.8]
        );
        req.preference = Some(Arc::from(vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0]));
        assert_eq!(
            style_conditions(&cfg, &req, None).unwrap().style,
            vec![0.0, 1.0, 0.0, 0.0]
        );
        req.preference = None;
        assert_eq!(
            style_conditions(&cfg, &req, None).unwrap().style,
            vec![0.0, 1.0, 0.0, 0.0]
        );
        req.preference = Some(Arc::from(vec![1.0; 9]));
        let err = style_conditions(&cfg, &req, None).unwrap_err().to_string();
        assert!(err.contains("6-value") && err.contains("got 9"), "{err}");
    }

    #[test]
    fn the_style_snap_sharpens_the_preference_onto_the_codebook() {
        let book = vec![vec![2.0, 0.0, 0.0, 0.0], vec![0.0, 0.0, 0.0, 1.0]];
        let between = normalized(&[0.8, 0.0, 0.0, 0.6]).0;
        // Temperature 0: the nearest entry, normalized.
        let hard = StyleSnap::new(&book, 0.0).unwrap();
        assert_eq!(hard.sharpen(&between), vec![1.0, 0.0, 0.0, 0.0]);
        // A small temperature leans further toward it than the mixture did; 1 keeps it softer.
        let ratio = |v: &[f32]| v[0] / v[3];
        let sharp = StyleSnap::new(&book, 0.1).unwrap().sharpen(&between);
        let soft = StyleSnap::new(&book, 1.0).unwrap().sharpen(&between);
        assert!(
            ratio(&sharp) > 7.0 && ratio(&soft) < ratio(&between),
            "{sharp:?} {soft:?}"
        );
        for v in [&sharp, &soft] {
            assert!((v.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-5);
        }
        // Opposite entries weighed alike cancel out: the nearest one stands.
        let opposite = StyleSnap::new(&[vec![1.0, 0.0], vec![-1.0, 0.0]], 0.5).unwrap();
        assert_eq!(opposite.sharpen(&[0.0, 1.0]), vec![1.0, 0.0]);
        // Bad codebooks and temperatures are named.
        for (entries, t, says) in [
            (vec![], 0.0, "non-empty codebook"),
            (vec![vec![1.0, 0.0], vec![1.0]], 0.0, "entry 1 has 1 values"),
            (vec![vec![0.0, 0.0]], 0.0, "non-zero"),
            (vec![vec![1e-30, 1e-30]], 0.0, "non-zero"),
            (vec![vec![1.0, 0.0]], -0.5, "snap temperature"),
            (vec![vec![1.0, 0.0]], f32::NAN, "snap temperature"),
        ] {
            let e = StyleSnap::new(&entries, t).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
        // Only the preference is snapped: the reference's own style and the fallback are not.
        let cfg = tiny_config();
        let req = request(vec![1], [0.8, 0.0, 0.0, 0.6]);
        let snapped = style_conditions(&cfg, &req, Some(&hard)).unwrap();
        assert_eq!(snapped.style, vec![1.0, 0.0, 0.0, 0.0]);
        assert_eq!(snapped.own, vec![0.0, 1.0, 0.0, 0.0]);
        let alone = GenerationRequest {
            preference: None,
            ..req
        };
        assert_eq!(
            style_conditions(&cfg, &alone, Some(&hard)).unwrap().style,
            vec![0.0, 1.0, 0.0, 0.0]
        );
    }

    #[test]
    fn the_style_snap_needs_the_bundle_s_codebook_and_changes_the_images() {
        let dir = tempfile::tempdir().unwrap();
        save_bundle(dir.path(), &tiny_config(), 3);
        let err = StyleDiffusion::load(dir.path(), None)
            .unwrap()
            .with_style_snap(Some(0.0))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("style codebook") && err.contains("--codebook-only"),
            "{err}"
        );
        // A bad codebook stops the load with the key named.
        let bad = GeneratorConfig {
            style_codebook: vec![vec![1.0, 0.0]],
            ..tiny_config()
        };
        let bad_dir = tempfile::tempdir().unwrap();
        save_bundle(bad_dir.path(), &tiny_config(), 3);
        std::fs::write(
            bad_dir.path().join("config.json"),
            serde_json::to_vec(&bad).unwrap(),
        )
        .unwrap();
        let err = StyleDiffusion::load(bad_dir.path(), None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("style_codebook entry 0 has 2 values"), "{err}");

        let with_book = GeneratorConfig {
            style_codebook: vec![vec![1.0, 0.0, 0.0, 0.0], vec![0.0, 0.0, 0.0, 1.0]],
            ..tiny_config()
        };
        save_bundle(dir.path(), &with_book, 3);
        let plain = StyleDiffusion::load(dir.path(), None).unwrap();
        let snapped = StyleDiffusion::load(dir.path(), None)
            .unwrap()
            .with_style_snap(Some(0.0))
            .unwrap();
        assert!(
            snapped.version().ends_with("+snap0"),
            "{}",
            snapped.version()
        );
        let cancel = CancellationToken::new();
        let image = |g: &StyleDiffusion, style: [f32; 4]| {
            g.generate(&[request(vec![4], style)], &cancel).unwrap()[0][0]
                .image
                .clone()
        };
        // A preference between the entries is drawn as its nearest one; an entry itself as before.
        let between = [0.8, 0.0, 0.0, 0.6];
        assert_eq!(
            image(&snapped, between),
            image(&plain, [1.0, 0.0, 0.0, 0.0])
        );
        assert_ne!(image(&plain, between), image(&snapped, between));
        assert_eq!(
            image(&snapped, [0.0, 0.0, 0.0, 1.0]),
            image(&plain, [0.0, 0.0, 0.0, 1.0])
        );
        // Off again: as the bundle draws without it.
        let off = snapped.with_style_snap(None).unwrap();
        assert_eq!(image(&off, between), image(&plain, between));
    }

    #[test]
    fn the_own_style_gate_keeps_a_reference_already_in_the_preferred_look() {
        let dir = tempfile::tempdir().unwrap();
        save_bundle(dir.path(), &tiny_config(), 3);
        let err = StyleDiffusion::load(dir.path(), None)
            .unwrap()
            .with_own_style_gate(true)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("style codebook"), "{err}");
        // The reference's own style (see `request`) is the second entry.
        let with_book = GeneratorConfig {
            style_codebook: vec![
                vec![1.0, 0.0, 0.0, 0.0],
                vec![0.0, 1.0, 0.0, 0.0],
                vec![0.0, 0.0, 0.0, 1.0],
            ],
            ..tiny_config()
        };
        save_bundle(dir.path(), &with_book, 3);
        let plain = StyleDiffusion::load(dir.path(), None).unwrap();
        let gated = StyleDiffusion::load(dir.path(), None)
            .unwrap()
            .with_own_style_gate(true)
            .unwrap();
        assert!(gated.version().ends_with("+keep"), "{}", gated.version());
        let cancel = CancellationToken::new();
        let images = |g: &StyleDiffusion, style: [f32; 4]| -> Vec<Image> {
            g.generate(&[request(vec![4, 5], style)], &cancel).unwrap()[0]
                .iter()
                .map(|c| c.image.clone())
                .collect()
        };
        // Nearest the reference's own entry: the reference itself, whatever the seed.
        let own_look = [0.2, 1.0, 0.0, 0.1];
        let kept = images(&gated, own_look);
        assert_eq!(kept[0], kept[1]);
        assert_ne!(images(&plain, own_look)[0], kept[0]);
        // Nearest another entry: drawn as without the gate.
        let other_look = [1.0, 0.2, 0.0, 0.0];
        assert_eq!(images(&gated, other_look), images(&plain, other_look));
        assert_ne!(images(&gated, other_look)[0], kept[0]);
    }

    #[test]
    fn style_agreement_is_read_off_the_preference_and_its_agreement() {
        use crate::history::HistoryEntry;
        use crate::preference::{preference, Weighted};
        let cfg = tiny_config();
        // Unit item embeddings: a content block of 2 and a style block of 4, each unit, weighed
        // 0.8 / 0.6 (the reference's style block therefore has length 0.6).
        let item = |content: [f32; 2], style: [f32; 4]| -> Vec<f32> {
            let mut v: Vec<f32> = content.iter().map(|x| 0.8 * x).collect();
            v.extend(style.iter().map(|x| 0.6 * x));
            v
        };
        let entry = |i: usize, e: Vec<f32>| HistoryEntry {
            event_id: format!("e{i}"),
            user_id: "u".into(),
            item_id: format!("i{i}"),
            action: crate::event::Action::Click,
            ts_ms: 0,
            embedding: e.into(),
        };
        let halves = [0, 1].map(|index| Weighted {
            index,
            similarity: 1.0,
            weight: 0.5,
        });
        let agreement = |history: &[HistoryEntry]| {
            let (p, a) = preference(history, &halves, 6).unwrap();
            let mut req = request(vec![1], [0.0; 4]);
            req.reference_embedding = Arc::from(item([1.0, 0.0], [0.0, 1.0, 0.0, 0.0]));
            req.preference = Some(Arc::from(p));
            req.preference_agreement = Some(a);
            style_conditions(&cfg, &req, None).unwrap().agreement
        };
        // Same style, different content: the styles agree fully.
        let same = [
            entry(0, item([1.0, 0.0], [1.0, 0.0, 0.0, 0.0])),
            entry(1, item([0.0, 1.0], [1.0, 0.0, 0.0, 0.0])),
        ];
        assert!(
            (agreement(&same) - 1.0).abs() < 1e-5,
            "{}",
            agreement(&same)
        );
        // Orthogonal styles, half each: |(s₁ + s₂) / 2| = 1/√2, whatever the content does.
        let mixed = [
            entry(0, item([1.0, 0.0], [1.0, 0.0, 0.0, 0.0])),
            entry(1, item([1.0, 0.0], [0.0, 0.0, 1.0, 0.0])),
        ];
        let half = std::f32::consts::FRAC_1_SQRT_2;
        assert!(
            (agreement(&mixed) - half).abs() < 1e-5,
            "{}",
            agreement(&mixed)
        );
        // Without an agreement on the request: taken as settled.
        let req = request(vec![1], [1.0, 0.0, 0.0, 0.0]);
        assert_eq!(style_conditions(&cfg, &req, None).unwrap().agreement, 1.0);
    }

    #[test]
    fn the_agreement_ramp_keeps_less_of_a_mixed_history_s_restyle() {
        let ramp = AgreementRamp {
            low: 0.6,
            high: 0.8,
        };
        assert_eq!(ramp.share(0.5), 0.0);
        assert!((ramp.share(0.7) - 0.5).abs() < 1e-6);
        assert_eq!(ramp.share(0.95), 1.0);
        for bad in [
            (0.8, 0.6),
            (0.5, 0.5),
            (-0.1, 0.5),
            (0.2, 1.5),
            (f32::NAN, 1.0),
        ] {
            let r = AgreementRamp {
                low: bad.0,
                high: bad.1,
            };
            assert!(r.check().is_err(), "{bad:?}");
        }

        let dir = tempfile::tempdir().unwrap();
        save_bundle(dir.path(), &tiny_config(), 5);
        let cancel = CancellationToken::new();
        let plain = StyleDiffusion::load(dir.path(), None).unwrap();
        let ramped = StyleDiffusion::load(dir.path(), None)
            .unwrap()
            .with_agreement_ramp(Some(ramp))
            .unwrap();
        assert!(
            ramped.version().ends_with("@3+agree0.6:0.8"),
            "{}",
            ramped.version()
        );
        let image = |g: &StyleDiffusion, req: &GenerationRequest| {
            g.generate(std::slice::from_ref(req), &cancel).unwrap()[0][0]
                .image
                .clone()
        };
        // The request's style block has length 0.6 of the unit preference (0.8 content), as
        // the reference's: its style agreement is the request's agreement.
        let mut req = request(vec![4], [0.0, 0.0, 0.6, 0.0]);
        req.reference_embedding = Arc::from(vec![0.8, 0.0, 0.6, 0.0, 0.0, 0.0]);
        req.preference = Some(Arc::from(vec![0.8, 0.0, 0.0, 0.0, 0.6, 0.0]));
        let reference =
            tensor_to_images(&images_to_tensor(&[&*req.reference], 8, &Device::Cpu).unwrap())
                .unwrap()
                .remove(0);
        // Settled: the whole restyle, as without the ramp.
        req.preference_agreement = Some(0.9);
        assert_eq!(image(&ramped, &req), image(&plain, &req));
        // Disagreeing: none of it, the reference comes back.
        req.preference_agreement = Some(0.5);
        let back = image(&ramped, &req);
        assert_ne!(back, image(&plain, &req));
        assert_eq!(back, reference);
        // In between: part of it.
        req.preference_agreement = Some(0.7);
        let part = image(&ramped, &req);
        assert!(part != back && part != image(&plain, &req));
        assert!(StyleDiffusion::load(dir.path(), None)
            .unwrap()
            .with_agreement_ramp(Some(AgreementRamp {
                low: 0.9,
                high: 0.1
            }))
            .is_err());
    }

    #[test]
    fn guidance_amplifies_only_what_the_preference_changes() {
        let dir = tempfile::tempdir().unwrap();
        save_bundle(dir.path(), &tiny_config(), 5);
        let cancel = CancellationToken::new();
        let plain = StyleDiffusion::load(dir.path(), None).unwrap();
        let guided = StyleDiffusion::load(dir.path(), None)
            .unwrap()
            .with_guidance(2.0)
            .unwrap();
        assert!(guided.version().ends_with("@3+g2"), "{}", guided.version());
        let image = |g: &StyleDiffusion, req: &GenerationRequest| {
            g.generate(std::slice::from_ref(req), &cancel).unwrap()[0][0]
                .image
                .clone()
        };
        // A preference whose style is the reference's own: nothing to amplify.
        let same = request(vec![4], [0.0, 1.0, 0.0, 0.0]);
        assert_eq!(image(&guided, &same), image(&plain, &same));
        // Another style: guidance moves the image further from the reference, deterministically.
        let other = request(vec![4], [1.0, 0.0, 0.0, 0.0]);
        let (a, b) = (image(&plain, &other), image(&guided, &other));
        assert_ne!(a, b);
        assert_eq!(image(&guided, &other), b);
        // One step: the guided image's residual from the own-style image is (1 + g) times the
        // plain one's, up to clamping and rounding.
        let one = |g: f32| {
            StyleDiffusion::load(dir.path(), Some(1))
                .unwrap()
                .with_guidance(g)
                .unwrap()
        };
        let own = image(&one(0.0), &same);
        let dist = |img: &Image| -> f64 {
            img.rgb
                .iter()
                .zip(&own.rgb)
                .map(|(x, y)| (*x as f64 - *y as f64).abs())
                .sum::<f64>()
        };
        let (d_plain, d_guided) = (
            dist(&image(&one(0.0), &other)),
            dist(&image(&one(2.0), &other)),
        );
        assert!(
            d_plain > 0.0 && d_guided > 1.5 * d_plain,
            "{d_guided} vs {d_plain}"
        );
        // Guidance 0 is the plain sampler; out-of-range scales are refused.
        let zero = StyleDiffusion::load(dir.path(), None)
            .unwrap()
            .with_guidance(0.0)
            .unwrap();
        assert_eq!(image(&zero, &other), a);
        assert_eq!(zero.version(), plain.version());
        for bad in [-1.0, f32::NAN, 9.0] {
            let err = StyleDiffusion::load(dir.path(), None)
                .unwrap()
                .with_guidance(bad)
                .err()
                .expect("refused")
                .to_string();
            assert!(err.contains("guidance"), "{err}");
        }
    }

    /// A tiny encoder (8×8, vendors a and b) and a generator bundle on its embeddings, and a
    /// request for `seeds` whose reference has style [0, 1, 0, 0] and whose preference `style`.
    fn guided_fixture(
        seeds: Vec<u64>,
        style: [f32; 4],
    ) -> (
        tempfile::TempDir,
        tempfile::TempDir,
        Arc<EmojiEncoder>,
        GenerationRequest,
    ) {
        use crate::model::emoji::CONTENT_DIM;
        let (enc_dir, gen_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        crate::data::simulate::testdata::tiny_encoder_for(
            enc_dir.path(),
            vec!["a".into(), "b".into()],
            8,
        );
        let encoder = Arc::new(EmojiEncoder::load(enc_dir.path(), None).unwrap());
        let gen_cfg = GeneratorConfig {
            channels: 4,
            time_features: 4,
            steps: 2,
            ..GeneratorConfig::new(8, CONTENT_DIM + 4, CONTENT_DIM, 4)
        };
        save_bundle(gen_dir.path(), &gen_cfg, 3);
        let mut req = request(seeds, style);
        let embedding = |style: [f32; 4]| -> Arc<[f32]> {
            let mut v = vec![0.05; CONTENT_DIM];
            v.extend(style);
            Arc::from(v)
        };
        req.reference_embedding = embedding([0.0, 1.0, 0.0, 0.0]);
        req.preference = Some(embedding(style));
        (enc_dir, gen_dir, encoder, req)
    }

    #[test]
    fn identity_guidance_holds_the_reference_content() {
        let (_enc_dir, gen_dir, encoder, req) = guided_fixture(vec![1, 2], [1.0, 0.0, 0.0, 0.0]);
        let cancel = CancellationToken::new();
        let images = |g: &StyleDiffusion| -> Vec<Image> {
            g.generate(std::slice::from_ref(&req), &cancel).unwrap()[0]
                .iter()
                .map(|c| c.image.clone())
                .collect()
        };
        let net = encoder.net();
        let reference =
            images_to_tensor(&[&*req.reference, &*req.reference], 8, &Device::Cpu).unwrap();
        let target = l2_normalize(&net.forward(&reference).unwrap().content).unwrap();
        let style_target =
            Tensor::new(&[[1f32, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], &Device::Cpu).unwrap();
        // Each row's cosine of the content (or style) of `reference + x0` to its target.
        let cosines = |x0: &Tensor, style: bool| -> Vec<f32> {
            let f = net.forward(&(&reference + x0).unwrap()).unwrap();
            let (v, t) = match style {
                false => (f.content, &target),
                true => (f.style, &style_target),
            };
            (l2_normalize(&v).unwrap() * t)
                .unwrap()
                .sum(1)
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let x0 = (Tensor::from_vec(seeded_noise(5, 2 * 3 * 64), (2, 3, 8, 8), &Device::Cpu)
            .unwrap()
            * 0.5)
            .unwrap();
        // One identity step raises each row's content cosine to the reference, one style step its
        // style cosine to the target block.
        for (scales, style) in [
            (
                EncoderScales {
                    identity: 0.1,
                    ..Default::default()
                },
                false,
            ),
            (
                EncoderScales {
                    style: 0.1,
                    ..Default::default()
                },
                true,
            ),
        ] {
            let targets = (&target, &style_target);
            let after = climb_encoder(net, &reference, targets, x0.clone(), &scales).unwrap();
            for (b, a) in cosines(&x0, style).iter().zip(cosines(&after, style)) {
                assert!(a > *b, "{scales:?}: cosine {a} after the step, {b} before");
            }
        }
        // The fidelity floor keeps the largest share of each residual whose image holds the
        // floor: a floor between the two rows' cosines keeps the nearer row whole and shrinks
        // the other; a floor above what any share reaches gives the reference back.
        let x0 = (x0 * 4.0).unwrap();
        // The residual of the published (clamped) image, which the floor judges.
        let clamped = |x: &Tensor| {
            ((&reference + x).unwrap().clamp(-1f32, 1f32).unwrap() - &reference).unwrap()
        };
        let full = cosines(&clamped(&x0), false);
        let floor = (full[0] + full[1]) / 2.0;
        let tenths = floor_shares(1.0);
        assert_eq!(tenths.len(), 10);
        assert_eq!((tenths[0], tenths[9]), (1.0, 0.1));
        let floored =
            floor_fidelity(net, &reference, &target, &x0, (floor, None), &tenths).unwrap();
        let (near, far) = if full[0] > full[1] { (0, 1) } else { (1, 0) };
        let row = |t: &Tensor, i: usize| {
            t.get(i)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(row(&floored, near), row(&x0, near));
        let kept = cosines(&clamped(&floored), false)[far];
        assert!(
            row(&floored, far) == vec![0.0; 3 * 64] || kept >= floor,
            "cosine {kept} under the floor {floor}"
        );
        assert_ne!(row(&floored, far), row(&x0, far));
        // Above a share of 1, a floor every share holds scales every residual by the largest.
        let wide = floor_shares(2.0);
        assert_eq!((wide.len(), wide[0]), (20, 2.0));
        let all = floor_fidelity(net, &reference, &target, &x0, (-1.0, None), &wide).unwrap();
        assert_eq!(
            all.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            (&x0 * 2.0)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
        // A row capped at 1 (one the agreement ramp scaled down) takes no share above it.
        let capped = floor_fidelity(
            net,
            &reference,
            &target,
            &x0,
            (-1.0, Some(&[1.0, f32::INFINITY])),
            &wide,
        )
        .unwrap();
        assert_eq!(row(&capped, 0), row(&x0, 0));
        assert_eq!(row(&capped, 1), row(&(&x0 * 2.0).unwrap(), 1));
        let none =
            floor_fidelity(net, &reference, &target, &x0, (0.999_999, None), &tenths).unwrap();
        assert!(
            none.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                == 0.0
        );

        let plain = StyleDiffusion::load(gen_dir.path(), None).unwrap();
        let guided = StyleDiffusion::load(gen_dir.path(), None)
            .unwrap()
            .with_identity_guidance(encoder.clone(), 20.0)
            .unwrap();
        assert!(
            guided.version().ends_with("@2+id20"),
            "{}",
            guided.version()
        );
        let (a, b) = (images(&plain), images(&guided));
        assert_ne!(a, b);
        assert_eq!(images(&guided), b, "deterministic");
        // Scale 0 is the plain sampler; out-of-range scales and an encoder of other embeddings
        // are refused.
        let off = StyleDiffusion::load(gen_dir.path(), None)
            .unwrap()
            .with_identity_guidance(encoder.clone(), 0.0)
            .unwrap();
        assert_eq!((images(&off), off.version()), (a.clone(), plain.version()));
        // Style climbing and repeated steps change the images and are named in the version.
        let both = StyleDiffusion::load(gen_dir.path(), None)
            .unwrap()
            .with_encoder_guidance(
                encoder.clone(),
                EncoderScales {
                    identity: 20.0,
                    style: 5.0,
                    iters: 3,
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(
            both.version().ends_with("@2+id20+st5x3"),
            "{}",
            both.version()
        );
        let floored = EncoderScales {
            fidelity_floor: 0.6,
            floor_max_share: 1.5,
            ..Default::default()
        };
        assert_eq!(
            sampling_version("b", 2, 0.0, floored, None, None, None),
            "b@2+floor0.6:1.5"
        );
        assert_eq!(
            sampling_version("b", 2, 0.0, floored, Some("guard"), None, None),
            "b@2+floor0.6:1.5~guard"
        );
        let c = images(&both);
        assert!(c != a && c != b);
        assert_eq!(images(&both), c, "deterministic");
        // What `with_encoder_guidance` says when it refuses `scales`.
        let refusal = |scales: EncoderScales| {
            StyleDiffusion::load(gen_dir.path(), None)
                .unwrap()
                .with_encoder_guidance(encoder.clone(), scales)
                .err()
                .expect("refused")
                .to_string()
        };
        for bad in [
            EncoderScales {
                style: -1.0,
                ..Default::default()
            },
            EncoderScales {
                identity: 1.0,
                iters: 0,
                ..Default::default()
            },
        ] {
            let err = refusal(bad);
            assert!(err.contains("guidance"), "{err}");
        }
        let err = refusal(EncoderScales {
            fidelity_floor: 0.5,
            floor_max_share: 0.5,
            ..Default::default()
        });
        assert!(err.contains("largest share"), "{err}");
        for bad in [-1.0, f32::NAN, 2000.0] {
            let err = StyleDiffusion::load(gen_dir.path(), None)
                .unwrap()
                .with_identity_guidance(encoder.clone(), bad)
                .err()
                .expect("refused")
                .to_string();
            assert!(err.contains("identity guidance"), "{err}");
        }
        let other = tempfile::tempdir().unwrap();
        save_bundle(other.path(), &tiny_config(), 3);
        let err = StyleDiffusion::load(other.path(), None)
            .unwrap()
            .with_identity_guidance(encoder, 1.0)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("6-value"), "{err}");
    }

    #[test]
    fn draws_keep_the_one_whose_style_reads_closest_to_the_condition() {
        let condition = [0.0f32, 0.0, 1.0, 0.0];
        let (_enc_dir, gen_dir, encoder, req) = guided_fixture((0..25).collect(), condition);
        // A second request with another condition: 28 candidates × 3 draws span two passes.
        let other = [0.0f32, 0.0, 0.0, 1.0];
        let mut req2 = req.clone();
        req2.seeds = vec![100, 101, 102];
        let mut p = req.preference.as_deref().unwrap().to_vec();
        let n = p.len();
        p[n - 4..].copy_from_slice(&other);
        req2.preference = Some(Arc::from(p));
        let batch = [req.clone(), req2];
        let cancel = CancellationToken::new();
        let images = |g: &StyleDiffusion, reqs: &[GenerationRequest]| -> Vec<Vec<Image>> {
            g.generate(reqs, &cancel)
                .unwrap()
                .into_iter()
                .map(|cands| cands.into_iter().map(|c| c.image).collect())
                .collect()
        };
        let with_draws = |draws: usize| {
            StyleDiffusion::load(gen_dir.path(), None)
                .unwrap()
                .with_encoder_guidance(
                    encoder.clone(),
                    EncoderScales {
                        draws,
                        ..Default::default()
                    },
                )
        };
        // One draw samples what plain sampling does; the version names more.
        let plain = StyleDiffusion::load(gen_dir.path(), None).unwrap();
        let one = with_draws(1).unwrap();
        assert_eq!(images(&one, &batch), images(&plain, &batch));
        assert_eq!(one.version(), plain.version());
        let three = with_draws(3).unwrap();
        assert!(
            three.version().ends_with("@2+draws3"),
            "{}",
            three.version()
        );
        let picked = images(&three, &batch);
        assert_eq!(images(&three, &batch), picked, "deterministic");
        // Each candidate's image is the draw (sampled alone from its draw seed) whose style the
        // encoder reads closest to its request's condition; not always the first.
        let style_cos = |image: &Image, condition: [f32; 4]| -> f32 {
            let t = images_to_tensor(&[image], 8, &Device::Cpu).unwrap();
            let read = l2_normalize(&encoder.net().forward(&t).unwrap().style).unwrap();
            let v = read.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.iter().zip(condition).map(|(a, b)| a * b).sum()
        };
        let mut later_draws = 0;
        for ((r, cond), picks) in batch.iter().zip([condition, other]).zip(&picked) {
            for (k, &seed) in r.seeds.iter().enumerate() {
                let mut alone = r.clone();
                alone.seeds = (0..3).map(|j| draw_seed(seed, j)).collect();
                let drawn = images(&plain, std::slice::from_ref(&alone)).remove(0);
                assert!(drawn[0] != drawn[1] && drawn[1] != drawn[2]);
                let best = drawn
                    .iter()
                    .map(|d| style_cos(d, cond))
                    .fold(f32::MIN, f32::max);
                let pos = drawn
                    .iter()
                    .position(|d| *d == picks[k])
                    .expect("one of its draws");
                assert!(style_cos(&drawn[pos], cond) >= best - 5e-3);
                later_draws += (pos > 0) as usize;
            }
        }
        assert!(later_draws > 0, "every pick was the first draw");
        // Out of range: refused, naming it.
        for bad in [0, 17] {
            let err = with_draws(bad).err().expect("refused").to_string();
            assert!(err.contains("draws per candidate"), "{err}");
        }
    }

    #[test]
    fn a_fidelity_guard_judges_the_floor() {
        use crate::data::simulate::testdata::tiny_encoder_seeded;
        use crate::model::emoji::CONTENT_DIM;
        let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
        let vendors = || vec!["a".to_string(), "b".to_string()];
        // The guided encoder, a guard with other weights, one with the same, one at 16×16.
        for (dir, (res, seed)) in dirs.iter().zip([(8, 3), (8, 4), (8, 3), (16, 4)]) {
            tiny_encoder_seeded(dir.path(), vendors(), res, seed);
        }
        let load = |i: usize| Arc::new(EmojiEncoder::load(dirs[i].path(), None).unwrap());
        let (encoder, guard, twin, wide) = (load(0), load(1), load(2), load(3));
        let gen_dir = tempfile::tempdir().unwrap();
        let gen_cfg = GeneratorConfig {
            channels: 4,
            time_features: 4,
            steps: 2,
            ..GeneratorConfig::new(8, CONTENT_DIM + 4, CONTENT_DIM, 4)
        };
        save_bundle(gen_dir.path(), &gen_cfg, 3);
        let net = StyleNet::new(
            gen_cfg,
            load_bundle::<GeneratorConfig>(gen_dir.path(), &Device::Cpu)
                .unwrap()
                .1,
        )
        .unwrap();
        // An image in [-1, 1], as the generator's references are.
        let reference = (Tensor::from_vec(seeded_noise(1, 2 * 3 * 64), (2, 3, 8, 8), &Device::Cpu)
            .unwrap()
            * 0.5)
            .unwrap()
            .clamp(-1f32, 1f32)
            .unwrap();
        let style = Tensor::new(&[[1f32, 0.0, 0.0, 0.0]; 2], &Device::Cpu).unwrap();
        let sample = |scales: EncoderScales, guard: Option<&EmojiNet>| -> Tensor {
            let noise =
                Tensor::from_vec(seeded_noise(9, 2 * 3 * 64), (2, 3, 8, 8), &Device::Cpu).unwrap();
            let guide = Guidance {
                style: None,
                encoder: Some((encoder.net(), scales)),
                guard,
                strength: None,
            };
            net.sample_guided(&reference, &style, guide, noise, 2, None)
                .unwrap()
        };
        // The guard's content cosine of each image to the reference.
        let guard_cos = |images: &Tensor| -> Vec<f32> {
            let c = |x: &Tensor| l2_normalize(&guard.net().forward(x).unwrap().content).unwrap();
            (c(images) * c(&reference))
                .unwrap()
                .sum(1)
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let row = |t: &Tensor, i: usize| t.get(i).unwrap().flatten_all().unwrap().to_vec1::<f32>();
        let climbs = EncoderScales {
            identity: 2.0,
            ..Default::default()
        };
        let free = sample(climbs, None);
        let full = guard_cos(&free);
        // A floor between the two images' guard cosines: the guard keeps the nearer image whole
        // and shrinks the other until it holds the floor (or gives the reference back).
        let floor = (full[0] + full[1]) / 2.0;
        assert!(floor > 0.0 && floor < 1.0, "{full:?}");
        let floored = EncoderScales {
            fidelity_floor: floor,
            ..climbs
        };
        let guarded = sample(floored, Some(guard.net()));
        let (near, far) = if full[0] > full[1] { (0, 1) } else { (1, 0) };
        assert_eq!(row(&guarded, near).unwrap(), row(&free, near).unwrap());
        assert_ne!(row(&guarded, far).unwrap(), row(&free, far).unwrap());
        let kept = guard_cos(&guarded)[far];
        assert!(
            row(&guarded, far).unwrap() == row(&reference, far).unwrap() || kept >= floor,
            "guard cosine {kept} under the floor {floor}"
        );
        // A guard with the guided encoder's weights judges as the guided encoder does.
        let unguarded = sample(floored, None)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>();
        let twinned = sample(floored, Some(twin.net()))
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>();
        assert_eq!(unguarded.unwrap(), twinned.unwrap());
        // The generator names its guard; a guard of another resolution is refused.
        let scales = EncoderScales {
            fidelity_floor: 0.5,
            ..climbs
        };
        let g = StyleDiffusion::load(gen_dir.path(), None)
            .unwrap()
            .with_encoder_guidance(encoder.clone(), scales)
            .unwrap()
            .with_fidelity_guard(guard.clone())
            .unwrap();
        let name = dirs[1]
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        assert!(
            g.version().ends_with(&format!("+floor0.5:1~{name}")),
            "{}",
            g.version()
        );
        let err = StyleDiffusion::load(gen_dir.path(), None)
            .unwrap()
            .with_fidelity_guard(wide)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("16×16"), "{err}");
    }

    #[test]
    fn bundle_errors_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let err = StyleDiffusion::load(dir.path(), None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("config.json"), "{err}");
        save_bundle(dir.path(), &tiny_config(), 1);
        let mut wrong = tiny_config();
        wrong.channels = 8;
        std::fs::write(
            dir.path().join("config.json"),
            serde_json::to_vec(&wrong).unwrap(),
        )
        .unwrap();
        let err = StyleDiffusion::load(dir.path(), None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("shape") || err.contains("inc"), "{err}");
        let mut bad = tiny_config();
        bad.style_offset = 5;
        std::fs::write(
            dir.path().join("config.json"),
            serde_json::to_vec(&bad).unwrap(),
        )
        .unwrap();
        let err = StyleDiffusion::load(dir.path(), None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("style block"), "{err}");
        std::fs::write(
            dir.path().join("config.json"),
            serde_json::to_vec(&tiny_config()).unwrap(),
        )
        .unwrap();
        let err = StyleDiffusion::load(dir.path(), Some(0))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("steps"), "{err}");
    }

    #[test]
    fn the_schedule_runs_from_noise_to_data() {
        assert!(alpha_bar(1.0) < 1e-3);
        assert!(alpha_bar(0.0) > 0.999);
        let mut prev = 1.0;
        for i in 0..=10 {
            let a = alpha_bar(i as f64 / 10.0);
            assert!(a <= prev);
            prev = a;
        }
    }
}
