//! The Stable Diffusion UNet (diffusers' `UNet2DConditionModel`, same weight names and shapes) as
//! [`sd`](super::sd) serves it, written for the GPU's f16 path.
//!
//! candle-transformers' UNet computes every attention in f32 (it converts q, k and v, so the
//! `L × L` score matrix of the 64×64 level, 4096 tokens, is written, soft-maxed and read in f32)
//! and builds each group norm from about ten elementwise kernels. Here, with the same
//! configuration type ([`unet_2d::UNet2DConditionModelConfig`]) and the same arithmetic:
//! - attention stays in the model's dtype: the scores' matrix products accumulate in f32 inside
//!   cuBLAS and the softmax accumulates in f32 inside candle's kernel, but nothing is converted;
//!   the `1/√d` scale is folded into `to_q` when the weights load, and q, k and v (k and v for
//!   cross attention) come from one fused projection;
//! - group norm is candle's fused layer-norm kernel over each group, then the per-channel affine
//!   (3 kernels instead of ~10), accumulating in f32 as candle-nn's `GroupNorm` does;
//! - linear layers on token sequences are one 2-D matrix product, not a batch of broadcast ones;
//! - the feed-forward's GEGLU uses the exact (erf) GELU, as diffusers does (candle-transformers
//!   uses the tanh approximation);
//! - the timestep embedding is computed in f32 and cast, as diffusers does.
//!
//! On CUDA in f16, the hot operations run in [`kernels`](super::kernels): 3×3 convolutions as
//! shifted matrix products with the bias, time embedding and residual in one pass, fused group
//! norm + SiLU, attention without head split or merge copies, and transposes, GEGLU and bias
//! additions in single passes. Elsewhere (the CPU, f32) the same arithmetic runs in candle's
//! operations.
//!
//! The unit tests check it against candle-transformers' UNet on the same random weights.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Module, Result, Shape, Tensor, D};
use candle_nn::{conv2d, Conv2d, Conv2dConfig, Init, LayerNorm, VarBuilder};

use super::kernels::{self, Epilogue};
use candle_transformers::models::stable_diffusion::unet_2d::{
    BlockConfig, UNet2DConditionModelConfig,
};

/// Ones and zeros of one length, the identity affine of the fused layer-norm kernel when it
/// normalizes a group; shared by the UNet's group norms.
#[derive(Debug, Default)]
pub(crate) struct IdentityAffine(Mutex<HashMap<(usize, DType), (Tensor, Tensor)>>);

impl IdentityAffine {
    fn get(&self, len: usize, like: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut cache = self.0.lock().expect("identity affine cache");
        if let Some(pair) = cache.get(&(len, like.dtype())) {
            if pair.0.device().same_device(like.device()) {
                return Ok(pair.clone());
            }
        }
        let pair = (
            Tensor::ones(len, like.dtype(), like.device())?,
            Tensor::zeros(len, like.dtype(), like.device())?,
        );
        cache.insert((len, like.dtype()), pair.clone());
        Ok(pair)
    }
}

#[derive(Debug)]
pub(crate) struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f32,
    identity: Arc<IdentityAffine>,
}

impl GroupNorm {
    pub(crate) fn new(
        groups: usize,
        channels: usize,
        eps: f64,
        vb: VarBuilder,
        identity: &Arc<IdentityAffine>,
    ) -> Result<Self> {
        if groups == 0 || channels % groups != 0 {
            candle_core::bail!("group norm: {groups} groups do not divide {channels} channels");
        }
        Ok(GroupNorm {
            weight: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
            groups,
            eps: eps as f32,
            identity: identity.clone(),
        })
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_silu(xs, false)
    }

    /// The norm, then SiLU when `silu`.
    pub(crate) fn forward_silu(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        if let Some(out) =
            kernels::group_norm(xs, &self.weight, &self.bias, self.groups, self.eps, silu)?
        {
            return Ok(out);
        }
        let out = self.forward_candle(xs)?;
        if silu {
            candle_nn::ops::silu(&out)
        } else {
            Ok(out)
        }
    }

    fn forward_candle(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let len = c / self.groups * h * w;
        let (ones, zeros) = self.identity.get(len, xs)?;
        let normed = candle_nn::ops::layer_norm(
            &xs.contiguous()?.reshape((b, self.groups, len))?,
            &ones,
            &zeros,
            self.eps,
        )?;
        normed
            .reshape((b, c, h, w))?
            .broadcast_mul(&self.weight.reshape((1, c, 1, 1))?)?
            .broadcast_add(&self.bias.reshape((1, c, 1, 1))?)
    }
}

/// The largest absolute value of a tensor (as f32): the scale of the UNet comparisons.
pub(crate) fn max_abs(t: &Tensor) -> Result<f32> {
    t.abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()
}

/// A layer's `weight`, with candle-nn's initialization hint (what random-weight builds draw).
fn weight<S: Into<Shape>>(vb: &VarBuilder, shape: S) -> Result<Tensor> {
    vb.get_with_hints(shape, "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)
}

/// `x · Wᵀ + b` over the last dimension as one 2-D product.
#[derive(Debug)]
pub(crate) struct Linear {
    pub(crate) weight: Tensor,
    pub(crate) bias: Option<Tensor>,
}

impl Linear {
    fn load(vb: &VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        Ok(Linear {
            weight: weight(vb, (out_dim, in_dim))?,
            bias: if bias {
                Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?)
            } else {
                None
            },
        })
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_residual(xs, None)
    }

    /// `x · Wᵀ` without the bias, in the input's shape with the last dimension replaced.
    pub(crate) fn product(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims();
        let in_dim = dims[dims.len() - 1];
        let rows = xs.elem_count() / in_dim;
        let out = xs
            .contiguous()?
            .reshape((rows, in_dim))?
            .matmul(&self.weight.t()?)?;
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("at least one dim") = self.weight.dim(0)?;
        out.reshape(shape)
    }

    /// `x · Wᵀ + b + residual`.
    fn forward_residual(&self, xs: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let out = self.product(xs)?;
        let out = match &self.bias {
            Some(b) => match kernels::add_bias(&out, b, residual)? {
                Some(fused) => return Ok(fused),
                None => out.broadcast_add(b)?,
            },
            None => out,
        };
        match residual {
            Some(r) => out + r,
            None => Ok(out),
        }
    }
}

/// A convolution: candle-nn's, with the shifted-product path of [`kernels`] for 3×3 stride-1
/// padding-1 and 1×1 convolutions on CUDA in f16.
#[derive(Debug)]
pub(crate) struct Conv {
    conv: Conv2d,
    /// 3×3: the weight as `(3, n, 3c)` taps; 1×1: as `(1, n, c)`.
    taps: Option<Tensor>,
}

impl Conv {
    /// A 3×3 convolution with padding 1 (`name.weight`, `name.bias`).
    pub(crate) fn padded3x3(
        in_channels: usize,
        out_channels: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let padded = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Conv::new(conv2d(in_channels, out_channels, 3, padded, vb)?)
    }

    pub(crate) fn new(conv: Conv2d) -> Result<Self> {
        let cfg = conv.config();
        let plain = cfg.stride == 1 && cfg.dilation == 1 && cfg.groups == 1;
        let (_, _, kh, kw) = conv.weight().dims4()?;
        let taps = match (kh, kw, cfg.padding) {
            (3, 3, 1) if plain => kernels::conv3x3_taps(conv.weight())?,
            (1, 1, 0) if plain => kernels::conv1x1_taps(conv.weight())?,
            _ => None,
        };
        Ok(Conv { conv, taps })
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_with(xs, None, None, 1.0)
    }

    /// `(conv(xs) + per_channel + residual) / divisor`, `per_channel` `(b, n)` added to every
    /// pixel of its item and channel.
    fn forward_with(
        &self,
        xs: &Tensor,
        per_channel: Option<&Tensor>,
        residual: Option<&Tensor>,
        divisor: f64,
    ) -> Result<Tensor> {
        if let Some(taps) = &self.taps {
            let epilogue = Epilogue {
                bias: self.conv.bias(),
                per_channel,
                residual,
                scale: (1.0 / divisor) as f32,
            };
            if let Some(out) = kernels::conv(xs, taps, epilogue)? {
                return Ok(out);
            }
        }
        let mut out = cpu_safe_conv(&self.conv, xs)?;
        if let Some(t) = per_channel {
            out = out.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        if let Some(r) = residual {
            out = (r + out)?;
        }
        if divisor != 1.0 {
            out = (out / divisor)?;
        }
        Ok(out)
    }
}

/// `conv.forward(xs)`, except that a contiguous `[b, n, n, n]` input on the CPU (as many channels
/// as pixels a side: 256 channels at 256×256 in the VAE decoder at 512×512) goes in as a view with
/// one padded column. candle 0.9's CPU convolution takes such an input's strides for a
/// channels-last layout and reads it transposed; a view with other strides it copies by its real
/// strides.
fn cpu_safe_conv(conv: &Conv2d, xs: &Tensor) -> Result<Tensor> {
    let (_, c, h, w) = xs.dims4()?;
    if xs.device().is_cpu() && c == h && c == w && c > 1 {
        let view = xs.pad_with_zeros(3, 0, 1)?.narrow(3, 0, w)?;
        return conv.forward(&view);
    }
    conv.forward(xs)
}

/// Multi-head attention in the input's dtype; self attention when `context` is `None`.
#[derive(Debug)]
pub(crate) struct Attention {
    /// Self attention: `[to_q / √d; to_k; to_v]`. Cross attention: `to_q / √d` alone.
    q_or_qkv: Linear,
    /// Cross attention: `[to_k; to_v]` applied to the context.
    kv: Option<Linear>,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    pub(crate) fn new(
        vb: VarBuilder,
        dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let ctx = context_dim.unwrap_or(dim);
        let scale = 1.0 / (head_dim as f64).sqrt();
        let q = (weight(&vb.pp("to_q"), (inner, dim))? * scale)?;
        let k = weight(&vb.pp("to_k"), (inner, ctx))?;
        let v = weight(&vb.pp("to_v"), (inner, ctx))?;
        let (q_or_qkv, kv) = match context_dim {
            None => (
                Linear {
                    weight: Tensor::cat(&[&q, &k, &v], 0)?,
                    bias: None,
                },
                None,
            ),
            Some(_) => (
                Linear {
                    weight: q,
                    bias: None,
                },
                Some(Linear {
                    weight: Tensor::cat(&[&k, &v], 0)?,
                    bias: None,
                }),
            ),
        };
        Ok(Attention {
            q_or_qkv,
            kv,
            to_out: Linear::load(&vb.pp("to_out.0"), inner, dim, true)?,
            heads,
            head_dim,
        })
    }

    /// `(b, l, parts·inner)` → `parts` tensors of `(b·heads, l, head_dim)`.
    fn split_heads(&self, xs: &Tensor, parts: usize) -> Result<Vec<Tensor>> {
        let (b, l, _) = xs.dims3()?;
        let xs = xs
            .reshape((b, l, parts, self.heads, self.head_dim))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?;
        (0..parts)
            .map(|i| xs.get(i)?.reshape((b * self.heads, l, self.head_dim)))
            .collect()
    }

    pub(crate) fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        self.forward_residual(xs, context, None)
    }

    /// The attention's output plus `residual`.
    fn forward_residual(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, l, _) = xs.dims3()?;
        let projected = self.q_or_qkv.forward(xs)?;
        let kv = match (&self.kv, context) {
            (Some(kv), Some(ctx)) => Some(kv.forward(ctx)?),
            (None, None) => None,
            _ => candle_core::bail!("attention: context given to self attention or missing"),
        };
        if let Some(merged) =
            kernels::attention(&projected, kv.as_ref(), self.heads, self.head_dim)?
        {
            return self.to_out.forward_residual(&merged, residual);
        }
        let (q, k, v) = match kv {
            Some(kv) => {
                let q = self.split_heads(&projected, 1)?;
                let kv = self.split_heads(&kv, 2)?;
                (q[0].clone(), kv[0].clone(), kv[1].clone())
            }
            None => {
                let qkv = self.split_heads(&projected, 3)?;
                (qkv[0].clone(), qkv[1].clone(), qkv[2].clone())
            }
        };
        let scores = q.matmul(&k.t()?)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs
            .matmul(&v)?
            .reshape((b, self.heads, l, self.head_dim))?
            .transpose(1, 2)?
            .reshape((b, l, self.heads * self.head_dim))?;
        self.to_out.forward_residual(&out, residual)
    }
}

#[derive(Debug)]
struct FeedForward {
    /// GEGLU: one projection to `[value; gate]`.
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(FeedForward {
            proj: Linear::load(&vb.pp("net.0.proj"), dim, 2 * inner, true)?,
            out: Linear::load(&vb.pp("net.2"), inner, dim, true)?,
        })
    }

    /// The feed-forward's output plus `residual`.
    fn forward_residual(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let h = self.proj.product(xs)?;
        let bias = self
            .proj
            .bias
            .as_ref()
            .expect("GEGLU projection has a bias");
        if let Some(gated) = kernels::geglu(&h, bias)? {
            return self.out.forward_residual(&gated, Some(residual));
        }
        let h = h.broadcast_add(bias)?;
        let half = h.dim(D::Minus1)? / 2;
        let value = h.narrow(D::Minus1, 0, half)?;
        let gate = h.narrow(D::Minus1, half, half)?.gelu_erf()?;
        self.out.forward_residual(&(value * gate)?, Some(residual))
    }
}

#[derive(Debug)]
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl TransformerBlock {
    fn new(
        vb: VarBuilder,
        dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        Ok(TransformerBlock {
            norm1: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, None, heads, head_dim)?,
            norm2: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(vb.pp("attn2"), dim, Some(context_dim), heads, head_dim)?,
            norm3: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = self
            .attn1
            .forward_residual(&self.norm1.forward(xs)?, None, Some(xs))?;
        let xs =
            self.attn2
                .forward_residual(&self.norm2.forward(&xs)?, Some(context), Some(&xs))?;
        self.ff.forward_residual(&self.norm3.forward(&xs)?, &xs)
    }
}

/// diffusers' `Transformer2DModel`: group norm, projection to tokens, transformer blocks,
/// projection back, residual. The projections are 1×1 convolutions in SD 1.x and linear layers
/// in SD 2.x (`use_linear_projection`); both are the same matrix product on the tokens.
#[derive(Debug)]
struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<TransformerBlock>,
    proj_out: Linear,
}

impl SpatialTransformer {
    fn new(vb: VarBuilder, channels: usize, heads: usize, depth: usize, ctx: &Ctx) -> Result<Self> {
        let proj = |name: &str| -> Result<Linear> {
            let vb = vb.pp(name);
            let w = if ctx.config.use_linear_projection {
                weight(&vb, (channels, channels))?
            } else {
                weight(&vb, (channels, channels, 1, 1))?.reshape((channels, channels))?
            };
            Ok(Linear {
                weight: w,
                bias: Some(vb.get_with_hints(channels, "bias", Init::Const(0.0))?),
            })
        };
        let vb_blocks = vb.pp("transformer_blocks");
        Ok(SpatialTransformer {
            norm: GroupNorm::new(
                ctx.config.norm_num_groups,
                channels,
                1e-6,
                vb.pp("norm"),
                &ctx.identity,
            )?,
            proj_in: proj("proj_in")?,
            blocks: (0..depth)
                .map(|i| {
                    TransformerBlock::new(
                        vb_blocks.pp(i.to_string()),
                        channels,
                        ctx.config.cross_attention_dim,
                        heads,
                        channels / heads,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: proj("proj_out")?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let tokens = to_tokens(&self.norm.forward(xs)?)?;
        let mut tokens = self.proj_in.forward(&tokens)?;
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        from_tokens(&self.proj_out, &tokens, xs)
    }
}

/// The 3×3 convolution after a level's nearest 2× upsample (`upsamplers.0.conv`).
pub(crate) fn upsampler(vb: &VarBuilder, channels: usize) -> Result<Conv> {
    Conv::padded3x3(channels, channels, vb.pp("upsamplers.0.conv"))
}

/// `(b, c, h, w)` → tokens `(b, h·w, c)`.
pub(crate) fn to_tokens(xs: &Tensor) -> Result<Tensor> {
    if let Some(tokens) = kernels::to_tokens(xs)? {
        return Ok(tokens);
    }
    let (b, c, h, w) = xs.dims4()?;
    xs.reshape((b, c, h * w))?.transpose(1, 2)
}

/// `proj(tokens)` back to the image layout of `residual` `(b, c, h, w)`, plus `residual`.
pub(crate) fn from_tokens(proj: &Linear, tokens: &Tensor, residual: &Tensor) -> Result<Tensor> {
    let projected = proj.product(tokens)?;
    if let Some(out) = kernels::from_tokens(&projected, proj.bias.as_ref(), residual)? {
        return Ok(out);
    }
    let projected = match &proj.bias {
        Some(bias) => projected.broadcast_add(bias)?,
        None => projected,
    };
    projected.transpose(1, 2)?.reshape(residual.shape())? + residual
}

/// diffusers' `ResnetBlock2D`; the UNet's take the time embedding, the VAE decoder's do not.
#[derive(Debug)]
pub(crate) struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv,
    shortcut: Option<Conv>,
    output_scale_factor: f64,
}

impl ResnetBlock {
    fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        output_scale_factor: f64,
        ctx: &Ctx,
    ) -> Result<Self> {
        ResnetBlock::load(
            vb,
            (in_channels, out_channels),
            (ctx.config.norm_num_groups, ctx.config.norm_eps),
            output_scale_factor,
            Some(ctx.time_embed_dim),
            &ctx.identity,
        )
    }

    /// A block of `groups` groups with `eps`, taking a time embedding of `temb_dim` when given.
    pub(crate) fn load(
        vb: VarBuilder,
        (in_channels, out_channels): (usize, usize),
        (groups, eps): (usize, f64),
        output_scale_factor: f64,
        temb_dim: Option<usize>,
        identity: &Arc<IdentityAffine>,
    ) -> Result<Self> {
        Ok(ResnetBlock {
            norm1: GroupNorm::new(groups, in_channels, eps, vb.pp("norm1"), identity)?,
            conv1: Conv::padded3x3(in_channels, out_channels, vb.pp("conv1"))?,
            time_emb_proj: temb_dim
                .map(|dim| Linear::load(&vb.pp("time_emb_proj"), dim, out_channels, true))
                .transpose()?,
            norm2: GroupNorm::new(groups, out_channels, eps, vb.pp("norm2"), identity)?,
            conv2: Conv::padded3x3(out_channels, out_channels, vb.pp("conv2"))?,
            shortcut: if in_channels != out_channels {
                Some(Conv::new(conv2d(
                    in_channels,
                    out_channels,
                    1,
                    Conv2dConfig::default(),
                    vb.pp("conv_shortcut"),
                )?)?)
            } else {
                None
            },
            output_scale_factor,
        })
    }

    /// `temb_silu` is `silu(time embedding)`, shared by every block (`None` in blocks without
    /// one).
    pub(crate) fn forward(&self, xs: &Tensor, temb_silu: Option<&Tensor>) -> Result<Tensor> {
        let t = match (&self.time_emb_proj, temb_silu) {
            (Some(proj), Some(temb)) => Some(proj.forward(temb)?),
            (None, None) => None,
            _ => candle_core::bail!(
                "resnet: time embedding given to a block without one, or missing"
            ),
        };
        let h =
            self.conv1
                .forward_with(&self.norm1.forward_silu(xs, true)?, t.as_ref(), None, 1.0)?;
        let skip = match &self.shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        self.conv2.forward_with(
            &self.norm2.forward_silu(&h, true)?,
            None,
            Some(&skip),
            self.output_scale_factor,
        )
    }
}

/// What the blocks' constructors share.
struct Ctx<'a> {
    config: &'a UNet2DConditionModelConfig,
    time_embed_dim: usize,
    identity: Arc<IdentityAffine>,
}

/// A level's spatial transformers, one per resnet (`attentions.{j}`); none in plain levels.
fn level_attentions(
    vb: &VarBuilder,
    count: usize,
    block: BlockConfig,
    ctx: &Ctx,
) -> Result<Vec<SpatialTransformer>> {
    match block.use_cross_attn {
        Some(depth) => (0..count)
            .map(|j| {
                SpatialTransformer::new(
                    vb.pp(format!("attentions.{j}")),
                    block.out_channels,
                    block.attention_head_dim,
                    depth,
                    ctx,
                )
            })
            .collect(),
        None => Ok(Vec::new()),
    }
}

/// One level of the down path: resnets (each followed by a spatial transformer in cross-attention
/// levels) and a stride-2 convolution except at the deepest level.
#[derive(Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    downsample: Option<Conv2d>,
}

/// One level of the up path: resnets on the concatenation with the down path's outputs (each
/// followed by a spatial transformer in cross-attention levels), then a nearest 2× upsample and a
/// convolution except at the top level.
#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    upsample: Option<Conv>,
}

#[derive(Debug)]
struct MidBlock {
    resnet0: ResnetBlock,
    attention: SpatialTransformer,
    resnet1: ResnetBlock,
}

/// diffusers' `UNet2DConditionModel` for SD 1.x/2.x configurations (down blocks
/// `CrossAttnDownBlock2D`/`DownBlock2D`, the mirrored up blocks, `UNetMidBlock2DCrossAttn`), with
/// the weights of a diffusers `unet/diffusion_pytorch_model.safetensors`.
#[derive(Debug)]
pub struct UNet {
    config: UNet2DConditionModelConfig,
    conv_in: Conv,
    time_linear_1: Linear,
    time_linear_2: Linear,
    down: Vec<DownBlock>,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv,
}

impl UNet {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        config: &UNet2DConditionModelConfig,
    ) -> Result<Self> {
        let blocks = &config.blocks;
        let n = blocks.len();
        if n == 0 {
            candle_core::bail!("unet: no blocks");
        }
        let base = blocks[0].out_channels;
        let ctx = Ctx {
            config,
            time_embed_dim: 4 * base,
            identity: Arc::new(IdentityAffine::default()),
        };
        let conv_in = Conv::padded3x3(in_channels, base, vb.pp("conv_in"))?;
        let time_linear_1 = Linear::load(
            &vb.pp("time_embedding.linear_1"),
            base,
            ctx.time_embed_dim,
            true,
        )?;
        let time_linear_2 = Linear::load(
            &vb.pp("time_embedding.linear_2"),
            ctx.time_embed_dim,
            ctx.time_embed_dim,
            true,
        )?;

        let vb_down = vb.pp("down_blocks");
        let mut down = Vec::with_capacity(n);
        for (i, block) in blocks.iter().enumerate() {
            let vb = vb_down.pp(i.to_string());
            let in_ch = if i == 0 {
                base
            } else {
                blocks[i - 1].out_channels
            };
            let out_ch = block.out_channels;
            let resnets = (0..config.layers_per_block)
                .map(|j| {
                    let cin = if j == 0 { in_ch } else { out_ch };
                    ResnetBlock::new(vb.pp(format!("resnets.{j}")), cin, out_ch, 1.0, &ctx)
                })
                .collect::<Result<Vec<_>>>()?;
            let attentions = level_attentions(&vb, config.layers_per_block, *block, &ctx)?;
            let downsample = if i + 1 < n {
                Some(conv2d(
                    out_ch,
                    out_ch,
                    3,
                    Conv2dConfig {
                        stride: 2,
                        padding: config.downsample_padding,
                        ..Default::default()
                    },
                    vb.pp("downsamplers.0.conv"),
                )?)
            } else {
                None
            };
            down.push(DownBlock {
                resnets,
                attentions,
                downsample,
            });
        }

        let last = blocks[n - 1];
        let top = last.out_channels;
        let vb_mid = vb.pp("mid_block");
        let mid = MidBlock {
            resnet0: ResnetBlock::new(
                vb_mid.pp("resnets.0"),
                top,
                top,
                config.mid_block_scale_factor,
                &ctx,
            )?,
            attention: SpatialTransformer::new(
                vb_mid.pp("attentions.0"),
                top,
                last.attention_head_dim,
                last.use_cross_attn.unwrap_or(1),
                &ctx,
            )?,
            resnet1: ResnetBlock::new(
                vb_mid.pp("resnets.1"),
                top,
                top,
                config.mid_block_scale_factor,
                &ctx,
            )?,
        };

        let vb_up = vb.pp("up_blocks");
        let mut up = Vec::with_capacity(n);
        for i in 0..n {
            let vb = vb_up.pp(i.to_string());
            let block = blocks[n - 1 - i];
            let out_ch = block.out_channels;
            let prev_ch = if i == 0 {
                top
            } else {
                blocks[n - i].out_channels
            };
            // The skip from the down path's level below (or conv_in at the top).
            let skip_ch = blocks[if i == n - 1 { 0 } else { n - i - 2 }].out_channels;
            let layers = config.layers_per_block + 1;
            let resnets = (0..layers)
                .map(|j| {
                    let res_skip = if j == layers - 1 { skip_ch } else { out_ch };
                    let res_in = if j == 0 { prev_ch } else { out_ch };
                    ResnetBlock::new(
                        vb.pp(format!("resnets.{j}")),
                        res_in + res_skip,
                        out_ch,
                        1.0,
                        &ctx,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let attentions = level_attentions(&vb, layers, block, &ctx)?;
            let upsample = if i + 1 < n {
                Some(upsampler(&vb, out_ch)?)
            } else {
                None
            };
            up.push(UpBlock {
                resnets,
                attentions,
                upsample,
            });
        }

        Ok(UNet {
            config: config.clone(),
            conv_in,
            time_linear_1,
            time_linear_2,
            down,
            mid,
            up,
            norm_out: GroupNorm::new(
                config.norm_num_groups,
                base,
                config.norm_eps,
                vb.pp("conv_norm_out"),
                &ctx.identity,
            )?,
            conv_out: Conv::padded3x3(base, out_channels, vb.pp("conv_out"))?,
        })
    }

    /// Sinusoidal embedding of the timestep (in f32, as diffusers computes it), one row per
    /// batch item.
    fn time_embedding(&self, batch: usize, timestep: f64, like: &Tensor) -> Result<Tensor> {
        let channels = self.config.blocks[0].out_channels;
        let half = channels / 2;
        let freqs: Vec<f32> = (0..half)
            .map(|i| {
                let exponent = -(10000f64.ln()) * i as f64 / (half as f64 - self.config.freq_shift);
                (timestep * exponent.exp()) as f32
            })
            .collect();
        let args = Tensor::from_vec(freqs, (1, half), like.device())?;
        let (sin, cos) = (args.sin()?, args.cos()?);
        let emb = if self.config.flip_sin_to_cos {
            Tensor::cat(&[&cos, &sin], 1)?
        } else {
            Tensor::cat(&[&sin, &cos], 1)?
        };
        let emb = if channels % 2 == 1 {
            emb.pad_with_zeros(1, 0, 1)?
        } else {
            emb
        };
        let emb = emb.to_dtype(like.dtype())?.repeat((batch, 1))?;
        self.time_linear_2
            .forward(&candle_nn::ops::silu(&self.time_linear_1.forward(&emb)?)?)
    }

    /// Predicted noise for latents `xs` `(b, in_channels, h, w)` at `timestep`, conditioned on
    /// `context` `(b, tokens, cross_attention_dim)`.
    pub fn forward(&self, xs: &Tensor, timestep: f64, context: &Tensor) -> Result<Tensor> {
        let (b, _, height, width) = xs.dims4()?;
        let n = self.config.blocks.len();
        let factor = 1usize << (n - 1);
        let odd_size = height % factor != 0 || width % factor != 0;
        let xs = if self.config.center_input_sample {
            ((xs * 2.0)? - 1.0)?
        } else {
            xs.clone()
        };
        let temb = candle_nn::ops::silu(&self.time_embedding(b, timestep, &xs)?)?;

        let mut xs = self.conv_in.forward(&xs)?;
        let mut skips = vec![xs.clone()];
        for block in &self.down {
            for (j, resnet) in block.resnets.iter().enumerate() {
                xs = resnet.forward(&xs, Some(&temb))?;
                if let Some(attn) = block.attentions.get(j) {
                    xs = attn.forward(&xs, context)?;
                }
                skips.push(xs.clone());
            }
            if let Some(conv) = &block.downsample {
                xs = conv.forward(&xs)?;
                skips.push(xs.clone());
            }
        }

        xs = self.mid.resnet0.forward(&xs, Some(&temb))?;
        xs = self.mid.attention.forward(&xs, context)?;
        xs = self.mid.resnet1.forward(&xs, Some(&temb))?;

        for block in &self.up {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().expect("one skip per up resnet");
                xs = resnet.forward(&Tensor::cat(&[&xs, &skip], 1)?, Some(&temb))?;
                if let Some(attn) = block.attentions.get(j) {
                    xs = attn.forward(&xs, context)?;
                }
            }
            if let Some(conv) = &block.upsample {
                let (th, tw) = match skips.last() {
                    Some(next) if odd_size => {
                        let (_, _, h, w) = next.dims4()?;
                        (h, w)
                    }
                    _ => {
                        let (_, _, h, w) = xs.dims4()?;
                        (2 * h, 2 * w)
                    }
                };
                xs = conv.forward(&xs.upsample_nearest2d(th, tw)?)?;
            }
        }
        self.conv_out
            .forward(&self.norm_out.forward_silu(&xs, true)?)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::sd::{RandomWeights, SdConfig};
    use candle_core::Device;
    use candle_transformers::models::stable_diffusion::unet_2d;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use std::collections::BTreeMap;

    /// A 3×3 convolution of a `[b, n, n, n]` input (channels = height = width) on the CPU is
    /// the convolution of that input: the same as of the input with one more channel, cropped.
    #[test]
    fn cubic_inputs_convolve_as_nchw_on_the_cpu() {
        let conv = Conv::padded3x3(4, 3, random_vb(3, None)).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let xs: Vec<f32> = (0..2 * 5 * 4 * 4)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        // Five channels at 4×4, which candle reads correctly, and a weight that ignores the
        // fifth: the convolution of the first four, the input.
        let wide = Tensor::from_vec(xs, (2, 5, 4, 4), &Device::Cpu).unwrap();
        let cubic = wide.narrow(1, 0, 4).unwrap().contiguous().unwrap();
        let weight = conv.conv.weight();
        let weight = Tensor::cat(
            &[
                weight,
                &weight.narrow(1, 0, 1).unwrap().zeros_like().unwrap(),
            ],
            1,
        )
        .unwrap();
        let bias = conv.conv.bias().unwrap().reshape((1, 3, 1, 1)).unwrap();
        let want = wide
            .conv2d(&weight, 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&bias)
            .unwrap();
        let got = conv.forward(&cubic).unwrap();
        let max_abs = |t: Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let diff = max_abs((got - &want).unwrap());
        assert!(diff < 1e-5, "max difference {diff}");
        // What candle's convolution gives for the contiguous cubic input itself differs.
        let raw = conv.conv.forward(&cubic).unwrap();
        let off = max_abs((raw - want).unwrap());
        assert!(
            off > 1e-3,
            "candle's convolution now reads cubic inputs as NCHW: {off}"
        );
    }

    pub(crate) fn random_vb(
        seed: u64,
        record: Option<Arc<Mutex<BTreeMap<String, Tensor>>>>,
    ) -> VarBuilder<'static> {
        VarBuilder::from_backend(
            Box::new(RandomWeights {
                seed: Some(seed),
                record,
            }),
            DType::F32,
            Device::Cpu,
        )
    }

    pub(crate) fn all_random(seed: u64) -> VarBuilder<'static> {
        use crate::model::sd::AllRandom;
        VarBuilder::from_backend(Box::new(AllRandom(seed)), DType::F32, Device::Cpu)
    }

    pub(crate) fn seeded(dims: &[usize], seed: u64) -> Tensor {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = dims.iter().product();
        let values: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
        Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        max_abs(&(a - b).unwrap()).unwrap()
    }

    /// The tiny configuration with two attention levels, two layers per block and 2 transformer
    /// layers, so that every path (cross/plain levels, shortcut convolutions, depth) is exercised.
    fn config() -> (SdConfig, UNet2DConditionModelConfig) {
        let mut sd = SdConfig::tiny();
        sd.unet.block_out_channels = vec![32, 64, 64];
        sd.unet.down_block_types = [
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ]
        .map(String::from)
        .to_vec();
        sd.unet.up_block_types = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
            .map(String::from)
            .to_vec();
        sd.unet.layers_per_block = 2;
        let cfg = sd.unet_config().unwrap();
        (sd, cfg)
    }

    #[test]
    fn it_reads_the_same_weights_as_candle_transformers_unet() {
        let (sd, cfg) = config();
        let ours = Arc::new(Mutex::new(BTreeMap::new()));
        let theirs = Arc::new(Mutex::new(BTreeMap::new()));
        UNet::new(random_vb(1, Some(ours.clone())), 4, 4, &cfg).unwrap();
        unet_2d::UNet2DConditionModel::new(
            random_vb(1, Some(theirs.clone())),
            sd.unet.in_channels,
            sd.unet.out_channels,
            false,
            cfg,
        )
        .unwrap();
        let shapes = |m: &Arc<Mutex<BTreeMap<String, Tensor>>>| -> Vec<(String, Vec<usize>)> {
            m.lock()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.dims().to_vec()))
                .collect()
        };
        let (a, b) = (shapes(&ours), shapes(&theirs));
        assert!(a.len() > 100, "{} tensors", a.len());
        assert_eq!(a, b);
    }

    #[test]
    fn it_predicts_what_candle_transformers_unet_predicts_on_the_same_weights() {
        let (sd, cfg) = config();
        let ours = UNet::new(all_random(7), 4, 4, &cfg).unwrap();
        let theirs = unet_2d::UNet2DConditionModel::new(
            all_random(7),
            sd.unet.in_channels,
            sd.unet.out_channels,
            false,
            cfg,
        )
        .unwrap();
        let xs = seeded(&[2, 4, 8, 8], 1);
        let ctx = seeded(&[2, 77, 32], 2);
        for t in [999.0, 500.0, 1.0] {
            let a = ours.forward(&xs, t, &ctx).unwrap();
            let b = theirs.forward(&xs, t, &ctx).unwrap();
            assert_eq!(a.dims(), &[2, 4, 8, 8]);
            // The only difference in arithmetic is the GELU (erf here, tanh there).
            let (diff, scale) = (max_abs_diff(&a, &b), max_abs(&b).unwrap());
            assert!(scale > 0.1, "t={t}: output {scale}");
            assert!(diff <= 2e-3 * scale, "t={t}: max |Δ| {diff} of {scale}");
        }
        // Odd latent sizes take the explicit upsample sizes.
        let xs = seeded(&[1, 4, 10, 6], 3);
        let ctx = ctx.narrow(0, 0, 1).unwrap();
        let a = ours.forward(&xs, 10.0, &ctx).unwrap();
        let b = theirs.forward(&xs, 10.0, &ctx).unwrap();
        assert_eq!(a.dims(), &[1, 4, 10, 6]);
        assert!(max_abs_diff(&a, &b) <= 2e-3 * max_abs(&b).unwrap());
    }
}
