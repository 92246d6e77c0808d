//! The EmojiStyle item encoder: what an item depicts (content) and how it is drawn (style), in
//! one L2-normalized vector.
//!
//! A small CNN reads the image at the bundle's resolution. Two heads come off it: *content*
//! (384 values, trained to land on the all-MiniLM-L6-v2 embedding of the emoji's name, so text and
//! image share one space) and *style* (trained to tell the vendors apart). An item's embedding is
//! `normalize([cw · content, sw · style])`: content comes from the item's text through MiniLM when
//! it has text (else from the image), style from the image (zeros without one). Retrieval by
//! cosine is then mostly by content (what the user looked at that resembles the reference),
//! and the style block carries the vendor preference that the weighted history averages.
//!
//! A bundle is a directory with `config.json` ([`EmojiEncoderConfig`]) and `model.safetensors`.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{conv2d, linear, Conv2d, Conv2dConfig, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use super::diffusion::conv3x3;
use super::minilm::{l2_normalize, MiniLm};
use super::{Image, ItemEncoder, ModelError};

/// Layout version of the bundle.
pub const BUNDLE_FORMAT: u32 = 1;
/// Length of the text (MiniLM) embedding, and of the content head.
pub const CONTENT_DIM: usize = 384;

/// `config.json` of a bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmojiEncoderConfig {
    pub format: u32,
    /// Square input size; images are resized to it.
    pub resolution: u32,
    /// Output channels of the four convolutions.
    pub channels: [usize; 4],
    pub style_dim: usize,
    /// Vendors the style head was trained to separate, in class order.
    pub vendors: Vec<String>,
    /// Weights of the content and style blocks in the item embedding.
    pub content_weight: f32,
    pub style_weight: f32,
    /// How the bundle was made (command and seed), for the record.
    #[serde(default)]
    pub provenance: String,
}

impl EmojiEncoderConfig {
    pub fn new(vendors: Vec<String>, resolution: u32) -> Self {
        EmojiEncoderConfig {
            format: BUNDLE_FORMAT,
            resolution,
            channels: [32, 64, 96, 128],
            style_dim: 32,
            vendors,
            content_weight: 0.9,
            style_weight: (1.0f32 - 0.81).sqrt(),
            provenance: String::new(),
        }
    }

    /// Length of an item embedding.
    pub fn dim(&self) -> usize {
        CONTENT_DIM + self.style_dim
    }
}

/// The network: four 3×3 convolutions (the last three with stride 2), then the heads.
pub struct EmojiNet {
    pub config: EmojiEncoderConfig,
    convs: [Conv2d; 4],
    content: Linear,
    style: Linear,
    /// Vendor logits from the style block (trains the style head).
    vendor: Linear,
}

/// Image features of a batch.
pub struct Features {
    /// `[b, 384]`, not normalized.
    pub content: Tensor,
    /// `[b, style_dim]`, not normalized.
    pub style: Tensor,
    /// `[b, vendors]`.
    pub vendor_logits: Tensor,
}

impl EmojiNet {
    /// Builds the network on `vb` (a fresh VarMap for training, or a bundle's tensors).
    pub fn new(config: EmojiEncoderConfig, vb: VarBuilder) -> candle_core::Result<EmojiNet> {
        let c = config.channels;
        let conv = |i: usize, cin: usize, cout: usize, stride: usize| {
            let cfg = Conv2dConfig {
                padding: 1,
                stride,
                ..Default::default()
            };
            conv2d(cin, cout, 3, cfg, vb.pp(format!("conv{i}")))
        };
        let convs = [
            conv(0, 3, c[0], 1)?,
            conv(1, c[0], c[1], 2)?,
            conv(2, c[1], c[2], 2)?,
            conv(3, c[2], c[3], 2)?,
        ];
        let side = (config.resolution as usize).div_ceil(8);
        let content = linear(c[3] * side * side, CONTENT_DIM, vb.pp("content"))?;
        let style = linear(c[3], config.style_dim, vb.pp("style"))?;
        let vendor = linear(config.style_dim, config.vendors.len(), vb.pp("vendor"))?;
        Ok(EmojiNet {
            config,
            convs,
            content,
            style,
            vendor,
        })
    }

    /// `x`: `[b, 3, res, res]` in [-1, 1].
    ///
    /// Each convolution is [`conv3x3`] (stride 1, then 2, 2, 2). The bundles were trained with
    /// candle 0.9's CPU convolution, which reads an input whose channel count equals its height
    /// and width (`[b, n, n, n]`; here the second layer's input at 32×32) as channels-last: such
    /// a layer sees its input permuted, `x[b, h, w, c]` at channel `c`, row `h`, column `w`. The
    /// trained weights mean that function, so it is kept here as an explicit permutation, with
    /// the same values as before and gradients that match them (candle's backward pass
    /// differentiates the unpermuted convolution).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Features> {
        let mut h = x.clone();
        for conv in &self.convs {
            let (_, c, height, width) = h.dims4()?;
            if c == height && c == width {
                h = h.permute((0, 3, 1, 2))?;
            }
            h = conv3x3(conv, &h, conv.config().stride)?.relu()?;
        }
        let content = self.content.forward(&h.flatten_from(1)?)?;
        let pooled = h.mean((2, 3))?;
        let style = self.style.forward(&pooled)?;
        let vendor_logits = self.vendor.forward(&style)?;
        Ok(Features {
            content,
            style,
            vendor_logits,
        })
    }

    /// The image-only item embedding of a batch, as a candle expression (so a generator can be
    /// trained through it): `normalize([cw · normalize(content), sw · normalize(style)])`, and the
    /// normalized content block. Same values as [`EmojiEncoder::encode_batch`] without text.
    pub fn image_embedding(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let f = self.forward(x)?;
        let content = l2_normalize(&f.content)?;
        let style = l2_normalize(&f.style)?;
        let joined = Tensor::cat(
            &[
                (&content * self.config.content_weight as f64)?,
                (style * self.config.style_weight as f64)?,
            ],
            1,
        )?;
        Ok((l2_normalize(&joined)?, content))
    }

    /// Images as a `[b, 3, res, res]` tensor in [-1, 1] (transparent pixels on white).
    pub fn batch(&self, images: &[&Image], device: &Device) -> Result<Tensor, ModelError> {
        images_to_tensor(images, self.config.resolution, device)
    }
}

/// Resizes each image to `res`×`res` and stacks them, channels first, scaled to [-1, 1].
pub fn images_to_tensor(
    images: &[&Image],
    res: u32,
    device: &Device,
) -> Result<Tensor, ModelError> {
    let n = (res * res) as usize;
    let mut data = Vec::with_capacity(images.len() * 3 * n);
    for img in images {
        let buf = image::RgbImage::from_raw(img.width, img.height, img.rgb.clone())
            .ok_or_else(|| ModelError::Image("pixel buffer does not match its size".into()))?;
        let buf = if img.width == res && img.height == res {
            buf
        } else {
            image::imageops::resize(&buf, res, res, image::imageops::FilterType::Triangle)
        };
        let raw = buf.into_raw();
        for ch in 0..3 {
            data.extend(
                raw.iter()
                    .skip(ch)
                    .step_by(3)
                    .map(|&v| v as f32 / 127.5 - 1.0),
            );
        }
    }
    Ok(Tensor::from_vec(
        data,
        (images.len(), 3, res as usize, res as usize),
        device,
    )?)
}

/// A loaded bundle, with MiniLM for the text side when it is available.
pub struct EmojiEncoder {
    net: EmojiNet,
    text: Option<MiniLm>,
    device: Device,
    version: String,
}

impl EmojiEncoder {
    /// Loads a bundle directory; `minilm` (optional) embeds item texts.
    pub fn load(dir: &Path, minilm: Option<MiniLm>) -> Result<EmojiEncoder, ModelError> {
        Self::load_on(dir, minilm, Device::Cpu)
    }

    /// [`EmojiEncoder::load`] onto `device` (a trainer on a GPU keeps everything there).
    pub fn load_on(
        dir: &Path,
        minilm: Option<MiniLm>,
        device: Device,
    ) -> Result<EmojiEncoder, ModelError> {
        let (config, vb) = load_bundle::<EmojiEncoderConfig>(dir, &device)?;
        let net = EmojiNet::new(config, vb)
            .map_err(|e| ModelError::Bundle(format!("{}: {e}", dir.display())))?;
        let version = bundle_version("emoji-encoder", dir);
        Ok(EmojiEncoder {
            net,
            text: minilm,
            device,
            version,
        })
    }

    pub fn config(&self) -> &EmojiEncoderConfig {
        &self.net.config
    }

    /// The network itself (for training other models through it).
    pub fn net(&self) -> &EmojiNet {
        &self.net
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// L2-normalized style blocks of images (how each is drawn), in batches of 256.
    pub fn styles(&self, images: &[&Image]) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(256) {
            let f = self.net.forward(&self.net.batch(chunk, &self.device)?)?;
            out.extend(l2_normalize(&f.style)?.to_vec2::<f32>()?);
        }
        Ok(out)
    }

    /// As a judge: each image's most likely vendor (index into `config().vendors`) and its
    /// L2-normalized content vector (compare with MiniLM name embeddings to recognize the emoji).
    pub fn judge(&self, images: &[&Image]) -> Result<(Vec<usize>, Vec<Vec<f32>>), ModelError> {
        if images.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let f = self.net.forward(&self.net.batch(images, &self.device)?)?;
        let vendors = argmax_rows(&f.vendor_logits)?
            .into_iter()
            .map(|v| v as usize)
            .collect();
        Ok((vendors, l2_normalize(&f.content)?.to_vec2::<f32>()?))
    }

    /// MiniLM embeddings of texts (the name side of identity recognition).
    pub fn embed_texts(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ModelError> {
        match &self.text {
            Some(m) => m.embed(texts),
            None => Err(ModelError::Unsupported(
                "this encoder was loaded without MiniLM".into(),
            )),
        }
    }

    /// Item embeddings for a batch of (image, text) pairs.
    pub fn encode_batch(
        &self,
        items: &[(Option<&Image>, Option<&str>)],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let cfg = &self.net.config;
        let images: Vec<&Image> = items.iter().filter_map(|(i, _)| *i).collect();
        let features = if images.is_empty() {
            None
        } else {
            let x = self.net.batch(&images, &self.device)?;
            let f = self.net.forward(&x)?;
            Some((
                l2_normalize(&f.content)?.to_vec2::<f32>()?,
                l2_normalize(&f.style)?.to_vec2::<f32>()?,
            ))
        };
        let texts: Vec<&str> = items.iter().filter_map(|(_, t)| *t).collect();
        let text_emb = match (&self.text, texts.is_empty()) {
            (Some(m), false) => m.embed(&texts)?,
            _ => Vec::new(),
        };
        let (mut next_image, mut next_text) = (0, 0);
        let mut out = Vec::with_capacity(items.len());
        for (image, text) in items {
            let from_image = image.map(|_| {
                next_image += 1;
                next_image - 1
            });
            let content: Vec<f32> = match (text, &self.text) {
                (Some(_), Some(_)) => {
                    next_text += 1;
                    text_emb[next_text - 1].clone()
                }
                _ => match (from_image, &features) {
                    (Some(i), Some((c, _))) => c[i].clone(),
                    _ => {
                        return Err(ModelError::Unsupported(
                            "the item has neither an image nor a text this encoder can read".into(),
                        ))
                    }
                },
            };
            let style: Vec<f32> = match (from_image, &features) {
                (Some(i), Some((_, s))) => s[i].clone(),
                _ => vec![0.0; cfg.style_dim],
            };
            out.push(combine(
                &content,
                &style,
                cfg.content_weight,
                cfg.style_weight,
            ));
        }
        Ok(out)
    }
}

/// `normalize([cw · content, sw · style])` (each block taken as given; zero blocks stay zero).
pub fn combine(content: &[f32], style: &[f32], cw: f32, sw: f32) -> Vec<f32> {
    let mut v: Vec<f32> = content
        .iter()
        .map(|x| x * cw)
        .chain(style.iter().map(|x| x * sw))
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

impl ItemEncoder for EmojiEncoder {
    fn version(&self) -> &str {
        &self.version
    }

    fn dim(&self) -> usize {
        self.net.config.dim()
    }

    fn encode(&self, image: Option<&Image>, text: Option<&str>) -> Result<Vec<f32>, ModelError> {
        Ok(self.encode_batch(&[(image, text)])?.remove(0))
    }
}

/// A bundle's `config.json`, which records the layout version it was written in.
pub trait BundleConfig: serde::de::DeserializeOwned {
    /// The layout version this build reads.
    const FORMAT: u32;
    fn format(&self) -> u32;
}

impl BundleConfig for EmojiEncoderConfig {
    const FORMAT: u32 = BUNDLE_FORMAT;
    fn format(&self) -> u32 {
        self.format
    }
}

/// Reads `config.json` (refusing another layout version) and memory-maps `model.safetensors`;
/// errors name the file.
pub fn load_bundle<C: BundleConfig>(
    dir: &Path,
    device: &Device,
) -> Result<(C, VarBuilder<'static>), ModelError> {
    let config_path = dir.join("config.json");
    let bytes = std::fs::read(&config_path)
        .map_err(|e| ModelError::Bundle(format!("{}: {e}", config_path.display())))?;
    let config: C = serde_json::from_slice(&bytes)
        .map_err(|e| ModelError::Bundle(format!("{}: {e}", config_path.display())))?;
    if config.format() != C::FORMAT {
        return Err(ModelError::Bundle(format!(
            "{}: format {} (this build reads {})",
            dir.display(),
            config.format(),
            C::FORMAT
        )));
    }
    let weights = dir.join("model.safetensors");
    if !weights.is_file() {
        return Err(ModelError::Bundle(format!(
            "{} is missing",
            weights.display()
        )));
    }
    // SAFETY: the file is mapped read-only and not modified while the model lives.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }
        .map_err(|e| ModelError::Bundle(format!("{}: {e}", weights.display())))?;
    Ok((config, vb))
}

/// A loaded bundle's version string: its kind and directory name (`ranker:ranker`).
pub fn bundle_version(kind: &str, dir: &Path) -> String {
    format!(
        "{kind}:{}",
        dir.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    )
}

/// Index of the largest value in each row.
pub fn argmax_rows(t: &Tensor) -> candle_core::Result<Vec<u32>> {
    t.argmax(D::Minus1)?.to_vec1::<u32>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    fn tiny() -> EmojiEncoderConfig {
        EmojiEncoderConfig {
            channels: [4, 4, 8, 8],
            style_dim: 4,
            ..EmojiEncoderConfig::new(vec!["a".into(), "b".into()], 16)
        }
    }

    fn image(seed: u8) -> Image {
        Image {
            width: 20,
            height: 20,
            rgb: (0..20 * 20 * 3)
                .map(|i| (i as u8).wrapping_mul(seed))
                .collect(),
        }
    }

    fn save_tiny(dir: &Path) {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        EmojiNet::new(tiny(), vb).unwrap();
        vm.save(dir.join("model.safetensors")).unwrap();
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_vec(&tiny()).unwrap(),
        )
        .unwrap();
    }

    /// The gradient with respect to the image matches finite differences of the forward pass,
    /// also through a layer whose input has as many channels as pixels a side (the second one
    /// here, `[b, 4, 4, 4]`), which the forward pass reads permuted.
    #[test]
    fn input_gradients_match_the_forward_pass() {
        let vm = VarMap::new();
        let cfg = EmojiEncoderConfig {
            channels: [4, 4, 8, 8],
            style_dim: 4,
            ..EmojiEncoderConfig::new(vec!["a".into(), "b".into()], 8)
        };
        let net =
            EmojiNet::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        crate::train::seeded_init(&vm, 4).unwrap();
        let noise = |seed: u64| {
            let v = crate::model::diffusion::seeded_noise(seed, 2 * 3 * 64);
            Tensor::from_vec(v, (2, 3, 8, 8), &Device::Cpu).unwrap()
        };
        let probe = Tensor::from_vec(
            crate::model::diffusion::seeded_noise(5, 2 * CONTENT_DIM),
            (2, CONTENT_DIM),
            &Device::Cpu,
        )
        .unwrap();
        let f = |x: &Tensor| {
            (net.forward(x).unwrap().content * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let (x, d) = (noise(1), noise(2));
        let var = candle_core::Var::from_tensor(&x).unwrap();
        let grad = f(var.as_tensor()).backward().unwrap();
        let analytic = (grad.get(var.as_tensor()).unwrap() * &d)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let eps = 1e-3;
        let at = |sign: f64| f(&(&x + (&d * (sign * eps)).unwrap()).unwrap());
        let numeric = ((at(1.0) - at(-1.0)).unwrap() / (2.0 * eps))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            (analytic - numeric).abs() <= 1e-2 * numeric.abs().max(1.0),
            "gradient {analytic}, finite differences {numeric}"
        );
    }

    #[test]
    fn shapes_norms_and_determinism() {
        let dir = tempfile::tempdir().unwrap();
        save_tiny(dir.path());
        let enc = EmojiEncoder::load(dir.path(), None).unwrap();
        assert_eq!(enc.dim(), CONTENT_DIM + 4);
        let (a, b) = (image(3), image(7));
        let out = enc
            .encode_batch(&[(Some(&a), None), (Some(&b), Some("ignored without MiniLM"))])
            .unwrap();
        assert_eq!(out.len(), 2);
        for v in &out {
            assert_eq!(v.len(), CONTENT_DIM + 4);
            let n: f32 = v.iter().map(|x| x * x).sum();
            assert!((n - 1.0).abs() < 1e-4, "norm {n}");
        }
        // One at a time gives the same as in a batch; loading again gives the same.
        let close = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| (p - q).abs() < 1e-5);
        assert!(close(&enc.encode(Some(&b), None).unwrap(), &out[1]));
        let again = EmojiEncoder::load(dir.path(), None).unwrap();
        assert_eq!(
            again.encode(Some(&a), None).unwrap(),
            enc.encode(Some(&a), None).unwrap()
        );
        assert!(close(&again.encode(Some(&a), None).unwrap(), &out[0]));
        assert!(matches!(
            enc.encode(None, None),
            Err(ModelError::Unsupported(_))
        ));
    }

    #[test]
    fn a_bundle_with_a_missing_tensor_or_wrong_dims_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        save_tiny(dir.path());
        // Wrong dims: the config promises more channels than the weights have.
        let mut wrong = tiny();
        wrong.channels = [4, 4, 8, 16];
        std::fs::write(
            dir.path().join("config.json"),
            serde_json::to_vec(&wrong).unwrap(),
        )
        .unwrap();
        let err = EmojiEncoder::load(dir.path(), None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("model.safetensors") || err.contains(dir.path().to_str().unwrap()),
            "{err}"
        );
        assert!(err.contains("shape") || err.contains("conv3"), "{err}");
        // A missing tensor.
        let tensors =
            candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu)
                .unwrap();
        let kept: std::collections::HashMap<String, Tensor> = tensors
            .into_iter()
            .filter(|(k, _)| !k.starts_with("style"))
            .collect();
        candle_core::safetensors::save(&kept, dir.path().join("model.safetensors")).unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            serde_json::to_vec(&tiny()).unwrap(),
        )
        .unwrap();
        let err = EmojiEncoder::load(dir.path(), None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("style"), "{err}");
        std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
        let err = EmojiEncoder::load(dir.path(), None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("missing"), "{err}");
    }

    #[test]
    fn combine_weights_the_blocks() {
        let v = combine(&[1.0, 0.0], &[0.0, 1.0], 0.9, (1.0f32 - 0.81).sqrt());
        assert!((v[0] - 0.9).abs() < 1e-6 && (v[3] - 0.4359).abs() < 1e-3);
        assert_eq!(combine(&[0.0], &[0.0], 1.0, 1.0), vec![0.0, 0.0]);
    }
}
