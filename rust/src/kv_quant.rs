//! Quantized KV rows, KIVI-style (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit
//! Quantization for KV Cache", ICML 2024): asymmetric integer codes with a scale and a minimum
//! per group, **keys per channel** (a group is `group` consecutive tokens; one scale/minimum per
//! channel, because key outliers sit in fixed channels) and **values per token** (one
//! scale/minimum per token and run of channels, because a value's error is weighted by its own
//! attention probability).
//!
//! A head's cache keeps its newest `< group` tokens in full precision (the residual, in
//! [`crate::cache::HeadCache`]) and moves every filled group here. Scales and minima are f16,
//! as in KIVI. Attention reads the codes directly ([`QuantRows::logits`],
//! [`QuantRows::accumulate_values`]): per key group the query is pre-multiplied by the group's
//! scales, so a logit is one dot product with the codes plus a per-group constant; values add
//! `p * scale * code` per token and fold the minima into one term per channel run.
//! f16 is widened with `to_f32_const` (plain bit arithmetic that inlines and vectorises):
//! `half`'s `to_f32` is an out-of-line call per value on x86.

use half::f16;

use crate::error::{Error, Result};
use crate::gemv::dot_generic;

/// The names `kv_dtype=` accepts.
pub const KV_DTYPES: [&str; 3] = ["int8", "int4", "int2"];

/// Tokens per key group and channels per value group (KIVI's default group size).
pub const DEFAULT_GROUP: usize = 32;

/// A quantization format for cached keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvQuant {
    pub bits: u32,
    /// Tokens per key group; also the largest run of channels per value group.
    pub group: usize,
}

impl KvQuant {
    /// `"int8"`, `"int4"` or `"int2"` with the default group size.
    pub fn parse(name: &str) -> Result<Self> {
        let bits = match name.to_ascii_lowercase().as_str() {
            "int8" => 8,
            "int4" => 4,
            "int2" => 2,
            _ => {
                return Err(Error::invalid(format!(
                    "unknown kv_dtype {name:?}; expected one of {} (or None for the model dtype)",
                    KV_DTYPES.join(", ")
                )))
            }
        };
        Ok(Self {
            bits,
            group: DEFAULT_GROUP,
        })
    }

    pub fn name(&self) -> &'static str {
        match self.bits {
            8 => "int8",
            4 => "int4",
            _ => "int2",
        }
    }

    fn levels(&self) -> f32 {
        ((1u32 << self.bits) - 1) as f32
    }

    fn row_bytes(&self, d: usize) -> usize {
        d.div_ceil(8 / self.bits as usize)
    }

    /// Channels per value group: the largest divisor of `d` not above `group`.
    fn value_group(&self, d: usize) -> usize {
        (1..=self.group.min(d))
            .rev()
            .find(|g| d % g == 0)
            .unwrap_or(1)
    }
}

/// The quantized older tokens of one head, as a run of key groups. Tokens appended one by one
/// fill groups of `group` tokens; a head written at once (compaction, conversion) ends with a
/// shorter last group, so no row of it stays in full precision.
#[derive(Debug, Clone)]
pub struct QuantRows {
    spec: KvQuant,
    d: usize,
    /// Channels per value group.
    vg: usize,
    /// Token index where each key group ends (cumulative; the last is the length).
    ends: Vec<usize>,
    /// `[len, row_bytes]` packed codes, token-major.
    k_codes: Vec<u8>,
    /// `[groups, d]`: per key group and channel.
    k_scale: Vec<f16>,
    k_min: Vec<f16>,
    v_codes: Vec<u8>,
    /// `[len, d / vg]`: per token and channel run.
    v_scale: Vec<f16>,
    v_min: Vec<f16>,
}

/// Scale and minimum of `xs` for `levels` steps, rounded to f16 (the values stored), and the
/// codes computed against those rounded values so decoding reproduces them.
#[inline]
fn scale_min(xs: impl Iterator<Item = f32> + Clone, levels: f32) -> (f16, f16) {
    let (lo, hi) = xs.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), x| {
        (lo.min(x), hi.max(x))
    });
    (f16::from_f32((hi - lo) / levels), f16::from_f32(lo))
}

#[inline]
fn code(x: f32, scale: f32, min: f32, levels: f32) -> u8 {
    if scale > 0.0 {
        ((x - min) / scale).round().clamp(0.0, levels) as u8
    } else {
        0
    }
}

impl QuantRows {
    pub fn new(spec: KvQuant, d: usize) -> Self {
        Self {
            spec,
            d,
            vg: spec.value_group(d),
            ends: Vec::new(),
            k_codes: Vec::new(),
            k_scale: Vec::new(),
            k_min: Vec::new(),
            v_codes: Vec::new(),
            v_scale: Vec::new(),
            v_min: Vec::new(),
        }
    }

    pub fn spec(&self) -> KvQuant {
        self.spec
    }

    pub fn len(&self) -> usize {
        self.ends.last().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Bytes of codes, scales and minima held.
    pub fn bytes(&self) -> usize {
        self.k_codes.len() + self.v_codes.len() + 4 * (self.k_scale.len() + self.v_scale.len())
    }

    /// Bytes reserved (vector capacities).
    pub fn bytes_reserved(&self) -> usize {
        self.k_codes.capacity()
            + self.v_codes.capacity()
            + 2 * (self.k_scale.capacity() + self.k_min.capacity())
            + 2 * (self.v_scale.capacity() + self.v_min.capacity())
    }

    /// Quantizes one group of `g >= 1` tokens: `k`, `v` are `[g, d]` f32, row-major.
    pub fn push_group(&mut self, k: &[f32], v: &[f32]) {
        let (d, vg) = (self.d, self.vg);
        let g = k.len() / d;
        assert!(
            g > 0 && k.len() == g * d && v.len() == g * d,
            "push_group: bad shapes"
        );
        let levels = self.spec.levels();
        let rb = self.spec.row_bytes(d);
        // Keys: one scale/minimum per channel over the group's tokens.
        let s0 = self.k_scale.len();
        for c in 0..d {
            let (s, m) = scale_min((0..g).map(|j| k[j * d + c]), levels);
            self.k_scale.push(s);
            self.k_min.push(m);
        }
        let mut row = vec![0u8; d];
        for j in 0..g {
            for (c, r) in row.iter_mut().enumerate() {
                let (s, m) = (
                    self.k_scale[s0 + c].to_f32_const(),
                    self.k_min[s0 + c].to_f32_const(),
                );
                *r = code(k[j * d + c], s, m, levels);
            }
            pack(&row, self.spec.bits, &mut self.k_codes, rb);
        }
        // Values: one scale/minimum per token and run of `vg` channels.
        for x in v.chunks_exact(d) {
            for (run, r) in x.chunks_exact(vg).zip(row.chunks_exact_mut(vg)) {
                let (s, m) = scale_min(run.iter().copied(), levels);
                self.v_scale.push(s);
                self.v_min.push(m);
                let (s, m) = (s.to_f32_const(), m.to_f32_const());
                for (ri, &xi) in r.iter_mut().zip(run) {
                    *ri = code(xi, s, m, levels);
                }
            }
            pack(&row, self.spec.bits, &mut self.v_codes, rb);
        }
        self.ends.push(self.len() + g);
    }

    /// Keeps the first `n` tokens. A group cut in two keeps its codes and scales, so the rows
    /// kept read back exactly as before.
    pub fn truncate(&mut self, n: usize) {
        if n >= self.len() {
            return;
        }
        let d = self.d;
        let groups = self.ends.partition_point(|&e| e < n) + usize::from(n > 0);
        self.ends.truncate(groups);
        if let Some(last) = self.ends.last_mut() {
            *last = n;
        }
        let rb = self.spec.row_bytes(d);
        self.k_codes.truncate(n * rb);
        self.v_codes.truncate(n * rb);
        self.k_scale.truncate(groups * d);
        self.k_min.truncate(groups * d);
        self.v_scale.truncate(n * (d / self.vg));
        self.v_min.truncate(n * (d / self.vg));
    }

    /// Dequantized keys `[len, d]` f32.
    pub fn keys(&self) -> Vec<f32> {
        let d = self.d;
        let mut out = vec![0f32; self.len() * d];
        let mut grp = 0;
        for (j, o) in out.chunks_exact_mut(d).enumerate() {
            if j >= self.ends[grp] {
                grp += 1;
            }
            self.unpack(&self.k_codes, j, o);
            let (s, m) = (&self.k_scale[grp * d..], &self.k_min[grp * d..]);
            for (c, x) in o.iter_mut().enumerate() {
                *x = *x * s[c].to_f32_const() + m[c].to_f32_const();
            }
        }
        out
    }

    /// Dequantized values `[len, d]` f32.
    pub fn values(&self) -> Vec<f32> {
        let (d, vg) = (self.d, self.vg);
        let mut out = vec![0f32; self.len() * d];
        for (j, o) in out.chunks_exact_mut(d).enumerate() {
            self.unpack(&self.v_codes, j, o);
            for (r, run) in o.chunks_exact_mut(vg).enumerate() {
                let i = j * (d / vg) + r;
                let (s, m) = (self.v_scale[i].to_f32_const(), self.v_min[i].to_f32_const());
                for x in run {
                    *x = *x * s + m;
                }
            }
        }
        out
    }

    /// Codes of token `j` as f32 into `out` (`d` long).
    #[inline(always)]
    fn unpack(&self, codes: &[u8], j: usize, out: &mut [f32]) {
        let bits = self.spec.bits;
        let rb = self.spec.row_bytes(self.d);
        let row = &codes[j * rb..(j + 1) * rb];
        // Planar layout (see `pack`): each plane is a plain shift-and-mask loop, which the
        // compiler vectorises.
        let mask = ((1u32 << bits) - 1) as u8;
        for (plane, o) in out.chunks_mut(rb).enumerate() {
            let shift = plane as u32 * bits;
            for (x, &b) in o.iter_mut().zip(row) {
                *x = ((b >> shift) & mask) as f32;
            }
        }
    }

    /// `out[j] = scale * q . key_j` for every quantized token (`out` is `len` long).
    #[inline(always)]
    pub fn logits(&self, q: &[f32], scale: f32, out: &mut [f32]) {
        let d = self.d;
        let (mut qs, mut codes) = (vec![0f32; d], vec![0f32; d]);
        let mut start = 0;
        for (grp, &end) in self.ends.iter().enumerate() {
            let o = &mut out[start..end];
            let s = &self.k_scale[grp * d..(grp + 1) * d];
            let m = &self.k_min[grp * d..(grp + 1) * d];
            // q . (s * code + m) = (q * s) . code + q . m
            let mut offset = 0f32;
            for c in 0..d {
                qs[c] = q[c] * s[c].to_f32_const() * scale;
                offset += q[c] * m[c].to_f32_const();
            }
            offset *= scale;
            for (i, x) in o.iter_mut().enumerate() {
                self.unpack(&self.k_codes, start + i, &mut codes);
                *x = dot_generic(&qs, &codes) + offset;
            }
            start = end;
        }
    }

    /// `out += sum_j p[j] * value_j` over the first `p.len()` quantized tokens.
    #[inline(always)]
    pub fn accumulate_values(&self, p: &[f32], out: &mut [f32]) {
        let (d, vg) = (self.d, self.vg);
        let runs = d / vg;
        let mut codes = vec![0f32; d];
        let mut offsets = vec![0f32; runs];
        for (j, &pj) in p.iter().enumerate() {
            if pj == 0.0 {
                continue;
            }
            self.unpack(&self.v_codes, j, &mut codes);
            for r in 0..runs {
                let i = j * runs + r;
                let a = pj * self.v_scale[i].to_f32_const();
                offsets[r] += pj * self.v_min[i].to_f32_const();
                for (o, &c) in out[r * vg..(r + 1) * vg]
                    .iter_mut()
                    .zip(&codes[r * vg..(r + 1) * vg])
                {
                    *o += a * c;
                }
            }
        }
        for (run, off) in out.chunks_exact_mut(vg).zip(offsets) {
            for o in run {
                *o += off;
            }
        }
    }
}

/// Appends one row of codes (each `< 2^bits`) in `rb` bytes, planar: channel `c` goes to byte
/// `c % rb` at bit `(c / rb) * bits`, so plane `p` holds channels `p*rb..(p+1)*rb` (as
/// llama.cpp's q4_0 splits a block into low and high nibbles).
fn pack(codes: &[u8], bits: u32, out: &mut Vec<u8>, rb: usize) {
    let start = out.len();
    out.resize(start + rb, 0);
    for (c, &code) in codes.iter().enumerate() {
        out[start + c % rb] |= code << ((c / rb) as u32 * bits);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        // Deterministic, uneven values with an outlier channel, like real keys.
        (0..n)
            .map(|i| {
                let x = ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32
                    / (1u32 << 24) as f32;
                (x - 0.5) * if i % 16 == 3 { 20.0 } else { 2.0 }
            })
            .collect()
    }

    #[test]
    fn round_trip_error_is_within_half_a_step() {
        let d = 24; // below the group size: one value run of 24 channels per token
        for name in KV_DTYPES {
            let spec = KvQuant::parse(name).unwrap();
            let mut q = QuantRows::new(spec, d);
            let (k, v) = (data(2 * 32 * d, 1), data(2 * 32 * d, 7));
            for i in 0..2 {
                let r = i * 32 * d..(i + 1) * 32 * d;
                q.push_group(&k[r.clone()], &v[r]);
            }
            assert_eq!(q.len(), 64);
            let (kd, vd) = (q.keys(), q.values());
            // Worst case: half a step of the widest group (range 20 over 2^bits - 1 steps),
            // plus f16 rounding of the scale and minimum.
            let step = 20.0 / spec.levels();
            let tol = 0.5 * step + 0.02;
            let err = |a: &[f32], b: &[f32]| {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max)
            };
            assert!(err(&k, &kd) <= tol, "{name} keys: {}", err(&k, &kd));
            assert!(err(&v, &vd) <= tol, "{name} values: {}", err(&v, &vd));
            // int8 must be far tighter than int2.
            if name == "int8" {
                assert!(err(&k, &kd) < 0.05);
            }
        }
    }

    #[test]
    fn fused_logits_and_values_equal_the_dequantized_ones() {
        let d = 64;
        for name in KV_DTYPES {
            let mut q = QuantRows::new(KvQuant::parse(name).unwrap(), d);
            let (k, v) = (data(3 * 32 * d, 3), data(3 * 32 * d, 5));
            for i in 0..3 {
                let r = i * 32 * d..(i + 1) * 32 * d;
                q.push_group(&k[r.clone()], &v[r]);
            }
            let (kd, vd) = (q.keys(), q.values());
            let query = data(d, 11);
            let mut got = vec![0f32; 96];
            q.logits(&query, 0.125, &mut got);
            for (j, g) in got.iter().enumerate() {
                let want: f32 = kd[j * d..(j + 1) * d]
                    .iter()
                    .zip(&query)
                    .map(|(a, b)| a * b)
                    .sum::<f32>()
                    * 0.125;
                assert!(
                    (g - want).abs() < 1e-3 * (1.0 + want.abs()),
                    "{name} logit {j}"
                );
            }
            let p = data(70, 13).iter().map(|x| x.abs()).collect::<Vec<_>>();
            let mut out = vec![0f32; d];
            q.accumulate_values(&p, &mut out);
            for c in 0..d {
                let want: f32 = (0..70).map(|j| p[j] * vd[j * d + c]).sum();
                assert!(
                    (out[c] - want).abs() < 1e-3 * (1.0 + want.abs()),
                    "{name} out {c}"
                );
            }
        }
    }

    #[test]
    fn truncate_keeps_the_first_rows_exactly() {
        let d = 8;
        let mut q = QuantRows::new(KvQuant::parse("int4").unwrap(), d);
        let (k, v) = (data(64 * d, 2), data(64 * d, 4));
        q.push_group(&k[..32 * d], &v[..32 * d]);
        let (bytes, first) = (q.bytes(), q.keys());
        q.push_group(&k[32 * d..], &v[32 * d..]);
        let (all_k, all_v) = (q.keys(), q.values());
        q.truncate(40); // cuts the second group
        assert_eq!(q.len(), 40);
        assert_eq!(q.keys(), all_k[..40 * d].to_vec());
        assert_eq!(q.values(), all_v[..40 * d].to_vec());
        q.truncate(32); // exactly the first group
        assert_eq!((q.len(), q.bytes(), q.keys()), (32, bytes, first));
        q.truncate(0);
        assert!(q.is_empty() && q.bytes() == 0);
        // Appending after a cut starts a new group.
        q.push_group(&k[..d], &v[..d]);
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn short_groups_round_trip_and_a_single_token_is_exact_in_keys() {
        let d = 16;
        let mut q = QuantRows::new(KvQuant::parse("int2").unwrap(), d);
        let (k, v) = (data(45 * d, 8), data(45 * d, 9));
        q.push_group(&k[..32 * d], &v[..32 * d]);
        q.push_group(&k[32 * d..44 * d], &v[32 * d..44 * d]);
        q.push_group(&k[44 * d..], &v[44 * d..]);
        assert_eq!(q.len(), 45);
        let kd = q.keys();
        // A one-token key group has range 0 per channel: stored exactly (up to f16).
        for c in 0..d {
            let x = k[44 * d + c];
            assert!((kd[44 * d + c] - x).abs() <= 1e-3 * x.abs().max(1.0));
        }
        let query = data(d, 1);
        let mut got = vec![0f32; 45];
        q.logits(&query, 1.0, &mut got);
        for j in 0..45 {
            let want: f32 = (0..d).map(|c| kd[j * d + c] * query[c]).sum();
            assert!((got[j] - want).abs() < 1e-3 * (1.0 + want.abs()));
        }
        q.truncate(40);
        assert_eq!(q.keys(), kd[..40 * d].to_vec());
    }

    #[test]
    fn bytes_per_token_shrink_with_bits() {
        let d = 128;
        let per_token = |name: &str| {
            let mut q = QuantRows::new(KvQuant::parse(name).unwrap(), d);
            let x = data(32 * d, 1);
            q.push_group(&x, &x);
            q.bytes() as f64 / 32.0
        };
        // Codes d*bits/8 for K and V, f16 key scale+min per channel per 32 tokens, f16
        // value scale+min per 32 channels: int8 288, int4 160, int2 96 (bf16: 512).
        assert_eq!(per_token("int8"), 256.0 + 16.0 + 16.0);
        assert_eq!(per_token("int4"), 128.0 + 32.0);
        assert_eq!(per_token("int2"), 64.0 + 32.0);
        assert!(KvQuant::parse("int3").is_err());
    }
}
