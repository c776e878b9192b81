//! The KV cache: ragged per (layer, KV head), with an additive per-key logit bias.
//!
//! Layout
//! ------
//! `KvCache.layers[l].heads[h]` is a [`HeadCache`] that owns three buffers:
//! - `k`, `v`: `[capacity, head_dim]` in the model dtype, rows `0..len` valid. Keys are stored
//!   *after* QK-norm and RoPE, so a kept key never needs its position again.
//! - `bias`: `[capacity]` f32, added to the attention logit of each key. Zero for ordinary
//!   tokens; Attention-Matching compaction writes `beta = log w` here.
//!
//! Every head has its own `len` and `capacity`: after compaction with non-uniform budgets a head
//! may keep 2% of its keys and its neighbour 60%, and the memory really shrinks (unlike padding
//! every head to the longest, or masking dropped keys). Capacity grows geometrically, so
//! appending a token is amortised O(1): rows are written in place with `slice_set` and only a
//! capacity doubling copies the head.
//!
//! Packed layers: until compaction rewrites one of its heads, a layer's heads are views into
//! one `[n_kv, capacity, head_dim]` pair of buffers, all of the same length. A token is then
//! appended with one copy per buffer instead of one per head, and attention runs as one batched
//! GEMM over the heads ([`LayerCache::packed`]) instead of a loop of small ones: on a GPU,
//! where every candle op is a kernel launch, that is most of a decode step's launches. The
//! first `replace_head` turns the layer ragged (each head its own buffers, as above); the
//! other heads keep their views, which no one else writes. `KVFAST_PACKED_CACHE=0` turns
//! packing off (to measure it).
//!
//! Quantized cache (`kv_dtype`, CPU): a head then holds its tokens in two parts, the filled
//! groups of `group` tokens as integer codes ([`QuantRows`], KIVI-style) and the newest
//! `< group` tokens (the residual) in `k`/`v` in full precision. `bias` still covers every token.
//! A compacted head is quantized the same way when it is written, so compaction and
//! quantization compose (a head written at once is quantized whole, its last group short, so
//! a compacted head keeps no full-precision rows); `keys()`/`values()` return the dequantized rows (what attention
//! sees), so compaction fits what the cache actually holds.
//!
//! `next_position` is the RoPE position of the next appended token. It counts tokens *seen*,
//! not keys kept: after compaction new tokens continue from the original context length.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::kv_quant::{KvQuant, QuantRows};

/// Smallest capacity allocated for a head, in tokens.
const MIN_CAPACITY: usize = 64;

#[derive(Debug, Clone)]
pub struct HeadCache {
    /// Full-precision rows: tokens `quantized_len()..len` at rows `0..dense_len()`.
    k: Tensor,
    v: Tensor,
    /// Every token's bias, `[>= len]`.
    bias: Tensor,
    len: usize,
    /// Whether any live key has a non-zero bias (lets attention skip the bias add).
    has_bias: bool,
    /// The quantized older tokens, when the cache is quantized.
    quant: Option<QuantRows>,
}

impl HeadCache {
    fn empty(head_dim: usize, dtype: DType, device: &Device) -> Result<Self> {
        Self::with_capacity(0, head_dim, dtype, device)
    }

    fn with_capacity(cap: usize, head_dim: usize, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self {
            k: Tensor::zeros((cap, head_dim), dtype, device)?,
            v: Tensor::zeros((cap, head_dim), dtype, device)?,
            bias: Tensor::zeros(cap, DType::F32, device)?,
            len: 0,
            has_bias: false,
            quant: None,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Full-precision rows allocated.
    pub fn capacity(&self) -> usize {
        self.k.dim(0).unwrap_or(0)
    }

    /// The quantized older tokens (None for a full-precision head).
    pub fn quantized(&self) -> Option<&QuantRows> {
        self.quant.as_ref()
    }

    fn quantized_len(&self) -> usize {
        self.quant.as_ref().map_or(0, QuantRows::len)
    }

    /// Tokens held in full precision (all of them unless the cache is quantized).
    pub fn dense_len(&self) -> usize {
        self.len - self.quantized_len()
    }

    /// The full-precision rows `[dense_len, head_dim]` (the newest tokens; a view).
    pub fn dense_keys(&self) -> Result<Tensor> {
        Ok(self.k.narrow(0, 0, self.dense_len())?)
    }

    pub fn dense_values(&self) -> Result<Tensor> {
        Ok(self.v.narrow(0, 0, self.dense_len())?)
    }

    pub fn has_bias(&self) -> bool {
        self.has_bias
    }

    /// Valid keys `[len, head_dim]`: a view, or for a quantized head the dequantized rows
    /// followed by the full-precision ones (a copy).
    pub fn keys(&self) -> Result<Tensor> {
        match &self.quant {
            Some(q) if !q.is_empty() => self.with_dequantized(q.keys(), self.dense_keys()?),
            _ => self.dense_keys(),
        }
    }

    pub fn values(&self) -> Result<Tensor> {
        match &self.quant {
            Some(q) if !q.is_empty() => self.with_dequantized(q.values(), self.dense_values()?),
            _ => self.dense_values(),
        }
    }

    fn with_dequantized(&self, rows: Vec<f32>, dense: Tensor) -> Result<Tensor> {
        let d = self.k.dim(1)?;
        let q = Tensor::from_vec(rows, (self.quantized_len(), d), self.k.device())?
            .to_dtype(self.k.dtype())?;
        Ok(Tensor::cat(&[q, dense], 0)?)
    }

    /// Per-key logit bias `[len]` f32.
    pub fn bias(&self) -> Result<Tensor> {
        Ok(self.bias.narrow(0, 0, self.len)?)
    }

    /// Appends `k`, `v` (`[t, head_dim]`) with bias 0.
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let t = k.dim(0)?;
        let dense = self.dense_len();
        self.reserve(dense + t, self.len + t)?;
        self.k.slice_set(&k.contiguous()?, 0, dense)?;
        self.v.slice_set(&v.contiguous()?, 0, dense)?;
        // Rows past `len` are kept at bias 0 (see `reserve` and `replace`), so nothing to write.
        self.len += t;
        Ok(())
    }

    /// Makes room for `dense` full-precision rows and `total` biases, growing geometrically.
    fn reserve(&mut self, dense: usize, total: usize) -> Result<()> {
        if dense > self.capacity() {
            let cap = dense.max(2 * self.capacity()).max(MIN_CAPACITY);
            self.set_dense_capacity(cap)?;
        }
        let bias_cap = self.bias.dim(0)?;
        if total > bias_cap {
            let cap = total.max(2 * bias_cap).max(MIN_CAPACITY);
            let bias = Tensor::zeros(cap, DType::F32, self.bias.device())?;
            if self.len > 0 {
                bias.slice_set(&self.bias()?, 0, 0)?;
            }
            self.bias = bias;
        }
        Ok(())
    }

    /// Reallocates the full-precision rows to `cap` (>= dense_len), keeping them.
    fn set_dense_capacity(&mut self, cap: usize) -> Result<()> {
        let (dtype, device, d) = (self.k.dtype(), self.k.device().clone(), self.k.dim(1)?);
        let k = Tensor::zeros((cap, d), dtype, &device)?;
        let v = Tensor::zeros((cap, d), dtype, &device)?;
        if self.dense_len() > 0 {
            k.slice_set(&self.dense_keys()?, 0, 0)?;
            v.slice_set(&self.dense_values()?, 0, 0)?;
        }
        (self.k, self.v) = (k, v);
        Ok(())
    }

    /// Moves every filled group of full-precision rows into the quantized rows.
    fn quantize_full_groups(&mut self) -> Result<()> {
        self.quantize_rows(false)
    }

    /// Moves every full-precision row into the quantized rows, the last group possibly short
    /// (a head written at once: compaction, conversion).
    fn quantize_all(&mut self) -> Result<()> {
        self.quantize_rows(true)
    }

    fn quantize_rows(&mut self, all: bool) -> Result<()> {
        let Some(q) = self.quant.as_mut() else {
            return Ok(());
        };
        let (g, dense) = (q.spec().group, self.len - q.len());
        let full = if all { dense } else { dense / g * g };
        if full == 0 {
            return Ok(());
        }
        let rows = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.narrow(0, 0, full)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
        let (k, v) = (rows(&self.k)?, rows(&self.v)?);
        let d = self.k.dim(1)?;
        for (kg, vg) in k.chunks(g * d).zip(v.chunks(g * d)) {
            q.push_group(kg, vg);
        }
        let rest = dense - full;
        if rest > 0 {
            // `copy`: source and destination share the buffer.
            let rk = self.k.narrow(0, full, rest)?.copy()?;
            let rv = self.v.narrow(0, full, rest)?.copy()?;
            self.k.slice_set(&rk, 0, 0)?;
            self.v.slice_set(&rv, 0, 0)?;
        }
        // A long prefill chunk grew the residual buffer; give the memory back.
        let small = (2 * g).max(MIN_CAPACITY);
        if self.capacity() > 2 * small {
            self.set_dense_capacity(small)?;
        }
        Ok(())
    }

    /// Drops the newest `t` tokens (bias reset to 0).
    fn truncate(&mut self, t: usize) -> Result<()> {
        if self.len < t {
            return Err(Error::invalid(format!(
                "cannot drop {t} tokens from a head holding {}",
                self.len
            )));
        }
        let dense = self.dense_len();
        if t > dense {
            // Every full-precision row goes; the rest comes off the quantized rows.
            if let Some(q) = self.quant.as_mut() {
                q.truncate(self.len - t);
            }
        }
        self.len -= t;
        if self.has_bias && t > 0 {
            let zeros = Tensor::zeros(t, DType::F32, self.bias.device())?;
            self.bias.slice_set(&zeros, 0, self.len)?;
        }
        Ok(())
    }

    /// Bytes in use: codes and scales, full-precision rows, one f32 bias per token.
    fn bytes_used(&self) -> usize {
        let row = 2 * self.k.dim(1).unwrap_or(0) * self.k.dtype().size_in_bytes();
        self.quant.as_ref().map_or(0, QuantRows::bytes)
            + self.dense_len() * row
            + self.len * DType::F32.size_in_bytes()
    }

    /// Bytes allocated, room for growth included.
    fn bytes_allocated(&self) -> usize {
        let row = 2 * self.k.dim(1).unwrap_or(0) * self.k.dtype().size_in_bytes();
        self.quant.as_ref().map_or(0, QuantRows::bytes_reserved)
            + self.capacity() * row
            + self.bias.dim(0).unwrap_or(0) * DType::F32.size_in_bytes()
    }
}

#[derive(Debug, Clone)]
pub struct LayerCache {
    pub heads: Vec<HeadCache>,
    /// `[n_kv, capacity, head_dim]` keys and values whose rows `h` the heads view, while the
    /// layer is packed (see the module docs); `None` once ragged.
    packed: Option<(Tensor, Tensor)>,
    /// Whether the layer may (still) be packed: packing is on and no head was replaced.
    packable: bool,
}

impl LayerCache {
    /// Keys and values `[n_kv, len, head_dim]` (strided views, no copy) when every head is a
    /// view of the layer's packed buffers: all heads then have the same length and no bias.
    pub fn packed(&self) -> Option<(Tensor, Tensor)> {
        let (k, v) = self.packed.as_ref()?;
        let len = self.heads.first()?.len;
        Some((k.narrow(1, 0, len).ok()?, v.narrow(1, 0, len).ok()?))
    }

    /// The whole `[n_kv, capacity, head_dim]` key and value buffers of a packed layer (rows
    /// past the length are zeros or old tokens, never uninitialised memory) and its length.
    pub fn packed_buffers(&self) -> Option<(&Tensor, &Tensor, usize)> {
        let (k, v) = self.packed.as_ref()?;
        Some((k, v, self.heads.first()?.len))
    }

    /// Appends `k`, `v` `[n_kv, t, head_dim]` (contiguous) to every head of a packed layer.
    fn append_packed(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let t = k.dim(1)?;
        let len = self.heads.first().map_or(0, |h| h.len);
        let cap = self.heads.first().map_or(0, HeadCache::capacity);
        if self.packed.is_none() || len + t > cap {
            let (n_kv, d) = (k.dim(0)?, k.dim(2)?);
            let cap = (len + t).max(2 * cap).max(MIN_CAPACITY);
            let (dtype, device) = (k.dtype(), k.device());
            let nk = Tensor::zeros((n_kv, cap, d), dtype, device)?;
            let nv = Tensor::zeros((n_kv, cap, d), dtype, device)?;
            if len > 0 {
                let (ok, ov) = self.packed().expect("a packed layer with keys has buffers");
                nk.slice_set(&ok.contiguous()?, 1, 0)?;
                nv.slice_set(&ov.contiguous()?, 1, 0)?;
            }
            for (h, head) in self.heads.iter_mut().enumerate() {
                head.k = nk.get(h)?;
                head.v = nv.get(h)?;
                head.bias = Tensor::zeros(cap, DType::F32, device)?;
            }
            self.packed = Some((nk, nv));
        }
        let (pk, pv) = self.packed.as_ref().expect("allocated above");
        pk.slice_set(k, 1, len)?;
        pv.slice_set(v, 1, len)?;
        for head in &mut self.heads {
            head.len += t;
        }
        Ok(())
    }
}

/// Whether new layers are packed (`KVFAST_PACKED_CACHE=0` turns it off, for measurements).
fn packing_enabled() -> bool {
    std::env::var("KVFAST_PACKED_CACHE").map_or(true, |v| v != "0")
}

#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
    next_position: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
    quant: Option<KvQuant>,
}

impl KvCache {
    pub fn new(
        n_layers: usize,
        n_kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let packable = packing_enabled();
        let layers = (0..n_layers)
            .map(|_| {
                let heads = (0..n_kv_heads)
                    .map(|_| HeadCache::empty(head_dim, dtype, device))
                    .collect::<Result<Vec<_>>>()?;
                Ok(LayerCache {
                    heads,
                    packed: None,
                    packable,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            next_position: 0,
            head_dim,
            dtype,
            device: device.clone(),
            quant: None,
        })
    }

    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn n_kv_heads(&self) -> usize {
        self.layers.first().map_or(0, |l| l.heads.len())
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn head(&self, layer: usize, head: usize) -> &HeadCache {
        &self.layers[layer].heads[head]
    }

    /// RoPE position of the next token (= tokens seen so far).
    pub fn next_position(&self) -> usize {
        self.next_position
    }

    /// Records that `t` tokens were appended to every layer (call once per forward pass).
    pub fn advance(&mut self, t: usize) {
        self.next_position += t;
    }

    /// Appends the new keys/values of one layer: `k`, `v` are `[n_kv_heads, t, head_dim]`
    /// (exact until [`KvCache::settle`]).
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let layer = &mut self.layers[layer];
        if layer.packable {
            return layer.append_packed(&k.contiguous()?, &v.contiguous()?);
        }
        for (h, head) in layer.heads.iter_mut().enumerate() {
            head.append(&k.get(h)?, &v.get(h)?)?;
        }
        Ok(())
    }

    /// Records `t` tokens that a static decode step (`decode_graph`) wrote straight into every
    /// layer's packed buffers at the old length: lengths and the position advance, nothing is
    /// copied. Fails, changing nothing, unless every layer is packed with room for them.
    pub fn note_written(&mut self, t: usize) -> Result<()> {
        let fits = |l: &LayerCache| {
            l.packed_buffers()
                .is_some_and(|(k, _, len)| k.dim(1).is_ok_and(|cap| len + t <= cap))
        };
        if self.quant.is_some() || !self.layers.iter().all(fits) {
            return Err(Error::invalid(
                "note_written: the cache is not packed (or full) in every layer",
            ));
        }
        for layer in &mut self.layers {
            for head in &mut layer.heads {
                head.len += t;
            }
        }
        self.next_position += t;
        Ok(())
    }

    /// Quantizes the filled groups of one layer's newest tokens (no-op for a full-precision
    /// cache). The model calls it after a layer's attention, so the tokens of a chunk attend to
    /// each other's exact keys and values, as in KIVI's prefill, and only later tokens see them
    /// quantized.
    pub fn settle(&mut self, layer: usize) -> Result<()> {
        if self.quant.is_some() {
            for head in &mut self.layers[layer].heads {
                head.quantize_full_groups()?;
            }
        }
        Ok(())
    }

    /// Replaces one head's contents (what compaction does): `k`, `v` `[n, head_dim]`, `bias`
    /// `[n]` f32 or `None` for zeros. Allocates exactly `n` rows plus room to grow.
    pub fn replace_head(
        &mut self,
        layer: usize,
        head: usize,
        k: &Tensor,
        v: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<()> {
        let new = self.new_head(k, v, bias)?;
        let layer = &mut self.layers[layer];
        layer.heads[head] = new;
        // The other heads keep their views of the packed buffers, which only they write.
        layer.packed = None;
        layer.packable = false;
        Ok(())
    }

    /// A head holding exactly `k`, `v` `[n, head_dim]` and `bias` (quantized as the cache is).
    fn new_head(&self, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<HeadCache> {
        let n = k.dim(0)?;
        if k.dims() != [n, self.head_dim] || v.dims() != [n, self.head_dim] {
            return Err(Error::invalid(format!(
                "replace_head: keys {:?} / values {:?} must both be [n, {}]",
                k.dims(),
                v.dims(),
                self.head_dim
            )));
        }
        let mut new = HeadCache::with_capacity(n, self.head_dim, self.dtype, &self.device)?;
        if n > 0 {
            new.k
                .slice_set(&k.to_dtype(self.dtype)?.contiguous()?, 0, 0)?;
            new.v
                .slice_set(&v.to_dtype(self.dtype)?.contiguous()?, 0, 0)?;
        }
        if let Some(b) = bias {
            if b.dims() != [n] {
                return Err(Error::invalid(format!(
                    "replace_head: bias {:?} must be [{n}]",
                    b.dims()
                )));
            }
            if n > 0 {
                new.bias
                    .slice_set(&b.to_dtype(DType::F32)?.contiguous()?, 0, 0)?;
                new.has_bias = b
                    .abs()?
                    .max_all()?
                    .to_dtype(DType::F32)?
                    .to_scalar::<f32>()?
                    != 0.0;
            }
        }
        new.len = n;
        if let Some(spec) = self.quant {
            new.quant = Some(QuantRows::new(spec, self.head_dim));
            new.quantize_all()?;
        }
        Ok(new)
    }

    /// Drops the newest `t` tokens from every head and rewinds `next_position` by `t` (how a
    /// scratch suffix, e.g. compaction's reference-query prompt, is discarded). Heads whose
    /// newest rows were not appended together (after compaction every head still ends with the
    /// same appended tokens) lose exactly those rows.
    pub fn truncate_last(&mut self, t: usize) -> Result<()> {
        if let Some(h) = self
            .layers
            .iter()
            .flat_map(|l| &l.heads)
            .find(|h| h.len < t)
        {
            return Err(Error::invalid(format!(
                "cannot drop {t} tokens from a head holding {}",
                h.len
            )));
        }
        if t > self.next_position {
            return Err(Error::invalid(format!(
                "cannot drop {t} tokens: only {} were appended",
                self.next_position
            )));
        }
        for l in 0..self.layers.len() {
            self.truncate_layer_last(l, t)?;
        }
        self.next_position -= t;
        Ok(())
    }

    /// Drops the newest `t` rows of every head of one layer, positions untouched (the
    /// layer-wise pass re-appends a suffix's keys in chunks after the compaction hook).
    pub fn truncate_layer_last(&mut self, layer: usize, t: usize) -> Result<()> {
        for head in &mut self.layers[layer].heads {
            head.truncate(t)?;
        }
        Ok(())
    }

    pub fn reset(&mut self) -> Result<()> {
        let quant = self.quant;
        *self = Self::new(
            self.n_layers(),
            self.n_kv_heads(),
            self.head_dim,
            self.dtype,
            &self.device,
        )?;
        self.set_quant(quant)
    }

    /// The cache's quantization (None: keys and values in the model dtype).
    pub fn quant(&self) -> Option<KvQuant> {
        self.quant
    }

    /// Switches the cache to `quant` (or back to full precision), converting what it holds:
    /// full groups are quantized, a quantized cache is dequantized. CPU only: the attention
    /// kernel that reads codes directly is a CPU kernel.
    pub fn set_quant(&mut self, quant: Option<KvQuant>) -> Result<()> {
        if quant.is_some() && !self.device.is_cpu() {
            return Err(Error::invalid(format!(
                "kv_dtype={:?} needs device=\"cpu\": the quantized-cache attention kernel is \
                 CPU-only for now",
                quant.map(|q| q.name()).unwrap_or_default()
            )));
        }
        if quant == self.quant {
            return Ok(());
        }
        self.quant = quant;
        for l in 0..self.layers.len() {
            let layer = &mut self.layers[l];
            layer.packed = None;
            layer.packable = quant.is_none() && packing_enabled() && self.next_position == 0;
            for h in 0..layer.heads.len() {
                let head = &self.layers[l].heads[h];
                let (k, v, b, has_bias) =
                    (head.keys()?, head.values()?, head.bias()?, head.has_bias);
                self.layers[l].heads[h] = self.new_head(&k, &v, has_bias.then_some(&b))?;
            }
        }
        Ok(())
    }

    /// Tokens kept per head, `[layer][kv_head]`.
    pub fn tokens_per_head(&self) -> Vec<Vec<usize>> {
        self.layers
            .iter()
            .map(|l| l.heads.iter().map(HeadCache::len).collect())
            .collect()
    }

    /// Bytes of K, V and bias in use (the sum over heads of their own lengths).
    pub fn bytes_used(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| &l.heads)
            .map(HeadCache::bytes_used)
            .sum()
    }

    /// Bytes allocated (capacity), including room reserved for growth.
    pub fn bytes_allocated(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| &l.heads)
            .map(HeadCache::bytes_allocated)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_geometrically_and_keeps_rows() -> Result<()> {
        let dev = Device::Cpu;
        let mut c = KvCache::new(1, 2, 4, DType::F32, &dev)?;
        let mut caps = Vec::new();
        for step in 0..200u32 {
            let k = Tensor::full(step as f32, (2, 1, 4), &dev)?;
            c.append(0, &k, &(&k * 2.0)?)?;
            c.advance(1);
            caps.push(c.head(0, 0).capacity());
        }
        caps.dedup();
        assert_eq!(caps, vec![64, 128, 256]);
        let keys = c.head(0, 1).keys()?.to_vec2::<f32>()?;
        assert_eq!(keys.len(), 200);
        assert!(keys
            .iter()
            .enumerate()
            .all(|(i, r)| r.iter().all(|&x| x == i as f32)));
        assert_eq!(c.next_position(), 200);
        assert_eq!(c.bytes_used(), 2 * 200 * (2 * 4 * 4 + 4));
        Ok(())
    }

    #[test]
    fn truncate_last_discards_a_suffix_and_rewinds_positions() -> Result<()> {
        let dev = Device::Cpu;
        let mut c = KvCache::new(2, 1, 4, DType::F32, &dev)?;
        for l in 0..2 {
            let k = Tensor::arange(0f32, 40., &dev)?.reshape((1, 10, 4))?;
            c.append(l, &k, &k)?;
        }
        c.advance(10);
        let b = Tensor::ones(10, DType::F32, &dev)?;
        let k0 = c.head(0, 0).keys()?;
        c.replace_head(0, 0, &k0, &k0, Some(&b))?;
        c.truncate_last(3)?;
        assert_eq!(c.next_position(), 7);
        assert_eq!(c.tokens_per_head(), vec![vec![7], vec![7]]);
        assert_eq!(
            c.head(1, 0).keys()?.to_vec2::<f32>()?[6],
            vec![24., 25., 26., 27.]
        );
        // A token appended after the truncation gets bias 0 in the biased head.
        let z = Tensor::zeros((1, 1, 4), DType::F32, &dev)?;
        c.append(0, &z, &z)?;
        assert_eq!(
            c.head(0, 0).bias()?.to_vec1::<f32>()?,
            [vec![1.0; 7], vec![0.0]].concat()
        );
        assert!(c.truncate_last(9).is_err());
        Ok(())
    }

    #[test]
    fn replace_head_gives_ragged_lengths_and_real_bytes() -> Result<()> {
        let dev = Device::Cpu;
        let mut c = KvCache::new(1, 2, 4, DType::F32, &dev)?;
        let k = Tensor::ones((2, 10, 4), DType::F32, &dev)?;
        c.append(0, &k, &k)?;
        c.advance(10);
        let before = c.bytes_used();
        let kk = Tensor::ones((3, 4), DType::F32, &dev)?;
        let b = Tensor::new(&[0.5f32, 0.0, -1.0], &dev)?;
        c.replace_head(0, 1, &kk, &kk, Some(&b))?;
        assert_eq!(c.tokens_per_head(), vec![vec![10, 3]]);
        assert!(c.head(0, 1).has_bias() && !c.head(0, 0).has_bias());
        assert_eq!(c.bytes_used(), before - 7 * (2 * 4 * 4 + 4));
        // Appending after compaction: bias 0 for the new key, position continues.
        c.append(
            0,
            &Tensor::zeros((2, 1, 4), DType::F32, &dev)?,
            &Tensor::zeros((2, 1, 4), DType::F32, &dev)?,
        )?;
        c.advance(1);
        assert_eq!(
            c.head(0, 1).bias()?.to_vec1::<f32>()?,
            vec![0.5, 0.0, -1.0, 0.0]
        );
        assert_eq!(c.next_position(), 11);
        Ok(())
    }

    /// Quantized heads: the rows read back are within a quantization step of what was written,
    /// the residual stays exact, truncation reaches into quantized groups, and the bytes count
    /// the codes.
    #[test]
    fn quantized_heads_keep_rows_truncate_and_count_bytes() -> Result<()> {
        let dev = Device::Cpu;
        let d = 32;
        let mut c = KvCache::new(1, 1, d, DType::F32, &dev)?;
        let full_bytes = |n: usize| n * (2 * d * 4 + 4);
        let x = Tensor::randn(0f32, 1.0, (1, 100, d), &dev)?;
        c.set_quant(Some(KvQuant::parse("int8")?))?;
        c.append(0, &x, &x)?;
        assert_eq!(c.head(0, 0).dense_len(), 100);
        c.settle(0)?;
        c.advance(100);
        let h = c.head(0, 0);
        assert_eq!((h.len(), h.dense_len()), (100, 4));
        let keys = h.keys()?;
        let err = (&keys - x.get(0)?)?.abs()?;
        // int8: a step is range/255; normal data spans < 10.
        assert!(err.narrow(0, 0, 96)?.max_all()?.to_scalar::<f32>()? < 0.03);
        assert_eq!(err.narrow(0, 96, 4)?.max_all()?.to_scalar::<f32>()?, 0.0);
        // 3 groups of codes (K and V: 32 B codes/token + f16 key scales/minima per channel per
        // group + f16 value scale/minimum per token), 4 exact rows, 100 biases.
        let codes = 96 * 2 * d + 3 * d * 4 + 96 * 4;
        assert_eq!(c.bytes_used(), codes + 4 * 2 * d * 4 + 100 * 4);
        assert!(c.bytes_used() * 3 < full_bytes(100));
        // Dropping 40 tokens cuts into the quantized groups; the rows kept read back the same.
        c.truncate_last(40)?;
        let h = c.head(0, 0);
        assert_eq!((h.len(), h.dense_len()), (60, 0));
        let k60 = h.keys()?;
        assert_eq!(
            k60.to_vec2::<f32>()?,
            keys.narrow(0, 0, 60)?.to_vec2::<f32>()?
        );
        // Back to full precision keeps the (dequantized) rows exactly.
        c.set_quant(None)?;
        assert!(c.head(0, 0).quantized().is_none());
        assert_eq!(
            c.head(0, 0).keys()?.to_vec2::<f32>()?,
            k60.to_vec2::<f32>()?
        );
        assert_eq!(c.bytes_used(), full_bytes(60));
        // A reset keeps the format.
        c.set_quant(Some(KvQuant::parse("int2")?))?;
        c.reset()?;
        assert_eq!(c.quant().map(|q| q.name()), Some("int2"));
        Ok(())
    }
}
