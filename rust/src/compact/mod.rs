//! KV-cache compaction: choose the keys each (layer, KV head) keeps, then rewrite that head of
//! the ragged cache. This is the plumbing every method shares (Attention Matching and the
//! baselines); the selection rules live in [`select`].

pub mod exp;
pub mod fit;
pub mod pipeline;
pub mod score_pass;
pub mod select;
pub mod solve;
pub mod split_attention;
pub mod tail_check;

use candle_core::Tensor;
use faer::Par;

use crate::cache::KvCache;
use crate::error::{Error, Result};

/// Parallelism of the fit's large products. Heads are fitted in parallel, but global budgets
/// make the heads of a layer up to ten times apart in kept keys (and the fit's cost grows with
/// their square), so the thread of a small head would idle; rayon tasks let it help.
pub fn par() -> Par {
    Par::rayon(0)
}

/// Keeps rows `idx` (sorted, unique, in range) of one head with their original keys, values
/// and biases; the head's memory shrinks to exactly those rows.
pub fn keep_rows(cache: &mut KvCache, layer: usize, head: usize, idx: &[u32]) -> Result<()> {
    let h = cache.head(layer, head);
    let n = h.len();
    if idx.windows(2).any(|w| w[0] >= w[1]) || idx.last().is_some_and(|&i| i as usize >= n) {
        return Err(Error::invalid(format!(
            "keep_rows: indices must be sorted, unique and below {n}"
        )));
    }
    let sel = Tensor::new(idx, h.keys()?.device())?;
    let k = h.keys()?.index_select(&sel, 0)?;
    let v = h.values()?.index_select(&sel, 0)?;
    let bias = if h.has_bias() {
        Some(h.bias()?.index_select(&sel, 0)?)
    } else {
        None
    };
    cache.replace_head(layer, head, &k, &v, bias.as_ref())
}

/// Per-head budget check shared by every method: the window kept exact must fit.
pub fn check_budget(budget: usize, sink: usize, recent: usize) -> Result<()> {
    if budget < sink + recent {
        return Err(Error::invalid(format!(
            "budget {budget} is smaller than sink + recent = {} tokens kept exact",
            sink + recent
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn keep_rows_keeps_original_rows_and_biases() -> Result<()> {
        let dev = Device::Cpu;
        let mut c = KvCache::new(1, 2, 2, DType::F32, &dev)?;
        let k = Tensor::arange(0f32, 40., &dev)?.reshape((2, 10, 2))?;
        c.append(0, &k, &(&k + 100.)?)?;
        c.advance(10);
        let b = Tensor::arange(0f32, 10., &dev)?;
        let (k1, v1) = (c.head(0, 1).keys()?, c.head(0, 1).values()?);
        c.replace_head(0, 1, &k1, &v1, Some(&b))?;
        keep_rows(&mut c, 0, 1, &[0, 3, 9])?;
        assert_eq!(c.tokens_per_head(), vec![vec![10, 3]]);
        assert_eq!(
            c.head(0, 1).keys()?.to_vec2::<f32>()?,
            vec![vec![20., 21.], vec![26., 27.], vec![38., 39.]]
        );
        assert_eq!(
            c.head(0, 1).values()?.to_vec2::<f32>()?[1],
            vec![126., 127.]
        );
        assert_eq!(c.head(0, 1).bias()?.to_vec1::<f32>()?, vec![0., 3., 9.]);
        assert_eq!(
            c.next_position(),
            10,
            "positions continue from the original length"
        );
        assert!(keep_rows(&mut c, 0, 0, &[3, 1]).is_err());
        assert!(keep_rows(&mut c, 0, 0, &[10]).is_err());
        assert!(check_budget(10, 4, 8).is_err() && check_budget(12, 4, 8).is_ok());
        Ok(())
    }
}
