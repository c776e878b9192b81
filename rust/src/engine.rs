//! The Rust-side session: one model, one sequence's cache, the logits after its last token and
//! the ids it has seen. Token ids only; text lives in Python.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};

use crate::cache::{KvCache, LayerCache};
use crate::compact::pipeline::{
    apply_layer, fit_inputs_from_pass, global_counts, score_layer, scored_from_pass,
    shared_selection, uniform_counts, HeadBudgets, HeadOutcome, LayerQueries, Method, Options,
    PassLayer, QuerySource, Scored,
};
use crate::compact::score_pass::ScoringPass;
use crate::compact::split_attention::{merge_context, suffix_partials};
use crate::config::ModelConfig;
use crate::decode_graph::DecodeGraphs;
use crate::device::{parse_device, parse_dtype, parse_weight_format};
use crate::error::{Error, Result};
use crate::gguf::GgufWeights;
use crate::model::qwen3::{AttentionFn, Qwen3};
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

/// The index of the largest logit, computed where `logits` live.
fn device_argmax(logits: &Tensor) -> Result<u32> {
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        if let Some(i) = crate::fused::argmax(logits)? {
            return Ok(i);
        }
    }
    Ok(logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?)
}

/// The logits in `slot` on the host, copied there first if a decode step left them on the
/// device (a free function on the field, so callers may borrow the engine's other fields).
fn host_logits(slot: &mut Option<LastLogits>) -> Result<Option<&[f32]>> {
    if let Some(LastLogits::Device(t)) = slot {
        *slot = Some(LastLogits::Host(t.flatten_all()?.to_vec1::<f32>()?));
    }
    Ok(match slot {
        Some(LastLogits::Host(v)) => Some(v),
        _ => None,
    })
}

/// The newest token's logits. A CUDA-graph step leaves them on the device, and they come to the
/// host only when something reads them: greedy decoding reads their argmax alone.
#[derive(Debug, Clone)]
enum LastLogits {
    Host(Vec<f32>),
    Device(Tensor),
}

pub struct Engine {
    pub model: Qwen3,
    pub cache: KvCache,
    /// f32 logits after the last cached token (None for an empty cache).
    last_logits: Option<LastLogits>,
    history: Vec<u32>,
    /// How many of the newest tokens are still exact in every head (not compacted): the ones
    /// whose queries can be recomputed by re-running them.
    exact_tail: usize,
    /// The CUDA-graph decode step (see `decode_graph`).
    pub graphs: DecodeGraphs,
}

/// What one compaction did (see [`Engine::compact`]).
#[derive(Debug, Clone)]
pub struct CompactReport {
    pub tokens_before: Vec<Vec<usize>>,
    pub tokens_after: Vec<Vec<usize>>,
    pub bytes_before: usize,
    pub bytes_after: usize,
    /// Running the model for reference queries (capture passes, on-policy pass).
    pub seconds_queries: f64,
    /// Scoring, selection, fits and rewriting the cache.
    pub seconds_fit: f64,
    /// Per `[layer][kv_head]`; fidelity is None where no reference queries were used or the
    /// head was left as is.
    pub heads: Vec<Vec<HeadOutcome>>,
    /// Reference-query tokens the run used (before per-head subsampling).
    pub query_tokens: usize,
}

impl Engine {
    /// Loads a checkpoint directory. `dtype` None: f32 on CPU, the checkpoint's dtype elsewhere.
    pub fn load(path: &Path, device: &str, dtype: Option<&str>) -> Result<Self> {
        // Parse the cheap arguments first so a typo is reported before any file is read.
        let quantize = dtype.and_then(parse_weight_format);
        let requested = match quantize {
            Some(_) => Some(DType::F32), // quantized matrices take f32 activations
            None => dtype.map(parse_dtype).transpose()?,
        };
        if !path.exists() {
            return Err(Error::NotFound {
                what: "model path",
                path: path.into(),
            });
        }
        if path.is_file()
            && path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            return Self::load_gguf(path, device, requested);
        }
        if !path.is_dir() {
            return Err(Error::invalid(format!(
                "{} is a file; expected a checkpoint directory with config.json and \
                 *.safetensors, or a .gguf file",
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
        weights.quantize = quantize;
        let model = crate::threads::install(|| Qwen3::load(&cfg, &weights, dtype, &device))?;
        Self::from_model(model)
    }

    /// Loads a GGUF file: matrices stay quantized, the rest is dequantized to `dtype` (f32 by
    /// default: candle's quantized kernels take f32 activations).
    fn load_gguf(path: &Path, device: &str, dtype: Option<DType>) -> Result<Self> {
        let device = parse_device(device)?;
        let mut weights = GgufWeights::open(path, &device)?;
        let cfg = weights.config()?;
        weights.dtype = dtype.unwrap_or(DType::F32);
        let dtype = weights.dtype;
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
            exact_tail: 0,
            graphs: DecodeGraphs::default(),
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

    /// The newest token's logits (copied to the host here if a decode step left them on the
    /// device).
    pub fn last_logits(&mut self) -> Result<Option<&[f32]>> {
        host_logits(&mut self.last_logits)
    }

    /// Whether there are logits to continue from (a prefilled, non-empty context).
    pub fn has_logits(&self) -> bool {
        self.last_logits.is_some()
    }

    pub fn reset(&mut self) -> Result<()> {
        self.graphs.clear();
        self.cache.reset()?;
        self.last_logits = None;
        self.history.clear();
        self.exact_tail = 0;
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
            self.exact_tail += chunk.len();
            if want == LogitsWant::All {
                all.extend(
                    self.model
                        .logits(&hidden)?
                        .flatten_all()?
                        .to_vec1::<f32>()?,
                );
            }
            let last = hidden.narrow(0, chunk.len() - 1, 1)?;
            let logits = self.model.logits(&last)?.flatten_all()?.to_vec1::<f32>()?;
            self.last_logits = Some(LastLogits::Host(logits));
        }
        Ok(match want {
            LogitsWant::None => None,
            LogitsWant::Last => self.last_logits()?.map(<[f32]>::to_vec),
            LogitsWant::All => Some(all),
        })
    }

    /// Negative log-likelihood of each of `ids` given everything before it; appends `ids`.
    pub fn score(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        crate::threads::install(|| self.score_inner(ids))
    }

    fn score_inner(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        self.check_ids(ids)?;
        let first = self.last_logits()?.ok_or_else(|| {
            Error::invalid(
                "cannot score the first token: the cache is empty (prefill a prefix first)",
            )
        })?;
        let mut nll = vec![nll_of(first, ids[0])];
        let mut offset = 0;
        for chunk in ids.chunks(PREFILL_CHUNK) {
            let hidden = self.model.forward(chunk, &mut self.cache)?;
            self.history.extend_from_slice(chunk);
            self.exact_tail += chunk.len();
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
            let logits = self.model.logits(&last)?.flatten_all()?.to_vec1::<f32>()?;
            self.last_logits = Some(LastLogits::Host(logits));
            offset += chunk.len();
        }
        Ok(nll)
    }

    /// Samples the next token from the kept logits, appends it, and returns it.
    pub fn step(&mut self, sampler: &mut Sampler) -> Result<u32> {
        crate::threads::install(|| self.step_inner(sampler))
    }

    fn step_inner(&mut self, sampler: &mut Sampler) -> Result<u32> {
        let id = match &self.last_logits {
            None => {
                return Err(Error::invalid(
                    "nothing to continue from: the cache is empty; prefill a prompt first",
                ))
            }
            // Greedy from logits still on the device: only the argmax travels (4 bytes, not the
            // vocabulary's logits, and no host scan of them).
            Some(LastLogits::Device(t)) if sampler.is_greedy() => device_argmax(t)?,
            Some(_) => {
                let logits = host_logits(&mut self.last_logits)?
                    .ok_or_else(|| Error::invalid("no logits to sample from"))?;
                sampler.sample(logits, &self.history)
            }
        };
        self.check_ids(&[id])?;
        match self.graphs.step(&self.model, &mut self.cache, id)? {
            Some(logits) => {
                self.history.push(id);
                self.exact_tail += 1;
                self.last_logits = Some(LastLogits::Device(logits));
            }
            None => {
                self.prefill_inner(&[id], LogitsWant::None)?;
            }
        }
        Ok(id)
    }
}

/// Scratch continuations: run something on top of the cache, then put the cache back.
impl Engine {
    /// Prefills `prompt`, samples up to `max_new` tokens (stopping after an end-of-sequence
    /// id) and returns them; the cache, history and last logits are then restored, so the
    /// continuation leaves no trace (self-study queries are made this way).
    pub fn generate_scratch(
        &mut self,
        prompt: &[u32],
        sampler: &mut Sampler,
        max_new: usize,
    ) -> Result<Vec<u32>> {
        let saved = (
            self.last_logits.clone(),
            self.history.len(),
            self.exact_tail,
        );
        let result = (|| {
            self.prefill(prompt, LogitsWant::None)?;
            let eos = self.model.cfg.eos_token_ids.clone();
            let mut out = Vec::new();
            while out.len() < max_new
                && self.cache.next_position() < self.model.cfg.max_position_embeddings
            {
                let id = self.step(sampler)?;
                out.push(id);
                if eos.contains(&id) {
                    break;
                }
            }
            Ok(out)
        })();
        let added = self.history.len() - saved.1;
        self.cache.truncate_last(added)?;
        self.history.truncate(saved.1);
        (self.last_logits, self.exact_tail) = (saved.0, saved.2);
        result
    }
}

/// Compaction: reference queries come from running the model; the pipeline does the rest.
impl Engine {
    /// Compacts the cache in place. `suffix`: the token ids of the repeat prompt (instruction +
    /// context), needed by `am` with repeat queries and by `kvzip`. On a bad argument the cache
    /// is left unchanged. Tokens appended later get bias 0 and continue the original positions.
    pub fn compact(&mut self, opts: &Options, suffix: Option<&[u32]>) -> Result<CompactReport> {
        crate::threads::install(|| self.compact_inner(opts, suffix))
    }

    fn validate(&self, opts: &Options, suffix: Option<&[u32]>) -> Result<Vec<usize>> {
        let n_layers = self.cache.n_layers();
        if self.cache.next_position() == 0 {
            return Err(Error::invalid(
                "cannot compact an empty cache: prefill a context first",
            ));
        }
        let layers: Vec<usize> = match &opts.layers {
            Some(ls) => {
                if ls.is_empty() || ls.iter().any(|&l| l >= n_layers) {
                    return Err(Error::invalid(format!(
                        "layers must be a non-empty list of indices below {n_layers}, got {ls:?}"
                    )));
                }
                ls.clone()
            }
            None => (0..n_layers).collect(),
        };
        crate::compact::check_budget(opts.budget, opts.sink, opts.recent)?;
        let tokens = self.cache.tokens_per_head();
        let heads: Vec<usize> = layers.iter().flat_map(|&l| tokens[l].clone()).collect();
        let mean = heads.iter().sum::<usize>() as f64 / heads.len() as f64;
        if opts.budget as f64 >= mean {
            return Err(Error::invalid(format!(
                "budget {} must be below the cache length ({mean:.0} tokens per head)",
                opts.budget
            )));
        }
        if let HeadBudgets::PerHead(b) = &opts.head_budgets {
            let n_kv = self.cache.n_kv_heads();
            if b.len() != n_layers || b.iter().any(|r| r.len() != n_kv) {
                return Err(Error::invalid(format!(
                    "head budgets must be a [{n_layers}][{n_kv}] table of keys per head"
                )));
            }
        }
        if opts.method.needs_queries() {
            match self.query_tail(opts) {
                Some(w) if w > self.exact_tail => {
                    return Err(Error::invalid(format!(
                        "{:?} needs the queries of the last {w} tokens, but only the last {} are \
                         still exact (the cache was compacted); use queries=\"repeat\"",
                        opts.method, self.exact_tail
                    )))
                }
                None if suffix.is_none_or(<[u32]>::is_empty) => {
                    return Err(Error::invalid(
                        "repeat queries need a non-empty suffix of token ids",
                    ))
                }
                None => self.check_ids(suffix.unwrap())?,
                _ => {}
            }
        }
        Ok(layers)
    }

    /// For methods that score with the context's own queries: how many of the newest tokens
    /// to re-run (None: the method uses the repeat suffix).
    fn query_tail(&self, opts: &Options) -> Option<usize> {
        let n = self.cache.next_position();
        match opts.method {
            m if m.is_am() && opts.queries == QuerySource::Context => Some(n),
            Method::H2o => Some(n),
            Method::SnapKv => Some(opts.window.min(n)),
            Method::Tova => Some(1),
            _ => None,
        }
    }

    /// Every layer's queries `[n_heads, s, d]` (after QK-norm and RoPE) for `ids` run on top
    /// of the cache, which is left as it was (inspection and cross-checks).
    pub fn reference_queries(&mut self, ids: &[u32]) -> Result<Vec<Tensor>> {
        if ids.is_empty() {
            return Err(Error::invalid("reference_queries: no token ids"));
        }
        self.check_ids(ids)?;
        let qs = self.capture(ids)?;
        self.cache.truncate_last(ids.len())?;
        Ok(qs)
    }

    /// One (layer, KV head)'s keys, values `[n, d]` and biases `[n]` as f32.
    pub fn head_cache(&self, layer: usize, head: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.cache;
        if layer >= c.n_layers() || head >= c.n_kv_heads() {
            return Err(Error::invalid(format!(
                "no head ({layer}, {head}): the cache has {} layers of {} KV heads",
                c.n_layers(),
                c.n_kv_heads()
            )));
        }
        let h = c.head(layer, head);
        let f = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?) };
        Ok((f(h.keys()?)?, f(h.values()?)?, f(h.bias()?)?))
    }

    /// Every layer's newest `t` keys and values, `[n_kv_heads, t, head_dim]` copies.
    fn cache_tail(&self, t: usize) -> Result<Vec<(Tensor, Tensor)>> {
        let c = &self.cache;
        (0..c.n_layers())
            .map(|l| {
                let mut ks = Vec::with_capacity(c.n_kv_heads());
                let mut vs = Vec::with_capacity(c.n_kv_heads());
                for h in 0..c.n_kv_heads() {
                    let head = c.head(l, h);
                    let n = head.len();
                    ks.push(head.keys()?.narrow(0, n - t, t)?);
                    vs.push(head.values()?.narrow(0, n - t, t)?);
                }
                // Copies: the re-run overwrites the rows these views read (and stacking one
                // head shares its storage).
                Ok((
                    Tensor::stack(&ks, 0)?.copy()?,
                    Tensor::stack(&vs, 0)?.copy()?,
                ))
            })
            .collect()
    }

    /// Runs `ids` on top of the cache capturing every layer's queries `[n_heads, s, d]`; the
    /// tokens stay in the cache.
    fn capture(&mut self, ids: &[u32]) -> Result<Vec<Tensor>> {
        self.capture_scored(ids, None)
    }

    /// [`Engine::capture`] whose attention also scores every key into `scoring`.
    fn capture_scored(
        &mut self,
        ids: &[u32],
        mut scoring: Option<&mut ScoringPass>,
    ) -> Result<Vec<Tensor>> {
        let mut per_layer: Vec<Vec<Tensor>> = vec![Vec::new(); self.cache.n_layers()];
        for chunk in ids.chunks(PREFILL_CHUNK) {
            let mut qs = Vec::new();
            let mut attention = scoring
                .as_deref_mut()
                .map(|p| move |l: usize, q: &Tensor, layer: &LayerCache| p.attend(l, q, layer));
            self.model.forward_with(
                chunk,
                &mut self.cache,
                Some(&mut qs),
                attention.as_mut().map(|f| f as &mut AttentionFn<'_>),
            )?;
            for (l, q) in qs.into_iter().enumerate() {
                per_layer[l].push(q);
            }
        }
        per_layer.iter().map(|qs| Ok(Tensor::cat(qs, 1)?)).collect()
    }

    fn compact_inner(&mut self, opts: &Options, suffix: Option<&[u32]>) -> Result<CompactReport> {
        let layers = self.validate(opts, suffix)?;
        let scale = self.model.attention_scale() as f32;
        let tokens_before = self.cache.tokens_per_head();
        let bytes_before = self.cache.bytes_used();
        let n_layers = self.cache.n_layers();
        let mut outcomes = vec![vec![HeadOutcome::default(); self.cache.n_kv_heads()]; n_layers];
        let (mut t_queries, mut t_fit) = (0f64, 0f64);
        let clock = std::time::Instant::now;
        let needs = opts.method.needs_queries();
        let tail = needs.then(|| self.query_tail(opts)).flatten();
        // The repeat suffix's own keys stay in the cache while it is scored (they share every
        // softmax, as in the real pass) and are dropped at the end.
        let extra = match (needs, tail) {
            (true, None) => suffix.map_or(0, <[u32]>::len),
            _ => 0,
        };
        let counts_for = |l: usize, scored: &[Scored], global: &Option<Vec<Vec<usize>>>| match &opts
            .head_budgets
        {
            HeadBudgets::PerHead(b) => b[l]
                .iter()
                .zip(scored)
                .map(|(&b, s)| {
                    b.saturating_sub(opts.sink + opts.recent)
                        .min(s.middle(opts))
                })
                .collect(),
            HeadBudgets::Global | HeadBudgets::Entropy if global.is_some() => {
                global.as_ref().expect("checked")[l].clone()
            }
            _ => uniform_counts(scored, opts),
        };
        // A task-guided shared selection overrides the per-head counts where heads line up.
        let layer_counts = |l: usize, scored: &mut [Scored], global: &Option<Vec<Vec<usize>>>| {
            let limit = uniform_counts(scored, opts).into_iter().min().unwrap_or(0);
            match opts
                .shared_mad
                .and_then(|tau| shared_selection(scored, tau, limit))
            {
                Some(c) => vec![c; scored.len()],
                None => counts_for(l, scored, global),
            }
        };
        let on_policy = opts.method.is_am() && tail.is_none() && opts.on_policy;
        let global_needed = needs
            && opts.shared_mad.is_none()
            && matches!(
                opts.head_budgets,
                HeadBudgets::Global | HeadBudgets::Entropy
            );
        let mut query_tokens = 0;
        // The tail check's queries: the context's last tokens (exact since the last
        // compaction) re-run in place before any reference prompt joins the cache; their keys
        // and values are put back as they were, not as the re-run rounds them. A quantized
        // cache's tail may be partly quantized, so it is not checked.
        let tail_tokens = match self.cache.quant() {
            None if opts.checks_tail() => opts.tail_check.min(opts.recent).min(self.exact_tail),
            _ => 0,
        };
        let tail_q = if tail_tokens > 0 {
            let t0 = clock();
            let ids = self.history[self.history.len() - tail_tokens..].to_vec();
            let saved = self.cache_tail(tail_tokens)?;
            self.cache.truncate_last(tail_tokens)?;
            let qs = self.capture(&ids)?;
            self.cache.truncate_last(tail_tokens)?;
            for (l, (k, v)) in saved.iter().enumerate() {
                self.cache.append(l, k, v)?;
            }
            self.cache.advance(tail_tokens);
            t_queries += t0.elapsed().as_secs_f64();
            Some(qs)
        } else {
            None
        };
        let attach_tail = |l: usize, scored: &mut [Scored]| -> Result<()> {
            let Some(qs) = &tail_q else { return Ok(()) };
            let q = crate::compact::pipeline::f32s(&qs[l])?;
            let (nh, t, d) = qs[l].dims3()?;
            let rows = nh / scored.len().max(1) * t;
            for (h, s) in scored.iter_mut().enumerate() {
                s.tail_q = Some((q[h * rows * d..(h + 1) * rows * d].to_vec(), t));
            }
            Ok(())
        };

        // Off-policy reference queries: the context's own tail (re-run in place), or the
        // repeat suffix (left in the cache until the end).
        // On the CPU the global budgets' scores come from this pass's own attention (one
        // product per head, not two); elsewhere its queries are scored afterwards.
        let mut queries: Option<Vec<Tensor>> = None;
        let mut pass = (global_needed && self.model.device().is_cpu()).then(|| {
            let (n_kv, entropy) = (
                self.cache.n_kv_heads(),
                opts.head_budgets == HeadBudgets::Entropy,
            );
            let p = ScoringPass::new(n_layers, n_kv, opts.pool(), entropy, scale);
            // Off-policy fits over a suffix take their targets from the pass (the context's
            // own tail re-run in place is not yet whole while it runs).
            match (tail, suffix) {
                (None, Some(s)) if !on_policy && opts.fits_from_pass_targets() => {
                    p.with_fit_targets(opts, s.len())
                }
                _ => p,
            }
        });
        if needs && (!on_policy || global_needed) {
            let t0 = clock();
            let ids = match tail {
                Some(w) => {
                    let ids = self.history[self.history.len() - w..].to_vec();
                    self.cache.truncate_last(w)?;
                    ids
                }
                None => suffix.expect("validated").to_vec(),
            };
            query_tokens = ids.len();
            queries = Some(self.capture_scored(&ids, pass.as_mut())?);
            t_queries += t0.elapsed().as_secs_f64();
        }
        let t0 = clock();
        // The pass's scores also select, and its statistics feed the fits, where its queries
        // are the fit's: every layer off-policy, the first compacted layer on-policy (no
        // layer before it changes).
        let mut from_pass: Vec<Option<PassLayer>> = Vec::new();
        let global = if global_needed {
            let qs = queries.as_ref().expect("captured");
            let scored = (0..n_layers)
                .map(|l| {
                    if !layers.contains(&l) {
                        return Ok(Vec::new());
                    }
                    if let Some(p) = pass.as_mut() {
                        return Ok(scored_from_pass(p.finish_layer(l), extra, opts));
                    }
                    let lq = LayerQueries {
                        q: &qs[l],
                        causal: true,
                        extra,
                        outside: None,
                    };
                    score_layer(&self.cache, l, Some(&lq), opts, scale, false)
                })
                .collect::<Result<Vec<_>>>()?;
            let counts = global_counts(&scored, opts);
            if let Some(p) = pass.as_mut() {
                let first = layers.iter().copied().min();
                from_pass = scored
                    .into_iter()
                    .enumerate()
                    .map(|(l, heads)| {
                        let reuse = layers.contains(&l) && (!on_policy || Some(l) == first);
                        reuse.then(|| (heads, p.take_stats(l), p.take_targets(l)))
                    })
                    .collect();
            }
            Some(counts)
        } else {
            None
        };
        t_fit += t0.elapsed().as_secs_f64();

        if on_policy {
            if queries.take().is_some() {
                self.cache.truncate_last(extra)?;
            }
            let s = suffix.expect("validated");
            query_tokens = s.len();
            let t0 = clock();
            let mut fit_time = 0f64;
            // On the CPU with a full-precision cache the suffix's part of each layer's
            // attention is computed once and serves both the scoring and the forward pass
            // (see `compact::split_attention`); its time is the pass's, not the fit's.
            let split = self.model.device().is_cpu() && self.cache.quant().is_none();
            let last = n_layers - 1;
            let mut hook = |l: usize, q: &Tensor, cache: &mut KvCache| -> Result<Option<Tensor>> {
                if !layers.contains(&l) {
                    return Ok(None);
                }
                let reused = from_pass.get_mut(l).and_then(Option::take);
                let partials = match (split, &reused) {
                    (true, None) => Some(suffix_partials(&cache.layers[l], q, scale)?),
                    _ => None,
                };
                let t1 = clock();
                let lq = LayerQueries {
                    q,
                    causal: true,
                    extra,
                    outside: partials.as_ref().map(|p| p.stats.as_slice()),
                };
                let mut scored = match reused {
                    Some(pass) => fit_inputs_from_pass(cache, l, pass, &lq, opts, scale)?,
                    None => score_layer(cache, l, Some(&lq), opts, scale, true)?,
                };
                let counts = layer_counts(l, &mut scored, &global);
                attach_tail(l, &mut scored)?;
                outcomes[l] = apply_layer(cache, l, scored, &counts, opts, scale)?;
                fit_time += t1.elapsed().as_secs_f64();
                match partials {
                    Some(p) if l < last => Ok(Some(merge_context(&cache.layers[l], q, &p, scale)?)),
                    _ => Ok(None),
                }
            };
            self.model
                .forward_layerwise(s, &mut self.cache, PREFILL_CHUNK, &mut hook)?;
            self.cache.truncate_last(s.len())?;
            t_fit += fit_time;
            t_queries += t0.elapsed().as_secs_f64() - fit_time;
        } else {
            let t0 = clock();
            for &l in &layers {
                let lq = queries.as_ref().map(|qs| LayerQueries {
                    q: &qs[l],
                    causal: true,
                    extra,
                    outside: None,
                });
                let mut scored = match (from_pass.get_mut(l).and_then(Option::take), &lq) {
                    (Some(pass), Some(lq)) => {
                        fit_inputs_from_pass(&self.cache, l, pass, lq, opts, scale)?
                    }
                    _ => score_layer(&self.cache, l, lq.as_ref(), opts, scale, true)?,
                };
                let counts = layer_counts(l, &mut scored, &global);
                attach_tail(l, &mut scored)?;
                outcomes[l] = apply_layer(&mut self.cache, l, scored, &counts, opts, scale)?;
            }
            if extra > 0 {
                self.cache.truncate_last(extra)?;
            }
            t_fit += t0.elapsed().as_secs_f64();
        }
        let tokens_after = self.cache.tokens_per_head();
        if tokens_after != tokens_before {
            self.exact_tail = self.exact_tail.min(opts.recent);
        }
        Ok(CompactReport {
            tokens_before,
            tokens_after,
            bytes_before,
            bytes_after: self.cache.bytes_used(),
            seconds_queries: t_queries,
            seconds_fit: t_fit,
            heads: outcomes,
            query_tokens,
        })
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
