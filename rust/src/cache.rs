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
//! `next_position` is the RoPE position of the next appended token. It counts tokens *seen*,
//! not keys kept: after compaction new tokens continue from the original context length.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Smallest capacity allocated for a head, in tokens.
const MIN_CAPACITY: usize = 64;

#[derive(Debug, Clone)]
pub struct HeadCache {
    k: Tensor,
    v: Tensor,
    bias: Tensor,
    len: usize,
    /// Whether any live key has a non-zero bias (lets attention skip the bias add).
    has_bias: bool,
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
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.k.dim(0).unwrap_or(0)
    }

    pub fn has_bias(&self) -> bool {
        self.has_bias
    }

    /// Valid keys `[len, head_dim]` (a view, no copy).
    pub fn keys(&self) -> Result<Tensor> {
        Ok(self.k.narrow(0, 0, self.len)?)
    }

    pub fn values(&self) -> Result<Tensor> {
        Ok(self.v.narrow(0, 0, self.len)?)
    }

    /// Per-key logit bias `[len]` f32.
    pub fn bias(&self) -> Result<Tensor> {
        Ok(self.bias.narrow(0, 0, self.len)?)
    }

    /// Appends `k`, `v` (`[t, head_dim]`) with bias 0.
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let t = k.dim(0)?;
        if self.len + t > self.capacity() {
            self.grow(self.len + t)?;
        }
        self.k.slice_set(&k.contiguous()?, 0, self.len)?;
        self.v.slice_set(&v.contiguous()?, 0, self.len)?;
        // Rows past `len` are kept at bias 0 (see `grow` and `replace`), so nothing to write.
        self.len += t;
        Ok(())
    }

    fn grow(&mut self, needed: usize) -> Result<()> {
        let cap = needed.max(2 * self.capacity()).max(MIN_CAPACITY);
        let (dtype, device, d) = (self.k.dtype(), self.k.device().clone(), self.k.dim(1)?);
        let mut new = Self::with_capacity(cap, d, dtype, &device)?;
        if self.len > 0 {
            new.k.slice_set(&self.keys()?, 0, 0)?;
            new.v.slice_set(&self.values()?, 0, 0)?;
            new.bias.slice_set(&self.bias()?, 0, 0)?;
        }
        new.len = self.len;
        new.has_bias = self.has_bias;
        *self = new;
        Ok(())
    }

    fn bytes(&self, len: usize) -> usize {
        let d = self.k.dim(1).unwrap_or(0);
        len * (2 * d * self.k.dtype().size_in_bytes() + DType::F32.size_in_bytes())
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

    /// Appends the new keys/values of one layer: `k`, `v` are `[n_kv_heads, t, head_dim]`.
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
        let layer = &mut self.layers[layer];
        layer.heads[head] = new;
        // The other heads keep their views of the packed buffers, which only they write.
        layer.packed = None;
        layer.packable = false;
        Ok(())
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
            if head.len < t {
                return Err(Error::invalid(format!(
                    "cannot drop {t} tokens from a head holding {}",
                    head.len
                )));
            }
            head.len -= t;
            if head.has_bias && t > 0 {
                let zeros = Tensor::zeros(t, DType::F32, head.bias.device())?;
                head.bias.slice_set(&zeros, 0, head.len)?;
            }
        }
        Ok(())
    }

    pub fn reset(&mut self) -> Result<()> {
        *self = Self::new(
            self.n_layers(),
            self.n_kv_heads(),
            self.head_dim,
            self.dtype,
            &self.device,
        )?;
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
            .map(|h| h.bytes(h.len))
            .sum()
    }

    /// Bytes allocated (capacity), including room reserved for growth.
    pub fn bytes_allocated(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| &l.heads)
            .map(|h| h.bytes(h.capacity()))
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
}
