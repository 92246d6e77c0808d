//! The learned ranker: how well a candidate image fits a user's preference, and how faithful it
//! is to the reference.
//!
//! Personalization is a low-rank bilinear score `s(p, c) = (A p) · (A c)` between the preference
//! vector `p` and the candidate's item embedding `c` (both from the item encoder), trained with a
//! pairwise logistic loss on interaction logs (`ragar train ranker`): an item the user engaged with
//! must outscore the same emoji drawn by another vendor. Fidelity is the cosine of the content
//! blocks of candidate and reference (what is drawn, whatever the style). The total is
//! `w · σ(s) + (1 − w) · fidelity`. [`RankerNet::personalization`] is a candle expression, so a
//! generator can be fine-tuned against it.

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Module, Tensor};
use candle_nn::{linear_no_bias, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use super::emoji::{bundle_version, load_bundle, BundleConfig, CONTENT_DIM};
use super::{Candidate, GenerationRequest, ItemEncoder, ModelError, Ranker, Scores};
use crate::preference::cosine;

pub const BUNDLE_FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankerConfig {
    pub format: u32,
    /// Item embedding length (the encoder's).
    pub dim: usize,
    /// Rank of the bilinear form.
    pub rank: usize,
    /// Where the content block ends (fidelity is measured on `[..content_dim]`).
    pub content_dim: usize,
    /// Share of personalization in the total.
    pub personalization_weight: f32,
    #[serde(default)]
    pub provenance: String,
}

impl BundleConfig for RankerConfig {
    const FORMAT: u32 = BUNDLE_FORMAT;
    fn format(&self) -> u32 {
        self.format
    }
}

impl RankerConfig {
    pub fn new(dim: usize) -> Self {
        RankerConfig {
            format: BUNDLE_FORMAT,
            dim,
            rank: 64,
            content_dim: CONTENT_DIM.min(dim),
            personalization_weight: 0.5,
            provenance: String::new(),
        }
    }
}

pub struct RankerNet {
    pub config: RankerConfig,
    proj: Linear,
}

impl RankerNet {
    pub fn new(config: RankerConfig, vb: VarBuilder) -> candle_core::Result<RankerNet> {
        let proj = linear_no_bias(config.dim, config.rank, vb.pp("proj"))?;
        Ok(RankerNet { config, proj })
    }

    /// `s(p, c)` row by row: `[b, dim]`, `[b, dim]` → `[b]`.
    pub fn personalization(&self, p: &Tensor, c: &Tensor) -> candle_core::Result<Tensor> {
        (self.proj.forward(p)? * self.proj.forward(c)?)?.sum(1)
    }
}

/// The serving side: a loaded bundle and the encoder that embeds candidates.
pub struct LearnedRanker {
    net: RankerNet,
    encoder: Arc<dyn ItemEncoder>,
    device: Device,
    version: String,
}

impl LearnedRanker {
    pub fn load(dir: &Path, encoder: Arc<dyn ItemEncoder>) -> Result<LearnedRanker, ModelError> {
        let device = Device::Cpu;
        let (config, vb) = load_bundle::<RankerConfig>(dir, &device)?;
        if config.dim != encoder.dim() {
            return Err(ModelError::Bundle(format!(
                "{}: trained on {}-value embeddings, the encoder gives {}",
                dir.display(),
                config.dim,
                encoder.dim()
            )));
        }
        let net = RankerNet::new(config, vb)
            .map_err(|e| ModelError::Bundle(format!("{}: {e}", dir.display())))?;
        let version = bundle_version("ranker", dir);
        Ok(LearnedRanker {
            net,
            encoder,
            device,
            version,
        })
    }

    pub fn config(&self) -> &RankerConfig {
        &self.net.config
    }

    /// Totals (w·σ(s) + (1−w)·fidelity) of candidate embeddings for one preference and reference.
    pub fn totals(
        &self,
        preference: &[f32],
        reference: &[f32],
        candidates: &[Vec<f32>],
    ) -> Result<Vec<f32>, ModelError> {
        let cfg = &self.net.config;
        let w = cfg.personalization_weight;
        let s = self.personalization(preference, candidates)?;
        Ok(s.into_iter()
            .zip(candidates)
            .map(|(s, c)| {
                w * sigmoid(s)
                    + (1.0 - w) * cosine(&c[..cfg.content_dim], &reference[..cfg.content_dim])
            })
            .collect())
    }

    /// Personalization scores of candidate embeddings against one preference.
    pub fn personalization(
        &self,
        preference: &[f32],
        candidates: &[Vec<f32>],
    ) -> Result<Vec<f32>, ModelError> {
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let d = self.net.config.dim;
        let n = candidates.len();
        let p = Tensor::from_slice(preference, (1, d), &self.device)?.repeat((n, 1))?;
        let c = Tensor::from_vec(candidates.concat(), (n, d), &self.device)?;
        Ok(self.net.personalization(&p, &c)?.to_vec1::<f32>()?)
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl Ranker for LearnedRanker {
    fn version(&self) -> &str {
        &self.version
    }

    fn score(
        &self,
        request: &GenerationRequest,
        candidates: &[Candidate],
    ) -> Result<Vec<Scores>, ModelError> {
        let cfg = &self.net.config;
        let embeddings = candidates
            .iter()
            .map(|c| match &c.embedding {
                Some(e) if e.len() == cfg.dim => Ok(e.clone()),
                _ => self.encoder.encode(Some(&c.image), None),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let reference =
            &request.reference_embedding[..cfg.content_dim.min(request.reference_embedding.len())];
        let fidelity: Vec<f32> = embeddings
            .iter()
            .map(|e| cosine(&e[..cfg.content_dim], reference))
            .collect();
        let personalization = match &request.preference {
            Some(p) => self
                .personalization(p, &embeddings)?
                .into_iter()
                .map(sigmoid)
                .collect(),
            None => vec![0.5; embeddings.len()],
        };
        let w = cfg.personalization_weight;
        Ok(personalization
            .into_iter()
            .zip(fidelity)
            .map(|(p, f)| Scores {
                personalization: p,
                fidelity: f,
                total: w * p + (1.0 - w) * f,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use candle_nn::VarMap;

    /// Embeds an image as its mean colour, padded to `dim`.
    struct MeanColour(usize);

    impl ItemEncoder for MeanColour {
        fn version(&self) -> &str {
            "mean-colour"
        }
        fn dim(&self) -> usize {
            self.0
        }
        fn encode(
            &self,
            image: Option<&super::super::Image>,
            _: Option<&str>,
        ) -> Result<Vec<f32>, ModelError> {
            let img = image.unwrap();
            let mut v = vec![0.0; self.0];
            for (i, px) in img.rgb.iter().enumerate() {
                v[i % 3] += *px as f32;
            }
            v[3] = 1.0;
            Ok(v)
        }
    }

    #[test]
    fn scores_have_the_bundles_shape_and_wrong_dims_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = RankerConfig::new(8);
        cfg.rank = 3;
        cfg.content_dim = 4;
        let vm = VarMap::new();
        RankerNet::new(
            cfg.clone(),
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )
        .unwrap();
        vm.save(dir.path().join("model.safetensors")).unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            serde_json::to_vec(&cfg).unwrap(),
        )
        .unwrap();
        let ranker = LearnedRanker::load(dir.path(), Arc::new(MeanColour(8))).unwrap();
        let img = |c: u8| super::super::Image {
            width: 1,
            height: 1,
            rgb: vec![c, 0, 0],
        };
        let request = GenerationRequest {
            reference: Arc::new(img(9)),
            reference_embedding: vec![9.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0].into(),
            preference: Some(vec![0.5; 8].into()),
            preference_agreement: None,
            seeds: vec![1, 2],
            reference_text: None,
            prompt_hints: Vec::new(),
        };
        let cands = vec![
            Candidate {
                image: img(9),
                embedding: None,
            },
            Candidate {
                image: img(200),
                embedding: None,
            },
        ];
        let s = ranker.score(&request, &cands).unwrap();
        assert_eq!(s.len(), 2);
        for x in &s {
            assert!((0.0..=1.0).contains(&x.personalization));
            assert!((x.total - (0.5 * x.personalization + 0.5 * x.fidelity)).abs() < 1e-6);
        }
        assert_eq!(ranker.score(&request, &cands).unwrap(), s, "deterministic");
        let err = LearnedRanker::load(dir.path(), Arc::new(MeanColour(6)))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("8-value") && err.contains("gives 6"), "{err}");
    }
}
