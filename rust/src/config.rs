//! `config.json` -> [`ModelConfig`]. Accepts both shapes seen in the wild: the classic
//! top-level `rope_theta` (transformers 4) and the newer `rope_parameters` object (transformers 5).
//!
//! Three families share one decoder and differ only where this records it: Qwen3 (`qwen3`:
//! per-head QK-norm, optional attention biases), Qwen2/Qwen2.5 (`qwen2`: q/k/v biases, no
//! QK-norm) and Llama (`llama`, SmolLM2 among them: no QK-norm, optional attention biases).

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Per-head width; Qwen3 decouples it from `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on the q/k/v projections, and on the output projection.
    pub qkv_bias: bool,
    pub o_bias: bool,
    /// Per-head RMSNorm of queries and keys before RoPE (Qwen3).
    pub qk_norm: bool,
    /// RoPE rotates adjacent pairs (llama.cpp's Llama layout, see `gguf`) instead of halves.
    pub rope_interleaved: bool,
    pub eos_token_ids: Vec<u32>,
    /// dtype the checkpoint declares ("bfloat16", ...), if any.
    pub torch_dtype: Option<String>,
}

#[derive(Deserialize)]
struct Raw {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<Value>,
    rope_scaling: Option<Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    use_sliding_window: Option<bool>,
    eos_token_id: Option<Value>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound {
                what: "config.json",
                path: path.into(),
            },
            _ => Error::Config {
                path: path.into(),
                msg: e.to_string(),
            },
        })?;
        Self::from_json(&text).map_err(|msg| Error::Config {
            path: path.into(),
            msg,
        })
    }

    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let value: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        let model_type = value
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let model_type = model_type.as_str();
        if !SUPPORTED.contains(&model_type) {
            return Err(format!(
                "model_type {model_type:?} is not supported: kvfast loads {} checkpoints",
                SUPPORTED.map(|t| format!("{t:?}")).join(", ")
            ));
        }
        let raw: Raw = serde_json::from_value(value).map_err(|e| e.to_string())?;
        if raw.mlp_bias == Some(true) {
            return Err("mlp_bias=true is not supported".into());
        }
        let attention_bias = raw.attention_bias.unwrap_or(false);
        // Qwen2 always has q/k/v biases and none on o_proj; the others follow attention_bias.
        let (qkv_bias, o_bias) = match model_type {
            "qwen2" => (true, false),
            _ => (attention_bias, attention_bias),
        };
        let rope_theta = rope_theta(&raw)?;
        if raw.use_sliding_window == Some(true) {
            return Err(
                "sliding-window attention (use_sliding_window=true) is not supported".into(),
            );
        }
        let heads = raw.num_attention_heads;
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(format!(
                "num_attention_heads ({heads}) must be a positive multiple of num_key_value_heads ({kv_heads})"
            ));
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / heads);
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(format!(
                "head_dim must be even and positive, got {head_dim}"
            ));
        }
        Ok(Self {
            model_type: raw.model_type.unwrap_or_default(),
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(32768),
            // transformers' Qwen3Config defaults to untied embeddings.
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            qk_norm: model_type == "qwen3",
            rope_interleaved: false,
            eos_token_ids: eos_ids(raw.eos_token_id.as_ref()),
            torch_dtype: raw.dtype.or(raw.torch_dtype),
        })
    }

    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

/// The `model_type`s kvfast loads.
pub const SUPPORTED: [&str; 3] = ["qwen3", "qwen2", "llama"];

fn rope_theta(raw: &Raw) -> std::result::Result<f64, String> {
    // transformers 5 moved RoPE settings into `rope_parameters`; older configs keep a top-level
    // `rope_theta` and an optional `rope_scaling`.
    let params = raw
        .rope_parameters
        .as_ref()
        .or(raw.rope_scaling.as_ref())
        .filter(|v| !v.is_null());
    if let Some(p) = params {
        let kind = p
            .get("rope_type")
            .or_else(|| p.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        if kind != "default" {
            return Err(format!(
                "RoPE scaling {kind:?} is not supported (only \"default\")"
            ));
        }
        if let Some(theta) = p.get("rope_theta").and_then(Value::as_f64) {
            return Ok(theta);
        }
    }
    Ok(raw.rope_theta.unwrap_or(10_000.0))
}

fn eos_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#""model_type": "qwen3", "vocab_size": 10, "hidden_size": 8,
        "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 6"#;

    #[test]
    fn reads_both_rope_styles() {
        let classic =
            ModelConfig::from_json(&format!("{{{BASE}, \"rope_theta\": 5000.0}}")).unwrap();
        assert_eq!(classic.rope_theta, 5000.0);
        let new = ModelConfig::from_json(&format!(
            "{{{BASE}, \"rope_parameters\": {{\"rope_theta\": 1e6, \"rope_type\": \"default\"}}}}"
        ))
        .unwrap();
        assert_eq!(new.rope_theta, 1e6);
        assert_eq!(new.head_dim, 6);
        assert!(!new.tie_word_embeddings);
    }

    #[test]
    fn families_differ_in_norms_and_biases() {
        let body = BASE.replace("\"qwen3\"", "\"{}\"");
        let cfg = |t: &str| ModelConfig::from_json(&format!("{{{}}}", body.replace("{}", t)));
        let (q3, q2, ll) = (
            cfg("qwen3").unwrap(),
            cfg("qwen2").unwrap(),
            cfg("llama").unwrap(),
        );
        assert!(q3.qk_norm && !q2.qk_norm && !ll.qk_norm);
        assert_eq!((q2.qkv_bias, q2.o_bias), (true, false));
        assert_eq!((ll.qkv_bias, ll.o_bias), (false, false));
        let err = ModelConfig::from_json(&format!("{{{BASE}, \"mlp_bias\": true}}")).unwrap_err();
        assert!(err.contains("mlp_bias"), "{err}");
    }

    #[test]
    fn rejects_other_architectures_and_scaling() {
        let err = ModelConfig::from_json(r#"{"model_type": "bert"}"#).unwrap_err();
        assert!(err.contains("bert"), "{err}");
        let err = ModelConfig::from_json(&format!(
            "{{{BASE}, \"rope_scaling\": {{\"rope_type\": \"yarn\", \"factor\": 4.0}}}}"
        ))
        .unwrap_err();
        assert!(err.contains("yarn"), "{err}");
    }
}
