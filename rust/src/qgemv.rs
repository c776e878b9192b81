//! CPU kernel for `y = x W^T` with `W` in a GGUF block format (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
//! and the k-quants Q4_K and Q6_K), for decode and prefill alike.
//!
//! As llama.cpp does, `x` is quantized once per call to 8-bit blocks of 32 (one scale each), so
//! a weight block's contribution is an integer dot product of 32 codes (AVX2 `maddubs`) times
//! two scales. Profiled before writing it: candle 0.11's Q4_1 kernel is scalar and took 72% of
//! SmolLM2 decode time, plus 7% spinning its own thread pool beside rayon's. Weight rows are split
//! across rayon threads; each row's blocks stay in L1 while every row of `x` reads them (the
//! quantized `x`, a quarter of its f32 size, stays in L2), so the weights stream once per call.
//! The k-quants' 256-weight superblocks are read as eight sub-blocks of 32, each with its own
//! scale (Q4_K: 6-bit scale and minimum; Q6_K: two 8-bit scales, one per half), so they run
//! through the same 32-wide integer products against the same quantized `x`.
//! Off x86-64 or without AVX2 the caller keeps candle's kernels (`None`).

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::error::Result;
#[cfg(target_arch = "x86_64")]
use crate::gemv::hsum;
use crate::gemv::{simd, untranspose};

/// Weights per block in every format served here (a k-quant sub-block).
const QK: usize = 32;
/// Weights per k-quant superblock.
const QK_K: usize = 256;
/// Rows of `x` from which k-quant products go back to candle (prefill; see `matmul_xwt`).
const K_QUANT_MAX_ROWS: usize = 8;
/// Output rows per parallel task.
const ROWS_PER_TASK: usize = 32;

/// One block of `x`: codes `q`, scale `d`, and `d * sum(q)` (for the formats with an offset).
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct XBlock {
    q: [i8; QK],
    d: f32,
    ds: f32,
}

/// The rows of `x` quantized: `blocks [m][kb]`, and, for eight rows or more (the prefill
/// tile, which reads eight rows' scales with one load), their scales and `d * sum(q)` again as
/// `[kb][m]`. Decode builds no copies.
struct XRows {
    blocks: Vec<XBlock>,
    d: Vec<f32>,
    ds: Vec<f32>,
    kb: usize,
    m: usize,
}

impl XRows {
    fn new(x: &[f32], m: usize, k: usize) -> Self {
        let kb = k / QK;
        let blocks: Vec<XBlock> = x.chunks_exact(QK).map(quantize_block).collect();
        let by_block = |f: fn(&XBlock) -> f32| -> Vec<f32> {
            (0..kb)
                .flat_map(|b| (0..m).map(move |i| i * kb + b))
                .map(|j| f(&blocks[j]))
                .collect()
        };
        let (d, ds) = match m >= 8 {
            true => (by_block(|b| b.d), by_block(|b| b.ds)),
            false => (Vec::new(), Vec::new()),
        };
        Self {
            blocks,
            d,
            ds,
            kb,
            m,
        }
    }

    fn row(&self, i: usize) -> &[XBlock] {
        &self.blocks[i * self.kb..(i + 1) * self.kb]
    }
}

/// The formats served; each discriminant is also the const-generic tag of its kernel.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Format {
    Q4_0 = F_Q4_0,
    Q4_1 = F_Q4_1,
    Q8_0 = F_Q8_0,
    Q5_0 = F_Q5_0,
    Q5_1 = F_Q5_1,
    Q4K = F_Q4K,
    Q6K = F_Q6K,
}

/// Format tags for the const-generic kernels (one instantiation per format, no branch per block).
const F_Q4_0: u8 = 0;
const F_Q4_1: u8 = 1;
const F_Q8_0: u8 = 2;
const F_Q5_0: u8 = 3;
const F_Q5_1: u8 = 4;
const F_Q4K: u8 = 5;
const F_Q6K: u8 = 6;
/// Bytes per block of 32 weights, by tag (ggml's layout: f16 scale, [f16 minimum], [the 32
/// fifth bits], codes); for the k-quants, per superblock of 256 (Q4_K: f16 scale and minimum,
/// 12 bytes of packed 6-bit sub-block scales and minima, 128 of codes; Q6_K: 128 bytes of low
/// nibbles, 64 of high bit pairs, 16 i8 scales, f16 scale).
const BLOCK_BYTES: [usize; 7] = [18, 20, 34, 22, 24, 144, 210];

/// Whether tag `F` is a k-quant (superblocks of 256).
const fn is_k(f: u8) -> bool {
    f == F_Q4K || f == F_Q6K
}

/// Byte offset of 32-weight block `b` in a row of format `F` (k-quants: of its superblock).
#[inline(always)]
const fn block_at<const F: u8>(b: usize) -> usize {
    match is_k(F) {
        true => b / 8 * BLOCK_BYTES[F as usize],
        false => b * BLOCK_BYTES[F as usize],
    }
}

/// Q4_K's 6-bit scale and minimum of sub-block `j` from the 12 packed bytes `q` (ggml's
/// `get_scale_min_k4`).
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    match j < 4 {
        true => (q[j] & 63, q[j + 4] & 63),
        false => (
            (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        ),
    }
}

/// Q6_K sub-block `j` of a superblock: where its low nibbles start, which nibble, the shift of
/// its bit pairs in `qh`, and where its two scales are.
#[inline(always)]
fn q6k_layout(j: usize) -> (usize, bool, u32, usize) {
    let (half, k) = (j / 4, j % 4);
    (
        half * 64 + (k & 1) * 32,
        k >= 2,
        2 * k as u32,
        192 + half * 8 + 2 * k,
    )
}

impl Format {
    fn of(d: GgmlDType) -> Option<Self> {
        match d {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            GgmlDType::Q5_0 => Some(Self::Q5_0),
            GgmlDType::Q5_1 => Some(Self::Q5_1),
            GgmlDType::Q4K => Some(Self::Q4K),
            GgmlDType::Q6K => Some(Self::Q6K),
            _ => None,
        }
    }

    /// Bytes of a row of `k` weights.
    fn row_bytes(self, k: usize) -> usize {
        match is_k(self as u8) {
            true => k / QK_K * BLOCK_BYTES[self as usize],
            false => k / QK * BLOCK_BYTES[self as usize],
        }
    }
}

/// Whether the kernel is on (`KVFAST_QGEMV=0` leaves every product to candle, to compare).
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("KVFAST_QGEMV").map_or(true, |v| v != "0"))
}

/// `x [m, k]` (CPU) times the row blocks `parts` (each `[n_i, k]`, stacked along
/// the output) transposed: `[m, sum n_i]` f32. `None` when a part is not a quantized tensor in a
/// format served here, or the device or the CPU is not.
pub fn matmul_xwt(x: &Tensor, parts: &[QMatMul]) -> Result<Option<Tensor>> {
    product(x, parts, K_QUANT_MAX_ROWS)
}

/// [`matmul_xwt`], serving k-quants only below `k_rows` rows of `x`.
fn product(x: &Tensor, parts: &[QMatMul], k_rows: usize) -> Result<Option<Tensor>> {
    let (m, k) = x.dims2()?;
    if !x.device().is_cpu() || k % QK != 0 || !simd() || !enabled() {
        return Ok(None);
    }
    let mut mats = Vec::with_capacity(parts.len());
    for p in parts {
        let QMatMul::QTensor(p) = p else {
            return Ok(None);
        };
        let (Some(fmt), Ok((n, kk))) = (Format::of(p.dtype()), p.shape().dims2()) else {
            return Ok(None);
        };
        // k-quants in prefill stay on candle's kernel: ours read them 18% slower there
        // (SmolLM2 Q4_K_M, 512-token prefill: 275-284 against 335-345 tok/s), while in
        // decode ours is 22% faster (53.2 -> 64.9 tok/s).
        let k_quant = is_k(fmt as u8);
        if kk != k || (k_quant && (k % QK_K != 0 || m >= k_rows)) {
            return Ok(None);
        }
        mats.push((fmt, n, p.data()?));
    }
    let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let xr = XRows::new(&xs, m, k);
    let n_total: usize = mats.iter().map(|(_, n, _)| n).sum();
    // Transposed output [n_total, m]: each task owns a contiguous run of weight rows.
    let mut t = vec![0f32; n_total * m];
    let mut offset = 0;
    for (fmt, n, data) in &mats {
        let row_bytes = fmt.row_bytes(k);
        let out = &mut t[offset * m..(offset + n) * m];
        out.par_chunks_mut(ROWS_PER_TASK * m)
            .enumerate()
            .for_each(|(task, chunk)| {
                let r0 = task * ROWS_PER_TASK;
                let rows = chunk.len() / m;
                let w = &data[r0 * row_bytes..(r0 + rows) * row_bytes];
                // SAFETY: `simd()` checked AVX2/FMA/F16C; `w` holds `rows` rows of `kb`
                // blocks and `xr` `kb` blocks per row of `x`.
                unsafe { rows_avx2(*fmt, w, &xr, chunk) };
            });
        offset += n;
    }
    let out = untranspose(t, m, n_total);
    Ok(Some(Tensor::from_vec(out, (m, n_total), x.device())?))
}

fn quantize_block(x: &[f32]) -> XBlock {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0i8; QK];
    let mut sum = 0i32;
    for (qi, &v) in q.iter_mut().zip(x) {
        // Round to nearest (ties to even, as llama.cpp's AVX path) by adding 1.5 * 2^23:
        // |v * inv| <= 127, and it inlines where `round` is a libm call per value.
        const MAGIC: f32 = 12_582_912.0;
        *qi = ((v * inv + MAGIC) - MAGIC) as i8;
        sum += *qi as i32;
    }
    XBlock {
        q,
        d,
        ds: d * sum as f32,
    }
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Scalar reference of one row's dot product (the tests check the AVX2 kernel against it).
#[cfg_attr(all(target_arch = "x86_64", not(test)), allow(dead_code))]
fn dot_scalar(fmt: Format, w: &[u8], xb: &[XBlock]) -> f32 {
    if let Format::Q4K | Format::Q6K = fmt {
        return dot_scalar_k(fmt, w, xb);
    }
    let bb = BLOCK_BYTES[fmt as usize];
    let mut acc = 0f32;
    for (blk, x) in w.chunks_exact(bb).zip(xb) {
        let d = f16_at(blk, 0);
        match fmt {
            Format::Q8_0 => {
                let s: i32 = (0..QK)
                    .map(|i| blk[2 + i] as i8 as i32 * x.q[i] as i32)
                    .sum();
                acc += d * x.d * s as f32;
            }
            Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q5_1 => {
                let (qs, qh) = match fmt {
                    Format::Q4_0 => (&blk[2..], 0),
                    Format::Q4_1 => (&blk[4..], 0),
                    Format::Q5_0 => (
                        &blk[6..],
                        u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]),
                    ),
                    _ => (
                        &blk[8..],
                        u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]]),
                    ),
                };
                // Byte j holds weight j (low nibble) and weight j + 16 (high nibble); bit i of
                // `qh` is weight i's fifth bit.
                let code = |i: usize, nib: u8| (nib as i32) | ((((qh >> i) & 1) as i32) << 4);
                let s: i32 = (0..QK / 2)
                    .map(|j| {
                        code(j, qs[j] & 0xf) * x.q[j] as i32
                            + code(j + QK / 2, qs[j] >> 4) * x.q[j + QK / 2] as i32
                    })
                    .sum();
                acc += d * x.d * s as f32;
                acc += match fmt {
                    Format::Q4_0 => -8.0 * d * x.ds,
                    Format::Q5_0 => -16.0 * d * x.ds,
                    _ => f16_at(blk, 2) * x.ds,
                };
            }
            Format::Q4K | Format::Q6K => unreachable!("dot_scalar_k"),
        }
    }
    acc
}

/// [`dot_scalar`] for the k-quants, straight from ggml's dequantization formulas.
#[cfg_attr(all(target_arch = "x86_64", not(test)), allow(dead_code))]
fn dot_scalar_k(fmt: Format, w: &[u8], xb: &[XBlock]) -> f32 {
    let sb = BLOCK_BYTES[fmt as usize];
    let mut acc = 0f32;
    for (b, x) in xb.iter().enumerate() {
        let (blk, j) = (&w[b / 8 * sb..(b / 8 + 1) * sb], b % 8);
        match fmt {
            Format::Q4K => {
                let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                let (sc, mn) = scale_min_k4(j, &blk[4..16]);
                let qs = &blk[16 + j / 2 * 32..16 + j / 2 * 32 + 32];
                let s: i32 = (0..QK)
                    .map(|l| ((qs[l] >> (4 * (j % 2))) & 0xf) as i32 * x.q[l] as i32)
                    .sum();
                acc += d * sc as f32 * x.d * s as f32 - dmin * mn as f32 * x.ds;
            }
            _ => {
                let (ql, high, shift, sc) = q6k_layout(j);
                let d = f16_at(blk, 208);
                for l in 0..QK {
                    let lo = (blk[ql + l] >> (4 * high as u32)) & 0xf;
                    let hi = (blk[128 + (j / 4) * 32 + l] >> shift) & 3;
                    let q = (lo | (hi << 4)) as i32 - 32;
                    let scale = blk[sc + l / 16] as i8 as f32;
                    acc += d * scale * x.d * (q * x.q[l] as i32) as f32;
                }
            }
        }
    }
    acc
}

/// The f16 at `p` (unaligned) as f32.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "f16c")]
unsafe fn f16_load(p: *const u8) -> f32 {
    use std::arch::x86_64::*;
    let h = std::ptr::read_unaligned(p as *const u16);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
}

/// `out[r * m + i] = x_i . w_r` for the weight rows `w` (`kb` blocks each) and the `m` rows of
/// `x` (`xb`: `kb` blocks per row).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_avx2(fmt: Format, w: &[u8], x: &XRows, out: &mut [f32]) {
    match fmt {
        Format::Q4_0 => rows_avx2_f::<F_Q4_0>(w, x, out),
        Format::Q4_1 => rows_avx2_f::<F_Q4_1>(w, x, out),
        Format::Q8_0 => rows_avx2_f::<F_Q8_0>(w, x, out),
        Format::Q5_0 => rows_avx2_f::<F_Q5_0>(w, x, out),
        Format::Q5_1 => rows_avx2_f::<F_Q5_1>(w, x, out),
        Format::Q4K => rows_avx2_f::<F_Q4K>(w, x, out),
        Format::Q6K => rows_avx2_f::<F_Q6K>(w, x, out),
    }
}

/// Tiles: four weight rows per pass for fewer than four rows of `x` (decode: four independent
/// streams keep loads in flight, where one row at a time stalled on each block); otherwise
/// (prefill) eight rows of `x` per pass (each weight block unpacked once for the eight, whose
/// sums land in one vector), then four, then one.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_avx2_f<const F: u8>(w: &[u8], x: &XRows, out: &mut [f32]) {
    let m = x.m;
    let rows = out.len() / m;
    let rb = w.len() / rows;
    let wrow = |r: usize| &w[r * rb..(r + 1) * rb];
    let mut r = 0;
    if m < 4 {
        while r + 4 <= rows {
            for i in 0..m {
                let d = dots_w4::<F>(std::array::from_fn(|j| wrow(r + j)), x.row(i));
                for (j, dj) in d.iter().enumerate() {
                    out[(r + j) * m + i] = *dj;
                }
            }
            r += 4;
        }
    }
    for r in r..rows {
        let o = &mut out[r * m..(r + 1) * m];
        let mut i = 0;
        while i + 8 <= m {
            let d = dots_x8::<F>(wrow(r), x, i);
            std::arch::x86_64::_mm256_storeu_ps(o.as_mut_ptr().add(i), d);
            i += 8;
        }
        tail_x4::<F>(wrow(r), x, i, o);
    }
}

/// Rows `i..m` of `x` against one weight row `w` into `o[i..m]`: four at a time, then one.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tail_x4<const F: u8>(w: &[u8], x: &XRows, mut i: usize, o: &mut [f32]) {
    while i + 4 <= x.m {
        let d = dots_x4::<F>(w, std::array::from_fn(|j| x.row(i + j)));
        o[i..i + 4].copy_from_slice(&d);
        i += 4;
    }
    for (j, y) in o.iter_mut().enumerate().take(x.m).skip(i) {
        *y = dot_1::<F>(w, x.row(j));
    }
}

/// How far ahead of the block being read the decode kernel prefetches, in bytes. Measured on
/// SmolLM2 Q4_1 decode (2 threads): none 66, 384 B 70, 1 KiB 75, 4 KiB 92, 16 KiB 92 tok/s.
const PREFETCH_AHEAD: usize = 4096;

/// Whether format `F`'s codes are signed (their signs go onto `x` for `maddubs`).
const fn signed_codes(f: u8) -> bool {
    f == F_Q8_0 || f == F_Q6K
}

/// A weight block unpacked for `maddubs`: unsigned codes (Q8_0, Q6_K: magnitudes), the signed
/// codes whose signs go onto `x` (Q8_0, Q6_K), the scale `d`, the per-code shift (Q4_0: -8 d,
/// Q4_1: the block minimum, Q4_K: minus the sub-block minimum, Q8_0 and Q6_K: 0) that
/// multiplies `x.ds`, and (Q6_K) the integer scale of each of the eight products' lanes (the
/// two halves of the block have their own).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct WBlock {
    u: std::arch::x86_64::__m256i,
    signed: std::arch::x86_64::__m256i,
    d: f32,
    shift: f32,
    lanes: std::arch::x86_64::__m256i,
}

/// Block `b` of the weight row at `row`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack<const F: u8>(row: *const u8, b: usize) -> WBlock {
    use std::arch::x86_64::*;
    let blk = row.add(block_at::<F>(b));
    if F == F_Q4K {
        let j = b % 8;
        let (d, dmin) = (f16_load(blk), f16_load(blk.add(2)));
        let (sc, mn) = scale_min_k4(j, std::slice::from_raw_parts(blk.add(4), 12));
        let qs = _mm256_loadu_si256(blk.add(16 + j / 2 * 32) as *const __m256i);
        let qs = match j % 2 {
            0 => qs,
            _ => _mm256_srli_epi16::<4>(qs),
        };
        let u = _mm256_and_si256(qs, _mm256_set1_epi8(0xf));
        return WBlock {
            u,
            signed: u,
            d: d * sc as f32,
            shift: -dmin * mn as f32,
            lanes: _mm256_setzero_si256(),
        };
    }
    if F == F_Q6K {
        let j = b % 8;
        let (ql, high, shift, sc) = q6k_layout(j);
        let lo = _mm256_loadu_si256(blk.add(ql) as *const __m256i);
        let lo = match high {
            false => lo,
            true => _mm256_srli_epi16::<4>(lo),
        };
        let lo = _mm256_and_si256(lo, _mm256_set1_epi8(0xf));
        let qh = _mm256_loadu_si256(blk.add(128 + j / 4 * 32) as *const __m256i);
        let hi = _mm256_and_si256(
            _mm256_srl_epi16(qh, _mm_cvtsi32_si128(shift as i32)),
            _mm256_set1_epi8(3),
        );
        let q = _mm256_sub_epi8(
            _mm256_or_si256(lo, _mm256_slli_epi16::<4>(hi)),
            _mm256_set1_epi8(32),
        );
        let (s0, s1) = (*blk.add(sc) as i8 as i32, *blk.add(sc + 1) as i8 as i32);
        return WBlock {
            u: _mm256_sign_epi8(q, q),
            signed: q,
            d: f16_load(blk.add(208)),
            shift: 0.0,
            lanes: _mm256_setr_epi32(s0, s0, s0, s0, s1, s1, s1, s1),
        };
    }
    let d = f16_load(blk);
    if F == F_Q8_0 {
        let wq = _mm256_loadu_si256(blk.add(2) as *const __m256i);
        return WBlock {
            u: _mm256_sign_epi8(wq, wq),
            signed: wq,
            d,
            shift: 0.0,
            lanes: _mm256_setzero_si256(),
        };
    }
    let low4 = _mm_set1_epi8(0xf);
    let codes_at = match F {
        F_Q4_0 => 2,
        F_Q4_1 => 4,
        F_Q5_0 => 6,
        _ => 8,
    };
    let qs = _mm_loadu_si128(blk.add(codes_at) as _);
    let lo = _mm_and_si128(qs, low4);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(qs), low4);
    let mut u = _mm256_set_m128i(hi, lo);
    if F == F_Q5_0 || F == F_Q5_1 {
        // Byte i of `u` is weight i: add 16 where bit i of the block's fifth bits is set.
        let qh = std::ptr::read_unaligned(blk.add(codes_at - 4) as *const u32);
        u = _mm256_or_si256(
            u,
            _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10)),
        );
    }
    let shift = match F {
        F_Q4_0 => -8.0 * d,
        F_Q5_0 => -16.0 * d,
        _ => f16_load(blk.add(2)),
    };
    WBlock {
        u,
        signed: u,
        d,
        shift,
        lanes: _mm256_setzero_si256(),
    }
}

/// 0xff in byte i where bit i of `bits` is set, 0 elsewhere.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bits_to_bytes(bits: u32) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // Byte i takes byte i / 8 of `bits`, then is all ones iff its own bit (i % 8) is set.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_setr_epi64x(
            0,
            0x0101010101010101,
            0x0202020202020202,
            0x0303030303030303,
        ),
    );
    let others = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
    _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1))
}

/// The 8 integer partial sums of `code_w * code_x` over one block (lane i: codes 4i..4i+4),
/// each times its lane's scale for Q6_K.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn int_products<const F: u8>(
    w: &WBlock,
    xq: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // maddubs multiplies unsigned by signed: for signed codes move w's sign onto x.
    let xq = match signed_codes(F) {
        true => _mm256_sign_epi8(xq, w.signed),
        false => xq,
    };
    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(w.u, xq), _mm256_set1_epi16(1));
    match F == F_Q6K {
        true => _mm256_mullo_epi32(p, w.lanes),
        false => p,
    }
}

/// The 8 partial sums of `code_w * code_x` over one block, as f32.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn products<const F: u8>(w: &WBlock, x: &XBlock) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let xq = _mm256_load_si256(x.q.as_ptr() as *const __m256i);
    _mm256_cvtepi32_ps(int_products::<F>(w, xq))
}

/// `acc += d_w d_x * products`, `off += shift * x.ds`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn accumulate<const F: u8>(
    w: &WBlock,
    x: &XBlock,
    acc: &mut std::arch::x86_64::__m256,
    off: &mut f32,
) {
    use std::arch::x86_64::*;
    *acc = _mm256_fmadd_ps(_mm256_set1_ps(w.d * x.d), products::<F>(w, x), *acc);
    *off += w.shift * x.ds;
}

/// Four weight rows against one row of `x` (decode). Unrolled by hand with named accumulators:
/// written as loops over arrays, LLVM kept the accumulators on the stack.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots_w4<const F: u8>(w: [&[u8]; 4], x: &[XBlock]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let (p0, p1, p2, p3) = (w[0].as_ptr(), w[1].as_ptr(), w[2].as_ptr(), w[3].as_ptr());
    let [mut a0, mut a1, mut a2, mut a3] = [_mm256_setzero_ps(); 4];
    let [mut o0, mut o1, mut o2, mut o3] = [0f32; 4];
    for (b, xb) in x.iter().enumerate() {
        let off = block_at::<F>(b);
        // Loads stalled on each new block (profile): ask for the lines well ahead in all four
        // streams (rows are contiguous, so this runs into the next rows; a prefetch past the
        // matrix never faults).
        for p in [p0, p1, p2, p3] {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off + PREFETCH_AHEAD) as *const i8);
        }
        accumulate::<F>(&unpack::<F>(p0, b), xb, &mut a0, &mut o0);
        accumulate::<F>(&unpack::<F>(p1, b), xb, &mut a1, &mut o1);
        accumulate::<F>(&unpack::<F>(p2, b), xb, &mut a2, &mut o2);
        accumulate::<F>(&unpack::<F>(p3, b), xb, &mut a3, &mut o3);
    }
    [hsum(a0) + o0, hsum(a1) + o1, hsum(a2) + o2, hsum(a3) + o3]
}

/// One weight row against rows `i0..i0 + 8` of `x` (prefill). Per block, the eight integer
/// dot products are reduced across lanes into one vector (lane j: row i0 + j), so the scales
/// and offsets apply as vectors: no scalar work per (block, row) pair, which was half of the
/// four-row tile's instructions. (Two weight rows per tile, sharing the loads of `x`, and
/// AVX-512 VNNI's `dpbusd` both measured no faster.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots_x8<const F: u8>(w: &[u8], x: &XRows, i0: usize) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let (kb, m) = (x.kb, x.m);
    let p = w.as_ptr();
    let rows: [*const XBlock; 8] = std::array::from_fn(|j| x.blocks.as_ptr().add((i0 + j) * kb));
    let (mut acc, mut off) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for b in 0..kb {
        let wb = unpack::<F>(p, b);
        let dot = |j: usize| {
            let xq = _mm256_load_si256((*rows[j].add(b)).q.as_ptr() as *const __m256i);
            int_products::<F>(&wb, xq)
        };
        // hadd twice: lanes [r0, r1, r2, r3 | r0, r1, r2, r3] partial sums of four rows.
        let q0 = _mm256_hadd_epi32(
            _mm256_hadd_epi32(dot(0), dot(1)),
            _mm256_hadd_epi32(dot(2), dot(3)),
        );
        let q1 = _mm256_hadd_epi32(
            _mm256_hadd_epi32(dot(4), dot(5)),
            _mm256_hadd_epi32(dot(6), dot(7)),
        );
        let sums = _mm256_add_epi32(
            _mm256_permute2x128_si256::<0x20>(q0, q1),
            _mm256_permute2x128_si256::<0x31>(q0, q1),
        );
        let at = b * m + i0;
        let scale = _mm256_mul_ps(_mm256_set1_ps(wb.d), _mm256_loadu_ps(x.d.as_ptr().add(at)));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc);
        off = _mm256_fmadd_ps(
            _mm256_set1_ps(wb.shift),
            _mm256_loadu_ps(x.ds.as_ptr().add(at)),
            off,
        );
    }
    _mm256_add_ps(acc, off)
}

/// One weight row against four rows of `x` (prefill): each weight block is unpacked once.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // `b` indexes the weight row and the four rows of x
unsafe fn dots_x4<const F: u8>(w: &[u8], x: [&[XBlock]; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let p = w.as_ptr();
    let [mut a0, mut a1, mut a2, mut a3] = [_mm256_setzero_ps(); 4];
    let [mut o0, mut o1, mut o2, mut o3] = [0f32; 4];
    for b in 0..x[0].len() {
        let wb = unpack::<F>(p, b);
        accumulate::<F>(&wb, &x[0][b], &mut a0, &mut o0);
        accumulate::<F>(&wb, &x[1][b], &mut a1, &mut o1);
        accumulate::<F>(&wb, &x[2][b], &mut a2, &mut o2);
        accumulate::<F>(&wb, &x[3][b], &mut a3, &mut o3);
    }
    [hsum(a0) + o0, hsum(a1) + o1, hsum(a2) + o2, hsum(a3) + o3]
}

/// One weight row against one row of `x` (the leftovers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_1<const F: u8>(w: &[u8], x: &[XBlock]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm256_setzero_ps();
    let mut off = 0f32;
    for (b, xb) in x.iter().enumerate() {
        accumulate::<F>(&unpack::<F>(w.as_ptr(), b), xb, &mut acc, &mut off);
    }
    hsum(acc) + off
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn rows_avx2(fmt: Format, w: &[u8], x: &XRows, out: &mut [f32]) {
    let rb = w.len() / (out.len() / x.m);
    for (r, ys) in out.chunks_exact_mut(x.m).enumerate() {
        for (i, y) in ys.iter_mut().enumerate() {
            *y = dot_scalar(fmt, &w[r * rb..(r + 1) * rb], x.row(i));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::Device;
    use std::sync::Arc;

    /// Against candle's own quantized matmul (dequantize-exact up to the 8-bit rounding of x)
    /// and against the scalar reference (exact up to float summation order).
    #[test]
    fn matches_candle_and_the_scalar_reference() -> Result<()> {
        if !simd() {
            panic!("this test needs an x86-64 CPU with AVX2/FMA/F16C (the kernel's target)");
        }
        let dev = Device::Cpu;
        for dt in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            // k-quants need rows of whole 256-weight superblocks.
            let k_quant = matches!(dt, GgmlDType::Q4K | GgmlDType::Q6K);
            for (m, n, k) in [
                (1usize, 70usize, 64usize),
                (6, 33, 576),
                (13, 9, 576),
                (40, 128, 256),
                (3, 21, 1536),
                (6, 10, 512),
            ] {
                if k_quant && k % QK_K != 0 {
                    continue;
                }
                let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
                let q = Arc::new(QTensor::quantize(&w, dt)?);
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
                let part = QMatMul::QTensor(q.clone());
                // The kernel on every shape (k-quants included, whose prefill is routed to
                // candle by `matmul_xwt`).
                let got = product(&x, &[part.clone(), part.clone()], usize::MAX)?.expect("served");
                let routed = matmul_xwt(&x, &[part])?;
                assert_eq!(
                    routed.is_none(),
                    k_quant && m >= K_QUANT_MAX_ROWS,
                    "{dt:?} m={m}"
                );
                assert_eq!(got.dims(), [m, 2 * n]);
                let want = x.matmul(&q.dequantize(&dev)?.t()?)?;
                let want = Tensor::cat(&[&want, &want], 1)?;
                let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
                let err = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                // x is rounded to 8 bits (relative step 1/254 per block).
                assert!(err < 0.02 * scale, "{dt:?} {m}x{n}x{k}: {err} vs {scale}");
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                let xb: Vec<XBlock> = xs.chunks_exact(QK).map(quantize_block).collect();
                let data = q.data()?;
                let fmt = Format::of(dt).unwrap();
                let rb = fmt.row_bytes(k);
                let got = got.to_vec2::<f32>()?;
                for i in 0..m {
                    for r in 0..n {
                        let s = dot_scalar(
                            fmt,
                            &data[r * rb..(r + 1) * rb],
                            &xb[i * k / QK..(i + 1) * k / QK],
                        );
                        assert!(
                            (got[i][r] - s).abs() <= 1e-4 * (1.0 + s.abs()),
                            "{dt:?} ({i},{r})"
                        );
                    }
                }
            }
        }
        // Not served: a format without a kernel here, or a dequantized part.
        let zeros = Tensor::zeros((4, 256), DType::F32, &dev)?;
        let q = QTensor::quantize(&zeros, GgmlDType::Q5K)?;
        let x = Tensor::zeros((1, 256), DType::F32, &dev)?;
        assert!(matmul_xwt(&x, &[QMatMul::QTensor(Arc::new(q))])?.is_none());
        assert!(matmul_xwt(&x, &[QMatMul::Tensor(zeros)])?.is_none());
        Ok(())
    }
}
