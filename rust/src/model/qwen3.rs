//! Qwen3 decoder: embeddings -> N x [RMSNorm, attention with per-head QK-norm and RoPE over the
//! kvfast cache, RMSNorm, SwiGLU MLP] -> RMSNorm -> LM head. Llama and Qwen2 are the same
//! decoder without QK-norm (Qwen2 with q/k/v biases): `ModelConfig` says which.
//!
//! Projections that read the same input are fused at load time (q|k|v and gate|up), so a decode
//! step runs 4 matrix products per layer instead of 7.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::ops::rms_norm;
use candle_nn::rotary_emb::{rope, rope_i};

use crate::attention::{attend, attend_masked};
use crate::cache::{KvCache, LayerCache};
use crate::config::ModelConfig;
use crate::decode_graph::StepIo;
use crate::error::Result;
use crate::gemv;
use crate::model::rope::Rope;
use crate::weights::WeightSource;

/// A weight matrix `[out, in]`: dense, or kept quantized (GGUF) as row blocks stacked along the
/// output dimension (q|k|v), each its own `QMatMul`.
#[derive(Debug, Clone)]
enum Mat {
    Dense(Tensor),
    Quant(Vec<QMatMul>),
}

/// `y = x W^T (+ b)` with `W` stored `[out, in]` as in the checkpoint.
#[derive(Debug, Clone)]
struct Linear {
    w: Mat,
    b: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.w {
            Mat::Dense(w) => xwt(x, w)?,
            Mat::Quant(parts) => {
                // candle's quantized kernels take f32 activations.
                let xf = x.to_dtype(DType::F32)?;
                if let Some(y) = crate::qgemv::matmul_xwt(&xf, parts)? {
                    return self.add_bias(y.to_dtype(x.dtype())?);
                }
                let ys = parts
                    .iter()
                    .map(|q| q.forward(&xf))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let y = if ys.len() == 1 {
                    ys.into_iter().next().expect("one part")
                } else {
                    Tensor::cat(&ys, 1)?
                };
                y.to_dtype(x.dtype())?
            }
        };
        self.add_bias(y)
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// (parameters, bytes held) of the matrix and bias.
    fn size(&self) -> (usize, usize) {
        let (mut n, mut bytes) = match &self.w {
            Mat::Dense(w) => (w.elem_count(), w.elem_count() * w.dtype().size_in_bytes()),
            Mat::Quant(parts) => parts.iter().fold((0, 0), |(n, b), q| match q {
                QMatMul::QTensor(t) => (n + t.shape().elem_count(), b + t.storage_size_in_bytes()),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => (
                    n + t.elem_count(),
                    b + t.elem_count() * t.dtype().size_in_bytes(),
                ),
            }),
        };
        if let Some(b) = &self.b {
            n += b.elem_count();
            bytes += b.elem_count() * b.dtype().size_in_bytes();
        }
        (n, bytes)
    }

    /// Loads `names` (each `[out_i, in]`) and stacks them along the output dimension.
    fn fused(
        w: &impl WeightSource,
        names: &[(&str, usize)],
        d_in: usize,
        bias: bool,
    ) -> Result<Self> {
        let qs = names
            .iter()
            .map(|(n, out)| w.get_quantized(&format!("{n}.weight"), &[*out, d_in]))
            .collect::<Result<Vec<_>>>()?;
        let mat = if qs.iter().all(Option::is_some) {
            Mat::Quant(qs.into_iter().flatten().collect())
        } else {
            let ws = names
                .iter()
                .map(|(n, out)| w.get_matrix(&format!("{n}.weight"), &[*out, d_in]))
                .collect::<Result<Vec<_>>>()?;
            let mut ws = ws;
            Mat::Dense(if ws.len() == 1 {
                ws.pop().expect("one matrix")
            } else {
                Tensor::cat(&ws, 0)?
            })
        };
        let b = if bias {
            let bs = names
                .iter()
                .map(|(n, out)| w.get(&format!("{n}.bias"), &[*out]))
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&bs, 0)?)
        } else {
            None
        };
        Ok(Self { w: mat, b })
    }
}

#[derive(Debug, Clone)]
struct Layer {
    input_norm: Tensor,
    qkv: Linear,
    /// Per-head RMSNorm weights of queries and keys (Qwen3 only).
    qk_norm: Option<(Tensor, Tensor)>,
    o_proj: Linear,
    post_norm: Tensor,
    gate_up: Linear,
    down: Linear,
}

/// An attention in place of [`attend`]: `(layer, q [n_heads, t, d], the layer's cache)` to
/// `[n_heads, t, d]`, the chunk's keys being the layer's last `t` rows.
pub type AttentionFn<'a> = dyn FnMut(usize, &Tensor, &LayerCache) -> Result<Tensor> + 'a;

/// The hook of [`Qwen3::forward_layerwise`]: layer, its queries, the cache; it may return the
/// layer's attention output.
pub type LayerHook<'a> = dyn FnMut(usize, &Tensor, &mut KvCache) -> Result<Option<Tensor>> + 'a;

#[derive(Debug, Clone)]
pub struct Qwen3 {
    pub cfg: ModelConfig,
    /// The embedding matrix `[vocab, hidden]` (looked up by rows; kept quantized for GGUF).
    embed: Linear,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    rope: Rope,
    dtype: DType,
    device: Device,
    params: usize,
    weight_bytes: usize,
}

impl Qwen3 {
    pub fn load(
        cfg: &ModelConfig,
        w: &impl WeightSource,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (qw, kvw) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
        let embed = Linear::fused(w, &[("model.embed_tokens", cfg.vocab_size)], h, false)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let a = format!("{p}.self_attn");
            let m = format!("{p}.mlp");
            layers.push(Layer {
                input_norm: w.get(&format!("{p}.input_layernorm.weight"), &[h])?,
                qkv: Linear::fused(
                    w,
                    &[
                        (&format!("{a}.q_proj"), qw),
                        (&format!("{a}.k_proj"), kvw),
                        (&format!("{a}.v_proj"), kvw),
                    ],
                    h,
                    cfg.qkv_bias,
                )?,
                qk_norm: if cfg.qk_norm {
                    Some((
                        w.get(&format!("{a}.q_norm.weight"), &[d])?,
                        w.get(&format!("{a}.k_norm.weight"), &[d])?,
                    ))
                } else {
                    None
                },
                o_proj: Linear::fused(w, &[(&format!("{a}.o_proj"), h)], qw, cfg.o_bias)?,
                post_norm: w.get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate_up: Linear::fused(
                    w,
                    &[
                        (&format!("{m}.gate_proj"), cfg.intermediate_size),
                        (&format!("{m}.up_proj"), cfg.intermediate_size),
                    ],
                    h,
                    false,
                )?,
                down: Linear::fused(
                    w,
                    &[(&format!("{m}.down_proj"), h)],
                    cfg.intermediate_size,
                    false,
                )?,
            });
        }
        let norm = w.get("model.norm.weight", &[h])?;
        // Tied checkpoints usually omit lm_head.weight; some ship it anyway.
        let tied = cfg.tie_word_embeddings && !w.contains("lm_head.weight");
        let lm_head = if tied {
            embed.clone()
        } else {
            Linear::fused(w, &[("lm_head", cfg.vocab_size)], h, false)?
        };
        let mut dense: Vec<&Tensor> = vec![&norm];
        let mut linears: Vec<&Linear> = vec![&embed];
        if !tied {
            linears.push(&lm_head);
        }
        for l in &layers {
            dense.extend([&l.input_norm, &l.post_norm]);
            dense.extend(l.qk_norm.iter().flat_map(|(q, k)| [q, k]));
            linears.extend([&l.qkv, &l.o_proj, &l.gate_up, &l.down]);
        }
        let (mut params, mut weight_bytes) = (0, 0);
        for t in dense {
            params += t.elem_count();
            weight_bytes += t.elem_count() * t.dtype().size_in_bytes();
        }
        for l in linears {
            let (n, b) = l.size();
            params += n;
            weight_bytes += b;
        }
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
            rope: Rope::new(d, cfg.rope_theta),
            dtype,
            device: device.clone(),
            params,
            weight_bytes,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn num_parameters(&self) -> usize {
        self.params
    }

    /// Bytes the weights occupy (matrices may be stored narrower than the compute dtype).
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// The softmax scale of attention logits, 1/sqrt(head_dim).
    pub fn attention_scale(&self) -> f64 {
        1.0 / (self.cfg.head_dim as f64).sqrt()
    }

    pub fn new_cache(&self) -> Result<KvCache> {
        KvCache::new(
            self.cfg.num_hidden_layers,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
            self.dtype,
            &self.device,
        )
    }

    /// Runs `ids` through the decoder, appending their keys/values to `cache`; returns the final
    /// normalised hidden states `[t, hidden]`.
    pub fn forward(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        self.forward_capture(ids, cache, None)
    }

    /// [`Qwen3::forward`] that also hands back each layer's queries `[n_heads, t, head_dim]`
    /// after QK-norm and RoPE (unscaled): the reference queries compaction fits against.
    pub fn forward_capture(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        queries: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        self.forward_with(ids, cache, queries, None)
    }

    /// [`Qwen3::forward_capture`] whose attention, when `attention(l, q, layer)` is given, is
    /// computed by it in place of [`attend`] (compaction scores keys with the same softmax).
    pub fn forward_with(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        mut queries: Option<&mut Vec<Tensor>>,
        mut attention: Option<&mut AttentionFn<'_>>,
    ) -> Result<Tensor> {
        let t = ids.len();
        let (mut x, cos, sin) = self.embed_tokens(ids, cache.next_position())?;
        for (l, layer) in self.layers.iter().enumerate() {
            let (q, k, v) = self.qkv(layer, &x, &cos, &sin)?;
            cache.append(l, &k, &v)?;
            let attn = match attention.as_deref_mut() {
                Some(f) => f(l, &q, &cache.layers[l])?,
                None => attend(&q, &cache.layers[l], self.attention_scale())?,
            };
            cache.settle(l)?;
            x = self.finish(layer, &x, &attn)?;
            if let Some(qs) = queries.as_deref_mut() {
                qs.push(q);
            }
        }
        cache.advance(t);
        Ok(rms_norm(&x, &self.norm, self.cfg.rms_norm_eps as f32)?)
    }

    /// Embeddings of `ids` in the compute dtype and the RoPE tables of their positions, which
    /// start at `start`.
    fn embed_tokens(&self, ids: &[u32], start: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let x = self.embed(&Tensor::new(ids, &self.device)?)?;
        let (cos, sin) = self
            .rope
            .tables(start, ids.len(), self.dtype, &self.device)?;
        Ok((x, cos, sin))
    }

    /// Embedding rows of the u32 ids in `idx` (on the model device), in the compute dtype.
    fn embed(&self, idx: &Tensor) -> Result<Tensor> {
        let x = match &self.embed.w {
            Mat::Dense(t) => t.index_select(idx, 0)?,
            Mat::Quant(parts) => parts[0].embedding(idx)?,
        };
        Ok(x.to_dtype(self.dtype)?)
    }

    /// Runs `ids` layer by layer (all tokens through layer `l` before layer `l + 1`) and calls
    /// `hook(l, q, cache)` with layer `l`'s queries `[n_heads, t, head_dim]` while the new
    /// tokens' keys are the last `t` rows of every head of layer `l` (the hook must keep them
    /// last). On-policy compaction uses the hook to compact layer `l` while layers `0..l` are
    /// already compacted: one pass, not one per layer. Attention then runs in chunks of `chunk`
    /// queries, unless the hook returns the layer's attention output itself; the final norm
    /// and LM head are skipped (only queries matter).
    pub fn forward_layerwise(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        chunk: usize,
        hook: &mut LayerHook<'_>,
    ) -> Result<()> {
        let t = ids.len();
        let (mut x, cos, sin) = self.embed_tokens(ids, cache.next_position())?;
        let last = self.layers.len() - 1;
        for (l, layer) in self.layers.iter().enumerate() {
            let (q, k, v) = self.qkv(layer, &x, &cos, &sin)?;
            cache.append(l, &k, &v)?;
            // The hook may compute the layer's attention itself (`[n_heads, t, d]`), leaving
            // the chunk's keys appended.
            if let Some(attn) = hook(l, &q, cache)? {
                cache.settle(l)?;
                if l < last {
                    x = self.finish(layer, &x, &attn)?;
                }
                continue;
            }
            // Re-append in chunks so each chunk's causal attention sees exactly its prefix.
            cache.truncate_layer_last(l, t)?;
            let mut outs = Vec::new();
            for start in (0..t).step_by(chunk.max(1)) {
                let len = chunk.min(t - start);
                cache.append(l, &k.narrow(1, start, len)?, &v.narrow(1, start, len)?)?;
                if l < last {
                    let qc = q.narrow(1, start, len)?;
                    outs.push(attend(&qc, &cache.layers[l], self.attention_scale())?);
                }
                cache.settle(l)?;
            }
            if l < last {
                x = self.finish(layer, &x, &Tensor::cat(&outs, 1)?)?;
            }
        }
        cache.advance(t);
        Ok(())
    }

    /// Queries `[n_heads, t, d]`, keys and values `[n_kv, t, d]` of one layer, QK-normed and
    /// rotated: cached keys are final.
    fn qkv(
        &self,
        layer: &Layer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.cfg;
        let (t, d) = (x.dim(0)?, c.head_dim);
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let eps = c.rms_norm_eps as f32;

        let h = rms_norm(x, &layer.input_norm, eps)?;
        let qkv = layer.qkv.forward(&h)?;
        let q = qkv
            .narrow(1, 0, nh * d)?
            .contiguous()?
            .reshape((t, nh, d))?;
        let k = qkv
            .narrow(1, nh * d, nkv * d)?
            .contiguous()?
            .reshape((t, nkv, d))?;
        let v = qkv
            .narrow(1, (nh + nkv) * d, nkv * d)?
            .contiguous()?
            .reshape((t, nkv, d))?;
        let (q, k) = match &layer.qk_norm {
            Some((qn, kn)) => (rms_norm(&q, qn, eps)?, rms_norm(&k, kn, eps)?),
            None => (q, k),
        };
        let (q, k) = (to_heads(&q)?, to_heads(&k)?);
        let rot = if c.rope_interleaved { rope_i } else { rope };
        let q = rot(&q.unsqueeze(0)?, cos, sin)?.squeeze(0)?;
        let k = rot(&k.unsqueeze(0)?, cos, sin)?.squeeze(0)?;
        Ok((q, k, to_heads(&v)?))
    }

    /// The rest of a layer after attention `[n_heads, t, d]`: output projection, residual, MLP.
    fn finish(&self, layer: &Layer, x: &Tensor, attn: &Tensor) -> Result<Tensor> {
        let c = &self.cfg;
        let (t, d, nh) = (x.dim(0)?, c.head_dim, c.num_attention_heads);
        let attn = attn.transpose(0, 1)?.contiguous()?.reshape((t, nh * d))?;
        let x = (x + layer.o_proj.forward(&attn)?)?;
        let h = rms_norm(&x, &layer.post_norm, c.rms_norm_eps as f32)?;
        let gu = layer.gate_up.forward(&h)?;
        let f = c.intermediate_size;
        let m = (gu.narrow(1, 0, f)?.silu()? * gu.narrow(1, f, f)?)?;
        Ok((x + layer.down.forward(&m)?)?)
    }

    /// Whether every matrix is dense (the static decode step covers no quantized weights).
    pub fn is_dense(&self) -> bool {
        let dense = |l: &Linear| matches!(l.w, Mat::Dense(_));
        dense(&self.embed)
            && dense(&self.lm_head)
            && self.layers.iter().all(|l| {
                [&l.qkv, &l.o_proj, &l.gate_up, &l.down]
                    .into_iter()
                    .all(dense)
            })
    }

    /// RoPE tables `(cos, sin)` `[t, head_dim / 2]` for positions `start..start + t`.
    pub fn rope_tables(&self, start: usize, t: usize) -> Result<(Tensor, Tensor)> {
        self.rope.tables(start, t, self.dtype, &self.device)
    }

    /// One decode step with fixed shapes and addresses, every per-step value read from
    /// `io.inputs` on the device (see `decode_graph`): the token's keys and values are scattered
    /// into `bufs` (each layer's whole packed `[n_kv, capacity, d]` buffers) at row `w`,
    /// attention covers rows `0..io.span` under a mask that hides rows past `w`, and the f32
    /// logits land in `io.logits`. Issues no host transfer, so a CUDA graph can capture it.
    pub fn decode_static(&self, io: &StepIo, bufs: &[(Tensor, Tensor)]) -> Result<()> {
        #[cfg(feature = "cuda")]
        if crate::fused::available(&io.cos) {
            return self.decode_fused(io, bufs);
        }
        let c = &self.cfg;
        let (nkv, d) = (c.num_key_value_heads, c.head_dim);
        let id = io.inputs.narrow(0, 0, 1)?;
        let row = io.inputs.narrow(0, 1, 1)?;
        let w = io.inputs.narrow(0, 2, 1)?;
        let mut x = self.embed(&id)?;
        let cos = io.cos.index_select(&row, 0)?;
        let sin = io.sin.index_select(&row, 0)?;
        let mask = io
            .rows
            .broadcast_le(&w)?
            .where_cond(&io.zeros, &io.neg_inf)?
            .reshape((1, io.span))?;
        let at = w
            .reshape((1, 1, 1))?
            .broadcast_as((nkv, 1, d))?
            .contiguous()?;
        for (layer, (kb, vb)) in self.layers.iter().zip(bufs) {
            let (q, k, v) = self.qkv(layer, &x, &cos, &sin)?;
            kb.scatter_set(&at, &k, 1)?;
            vb.scatter_set(&at, &v, 1)?;
            let (ks, vs) = (kb.narrow(1, 0, io.span)?, vb.narrow(1, 0, io.span)?);
            let attn = attend_masked(&q, &ks, &vs, self.attention_scale(), Some(&mask))?;
            x = self.finish(layer, &x, &attn)?;
        }
        let h = rms_norm(&x, &self.norm, c.rms_norm_eps as f32)?;
        io.logits.slice_set(&self.logits(&h)?, 0, 0)?;
        Ok(())
    }

    /// [`Qwen3::decode_static`] on the fused CUDA kernels (see `fused`). Per layer: the qkv
    /// GEMV (staging the residual add and RMSNorm before it), QK-norm + RoPE + cache write,
    /// attention (two kernels), the o GEMV, the gate|up GEMV (staging the next add + norm) and
    /// the down GEMV (staging SwiGLU). The residual add after `down` is left pending and done by
    /// the next layer's first GEMV.
    #[cfg(feature = "cuda")]
    fn decode_fused(&self, io: &StepIo, bufs: &[(Tensor, Tensor)]) -> Result<()> {
        use crate::fused;
        let c = &self.cfg;
        let eps = c.rms_norm_eps as f32;
        let mut x = self.embed(&io.inputs.narrow(0, 0, 1)?)?;
        // The last product's output, not yet added to the residual stream `x`.
        let mut pending: Option<Tensor> = None;
        let scale = self.attention_scale() as f32;
        // Every layer's packed buffers have the same capacity (one length, one growth).
        let dims = fused::Dims {
            n_heads: c.num_attention_heads,
            n_kv: c.num_key_value_heads,
            head_dim: c.head_dim,
            capacity: bufs[0].0.dim(1)?,
            eps,
            interleaved: c.rope_interleaved,
        };
        for (layer, (kb, vb)) in self.layers.iter().zip(bufs) {
            let qkv;
            (x, qkv) = norm_product(&layer.qkv, &x, pending.as_ref(), &layer.input_norm, eps)?;
            let q = fused::qkv_rope_store(
                &qkv,
                layer.qk_norm.as_ref(),
                &io.cos,
                &io.sin,
                &io.inputs,
                kb,
                vb,
                dims,
            )?;
            let attn = fused::attention(&q, kb, vb, &io.inputs, io.span, scale, dims)?;
            let o = row_product(&layer.o_proj, &attn)?;
            let gu;
            (x, gu) = norm_product(&layer.gate_up, &x, Some(&o), &layer.post_norm, eps)?;
            pending = Some(silu_product(&layer.down, &gu)?);
        }
        // The LM head's thousands of blocks would each redo this norm: one kernel does it once.
        let h = match &pending {
            Some(y) => fused::add_rms_norm(&x, y, &self.norm, eps)?.1,
            None => rms_norm(&x, &self.norm, eps)?,
        };
        let logits = match dense_gemv(&self.lm_head, &h, fused::RowInput::Plain, true)? {
            Some((l, _)) => l,
            None => row_product(&self.lm_head, &h)?.to_dtype(DType::F32)?,
        };
        io.logits.slice_set(&logits, 0, 0)?;
        Ok(())
    }

    /// f32 logits `[rows, vocab]` for normalised hidden states `[rows, hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(hidden)?.to_dtype(DType::F32)?)
    }
}

/// [`crate::fused::gemv`] of `lin` when its weight is dense (None: quantized, or a shape the
/// kernel does not take; the caller runs the separate ops).
#[cfg(feature = "cuda")]
fn dense_gemv(
    lin: &Linear,
    x: &Tensor,
    input: crate::fused::RowInput<'_>,
    f32_out: bool,
) -> Result<Option<(Tensor, Option<Tensor>)>> {
    match &lin.w {
        Mat::Dense(w) => crate::fused::gemv(x, w, lin.b.as_ref(), input, f32_out),
        _ => Ok(None),
    }
}

/// One row through `lin` on the fused GEMV kernel where it applies, else [`Linear::forward`].
#[cfg(feature = "cuda")]
fn row_product(lin: &Linear, x: &Tensor) -> Result<Tensor> {
    match dense_gemv(lin, x, crate::fused::RowInput::Plain, false)? {
        Some((y, _)) => Ok(y),
        None => lin.forward(x),
    }
}

/// The residual stream after adding `y` to `x` (None: `x` as is), and `lin` applied to its
/// RMSNorm (weight `w`): one GEMV kernel where it applies, else the add + norm kernel and the
/// product.
#[cfg(feature = "cuda")]
fn norm_product(
    lin: &Linear,
    x: &Tensor,
    y: Option<&Tensor>,
    w: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    use crate::fused::{add_rms_norm, RowInput};
    if let Some((out, sum)) = dense_gemv(lin, x, RowInput::Norm { y, w, eps }, false)? {
        return Ok((sum.unwrap_or_else(|| x.clone()), out));
    }
    let (x, h) = match y {
        Some(y) => add_rms_norm(x, y, w, eps)?,
        None => (x.clone(), rms_norm(x, w, eps)?),
    };
    Ok((x, row_product(lin, &h)?))
}

/// `lin` applied to the SwiGLU of a gate | up row: one GEMV kernel where it applies.
#[cfg(feature = "cuda")]
fn silu_product(lin: &Linear, gu: &Tensor) -> Result<Tensor> {
    match dense_gemv(lin, gu, crate::fused::RowInput::Silu, false)? {
        Some((out, _)) => Ok(out),
        None => row_product(lin, &crate::fused::silu_mul(gu)?),
    }
}

/// `x W^T`: the streaming CPU kernel for a few rows (decode), BLAS or candle's GEMM otherwise.
fn xwt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dim(0)? <= gemv::MAX_ROWS {
        if let Some(y) = gemv::matmul_xwt(&x.to_dtype(DType::F32)?, w)? {
            return Ok(y.to_dtype(x.dtype())?);
        }
    }
    let w = w.to_dtype(x.dtype())?;
    if let Some(y) = crate::blas::matmul(&x.contiguous()?, &w, true)? {
        return Ok(y);
    }
    Ok(x.matmul(&w.t()?)?)
}

/// `[t, heads, d]` -> contiguous `[heads, t, d]`.
fn to_heads(x: &Tensor) -> Result<Tensor> {
    Ok(x.transpose(0, 1)?.contiguous()?)
}
