//! CUDA kernels for the Stable Diffusion UNet's hot operations in f16 ([`super::unet`]); every
//! function returns `Ok(None)` where it does not apply (the CPU, another dtype, a CPU-only build,
//! sizes past 32-bit indexing, or [`set_fused`]`(false)`), and the caller runs candle's
//! operations instead.
//!
//! candle's CUDA backend does a 3×3 convolution as im2col (a `(b·h·w) × 9c` copy whose index
//! arithmetic is five 64-bit divisions per element), a matrix product and a transposing copy, and
//! every broadcast or strided copy with 64-bit divisions per element and dimension. Here:
//! - a 3×3, stride-1, padding-1 convolution is three matrix products (cuBLAS, f16 in, f32
//!   accumulation and output), one per kernel row, over views of a zero-padded copy of the input
//!   shifted by that row, then one pass that crops, adds the bias, an optional per-(item, channel)
//!   term (the time embedding) and an optional residual, scales and rounds to f16. The padded copy
//!   holds each channel three times, shifted by 0, 1 and 2 columns, so that one product covers a
//!   kernel row (`3c` deep), with rows a multiple of 8 long, so every product reads aligned memory;
//! - group norm, with the SiLU that follows it, is partial sums over slices of each group (enough
//!   blocks to fill the GPU), the statistics per group, and one elementwise pass;
//! - attention reads q, k and v where the projections wrote them and writes the heads merged, in
//!   one pass (the FlashAttention-2 schedule): per (item, head, 128 queries), keys and values stream
//!   through shared memory, the scores and the output accumulate in registers through tensor-core
//!   products, and the softmax is online, so the l × lk scores never reach memory. Head dims that
//!   are not a multiple of 8 (or past 160), and [`set_flash_attention`]`(false)`, take the earlier
//!   path: per batch item and block of queries, a strided-batched product over the heads, a row
//!   softmax and a second product, the blocks sized so that their scores stay in L2;
//! - the NCHW ↔ token transposes are a tiled transpose (with the projection's bias and the
//!   residual in the way back); GEGLU and bias additions are single passes.
//!
//! All index arithmetic is 32-bit; the host checks the sizes. The kernels compile once per process
//! with NVRTC (which candle's CUDA backend loads anyway).

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Result, Tensor};

static FUSED: AtomicBool = AtomicBool::new(true);

/// Whether the UNet uses these kernels where they apply (the default), or candle's operations
/// everywhere (the comparison in `ragar bench sd --no-fused-kernels`).
pub fn set_fused(enabled: bool) {
    FUSED.store(enabled, Ordering::Relaxed);
}

pub fn fused() -> bool {
    FUSED.load(Ordering::Relaxed)
}

static FLASH: AtomicBool = AtomicBool::new(true);

/// Whether attention runs as one fused pass (the default), or as two strided-batched products
/// around a row softmax with the scores in memory (`ragar bench sd --no-flash-attention`).
pub fn set_flash_attention(enabled: bool) {
    FLASH.store(enabled, Ordering::Relaxed);
}

pub fn flash_attention() -> bool {
    FLASH.load(Ordering::Relaxed)
}

/// Whether `t` is an f16 tensor on a CUDA device in a CUDA build with the kernels enabled.
pub(crate) fn applies(t: &Tensor) -> bool {
    cfg!(feature = "cuda")
        && fused()
        && t.device().is_cuda()
        && t.dtype() == candle_core::DType::F16
}

/// The taps of a 3×3 convolution's weight `(n, c, 3, 3)`, as `(3, n, 3c)`: per kernel row, one
/// `n × 3c` matrix (channel-major, then kernel column), in the layout [`conv`] reads.
pub(crate) fn conv3x3_taps(weight: &Tensor) -> Result<Option<Tensor>> {
    let (n, c, kh, kw) = weight.dims4()?;
    if !applies(weight) || (kh, kw) != (3, 3) {
        return Ok(None);
    }
    Ok(Some(
        weight
            .permute((2, 0, 1, 3))?
            .contiguous()?
            .reshape((3, n, 3 * c))?,
    ))
}

/// The weight of a 1×1 convolution `(n, c, 1, 1)` as `(1, n, c)`, the layout [`conv`] reads.
pub(crate) fn conv1x1_taps(weight: &Tensor) -> Result<Option<Tensor>> {
    let (n, c, kh, kw) = weight.dims4()?;
    if !applies(weight) || (kh, kw) != (1, 1) {
        return Ok(None);
    }
    Ok(Some(weight.reshape((1, n, c))?))
}

/// What [`conv`] adds to the convolution before scaling.
#[derive(Default, Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct Epilogue<'a> {
    /// `(n)`: the convolution's bias.
    pub bias: Option<&'a Tensor>,
    /// `(b, n)`: one value per item and output channel (the time embedding).
    pub per_channel: Option<&'a Tensor>,
    /// `(b, n, h, w)`: a residual.
    pub residual: Option<&'a Tensor>,
    /// The sum is multiplied by this.
    pub scale: f32,
}

impl Epilogue<'_> {
    /// The convolution alone.
    pub(crate) fn unit() -> Self {
        Epilogue {
            scale: 1.0,
            ..Epilogue::default()
        }
    }
}

/// `(conv(x, taps) + bias + per_channel + residual) · scale` for a stride-1 convolution, 3×3
/// with padding 1 (`taps` from [`conv3x3_taps`]) or 1×1 without (from [`conv1x1_taps`]); `x` is
/// `(b, c, h, w)`.
pub(crate) fn conv(x: &Tensor, taps: &Tensor, epilogue: Epilogue) -> Result<Option<Tensor>> {
    if !applies(x) || !applies(taps) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        match taps.dim(0)? {
            3 => gpu::conv3x3(x, taps, epilogue),
            1 => gpu::conv1x1(x, taps, epilogue),
            n => candle_core::bail!("conv: {n} taps"),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = epilogue;
        Ok(None)
    }
}

/// Group norm of `x` `(b, c, h, w)` over `groups` groups, with the per-channel affine, then SiLU
/// when `silu`.
pub(crate) fn group_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f32,
    silu: bool,
) -> Result<Option<Tensor>> {
    if !applies(x) || !applies(gamma) || !applies(beta) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        gpu::group_norm(x, gamma, beta, groups, eps, silu)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (groups, eps, silu);
        Ok(None)
    }
}

/// `(b, c, h, w)` → tokens `(b, h·w, c)`.
pub(crate) fn to_tokens(x: &Tensor) -> Result<Option<Tensor>> {
    if !applies(x) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        let (b, c, h, w) = x.dims4()?;
        gpu::transpose(x, (b, c, h * w), None, None)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(None)
    }
}

/// Tokens `(b, h·w, c)` plus `bias` `(c)` → `(b, c, h, w)` plus `residual` `(b, c, h, w)`.
pub(crate) fn from_tokens(
    tokens: &Tensor,
    bias: Option<&Tensor>,
    residual: &Tensor,
) -> Result<Option<Tensor>> {
    if !applies(tokens) || !applies(residual) || bias.is_some_and(|b| !applies(b)) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        let (b, c, h, w) = residual.dims4()?;
        let out = gpu::transpose(tokens, (b, h * w, c), bias, Some(residual))?;
        out.map(|t| t.reshape((b, c, h, w))).transpose()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(None)
    }
}

/// `x` `(…, cols)` plus `bias` `(cols)` on every row, plus `residual` (the shape of `x`).
pub(crate) fn add_bias(
    x: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    if !applies(x) || !applies(bias) || residual.is_some_and(|r| !applies(r)) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        gpu::add_bias(x, bias, residual)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(None)
    }
}

/// GEGLU on the feed-forward's projection `h` `(…, 2·inner)` (before its bias `(2·inner)`):
/// `(h₁ + b₁) · gelu_erf(h₂ + b₂)`, `(…, inner)`.
pub(crate) fn geglu(h: &Tensor, bias: &Tensor) -> Result<Option<Tensor>> {
    if !applies(h) || !applies(bias) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        gpu::geglu(h, bias)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(None)
    }
}

/// Multi-head attention on projections laid out as the fused projections write them: self
/// attention on `q_or_qkv` `(b, l, 3·inner)` (`[q; k; v]` per token) when `kv` is `None`, cross
/// attention on `q_or_qkv` `(b, l, inner)` and `kv` `(b, lk, 2·inner)` otherwise. q is already
/// scaled by `1/√d`. Returns the heads merged, `(b, l, inner)`.
pub(crate) fn attention(
    q_or_qkv: &Tensor,
    kv: Option<&Tensor>,
    heads: usize,
    head_dim: usize,
) -> Result<Option<Tensor>> {
    if !applies(q_or_qkv) || kv.is_some_and(|t| !applies(t)) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        gpu::attention(q_or_qkv, kv, heads, head_dim)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (heads, head_dim);
        Ok(None)
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::ffi::c_void;
    use std::sync::OnceLock;

    use candle_core::cuda_backend::cudarc::cublas::{result::gemm_strided_batched_ex, sys};
    use candle_core::cuda_backend::cudarc::driver::{
        CudaFunction, CudaSlice, CudaView, DevicePtr, DevicePtrMut, LaunchArgs, LaunchConfig,
        PushKernelArg,
    };
    use candle_core::cuda_backend::cudarc::nvrtc;
    use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
    use candle_core::op::BackpropOp;
    use candle_core::{Device, Result, Shape, Storage, Tensor};
    use half::f16;

    use super::Epilogue;

    const MODULE: &str = "ragar_unet_kernels";

    const SOURCE: &str = r#"
typedef unsigned short h16;

__device__ __forceinline__ float h2f(h16 h) {
  float f;
  asm("{ cvt.f32.f16 %0, %1; }" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ h16 f2h(float f) {
  h16 h;
  asm("{ cvt.rn.f16.f32 %0, %1; }" : "=h"(h) : "f"(f));
  return h;
}

#define GRID_STRIDE(i, total) \
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < (total); i += gridDim.x * blockDim.x)

// Sum (or maximum) over the block; every thread gets the result. `red` holds 32 floats.
__device__ float block_reduce(float v, float* red, bool max) {
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = max ? fmaxf(v, other) : v + other;
  }
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const unsigned warps = (blockDim.x + 31u) >> 5;
    float t = lane < warps ? red[lane] : (max ? __int_as_float(0xff800000) : 0.f);
    for (int o = 16; o > 0; o >>= 1) {
      const float other = __shfl_xor_sync(0xffffffffu, t, o);
      t = max ? fmaxf(t, other) : t + other;
    }
    if (lane == 0) red[0] = t;
  }
  __syncthreads();
  return red[0];
}

// src (planes, h, w) → dst (planes, 3, (h+2)·wp): copy s of a plane holds it zero-padded by one
// pixel on each side, shifted left by s columns, in rows of wp (a multiple of 8) elements.
extern "C" __global__ void pad_taps(const h16* __restrict__ src, h16* __restrict__ dst,
                                    unsigned planes, unsigned h, unsigned w, unsigned wp) {
  const unsigned plane = (h + 2) * wp;
  GRID_STRIDE(i, 3u * planes * plane) {
    const unsigned ps = i / plane, q = i - ps * plane;
    const unsigned p = ps / 3u, s = ps - p * 3u;
    const unsigned y = q / wp, x = q - y * wp + s;
    h16 v = 0;
    if (y - 1u < h && x - 1u < w) v = src[(p * h + (y - 1u)) * w + (x - 1u)];
    dst[i] = v;
  }
}

// acc (planes, h, wp) f32 → out (planes, h, w) f16, planes = b·n:
// out = (acc + bias[channel] + per_channel[plane] + residual) · scale.
extern "C" __global__ void taps_epilogue(const float* __restrict__ acc,
                                         const h16* __restrict__ bias,
                                         const h16* __restrict__ per_channel,
                                         const h16* __restrict__ residual,
                                         h16* __restrict__ out, unsigned planes, unsigned n,
                                         unsigned h, unsigned w, unsigned wp, float scale) {
  GRID_STRIDE(i, planes * h * w) {
    const unsigned x = i % w, t = i / w, y = t % h, p = t / h;
    float v = acc[(p * h + y) * wp + x];
    if (bias) v += h2f(bias[p % n]);
    if (per_channel) v += h2f(per_channel[p]);
    if (residual) v += h2f(residual[i]);
    out[i] = f2h(v * scale);
  }
}

// Group norm in three steps over groups of `len` contiguous elements (a group's channels are
// adjacent). 1: per (group, split), the sums of d and d² with d = x − the group's first element
// (a shift that keeps the variance's subtraction exact enough in f32).
extern "C" __global__ void group_stats(const h16* __restrict__ x, float* __restrict__ partial,
                                       unsigned len, unsigned splits) {
  __shared__ float red[32];
  const unsigned g = blockIdx.x, sp = blockIdx.y;
  const h16* xs = x + (size_t)g * len;
  const float pivot = h2f(xs[0]);
  const unsigned chunk = (len + splits - 1u) / splits, lo = sp * chunk;
  const unsigned hi = min(len, lo + chunk);
  float s = 0.f, q = 0.f;
  for (unsigned i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    const float d = h2f(xs[i]) - pivot;
    s += d;
    q += d * d;
  }
  s = block_reduce(s, red, false);
  q = block_reduce(q, red, false);
  if (threadIdx.x == 0) {
    partial[2u * (g * splits + sp)] = s;
    partial[2u * (g * splits + sp) + 1u] = q;
  }
}

// 2: per group, (mean, 1/√(var + eps)).
extern "C" __global__ void group_finalize(const h16* __restrict__ x,
                                          const float* __restrict__ partial,
                                          float* __restrict__ stats, unsigned count, unsigned len,
                                          unsigned splits, float eps) {
  GRID_STRIDE(g, count) {
    float s = 0.f, q = 0.f;
    for (unsigned sp = 0; sp < splits; ++sp) {
      s += partial[2u * (g * splits + sp)];
      q += partial[2u * (g * splits + sp) + 1u];
    }
    const float m = s / (float)len;
    const float var = fmaxf(q / (float)len - m * m, 0.f);
    stats[2u * g] = h2f(x[(size_t)g * len]) + m;
    stats[2u * g + 1u] = rsqrtf(var + eps);
  }
}

// 3: y = (x − mean)·rstd·gamma[c] + beta[c], then SiLU when `silu`.
extern "C" __global__ void group_apply(const h16* __restrict__ x, const float* __restrict__ stats,
                                       const h16* __restrict__ gamma,
                                       const h16* __restrict__ beta, h16* __restrict__ y,
                                       unsigned total, unsigned channels, unsigned hw,
                                       unsigned len, int silu) {
  GRID_STRIDE(i, total) {
    const unsigned g = i / len, c = (i / hw) % channels;
    float o = (h2f(x[i]) - stats[2u * g]) * stats[2u * g + 1u] * h2f(gamma[c]) + h2f(beta[c]);
    if (silu) o = o / (1.f + __expf(-o));
    y[i] = f2h(o);
  }
}

// src (batch, rows, cols) → dst (batch, cols, rows), plus bias[src column] and residual[dst index].
extern "C" __global__ void transpose(const h16* __restrict__ src, const h16* __restrict__ bias,
                                     const h16* __restrict__ residual, h16* __restrict__ dst,
                                     unsigned rows, unsigned cols) {
  __shared__ float tile[32][33];
  const size_t base = (size_t)blockIdx.z * rows * cols;
  const unsigned c0 = blockIdx.x * 32u, r0 = blockIdx.y * 32u;
  for (unsigned j = threadIdx.y; j < 32u; j += blockDim.y) {
    const unsigned r = r0 + j, c = c0 + threadIdx.x;
    if (r < rows && c < cols) {
      float v = h2f(src[base + (size_t)r * cols + c]);
      if (bias) v += h2f(bias[c]);
      tile[j][threadIdx.x] = v;
    }
  }
  __syncthreads();
  for (unsigned j = threadIdx.y; j < 32u; j += blockDim.y) {
    const unsigned c = c0 + j, r = r0 + threadIdx.x;
    if (r < rows && c < cols) {
      const size_t o = base + (size_t)c * rows + r;
      float v = tile[threadIdx.x][j];
      if (residual) v += h2f(residual[o]);
      dst[o] = f2h(v);
    }
  }
}

extern "C" __global__ void add_bias(const h16* __restrict__ x, const h16* __restrict__ bias,
                                    const h16* __restrict__ residual, h16* __restrict__ out,
                                    unsigned total, unsigned cols) {
  GRID_STRIDE(i, total) {
    float v = h2f(x[i]) + h2f(bias[i % cols]);
    if (residual) v += h2f(residual[i]);
    out[i] = f2h(v);
  }
}

extern "C" __global__ void geglu(const h16* __restrict__ h, const h16* __restrict__ bias,
                                 h16* __restrict__ out, unsigned rows, unsigned inner) {
  GRID_STRIDE(i, rows * inner) {
    const unsigned r = i / inner, j = i - r * inner;
    const h16* row = h + (size_t)r * 2u * inner;
    const float v = h2f(f2h(h2f(row[j]) + h2f(bias[j])));
    const float g = h2f(f2h(h2f(row[inner + j]) + h2f(bias[inner + j])));
    out[i] = f2h(v * (0.5f * g * (1.f + erff(g * 0.70710678118654752f))));
  }
}

// In place, one block per row of `cols` scores.
extern "C" __global__ void softmax_rows(h16* __restrict__ s, unsigned cols) {
  __shared__ float red[32];
  h16* row = s + (size_t)blockIdx.x * cols;
  float m = __int_as_float(0xff800000);
  for (unsigned i = threadIdx.x; i < cols; i += blockDim.x) m = fmaxf(m, h2f(row[i]));
  m = block_reduce(m, red, true);
  float sum = 0.f;
  for (unsigned i = threadIdx.x; i < cols; i += blockDim.x) sum += __expf(h2f(row[i]) - m);
  const float inv = 1.f / block_reduce(sum, red, false);
  for (unsigned i = threadIdx.x; i < cols; i += blockDim.x)
    row[i] = f2h(__expf(h2f(row[i]) - m) * inv);
}

// Attention in one pass (the FlashAttention-2 schedule): a CTA of 8 warps takes 128 queries of one
// (batch item, head), each warp 16 of them, and streams the keys and values through shared memory
// 64 at a time. Scores and the output accumulate in f32 in registers through tensor-core products
// (mma.sync m16n8k16, f16 operands); the softmax is online (a running maximum and sum per query
// row), so the l × lk scores never reach memory. D is the head dim rounded up to 16; the columns
// past d are zeros. Rows of q (q_stride halves a token), k and v (kv_stride) are read where the
// projections wrote them, head h at column h·d; out is (b, l, heads·d).
__device__ __forceinline__ void mma16816(float* c, const unsigned* a, unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("{ ex2.approx.ftz.f32 %0, %1; }" : "=f"(y) : "f"(x));
  return y;
}

// Two f16 in one register, the first in the low half (the fragments' element order).
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
  return (unsigned)f2h(lo) | ((unsigned)f2h(hi) << 16);
}

struct __align__(16) u32x4 {
  unsigned x, y, z, w;
};

template <int D>
__device__ __forceinline__ void flash(const h16* __restrict__ q, const h16* __restrict__ k,
                                      const h16* __restrict__ v, h16* __restrict__ out,
                                      unsigned l, unsigned lk, unsigned d, unsigned heads,
                                      unsigned q_stride, unsigned kv_stride) {
  constexpr unsigned BC = 64, KS = D + 8, VS = BC + 8;  // keys a tile; shared row strides
  __shared__ __align__(16) h16 ks[BC * KS];            // keys × dims
  __shared__ __align__(16) h16 vt[D * VS];             // dims × keys (v transposed)
  const float LOG2E = 1.4426950408889634f;
  const unsigned warp = threadIdx.x >> 5, lane = threadIdx.x & 31u, g = lane >> 2, t = lane & 3u;
  const unsigned item = blockIdx.z, head = blockIdx.y, q0 = blockIdx.x * 128u + warp * 16u;
  const h16* qb = q + (size_t)item * l * q_stride + head * d;
  const h16* kb = k + (size_t)item * lk * kv_stride + head * d;
  const h16* vb = v + (size_t)item * lk * kv_stride + head * d;

  // The warp's 16 query rows as A fragments: qa[kc] covers dims 16kc..16kc+15.
  unsigned qa[D / 16][4];
#pragma unroll
  for (unsigned kc = 0; kc < D / 16; ++kc) {
#pragma unroll
    for (unsigned r = 0; r < 4; ++r) {
      const unsigned row = q0 + g + (r & 1u) * 8u, col = kc * 16u + 2u * t + (r >> 1) * 8u;
      qa[kc][r] = (row < l && col < d)
                      ? *reinterpret_cast<const unsigned*>(qb + (size_t)row * q_stride + col)
                      : 0u;
    }
  }
  // o[j]: dims 8j..8j+7 of rows g (elements 0, 1) and g + 8 (2, 3), columns 2t and 2t + 1.
  float o[D / 8][4];
#pragma unroll
  for (unsigned j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m0 = __int_as_float(0xff800000), m1 = m0, s0 = 0.f, s1 = 0.f;

  // The next tile's keys and values are loaded into registers while this one is computed, then
  // stored to shared memory (v transposed): 16-byte chunks, (key r, dims c8..c8+7) for chunk i.
  constexpr unsigned CHUNKS = BC * (D / 8), PER = (CHUNKS + 255u) / 256u;
  u32x4 kn[PER], vn[PER];
  auto fetch = [&](unsigned kb0) {
#pragma unroll
    for (unsigned p = 0; p < PER; ++p) {
      const unsigned i = threadIdx.x + p * 256u, r = i % BC, c8 = (i / BC) * 8u;
      kn[p] = vn[p] = u32x4{0u, 0u, 0u, 0u};
      if (i < CHUNKS && kb0 + r < lk && c8 < d) {
        kn[p] = *reinterpret_cast<const u32x4*>(kb + (size_t)(kb0 + r) * kv_stride + c8);
        vn[p] = *reinterpret_cast<const u32x4*>(vb + (size_t)(kb0 + r) * kv_stride + c8);
      }
    }
  };
  fetch(0);
  for (unsigned kb0 = 0; kb0 < lk; kb0 += BC) {
    __syncthreads();
#pragma unroll
    for (unsigned p = 0; p < PER; ++p) {
      const unsigned i = threadIdx.x + p * 256u, r = i % BC, c8 = (i / BC) * 8u;
      if (i < CHUNKS) {
        *reinterpret_cast<u32x4*>(ks + r * KS + c8) = kn[p];
        const h16* vh = reinterpret_cast<const h16*>(&vn[p]);
#pragma unroll
        for (unsigned e = 0; e < 8; ++e) vt[(c8 + e) * VS + r] = vh[e];
      }
    }
    __syncthreads();
    if (kb0 + BC < lk) fetch(kb0 + BC);

    // S = Q·Kᵀ for the tile: s[j] holds keys 8j + 2t, 8j + 2t + 1 of rows g and g + 8.
    float s[BC / 8][4];
#pragma unroll
    for (unsigned j = 0; j < BC / 8; ++j) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
      for (unsigned kc = 0; kc < D / 16; ++kc) {
        const h16* kr = ks + (j * 8u + g) * KS + kc * 16u + 2u * t;
        mma16816(s[j], qa[kc], *reinterpret_cast<const unsigned*>(kr),
                 *reinterpret_cast<const unsigned*>(kr + 8));
      }
    }
    if (kb0 + BC > lk) {
#pragma unroll
      for (unsigned j = 0; j < BC / 8; ++j)
#pragma unroll
        for (unsigned e = 0; e < 4; ++e)
          if (kb0 + j * 8u + 2u * t + (e & 1u) >= lk) s[j][e] = __int_as_float(0xff800000);
    }

    // Online softmax: the new row maxima (over the 4 lanes that share a row), the rescale of
    // what was accumulated, then the tile's probabilities.
    float x0 = m0, x1 = m1;
#pragma unroll
    for (unsigned j = 0; j < BC / 8; ++j) {
      x0 = fmaxf(x0, fmaxf(s[j][0], s[j][1]));
      x1 = fmaxf(x1, fmaxf(s[j][2], s[j][3]));
    }
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
      x0 = fmaxf(x0, __shfl_xor_sync(0xffffffffu, x0, off));
      x1 = fmaxf(x1, __shfl_xor_sync(0xffffffffu, x1, off));
    }
    const float c0 = ex2((m0 - x0) * LOG2E), c1 = ex2((m1 - x1) * LOG2E);
    m0 = x0;
    m1 = x1;
    s0 *= c0;
    s1 *= c1;
#pragma unroll
    for (unsigned j = 0; j < D / 8; ++j) {
      o[j][0] *= c0;
      o[j][1] *= c0;
      o[j][2] *= c1;
      o[j][3] *= c1;
    }
    const float n0 = -x0 * LOG2E, n1 = -x1 * LOG2E;
#pragma unroll
    for (unsigned j = 0; j < BC / 8; ++j) {
      s[j][0] = ex2(fmaf(s[j][0], LOG2E, n0));
      s[j][1] = ex2(fmaf(s[j][1], LOG2E, n0));
      s[j][2] = ex2(fmaf(s[j][2], LOG2E, n1));
      s[j][3] = ex2(fmaf(s[j][3], LOG2E, n1));
      s0 += s[j][0] + s[j][1];
      s1 += s[j][2] + s[j][3];
    }

    // O += P·V, 16 keys a step: the score accumulators of two key groups are P's A fragment.
#pragma unroll
    for (unsigned kc = 0; kc < BC / 16; ++kc) {
      const unsigned pa[4] = {pack2(s[2 * kc][0], s[2 * kc][1]),
                              pack2(s[2 * kc][2], s[2 * kc][3]),
                              pack2(s[2 * kc + 1][0], s[2 * kc + 1][1]),
                              pack2(s[2 * kc + 1][2], s[2 * kc + 1][3])};
#pragma unroll
      for (unsigned j = 0; j < D / 8; ++j) {
        const h16* vr = vt + (j * 8u + g) * VS + kc * 16u + 2u * t;
        mma16816(o[j], pa, *reinterpret_cast<const unsigned*>(vr),
                 *reinterpret_cast<const unsigned*>(vr + 8));
      }
    }
  }

#pragma unroll
  for (int off = 1; off <= 2; off <<= 1) {
    s0 += __shfl_xor_sync(0xffffffffu, s0, off);
    s1 += __shfl_xor_sync(0xffffffffu, s1, off);
  }
  const float i0 = 1.f / s0, i1 = 1.f / s1;
  const unsigned inner = heads * d, r0 = q0 + g, r1 = q0 + g + 8u;
  h16* ob = out + (size_t)item * l * inner + head * d;
#pragma unroll
  for (unsigned j = 0; j < D / 8; ++j) {
    const unsigned col = j * 8u + 2u * t;
    if (col < d) {
      if (r0 < l)
        *reinterpret_cast<unsigned*>(ob + (size_t)r0 * inner + col) =
            pack2(o[j][0] * i0, o[j][1] * i0);
      if (r1 < l)
        *reinterpret_cast<unsigned*>(ob + (size_t)r1 * inner + col) =
            pack2(o[j][2] * i1, o[j][3] * i1);
    }
  }
}

#define FLASH_KERNEL(D)                                                                         \
  extern "C" __global__ void __launch_bounds__(256)                                             \
      flash_attention_##D(const h16* __restrict__ q, const h16* __restrict__ k,                 \
                          const h16* __restrict__ v, h16* __restrict__ out, unsigned l,         \
                          unsigned lk, unsigned d, unsigned heads, unsigned q_stride,           \
                          unsigned kv_stride) {                                                 \
    flash<D>(q, k, v, out, l, lk, d, heads, q_stride, kv_stride);                               \
  }
FLASH_KERNEL(16)
FLASH_KERNEL(32)
FLASH_KERNEL(48)
FLASH_KERNEL(64)
FLASH_KERNEL(80)
FLASH_KERNEL(96)
FLASH_KERNEL(128)
FLASH_KERNEL(160)
"#;

    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();

    fn func(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
        let ptx = PTX
            .get_or_init(|| {
                // compute_80: the attention's mma.sync m16n8k16 (Ampere and later).
                let options = nvrtc::CompileOptions {
                    arch: Some("compute_80"),
                    ..Default::default()
                };
                nvrtc::compile_ptx_with_opts(SOURCE, options)
                    .map(|p| p.to_src())
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| candle_core::Error::Msg(format!("compiling the UNet kernels: {e}")))?;
        Ok(dev
            .get_or_load_custom_func(name, MODULE, ptx)?
            .into_cuda_function())
    }

    fn device(t: &Tensor) -> Result<CudaDevice> {
        match t.device() {
            Device::Cuda(d) => Ok(d.clone()),
            _ => candle_core::bail!("not a CUDA tensor"),
        }
    }

    /// Runs `f` on the f16 elements of `t` (made contiguous), from its first element.
    fn with_view<R>(t: &Tensor, f: impl FnOnce(CudaView<'_, f16>) -> Result<R>) -> Result<R> {
        let t = t.contiguous()?;
        let (storage, layout) = t.storage_and_layout();
        match &*storage {
            Storage::Cuda(cs) => f(cs.as_cuda_slice::<f16>()?.slice(layout.start_offset()..)),
            _ => candle_core::bail!("not a CUDA tensor"),
        }
    }

    fn wrap(out: CudaSlice<f16>, dev: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
        Tensor::from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone())),
            shape,
            BackpropOp::none(),
            false,
        )
    }

    /// Whether `n` elements can be indexed in 32 bits (with room for the grid-stride loop).
    fn fits(n: usize) -> bool {
        n < (1usize << 31)
    }

    fn grid(total: usize) -> LaunchConfig {
        const THREADS: u32 = 256;
        let blocks = total.div_ceil(THREADS as usize).clamp(1, 65_535 * 8) as u32;
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// An optional input: its view, or a null pointer.
    enum Arg<'a> {
        Some(CudaView<'a, f16>),
        Null(u64),
    }

    // SAFETY: pushes what cudarc's own implementations push: the view's device pointer (with its
    // stream synchronization), or a null pointer as a 64-bit value.
    unsafe impl<'a, 'b: 'a, 'c: 'b> PushKernelArg<&'b Arg<'c>> for LaunchArgs<'a> {
        #[inline(always)]
        fn arg(&mut self, arg: &'b Arg<'c>) -> &mut Self {
            match arg {
                Arg::Some(view) => self.arg(view),
                Arg::Null(zero) => self.arg(zero),
            }
        }
    }

    /// Launches `$name` with `$cfg` on the arguments, each a view, an [`Arg`] or a scalar.
    macro_rules! launch {
        ($dev:expr, $name:expr, $cfg:expr; $($arg:expr),* $(,)?) => {{
            let f = func($dev, $name)?;
            let stream = $dev.cuda_stream();
            let mut builder = stream.launch_builder(&f);
            $( let arg = $arg; builder.arg(arg); )*
            // SAFETY: the arguments match the kernel's parameters, and the sizes were checked.
            unsafe { builder.launch($cfg) }.w()?;
        }};
    }

    /// Runs `f` with the optional tensor's view (or a null pointer).
    fn with_opt<R>(t: Option<&Tensor>, f: impl FnOnce(Arg<'_>) -> Result<R>) -> Result<R> {
        match t {
            Some(t) => with_view(t, |v| f(Arg::Some(v))),
            None => f(Arg::Null(0)),
        }
    }

    /// [`with_opt`] for two optional tensors.
    fn with_opts<R>(
        (a, b): (Option<&Tensor>, Option<&Tensor>),
        f: impl FnOnce(Arg<'_>, Arg<'_>) -> Result<R>,
    ) -> Result<R> {
        with_opt(a, |a| with_opt(b, |b| f(a, b)))
    }

    /// One strided-batched product `C = op(A)·op(B)` in cuBLAS's column-major terms, f16 inputs,
    /// f32 accumulation; `c_f32` selects an f32 output.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        dev: &CudaDevice,
        (ta, tb): (bool, bool),
        (m, n, k): (usize, usize, usize),
        (a, lda, stride_a): (u64, usize, usize),
        (b, ldb, stride_b): (u64, usize, usize),
        beta: f32,
        (c, ldc, stride_c, c_f32): (u64, usize, usize, bool),
        batch: usize,
    ) -> Result<()> {
        let op = |t| {
            if t {
                sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let alpha = 1f32;
        let blas = dev.cublas_handle();
        gemm_strided_batched_ex(
            *blas.handle(),
            op(ta),
            op(tb),
            m as i32,
            n as i32,
            k as i32,
            &alpha as *const f32 as *const c_void,
            a as *const c_void,
            sys::cudaDataType_t::CUDA_R_16F,
            lda as i32,
            stride_a as i64,
            b as *const c_void,
            sys::cudaDataType_t::CUDA_R_16F,
            ldb as i32,
            stride_b as i64,
            &beta as *const f32 as *const c_void,
            c as *mut c_void,
            if c_f32 {
                sys::cudaDataType_t::CUDA_R_32F
            } else {
                sys::cudaDataType_t::CUDA_R_16F
            },
            ldc as i32,
            stride_c as i64,
            batch as i32,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
        .map_err(|e| candle_core::Error::Msg(format!("cuBLAS: {e:?}")))
    }

    pub(super) fn conv3x3(x: &Tensor, taps: &Tensor, ep: Epilogue) -> Result<Option<Tensor>> {
        let (b, c, h, w) = x.dims4()?;
        let (rows, n, tc) = taps.dims3()?;
        if rows != 3 || tc != 3 * c {
            candle_core::bail!("conv3x3: taps {:?} for input {:?}", taps.dims(), x.dims());
        }
        let wp = (w + 2).div_ceil(8) * 8;
        let plane = (h + 2) * wp;
        let m = h * wp;
        if !fits(3 * b * c * plane) || !fits(b * n * m) {
            return Ok(None);
        }
        let dev = device(x)?;
        let stream = dev.cuda_stream();
        // SAFETY: every element is written by pad_taps.
        let mut padded = unsafe { dev.alloc::<f16>(3 * b * c * plane)? };
        with_view(x, |src| {
            launch!(&dev, "pad_taps", grid(3 * b * c * plane);
                &src, &mut padded, &((b * c) as u32), &(h as u32), &(w as u32), &(wp as u32));
            Ok(())
        })?;
        // SAFETY: the first product (beta 0) writes every element.
        let mut acc = unsafe { dev.alloc::<f32>(b * n * m)? };
        with_view(taps, |taps| {
            let (pad_ptr, _g1) = padded.device_ptr(&stream);
            let (taps_ptr, _g2) = taps.device_ptr(&stream);
            let (acc_ptr, _g3) = acc.device_ptr_mut(&stream);
            for ky in 0..3 {
                let a = pad_ptr + 2 * (ky * wp) as u64;
                let w_row = taps_ptr + 2 * (ky * n * 3 * c) as u64;
                // SAFETY: A (m × 3c, ld plane) is the padded input shifted down by ky rows, its
                // 3c columns the three shifted copies of each channel; B is the kernel row's
                // n × 3c matrix read as 3c × n; C is (n, m) per item.
                unsafe {
                    gemm(
                        &dev,
                        (false, false),
                        (m, n, 3 * c),
                        (a, plane, 3 * c * plane),
                        (w_row, 3 * c, 0),
                        if ky == 0 { 0.0 } else { 1.0 },
                        (acc_ptr, m, n * m, true),
                        b,
                    )?;
                }
            }
            Ok(())
        })?;
        drop(padded);
        let out = epilogue(&dev, &acc, ep, (b, n, h, w), wp)?;
        Ok(Some(wrap(out, &dev, (b, n, h, w))))
    }

    pub(super) fn conv1x1(x: &Tensor, taps: &Tensor, ep: Epilogue) -> Result<Option<Tensor>> {
        let (b, c, h, w) = x.dims4()?;
        let (_, n, tc) = taps.dims3()?;
        if tc != c {
            candle_core::bail!("conv1x1: weight {:?} for input {:?}", taps.dims(), x.dims());
        }
        let hw = h * w;
        if !fits(b * c * hw) || !fits(b * n * hw) {
            return Ok(None);
        }
        let dev = device(x)?;
        let stream = dev.cuda_stream();
        // SAFETY: the product (beta 0) writes every element.
        let mut acc = unsafe { dev.alloc::<f32>(b * n * hw)? };
        with_view(x, |xv| {
            with_view(taps, |tv| {
                let (x_ptr, _g1) = xv.device_ptr(&stream);
                let (w_ptr, _g2) = tv.device_ptr(&stream);
                let (acc_ptr, _g3) = acc.device_ptr_mut(&stream);
                // SAFETY: per item, (hw × c, ld hw) times the n × c weight read as c × n into
                // (n, hw).
                unsafe {
                    gemm(
                        &dev,
                        (false, false),
                        (hw, n, c),
                        (x_ptr, hw, c * hw),
                        (w_ptr, c, 0),
                        0.0,
                        (acc_ptr, hw, n * hw, true),
                        b,
                    )
                }
            })
        })?;
        let out = epilogue(&dev, &acc, ep, (b, n, h, w), w)?;
        Ok(Some(wrap(out, &dev, (b, n, h, w))))
    }

    /// The f32 accumulator `(b·n, h, wp)` cropped to `(b, n, h, w)` with the epilogue's terms.
    fn epilogue(
        dev: &CudaDevice,
        acc: &CudaSlice<f32>,
        ep: Epilogue,
        (b, n, h, w): (usize, usize, usize, usize),
        wp: usize,
    ) -> Result<CudaSlice<f16>> {
        for (what, t, want) in [
            ("bias", ep.bias, vec![n]),
            ("per-channel term", ep.per_channel, vec![b, n]),
            ("residual", ep.residual, vec![b, n, h, w]),
        ] {
            if let Some(t) = t {
                if t.dims() != want.as_slice() {
                    candle_core::bail!("conv epilogue: {what} {:?}, expected {want:?}", t.dims());
                }
            }
        }
        // SAFETY: the kernel writes every element.
        let mut out = unsafe { dev.alloc::<f16>(b * n * h * w)? };
        with_opt(ep.bias, |bias| {
            with_opts((ep.per_channel, ep.residual), |per_channel, residual| {
                launch!(dev, "taps_epilogue", grid(b * n * h * w);
                    acc, &bias, &per_channel, &residual, &mut out, &((b * n) as u32),
                    &(n as u32), &(h as u32), &(w as u32), &(wp as u32), &ep.scale);
                Ok(())
            })
        })?;
        Ok(out)
    }

    pub(super) fn group_norm(
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        groups: usize,
        eps: f32,
        silu: bool,
    ) -> Result<Option<Tensor>> {
        let (b, c, h, w) = x.dims4()?;
        if groups == 0 || c % groups != 0 || h * w == 0 || !fits(b * c * h * w) {
            return Ok(None);
        }
        let dev = device(x)?;
        let (count, len, total) = (b * groups, c / groups * h * w, b * c * h * w);
        // Enough blocks to fill the GPU: about 16k elements per (group, split).
        let splits = len.div_ceil(16_384).clamp(1, 64);
        // SAFETY: each buffer is written in full by the kernel before it (partial: one value
        // pair per (group, split); stats: per group; out: every element).
        let mut partial = unsafe { dev.alloc::<f32>(2 * count * splits)? };
        let mut stats = unsafe { dev.alloc::<f32>(2 * count)? };
        let mut out = unsafe { dev.alloc::<f16>(total)? };
        with_view(x, |xv| {
            let cfg = LaunchConfig {
                grid_dim: (count as u32, splits as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            launch!(&dev, "group_stats", cfg;
                &xv, &mut partial, &(len as u32), &(splits as u32));
            launch!(&dev, "group_finalize", grid(count);
                &xv, &partial, &mut stats, &(count as u32), &(len as u32), &(splits as u32),
                &eps);
            with_view(gamma, |g| {
                with_view(beta, |bt| {
                    launch!(&dev, "group_apply", grid(total);
                        &xv, &stats, &g, &bt, &mut out, &(total as u32), &(c as u32),
                        &((h * w) as u32), &(len as u32), &(silu as i32));
                    Ok(())
                })
            })
        })?;
        Ok(Some(wrap(out, &dev, (b, c, h, w))))
    }

    /// `src` `(batch, rows, cols)` → `(batch, cols, rows)`, with `bias[col]` and `residual`.
    pub(super) fn transpose(
        src: &Tensor,
        (batch, rows, cols): (usize, usize, usize),
        bias: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        let total = batch * rows * cols;
        if src.elem_count() != total || !fits(total) || batch > 65_535 || rows / 32 >= 65_535 {
            return Ok(None);
        }
        let dev = device(src)?;
        // SAFETY: the kernel writes every element.
        let mut out = unsafe { dev.alloc::<f16>(total)? };
        let cfg = LaunchConfig {
            grid_dim: (
                cols.div_ceil(32) as u32,
                rows.div_ceil(32) as u32,
                batch as u32,
            ),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        with_view(src, |s| {
            with_opts((bias, residual), |bias, residual| {
                launch!(&dev, "transpose", cfg;
                    &s, &bias, &residual, &mut out, &(rows as u32), &(cols as u32));
                Ok(())
            })
        })?;
        Ok(Some(wrap(out, &dev, (batch, cols, rows))))
    }

    pub(super) fn add_bias(
        x: &Tensor,
        bias: &Tensor,
        residual: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        let total = x.elem_count();
        let cols = bias.elem_count();
        if cols == 0 || x.dims().last() != Some(&cols) || !fits(total) {
            return Ok(None);
        }
        if residual.is_some_and(|r| r.dims() != x.dims()) {
            candle_core::bail!("add_bias: residual {:?} for {:?}", residual, x.dims());
        }
        let dev = device(x)?;
        // SAFETY: the kernel writes every element.
        let mut out = unsafe { dev.alloc::<f16>(total)? };
        with_view(x, |xv| {
            with_view(bias, |bv| {
                with_opt(residual, |residual| {
                    launch!(&dev, "add_bias", grid(total);
                        &xv, &bv, &residual, &mut out, &(total as u32), &(cols as u32));
                    Ok(())
                })
            })
        })?;
        Ok(Some(wrap(out, &dev, x.shape().clone())))
    }

    pub(super) fn geglu(h: &Tensor, bias: &Tensor) -> Result<Option<Tensor>> {
        let dims = h.dims();
        let two_inner = *dims.last().unwrap_or(&0);
        if two_inner % 2 != 0 || bias.elem_count() != two_inner || !fits(h.elem_count()) {
            return Ok(None);
        }
        let inner = two_inner / 2;
        let rows = h.elem_count() / two_inner.max(1);
        let dev = device(h)?;
        // SAFETY: the kernel writes every element.
        let mut out = unsafe { dev.alloc::<f16>(rows * inner)? };
        with_view(h, |hv| {
            with_view(bias, |bv| {
                launch!(&dev, "geglu", grid(rows * inner);
                    &hv, &bv, &mut out, &(rows as u32), &(inner as u32));
                Ok(())
            })
        })?;
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("checked above") = inner;
        Ok(Some(wrap(out, &dev, shape)))
    }

    /// Head dims (rounded up to 16) with a `flash_attention_{D}` kernel.
    const FLASH_DIMS: [usize; 8] = [16, 32, 48, 64, 80, 96, 128, 160];

    pub(super) fn attention(
        q_or_qkv: &Tensor,
        kv: Option<&Tensor>,
        heads: usize,
        d: usize,
    ) -> Result<Option<Tensor>> {
        let inner = heads * d;
        let (b, l, width) = q_or_qkv.dims3()?;
        // (row stride of q, of k and v; offsets of q, k, v within their rows; keys per item)
        let (lk, ld_kv) = match kv {
            None => {
                if width != 3 * inner {
                    candle_core::bail!("attention: qkv width {width}, expected {}", 3 * inner);
                }
                (l, 3 * inner)
            }
            Some(kv) => {
                let (kb, lk, kw) = kv.dims3()?;
                if width != inner || kb != b || kw != 2 * inner {
                    candle_core::bail!(
                        "attention: q {:?} and kv {:?} for {heads} heads of {d}",
                        q_or_qkv.dims(),
                        kv.dims()
                    );
                }
                (lk, 2 * inner)
            }
        };
        if heads == 0
            || l == 0
            || lk == 0
            || d == 0
            || !fits(heads * l * lk)
            || !fits(b * l * width)
        {
            return Ok(None);
        }
        let dev = device(q_or_qkv)?;
        let stream = dev.cuda_stream();
        let padded = d.next_multiple_of(16);
        if super::flash_attention()
            && d.is_multiple_of(8)
            && FLASH_DIMS.contains(&padded)
            && heads <= 65_535
            && b <= 65_535
        {
            // SAFETY: the kernel writes every output element.
            let mut out = unsafe { dev.alloc::<f16>(b * l * inner)? };
            let launched = with_view(q_or_qkv, |qv| {
                let (q_ptr, _gq) = qv.device_ptr(&stream);
                let (o_ptr, _go) = out.device_ptr_mut(&stream);
                let flash = |k_ptr: u64, v_ptr: u64| -> Result<bool> {
                    // 16-byte loads of q, k and v rows: every row start and head must be aligned.
                    if [q_ptr, k_ptr, v_ptr, o_ptr].iter().any(|p| p % 16 != 0) {
                        return Ok(false);
                    }
                    let cfg = LaunchConfig {
                        grid_dim: (l.div_ceil(128) as u32, heads as u32, b as u32),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    launch!(&dev, &format!("flash_attention_{padded}"), cfg;
                        &q_ptr, &k_ptr, &v_ptr, &o_ptr, &(l as u32), &(lk as u32), &(d as u32),
                        &(heads as u32), &(width as u32), &(ld_kv as u32));
                    Ok(true)
                };
                match kv {
                    None => flash(q_ptr + 2 * inner as u64, q_ptr + 4 * inner as u64),
                    Some(kv) => with_view(kv, |kvv| {
                        let (kv_ptr, _gk) = kvv.device_ptr(&stream);
                        flash(kv_ptr, kv_ptr + 2 * inner as u64)
                    }),
                }
            })?;
            if launched {
                return Ok(Some(wrap(out, &dev, (b, l, inner))));
            }
        }
        // Queries per block: the block's scores (all heads) take at most SCORES_BYTES, about
        // half of an H100's or H200's 50 MB L2, so the softmax and the second product read them
        // from the cache.
        const SCORES_BYTES: usize = 24 << 20;
        let block = (SCORES_BYTES / (2 * heads * lk))
            .clamp(64, l.max(64))
            .min(l);
        // SAFETY: the first product writes every score it covers, the second every output.
        let mut scores = unsafe { dev.alloc::<f16>(heads * block * lk)? };
        let mut out = unsafe { dev.alloc::<f16>(b * l * inner)? };
        let threads = lk.next_multiple_of(32).clamp(32, 256) as u32;
        let run =
            |q_ptr: u64, k_ptr: u64, v_ptr: u64, scores: &mut CudaSlice<f16>, out_ptr: u64| {
                for item in 0..b {
                    let k = k_ptr + 2 * (item * lk * ld_kv) as u64;
                    let v = v_ptr + 2 * (item * lk * ld_kv) as u64;
                    for first in (0..l).step_by(block) {
                        let rows = block.min(l - first);
                        let q = q_ptr + 2 * ((item * l + first) * width) as u64;
                        let o = out_ptr + 2 * ((item * l + first) * inner) as u64;
                        {
                            let (s_ptr, _g) = scores.device_ptr_mut(&stream);
                            // SAFETY: Sᵀ (lk × rows) = K·Qᵀ per head, K and Q read in place (row
                            // strides ld_kv and width, heads d apart); S is (heads, rows, lk).
                            unsafe {
                                gemm(
                                    &dev,
                                    (true, false),
                                    (lk, rows, d),
                                    (k, ld_kv, d),
                                    (q, width, d),
                                    0.0,
                                    (s_ptr, lk, rows * lk, false),
                                    heads,
                                )?;
                            }
                        }
                        let softmax = LaunchConfig {
                            grid_dim: ((heads * rows) as u32, 1, 1),
                            block_dim: (threads, 1, 1),
                            shared_mem_bytes: 0,
                        };
                        launch!(&dev, "softmax_rows", softmax; &mut *scores, &(lk as u32));
                        let (s_ptr, _g) = scores.device_ptr(&stream);
                        // SAFETY: Oᵀ (d × rows) = Vᵀ·Pᵀ per head, written at the head's columns of
                        // the merged (l, inner) rows.
                        unsafe {
                            gemm(
                                &dev,
                                (false, false),
                                (d, rows, lk),
                                (v, ld_kv, d),
                                (s_ptr, lk, rows * lk),
                                0.0,
                                (o, inner, d, false),
                                heads,
                            )?;
                        }
                    }
                }
                Ok::<(), candle_core::Error>(())
            };
        with_view(q_or_qkv, |qv| {
            let (q_ptr, _gq) = qv.device_ptr(&stream);
            let (o_ptr, _go) = out.device_ptr_mut(&stream);
            match kv {
                None => run(
                    q_ptr,
                    q_ptr + 2 * inner as u64,
                    q_ptr + 4 * inner as u64,
                    &mut scores,
                    o_ptr,
                ),
                Some(kv) => with_view(kv, |kvv| {
                    let (kv_ptr, _gk) = kvv.device_ptr(&stream);
                    run(q_ptr, kv_ptr, kv_ptr + 2 * inner as u64, &mut scores, o_ptr)
                }),
            }
        })?;
        drop(scores);
        Ok(Some(wrap(out, &dev, (b, l, inner))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// On the CPU (and in f32) every kernel declines, so the UNet runs candle's operations; the
    /// GPU side is checked by `ragar bench sd` against candle-transformers' models on the device.
    #[test]
    fn every_kernel_declines_where_it_does_not_apply() {
        let cpu = Device::Cpu;
        for dtype in [DType::F16, DType::F32] {
            let x = Tensor::zeros((2, 8, 4, 4), dtype, &cpu).unwrap();
            let w3 = Tensor::zeros((8, 8, 3, 3), dtype, &cpu).unwrap();
            let w1 = Tensor::zeros((8, 8, 1, 1), dtype, &cpu).unwrap();
            let per_channel = Tensor::zeros(8, dtype, &cpu).unwrap();
            let tokens = Tensor::zeros((2, 16, 8), dtype, &cpu).unwrap();
            let qkv = Tensor::zeros((2, 16, 24), dtype, &cpu).unwrap();
            assert!(!applies(&x));
            assert!(conv3x3_taps(&w3).unwrap().is_none());
            assert!(conv1x1_taps(&w1).unwrap().is_none());
            assert!(conv(&x, &w3, Epilogue::unit()).unwrap().is_none());
            let gn = group_norm(&x, &per_channel, &per_channel, 4, 1e-5, true);
            assert!(gn.unwrap().is_none());
            assert!(to_tokens(&x).unwrap().is_none());
            assert!(from_tokens(&tokens, Some(&per_channel), &x)
                .unwrap()
                .is_none());
            assert!(add_bias(&tokens, &per_channel, None).unwrap().is_none());
            assert!(geglu(&tokens, &per_channel).unwrap().is_none());
            assert!(attention(&qkv, None, 2, 4).unwrap().is_none());
        }
    }
}
