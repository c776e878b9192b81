//! GGUF checkpoints (llama.cpp's format): the config from the metadata, tensors under their HF
//! names, matrices kept quantized (candle's `QMatMul`: Q4_0..Q8_0, Q2K..Q6K) and everything
//! else dequantized to the compute dtype.
//!
//! Architectures `llama`, `qwen2`, `qwen3`. llama.cpp's converter permutes the rows of Llama's
//! q/k projections so that its RoPE rotates adjacent pairs; rather than undo that, Llama GGUF
//! models rotate adjacent pairs too (`ModelConfig::rope_interleaved`): q.k products, and so
//! attention and compaction, are the same in either basis. Qwen GGUFs keep the HF layout.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::weights::WeightSource;

pub struct GgufWeights {
    path: PathBuf,
    content: Content,
    file: Mutex<File>,
    device: Device,
    pub dtype: DType,
}

impl GgufWeights {
    pub fn open(path: &Path, device: &Device) -> Result<Self> {
        let mut file = File::open(path).map_err(|_| Error::NotFound {
            what: "GGUF file",
            path: path.into(),
        })?;
        let content = Content::read(&mut file).map_err(|e| Error::Weights {
            path: path.into(),
            msg: format!("not a readable GGUF file ({e})"),
        })?;
        // A truncated file reads its header fine: check every tensor lies inside the file.
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        for (name, info) in &content.tensor_infos {
            let bytes = info.shape.elem_count() / info.ggml_dtype.block_size()
                * info.ggml_dtype.type_size();
            let end = content.tensor_data_offset + info.offset + bytes as u64;
            if end > len {
                return Err(Error::Weights {
                    path: path.into(),
                    msg: format!(
                        "the file is truncated: tensor {name:?} ends at byte {end}, the file \
                         has {len}"
                    ),
                });
            }
        }
        Ok(Self {
            path: path.into(),
            content,
            file: Mutex::new(file),
            device: device.clone(),
            dtype: DType::F32,
        })
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    fn arch(&self) -> Result<String> {
        Ok(self.meta("general.architecture")?.to_string()?.clone())
    }

    fn meta(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| Error::Weights {
                path: self.path.clone(),
                msg: format!("GGUF metadata has no {key:?}"),
            })
    }

    fn meta_u(&self, key: &str) -> Result<usize> {
        let v = self.meta(key)?;
        let n = v
            .to_u32()
            .map(u64::from)
            .or_else(|_| v.to_u64())
            .map_err(|e| self.bad(key, e))?;
        Ok(n as usize)
    }

    fn meta_f(&self, key: &str) -> Result<f64> {
        let v = self.meta(key)?;
        v.to_f32()
            .map(f64::from)
            .or_else(|_| v.to_f64())
            .map_err(|e| self.bad(key, e))
    }

    fn bad(&self, key: &str, e: candle_core::Error) -> Error {
        Error::Weights {
            path: self.path.clone(),
            msg: format!("GGUF metadata {key:?}: {e}"),
        }
    }

    /// The model's config, from the GGUF metadata.
    pub fn config(&self) -> Result<ModelConfig> {
        let arch = self.arch()?;
        if !crate::config::SUPPORTED.contains(&arch.as_str()) {
            return Err(Error::Config {
                path: self.path.clone(),
                msg: format!(
                    "GGUF architecture {arch:?} is not supported (llama, qwen2 and qwen3 are)"
                ),
            });
        }
        let k = |s: &str| format!("{arch}.{s}");
        let hidden = self.meta_u(&k("embedding_length"))?;
        let heads = self.meta_u(&k("attention.head_count"))?;
        let kv_heads = self.meta_u(&k("attention.head_count_kv")).unwrap_or(heads);
        let head_dim = self
            .meta_u(&k("attention.key_length"))
            .unwrap_or(hidden / heads.max(1));
        let vocab = self.tensor_shape("token_embd.weight")?[0];
        let bias = self.content.tensor_infos.contains_key("blk.0.attn_q.bias");
        let o_bias = self
            .content
            .tensor_infos
            .contains_key("blk.0.attn_output.bias");
        let eos = self.meta_u("tokenizer.ggml.eos_token_id").ok();
        if let Ok(kind) = self.meta(&k("rope.scaling.type")) {
            let kind = kind.to_string().map(String::as_str).unwrap_or("?");
            if kind != "none" {
                return Err(Error::Config {
                    path: self.path.clone(),
                    msg: format!("RoPE scaling {kind:?} is not supported"),
                });
            }
        }
        Ok(ModelConfig {
            model_type: arch.clone(),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: self.meta_u(&k("feed_forward_length"))?,
            num_hidden_layers: self.meta_u(&k("block_count"))?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: self.meta_f(&k("attention.layer_norm_rms_epsilon"))?,
            rope_theta: self.meta_f(&k("rope.freq_base")).unwrap_or(10_000.0),
            max_position_embeddings: self.meta_u(&k("context_length")).unwrap_or(4096),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            qkv_bias: bias,
            o_bias,
            qk_norm: arch == "qwen3",
            rope_interleaved: arch == "llama",
            eos_token_ids: eos.map(|e| vec![e as u32]).unwrap_or_default(),
            torch_dtype: None,
        })
    }

    /// The llama.cpp name of an HF tensor name.
    fn gguf_name(name: &str) -> String {
        let map = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.norm.weight", "output_norm.weight"),
            ("lm_head.weight", "output.weight"),
        ];
        if let Some((_, g)) = map.iter().find(|(h, _)| *h == name) {
            return (*g).into();
        }
        let Some(rest) = name.strip_prefix("model.layers.") else {
            return name.into();
        };
        let (i, rest) = rest.split_once('.').unwrap_or((rest, ""));
        let parts = [
            ("input_layernorm", "attn_norm"),
            ("post_attention_layernorm", "ffn_norm"),
            ("self_attn.q_proj", "attn_q"),
            ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v"),
            ("self_attn.o_proj", "attn_output"),
            ("self_attn.q_norm", "attn_q_norm"),
            ("self_attn.k_norm", "attn_k_norm"),
            ("mlp.gate_proj", "ffn_gate"),
            ("mlp.up_proj", "ffn_up"),
            ("mlp.down_proj", "ffn_down"),
        ];
        for (h, g) in parts {
            if let Some(suffix) = rest.strip_prefix(h) {
                return format!("blk.{i}.{g}{suffix}");
            }
        }
        name.into()
    }

    /// Shape in HF order (`[out, in]`; GGUF lists dimensions innermost first).
    fn tensor_shape(&self, gguf: &str) -> Result<Vec<usize>> {
        let info = self
            .content
            .tensor_infos
            .get(gguf)
            .ok_or_else(|| Error::MissingTensor {
                name: gguf.into(),
                files: self.path.display().to_string(),
            })?;
        Ok(info.shape.dims().to_vec())
    }

    fn qtensor(&self, name: &str, shape: &[usize]) -> Result<QTensor> {
        let g = Self::gguf_name(name);
        let got = self.tensor_shape(&g)?;
        if got != shape {
            return Err(Error::TensorShape {
                name: format!("{name} ({g})"),
                got,
                expected: shape.to_vec(),
            });
        }
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        self.content
            .tensor(&mut *f, &g, &self.device)
            .map_err(|e| Error::Weights {
                path: self.path.clone(),
                msg: format!("tensor {g:?}: {e}"),
            })
    }
}

impl WeightSource for GgufWeights {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let q = self.qtensor(name, shape)?;
        Ok(q.dequantize(&self.device)?.to_dtype(self.dtype)?)
    }

    fn get_matrix(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get(name, shape)
    }

    fn contains(&self, name: &str) -> bool {
        self.content
            .tensor_infos
            .contains_key(&Self::gguf_name(name))
    }

    fn get_quantized(&self, name: &str, shape: &[usize]) -> Result<Option<QMatMul>> {
        let q = self.qtensor(name, shape)?;
        if matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            return Ok(None);
        }
        Ok(Some(QMatMul::from_qtensor(q)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_hf_names_to_llama_cpp_names() {
        let m = GgufWeights::gguf_name;
        assert_eq!(m("model.embed_tokens.weight"), "token_embd.weight");
        assert_eq!(
            m("model.layers.12.self_attn.q_proj.bias"),
            "blk.12.attn_q.bias"
        );
        assert_eq!(
            m("model.layers.0.mlp.down_proj.weight"),
            "blk.0.ffn_down.weight"
        );
        assert_eq!(
            m("model.layers.3.self_attn.k_norm.weight"),
            "blk.3.attn_k_norm.weight"
        );
        assert_eq!(m("lm_head.weight"), "output.weight");
    }
}
