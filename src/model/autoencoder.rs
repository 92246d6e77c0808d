//! The Stable Diffusion VAE (diffusers' `AutoencoderKL`: the encoder with `quant_conv`, the
//! decoder with `post_quant_conv`; the same weight names and shapes as candle-transformers'
//! `AutoEncoderKL`), on the UNet's blocks ([`super::unet`]) so that its convolutions, group norms
//! and attention take the CUDA kernels of [`super::kernels`] in f16, and so that on the CPU its
//! convolutions avoid candle's misreading of `[b, n, n, n]` inputs. At 512×512 the decoder is
//! almost all 3×3 convolutions and group norms over 128–512 channels; candle's im2col path spends
//! most of SD's one-step time there. [`super::sd`] encodes the reference with [`VaeEncoder`]
//! (the posterior's mean, so img2img stays deterministic per seed) and decodes with
//! [`VaeDecoder`]; each half loads only its own weights.
//!
//! The unit tests check both against candle-transformers' VAE on the same random weights.

use std::sync::Arc;

use candle_core::{Result, Tensor};
use candle_nn::{conv2d, Conv2dConfig, VarBuilder};
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKLConfig;

use super::kernels;
use super::unet::{
    from_tokens, to_tokens, upsampler, Conv, GroupNorm, IdentityAffine, Linear, ResnetBlock,
};

/// The decoder's norms' epsilon (diffusers' `Decoder`).
const EPS: f64 = 1e-6;

/// The mid block's single-head self attention over the latent's pixels, with the residual.
#[derive(Debug)]
struct AttentionBlock {
    norm: GroupNorm,
    /// `[to_q / √c; to_k; to_v]` with their biases.
    qkv: Linear,
    proj: Linear,
    channels: usize,
}

impl AttentionBlock {
    fn new(
        vb: VarBuilder,
        channels: usize,
        groups: usize,
        identity: &Arc<IdentityAffine>,
    ) -> Result<Self> {
        // The names candle-transformers reads: diffusers' current ones, else the legacy ones.
        let (q, k, v, out) = if vb.contains_tensor("to_q.weight") {
            ("to_q", "to_k", "to_v", "to_out.0")
        } else {
            ("query", "key", "value", "proj_attn")
        };
        // Weights stored as 1×1 convolutions in some checkpoints.
        let load = |name: &str| -> Result<(Tensor, Tensor)> {
            let vb = vb.pp(name);
            let weight = match vb.get((channels, channels), "weight") {
                Ok(w) => w,
                Err(_) => vb
                    .get((channels, channels, 1, 1), "weight")?
                    .reshape((channels, channels))?,
            };
            Ok((weight, vb.get(channels, "bias")?))
        };
        let scale = 1.0 / (channels as f64).sqrt();
        let (wq, bq) = load(q)?;
        let (wk, bk) = load(k)?;
        let (wv, bv) = load(v)?;
        let (wo, bo) = load(out)?;
        Ok(AttentionBlock {
            norm: GroupNorm::new(groups, channels, EPS, vb.pp("group_norm"), identity)?,
            qkv: Linear {
                weight: Tensor::cat(&[&(wq * scale)?, &wk, &wv], 0)?,
                bias: Some(Tensor::cat(&[&(bq * scale)?, &bk, &bv], 0)?),
            },
            proj: Linear {
                weight: wo,
                bias: Some(bo),
            },
            channels,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let c = self.channels;
        let tokens = to_tokens(&self.norm.forward(xs)?)?;
        let qkv = self.qkv.forward(&tokens)?;
        let merged = match kernels::attention(&qkv, None, 1, self.channels)? {
            Some(merged) => merged,
            None => {
                let part = |i: usize| qkv.narrow(2, i * c, c)?.contiguous();
                let (q, k, v) = (part(0)?, part(1)?, part(2)?);
                let probs = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
                probs.matmul(&v)?
            }
        };
        from_tokens(&self.proj, &merged, xs)
    }
}

/// The latent's 1×1 convolution (`quant_conv`, `post_quant_conv`) when the VAE has it.
fn latent_conv(present: bool, channels: usize, vb: VarBuilder) -> Result<Option<Conv>> {
    if !present {
        return Ok(None);
    }
    let conv = conv2d(channels, channels, 1, Conv2dConfig::default(), vb)?;
    Ok(Some(Conv::new(conv)?))
}

/// A resnet of the VAE (no time embedding, output scale 1).
fn vae_resnet(
    vb: VarBuilder,
    (cin, cout): (usize, usize),
    groups: usize,
    identity: &Arc<IdentityAffine>,
) -> Result<ResnetBlock> {
    ResnetBlock::load(vb, (cin, cout), (groups, EPS), 1.0, None, identity)
}

/// `n` resnets of one level: the first from `cin` channels, every one to `cout`.
fn level_resnets(
    vb: &VarBuilder,
    n: usize,
    (cin, cout): (usize, usize),
    groups: usize,
    identity: &Arc<IdentityAffine>,
) -> Result<Vec<ResnetBlock>> {
    (0..n)
        .map(|j| {
            let c = (if j == 0 { cin } else { cout }, cout);
            vae_resnet(vb.pp(format!("resnets.{j}")), c, groups, identity)
        })
        .collect()
}

/// The channels of the outermost and of the deepest level.
fn end_channels(config: &AutoEncoderKLConfig) -> Result<(usize, usize)> {
    let channels = &config.block_out_channels;
    match (channels.first(), channels.last()) {
        (Some(&outer), Some(&deepest)) => Ok((outer, deepest)),
        _ => candle_core::bail!("vae: no blocks"),
    }
}

/// The mid block at the deepest level: resnet, self attention, resnet.
#[derive(Debug)]
struct MidBlock {
    resnet0: ResnetBlock,
    attention: AttentionBlock,
    resnet1: ResnetBlock,
}

impl MidBlock {
    fn new(
        vb: VarBuilder,
        channels: usize,
        groups: usize,
        identity: &Arc<IdentityAffine>,
    ) -> Result<Self> {
        let c = (channels, channels);
        Ok(MidBlock {
            resnet0: vae_resnet(vb.pp("resnets.0"), c, groups, identity)?,
            attention: AttentionBlock::new(vb.pp("attentions.0"), channels, groups, identity)?,
            resnet1: vae_resnet(vb.pp("resnets.1"), c, groups, identity)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.resnet0.forward(xs, None)?;
        let xs = self.attention.forward(&xs)?;
        self.resnet1.forward(&xs, None)
    }
}

/// One level of the encoder: resnets, then a 3×3 stride-2 convolution (the input padded by one
/// row and column at the bottom and right, as diffusers' VAE does) except at the bottom level.
#[derive(Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    downsample: Option<Conv>,
}

/// The encoder and `quant_conv`: images `(b, in_channels, h, w)` in [-1, 1] → the posterior's
/// mean `(b, latent_channels, h/8, w/8)` (before the scaling factor).
#[derive(Debug)]
pub struct VaeEncoder {
    conv_in: Conv,
    down: Vec<DownBlock>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv,
    quant_conv: Option<Conv>,
    latent_channels: usize,
}

impl VaeEncoder {
    /// From the VAE's weights (`vb` at the file's root: `encoder.*`, `quant_conv.*`).
    pub fn new(vb: VarBuilder, in_channels: usize, config: &AutoEncoderKLConfig) -> Result<Self> {
        let channels = &config.block_out_channels;
        let (first, deepest) = end_channels(config)?;
        let groups = config.norm_num_groups;
        let identity = Arc::new(IdentityAffine::default());
        let latent = config.latent_channels;
        let quant_conv = latent_conv(config.use_quant_conv, 2 * latent, vb.pp("quant_conv"))?;
        let vb = vb.pp("encoder");
        let vb_down = vb.pp("down_blocks");
        let mut down = Vec::with_capacity(channels.len());
        let mut prev = first;
        for (i, &out_ch) in channels.iter().enumerate() {
            let vb = vb_down.pp(i.to_string());
            let n = config.layers_per_block;
            let resnets = level_resnets(&vb, n, (prev, out_ch), groups, &identity)?;
            let downsample = if i + 1 < channels.len() {
                let stride2 = Conv2dConfig {
                    stride: 2,
                    ..Default::default()
                };
                Some(Conv::new(conv2d(
                    out_ch,
                    out_ch,
                    3,
                    stride2,
                    vb.pp("downsamplers.0.conv"),
                )?)?)
            } else {
                None
            };
            down.push(DownBlock {
                resnets,
                downsample,
            });
            prev = out_ch;
        }
        Ok(VaeEncoder {
            conv_in: Conv::padded3x3(in_channels, first, vb.pp("conv_in"))?,
            down,
            mid: MidBlock::new(vb.pp("mid_block"), deepest, groups, &identity)?,
            norm_out: GroupNorm::new(groups, deepest, EPS, vb.pp("conv_norm_out"), &identity)?,
            conv_out: Conv::padded3x3(deepest, 2 * latent, vb.pp("conv_out"))?,
            quant_conv,
            latent_channels: latent,
        })
    }

    /// The posterior's mean of each image (its log-variance half is not computed further).
    pub fn encode_mean(&self, images: &Tensor) -> Result<Tensor> {
        let mut xs = self.conv_in.forward(images)?;
        for block in &self.down {
            for resnet in &block.resnets {
                xs = resnet.forward(&xs, None)?;
            }
            if let Some(conv) = &block.downsample {
                xs = conv.forward(&xs.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?)?;
            }
        }
        xs = self.mid.forward(&xs)?;
        xs = self
            .conv_out
            .forward(&self.norm_out.forward_silu(&xs, true)?)?;
        if let Some(conv) = &self.quant_conv {
            xs = conv.forward(&xs)?;
        }
        xs.narrow(1, 0, self.latent_channels)
    }
}

/// One level of the decoder: resnets, then a nearest 2× upsample and a convolution except at the
/// top level.
#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsample: Option<Conv>,
}

/// `post_quant_conv` and the decoder: latents `(b, latent_channels, h, w)` (already divided by the
/// scaling factor) → images `(b, out_channels, 8h, 8w)` in about [-1, 1].
#[derive(Debug)]
pub struct VaeDecoder {
    post_quant_conv: Option<Conv>,
    conv_in: Conv,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv,
}

impl VaeDecoder {
    /// From the VAE's weights (`vb` at the file's root: `post_quant_conv.*`, `decoder.*`).
    pub fn new(vb: VarBuilder, out_channels: usize, config: &AutoEncoderKLConfig) -> Result<Self> {
        let channels = &config.block_out_channels;
        let (bottom, top) = end_channels(config)?;
        let groups = config.norm_num_groups;
        let identity = Arc::new(IdentityAffine::default());
        let latent = config.latent_channels;
        let post_quant_conv =
            latent_conv(config.use_post_quant_conv, latent, vb.pp("post_quant_conv"))?;
        let vb = vb.pp("decoder");
        let vb_up = vb.pp("up_blocks");
        let mut up = Vec::with_capacity(channels.len());
        let mut prev = top;
        for (i, &out_ch) in channels.iter().rev().enumerate() {
            let vb = vb_up.pp(i.to_string());
            let n = config.layers_per_block + 1;
            let resnets = level_resnets(&vb, n, (prev, out_ch), groups, &identity)?;
            let upsample = if i + 1 < channels.len() {
                Some(upsampler(&vb, out_ch)?)
            } else {
                None
            };
            up.push(UpBlock { resnets, upsample });
            prev = out_ch;
        }
        Ok(VaeDecoder {
            post_quant_conv,
            conv_in: Conv::padded3x3(latent, top, vb.pp("conv_in"))?,
            mid: MidBlock::new(vb.pp("mid_block"), top, groups, &identity)?,
            up,
            norm_out: GroupNorm::new(groups, bottom, EPS, vb.pp("conv_norm_out"), &identity)?,
            conv_out: Conv::padded3x3(bottom, out_channels, vb.pp("conv_out"))?,
        })
    }

    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let xs = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents)?,
            None => latents.clone(),
        };
        let mut xs = self.conv_in.forward(&xs)?;
        xs = self.mid.forward(&xs)?;
        for block in &self.up {
            for resnet in &block.resnets {
                xs = resnet.forward(&xs, None)?;
            }
            if let Some(conv) = &block.upsample {
                let (_, _, h, w) = xs.dims4()?;
                xs = conv.forward(&xs.upsample_nearest2d(2 * h, 2 * w)?)?;
            }
        }
        self.conv_out
            .forward(&self.norm_out.forward_silu(&xs, true)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::sd::AllRandom;
    use crate::model::sd::SdConfig;
    use crate::model::unet::max_abs;
    use crate::model::unet::tests::{all_random, random_vb, seeded};
    use candle_core::{DType, Device, Shape};
    use candle_nn::var_builder::SimpleBackend;
    use candle_nn::Init;
    use candle_transformers::models::stable_diffusion::vae::AutoEncoderKL;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    /// The tiny configuration: four levels with a channel change, so that the shortcut
    /// convolutions and the upsamplers are exercised.
    fn config() -> (SdConfig, AutoEncoderKLConfig) {
        let sd = SdConfig::tiny();
        let cfg = sd.vae_config().unwrap();
        assert!(cfg.block_out_channels.windows(2).any(|w| w[0] != w[1]));
        (sd, cfg)
    }

    #[test]
    fn it_decodes_what_candle_transformers_decodes_on_the_same_weights() {
        let (sd, cfg) = config();
        let ours_names = Arc::new(Mutex::new(BTreeMap::new()));
        VaeDecoder::new(
            random_vb(3, Some(ours_names.clone())),
            sd.vae.out_channels,
            &cfg,
        )
        .unwrap();
        // Every weight random, norm gains and biases included, the same for both by name.
        let ours = VaeDecoder::new(all_random(3), sd.vae.out_channels, &cfg).unwrap();
        let theirs =
            AutoEncoderKL::new(all_random(3), sd.vae.in_channels, sd.vae.out_channels, cfg)
                .unwrap();
        let names = ours_names.lock().unwrap();
        assert!(names.keys().any(|k| k == "post_quant_conv.weight"));
        assert!(names
            .keys()
            .all(|k| k.starts_with("decoder.") || k.starts_with("post_quant")));
        assert!(names.len() > 40, "{} tensors", names.len());
        drop(names);
        let z = seeded(&[2, sd.vae.latent_channels, 8, 6], 5);
        let batch = ours.decode(&z).unwrap();
        assert_eq!(batch.dims(), &[2, sd.vae.out_channels, 64, 48]);
        // candle-transformers' decoder is compared one latent at a time: decoding a batch, its
        // second image differs from the same latent decoded alone (its mid-block attention);
        // ours decodes each latent of a batch as it decodes it alone.
        for i in 0..2 {
            let alone = z.narrow(0, i, 1).unwrap();
            let a = ours.decode(&alone).unwrap();
            let b = theirs.decode(&alone).unwrap();
            let from_batch = batch.narrow(0, i, 1).unwrap();
            assert_eq!(max_abs(&(&from_batch - &a).unwrap()).unwrap(), 0.0);
            let scale = max_abs(&b).unwrap();
            let diff = max_abs(&(a - &b).unwrap()).unwrap();
            assert!(scale > 0.05, "output {scale}");
            assert!(diff <= 1e-4 * scale, "item {i}: max |Δ| {diff} of {scale}");
        }
    }

    /// [`AllRandom`]'s weights, except that `quant_conv` gives a log-variance of −80 everywhere:
    /// the posterior's standard deviation is then e⁻⁴⁰, and candle-transformers' `sample()` (the
    /// mean plus unseeded noise times it) is the mean to f32's precision.
    struct QuietPosterior(AllRandom);

    impl SimpleBackend for QuietPosterior {
        fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
            let t = self.0.get(s, name, h, dtype, dev)?;
            if !name.starts_with("quant_conv.") {
                return Ok(t);
            }
            let half = t.dim(0)? / 2;
            let logvar = if name.ends_with("bias") {
                Tensor::full(-80f32, half, dev)?.to_dtype(dtype)?
            } else {
                t.narrow(0, half, half)?.zeros_like()?
            };
            Tensor::cat(&[&t.narrow(0, 0, half)?, &logvar], 0)
        }

        fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
            self.0.get_unchecked(name, dtype, dev)
        }

        fn contains_tensor(&self, name: &str) -> bool {
            self.0.contains_tensor(name)
        }
    }

    #[test]
    fn it_encodes_what_candle_transformers_encodes_on_the_same_weights() {
        let (sd, cfg) = config();
        let names = Arc::new(Mutex::new(BTreeMap::new()));
        VaeEncoder::new(random_vb(3, Some(names.clone())), sd.vae.in_channels, &cfg).unwrap();
        {
            let names = names.lock().unwrap();
            assert!(names.keys().any(|k| k == "quant_conv.weight"));
            assert!(names
                .keys()
                .all(|k| k.starts_with("encoder.") || k.starts_with("quant_conv")));
            assert!(names.len() > 30, "{} tensors", names.len());
        }
        let vb = || {
            VarBuilder::from_backend(
                Box::new(QuietPosterior(AllRandom(3))),
                DType::F32,
                Device::Cpu,
            )
        };
        let ours = VaeEncoder::new(vb(), sd.vae.in_channels, &cfg).unwrap();
        let theirs =
            AutoEncoderKL::new(vb(), sd.vae.in_channels, sd.vae.out_channels, cfg.clone()).unwrap();
        // Not square, so that candle's CPU convolution reads every layer of theirs as written.
        let images = (seeded(&[1, sd.vae.in_channels, 64, 48], 7) * 0.5).unwrap();
        let a = ours.encode_mean(&images).unwrap();
        let b = theirs.encode(&images).unwrap().sample().unwrap();
        let f = 1 << (cfg.block_out_channels.len() - 1);
        assert_eq!(a.dims(), &[1, sd.vae.latent_channels, 64 / f, 48 / f]);
        let scale = max_abs(&b).unwrap();
        let diff = max_abs(&(&a - &b).unwrap()).unwrap();
        assert!(scale > 0.05, "output {scale}");
        assert!(diff <= 1e-4 * scale, "max |Δ| {diff} of {scale}");
        // Deterministic: the mean, not a sample.
        assert_eq!(
            max_abs(&(ours.encode_mean(&images).unwrap() - &a).unwrap()).unwrap(),
            0.0
        );
    }

    #[test]
    fn a_vae_without_blocks_is_an_error() {
        let (sd, mut cfg) = config();
        cfg.block_out_channels.clear();
        assert!(VaeDecoder::new(random_vb(1, None), sd.vae.out_channels, &cfg).is_err());
        assert!(VaeEncoder::new(random_vb(1, None), sd.vae.in_channels, &cfg).is_err());
    }
}
