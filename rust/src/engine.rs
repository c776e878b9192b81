//! The Rust-side session: one model, one sequence's cache, the logits after its last token and
//! the ids it has seen. Token ids only; text lives in Python.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};

use crate::cache::KvCache;
use crate::config::ModelConfig;
use crate::device::{parse_device, parse_dtype};
use crate::error::{Error, Result};
use crate::model::qwen3::Qwen3;
use crate::sample::Sampler;
use crate::weights::{RandomWeights, Weights};

/// Long prompts are run in chunks of this many tokens so the `[t, n]` attention logits and the
/// `[t, vocab]` scoring logits stay bounded; results are identical to one pass.
pub const PREFILL_CHUNK: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWant {
    None,
    Last,
    All,
}

pub struct Engine {
    pub model: Qwen3,
    pub cache: KvCache,
    /// f32 logits after the last cached token (None for an empty cache).
    last_logits: Option<Vec<f32>>,
    history: Vec<u32>,
}

impl Engine {
    /// Loads a checkpoint directory. `dtype` None: f32 on CPU, the checkpoint's dtype elsewhere.
    pub fn load(path: &Path, device: &str, dtype: Option<&str>) -> Result<Self> {
        // Parse the cheap arguments first so a typo is reported before any file is read.
        let requested = dtype.map(parse_dtype).transpose()?;
        if !path.exists() {
            return Err(Error::NotFound {
                what: "model path",
                path: path.into(),
            });
        }
        if !path.is_dir() {
            return Err(Error::invalid(format!(
                "{} is a file; expected a checkpoint directory with config.json and *.safetensors",
                path.display()
            )));
        }
        let cfg = ModelConfig::from_file(&path.join("config.json"))?;
        let device = parse_device(device)?;
        let mut weights = Weights::open(path, &device, DType::F32)?;
        let dtype = match requested {
            Some(d) => d,
            None if device.is_cpu() => DType::F32,
            None => weights.stored_dtype().unwrap_or(DType::BF16),
        };
        weights.set_dtype(dtype);
        let model = crate::threads::install(|| Qwen3::load(&cfg, &weights, dtype, &device))?;
        Self::from_model(model)
    }

    /// A random-weight model of the shape in `config_path` (speed benchmarks of real shapes).
    pub fn random(
        config_path: &Path,
        device: &str,
        dtype: Option<&str>,
        seed: u64,
    ) -> Result<Self> {
        let requested = dtype.map(parse_dtype).transpose()?;
        let cfg = ModelConfig::from_file(config_path)?;
        let device = parse_device(device)?;
        // candle's CPU generator cannot be seeded; values do not matter for speed.
        if !device.is_cpu() {
            device.set_seed(seed)?;
        }
        let stored = match cfg.torch_dtype.as_deref() {
            Some("bfloat16") => DType::BF16,
            Some("float16") => DType::F16,
            _ => DType::F32,
        };
        let dtype = requested.unwrap_or(if device.is_cpu() { DType::F32 } else { stored });
        let source = RandomWeights {
            device: device.clone(),
            dtype,
            stored,
        };
        let model = Qwen3::load(&cfg, &source, dtype, &device)?;
        Self::from_model(model)
    }

    pub fn from_model(model: Qwen3) -> Result<Self> {
        let cache = model.new_cache()?;
        Ok(Self {
            model,
            cache,
            last_logits: None,
            history: Vec::new(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.model.cfg
    }

    pub fn device(&self) -> &Device {
        self.model.device()
    }

    pub fn history(&self) -> &[u32] {
        &self.history
    }

    pub fn last_logits(&self) -> Option<&[f32]> {
        self.last_logits.as_deref()
    }

    pub fn reset(&mut self) -> Result<()> {
        self.cache.reset()?;
        self.last_logits = None;
        self.history.clear();
        Ok(())
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Err(Error::invalid("empty prompt: no token ids given"));
        }
        let vocab = self.model.cfg.vocab_size;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(Error::invalid(format!(
                "token id {bad} is out of range for a vocabulary of {vocab}"
            )));
        }
        let max = self.model.cfg.max_position_embeddings;
        if self.cache.next_position() + ids.len() > max {
            return Err(Error::invalid(format!(
                "context too long: {} cached + {} new tokens exceed max_position_embeddings {max}",
                self.cache.next_position(),
                ids.len()
            )));
        }
        Ok(())
    }

    /// Appends `ids`. Returns f32 logits `[rows, vocab]` flattened, rows = 1 (Last) or len (All).
    pub fn prefill(&mut self, ids: &[u32], want: LogitsWant) -> Result<Option<Vec<f32>>> {
        crate::threads::install(|| self.prefill_inner(ids, want))
    }

    fn prefill_inner(&mut self, ids: &[u32], want: LogitsWant) -> Result<Option<Vec<f32>>> {
        self.check_ids(ids)?;
        let mut all = Vec::new();
        for chunk in ids.chunks(PREFILL_CHUNK) {
            let hidden = self.model.forward(chunk, &mut self.cache)?;
            self.history.extend_from_slice(chunk);
            if want == LogitsWant::All {
                all.extend(
                    self.model
                        .logits(&hidden)?
                        .flatten_all()?
                        .to_vec1::<f32>()?,
                );
            }
            let last = hidden.narrow(0, chunk.len() - 1, 1)?;
            self.last_logits = Some(self.model.logits(&last)?.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(match want {
            LogitsWant::None => None,
            LogitsWant::Last => self.last_logits.clone(),
            LogitsWant::All => Some(all),
        })
    }

    /// Negative log-likelihood of each of `ids` given everything before it; appends `ids`.
    pub fn score(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        crate::threads::install(|| self.score_inner(ids))
    }

    fn score_inner(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        self.check_ids(ids)?;
        let first = self.last_logits.as_ref().ok_or_else(|| {
            Error::invalid(
                "cannot score the first token: the cache is empty (prefill a prefix first)",
            )
        })?;
        let mut nll = vec![nll_of(first, ids[0])];
        let mut offset = 0;
        for chunk in ids.chunks(PREFILL_CHUNK) {
            let hidden = self.model.forward(chunk, &mut self.cache)?;
            self.history.extend_from_slice(chunk);
            let logp = candle_nn::ops::log_softmax(&self.model.logits(&hidden)?, D::Minus1)?;
            // Row i predicts ids[offset + i + 1].
            let targets: Vec<u32> =
                ids[offset + 1..(offset + chunk.len() + 1).min(ids.len())].to_vec();
            if !targets.is_empty() {
                let rows = logp.narrow(0, 0, targets.len())?;
                let idx = Tensor::new(targets.as_slice(), rows.device())?.unsqueeze(1)?;
                let picked = rows.gather(&idx, 1)?.flatten_all()?.to_vec1::<f32>()?;
                nll.extend(picked.into_iter().map(|x| -x));
            }
            let last = hidden.narrow(0, chunk.len() - 1, 1)?;
            self.last_logits = Some(self.model.logits(&last)?.flatten_all()?.to_vec1::<f32>()?);
            offset += chunk.len();
        }
        Ok(nll)
    }

    /// Samples the next token from the kept logits, appends it, and returns it.
    pub fn step(&mut self, sampler: &mut Sampler) -> Result<u32> {
        crate::threads::install(|| self.step_inner(sampler))
    }

    fn step_inner(&mut self, sampler: &mut Sampler) -> Result<u32> {
        let logits = self.last_logits.as_ref().ok_or_else(|| {
            Error::invalid("nothing to continue from: the cache is empty; prefill a prompt first")
        })?;
        let id = sampler.sample(logits, &self.history);
        self.prefill_inner(&[id], LogitsWant::None)?;
        Ok(id)
    }
}

fn nll_of(logits: &[f32], id: u32) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max
        + logits
            .iter()
            .map(|&x| ((x - max) as f64).exp())
            .sum::<f64>()
            .ln() as f32;
    lse - logits[id as usize]
}
