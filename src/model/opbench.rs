//! `ragar bench ops`: candle's time for each kind of operation that SD1.5's UNet and VAE are made
//! of, at their shapes. [`super::sd::bench`] times the whole model; this says which kind of
//! operation the time goes to. `deploy/gpu/ops_anchor.py` times the same operations, by
//! the same names, in PyTorch on the same card, and `deploy/gpu/bench-ops.sh` prints the ratios.
//!
//! Each operation runs `reps` times after two warm-up runs, with the device synchronized before
//! and after; the figure is the mean time per run, with the rate it achieves (TFLOP/s of the
//! matrix work, or GB/s of the bytes read and written at least once). Inputs are random on the
//! device, f16 on CUDA, f32 on the CPU. `small` divides every spatial side and channel count by 8
//! (the CPU check of the code path).

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use super::kernels::{self, Epilogue};
use super::sd::{dtype_for, RandomWeights};
use super::unet::{Attention, GroupNorm, IdentityAffine};
use super::ModelError;

#[derive(Debug, Clone)]
pub struct OpsOptions {
    pub cpu: bool,
    pub small: bool,
    /// Images per request: the UNet's operations see twice as many (classifier-free guidance).
    pub batch: usize,
    pub reps: usize,
    /// ragar's CUDA kernels ([`super::kernels`]) in its group norm, attention and convolutions.
    pub fused_kernels: bool,
    /// Attention in one fused pass where the kernels apply ([`kernels::set_flash_attention`]).
    pub flash_attention: bool,
}

impl Default for OpsOptions {
    fn default() -> Self {
        OpsOptions {
            cpu: false,
            small: false,
            batch: 1,
            reps: 20,
            fused_kernels: true,
            flash_attention: true,
        }
    }
}

/// What one run of an operation does, for its rate.
enum Work {
    /// Floating-point operations of the matrix work.
    Flops(f64),
    /// Bytes read and written at least once.
    Bytes(f64),
}

type Run = Box<dyn Fn() -> candle_core::Result<Tensor>>;

struct Op {
    name: String,
    work: Work,
    run: Run,
}

/// Times the operations; returns `{"device", "dtype", "batch", "small", "ops": [{"name", "ms",
/// "tflops" | "gbps"}], "attention": [...]}` (the last from [`attention_paths`]).
pub fn bench_ops(options: &OpsOptions) -> Result<serde_json::Value, ModelError> {
    if options.batch == 0 || options.reps == 0 {
        return Err(ModelError::Unsupported(
            "batch and repetitions must be at least 1".into(),
        ));
    }
    let device = if options.cpu {
        Device::Cpu
    } else {
        super::sd::default_device()?
    };
    let dtype = dtype_for(&device);
    super::kernels::set_fused(options.fused_kernels);
    let attention = attention_paths(options, &device, dtype)?;
    super::kernels::set_flash_attention(options.flash_attention);
    let ops = operations(options, &device, dtype)?;
    let mut rows = Vec::with_capacity(ops.len());
    for op in ops {
        for _ in 0..2 {
            drop((op.run)()?);
        }
        device.synchronize()?;
        let started = Instant::now();
        for _ in 0..options.reps {
            drop((op.run)()?);
        }
        device.synchronize()?;
        let seconds = started.elapsed().as_secs_f64() / options.reps as f64;
        let mut row = serde_json::Map::new();
        row.insert("name".into(), op.name.into());
        row.insert("ms".into(), (seconds * 1e3).into());
        match op.work {
            Work::Flops(f) => row.insert("tflops".into(), (f / seconds / 1e12).into()),
            Work::Bytes(b) => row.insert("gbps".into(), (b / seconds / 1e9).into()),
        };
        rows.push(serde_json::Value::Object(row));
    }
    Ok(serde_json::json!({
        "device": if device.is_cuda() { "cuda:0" } else { "cpu" },
        "dtype": format!("{dtype:?}").to_lowercase(),
        "batch": options.batch,
        "small": options.small,
        "fused_kernels": options.fused_kernels,
        "flash_attention": options.flash_attention,
        "ops": rows,
        "attention": attention,
    }))
}

/// Where ragar's attention kernels apply (CUDA, f16): both attention paths at SD1.5's shapes
/// (self attention at each level, cross attention against 77 tokens, and a length that is not a
/// multiple of the kernels' tiles), on the same seeded inputs. Per shape: the mean ms of each,
/// and `max |flash − blocked| / max |blocked|`, the check that the fused pass computes the same
/// attention. Empty elsewhere.
fn attention_paths(
    options: &OpsOptions,
    device: &Device,
    dtype: DType,
) -> Result<Vec<serde_json::Value>, ModelError> {
    let b = 2 * options.batch;
    let mut rows = Vec::new();
    // (name, queries, context tokens for cross attention, heads, head dim)
    let shapes = [
        ("self.4096tok.d40", 4096, None, 8, 40),
        ("cross.4096tok.77ctx.d40", 4096, Some(77), 8, 40),
        ("self.1024tok.d80", 1024, None, 8, 80),
        ("cross.1024tok.77ctx.d80", 1024, Some(77), 8, 80),
        ("self.256tok.d160", 256, None, 8, 160),
        ("self.64tok.d160", 64, None, 8, 160),
        ("self.100tok.d40", 100, None, 8, 40),
    ];
    for (i, (name, l, ctx, heads, d)) in shapes.into_iter().enumerate() {
        let inner = heads * d;
        // Seeded on the CPU, so both paths (and every run) see the same values; q, k and v of
        // unit variance over √d, so the softmax is neither flat nor one-hot.
        let seeded = |salt: u64, dims: &[usize]| -> candle_core::Result<Tensor> {
            let n: usize = dims.iter().product();
            let scale = (d as f32).powf(-0.25);
            let values = super::diffusion::seeded_noise(100 * i as u64 + salt, n);
            Tensor::from_vec(values, dims, &Device::Cpu)?
                .affine(f64::from(scale), 0.0)?
                .to_device(device)?
                .to_dtype(dtype)
        };
        let (q, kv) = match ctx {
            None => (seeded(1, &[b, l, 3 * inner])?, None),
            Some(lk) => (
                seeded(1, &[b, l, inner])?,
                Some(seeded(2, &[b, lk, 2 * inner])?),
            ),
        };
        let mut outputs = Vec::new();
        let mut row = serde_json::Map::new();
        row.insert("name".into(), name.into());
        for (path, flash) in [("flash", true), ("blocked", false)] {
            kernels::set_flash_attention(flash);
            let run = || kernels::attention(&q, kv.as_ref(), heads, d);
            let Some(out) = run()? else {
                return Ok(Vec::new());
            };
            device.synchronize()?;
            let started = Instant::now();
            for _ in 0..options.reps {
                drop(run()?);
            }
            device.synchronize()?;
            let ms = started.elapsed().as_secs_f64() * 1e3 / options.reps as f64;
            row.insert(format!("{path}_ms"), ms.into());
            outputs.push(out.to_dtype(DType::F32)?);
        }
        let scale = outputs[1].abs()?.max_all()?.to_scalar::<f32>()?;
        let diff = (&outputs[0] - &outputs[1])?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        row.insert("rel_diff".into(), f64::from(diff / scale).into());
        rows.push(serde_json::Value::Object(row));
    }
    Ok(rows)
}

fn operations(options: &OpsOptions, device: &Device, dtype: DType) -> Result<Vec<Op>, ModelError> {
    let d = if options.small { 8 } else { 1 };
    let elem = dtype.size_in_bytes() as f64;
    let unet_b = 2 * options.batch;
    let vae_b = options.batch;
    let random = |dims: &[usize]| -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, 1.0, dims, device)?.to_dtype(dtype)
    };
    let vb = || {
        VarBuilder::from_backend(
            Box::new(RandomWeights {
                seed: None,
                record: None,
            }),
            dtype,
            device.clone(),
        )
    };
    let mut ops: Vec<Op> = Vec::new();

    // 3×3 convolutions (padding 1) of the UNet's levels and of the VAE decoder's, and the matrix
    // product of the same size (what im2col turns each into).
    let convs = [
        ("unet", unet_b, 320, 64),
        ("unet", unet_b, 640, 32),
        ("unet", unet_b, 1280, 16),
        ("vae", vae_b, 512, 64),
        ("vae", vae_b, 512, 128),
        ("vae", vae_b, 256, 256),
        ("vae", vae_b, 128, 512),
    ];
    for (part, b, c, side) in convs {
        let (c, side) = (c / d, side / d);
        let flops = 2.0 * (b * side * side * c * c * 9) as f64;
        let x = random(&[b, c, side, side])?;
        let w = random(&[c, c, 3, 3])?;
        // ragar's: nine shifted products (where the kernels apply; candle's convolution elsewhere).
        let taps = kernels::conv3x3_taps(&w)?;
        let (xr, wr) = (x.clone(), w.clone());
        ops.push(Op {
            name: format!("{part}.conv3x3.ragar.{c}ch.{side}px"),
            work: Work::Flops(flops),
            run: Box::new(move || match &taps {
                Some(taps) => match kernels::conv(&xr, taps, Epilogue::unit())? {
                    Some(out) => Ok(out),
                    None => xr.conv2d(&wr, 1, 1, 1, 1),
                },
                None => xr.conv2d(&wr, 1, 1, 1, 1),
            }),
        });
        ops.push(Op {
            name: format!("{part}.conv3x3.{c}ch.{side}px"),
            work: Work::Flops(flops),
            run: Box::new(move || x.conv2d(&w, 1, 1, 1, 1)),
        });
        let a = random(&[b * side * side, 9 * c])?;
        let w = random(&[c, 9 * c])?;
        ops.push(Op {
            name: format!("{part}.gemm_of_conv3x3.{c}ch.{side}px"),
            work: Work::Flops(flops),
            run: Box::new(move || a.matmul(&w.t()?)),
        });
    }

    // The copy that turns the matrix product's (b, h, w, c) rows into NCHW.
    {
        let (b, c, side) = (unet_b, 320 / d, 64 / d);
        let x = random(&[b, side, side, c])?;
        ops.push(Op {
            name: format!("unet.nhwc_to_nchw.{c}ch.{side}px"),
            work: Work::Bytes(2.0 * x.elem_count() as f64 * elem),
            run: Box::new(move || x.permute((0, 3, 1, 2))?.contiguous()),
        });
    }

    // Group norms: ragar's (fused layer norm per group + affine) and candle-nn's.
    let identity = Arc::new(IdentityAffine::default());
    for (part, b, c, side) in [("unet", unet_b, 320, 64), ("vae", vae_b, 128, 512)] {
        let (c, side) = (c / d, side / d);
        let groups = 32 / d.min(4);
        let x = random(&[b, c, side, side])?;
        let bytes = 2.0 * x.elem_count() as f64 * elem;
        let ours = GroupNorm::new(groups, c, 1e-5, vb(), &identity)?;
        let xo = x.clone();
        ops.push(Op {
            name: format!("{part}.group_norm.ragar.{c}ch.{side}px"),
            work: Work::Bytes(bytes),
            run: Box::new(move || ours.forward(&xo)),
        });
        let theirs = candle_nn::group_norm(groups, c, 1e-5, vb())?;
        ops.push(Op {
            name: format!("{part}.group_norm.candle_nn.{c}ch.{side}px"),
            work: Work::Bytes(bytes),
            run: Box::new(move || theirs.forward(&x)),
        });
    }

    // Self attention at the 64×64 level (4096 tokens, 320 channels, 8 heads), with its
    // projections; the rate counts the two score products only.
    {
        let (b, c, side) = (unet_b, 320 / d, 64 / d);
        let tokens = side * side;
        let heads = 8;
        let attn = Attention::new(vb(), c, None, heads, c / heads)?;
        let x = random(&[b, tokens, c])?;
        ops.push(Op {
            name: format!("unet.self_attention.ragar.{tokens}tok.{c}ch"),
            work: Work::Flops(4.0 * (b * tokens * tokens * c) as f64),
            run: Box::new(move || attn.forward(&x, None)),
        });
    }

    // Elementwise and layout operations at the 64×64 level.
    {
        let (b, c, side) = (unet_b, 320 / d, 64 / d);
        let x = random(&[b, c, side, side])?;
        let bytes = 2.0 * x.elem_count() as f64 * elem;
        let xs = x.clone();
        ops.push(Op {
            name: format!("unet.silu.{c}ch.{side}px"),
            work: Work::Bytes(bytes),
            run: Box::new(move || candle_nn::ops::silu(&xs)),
        });
        let t = random(&[b, c, 1, 1])?;
        let xa = x.clone();
        ops.push(Op {
            name: format!("unet.broadcast_add.{c}ch.{side}px"),
            work: Work::Bytes(bytes),
            run: Box::new(move || xa.broadcast_add(&t)),
        });
        let skip = random(&[b, c, side, side])?;
        ops.push(Op {
            name: format!("unet.cat_channels.{}ch.{side}px", 2 * c),
            work: Work::Bytes(2.0 * bytes),
            run: Box::new(move || Tensor::cat(&[&x, &skip], 1)),
        });
        let (c2, s2) = (1280 / d, 16 / d);
        let low = random(&[b, c2, s2, s2])?;
        ops.push(Op {
            name: format!("unet.upsample_nearest2x.{c2}ch.{s2}px"),
            work: Work::Bytes(5.0 * low.elem_count() as f64 * elem),
            run: Box::new(move || low.upsample_nearest2d(2 * s2, 2 * s2)),
        });
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_runs_and_is_timed_on_small_shapes() {
        let out = bench_ops(&OpsOptions {
            cpu: true,
            small: true,
            batch: 1,
            reps: 1,
            ..OpsOptions::default()
        })
        .unwrap();
        let ops = out["ops"].as_array().unwrap();
        assert_eq!(ops.len(), 7 * 3 + 1 + 2 * 2 + 1 + 4, "{out}");
        for op in ops {
            let ms = op["ms"].as_f64().unwrap();
            assert!(ms > 0.0 && ms.is_finite(), "{op}");
            let rate = op
                .get("tflops")
                .or_else(|| op.get("gbps"))
                .and_then(|v| v.as_f64())
                .unwrap();
            assert!(rate > 0.0 && rate.is_finite(), "{op}");
        }
        assert_eq!(out["dtype"], "f32");
        // The attention kernels do not apply on the CPU.
        assert_eq!(out["attention"], serde_json::json!([]));
        assert!(bench_ops(&OpsOptions {
            batch: 0,
            ..OpsOptions::default()
        })
        .is_err());
    }
}
