//! PyO3 bindings only: argument conversion, GIL release, panic containment and the mapping of
//! [`Error`] to Python exceptions.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::{PyException, PyFileNotFoundError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

use crate::compact::fit::{
    fit_head as fit_one_head, FitParams, HeadData, Keep, DEFAULT_BETA_BOUNDS, DEFAULT_RIDGE,
    VALUES_RIDGE,
};
use crate::compact::pipeline::{Fit, HeadBudgets, HeadOutcome, Method, Options, QuerySource};
use crate::compact::select::Pool;
use crate::device::{build_features, device_name, dtype_name};
use crate::engine::{Engine as Core, LogitsWant};
use crate::error::Error;
use crate::kv_quant::KvQuant;
use crate::sample::{Sampler, SamplingParams};

static KVFAST_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static MODEL_LOAD_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

fn raise(py: Python<'_>, cell: &PyOnceLock<Py<PyType>>, name: &str, msg: String) -> PyErr {
    match cell.import(py, "kvfast._native", name) {
        Ok(ty) => PyErr::from_type(ty.clone(), msg),
        Err(e) => e,
    }
}

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        let msg = e.to_string();
        match e {
            Error::NotFound { .. } => PyFileNotFoundError::new_err(msg),
            Error::InvalidArgument(_) => PyValueError::new_err(msg),
            Error::DeviceUnavailable(_) => PyRuntimeError::new_err(msg),
            Error::Config { .. }
            | Error::Weights { .. }
            | Error::MissingTensor { .. }
            | Error::TensorShape { .. } => {
                Python::attach(|py| raise(py, &MODEL_LOAD_ERROR, "ModelLoadError", msg))
            }
            Error::Candle(_) => Python::attach(|py| raise(py, &KVFAST_ERROR, "KvfastError", msg)),
        }
    }
}

/// Runs `f` without the GIL; a panic becomes a `KvfastError` instead of reaching Python.
fn run<T: Send>(py: Python<'_>, f: impl FnOnce() -> crate::error::Result<T> + Send) -> PyResult<T> {
    match py.detach(|| catch_unwind(AssertUnwindSafe(f))) {
        Ok(r) => r.map_err(PyErr::from),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(raise(
                py,
                &KVFAST_ERROR,
                "KvfastError",
                format!("internal error (a kvfast bug): {what}"),
            ))
        }
    }
}

fn f32_array<'py>(
    py: Python<'py>,
    data: Vec<f32>,
    rows: Option<usize>,
) -> PyResult<Bound<'py, PyAny>> {
    let len = data.len();
    let arr = PyArray1::from_vec(py, data);
    Ok(match rows {
        Some(r) => arr.reshape([r, len / r.max(1)])?.into_any(),
        None => arr.into_any(),
    })
}

/// A loaded Qwen3 model plus its KV cache (one sequence).
#[pyclass(module = "kvfast._native")]
pub struct Engine {
    core: Core,
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (path, device = "cpu", dtype = None, kv_dtype = None))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        device: &str,
        dtype: Option<&str>,
        kv_dtype: Option<&str>,
    ) -> PyResult<Self> {
        // Checked before the (slow) load so a typo fails fast.
        let kv = kv_dtype.map(KvQuant::parse).transpose()?;
        let (device, dtype) = (device.to_string(), dtype.map(str::to_string));
        let core = run(py, move || {
            let mut core = Core::load(&path, &device, dtype.as_deref())?;
            core.cache.set_quant(kv)?;
            Ok(core)
        })?;
        Ok(Self { core })
    }

    /// A random-weight model with the shape of a `config.json` (for speed benchmarks).
    #[staticmethod]
    #[pyo3(signature = (config_path, device = "cpu", dtype = None, seed = 0, kv_dtype = None))]
    fn random(
        py: Python<'_>,
        config_path: PathBuf,
        device: &str,
        dtype: Option<&str>,
        seed: u64,
        kv_dtype: Option<&str>,
    ) -> PyResult<Self> {
        let kv = kv_dtype.map(KvQuant::parse).transpose()?;
        let (device, dtype) = (device.to_string(), dtype.map(str::to_string));
        let core = run(py, move || {
            let mut core = Core::random(&config_path, &device, dtype.as_deref(), seed)?;
            core.cache.set_quant(kv)?;
            Ok(core)
        })?;
        Ok(Self { core })
    }

    /// The cache's storage format: "int8"/"int4"/"int2", or None for the model dtype.
    #[getter]
    fn kv_dtype(&self) -> Option<&'static str> {
        self.core.cache.quant().map(|q| q.name())
    }

    /// Changes the cache's storage format, converting what it holds (None: the model dtype).
    #[setter]
    fn set_kv_dtype(&mut self, py: Python<'_>, kv_dtype: Option<&str>) -> PyResult<()> {
        let kv = kv_dtype.map(KvQuant::parse).transpose()?;
        let cache = &mut self.core.cache;
        run(py, move || cache.set_quant(kv))
    }

    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = self.core.config();
        let d = PyDict::new(py);
        d.set_item("model_type", &c.model_type)?;
        d.set_item("vocab_size", c.vocab_size)?;
        d.set_item("hidden_size", c.hidden_size)?;
        d.set_item("intermediate_size", c.intermediate_size)?;
        d.set_item("num_hidden_layers", c.num_hidden_layers)?;
        d.set_item("num_attention_heads", c.num_attention_heads)?;
        d.set_item("num_key_value_heads", c.num_key_value_heads)?;
        d.set_item("head_dim", c.head_dim)?;
        d.set_item("rms_norm_eps", c.rms_norm_eps)?;
        d.set_item("rope_theta", c.rope_theta)?;
        d.set_item("max_position_embeddings", c.max_position_embeddings)?;
        d.set_item("tie_word_embeddings", c.tie_word_embeddings)?;
        d.set_item("eos_token_ids", c.eos_token_ids.clone())?;
        d.set_item("torch_dtype", c.torch_dtype.clone())?;
        Ok(d)
    }

    #[getter]
    fn device(&self) -> String {
        device_name(self.core.device())
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        dtype_name(self.core.model.dtype())
    }

    #[getter]
    fn num_parameters(&self) -> usize {
        self.core.model.num_parameters()
    }

    #[getter]
    fn weight_bytes(&self) -> usize {
        self.core.model.weight_bytes()
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.core.config().vocab_size
    }

    #[getter]
    fn cache_len(&self) -> usize {
        self.core.cache.next_position()
    }

    #[getter]
    fn token_ids(&self) -> Vec<u32> {
        self.core.history().to_vec()
    }

    #[pyo3(signature = (ids, logits = Some("last")))]
    fn prefill<'py>(
        &mut self,
        py: Python<'py>,
        ids: Vec<i64>,
        logits: Option<&str>,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let want = match logits {
            None => LogitsWant::None,
            Some("last") => LogitsWant::Last,
            Some("all") => LogitsWant::All,
            Some(other) => {
                return Err(PyValueError::new_err(format!(
                    "logits must be \"last\", \"all\" or None, got {other:?}"
                )))
            }
        };
        let ids = to_ids(&ids)?;
        let n = ids.len();
        let core = &mut self.core;
        let out = run(py, move || core.prefill(&ids, want))?;
        out.map(|v| f32_array(py, v, (want == LogitsWant::All).then_some(n)))
            .transpose()
    }

    fn score<'py>(&mut self, py: Python<'py>, ids: Vec<i64>) -> PyResult<Bound<'py, PyAny>> {
        let ids = to_ids(&ids)?;
        let core = &mut self.core;
        let nll = run(py, move || core.score(&ids))?;
        f32_array(py, nll, None)
    }

    fn last_logits<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        self.core
            .last_logits()?
            .map(|l| f32_array(py, l.to_vec(), None))
            .transpose()
    }

    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (max_new_tokens = 128, temperature = 0.0, top_k = 0, top_p = 1.0, min_p = 0.0,
                        repetition_penalty = 1.0, seed = None, eos_ids = None))]
    fn generate(
        slf: Bound<'_, Self>,
        max_new_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        min_p: f32,
        repetition_penalty: f32,
        seed: Option<u64>,
        eos_ids: Option<Vec<u32>>,
    ) -> PyResult<TokenStream> {
        let params = SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
        };
        let sampler = Sampler::new(params, seed)?;
        if !slf.borrow().core.has_logits() {
            return Err(PyValueError::new_err(
                "nothing to continue from: the cache is empty; prefill a prompt first",
            ));
        }
        let eos = eos_ids.unwrap_or_else(|| slf.borrow().core.config().eos_token_ids.clone());
        Ok(TokenStream {
            engine: slf.unbind(),
            sampler,
            remaining: max_new_tokens,
            eos,
            done: false,
        })
    }

    /// Generates from `prompt` on top of the cache and returns the new ids; the cache is left
    /// exactly as it was.
    #[pyo3(signature = (prompt, max_new_tokens = 64, temperature = 0.0, seed = None))]
    fn generate_scratch(
        &mut self,
        py: Python<'_>,
        prompt: Vec<i64>,
        max_new_tokens: usize,
        temperature: f32,
        seed: Option<u64>,
    ) -> PyResult<Vec<u32>> {
        let prompt = to_ids(&prompt)?;
        let params = SamplingParams {
            temperature,
            ..SamplingParams::default()
        };
        let mut sampler = Sampler::new(params, seed)?;
        let core = &mut self.core;
        run(py, move || {
            core.generate_scratch(&prompt, &mut sampler, max_new_tokens)
        })
    }

    /// Compacts the cache to `budget` keys per head on average (see `Session.compact`).
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (budget, *, method = "am", queries = "repeat", suffix = None, sink = 4,
                        recent = 64, head_budgets = None, fit = "am", layers = None, seed = 0,
                        score = "max", ridge = Some(DEFAULT_RIDGE), max_queries = 4096, on_policy = false,
                        window = 64, kernel = 5, beta_bounds = Some(DEFAULT_BETA_BOUNDS), weighted = true, beta_prior = 0.0,
                        shared_mad = None, chunk_size = 4096, head_floor = 0.0, tail_check = 0))]
    fn compact<'py>(
        &mut self,
        py: Python<'py>,
        budget: usize,
        method: &str,
        queries: &str,
        suffix: Option<Vec<i64>>,
        sink: usize,
        recent: usize,
        head_budgets: Option<Bound<'py, PyAny>>,
        fit: &str,
        layers: Option<Vec<usize>>,
        seed: u64,
        score: &str,
        ridge: Option<f64>,
        max_queries: usize,
        on_policy: bool,
        window: usize,
        kernel: usize,
        beta_bounds: Option<(f64, f64)>,
        weighted: bool,
        beta_prior: f64,
        shared_mad: Option<f64>,
        chunk_size: usize,
        head_floor: f64,
        tail_check: usize,
    ) -> PyResult<Bound<'py, PyDict>> {
        let mut o = Options::new(Method::parse(method)?, budget);
        o.queries = QuerySource::parse(queries)?;
        o.sink = sink;
        o.recent = recent;
        o.fit = Fit::parse(fit)?;
        o.layers = layers;
        o.seed = seed;
        o.pool = match score {
            "rms" => Pool::Rms,
            "max" => Pool::Max,
            other => {
                return Err(PyValueError::new_err(format!(
                    "score must be \"rms\" or \"max\", got {other:?}"
                )))
            }
        };
        if ridge.is_some_and(|r| !(r >= 0.0 && r.is_finite()))
            || max_queries == 0
            || window == 0
            || kernel == 0
        {
            return Err(PyValueError::new_err(
                "ridge must be finite and >= 0; max_queries, window and kernel must be positive",
            ));
        }
        if beta_bounds.is_some_and(|(lo, hi)| !(lo <= hi && lo.is_finite() && hi.is_finite())) {
            return Err(PyValueError::new_err(
                "beta_bounds must be finite (low, high) with low <= high",
            ));
        }
        o.fit_params = FitParams {
            ridge,
            beta_bounds,
            weighted,
            beta_prior,
        };
        if shared_mad.is_some_and(|t| !t.is_finite()) {
            return Err(PyValueError::new_err("task_threshold must be finite"));
        }
        o.shared_mad = shared_mad;
        if chunk_size == 0 {
            return Err(PyValueError::new_err("chunk_size must be positive"));
        }
        o.chunk = chunk_size;
        if !(0.0..=1.0).contains(&head_floor) {
            return Err(PyValueError::new_err(format!(
                "head_floor must be in [0, 1] (a share of the average budget), got {head_floor}"
            )));
        }
        o.head_floor = head_floor;
        o.tail_check = tail_check;
        o.max_queries = max_queries;
        o.on_policy = on_policy;
        o.window = window;
        o.kernel = kernel;
        if let Some(hb) = head_budgets {
            o.head_budgets = if let Ok(name) = hb.extract::<String>() {
                match name.as_str() {
                    "global" => HeadBudgets::Global,
                    "uniform" => HeadBudgets::Uniform,
                    "entropy" => HeadBudgets::Entropy,
                    other => {
                        return Err(PyValueError::new_err(format!(
                            "head_budgets must be \"global\", \"uniform\", \"entropy\" or a [layer][head] table, got {other:?}"
                        )))
                    }
                }
            } else {
                HeadBudgets::PerHead(hb.extract::<Vec<Vec<usize>>>().map_err(|_| {
                    PyValueError::new_err("head_budgets table must be a list of lists of ints")
                })?)
            };
        }
        let suffix = suffix.map(|s| to_ids(&s)).transpose()?;
        let core = &mut self.core;
        let r = run(py, move || core.compact(&o, suffix.as_deref()))?;
        let d = PyDict::new(py);
        d.set_item("tokens_before", r.tokens_before)?;
        d.set_item("tokens_after", r.tokens_after)?;
        d.set_item("bytes_before", r.bytes_before)?;
        d.set_item("bytes_after", r.bytes_after)?;
        d.set_item("seconds_queries", r.seconds_queries)?;
        d.set_item("seconds_fit", r.seconds_fit)?;
        d.set_item("query_tokens", r.query_tokens)?;
        let fid = per_head(&r.heads, |h| {
            h.fidelity.map(|f| (f.mass_rel_err, f.out_rel_err))
        });
        d.set_item("fidelity", fid)?;
        d.set_item("nnls_converged", per_head(&r.heads, |h| h.nnls_converged))?;
        d.set_item(
            "tail_values_only",
            per_head(&r.heads, |h| h.tail_values_only),
        )?;
        Ok(d)
    }

    fn reset(&mut self, py: Python<'_>) -> PyResult<()> {
        let core = &mut self.core;
        run(py, move || core.reset())
    }

    /// Every layer's reference queries `[n_heads, len(ids), d]` for `ids` run on top of the
    /// cache (which is left unchanged).
    fn reference_queries<'py>(
        &mut self,
        py: Python<'py>,
        ids: Vec<i64>,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let ids = to_ids(&ids)?;
        let core = &mut self.core;
        let qs = run(py, move || {
            core.reference_queries(&ids)?
                .into_iter()
                .map(|q| {
                    let (h, s, d) = q.dims3()?;
                    Ok((
                        (h, s, d),
                        q.to_dtype(candle_core::DType::F32)?
                            .flatten_all()?
                            .to_vec1::<f32>()?,
                    ))
                })
                .collect::<crate::error::Result<Vec<_>>>()
        })?;
        qs.into_iter()
            .map(|((h, s, d), data)| {
                Ok(PyArray1::from_vec(py, data).reshape([h, s, d])?.into_any())
            })
            .collect()
    }

    /// One (layer, KV head)'s cached keys, values `[n, d]` and biases `[n]` (f32 copies).
    fn head_cache<'py>(
        &self,
        py: Python<'py>,
        layer: usize,
        head: usize,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let core = &self.core;
        let (k, v, b) = run(py, move || {
            let (k, v, b) = core.head_cache(layer, head)?;
            let flat = |t: &candle_core::Tensor| -> crate::error::Result<Vec<f32>> {
                Ok(t.flatten_all()?.to_vec1::<f32>()?)
            };
            Ok((flat(&k)?, flat(&v)?, flat(&b)?))
        })?;
        let n = b.len();
        Ok((
            f32_array(py, k, Some(n))?,
            f32_array(py, v, Some(n))?,
            f32_array(py, b, None)?,
        ))
    }

    fn cache_info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = &self.core.cache;
        let d = PyDict::new(py);
        let bytes = c.bytes_used();
        let tokens = c.next_position();
        d.set_item("tokens", tokens)?;
        d.set_item("layers", c.n_layers())?;
        d.set_item("kv_heads", c.n_kv_heads())?;
        d.set_item("head_dim", c.head_dim())?;
        d.set_item("dtype", dtype_name(c.dtype()))?;
        d.set_item("kv_dtype", c.quant().map(|q| q.name()))?;
        d.set_item("kv_group", c.quant().map(|q| q.group))?;
        d.set_item("tokens_per_head", c.tokens_per_head())?;
        d.set_item("bytes", bytes)?;
        d.set_item("capacity_bytes", c.bytes_allocated())?;
        d.set_item(
            "bytes_per_token",
            if tokens > 0 {
                bytes as f64 / tokens as f64
            } else {
                0.0
            },
        )?;
        Ok(d)
    }

    /// What the CUDA-graph decode path has done (see `KVFAST_CUDA_GRAPH` in docs/gpu.md).
    fn decode_info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = &self.core.graphs.stats;
        let d = PyDict::new(py);
        d.set_item("mode", crate::decode_graph::mode().name())?;
        d.set_item("setups", s.setups)?;
        d.set_item("captures", s.captures)?;
        d.set_item("replays", s.replays)?;
        d.set_item("static_eager_steps", s.eager_steps)?;
        d.set_item("capture_seconds", s.capture_seconds)?;
        d.set_item("replay_seconds", s.replay_seconds)?;
        d.set_item("replay_inputs_seconds", s.inputs_seconds)?;
        d.set_item("replay_launch_seconds", s.launch_seconds)?;
        d.set_item("replay_gpu_seconds", s.gpu_seconds)?;
        d.set_item("replay_wait_seconds", s.wait_seconds)?;
        d.set_item("replay_copy_seconds", s.copy_seconds)?;
        d.set_item("fused", s.fused)?;
        d.set_item("error", s.error.clone())?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        let c = self.core.config();
        format!(
            "Engine(model_type={:?}, layers={}, params={}, device={}, dtype={}, cache_len={})",
            c.model_type,
            c.num_hidden_layers,
            self.core.model.num_parameters(),
            self.device(),
            self.dtype(),
            self.cache_len()
        )
    }
}

fn to_ids(ids: &[i64]) -> PyResult<Vec<u32>> {
    ids.iter()
        .map(|&i| {
            u32::try_from(i)
                .map_err(|_| PyValueError::new_err(format!("token id {i} is out of range")))
        })
        .collect()
}

/// Iterator over generated token ids; each step samples, appends to the cache and yields.
#[pyclass(module = "kvfast._native")]
pub struct TokenStream {
    engine: Py<Engine>,
    sampler: Sampler,
    remaining: usize,
    eos: Vec<u32>,
    done: bool,
}

#[pymethods]
impl TokenStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<Option<u32>> {
        if self.done || self.remaining == 0 {
            return Ok(None);
        }
        let engine = self.engine.clone_ref(py);
        let mut engine = engine.bind(py).try_borrow_mut()?;
        let (core, sampler) = (&mut engine.core, &mut self.sampler);
        let id = run(py, move || core.step(sampler))?;
        self.remaining -= 1;
        self.done = self.eos.contains(&id);
        Ok(Some(id))
    }
}

/// Use the CBLAS in the shared library at `path` (symbol `prefix` + "cblas_sgemm") for CPU
/// prefill products.
#[pyfunction]
#[pyo3(signature = (path, prefix = ""))]
fn load_blas(path: PathBuf, prefix: &str) -> PyResult<()> {
    Ok(crate::blas::load(&path, prefix)?)
}

/// The Attention-Matching fit of one head on given arrays (for tests, cross-checks and speed
/// comparisons): `q [m, d]`, `k`/`v` `[n, d]` f32, `keep` the kept key indices, or `budget`
/// keys chosen by root-mean-square attention.
#[allow(clippy::too_many_arguments)]
#[pyfunction]
#[pyo3(signature = (q, k, v, keep = None, *, budget = None, bias = None, scale = None,
                    fit = "am", ridge = None, beta_bounds = Some(DEFAULT_BETA_BOUNDS)))]
fn fit_head<'py>(
    py: Python<'py>,
    q: PyReadonlyArray2<'py, f32>,
    k: PyReadonlyArray2<'py, f32>,
    v: PyReadonlyArray2<'py, f32>,
    keep: Option<Vec<u32>>,
    budget: Option<usize>,
    bias: Option<PyReadonlyArray1<'py, f32>>,
    scale: Option<f32>,
    fit: &str,
    ridge: Option<f64>,
    beta_bounds: Option<(f64, f64)>,
) -> PyResult<Bound<'py, PyDict>> {
    let d = q.shape()[1];
    if k.shape() != v.shape() || k.shape()[1] != d {
        return Err(PyValueError::new_err(format!(
            "q, k, v must share the last dimension and k, v the shape; got {:?}, {:?}, {:?}",
            q.shape(),
            k.shape(),
            v.shape()
        )));
    }
    let owned = |a: &PyReadonlyArray2<'py, f32>| a.as_array().iter().copied().collect::<Vec<f32>>();
    let (q, k, v) = (owned(&q), owned(&k), owned(&v));
    let bias = match bias {
        Some(b) => b.as_array().to_vec(),
        None => vec![0f32; k.len() / d.max(1)],
    };
    let what = Fit::parse(fit)?;
    let params = FitParams {
        ridge,
        beta_bounds,
        ..FitParams::default()
    };
    let scale = scale.unwrap_or(1.0 / (d as f32).sqrt());
    let which = match (&keep, budget) {
        (Some(keep), None) => Keep::These(keep),
        (None, Some(t)) => Keep::TopRms(t),
        _ => {
            return Err(PyValueError::new_err(
                "fit_head: give either keep (indices) or budget (a key count), not both",
            ))
        }
    };
    let (keep, f) = run(py, || {
        let h = HeadData {
            q: &q,
            k: &k,
            v: &v,
            bias: &bias,
            d,
            scale,
        };
        fit_one_head(&h, which, what, &params)
    })?;
    let t = keep.len();
    let out = PyDict::new(py);
    out.set_item("keep", keep)?;
    out.set_item("bias", f32_array(py, f.bias, None)?)?;
    out.set_item("values", f32_array(py, f.values, Some(t))?)?;
    out.set_item("mass_rel_err", f.fidelity.mass_rel_err)?;
    out.set_item("out_rel_err", f.fidelity.out_rel_err)?;
    out.set_item("nnls_converged", f.nnls_converged)?;
    Ok(out)
}

#[pyfunction]
fn blas_available() -> bool {
    crate::blas::available()
}

/// The metadata of a GGUF file (tokenizer vocabulary, merges, chat template, ...), as Python
/// values; tensors are not read.
#[pyfunction]
fn gguf_metadata<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let weights = run(py, || {
        crate::gguf::GgufWeights::open(&path, &candle_core::Device::Cpu)
    })?;
    let d = PyDict::new(py);
    for (k, v) in weights.metadata() {
        d.set_item(k, gguf_value(py, v)?)?;
    }
    Ok(d)
}

fn gguf_value<'py>(
    py: Python<'py>,
    v: &candle_core::quantized::gguf_file::Value,
) -> PyResult<Bound<'py, PyAny>> {
    use candle_core::quantized::gguf_file::Value as V;
    Ok(match v {
        V::U8(x) => x.into_pyobject(py)?.into_any(),
        V::I8(x) => x.into_pyobject(py)?.into_any(),
        V::U16(x) => x.into_pyobject(py)?.into_any(),
        V::I16(x) => x.into_pyobject(py)?.into_any(),
        V::U32(x) => x.into_pyobject(py)?.into_any(),
        V::I32(x) => x.into_pyobject(py)?.into_any(),
        V::U64(x) => x.into_pyobject(py)?.into_any(),
        V::I64(x) => x.into_pyobject(py)?.into_any(),
        V::F32(x) => x.into_pyobject(py)?.into_any(),
        V::F64(x) => x.into_pyobject(py)?.into_any(),
        V::Bool(x) => pyo3::types::PyBool::new(py, *x).to_owned().into_any(),
        V::String(x) => x.into_pyobject(py)?.into_any(),
        V::Array(xs) => {
            let items = xs
                .iter()
                .map(|x| gguf_value(py, x))
                .collect::<PyResult<Vec<_>>>()?;
            pyo3::types::PyList::new(py, items)?.into_any()
        }
    })
}

#[pyfunction]
fn cuda_available() -> bool {
    cfg!(feature = "cuda") && crate::device::parse_device("cuda").is_ok()
}

#[pyfunction(name = "build_features")]
fn py_build_features() -> Vec<&'static str> {
    build_features()
}

fn make_exception<'py>(
    py: Python<'py>,
    name: &str,
    bases: Bound<'py, PyTuple>,
    doc: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let ns = PyDict::new(py);
    ns.set_item("__module__", "kvfast._native")?;
    ns.set_item("__doc__", doc)?;
    py.get_type::<PyType>().call1((name, bases, ns))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // The value ridges `Session.compact`'s `ridge="auto"` picks between.
    m.add("DEFAULT_RIDGE", DEFAULT_RIDGE)?;
    m.add("VALUES_RIDGE", VALUES_RIDGE)?;
    // ModelLoadError is both a KvfastError and a ValueError, which `create_exception!` cannot
    // express, so both classes are made with `type(...)`.
    let base = make_exception(
        py,
        "KvfastError",
        PyTuple::new(py, [py.get_type::<PyException>()])?,
        "Base class of every error raised by the native module.",
    )?;
    let load = make_exception(
        py,
        "ModelLoadError",
        PyTuple::new(py, [base.clone(), py.get_type::<PyValueError>().into_any()])?,
        "A checkpoint could not be loaded: bad config, missing or misshapen tensor, truncated file.",
    )?;
    m.add("KvfastError", base)?;
    m.add("ModelLoadError", load)?;
    m.add_class::<Engine>()?;
    m.add_class::<TokenStream>()?;
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(gguf_metadata, m)?)?;
    m.add_function(wrap_pyfunction!(load_blas, m)?)?;
    m.add_function(wrap_pyfunction!(blas_available, m)?)?;
    m.add_function(wrap_pyfunction!(fit_head, m)?)?;
    m.add_function(wrap_pyfunction!(py_build_features, m)?)?;
    Ok(())
}

/// A `[layer][kv_head]` table of one field of each head's compaction outcome.
fn per_head<T>(heads: &[Vec<HeadOutcome>], f: impl Fn(&HeadOutcome) -> T) -> Vec<Vec<T>> {
    heads.iter().map(|l| l.iter().map(&f).collect()).collect()
}
