//! Stable Diffusion (v1.5, v2.1, Turbo) as a [`Generator`]: ragar's UNet ([`super::unet`],
//! attention in the model's dtype) and VAE ([`super::autoencoder`]) with candle-transformers'
//! CLIP, on weights the user provides in the **diffusers layout**.
//!
//! # Directory
//!
//! ```text
//! unet/config.json            unet/diffusion_pytorch_model.safetensors
//! vae/config.json             vae/diffusion_pytorch_model.safetensors
//! text_encoder/config.json    text_encoder/model.safetensors
//! tokenizer/tokenizer.json    (the HF `tokenizers` format; tokenizer/special_tokens_map.json,
//!                              when present, names the pad token)
//! scheduler/scheduler_config.json
//! ```
//!
//! (`*.fp16.safetensors` is taken where the plain file is absent.) The JSON files are read for the
//! fields the models need ([`UNetFile`], [`VaeFile`], [`TextEncoderFile`], [`SchedulerFile`]; other
//! keys are ignored) and mapped onto candle's `UNet2DConditionModelConfig`, `AutoEncoderKLConfig`
//! and CLIP configurations, so v1.5, v2.1 (OpenCLIP text encoder with gelu, linear projections,
//! heads per block, v-prediction) and Turbo (trailing timesteps) differ by their files alone.
//! A missing file, a missing or mistyped key, a configuration candle cannot build and weights that
//! do not match their configuration are [`ModelError::Bundle`] errors naming the file and the key.
//!
//! candle's SD CLIP configuration (`stable_diffusion::clip::Config`) can only be built from its
//! named constructors, so text encoders take one of two routes: `quick_gelu` encoders (v1.5 and
//! any size, the tiny one included) are built with `clip::text_model` from the file's sizes, and
//! `gelu` encoders (the OpenCLIP encoder of v2.x and Turbo) with `stable_diffusion::clip::Config::
//! v2_1()`, which must match the file's sizes.
//!
//! # Sampling: img2img, deterministic per seed
//!
//! 1. The reference is resized (stretched) to the model's square resolution (`unet.sample_size` ×
//!    the VAE's downsampling factor) and encoded by ragar's VAE encoder
//!    ([`super::autoencoder::VaeEncoder`]) to the **posterior mean**, never a sample (candle's
//!    `DiagonalGaussianDistribution` samples with the unseedable `randn`).
//! 2. Noise comes from the candidate's seed ([`seeded_noise`]), never from candle's generator.
//!    `steps` is the number of denoising steps actually run; the DDIM schedule has
//!    ⌈steps / strength⌉ points, the latent is noised to the first of the last `steps` of them
//!    and denoised from there (strength 1 starts from pure noise; SD-Turbo's usual img2img, two
//!    points at strength 0.5, is `steps = 1, strength = 0.5`).
//! 3. Every step is DDIM with η = 0, whatever scheduler the bundle names: its betas, prediction
//!    type and timestep spacing come from `scheduler_config.json`, while its stochastic samplers
//!    (Euler ancestral, DDIM with η > 0) would draw from candle's unseedable generator. With
//!    `guidance > 1` classifier-free guidance runs the UNet on [unconditional, conditional];
//!    otherwise (Turbo) the conditional half alone.
//! 4. The VAE decodes; images come out at the **model's resolution** (like the EmojiStyle
//!    generator), one [`Candidate`] per seed, without an embedding (the ranker embeds them).
//!
//! The same request and seed give the same bytes on the same device and build; the
//! [`CancellationToken`] is checked before every UNet step and before decoding.
//!
//! # The preference as a prompt
//!
//! The user's preference reaches SD as text ([`build_prompt`]): `an emoji of <reference text>, in
//! the style of <t1>; <t2>; <t3>` where `t1..t3` are the texts of the heaviest history items of the
//! retrieval-weighted preference ([`GenerationRequest::prompt_hints`]). The unconditional prompt
//! of guidance is the empty string.
//!
//! # Tiny model and timing
//!
//! [`write_tiny`] writes a random-weight model in the same layout (64×64, latent 8×8; loads and
//! samples in well under a second on a CPU) through the real builders, so its tensor names are
//! the ones the loader asks for; `ragar sd init-tiny` exposes it. [`bench`] times the SD1.5
//! architecture with random weights exactly as `shared/tools/sd_unet_anchor.py` times diffusers
//! (`ragar bench sd`), with ragar's UNet or, for comparison, candle-transformers' one; on CUDA it
//! lets f32 matrix products use TF32 ([`allow_tf32`]) as the anchor does.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use candle_transformers::models::clip::text_model as clip_text;
use candle_transformers::models::stable_diffusion::schedulers::{
    BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing,
};
use candle_transformers::models::stable_diffusion::{clip as sd_clip, ddim, unet_2d, vae};

use super::autoencoder::{VaeDecoder, VaeEncoder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;
use tokio_util::sync::CancellationToken;

use super::diffusion::{seeded_noise, tensor_to_images};
use super::emoji::{bundle_version, images_to_tensor};
use super::unet::{max_abs, UNet};
use super::{Candidate, GenerationRequest, Generator, Image, ModelError};

pub const UNET_CONFIG: &str = "unet/config.json";
pub const UNET_WEIGHTS: &str = "unet/diffusion_pytorch_model.safetensors";
pub const VAE_CONFIG: &str = "vae/config.json";
pub const VAE_WEIGHTS: &str = "vae/diffusion_pytorch_model.safetensors";
pub const TEXT_CONFIG: &str = "text_encoder/config.json";
pub const TEXT_WEIGHTS: &str = "text_encoder/model.safetensors";
pub const TOKENIZER: &str = "tokenizer/tokenizer.json";
pub const SPECIAL_TOKENS: &str = "tokenizer/special_tokens_map.json";
pub const SCHEDULER_CONFIG: &str = "scheduler/scheduler_config.json";

/// CLIP's start and end tokens; the end token pads unless the tokenizer names another.
pub const BOS: &str = "<|startoftext|>";
pub const EOS: &str = "<|endoftext|>";

/// How many history texts the prompt names at most.
pub const PROMPT_HINTS: usize = 3;

/// Candidates denoised together at most (the UNet sees twice as many with guidance).
const MAX_SAMPLES_PER_PASS: usize = 4;

fn bad(file: &str, key: &str, message: impl std::fmt::Display) -> ModelError {
    ModelError::Bundle(format!("{file}: {key}: {message}"))
}

// ---------------------------------------------------------------------------------------------
// The diffusers configuration files (the fields the models need).

/// One value for every block, or one per block (diffusers writes both).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    All(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    fn resolve(&self, blocks: usize, file: &str, key: &str) -> Result<Vec<usize>, ModelError> {
        match self {
            PerBlock::All(v) => Ok(vec![*v; blocks]),
            PerBlock::Each(v) if v.len() == blocks => Ok(v.clone()),
            PerBlock::Each(v) => Err(bad(
                file,
                key,
                format!("{} values for {blocks} blocks", v.len()),
            )),
        }
    }
}

fn groups_32() -> usize {
    32
}
fn eps_1e5() -> f64 {
    1e-5
}
fn one() -> usize {
    1
}
fn one_f() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn sd_scaling() -> f64 {
    0.18215
}
fn quick_gelu() -> String {
    "quick_gelu".into()
}
fn thousand() -> usize {
    1000
}
fn epsilon() -> String {
    "epsilon".into()
}
fn leading() -> String {
    "leading".into()
}

/// `unet/config.json` (diffusers' `UNet2DConditionModel`); defaults are diffusers' own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNetFile {
    #[serde(
        rename = "_class_name",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub class_name: Option<String>,
    /// Latent side; the image side is this times the VAE's downsampling factor.
    pub sample_size: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mid_block_type: Option<String>,
    pub layers_per_block: usize,
    /// diffusers' name for the number of heads per block (v2.x gives one per block).
    pub attention_head_dim: PerBlock,
    /// When set, wins over `attention_head_dim` (as in diffusers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_attention_heads: Option<PerBlock>,
    pub cross_attention_dim: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transformer_layers_per_block: Option<PerBlock>,
    #[serde(default = "groups_32")]
    pub norm_num_groups: usize,
    #[serde(default = "eps_1e5")]
    pub norm_eps: f64,
    #[serde(default = "one")]
    pub downsample_padding: usize,
    #[serde(default = "one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    /// SDXL's added conditioning: not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addition_embed_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_embed_type: Option<String>,
}

/// `vae/config.json` (diffusers' `AutoencoderKL`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeFile {
    #[serde(
        rename = "_class_name",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub class_name: Option<String>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    #[serde(default = "groups_32")]
    pub norm_num_groups: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down_block_types: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up_block_types: Option<Vec<String>>,
    /// Latents are `(z − shift_factor) · scaling_factor`.
    #[serde(default = "sd_scaling")]
    pub scaling_factor: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shift_factor: Option<f64>,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
}

/// `text_encoder/config.json` (transformers' `CLIPTextConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextEncoderFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub vocab_size: usize,
    /// Prompts are padded (and cut) to this many tokens.
    pub max_position_embeddings: usize,
    /// `quick_gelu` (OpenAI CLIP, v1.5) or `gelu` (OpenCLIP, v2.x and Turbo).
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projection_dim: Option<usize>,
}

/// `scheduler/scheduler_config.json`: the training noise schedule, whatever sampler it names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulerFile {
    #[serde(
        rename = "_class_name",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub class_name: Option<String>,
    pub beta_start: f64,
    pub beta_end: f64,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`.
    pub beta_schedule: String,
    #[serde(default = "thousand")]
    pub num_train_timesteps: usize,
    /// `epsilon`, `v_prediction` or `sample`.
    #[serde(default = "epsilon")]
    pub prediction_type: String,
    #[serde(default)]
    pub steps_offset: usize,
    /// `leading`, `trailing` (Turbo) or `linspace`.
    #[serde(default = "leading")]
    pub timestep_spacing: String,
}

/// The OpenCLIP text encoder of SD 2.x, the only `gelu` shape candle's SD CLIP can build.
const OPENCLIP_H: [(&str, usize); 6] = [
    ("hidden_size", 1024),
    ("intermediate_size", 4096),
    ("num_hidden_layers", 23),
    ("num_attention_heads", 16),
    ("vocab_size", 49408),
    ("max_position_embeddings", 77),
];

impl TextEncoderFile {
    fn sizes(&self) -> [(&'static str, usize); 6] {
        [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ]
    }

    fn check(&self) -> Result<(), ModelError> {
        for (key, v) in self.sizes() {
            if v == 0 {
                return Err(bad(TEXT_CONFIG, key, "must be at least 1"));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(bad(
                TEXT_CONFIG,
                "num_attention_heads",
                format!(
                    "{} heads do not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            ));
        }
        if self.max_position_embeddings < 2 {
            return Err(bad(
                TEXT_CONFIG,
                "max_position_embeddings",
                "must hold the start and end tokens",
            ));
        }
        match self.hidden_act.as_str() {
            "quick_gelu" => Ok(()),
            "gelu" => {
                for ((key, want), (_, got)) in OPENCLIP_H.iter().zip(self.sizes()) {
                    if *want != got {
                        return Err(bad(
                            TEXT_CONFIG,
                            key,
                            format!(
                                "{got}: a gelu text encoder must have the SD 2.x shape ({key} = \
                                 {want}); candle builds other sizes with quick_gelu only"
                            ),
                        ));
                    }
                }
                Ok(())
            }
            other => Err(bad(
                TEXT_CONFIG,
                "hidden_act",
                format!("unsupported `{other}` (known: quick_gelu, gelu)"),
            )),
        }
    }
}

/// A model directory's configuration: the four JSON files, parsed and checked together.
#[derive(Debug, Clone, PartialEq)]
pub struct SdConfig {
    pub unet: UNetFile,
    pub vae: VaeFile,
    pub text_encoder: TextEncoderFile,
    pub scheduler: SchedulerFile,
}

fn read_json<T: DeserializeOwned>(dir: &Path, rel: &str) -> Result<T, ModelError> {
    let path = dir.join(rel);
    let bytes =
        std::fs::read(&path).map_err(|e| ModelError::Bundle(format!("{}: {e}", path.display())))?;
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        if key == "." {
            ModelError::Bundle(format!("{}: {}", path.display(), e.inner()))
        } else {
            ModelError::Bundle(format!("{}: {key}: {}", path.display(), e.inner()))
        }
    })
}

fn write_json<T: Serialize>(dir: &Path, rel: &str, value: &T) -> Result<(), ModelError> {
    let path = dir.join(rel);
    let io = |e: std::io::Error| ModelError::Other(format!("{}: {e}", path.display()));
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let text = serde_json::to_string_pretty(value).map_err(|e| ModelError::Other(e.to_string()))?;
    std::fs::write(&path, text + "\n").map_err(io)
}

fn block_kind(key: &str, value: &str, cross: &str, plain: &str) -> Result<bool, ModelError> {
    if value == cross {
        Ok(true)
    } else if value == plain {
        Ok(false)
    } else {
        Err(bad(
            UNET_CONFIG,
            key,
            format!("unsupported block `{value}` (known: {cross}, {plain})"),
        ))
    }
}

impl SdConfig {
    /// Reads and checks the four configuration files of `dir`.
    pub fn read(dir: &Path) -> Result<SdConfig, ModelError> {
        let config = SdConfig {
            unet: read_json(dir, UNET_CONFIG)?,
            vae: read_json(dir, VAE_CONFIG)?,
            text_encoder: read_json(dir, TEXT_CONFIG)?,
            scheduler: read_json(dir, SCHEDULER_CONFIG)?,
        };
        config.check()?;
        Ok(config)
    }

    /// Writes the four configuration files into `dir` (creating the subdirectories).
    pub fn write(&self, dir: &Path) -> Result<(), ModelError> {
        write_json(dir, UNET_CONFIG, &self.unet)?;
        write_json(dir, VAE_CONFIG, &self.vae)?;
        write_json(dir, TEXT_CONFIG, &self.text_encoder)?;
        write_json(dir, SCHEDULER_CONFIG, &self.scheduler)
    }

    /// Every check [`SdConfig::read`] makes: each file maps onto candle's configurations and the
    /// files agree with each other.
    pub fn check(&self) -> Result<(), ModelError> {
        self.unet_config()?;
        self.vae_config()?;
        self.text_encoder.check()?;
        self.ddim_config()?;
        let latent = self.vae.latent_channels;
        for (key, v) in [
            ("in_channels", self.unet.in_channels),
            ("out_channels", self.unet.out_channels),
        ] {
            if v != latent {
                return Err(bad(
                    UNET_CONFIG,
                    key,
                    format!("{v}, but the VAE's latent_channels is {latent} (inpainting UNets are not supported)"),
                ));
            }
        }
        if self.unet.cross_attention_dim != self.text_encoder.hidden_size {
            return Err(bad(
                UNET_CONFIG,
                "cross_attention_dim",
                format!(
                    "{}, but the text encoder's hidden_size is {}",
                    self.unet.cross_attention_dim, self.text_encoder.hidden_size
                ),
            ));
        }
        if self.unet.sample_size == 0 {
            return Err(bad(UNET_CONFIG, "sample_size", "must be at least 1"));
        }
        Ok(())
    }

    /// How much the VAE downsamples: 2^(blocks − 1).
    pub fn vae_factor(&self) -> usize {
        1 << self.vae.block_out_channels.len().saturating_sub(1)
    }

    /// The square image side the model works at.
    pub fn resolution(&self) -> usize {
        self.unet.sample_size * self.vae_factor()
    }

    /// The UNet's candle configuration.
    pub fn unet_config(&self) -> Result<unet_2d::UNet2DConditionModelConfig, ModelError> {
        let u = &self.unet;
        let n = u.block_out_channels.len();
        if n == 0 {
            return Err(bad(UNET_CONFIG, "block_out_channels", "must not be empty"));
        }
        for (key, len) in [
            ("down_block_types", u.down_block_types.len()),
            ("up_block_types", u.up_block_types.len()),
        ] {
            if len != n {
                return Err(bad(
                    UNET_CONFIG,
                    key,
                    format!("{len} blocks, but block_out_channels has {n}"),
                ));
            }
        }
        if let Some(t) = &u.addition_embed_type {
            return Err(bad(
                UNET_CONFIG,
                "addition_embed_type",
                format!("`{t}` (SDXL-style added conditioning) is not supported"),
            ));
        }
        if let Some(t) = &u.class_embed_type {
            return Err(bad(
                UNET_CONFIG,
                "class_embed_type",
                format!("`{t}` is not supported"),
            ));
        }
        if let Some(m) = &u.mid_block_type {
            if m != "UNetMidBlock2DCrossAttn" {
                return Err(bad(
                    UNET_CONFIG,
                    "mid_block_type",
                    format!("unsupported `{m}` (known: UNetMidBlock2DCrossAttn)"),
                ));
            }
        }
        if u.norm_num_groups == 0 || u.layers_per_block == 0 || u.cross_attention_dim == 0 {
            return Err(bad(
                UNET_CONFIG,
                "norm_num_groups, layers_per_block, cross_attention_dim",
                "must be at least 1",
            ));
        }
        let (heads_key, heads) = match &u.num_attention_heads {
            Some(h) => ("num_attention_heads", h),
            None => ("attention_head_dim", &u.attention_head_dim),
        };
        let heads = heads.resolve(n, UNET_CONFIG, heads_key)?;
        let depth = match &u.transformer_layers_per_block {
            Some(d) => d.resolve(n, UNET_CONFIG, "transformer_layers_per_block")?,
            None => vec![1; n],
        };
        let mut blocks = Vec::with_capacity(n);
        for i in 0..n {
            let cross = block_kind(
                &format!("down_block_types[{i}]"),
                &u.down_block_types[i],
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            )?;
            // candle builds the up path as the mirror of the down path.
            let up = n - 1 - i;
            let up_cross = block_kind(
                &format!("up_block_types[{up}]"),
                &u.up_block_types[up],
                "CrossAttnUpBlock2D",
                "UpBlock2D",
            )?;
            if up_cross != cross {
                return Err(bad(
                    UNET_CONFIG,
                    &format!("up_block_types[{up}]"),
                    format!(
                        "must mirror down_block_types[{i}] (`{}`)",
                        u.down_block_types[i]
                    ),
                ));
            }
            let channels = u.block_out_channels[i];
            if channels == 0 || channels % u.norm_num_groups != 0 {
                return Err(bad(
                    UNET_CONFIG,
                    &format!("block_out_channels[{i}]"),
                    format!(
                        "{channels} is not a multiple of norm_num_groups {}",
                        u.norm_num_groups
                    ),
                ));
            }
            if heads[i] == 0 || channels % heads[i] != 0 {
                return Err(bad(
                    UNET_CONFIG,
                    heads_key,
                    format!(
                        "{} heads do not divide block {i}'s {channels} channels",
                        heads[i]
                    ),
                ));
            }
            if depth[i] == 0 {
                return Err(bad(
                    UNET_CONFIG,
                    "transformer_layers_per_block",
                    "must be at least 1",
                ));
            }
            blocks.push(unet_2d::BlockConfig {
                out_channels: channels,
                use_cross_attn: cross.then_some(depth[i]),
                attention_head_dim: heads[i],
            });
        }
        Ok(unet_2d::UNet2DConditionModelConfig {
            center_input_sample: u.center_input_sample,
            flip_sin_to_cos: u.flip_sin_to_cos,
            freq_shift: u.freq_shift,
            blocks,
            layers_per_block: u.layers_per_block,
            downsample_padding: u.downsample_padding,
            mid_block_scale_factor: u.mid_block_scale_factor,
            norm_num_groups: u.norm_num_groups,
            norm_eps: u.norm_eps,
            cross_attention_dim: u.cross_attention_dim,
            sliced_attention_size: None,
            use_linear_projection: u.use_linear_projection,
        })
    }

    /// The VAE's candle configuration.
    pub fn vae_config(&self) -> Result<vae::AutoEncoderKLConfig, ModelError> {
        let v = &self.vae;
        for (key, c) in [
            ("in_channels", v.in_channels),
            ("out_channels", v.out_channels),
        ] {
            if c != 3 {
                return Err(bad(VAE_CONFIG, key, format!("{c}: must be 3 (RGB)")));
            }
        }
        let n = v.block_out_channels.len();
        if n == 0 {
            return Err(bad(VAE_CONFIG, "block_out_channels", "must not be empty"));
        }
        if v.norm_num_groups == 0 || v.layers_per_block == 0 || v.latent_channels == 0 {
            return Err(bad(
                VAE_CONFIG,
                "norm_num_groups, layers_per_block, latent_channels",
                "must be at least 1",
            ));
        }
        for (i, c) in v.block_out_channels.iter().enumerate() {
            if *c == 0 || c % v.norm_num_groups != 0 {
                return Err(bad(
                    VAE_CONFIG,
                    &format!("block_out_channels[{i}]"),
                    format!(
                        "{c} is not a multiple of norm_num_groups {}",
                        v.norm_num_groups
                    ),
                ));
            }
        }
        for (key, types, want) in [
            (
                "down_block_types",
                &v.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &v.up_block_types, "UpDecoderBlock2D"),
        ] {
            let Some(types) = types else { continue };
            if types.len() != n {
                return Err(bad(
                    VAE_CONFIG,
                    key,
                    format!("{} blocks, but block_out_channels has {n}", types.len()),
                ));
            }
            if let Some((i, t)) = types.iter().enumerate().find(|(_, t)| *t != want) {
                return Err(bad(
                    VAE_CONFIG,
                    &format!("{key}[{i}]"),
                    format!("unsupported block `{t}` (known: {want})"),
                ));
            }
        }
        if !v.mid_block_add_attention {
            return Err(bad(
                VAE_CONFIG,
                "mid_block_add_attention",
                "false is not supported (candle's VAE always has the mid-block attention)",
            ));
        }
        if !(v.scaling_factor.is_finite() && v.scaling_factor > 0.0) {
            return Err(bad(
                VAE_CONFIG,
                "scaling_factor",
                "must be a finite number > 0",
            ));
        }
        Ok(vae::AutoEncoderKLConfig {
            block_out_channels: v.block_out_channels.clone(),
            layers_per_block: v.layers_per_block,
            latent_channels: v.latent_channels,
            norm_num_groups: v.norm_num_groups,
            use_quant_conv: v.use_quant_conv,
            use_post_quant_conv: v.use_post_quant_conv,
        })
    }

    /// The deterministic DDIM sampler (η = 0) over the bundle's training schedule.
    pub fn ddim_config(&self) -> Result<ddim::DDIMSchedulerConfig, ModelError> {
        let s = &self.scheduler;
        let beta_schedule = match s.beta_schedule.as_str() {
            "linear" => BetaSchedule::Linear,
            "scaled_linear" => BetaSchedule::ScaledLinear,
            "squaredcos_cap_v2" => BetaSchedule::SquaredcosCapV2,
            other => {
                return Err(bad(
                    SCHEDULER_CONFIG,
                    "beta_schedule",
                    format!(
                        "unsupported `{other}` (known: linear, scaled_linear, squaredcos_cap_v2)"
                    ),
                ))
            }
        };
        let prediction_type = match s.prediction_type.as_str() {
            "epsilon" => PredictionType::Epsilon,
            "v_prediction" => PredictionType::VPrediction,
            "sample" => PredictionType::Sample,
            other => {
                return Err(bad(
                    SCHEDULER_CONFIG,
                    "prediction_type",
                    format!("unsupported `{other}` (known: epsilon, v_prediction, sample)"),
                ))
            }
        };
        let timestep_spacing = match s.timestep_spacing.as_str() {
            "leading" => TimestepSpacing::Leading,
            "trailing" => TimestepSpacing::Trailing,
            "linspace" => TimestepSpacing::Linspace,
            other => {
                return Err(bad(
                    SCHEDULER_CONFIG,
                    "timestep_spacing",
                    format!("unsupported `{other}` (known: leading, trailing, linspace)"),
                ))
            }
        };
        if s.num_train_timesteps < 2 {
            return Err(bad(
                SCHEDULER_CONFIG,
                "num_train_timesteps",
                "must be at least 2",
            ));
        }
        if !(s.beta_start > 0.0 && s.beta_end < 1.0 && s.beta_start <= s.beta_end) {
            return Err(bad(
                SCHEDULER_CONFIG,
                "beta_start, beta_end",
                "need 0 < beta_start ≤ beta_end < 1",
            ));
        }
        Ok(ddim::DDIMSchedulerConfig {
            beta_start: s.beta_start,
            beta_end: s.beta_end,
            beta_schedule,
            eta: 0.0,
            steps_offset: s.steps_offset,
            prediction_type,
            train_timesteps: s.num_train_timesteps,
            timestep_spacing,
        })
    }

    /// The published SD1.5 shapes (runwayml/stable-diffusion-v1-5): what [`bench`] builds.
    pub fn v1_5() -> SdConfig {
        SdConfig {
            unet: UNetFile {
                class_name: Some("UNet2DConditionModel".into()),
                sample_size: 64,
                in_channels: 4,
                out_channels: 4,
                block_out_channels: vec![320, 640, 1280, 1280],
                down_block_types: [
                    "CrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D",
                    "DownBlock2D",
                ]
                .map(String::from)
                .to_vec(),
                up_block_types: [
                    "UpBlock2D",
                    "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D",
                ]
                .map(String::from)
                .to_vec(),
                mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
                layers_per_block: 2,
                attention_head_dim: PerBlock::All(8),
                num_attention_heads: None,
                cross_attention_dim: 768,
                transformer_layers_per_block: None,
                norm_num_groups: 32,
                norm_eps: 1e-5,
                downsample_padding: 1,
                mid_block_scale_factor: 1.0,
                flip_sin_to_cos: true,
                freq_shift: 0.0,
                center_input_sample: false,
                use_linear_projection: false,
                addition_embed_type: None,
                class_embed_type: None,
            },
            vae: VaeFile {
                class_name: Some("AutoencoderKL".into()),
                in_channels: 3,
                out_channels: 3,
                latent_channels: 4,
                block_out_channels: vec![128, 256, 512, 512],
                layers_per_block: 2,
                norm_num_groups: 32,
                sample_size: Some(512),
                down_block_types: Some(vec!["DownEncoderBlock2D".into(); 4]),
                up_block_types: Some(vec!["UpDecoderBlock2D".into(); 4]),
                scaling_factor: 0.18215,
                shift_factor: None,
                use_quant_conv: true,
                use_post_quant_conv: true,
                mid_block_add_attention: true,
            },
            text_encoder: TextEncoderFile {
                architectures: Some(vec!["CLIPTextModel".into()]),
                hidden_size: 768,
                intermediate_size: 3072,
                num_hidden_layers: 12,
                num_attention_heads: 12,
                vocab_size: 49408,
                max_position_embeddings: 77,
                hidden_act: "quick_gelu".into(),
                projection_dim: Some(768),
            },
            scheduler: SchedulerFile {
                class_name: Some("PNDMScheduler".into()),
                beta_start: 0.00085,
                beta_end: 0.012,
                beta_schedule: "scaled_linear".into(),
                num_train_timesteps: 1000,
                prediction_type: "epsilon".into(),
                steps_offset: 1,
                timestep_spacing: "leading".into(),
            },
        }
    }

    /// The tiny shape of [`write_tiny`]: UNet (32, 64) with one layer per block and 32-dim cross
    /// attention, VAE (32, 32, 64, 64) (four levels, so latents are 8× smaller as in SD), CLIP
    /// with 32 hidden values and 2 layers; 64×64 images, 8×8 latents.
    pub fn tiny() -> SdConfig {
        let sd = SdConfig::v1_5();
        SdConfig {
            unet: UNetFile {
                sample_size: 8,
                block_out_channels: vec![32, 64],
                down_block_types: ["CrossAttnDownBlock2D", "DownBlock2D"]
                    .map(String::from)
                    .to_vec(),
                up_block_types: ["UpBlock2D", "CrossAttnUpBlock2D"]
                    .map(String::from)
                    .to_vec(),
                layers_per_block: 1,
                attention_head_dim: PerBlock::All(2),
                cross_attention_dim: 32,
                ..sd.unet
            },
            vae: VaeFile {
                block_out_channels: vec![32, 32, 64, 64],
                layers_per_block: 1,
                sample_size: Some(64),
                ..sd.vae
            },
            text_encoder: TextEncoderFile {
                hidden_size: 32,
                intermediate_size: 64,
                num_hidden_layers: 2,
                num_attention_heads: 2,
                vocab_size: TINY_VOCAB.len(),
                projection_dim: Some(32),
                ..sd.text_encoder
            },
            scheduler: SchedulerFile {
                class_name: Some("DDIMScheduler".into()),
                ..sd.scheduler
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Builders shared by the loader, the tiny writer and the benchmark.

fn build_unet(cfg: &SdConfig, vb: VarBuilder) -> Result<UNet, ModelError> {
    Ok(UNet::new(
        vb,
        cfg.unet.in_channels,
        cfg.unet.out_channels,
        &cfg.unet_config()?,
    )?)
}

/// The VAE: ragar's [`VaeEncoder`] and [`VaeDecoder`], each loading its own half of the weights.
struct Vae {
    encoder: VaeEncoder,
    decoder: VaeDecoder,
}

fn build_vae(cfg: &SdConfig, vb: VarBuilder) -> Result<Vae, ModelError> {
    let config = cfg.vae_config()?;
    Ok(Vae {
        decoder: VaeDecoder::new(vb.clone(), cfg.vae.out_channels, &config)?,
        encoder: VaeEncoder::new(vb, cfg.vae.in_channels, &config)?,
    })
}

/// The CLIP text transformer, by activation (see the module header).
enum TextModel {
    QuickGelu(clip_text::ClipTextTransformer),
    OpenClip(sd_clip::ClipTextTransformer),
}

impl TextModel {
    fn build(cfg: &TextEncoderFile, vb: VarBuilder) -> Result<TextModel, ModelError> {
        cfg.check()?;
        if cfg.hidden_act == "gelu" {
            return Ok(TextModel::OpenClip(sd_clip::ClipTextTransformer::new(
                vb,
                &sd_clip::Config::v2_1(),
            )?));
        }
        let c = clip_text::ClipTextConfig {
            vocab_size: cfg.vocab_size,
            embed_dim: cfg.hidden_size,
            activation: clip_text::Activation::QuickGelu,
            intermediate_size: cfg.intermediate_size,
            max_position_embeddings: cfg.max_position_embeddings,
            pad_with: None,
            num_hidden_layers: cfg.num_hidden_layers,
            num_attention_heads: cfg.num_attention_heads,
            projection_dim: cfg.projection_dim.unwrap_or(cfg.hidden_size),
        };
        Ok(TextModel::QuickGelu(clip_text::ClipTextTransformer::new(
            vb.pp("text_model"),
            &c,
        )?))
    }

    /// The last hidden states `[b, tokens, hidden]` of `ids` `[b, tokens]`.
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            TextModel::QuickGelu(m) => m.forward_with_mask(ids, usize::MAX),
            TextModel::OpenClip(m) => m.forward_with_mask(ids, usize::MAX),
        }
    }
}

/// Weights made up on request, for the tiny writer (seeded, recorded) and the benchmark (drawn
/// on the device). Biases are 0, `Init::Const` hints (norm gains) are honoured, every other tensor
/// is uniform in ±1/√fan_in. Seeded values depend on the seed and the tensor's name only, so a
/// tensor asked for twice is the same tensor.
pub(crate) struct RandomWeights {
    /// `None`: drawn on the device by candle (fast, unseeded).
    pub(crate) seed: Option<u64>,
    pub(crate) record: Option<Arc<Mutex<BTreeMap<String, Tensor>>>>,
}

/// FNV-1a: a name hash that stays the same across builds (std's hasher makes no such promise).
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let dims = s.dims().to_vec();
        let fan_in = dims.iter().skip(1).product::<usize>().max(1);
        let bound = 1.0 / (fan_in as f64).sqrt();
        let constant = if name.ends_with("bias") {
            Some(0.0)
        } else if let Init::Const(c) = init {
            Some(c)
        } else {
            None
        };
        let Some(seed) = self.seed else {
            let t = match constant {
                Some(c) => Tensor::ones(s, DType::F32, dev)?.affine(c, 0.0)?,
                None => Tensor::rand(-bound as f32, bound as f32, s, dev)?,
            };
            return t.to_dtype(dtype);
        };
        let count = s.elem_count();
        let values: Vec<f32> = match constant {
            Some(c) => vec![c as f32; count],
            None => {
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ name_hash(name));
                let b = bound as f32;
                (0..count).map(|_| rng.random_range(-b..b)).collect()
            }
        };
        let t = Tensor::from_vec(values, s, &Device::Cpu)?;
        if let Some(record) = &self.record {
            record
                .lock()
                .expect("weights record lock")
                .insert(name.to_string(), t.clone());
        }
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for `{name}`")
    }

    /// Every name "exists": candle's VAE attention then takes the current diffusers names
    /// (`to_q`, `to_k`, `to_v`, `to_out.0`) rather than the legacy ones.
    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// Every tensor random, by name (norm gains around 1, biases too): the norms' affine and the
/// biases take part in the comparison, which `RandomWeights` (gains 1, biases 0) would hide.
pub(crate) struct AllRandom(pub(crate) u64);

impl SimpleBackend for AllRandom {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let fan_in = s.dims().iter().skip(1).product::<usize>().max(1);
        let bound = 1.0 / (fan_in as f32).sqrt();
        let hash = name.bytes().fold(self.0, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        let mut rng = ChaCha8Rng::seed_from_u64(hash);
        let gain = name.contains("norm") && name.ends_with("weight");
        let values: Vec<f32> = (0..s.elem_count())
            .map(|_| {
                if gain {
                    rng.random_range(0.5..1.5)
                } else {
                    rng.random_range(-bound..bound)
                }
            })
            .collect();
        Tensor::from_vec(values, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("no shape for `{name}`")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

// ---------------------------------------------------------------------------------------------
// Prompts.

/// The prompt of one request: `an emoji of <reference text>`, then `, in the style of ` and the
/// texts of the [`PROMPT_HINTS`] heaviest history items (positive weight, non-empty, no
/// repeats; ties keep their order) joined by `; ` (item texts have commas of their own).
pub fn build_prompt(reference_text: Option<&str>, hints: &[(String, f32)]) -> String {
    let mut prompt = match reference_text.map(str::trim).filter(|t| !t.is_empty()) {
        Some(t) => format!("an emoji of {t}"),
        None => "an emoji".to_string(),
    };
    let mut ranked: Vec<(&str, f32)> = hints
        .iter()
        .map(|(t, w)| (t.trim(), *w))
        .filter(|(t, w)| !t.is_empty() && w.is_finite() && *w > 0.0)
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut chosen: Vec<&str> = Vec::with_capacity(PROMPT_HINTS);
    for (t, _) in ranked {
        if chosen.len() == PROMPT_HINTS {
            break;
        }
        if !chosen.contains(&t) {
            chosen.push(t);
        }
    }
    if !chosen.is_empty() {
        prompt.push_str(", in the style of ");
        prompt.push_str(&chosen.join("; "));
    }
    prompt
}

/// CLIP tokens padded (and cut) to the text encoder's length.
struct PromptTokenizer {
    tokenizer: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    len: usize,
}

impl PromptTokenizer {
    fn load(dir: &Path, text: &TextEncoderFile) -> Result<PromptTokenizer, ModelError> {
        let path = dir.join(TOKENIZER);
        let mut tokenizer = Tokenizer::from_file(&path).map_err(|e| {
            ModelError::Bundle(format!(
                "{}: {e} (diffusers ships vocab.json + merges.txt; save the fast tokenizer as \
                 tokenizer.json there)",
                path.display()
            ))
        })?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| ModelError::Bundle(format!("{}: {e}", path.display())))?;
        let id = |token: &str| {
            tokenizer
                .token_to_id(token)
                .ok_or_else(|| bad(TOKENIZER, "model.vocab", format!("has no `{token}` token")))
        };
        let (bos, eos) = (id(BOS)?, id(EOS)?);
        let pad = match pad_token(dir)? {
            Some(token) => id(&token)?,
            None => eos,
        };
        let size = tokenizer.get_vocab_size(true);
        if size > text.vocab_size {
            return Err(bad(
                TOKENIZER,
                "model.vocab",
                format!(
                    "{size} tokens, more than the text encoder's vocab_size {}",
                    text.vocab_size
                ),
            ));
        }
        Ok(PromptTokenizer {
            tokenizer,
            bos,
            eos,
            pad,
            len: text.max_position_embeddings,
        })
    }

    fn ids(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| ModelError::Other(format!("tokenizing the prompt: {e}")))?;
        let mut ids = encoding.get_ids().to_vec();
        if ids.first() != Some(&self.bos) {
            ids.insert(0, self.bos);
        }
        if ids.len() < 2 || ids.last() != Some(&self.eos) {
            ids.push(self.eos);
        }
        if ids.len() > self.len {
            ids.truncate(self.len - 1);
            ids.push(self.eos);
        }
        ids.resize(self.len, self.pad);
        Ok(ids)
    }
}

/// `pad_token` of `tokenizer/special_tokens_map.json` (a string or `{"content": ...}`), if any.
fn pad_token(dir: &Path) -> Result<Option<String>, ModelError> {
    if !dir.join(SPECIAL_TOKENS).is_file() {
        return Ok(None);
    }
    let map: serde_json::Value = read_json(dir, SPECIAL_TOKENS)?;
    Ok(match map.get("pad_token") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(v) => v.get("content").and_then(|c| c.as_str()).map(String::from),
        None => None,
    })
}

// ---------------------------------------------------------------------------------------------
// The generator.

/// Sampling settings (`models.sd_steps`, `models.sd_strength`, `models.sd_guidance`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SdOptions {
    /// Denoising steps run per image (1 for Turbo).
    pub steps: usize,
    /// Share of the noise schedule the steps cover, in (0, 1]: how far the image may move away
    /// from the reference (1: the reference is ignored).
    pub strength: f64,
    /// Classifier-free guidance scale; at most 1 turns guidance off (Turbo).
    pub guidance: f64,
}

impl Default for SdOptions {
    fn default() -> Self {
        SdOptions {
            steps: 20,
            strength: 0.6,
            guidance: 7.5,
        }
    }
}

impl SdOptions {
    /// Points of the DDIM schedule: ⌈steps / strength⌉ (at least `steps`).
    pub fn schedule_len(&self) -> usize {
        // The small margin keeps 1 / 0.5 at 2 despite rounding.
        (((self.steps as f64) / self.strength) - 1e-9)
            .ceil()
            .max(self.steps as f64) as usize
    }

    fn check(&self, train_timesteps: usize) -> Result<(), ModelError> {
        if self.steps == 0 {
            return Err(ModelError::Bundle("sd steps must be at least 1".into()));
        }
        if !(self.strength > 0.0 && self.strength <= 1.0) {
            return Err(ModelError::Bundle(format!(
                "sd strength {} must be in (0, 1]",
                self.strength
            )));
        }
        if !(self.guidance.is_finite() && self.guidance >= 0.0) {
            return Err(ModelError::Bundle(format!(
                "sd guidance {} must be a finite number ≥ 0",
                self.guidance
            )));
        }
        if self.schedule_len() > train_timesteps {
            return Err(ModelError::Bundle(format!(
                "{} steps at strength {} need a {}-point schedule, more than the model's {} \
                 training timesteps",
                self.steps,
                self.strength,
                self.schedule_len(),
                train_timesteps
            )));
        }
        Ok(())
    }
}

/// The device SD runs on: the first CUDA GPU in builds with the `cuda` feature (when there is
/// one), else the CPU.
pub fn default_device() -> Result<Device, ModelError> {
    #[cfg(feature = "cuda")]
    {
        let device = Device::cuda_if_available(0)?;
        if let Device::Cuda(cuda) = &device {
            // SAFETY: every tensor of this device is used on its one stream (candle gives each
            // device its own), so the per-launch event records that order uses across streams
            // are not needed; they cost CPU time on every kernel launch.
            unsafe { cuda.disable_event_tracking() };
        }
        Ok(device)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(Device::Cpu)
    }
}

/// Lets cuBLAS run candle's f32 matrix products on tensor cores in TF32 (as PyTorch's
/// `allow_tf32`). The UNet's attention in candle-transformers computes its scores in f32 even when
/// the model is f16, so this is what puts that product on tensor cores. A process-wide setting of
/// candle's; no effect on the CPU.
pub fn allow_tf32(allow: bool) {
    candle_core::cuda::set_gemm_reduced_precision_f32(allow);
}

/// f16 on CUDA, f32 elsewhere (candle's CPU kernels are f32 first).
pub fn dtype_for(device: &Device) -> DType {
    if device.is_cuda() {
        DType::F16
    } else {
        DType::F32
    }
}

/// The weights file of a component: `NAME.safetensors`, else `NAME.fp16.safetensors`.
fn weights_file(dir: &Path, rel: &str) -> Option<PathBuf> {
    let plain = dir.join(rel);
    if plain.is_file() {
        return Some(plain);
    }
    let fp16 = dir.join(rel.replace(".safetensors", ".fp16.safetensors"));
    fp16.is_file().then_some(fp16)
}

fn load_error(path: &Path) -> impl Fn(candle_core::Error) -> ModelError + '_ {
    move |e| ModelError::Bundle(format!("{}: {e}", path.display()))
}

/// Model errors met while building from `path` (missing tensors, wrong shapes) are bundle errors
/// naming the file; configuration errors already name theirs.
fn in_file(path: &Path) -> impl Fn(ModelError) -> ModelError + '_ {
    move |e| match e {
        ModelError::Other(m) => ModelError::Bundle(format!("{}: {m}", path.display())),
        other => other,
    }
}

/// Loads the VAE: the encoder and `quant_conv` into [`VaeEncoder`], the decoder and
/// `post_quant_conv` into [`VaeDecoder`].
fn load_vae(cfg: &SdConfig, path: &Path, dtype: DType, device: &Device) -> Result<Vae, ModelError> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(load_error(path))?;
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    build_vae(cfg, vb).map_err(in_file(path))
}

/// Stable Diffusion img2img behind the [`Generator`] seam (see the module header).
pub struct SdGenerator {
    config: SdConfig,
    options: SdOptions,
    device: Device,
    dtype: DType,
    tokenizer: PromptTokenizer,
    text: TextModel,
    unet: UNet,
    vae: Vae,
    scheduler: ddim::DDIMSchedulerConfig,
    /// The empty prompt's hidden states `[1, tokens, hidden]`, for guidance.
    uncond: Tensor,
    version: String,
}

impl SdGenerator {
    /// Loads `dir` onto [`default_device`].
    pub fn load(dir: &Path, options: SdOptions) -> Result<SdGenerator, ModelError> {
        SdGenerator::load_on(dir, options, &default_device()?)
    }

    /// Loads `dir` onto `device` (f16 on CUDA, f32 elsewhere).
    pub fn load_on(
        dir: &Path,
        options: SdOptions,
        device: &Device,
    ) -> Result<SdGenerator, ModelError> {
        let missing: Vec<&str> = [
            UNET_CONFIG,
            VAE_CONFIG,
            TEXT_CONFIG,
            TOKENIZER,
            SCHEDULER_CONFIG,
        ]
        .into_iter()
        .filter(|rel| !dir.join(rel).is_file())
        .chain(
            [UNET_WEIGHTS, VAE_WEIGHTS, TEXT_WEIGHTS]
                .into_iter()
                .filter(|rel| weights_file(dir, rel).is_none()),
        )
        .collect();
        if !missing.is_empty() {
            let hint = if missing.contains(&TOKENIZER) {
                "; diffusers repositories ship the tokenizer as vocab.json + merges.txt: save \
                 CLIP's fast tokenizer (tokenizer.json) there"
            } else {
                ""
            };
            return Err(ModelError::Bundle(format!(
                "{}: missing {} (a Stable Diffusion model in the diffusers layout{hint})",
                dir.display(),
                missing.join(", ")
            )));
        }
        let config = SdConfig::read(dir)?;
        options.check(config.scheduler.num_train_timesteps)?;
        let dtype = dtype_for(device);
        if device.is_cuda() {
            allow_tf32(true);
        }
        let tokenizer = PromptTokenizer::load(dir, &config.text_encoder)?;

        let path = weights_file(dir, TEXT_WEIGHTS).expect("checked above");
        // SAFETY: the weights are mapped read-only and not modified while the model lives.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&path], dtype, device) }
            .map_err(load_error(&path))?;
        let text = TextModel::build(&config.text_encoder, vb).map_err(in_file(&path))?;

        let path = weights_file(dir, UNET_WEIGHTS).expect("checked above");
        // SAFETY: as above.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&path], dtype, device) }
            .map_err(load_error(&path))?;
        let unet = build_unet(&config, vb).map_err(in_file(&path))?;

        let path = weights_file(dir, VAE_WEIGHTS).expect("checked above");
        let vae = load_vae(&config, &path, dtype, device)?;

        let scheduler = config.ddim_config()?;
        let uncond_ids = tokenizer.ids("")?;
        let uncond = text.forward(&Tensor::from_vec(uncond_ids, (1, tokenizer.len), device)?)?;
        let version = format!(
            "{}@{}x{}g{}",
            bundle_version("sd", dir),
            options.steps,
            options.strength,
            options.guidance
        );
        Ok(SdGenerator {
            config,
            options,
            device: device.clone(),
            dtype,
            tokenizer,
            text,
            unet,
            vae,
            scheduler,
            uncond,
            version,
        })
    }

    pub fn config(&self) -> &SdConfig {
        &self.config
    }

    pub fn options(&self) -> SdOptions {
        self.options
    }

    /// Hidden states `[n, tokens, hidden]` of the prompts.
    fn encode_prompts(&self, prompts: &[String]) -> Result<Tensor, ModelError> {
        let mut ids = Vec::with_capacity(prompts.len() * self.tokenizer.len);
        for p in prompts {
            ids.extend(self.tokenizer.ids(p)?);
        }
        let ids = Tensor::from_vec(ids, (prompts.len(), self.tokenizer.len), &self.device)?;
        Ok(self.text.forward(&ids)?)
    }

    /// The scaled latent `[1, c, h, w]` of a reference: the VAE's posterior mean.
    fn encode_image(&self, image: &Image) -> Result<Tensor, ModelError> {
        let x = images_to_tensor(&[image], self.config.resolution() as u32, &Device::Cpu)?
            .to_device(&self.device)?
            .to_dtype(self.dtype)?;
        let z = self.vae.encoder.encode_mean(&x)?;
        let shift = self.config.vae.shift_factor.unwrap_or(0.0);
        Ok(z.affine(
            self.config.vae.scaling_factor,
            -shift * self.config.vae.scaling_factor,
        )?)
    }

    /// Noises `x0` with `noise` into the schedule and denoises it under `cond`; returns the images
    /// `[n, 3, r, r]` in [-1, 1], f32 on the CPU.
    fn sample(
        &self,
        x0: &Tensor,
        cond: &Tensor,
        noise: Tensor,
        cancel: &CancellationToken,
    ) -> Result<Tensor, ModelError> {
        let n = x0.dim(0)?;
        let len = self.options.schedule_len();
        let mut scheduler = self.scheduler.build(len)?;
        let timesteps = scheduler.timesteps()[len - self.options.steps..].to_vec();
        let mut latents = scheduler.add_noise(x0, noise, timesteps[0])?;
        let guided = self.options.guidance > 1.0;
        let context = if guided {
            let mut parts = vec![&self.uncond; n];
            parts.push(cond);
            Tensor::cat(&parts, 0)?
        } else {
            cond.clone()
        };
        for &t in &timesteps {
            if cancel.is_cancelled() {
                return Err(ModelError::Cancelled);
            }
            let input = if guided {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = scheduler.scale_model_input(input, t)?;
            let out = self.unet.forward(&input, t as f64, &context)?;
            let out = if guided {
                let (uncond, cond) = (out.narrow(0, 0, n)?, out.narrow(0, n, n)?);
                (&uncond + ((cond - &uncond)? * self.options.guidance)?)?
            } else {
                out
            };
            latents = scheduler.step(&out, t, &latents)?;
        }
        if cancel.is_cancelled() {
            return Err(ModelError::Cancelled);
        }
        let shift = self.config.vae.shift_factor.unwrap_or(0.0);
        let z = latents.affine(1.0 / self.config.vae.scaling_factor, shift)?;
        let images = self.vae.decoder.decode(&z)?;
        Ok(images.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
    }
}

impl Generator for SdGenerator {
    fn version(&self) -> &str {
        &self.version
    }

    fn wants_texts(&self) -> bool {
        true
    }

    fn generate(
        &self,
        batch: &[GenerationRequest],
        cancel: &CancellationToken,
    ) -> Result<Vec<Vec<Candidate>>, ModelError> {
        if cancel.is_cancelled() {
            return Err(ModelError::Cancelled);
        }
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let prompts: Vec<String> = batch
            .iter()
            .map(|r| build_prompt(r.reference_text.as_deref(), &r.prompt_hints))
            .collect();
        let cond = self.encode_prompts(&prompts)?;
        let latents: Vec<Tensor> = batch
            .iter()
            .map(|r| self.encode_image(&r.reference))
            .collect::<Result<_, _>>()?;
        let (_, c, h, w) = latents[0].dims4()?;
        // One row per (request, seed).
        let rows: Vec<(usize, u64)> = batch
            .iter()
            .enumerate()
            .flat_map(|(i, r)| r.seeds.iter().map(move |&s| (i, s)))
            .collect();
        let mut images = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(MAX_SAMPLES_PER_PASS) {
            let x0: Vec<&Tensor> = chunk.iter().map(|(i, _)| &latents[*i]).collect();
            let x0 = Tensor::cat(&x0, 0)?;
            let rows_cond: Vec<Tensor> = chunk
                .iter()
                .map(|(i, _)| cond.narrow(0, *i, 1))
                .collect::<candle_core::Result<_>>()?;
            let rows_cond = Tensor::cat(&rows_cond, 0)?;
            let noise: Vec<f32> = chunk
                .iter()
                .flat_map(|(_, seed)| seeded_noise(*seed, c * h * w))
                .collect();
            let noise = Tensor::from_vec(noise, (chunk.len(), c, h, w), &Device::Cpu)?
                .to_device(&self.device)?
                .to_dtype(self.dtype)?;
            let out = self.sample(&x0, &rows_cond, noise, cancel)?;
            images.extend(tensor_to_images(&out)?);
        }
        Ok(super::per_request(batch, images))
    }
}

// ---------------------------------------------------------------------------------------------
// The tiny model.

/// The tiny tokenizer's words: CLIP's special tokens first, then what emoji item texts and the
/// prompt template say most. Anything else is `<|endoftext|>` (CLIP's unknown token too).
const TINY_VOCAB: &[&str] = &[
    BOS,
    EOS,
    "!",
    ",",
    ".",
    ":",
    ";",
    "-",
    "&",
    "a",
    "an",
    "of",
    "in",
    "the",
    "style",
    "emoji",
    "image",
    "with",
    "and",
    "face",
    "smiling",
    "grinning",
    "smileys",
    "emotion",
    "people",
    "body",
    "hand",
    "animals",
    "nature",
    "animal",
    "mammal",
    "cat",
    "dog",
    "food",
    "drink",
    "fruit",
    "travel",
    "places",
    "activities",
    "objects",
    "symbols",
    "flags",
    "flag",
    "heart",
    "star",
    "sun",
    "moon",
    "red",
    "blue",
    "green",
    "yellow",
    "black",
    "white",
    "happy",
    "sad",
    "eyes",
    "mouth",
    "open",
    "tears",
    "joy",
    "hearts",
    "sky",
    "weather",
    "plant",
    "flower",
    "tree",
    "google",
    "twitter",
    "openmoji",
    "apple",
    "facebook",
];

/// A word-level CLIP-like tokenizer over [`TINY_VOCAB`]: lower-cased, split on whitespace and
/// punctuation, wrapped in `<|startoftext|> … <|endoftext|>`.
fn tiny_tokenizer() -> Result<Tokenizer, ModelError> {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::normalizers::Lowercase;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::AddedToken;
    let err = |e: tokenizers::Error| ModelError::Other(format!("building the tiny tokenizer: {e}"));
    let vocab: ahash::AHashMap<String, u32> = TINY_VOCAB
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), i as u32))
        .collect();
    let model = WordLevel::builder()
        .vocab(vocab)
        .unk_token(EOS.into())
        .build()
        .map_err(err)?;
    let post = TemplateProcessing::builder()
        .try_single(format!("{BOS} $A {EOS}"))
        .map_err(|e| ModelError::Other(format!("building the tiny tokenizer: {e}")))?
        .special_tokens(vec![(BOS, 0u32), (EOS, 1u32)])
        .build()
        .map_err(|e| ModelError::Other(format!("building the tiny tokenizer: {e}")))?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_normalizer(Some(Lowercase));
    tokenizer.with_pre_tokenizer(Some(Whitespace));
    tokenizer.with_post_processor(Some(post));
    tokenizer.add_special_tokens(&[AddedToken::from(BOS, true), AddedToken::from(EOS, true)]);
    Ok(tokenizer)
}

/// Writes the tiny random-weight model ([`SdConfig::tiny`]) into `dir` in the diffusers layout:
/// the four configuration files, `tokenizer/tokenizer.json` and the three safetensors files.
/// The weights come from `seed` (same seed, same files) and are made by building candle's models
/// against a recording backend, so they carry exactly the names the loader asks for. (candle's
/// `VarMap` would draw its initial values from the unseedable generator.)
pub fn write_tiny(dir: &Path, seed: u64) -> Result<(), ModelError> {
    let cfg = SdConfig::tiny();
    cfg.write(dir)?;
    let path = dir.join(TOKENIZER);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| ModelError::Other(format!("{}: {e}", parent.display())))?;
    }
    tiny_tokenizer()?
        .save(&path, true)
        .map_err(|e| ModelError::Other(format!("{}: {e}", path.display())))?;
    let components: [(&str, u64); 3] = [(UNET_WEIGHTS, 1), (VAE_WEIGHTS, 2), (TEXT_WEIGHTS, 3)];
    for (rel, salt) in components {
        let record = Arc::new(Mutex::new(BTreeMap::new()));
        let backend = RandomWeights {
            seed: Some(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt),
            record: Some(record.clone()),
        };
        let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu);
        match rel {
            UNET_WEIGHTS => drop(build_unet(&cfg, vb)?),
            VAE_WEIGHTS => drop(build_vae(&cfg, vb)?),
            _ => drop(TextModel::build(&cfg.text_encoder, vb)?),
        }
        let tensors: HashMap<String, Tensor> =
            std::mem::take(&mut *record.lock().expect("weights record lock"))
                .into_iter()
                .collect();
        let path = dir.join(rel);
        candle_core::safetensors::save(&tensors, &path)
            .map_err(|e| ModelError::Other(format!("{}: {e}", path.display())))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Timing.

/// What [`bench`] times; the defaults are `shared/tools/sd_unet_anchor.py`'s.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// [`SdConfig::tiny`] instead of [`SdConfig::v1_5`].
    pub tiny: bool,
    /// Run on the CPU even where a GPU is available.
    pub cpu: bool,
    /// Steps of the long run (the anchor's 50).
    pub steps: usize,
    pub batches: Vec<usize>,
    /// Timed repetitions of the long run (minimum taken) and of the 1-step run.
    pub reps: usize,
    pub reps_one_step: usize,
    /// Time candle-transformers' UNet instead of [`UNet`] (the comparison of the two).
    pub candle_transformers_unet: bool,
    /// f32 matrix products in TF32 on CUDA ([`allow_tf32`]), as the anchor allows.
    pub tf32: bool,
    /// ragar's UNet with its CUDA kernels ([`super::kernels`]) where they apply.
    pub fused_kernels: bool,
    /// Attention in one fused pass where the kernels apply ([`super::kernels::set_flash_attention`]).
    pub flash_attention: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            tiny: false,
            cpu: false,
            steps: 50,
            batches: vec![1, 4],
            reps: 3,
            reps_one_step: 10,
            candle_transformers_unet: false,
            tf32: true,
            fused_kernels: true,
            flash_attention: true,
        }
    }
}

/// The UNet that [`bench`] times.
enum BenchUnet {
    Ragar(UNet),
    CandleTransformers(unet_2d::UNet2DConditionModel),
}

impl BenchUnet {
    fn forward(&self, xs: &Tensor, t: f64, ctx: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            BenchUnet::Ragar(u) => u.forward(xs, t, ctx),
            BenchUnet::CandleTransformers(u) => u.forward(xs, t, ctx),
        }
    }
}

/// How far ragar's UNet is from candle-transformers' on `device` in its dtype: both built from
/// the same seeded random weights in the tiny configuration, one step on a seeded 64×64 latent
/// (4096 tokens at the top level, as SD1.5's; 48×48 on the CPU) against a seeded context. Returns
/// `max |ours − theirs| / max |theirs|`; the timed runs use random weights, so this is what says
/// that the timed UNet computes the same function.
pub fn compare_unets(device: &Device) -> Result<f64, ModelError> {
    let cfg = SdConfig::tiny();
    let dtype = dtype_for(device);
    let vb = || VarBuilder::from_backend(Box::new(AllRandom(11)), dtype, device.clone());
    let ours = build_unet(&cfg, vb())?;
    let theirs = unet_2d::UNet2DConditionModel::new(
        vb(),
        cfg.unet.in_channels,
        cfg.unet.out_channels,
        false,
        cfg.unet_config()?,
    )?;
    // On the CPU 48×48: no layer's input has as many channels as pixels a side (64 would give 32
    // channels at 32×32), which candle's CPU convolution, inside candle-transformers' UNet, reads
    // transposed ([`super::unet`]'s convolutions avoid that).
    let side = if device.is_cuda() { 64 } else { 48 };
    let latent = cfg.unet.in_channels;
    let xs = Tensor::from_vec(
        seeded_noise(1, latent * side * side),
        (1, latent, side, side),
        device,
    )?
    .to_dtype(dtype)?;
    let (tokens, hidden) = (
        cfg.text_encoder.max_position_embeddings,
        cfg.unet.cross_attention_dim,
    );
    let ctx = Tensor::from_vec(
        seeded_noise(2, tokens * hidden),
        (1, tokens, hidden),
        device,
    )?
    .to_dtype(dtype)?;
    let a = ours.forward(&xs, 500.0, &ctx)?;
    let b = theirs.forward(&xs, 500.0, &ctx)?;
    relative_difference(&a, &b, "UNet")
}

/// `max |a − b| / max |b|`, `b` being candle-transformers' output.
fn relative_difference(a: &Tensor, b: &Tensor, what: &str) -> Result<f64, ModelError> {
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    let scale = max_abs(&b)?;
    if !(scale.is_finite() && scale > 0.0) {
        return Err(ModelError::Other(format!(
            "candle-transformers' {what} gave max |output| {scale}"
        )));
    }
    Ok(f64::from(max_abs(&(a - b)?)? / scale))
}

/// How far ragar's VAE decoder is from candle-transformers' on `device` in its dtype, as
/// [`compare_unets`]: the tiny configuration, seeded random weights (biases and norm gains too),
/// a seeded 24×24 latent (a 192×192 image).
pub fn compare_vae_decoders(device: &Device) -> Result<f64, ModelError> {
    let cfg = SdConfig::tiny();
    let dtype = dtype_for(device);
    let vb = || VarBuilder::from_backend(Box::new(AllRandom(13)), dtype, device.clone());
    let config = cfg.vae_config()?;
    let ours = VaeDecoder::new(vb(), cfg.vae.out_channels, &config)?;
    let theirs = vae::AutoEncoderKL::new(vb(), cfg.vae.in_channels, cfg.vae.out_channels, config)?;
    // 24×24 latents: no layer's input has as many channels as pixels a side (32 would give 64
    // channels at 64×64), which candle's CPU convolution, inside candle-transformers' decoder,
    // reads transposed ([`super::unet`]'s convolutions avoid that).
    let (latent, side) = (cfg.vae.latent_channels, 24);
    let z = Tensor::from_vec(
        seeded_noise(3, latent * side * side),
        (1, latent, side, side),
        device,
    )?
    .to_dtype(dtype)?;
    relative_difference(&ours.decode(&z)?, &theirs.decode(&z)?, "VAE decoder")
}

/// Times denoising + decoding of the SD1.5 architecture (or the tiny one) with random weights,
/// as the anchor does: per batch size `b`, `steps` UNet steps with classifier-free guidance (the
/// UNet sees `2b` latents against `2b` random 77-token contexts) and a VAE decode, then 1 step +
/// decode; 2 warm-up steps first, the minimum of the repetitions, the device synchronized before
/// the clock is read. f16 on CUDA, f32 on the CPU. Returns one JSON object: `candle_b{b}_{steps}
/// steps_s` and `candle_b{b}_1step_s` in seconds, with the device, dtype and build time.
pub fn bench(options: &BenchOptions) -> Result<serde_json::Value, ModelError> {
    if options.steps == 0 || options.reps == 0 || options.reps_one_step == 0 {
        return Err(ModelError::Unsupported(
            "steps and repetitions must be at least 1".into(),
        ));
    }
    if options.batches.is_empty() || options.batches.contains(&0) {
        return Err(ModelError::Unsupported(
            "batch sizes must be at least 1".into(),
        ));
    }
    let device = if options.cpu {
        Device::Cpu
    } else {
        default_device()?
    };
    let dtype = dtype_for(&device);
    allow_tf32(options.tf32);
    super::kernels::set_fused(options.fused_kernels);
    super::kernels::set_flash_attention(options.flash_attention);
    let cfg = if options.tiny {
        SdConfig::tiny()
    } else {
        SdConfig::v1_5()
    };
    let started = Instant::now();
    let random = |vb_dtype| {
        VarBuilder::from_backend(
            Box::new(RandomWeights {
                seed: None,
                record: None,
            }),
            vb_dtype,
            device.clone(),
        )
    };
    let unet = if options.candle_transformers_unet {
        BenchUnet::CandleTransformers(unet_2d::UNet2DConditionModel::new(
            random(dtype),
            cfg.unet.in_channels,
            cfg.unet.out_channels,
            false,
            cfg.unet_config()?,
        )?)
    } else {
        BenchUnet::Ragar(build_unet(&cfg, random(dtype))?)
    };
    let vae = build_vae(&cfg, random(dtype))?;
    device.synchronize()?;
    let build_s = started.elapsed().as_secs_f64();

    let side = cfg.unet.sample_size;
    let latent = cfg.vae.latent_channels;
    let (tokens, hidden) = (
        cfg.text_encoder.max_position_embeddings,
        cfg.unet.cross_attention_dim,
    );
    let scaling = cfg.vae.scaling_factor;
    let run = |batch: usize, steps: usize| -> Result<(), ModelError> {
        let mut lat =
            Tensor::randn(0f32, 1.0, (batch, latent, side, side), &device)?.to_dtype(dtype)?;
        let ctx =
            Tensor::randn(0f32, 1.0, (2 * batch, tokens, hidden), &device)?.to_dtype(dtype)?;
        for t in 0..steps {
            let x = Tensor::cat(&[&lat, &lat], 0)?;
            let timestep = 999 - t * (1000 / steps);
            let eps = unet.forward(&x, timestep as f64, &ctx)?;
            let (u, c) = (eps.narrow(0, 0, batch)?, eps.narrow(0, batch, batch)?);
            let guided = (&u + ((c - &u)? * 7.5)?)?;
            lat = (lat - (guided * 0.01)?)?;
        }
        let image = vae.decoder.decode(&(lat / scaling)?)?;
        drop(image);
        Ok(())
    };
    let timed = |batch: usize, steps: usize, reps: usize| -> Result<f64, ModelError> {
        run(batch, 2)?;
        device.synchronize()?;
        let mut best = f64::INFINITY;
        for _ in 0..reps {
            let t0 = Instant::now();
            run(batch, steps)?;
            device.synchronize()?;
            best = best.min(t0.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let mut out = serde_json::Map::new();
    out.insert("candle".into(), "0.9.2".into());
    out.insert(
        "arch".into(),
        if options.tiny { "tiny" } else { "sd1.5" }.into(),
    );
    out.insert(
        "device".into(),
        if device.is_cuda() { "cuda:0" } else { "cpu" }.into(),
    );
    out.insert("dtype".into(), format!("{dtype:?}").to_lowercase().into());
    out.insert(
        "unet".into(),
        if options.candle_transformers_unet {
            "candle-transformers"
        } else {
            "ragar"
        }
        .into(),
    );
    out.insert("tf32".into(), options.tf32.into());
    out.insert("fused_kernels".into(), options.fused_kernels.into());
    out.insert("flash_attention".into(), options.flash_attention.into());
    out.insert("build_s".into(), build_s.into());
    // The comparison runs first, so that an error in either UNet stops the run before timing.
    out.insert(
        "tiny_unet_rel_diff_vs_candle_transformers".into(),
        compare_unets(&device)?.into(),
    );
    out.insert(
        "tiny_vae_decoder_rel_diff_vs_candle_transformers".into(),
        compare_vae_decoders(&device)?.into(),
    );
    for &b in &options.batches {
        let long = timed(b, options.steps, options.reps)?;
        out.insert(format!("candle_b{b}_{}steps_s", options.steps), long.into());
        let one = timed(b, 1, options.reps_one_step)?;
        out.insert(format!("candle_b{b}_1step_s"), one.into());
    }
    Ok(serde_json::Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference() -> Image {
        // Not square and not the model's size: it is stretched to 64×64.
        Image {
            width: 40,
            height: 30,
            rgb: (0..40 * 30 * 3).map(|i| (i * 37 % 251) as u8).collect(),
        }
    }

    fn request(seeds: Vec<u64>) -> GenerationRequest {
        GenerationRequest {
            reference: Arc::new(reference()),
            reference_embedding: Arc::from(vec![1.0, 0.0]),
            preference: None,
            preference_agreement: None,
            seeds,
            reference_text: Some(Arc::from("smileys & emotion, face-smiling: grinning face")),
            prompt_hints: vec![
                ("animals & nature, animal-mammal: cat face".into(), 0.7),
                ("food & drink, food-fruit: red apple".into(), 0.3),
            ],
        }
    }

    fn options() -> SdOptions {
        SdOptions {
            steps: 2,
            strength: 0.5,
            guidance: 3.0,
        }
    }

    fn tiny_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write_tiny(dir.path(), 5).unwrap();
        dir
    }

    #[test]
    fn the_tiny_model_generates_deterministically_per_seed() {
        let dir = tiny_dir();
        let g = SdGenerator::load_on(dir.path(), options(), &Device::Cpu).unwrap();
        assert_eq!(g.config().resolution(), 64);
        assert!(g.version().starts_with("sd:"), "{}", g.version());
        let cancel = CancellationToken::new();
        let started = Instant::now();
        let out = g.generate(&[request(vec![1, 2])], &cancel).unwrap();
        let took = started.elapsed();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), 2);
        for c in &out[0] {
            // Images come out at the model's resolution, whatever the reference's size.
            assert_eq!((c.image.width, c.image.height), (64, 64));
            assert_eq!(c.image.rgb.len(), 64 * 64 * 3);
            assert!(c.embedding.is_none());
        }
        assert_ne!(out[0][0].image, out[0][1].image, "different seeds");
        let again = g.generate(&[request(vec![1, 2])], &cancel).unwrap();
        assert_eq!(again[0][0].image.rgb, out[0][0].image.rgb, "same seed");
        assert_eq!(again[0][1].image.rgb, out[0][1].image.rgb, "same seed");
        // Reloading the same files gives the same bytes.
        let reloaded = SdGenerator::load_on(dir.path(), options(), &Device::Cpu).unwrap();
        let third = reloaded.generate(&[request(vec![1, 2])], &cancel).unwrap();
        assert_eq!(third[0][1].image.rgb, out[0][1].image.rgb);
        eprintln!("tiny SD: 2 candidates × 2 guided steps in {took:?}");

        // Turbo-style: one step, no guidance.
        let turbo = SdOptions {
            steps: 1,
            strength: 0.5,
            guidance: 0.0,
        };
        let t = SdGenerator::load_on(dir.path(), turbo, &Device::Cpu).unwrap();
        let a = t.generate(&[request(vec![9])], &cancel).unwrap();
        let b = t.generate(&[request(vec![9])], &cancel).unwrap();
        assert_eq!(a[0][0].image, b[0][0].image);
        assert_eq!(a[0][0].image.width, 64);
    }

    #[test]
    fn the_same_seed_under_another_prompt_differs() {
        let dir = tiny_dir();
        let g = SdGenerator::load_on(dir.path(), options(), &Device::Cpu).unwrap();
        let cancel = CancellationToken::new();
        let a = g.generate(&[request(vec![3])], &cancel).unwrap();
        let mut other = request(vec![3]);
        other.prompt_hints = vec![("travel & places, sky-weather: sun".into(), 1.0)];
        let b = g.generate(&[other], &cancel).unwrap();
        assert_ne!(a[0][0].image, b[0][0].image);
    }

    #[test]
    fn cancellation_stops_generation() {
        let dir = tiny_dir();
        let g = SdGenerator::load_on(dir.path(), options(), &Device::Cpu).unwrap();
        let cancel = CancellationToken::new();
        cancel.cancel();
        assert!(matches!(
            g.generate(&[request(vec![1])], &cancel),
            Err(ModelError::Cancelled)
        ));
    }

    #[test]
    fn the_tiny_files_are_the_diffusers_layout_and_reproducible() {
        let a = tiny_dir();
        for rel in [
            UNET_CONFIG,
            UNET_WEIGHTS,
            VAE_CONFIG,
            VAE_WEIGHTS,
            TEXT_CONFIG,
            TEXT_WEIGHTS,
            TOKENIZER,
            SCHEDULER_CONFIG,
        ] {
            assert!(a.path().join(rel).is_file(), "{rel}");
        }
        assert_eq!(SdConfig::read(a.path()).unwrap(), SdConfig::tiny());
        let names =
            candle_core::safetensors::load(a.path().join(UNET_WEIGHTS), &Device::Cpu).unwrap();
        assert!(
            names.contains_key("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight")
        );
        assert!(names.contains_key("conv_in.weight"));
        let vae = candle_core::safetensors::load(a.path().join(VAE_WEIGHTS), &Device::Cpu).unwrap();
        assert!(vae.contains_key("encoder.mid_block.attentions.0.to_q.weight"));
        assert!(vae.contains_key("quant_conv.weight"));
        let text =
            candle_core::safetensors::load(a.path().join(TEXT_WEIGHTS), &Device::Cpu).unwrap();
        assert!(text.contains_key("text_model.embeddings.token_embedding.weight"));
        assert!(text.contains_key("text_model.encoder.layers.1.mlp.fc2.weight"));
        // Same seed, same bytes.
        let b = tiny_dir();
        for rel in [UNET_WEIGHTS, VAE_WEIGHTS, TEXT_WEIGHTS, TOKENIZER] {
            assert_eq!(
                std::fs::read(a.path().join(rel)).unwrap(),
                std::fs::read(b.path().join(rel)).unwrap(),
                "{rel}"
            );
        }
    }

    #[test]
    fn the_tokenizer_pads_to_the_encoder_length() {
        let dir = tiny_dir();
        let t = PromptTokenizer::load(dir.path(), &SdConfig::tiny().text_encoder).unwrap();
        let ids = t.ids("An emoji of a cat").unwrap();
        assert_eq!(ids.len(), 77);
        let id = |w: &str| t.tokenizer.token_to_id(w).unwrap();
        assert_eq!(
            &ids[..7],
            &[
                id(BOS),
                id("an"),
                id("emoji"),
                id("of"),
                id("a"),
                id("cat"),
                id(EOS)
            ]
        );
        assert!(ids[7..].iter().all(|&i| i == id(EOS)));
        let long = t.ids(&"cat ".repeat(200)).unwrap();
        assert_eq!(long.len(), 77);
        assert_eq!(long[76], id(EOS));
        assert_eq!(t.ids("").unwrap()[..2], [id(BOS), id(EOS)]);
    }

    #[test]
    fn prompts_name_the_heaviest_history_texts() {
        let hints = vec![
            ("b".to_string(), 0.2),
            ("a".to_string(), 0.5),
            ("a".to_string(), 0.4),
            ("".to_string(), 0.9),
            ("z".to_string(), 0.0),
            ("c".to_string(), 0.2),
            ("d".to_string(), 0.1),
        ];
        assert_eq!(
            build_prompt(Some(" grinning face "), &hints),
            "an emoji of grinning face, in the style of a; b; c"
        );
        assert_eq!(build_prompt(None, &[]), "an emoji");
        assert_eq!(build_prompt(Some("cat"), &[]), "an emoji of cat");
    }

    #[test]
    fn a_missing_file_is_named() {
        let dir = tiny_dir();
        std::fs::remove_file(dir.path().join(UNET_WEIGHTS)).unwrap();
        let err = SdGenerator::load_on(dir.path(), options(), &Device::Cpu)
            .err()
            .unwrap();
        assert!(matches!(err, ModelError::Bundle(_)), "{err}");
        let err = err.to_string();
        assert!(
            err.contains("missing unet/diffusion_pytorch_model.safetensors ("),
            "{err}"
        );
        std::fs::remove_file(dir.path().join(TOKENIZER)).unwrap();
        let err = SdGenerator::load_on(dir.path(), options(), &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains(
                "missing tokenizer/tokenizer.json, unet/diffusion_pytorch_model.safetensors"
            ),
            "{err}"
        );
        assert!(err.contains("vocab.json + merges.txt"), "{err}");
    }

    #[test]
    fn configuration_errors_name_the_file_and_key() {
        let dir = tiny_dir();
        let path = dir.path().join(UNET_CONFIG);
        let text = std::fs::read_to_string(&path).unwrap();
        let load = || {
            SdGenerator::load_on(dir.path(), options(), &Device::Cpu)
                .err()
                .unwrap()
                .to_string()
        };
        // A misspelt key: the required one is missing.
        std::fs::write(
            &path,
            text.replace("\"block_out_channels\"", "\"block_out_channel\""),
        )
        .unwrap();
        let err = load();
        assert!(
            err.contains("unet/config.json") && err.contains("block_out_channels"),
            "{err}"
        );
        // A value of the wrong type names its key.
        std::fs::write(
            &path,
            text.replace("\"layers_per_block\": 1", "\"layers_per_block\": \"one\""),
        )
        .unwrap();
        let err = load();
        assert!(err.contains("layers_per_block"), "{err}");
        // Values candle cannot build, and files that disagree.
        std::fs::write(
            &path,
            text.replace("\"DownBlock2D\"", "\"AttnDownBlock2D\""),
        )
        .unwrap();
        let err = load();
        assert!(err.contains("down_block_types[1]"), "{err}");
        std::fs::write(
            &path,
            text.replace("\"cross_attention_dim\": 32", "\"cross_attention_dim\": 48"),
        )
        .unwrap();
        let err = load();
        assert!(
            err.contains("cross_attention_dim") && err.contains("hidden_size"),
            "{err}"
        );
        // Weights that do not match their configuration.
        std::fs::write(
            &path,
            text.replace("\"layers_per_block\": 1", "\"layers_per_block\": 2"),
        )
        .unwrap();
        let err = load();
        assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
        std::fs::write(&path, &text).unwrap();
        // A gelu text encoder of another shape than SD 2.x's.
        let tpath = dir.path().join(TEXT_CONFIG);
        let ttext = std::fs::read_to_string(&tpath).unwrap();
        std::fs::write(&tpath, ttext.replace("quick_gelu", "gelu")).unwrap();
        let err = load();
        assert!(
            err.contains("text_encoder/config.json") && err.contains("hidden_size"),
            "{err}"
        );
        std::fs::write(&tpath, &ttext).unwrap();
        let spath = dir.path().join(SCHEDULER_CONFIG);
        let stext = std::fs::read_to_string(&spath).unwrap();
        std::fs::write(&spath, stext.replace("scaled_linear", "cubic")).unwrap();
        let err = load();
        assert!(err.contains("beta_schedule"), "{err}");
        std::fs::write(&spath, &stext).unwrap();
        // Sampling settings.
        let bad = SdOptions {
            steps: 600,
            strength: 0.5,
            guidance: 1.0,
        };
        let err = SdGenerator::load_on(dir.path(), bad, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("1200-point"), "{err}");
        assert!(SdGenerator::load_on(dir.path(), options(), &Device::Cpu).is_ok());
    }

    #[test]
    fn the_published_shapes_map_onto_candle() {
        let v15 = SdConfig::v1_5();
        v15.check().unwrap();
        assert_eq!(v15.resolution(), 512);
        let unet = v15.unet_config().unwrap();
        assert_eq!(unet.blocks.len(), 4);
        assert_eq!(unet.blocks[3].use_cross_attn, None);
        assert_eq!(unet.blocks[0].attention_head_dim, 8);
        // v2.1: heads per block, linear projections, the OpenCLIP encoder, v-prediction.
        let mut v21 = SdConfig::v1_5();
        v21.unet.attention_head_dim = PerBlock::Each(vec![5, 10, 20, 20]);
        v21.unet.use_linear_projection = true;
        v21.unet.cross_attention_dim = 1024;
        v21.unet.sample_size = 96;
        v21.text_encoder = TextEncoderFile {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 23,
            num_attention_heads: 16,
            hidden_act: "gelu".into(),
            projection_dim: Some(512),
            ..v21.text_encoder
        };
        v21.scheduler.prediction_type = "v_prediction".into();
        v21.check().unwrap();
        assert_eq!(v21.resolution(), 768);
        let u = v21.unet_config().unwrap();
        assert_eq!(
            u.blocks
                .iter()
                .map(|b| b.attention_head_dim)
                .collect::<Vec<_>>(),
            vec![5, 10, 20, 20]
        );
        assert!(u.use_linear_projection);
        assert!(matches!(
            v21.ddim_config().unwrap().prediction_type,
            PredictionType::VPrediction
        ));
        // Turbo: trailing timesteps; one step from half the schedule.
        let mut turbo = v21.clone();
        turbo.scheduler.timestep_spacing = "trailing".into();
        let s = turbo.ddim_config().unwrap().build(2).unwrap();
        assert_eq!(s.timesteps(), &[999, 499]);
        let one = SdOptions {
            steps: 1,
            strength: 0.5,
            guidance: 0.0,
        };
        assert_eq!(one.schedule_len(), 2);
        assert_eq!(
            SdOptions {
                steps: 20,
                strength: 0.6,
                guidance: 7.5
            }
            .schedule_len(),
            34
        );
    }

    #[test]
    fn the_timing_path_runs_on_the_tiny_model() {
        let out = bench(&BenchOptions {
            tiny: true,
            cpu: true,
            steps: 2,
            batches: vec![1, 2],
            reps: 1,
            reps_one_step: 1,
            candle_transformers_unet: false,
            tf32: true,
            ..BenchOptions::default()
        })
        .unwrap();
        for key in [
            "candle_b1_2steps_s",
            "candle_b1_1step_s",
            "candle_b2_2steps_s",
            "candle_b2_1step_s",
            "build_s",
        ] {
            let v = out[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{key} in {out}"));
            assert!(v > 0.0 && v.is_finite(), "{key}: {v}");
        }
        assert_eq!(out["device"], "cpu");
        assert_eq!(out["dtype"], "f32");
        // Only the GELU differs (erf in ours, tanh in theirs).
        let diff = out["tiny_unet_rel_diff_vs_candle_transformers"]
            .as_f64()
            .unwrap();
        assert!(diff < 2e-3, "{diff}");
        // The same arithmetic as candle-transformers' decoder.
        let diff = out["tiny_vae_decoder_rel_diff_vs_candle_transformers"]
            .as_f64()
            .unwrap();
        assert!(diff < 1e-4, "{diff}");
        assert_eq!(out["unet"], "ragar");
        let theirs = bench(&BenchOptions {
            tiny: true,
            cpu: true,
            steps: 1,
            batches: vec![1],
            reps: 1,
            reps_one_step: 1,
            candle_transformers_unet: true,
            tf32: true,
            ..BenchOptions::default()
        })
        .unwrap();
        assert_eq!(theirs["unet"], "candle-transformers");
        assert!(theirs["candle_b1_1step_s"].as_f64().unwrap() > 0.0);
    }
}
