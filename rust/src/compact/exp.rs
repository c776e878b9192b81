//! Softmax loops of the fit and of key scoring: a branch-free f32 `exp` and the per-query
//! passes over a column of logits. glibc's `expf` is a scalar call that turns slow on the many
//! tiny results of a softmax over thousands of keys (denormals); this one flushes below e^-87
//! to 0 and vectorizes. The crate is built for baseline x86-64, so the loops are compiled again
//! for AVX-512 and AVX2+FMA and picked at run time: they were the largest cost of scoring
//! (more than its matrix product) on SSE2.

use std::sync::OnceLock;

/// `exp(x)` for `x <= 88`; 0 below -87. Relative error < 2e-7 (tested against f64).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let under = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest by adding 1.5 * 2^23 (inlines and vectorizes, unlike `round`).
    const MAGIC: f32 = 12_582_912.0;
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Taylor terms to r^7 on |r| <= ln2/2.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // n sits in the low mantissa bits of t: integer arithmetic, no float-to-int conversion
    // (Rust's saturating `as` does not vectorize well).
    let scale = f32::from_bits((t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127)) << 23);
    if under {
        0.0
    } else {
        p * scale
    }
}

/// Lanes of the vectorized reductions (float adds do not reassociate, so they are explicit).
const LANES: usize = 16;

#[inline(always)]
fn max_body(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = if v > *l { v } else { *l };
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    lanes.iter().copied().fold(tail, f32::max)
}

#[inline(always)]
fn exp_shifted_body(x: &mut [f32], shift: f32) -> f64 {
    x.iter_mut().for_each(|v| *v = exp(*v - shift));
    sum_body(x)
}

#[inline(always)]
fn sum_body(x: &[f32]) -> f64 {
    let mut lanes = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    let tail: f32 = chunks.remainder().iter().sum();
    lanes.iter().map(|&l| l as f64).sum::<f64>() + tail as f64
}

/// How the softmax weights of a query are folded into per-key accumulators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fold {
    /// `acc += p^2`.
    Squares,
    /// `acc = max(acc, p)`.
    Max,
    /// `acc += p`.
    Sum,
}

/// No keys outside the row (see [`softmax_fold`]).
pub const NOTHING_OUTSIDE: (f32, f64) = (f32::NEG_INFINITY, 0.0);

#[inline(always)]
fn softmax_fold_body(
    x: &mut [f32],
    acc: &mut [f32],
    fold: Fold,
    outside: (f32, f64),
) -> (f32, f64) {
    let max = max_body(x).max(outside.0);
    let mut sum = exp_shifted_body(x, max);
    if outside.1 > 0.0 {
        sum += outside.1 * ((outside.0 - max) as f64).exp();
    }
    let inv = (1.0 / sum) as f32;
    let acc = &mut acc[..x.len()];
    // Weights below 1e-18 fold as 0 (tested before the product): they and their squares
    // would be denormals, which cost a microcode assist per element on x86, and they cannot
    // change a ranking that matters.
    let tiny = (1e-18 * sum) as f32;
    let weight = |e: f32| if e < tiny { 0.0 } else { e * inv };
    match fold {
        Fold::Squares => acc.iter_mut().zip(x.iter()).for_each(|(a, &e)| {
            let p = weight(e);
            *a += p * p
        }),
        Fold::Max => acc.iter_mut().zip(x.iter()).for_each(|(a, &e)| {
            let p = weight(e);
            *a = if p > *a { p } else { *a }
        }),
        Fold::Sum => acc
            .iter_mut()
            .zip(x.iter())
            .for_each(|(a, &e)| *a += weight(e)),
    }
    (max, sum)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Isa {
    Avx512,
    Avx2,
    Baseline,
}

fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2;
            }
        }
        Isa::Baseline
    })
}

/// Defines `$name`, which runs `$body` compiled for the best vector unit of this CPU.
macro_rules! multiversion {
    ($(#[$doc:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $body:ident) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                // SAFETY: the features were detected on this CPU.
                match isa() {
                    Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    Isa::Baseline => {}
                }
            }
            $body($($arg),*)
        }
    };
}

multiversion! {
    /// `x[i] = exp(x[i] - shift)` in place; returns the sum in f64.
    pub fn exp_shifted(x: &mut [f32], shift: f32) -> f64 = exp_shifted_body
}

multiversion! {
    /// The largest of `x` (-inf when empty).
    pub fn max(x: &[f32]) -> f32 = max_body
}

multiversion! {
    /// `sum(x)` in f64 from f32 lanes (a plain f64 sum is one dependent add per element).
    pub fn sum(x: &[f32]) -> f64 = sum_body
}

multiversion! {
    /// One query's softmax over its logits `x`, in place (`x[i] = exp(x[i] - max)`), folded
    /// into `acc[..x.len()]` as normalised weights; returns `(max, sum)`. `outside`: the
    /// `(max, sum of exp(logit - max))` of the query's other keys, which share the softmax but
    /// are not folded ([`NOTHING_OUTSIDE`] when there are none); `max` and `sum` then cover them.
    pub fn softmax_fold(x: &mut [f32], acc: &mut [f32], fold: Fold, outside: (f32, f64)) -> (f32, f64) = softmax_fold_body
}

/// Softmax numerator of one row in place: `x[i] = exp(x[i] - max)`; returns `(max, sum)`.
pub fn exp_from_max(x: &mut [f32]) -> (f32, f64) {
    let max = max(x);
    (max, exp_shifted(x, max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_f64_exp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = super::exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 2e-7, "relative error {worst}");
        assert_eq!(super::exp(-100.0), 0.0);
        assert_eq!(super::exp(0.0), 1.0);
    }

    #[test]
    fn softmax_fold_agrees_with_f64() {
        // Odd lengths exercise the tails; the build picked for this CPU and the baseline build
        // must both match a plain f64 softmax.
        for n in [1usize, 15, 16, 17, 1000] {
            let logits: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32) * 0.13 - 5.0)
                .collect();
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let e: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
            let s: f64 = e.iter().sum();
            type Build = fn(&mut [f32], &mut [f32], Fold, (f32, f64)) -> (f32, f64);
            let builds: [Build; 2] = [softmax_fold, softmax_fold_body];
            for (fold, f) in [Fold::Squares, Fold::Max, Fold::Sum]
                .into_iter()
                .flat_map(|fold| builds.map(|f| (fold, f)))
            {
                let mut x = logits.clone();
                let mut acc = vec![0.25f32; n + 3];
                let (m, sum) = f(&mut x, &mut acc, fold, NOTHING_OUTSIDE);
                assert_eq!(m as f64, max);
                assert!((sum - s).abs() < 1e-5 * s, "{n} {fold:?}");
                for j in 0..n {
                    let p = e[j] / s;
                    let want = match fold {
                        Fold::Squares => 0.25 + p * p,
                        Fold::Max => p.max(0.25),
                        Fold::Sum => 0.25 + p,
                    };
                    assert!((acc[j] as f64 - want).abs() < 1e-6, "{n} {fold:?} {j}");
                    assert!((x[j] as f64 - e[j]).abs() < 1e-6 * e[j].max(1e-30) + 1e-12);
                }
                assert!(acc[n..].iter().all(|&a| a == 0.25), "past the column");
                // The same row split in two: the first part folded with the second as outside
                // keys gives the first part's weights and the whole row's statistics.
                let k = n / 2;
                if k > 0 {
                    let mut tail = logits[k..].to_vec();
                    let outside = exp_from_max(&mut tail);
                    let mut head = logits[..k].to_vec();
                    let mut acc2 = vec![0.25f32; k];
                    let (m2, sum2) = f(&mut head, &mut acc2, fold, outside);
                    assert_eq!(m2 as f64, max);
                    assert!((sum2 - s).abs() < 1e-5 * s, "{n} {fold:?} split");
                    for j in 0..k {
                        assert!((acc2[j] - acc[j]).abs() < 1e-6, "{n} {fold:?} split {j}");
                    }
                }
            }
        }
    }
}
