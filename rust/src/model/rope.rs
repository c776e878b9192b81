//! Rotary position embedding tables (the "default" RoPE of HF Qwen3: rotate-half layout).

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

#[derive(Debug, Clone)]
pub struct Rope {
    /// `theta^(-2i/d)` for `i < d/2`, computed in f32 exactly as transformers does.
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64) -> Self {
        let inv_freq = (0..head_dim / 2)
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        Self { inv_freq }
    }

    /// `(cos, sin)`, each `[t, d/2]` in `dtype`, for positions `start..start + t`.
    pub fn tables(
        &self,
        start: usize,
        t: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in start..start + t {
            for &f in &self.inv_freq {
                // f32 product like transformers (angles at long positions round the same way).
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (t, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (t, half), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}
