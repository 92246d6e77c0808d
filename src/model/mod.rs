//! The model seams: [`ItemEncoder`], [`Generator`] and [`Ranker`], in the project's own types.
//!
//! The worker only talks to models through these traits; they are synchronous and CPU/GPU bound,
//! so the worker calls them off the async reactor (`spawn_blocking`) and passes a cancellation
//! token that long samplers check between steps. Two baselines ship beside the traits:
//! [`Passthrough`] (publish the reference: the no-personalization row of the evaluation) and
//! [`CosineRanker`] (score by embedding cosines: the feature-consistency baseline). [`TextEncoder`]
//! embeds items by their text with all-MiniLM-L6-v2 ([`minilm`]). Generators: the EmojiStyle
//! diffusion model the project trains ([`diffusion`]) and Stable Diffusion with weights in the
//! diffusers layout ([`sd`], on ragar's UNet [`unet`] and VAE [`autoencoder`], whose hot
//! operations run in ragar's CUDA [`kernels`] on the GPU, and candle-transformers' CLIP), which reads the preference as a prompt built from the texts of the weighted history.
//! Deterministic test implementations live in [`testutil`] behind the `test-util` feature.

use std::io::Cursor;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::preference::cosine;

pub mod autoencoder;
pub mod diffusion;
pub mod emoji;
pub mod kernels;
pub mod minilm;
pub mod opbench;
pub mod ranker;
pub mod sd;
pub mod unet;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("image: {0}")]
    Image(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("cancelled")]
    Cancelled,
    /// A model directory or bundle that cannot be used: a missing file, a missing tensor, wrong dims.
    #[error("model bundle: {0}")]
    Bundle(String),
    #[error("model: {0}")]
    Other(String),
}

impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        ModelError::Other(e.to_string())
    }
}

/// An RGB image, 8 bits per channel, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

impl Image {
    /// Decodes a PNG; transparency is composited onto white (emoji are drawn on a clear background).
    pub fn from_png(bytes: &[u8]) -> Result<Image, ModelError> {
        let img = image::load_from_memory_with_format(bytes, image::ImageFormat::Png)
            .map_err(|e| ModelError::Image(e.to_string()))?;
        let (width, height) = (img.width(), img.height());
        let rgb = if img.color().has_alpha() {
            img.to_rgba8()
                .pixels()
                .flat_map(|p| {
                    let a = u32::from(p[3]);
                    let over = |c: u8| ((u32::from(c) * a + 255 * (255 - a) + 127) / 255) as u8;
                    [over(p[0]), over(p[1]), over(p[2])]
                })
                .collect()
        } else {
            img.to_rgb8().into_raw()
        };
        Ok(Image { width, height, rgb })
    }

    pub fn to_png(&self) -> Result<Vec<u8>, ModelError> {
        let buf = image::RgbImage::from_raw(self.width, self.height, self.rgb.clone())
            .ok_or_else(|| ModelError::Image("pixel buffer does not match its size".into()))?;
        let mut out = Vec::new();
        buf.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .map_err(|e| ModelError::Image(e.to_string()))?;
        Ok(out)
    }
}

/// Embeds an item from its image and/or text; L2-normalized output of length [`ItemEncoder::dim`].
pub trait ItemEncoder: Send + Sync {
    fn version(&self) -> &str;
    fn dim(&self) -> usize;
    fn encode(&self, image: Option<&Image>, text: Option<&str>) -> Result<Vec<f32>, ModelError>;
}

/// Items embedded by what their text says, through all-MiniLM-L6-v2 ([`minilm`]).
pub struct TextEncoder {
    model: minilm::MiniLm,
}

impl TextEncoder {
    pub fn load(dir: &std::path::Path) -> Result<TextEncoder, ModelError> {
        Ok(TextEncoder {
            model: minilm::MiniLm::load(dir, &candle_core::Device::Cpu)?,
        })
    }
}

impl ItemEncoder for TextEncoder {
    fn version(&self) -> &str {
        "all-MiniLM-L6-v2"
    }

    fn dim(&self) -> usize {
        self.model.dim()
    }

    fn encode(&self, _image: Option<&Image>, text: Option<&str>) -> Result<Vec<f32>, ModelError> {
        let text = text.ok_or_else(|| {
            ModelError::Unsupported("the text encoder needs the item's `text`".into())
        })?;
        Ok(self.model.embed(&[text])?.remove(0))
    }
}

/// One display's generation input.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub reference: Arc<Image>,
    pub reference_embedding: Arc<[f32]>,
    /// The user's preference; `None` when the user has no usable history.
    pub preference: Option<Arc<[f32]>>,
    /// How far the history items behind `preference` agree, in [0, 1]
    /// ([`crate::preference::preference`]); `None` where it is not known (taken as settled).
    pub preference_agreement: Option<f32>,
    /// One seed per candidate.
    pub seeds: Vec<u64>,
    /// The reference item's text, when known (prompt-conditioned generators name it).
    pub reference_text: Option<Arc<str>>,
    /// The texts of the history items behind the preference, with their weights: how a
    /// prompt-conditioned generator ([`sd`]) hears the preference. Empty where the texts are not
    /// known.
    pub prompt_hints: Vec<(String, f32)>,
}

/// One generated image, with its embedding when the generator knows it.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub image: Image,
    pub embedding: Option<Vec<f32>>,
}

/// Splits images rendered one per (request, seed), in order, into each request's candidates.
pub fn per_request(batch: &[GenerationRequest], images: Vec<Image>) -> Vec<Vec<Candidate>> {
    let mut images = images.into_iter();
    batch
        .iter()
        .map(|req| {
            req.seeds
                .iter()
                .map(|_| Candidate {
                    image: images.next().expect("one image per seed"),
                    embedding: None,
                })
                .collect()
        })
        .collect()
}

/// Renders a reference to a user's preference. Same request and seeds give the same images.
pub trait Generator: Send + Sync {
    fn version(&self) -> &str;
    /// Whether requests should carry [`GenerationRequest::reference_text`] and
    /// [`GenerationRequest::prompt_hints`]: a prompt-conditioned generator hears the preference
    /// through them. Resolving them costs an item lookup per history item used, so generators
    /// that condition on vectors alone leave this off.
    fn wants_texts(&self) -> bool {
        false
    }
    /// One result per request, each with one candidate per seed.
    fn generate(
        &self,
        batch: &[GenerationRequest],
        cancel: &CancellationToken,
    ) -> Result<Vec<Vec<Candidate>>, ModelError>;
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    pub personalization: f32,
    pub fidelity: f32,
    pub total: f32,
}

/// Scores candidates for personalization (against the preference) and fidelity (to the reference).
pub trait Ranker: Send + Sync {
    fn version(&self) -> &str;
    fn score(
        &self,
        request: &GenerationRequest,
        candidates: &[Candidate],
    ) -> Result<Vec<Scores>, ModelError>;
}

/// Index of the best candidate by total score (the first one on ties).
pub fn best(scores: &[Scores]) -> Option<usize> {
    scores
        .iter()
        .enumerate()
        .max_by(|(ia, a), (ib, b)| a.total.total_cmp(&b.total).then(ib.cmp(ia)))
        .map(|(i, _)| i)
}

/// The no-personalization baseline: every candidate is the reference itself.
pub struct Passthrough;

impl Generator for Passthrough {
    fn version(&self) -> &str {
        "passthrough"
    }

    fn generate(
        &self,
        batch: &[GenerationRequest],
        cancel: &CancellationToken,
    ) -> Result<Vec<Vec<Candidate>>, ModelError> {
        if cancel.is_cancelled() {
            return Err(ModelError::Cancelled);
        }
        Ok(batch
            .iter()
            .map(|r| {
                r.seeds
                    .iter()
                    .map(|_| Candidate {
                        image: (*r.reference).clone(),
                        embedding: Some(r.reference_embedding.to_vec()),
                    })
                    .collect()
            })
            .collect())
    }
}

/// Scores by cosine in embedding space: personalization = cos(candidate, preference), fidelity =
/// cos(candidate, reference); total = w·personalization + (1−w)·fidelity. Candidates without an
/// embedding are embedded with the encoder when one is configured.
pub struct CosineRanker {
    pub personalization_weight: f32,
    pub encoder: Option<Arc<dyn ItemEncoder>>,
}

impl Ranker for CosineRanker {
    fn version(&self) -> &str {
        "cosine"
    }

    fn score(
        &self,
        request: &GenerationRequest,
        candidates: &[Candidate],
    ) -> Result<Vec<Scores>, ModelError> {
        let w = self.personalization_weight;
        candidates
            .iter()
            .map(|c| {
                let owned;
                let emb: &[f32] = match (&c.embedding, &self.encoder) {
                    (Some(e), _) => e,
                    (None, Some(enc)) => {
                        owned = enc.encode(Some(&c.image), None)?;
                        &owned
                    }
                    (None, None) => {
                        return Err(ModelError::Unsupported(
                            "the cosine ranker needs candidate embeddings or an item encoder"
                                .into(),
                        ))
                    }
                };
                let fidelity = cosine(emb, &request.reference_embedding);
                let personalization = match &request.preference {
                    Some(p) => cosine(emb, p),
                    None => fidelity,
                };
                Ok(Scores {
                    personalization,
                    fidelity,
                    total: w * personalization + (1.0 - w) * fidelity,
                })
            })
            .collect()
    }
}

/// Deterministic, fast stand-ins for tests and local trials; never a shipped default.
#[cfg(any(test, feature = "test-util"))]
pub mod testutil {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// Candidates are the reference tinted by the seed; each candidate's embedding moves from the
    /// reference toward the preference by a seed-dependent amount, so rankers have a real choice.
    pub struct TintGenerator;

    impl Generator for TintGenerator {
        fn version(&self) -> &str {
            "test-tint"
        }

        fn generate(
            &self,
            batch: &[GenerationRequest],
            cancel: &CancellationToken,
        ) -> Result<Vec<Vec<Candidate>>, ModelError> {
            batch
                .iter()
                .map(|r| {
                    r.seeds
                        .iter()
                        .map(|&seed| {
                            if cancel.is_cancelled() {
                                return Err(ModelError::Cancelled);
                            }
                            let mut rng = ChaCha8Rng::seed_from_u64(seed);
                            let tint: [u8; 3] = rng.random();
                            let mut image = (*r.reference).clone();
                            for px in image.rgb.chunks_exact_mut(3) {
                                for (c, t) in px.iter_mut().zip(tint) {
                                    *c = ((*c as u16 + t as u16) / 2) as u8;
                                }
                            }
                            let alpha: f32 = rng.random_range(0.0..1.0);
                            let target = r.preference.as_deref().unwrap_or(&r.reference_embedding);
                            let mut emb: Vec<f32> = r
                                .reference_embedding
                                .iter()
                                .zip(target.iter())
                                .map(|(a, b)| (1.0 - alpha) * a + alpha * b)
                                .collect();
                            let n = emb
                                .iter()
                                .map(|x| x * x)
                                .sum::<f32>()
                                .sqrt()
                                .max(f32::MIN_POSITIVE);
                            emb.iter_mut().for_each(|x| *x /= n);
                            Ok(Candidate {
                                image,
                                embedding: Some(emb),
                            })
                        })
                        .collect()
                })
                .collect()
        }
    }

    /// [`TintGenerator`] that takes `per_request` of wall time for each request: a generator that
    /// cannot keep up, for backlog and backpressure measurements.
    pub struct SlowGenerator {
        pub per_request: std::time::Duration,
    }

    impl Generator for SlowGenerator {
        fn version(&self) -> &str {
            "test-slow"
        }

        fn generate(
            &self,
            batch: &[GenerationRequest],
            cancel: &CancellationToken,
        ) -> Result<Vec<Vec<Candidate>>, ModelError> {
            for _ in batch {
                if cancel.is_cancelled() {
                    return Err(ModelError::Cancelled);
                }
                std::thread::sleep(self.per_request);
            }
            TintGenerator.generate(batch, cancel)
        }
    }

    /// Embeds an image by its mean colour and a text by its bytes, folded into `dim` values.
    pub struct HashEncoder {
        pub dim: usize,
    }

    impl ItemEncoder for HashEncoder {
        fn version(&self) -> &str {
            "test-hash"
        }

        fn dim(&self) -> usize {
            self.dim
        }

        fn encode(
            &self,
            image: Option<&Image>,
            text: Option<&str>,
        ) -> Result<Vec<f32>, ModelError> {
            let mut v = vec![0.0f32; self.dim];
            if let Some(img) = image {
                let n = (img.rgb.len() / 3).max(1) as f32;
                for (i, px) in img.rgb.chunks_exact(3).enumerate() {
                    v[i % self.dim] += px.iter().map(|&c| c as f32).sum::<f32>() / (765.0 * n);
                }
            }
            if let Some(t) = text {
                for (i, b) in t.bytes().enumerate() {
                    v[(i * 31 + b as usize) % self.dim] += 1.0;
                }
            }
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            if n > 0.0 {
                v.iter_mut().for_each(|x| *x /= n);
            }
            Ok(v)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    #[test]
    fn transparency_becomes_white() {
        let img = image::RgbaImage::from_raw(2, 1, vec![0, 0, 0, 0, 10, 20, 30, 255]).unwrap();
        let mut png = Vec::new();
        img.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let decoded = Image::from_png(&png).unwrap();
        assert_eq!(decoded.rgb, vec![255, 255, 255, 10, 20, 30]);
    }

    fn request(pref: Option<Vec<f32>>, seeds: Vec<u64>) -> GenerationRequest {
        GenerationRequest {
            reference: Arc::new(Image {
                width: 2,
                height: 1,
                rgb: vec![10, 20, 30, 40, 50, 60],
            }),
            reference_embedding: vec![1.0, 0.0].into(),
            preference: pref.map(Into::into),
            preference_agreement: None,
            seeds,
            reference_text: None,
            prompt_hints: Vec::new(),
        }
    }

    #[test]
    fn png_round_trip() {
        let img = Image {
            width: 2,
            height: 1,
            rgb: vec![1, 2, 3, 4, 5, 6],
        };
        assert_eq!(Image::from_png(&img.to_png().unwrap()).unwrap(), img);
        assert!(Image::from_png(b"nope").is_err());
        assert!(Image {
            width: 3,
            height: 3,
            rgb: vec![0; 3]
        }
        .to_png()
        .is_err());
    }

    #[test]
    fn passthrough_returns_the_reference_per_seed() {
        let r = request(Some(vec![0.0, 1.0]), vec![1, 2, 3]);
        let out = Passthrough
            .generate(std::slice::from_ref(&r), &CancellationToken::new())
            .unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), 3);
        assert!(out[0].iter().all(|c| c.image == *r.reference));
        let cancelled = CancellationToken::new();
        cancelled.cancel();
        assert!(matches!(
            Passthrough.generate(&[r], &cancelled),
            Err(ModelError::Cancelled)
        ));
    }

    #[test]
    fn cosine_ranker_prefers_the_personalized_candidate() {
        let r = request(Some(vec![0.0, 1.0]), vec![0, 1]);
        let cands = vec![
            Candidate {
                image: (*r.reference).clone(),
                embedding: Some(vec![1.0, 0.0]),
            },
            Candidate {
                image: (*r.reference).clone(),
                embedding: Some(vec![0.6, 0.8]),
            },
        ];
        let ranker = CosineRanker {
            personalization_weight: 0.7,
            encoder: None,
        };
        let s = ranker.score(&r, &cands).unwrap();
        assert!((s[0].fidelity - 1.0).abs() < 1e-6 && s[0].personalization.abs() < 1e-6);
        assert_eq!(best(&s), Some(1));
        let no_emb = vec![Candidate {
            image: (*r.reference).clone(),
            embedding: None,
        }];
        assert!(ranker.score(&r, &no_emb).is_err());
        let with_enc = CosineRanker {
            personalization_weight: 0.5,
            encoder: Some(Arc::new(HashEncoder { dim: 2 })),
        };
        assert_eq!(with_enc.score(&r, &no_emb).unwrap().len(), 1);
    }

    #[test]
    fn tint_generator_is_deterministic_and_seed_dependent() {
        let r = request(Some(vec![0.0, 1.0]), vec![7, 8]);
        let c = CancellationToken::new();
        let a = TintGenerator
            .generate(std::slice::from_ref(&r), &c)
            .unwrap();
        let b = TintGenerator
            .generate(std::slice::from_ref(&r), &c)
            .unwrap();
        assert_eq!(a[0][0].image, b[0][0].image);
        assert_eq!(a[0][0].embedding, b[0][0].embedding);
        assert_ne!(a[0][0].image, a[0][1].image);
    }

    #[test]
    fn best_breaks_ties_by_first() {
        let s = |t| Scores {
            personalization: 0.0,
            fidelity: 0.0,
            total: t,
        };
        assert_eq!(best(&[s(0.5), s(0.9), s(0.9)]), Some(1));
        assert_eq!(best(&[]), None);
    }
}
