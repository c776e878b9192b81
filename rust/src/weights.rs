//! Safetensors checkpoints: one file or a sharded set (`model.safetensors.index.json`),
//! memory-mapped, with every tensor checked for presence, shape and dtype before use.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Where a model's tensors come from: a checkpoint, or random values for speed benchmarks.
pub trait WeightSource {
    /// The tensor `name` with `shape`, in the compute dtype on the model device.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor>;
    /// A matrix that CPU kernels may keep in a narrower exact storage dtype.
    fn get_matrix(&self, name: &str, shape: &[usize]) -> Result<Tensor>;
    fn contains(&self, name: &str) -> bool;
    /// A matrix kept quantized (GGUF), or None to load it dense with `get_matrix`.
    fn get_quantized(&self, _name: &str, _shape: &[usize]) -> Result<Option<QMatMul>> {
        Ok(None)
    }
}

/// Random weights (normal, std 0.02; norm weights 1) of a given config, for benchmarks of
/// shapes whose checkpoints are not at hand. Matrices are stored like a checkpoint of
/// `stored` dtype would be.
pub struct RandomWeights {
    pub device: Device,
    pub dtype: DType,
    pub stored: DType,
}

impl WeightSource for RandomWeights {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = if name.ends_with("norm.weight") {
            Tensor::ones(shape, DType::F32, &self.device)?
        } else {
            Tensor::randn(0f32, 0.02, shape, &self.device)?
        };
        Ok(t.to_dtype(self.dtype)?)
    }

    fn get_matrix(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.get(name, shape)?;
        let narrow = matches!(self.stored, DType::BF16 | DType::F16);
        if narrow && self.device.is_cpu() && self.dtype == DType::F32 {
            return Ok(t.to_dtype(self.stored)?);
        }
        Ok(t)
    }

    fn contains(&self, name: &str) -> bool {
        name != "lm_head.weight"
    }
}

pub struct Weights {
    /// Quantize matrices to this format on load (`dtype="q8_0"`, ...).
    pub quantize: Option<GgmlDType>,
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// tensor name -> index into `files`
    routing: HashMap<String, usize>,
    device: Device,
    dtype: DType,
}

impl Weights {
    /// Opens the safetensors files of the checkpoint directory `dir`.
    pub fn open(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let paths = weight_files(dir)?;
        let mut files = Vec::with_capacity(paths.len());
        let mut routing = HashMap::new();
        for (index, path) in paths.into_iter().enumerate() {
            // SAFETY: the map is read-only; like every mmap user we rely on the file not being
            // truncated underneath us while loaded (the header and sizes are validated here).
            let st = unsafe { MmapedSafetensors::new(&path) }.map_err(|e| Error::Weights {
                path: path.clone(),
                msg: describe_safetensors_error(&e),
            })?;
            for (name, _) in st.tensors() {
                routing.insert(name, index);
            }
            files.push((path, st));
        }
        Ok(Self {
            quantize: None,
            files,
            routing,
            device: device.clone(),
            dtype,
        })
    }

    /// The dtype tensors are converted to on load.
    pub fn set_dtype(&mut self, dtype: DType) {
        self.dtype = dtype;
    }

    /// The dtype most tensors are stored in (the checkpoint's dtype).
    pub fn stored_dtype(&self) -> Option<DType> {
        let mut counts: HashMap<DType, usize> = HashMap::new();
        for (_, st) in &self.files {
            for (_, view) in st.tensors() {
                if let Ok(dt) = DType::try_from(view.dtype()) {
                    *counts.entry(dt).or_default() += 1;
                }
            }
        }
        counts.into_iter().max_by_key(|(_, n)| *n).map(|(d, _)| d)
    }

    pub fn get_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let index = *self.routing.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.into(),
            files: self
                .files
                .iter()
                .map(|(p, _)| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
        let (path, st) = &self.files[index];
        let view = st.get(name)?;
        if view.shape() != shape {
            return Err(Error::TensorShape {
                name: name.into(),
                got: view.shape().to_vec(),
                expected: shape.to_vec(),
            });
        }
        let stored = DType::try_from(view.dtype())
            .ok()
            .filter(|d| matches!(d, DType::F32 | DType::F16 | DType::BF16));
        if stored.is_none() {
            return Err(Error::Weights {
                path: path.clone(),
                msg: format!(
                    "tensor {name:?} has dtype {:?}; expected F32, F16 or BF16",
                    view.dtype()
                ),
            });
        }
        // Load on the CPU first, convert there, then move: avoids a second full-size copy of
        // the checkpoint dtype on the GPU.
        let t = st.load(name, &Device::Cpu).map_err(|e| Error::Weights {
            path: path.clone(),
            msg: format!("tensor {name:?}: {e}"),
        })?;
        Ok(t.to_dtype(dtype)?.to_device(&self.device)?)
    }
}

impl WeightSource for Weights {
    /// Loads `name`, checks its shape, converts it to the model dtype on the model device.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_as(name, shape, self.dtype)
    }

    /// Like [`Weights::get`] for a matrix read by the CPU kernels: a bf16/f16 tensor stays in
    /// its stored dtype when the model computes in f32, since those kernels widen it exactly on
    /// the fly. Same numbers, half the memory and half the bytes streamed per decoded token.
    fn get_matrix(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let stored = self
            .routing
            .get(name)
            .and_then(|&i| self.files[i].1.get(name).ok())
            .and_then(|v| DType::try_from(v.dtype()).ok());
        match stored {
            Some(s @ (DType::BF16 | DType::F16))
                if self.device.is_cpu() && self.dtype == DType::F32 =>
            {
                self.get_as(name, shape, s)
            }
            _ => self.get(name, shape),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }

    fn get_quantized(&self, name: &str, shape: &[usize]) -> Result<Option<QMatMul>> {
        let Some(format) = self.quantize else {
            return Ok(None);
        };
        let block = format.block_size();
        if shape.len() != 2 || shape[1] % block != 0 {
            return Err(Error::invalid(format!(
                "cannot quantize {name:?} {shape:?} to {format:?}: its rows of {} values are \
                 not a multiple of the format's block of {block} (k-quants need multiples of \
                 256; q8_0/q4_0/... need 32)",
                shape.last().copied().unwrap_or(0)
            )));
        }
        let dense = self.get_as(name, shape, DType::F32)?;
        Ok(Some(QMatMul::from_qtensor(QTensor::quantize(
            &dense, format,
        )?)?))
    }
}

/// The weight files of a checkpoint directory, in shard order.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::Weights {
            path: index.clone(),
            msg: e.to_string(),
        })?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Weights {
            path: index.clone(),
            msg: format!("invalid JSON: {e}"),
        })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Weights {
                path: index.clone(),
                msg: "no \"weight_map\" object".into(),
            })?;
        let mut names: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let files: Vec<PathBuf> = names.into_iter().map(|n| dir.join(n)).collect();
        for f in &files {
            if !f.is_file() {
                return Err(Error::NotFound {
                    what: "weight shard",
                    path: f.clone(),
                });
            }
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut any: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|_| Error::NotFound {
            what: "model directory",
            path: dir.into(),
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    if any.is_empty() {
        return Err(Error::NotFound {
            what: "safetensors weights (model.safetensors)",
            path: dir.into(),
        });
    }
    any.sort();
    Ok(any)
}

fn describe_safetensors_error(e: &candle_core::Error) -> String {
    let s = e.to_string();
    let l = s.to_ascii_lowercase();
    // safetensors reports a short file as "incomplete metadata, file not fully covered",
    // "header too small" or a bad header length/offset, depending on where it was cut.
    if [
        "incomplete",
        "too small",
        "header length",
        "offset",
        "not fully covered",
    ]
    .iter()
    .any(|k| l.contains(k))
    {
        format!("the file is truncated or corrupt ({s})")
    } else {
        s
    }
}
