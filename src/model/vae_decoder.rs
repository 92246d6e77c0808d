//! The Stable Diffusion VAE's decoder (diffusers' `AutoencoderKL` decoder and `post_quant_conv`,
//! the same weight names and shapes as candle-transformers' `AutoEncoderKL`), on the UNet's
//! blocks ([`super::unet`]) so that its convolutions, group norms and attention take the CUDA
//! kernels of [`super::kernels`] in f16. At 512×512 the decoder is almost all 3×3 convolutions
//! and group norms over 128–512 channels; candle's im2col path spends most of SD's one-step time
//! there. [`super::sd`] encodes with candle-transformers' VAE and decodes with this one.
//!
//! The unit tests check it against candle-transformers' decoder on the same random weights.

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
    mid_resnet0: ResnetBlock,
    mid_attention: AttentionBlock,
    mid_resnet1: ResnetBlock,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv,
}

impl VaeDecoder {
    /// From the VAE's weights (`vb` at the file's root: `post_quant_conv.*`, `decoder.*`).
    pub fn new(vb: VarBuilder, out_channels: usize, config: &AutoEncoderKLConfig) -> Result<Self> {
        let channels = &config.block_out_channels;
        let (Some(&top), Some(&bottom)) = (channels.last(), channels.first()) else {
            candle_core::bail!("vae: no blocks");
        };
        let groups = config.norm_num_groups;
        let identity = Arc::new(IdentityAffine::default());
        let latent = config.latent_channels;
        let post_quant_conv = if config.use_post_quant_conv {
            Some(Conv::new(conv2d(
                latent,
                latent,
                1,
                Conv2dConfig::default(),
                vb.pp("post_quant_conv"),
            )?)?)
        } else {
            None
        };
        let vb = vb.pp("decoder");
        let resnet = |vb: VarBuilder, cin: usize, cout: usize| {
            ResnetBlock::load(vb, (cin, cout), (groups, EPS), 1.0, None, &identity)
        };
        let vb_mid = vb.pp("mid_block");
        let vb_up = vb.pp("up_blocks");
        let mut up = Vec::with_capacity(channels.len());
        let mut prev = top;
        for (i, &out_ch) in channels.iter().rev().enumerate() {
            let vb = vb_up.pp(i.to_string());
            let resnets = (0..config.layers_per_block + 1)
                .map(|j| {
                    let cin = if j == 0 { prev } else { out_ch };
                    resnet(vb.pp(format!("resnets.{j}")), cin, out_ch)
                })
                .collect::<Result<Vec<_>>>()?;
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
            mid_resnet0: resnet(vb_mid.pp("resnets.0"), top, top)?,
            mid_attention: AttentionBlock::new(vb_mid.pp("attentions.0"), top, groups, &identity)?,
            mid_resnet1: resnet(vb_mid.pp("resnets.1"), top, top)?,
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
        xs = self.mid_resnet0.forward(&xs, None)?;
        xs = self.mid_attention.forward(&xs)?;
        xs = self.mid_resnet1.forward(&xs, None)?;
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
    use crate::model::sd::SdConfig;
    use crate::model::unet::max_abs;
    use crate::model::unet::tests::{all_random, random_vb, seeded};
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

    #[test]
    fn a_decoder_without_blocks_is_an_error() {
        let (sd, mut cfg) = config();
        cfg.block_out_channels.clear();
        assert!(VaeDecoder::new(random_vb(1, None), sd.vae.out_channels, &cfg).is_err());
    }
}
