//! Decode steps replayed from a CUDA graph.
//!
//! Why: on a GPU a decode step of a small model is bound by kernel launches, not memory (a
//! Qwen3-0.6B step issues ~600 candle ops at 8-10 us of host time each, while its 1.2 GB of
//! weights take ~0.3 ms to read). A CUDA graph records the step's launches once and replays
//! them with one call: on an H200, 0.6B decode went from 157-228 to 341-368 tok/s (docs/gpu.md).
//!
//! A graph replays the exact kernels, shapes and addresses it recorded, so the step
//! ([`Qwen3::decode_static`]) is written to keep all of them fixed while the cache grows:
//! - the token id, the RoPE table row and the cache row to write are read from one small
//!   device tensor ([`StepIo::inputs`]) refreshed before each replay;
//! - the new keys and values are scattered into each layer's packed buffers at that row (a
//!   device-side index, not a host offset);
//! - attention covers a fixed span of rows (the length rounded up to [`SPAN_STEP`]) under a mask
//!   computed on the device from the same row, so one graph serves every length in its span;
//! - logits land in a fixed output buffer, and every temporary is freed inside the step, so
//!   the graph owns no memory the host sees.
//!
//! One graph is kept: when the step leaves its span or RoPE table, or the cache's buffers are
//! reallocated (growth, reset), the next step runs eagerly with candle's host-to-device cache
//! on (which records the layout uploads a capture replays) and is then captured. Caches that
//! are not packed in every layer (after compaction), quantized caches, quantized weights and
//! other devices take the ordinary step. `KVFAST_CUDA_GRAPH=0` turns graphs off;
//! `KVFAST_CUDA_GRAPH=eager` runs the static step without capture on any device (tests, and
//! measuring what the static formulation itself costs).

use candle_core::{DType, Tensor};

use crate::cache::KvCache;
use crate::error::Result;
use crate::model::qwen3::Qwen3;

/// Attention spans are lengths rounded up to a multiple of this (capped by the capacity): the
/// step reads at most this many unused rows per head, and a graph is recaptured this often.
pub const SPAN_STEP: usize = 512;

/// The fixed buffers one static step reads and writes.
#[derive(Debug)]
pub struct StepIo {
    /// u32 `[3]`: token id, row of `cos`/`sin` (its position), cache row to write (the length
    /// before the step).
    pub inputs: Tensor,
    /// RoPE tables `[rows, head_dim / 2]` for positions `table_start..`.
    pub cos: Tensor,
    pub sin: Tensor,
    /// u32 `[span]` = `0..span`, and the two mask values, f32 `[span]`.
    pub rows: Tensor,
    pub zeros: Tensor,
    pub neg_inf: Tensor,
    /// f32 `[1, vocab]`.
    pub logits: Tensor,
    pub span: usize,
    table_start: usize,
}

impl StepIo {
    /// Buffers for steps writing rows `len..span` at positions `position..`.
    fn new(model: &Qwen3, span: usize, len: usize, position: usize) -> Result<Self> {
        let dev = model.device();
        let (cos, sin) = model.rope_tables(position, span - len)?;
        Ok(Self {
            inputs: Tensor::zeros(3, DType::U32, dev)?,
            cos,
            sin,
            rows: Tensor::arange(0u32, span as u32, dev)?,
            zeros: Tensor::zeros(span, DType::F32, dev)?,
            neg_inf: Tensor::full(f32::NEG_INFINITY, span, dev)?,
            logits: Tensor::zeros((1, model.cfg.vocab_size), DType::F32, dev)?,
            span,
            table_start: position,
        })
    }

    /// Whether a step at cache row `len` and `position` fits these buffers.
    fn covers(&self, len: usize, position: usize) -> bool {
        len < self.span
            && position >= self.table_start
            && position - self.table_start < self.cos.dim(0).unwrap_or(0)
    }

    fn write_inputs(&self, id: u32, len: usize, position: usize) -> Result<()> {
        let row = (position - self.table_start) as u32;
        let src = Tensor::new(&[id, row, len as u32], self.inputs.device())?;
        self.inputs.slice_set(&src, 0, 0)?;
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Off,
    Graph,
    Eager,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Graph => "graph",
            Mode::Eager => "eager",
        }
    }
}

/// The mode `KVFAST_CUDA_GRAPH` asks for (read per step, so a benchmark can compare in-process).
pub fn mode() -> Mode {
    match std::env::var("KVFAST_CUDA_GRAPH").as_deref() {
        Ok("0") => Mode::Off,
        Ok("eager") => Mode::Eager,
        _ => Mode::Graph,
    }
}

/// What the graph path has done, for `Engine.decode_info()`.
#[derive(Debug, Clone, Default)]
pub struct GraphStats {
    /// Fixed buffer sets built (one per span and RoPE table; each is captured once).
    pub setups: usize,
    pub captures: usize,
    pub replays: usize,
    /// Static steps run eagerly (the step before each capture, or all in eager mode).
    pub eager_steps: usize,
    pub capture_seconds: f64,
    /// Wall time of replayed steps, from writing the inputs to a device copy of the logits
    /// (the GPU's share of a token plus a small upload).
    pub replay_seconds: f64,
    /// The replayed steps' time split: writing the inputs, launching the graph (host), its
    /// GPU time (CUDA events around the launch), waiting for it, copying the logits out of
    /// the graph's buffer (on the device; the host reads them, or only their argmax, later).
    pub inputs_seconds: f64,
    pub launch_seconds: f64,
    pub gpu_seconds: f64,
    pub wait_seconds: f64,
    pub copy_seconds: f64,
    /// Whether the last captured or eager static step ran the fused kernels (`fused`).
    pub fused: bool,
    /// Why graphs were turned off for this engine (a failed capture), if they were.
    pub error: Option<String>,
}

impl Captured {
    fn is_captured(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.graph.is_some();
        #[cfg(not(feature = "cuda"))]
        false
    }
}

/// Each layer's packed key and value buffers.
type LayerBuffers = Vec<(Tensor, Tensor)>;

struct Captured {
    io: StepIo,
    /// The packed buffers the step writes, kept alive while the graph holds their addresses.
    bufs: LayerBuffers,
    #[cfg(feature = "cuda")]
    graph: Option<Graph>,
}

/// A captured graph, movable between threads with its engine.
#[cfg(feature = "cuda")]
struct Graph(candle_core::cuda::cudarc::driver::CudaGraph);

// SAFETY: CUDA graph handles are not internally synchronised. This one is only launched
// through `&mut DecodeGraphs` (an engine's exclusive borrow), so never from two threads at
// once; `&DecodeGraphs` exposes only the counters. The driver allows launching a graph from
// any thread that binds its context, which cudarc's `launch` does.
#[cfg(feature = "cuda")]
unsafe impl Send for Graph {}
#[cfg(feature = "cuda")]
unsafe impl Sync for Graph {}

/// One engine's decode graph (see the module docs).
#[derive(Default)]
pub struct DecodeGraphs {
    current: Option<Captured>,
    pub stats: GraphStats,
}

impl DecodeGraphs {
    /// Drops the captured graph and its buffers (the cache is about to change shape).
    pub fn clear(&mut self) {
        self.current = None;
    }

    /// Runs the decode step of token `id` through the static path when it applies, advancing
    /// `cache`; returns its f32 logits `[1, vocab]` on the model's device (a copy: the next
    /// step overwrites the fixed buffer), or None when the caller must run the ordinary step.
    pub fn step(&mut self, model: &Qwen3, cache: &mut KvCache, id: u32) -> Result<Option<Tensor>> {
        self.step_in(mode(), model, cache, id)
    }

    /// [`DecodeGraphs::step`] in an explicit mode (the tests pick it).
    pub fn step_in(
        &mut self,
        mode: Mode,
        model: &Qwen3,
        cache: &mut KvCache,
        id: u32,
    ) -> Result<Option<Tensor>> {
        let eligible = match mode {
            Mode::Off => false,
            Mode::Graph => model.device().is_cuda() && self.stats.error.is_none(),
            Mode::Eager => true,
        } && model.is_dense()
            && cache.quant().is_none();
        let Some((bufs, len, cap)) = eligible.then(|| packed(cache)).flatten() else {
            self.current = None;
            return Ok(None);
        };
        if len == 0 || len >= cap {
            // Nothing to continue from, or no room: the ordinary step grows the buffers.
            self.current = None;
            return Ok(None);
        }
        let position = cache.next_position();
        let reuse = self.current.as_ref().is_some_and(|c| {
            c.io.covers(len, position)
                && c.bufs.len() == bufs.len()
                && c.bufs
                    .iter()
                    .zip(&bufs)
                    .all(|(a, b)| a.0.id() == b.0.id() && a.1.id() == b.1.id())
        });
        if !reuse {
            self.current = None;
            let span = (len + 1)
                .div_ceil(SPAN_STEP)
                .saturating_mul(SPAN_STEP)
                .min(cap);
            let io = StepIo::new(model, span, len, position)?;
            self.stats.setups += 1;
            self.current = Some(Captured {
                io,
                bufs,
                #[cfg(feature = "cuda")]
                graph: None,
            });
        }
        let t0 = std::time::Instant::now();
        let replay =
            matches!(mode, Mode::Graph) && self.current.as_ref().is_some_and(|c| c.is_captured());
        let cur = self.current.as_mut().expect("set above");
        if !replay {
            // A replay runs whatever its capture recorded.
            self.stats.fused = crate::fused::available(&cur.io.cos);
        }
        cur.io.write_inputs(id, len, position)?;
        if replay {
            self.stats.inputs_seconds += t0.elapsed().as_secs_f64();
        }
        match mode {
            Mode::Graph => self.graph_step(model)?,
            _ => {
                model.decode_static(&cur.io, &cur.bufs)?;
                self.stats.eager_steps += 1;
            }
        }
        let cur = self.current.as_ref().expect("still set");
        let t_copy = std::time::Instant::now();
        let logits = cur.io.logits.copy()?;
        if replay {
            self.stats.copy_seconds += t_copy.elapsed().as_secs_f64();
            self.stats.replay_seconds += t0.elapsed().as_secs_f64();
        }
        cache.note_written(1)?;
        Ok(Some(logits))
    }

    /// Replays the graph, or runs the step eagerly and captures it for the next steps.
    #[cfg(feature = "cuda")]
    fn graph_step(&mut self, model: &Qwen3) -> Result<()> {
        use candle_core::cuda::cudarc::driver::sys;
        let cur = self.current.as_mut().expect("set by step");
        let dev = model.device().as_cuda_device()?;
        let stream = dev.cuda_stream();
        if let Some(Graph(g)) = &cur.graph {
            let timed = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
            let t0 = std::time::Instant::now();
            let start = stream.record_event(timed).map_err(cuda_err)?;
            g.launch().map_err(cuda_err)?;
            let end = stream.record_event(timed).map_err(cuda_err)?;
            let t1 = std::time::Instant::now();
            end.synchronize().map_err(cuda_err)?;
            let s = &mut self.stats;
            s.launch_seconds += (t1 - t0).as_secs_f64();
            s.wait_seconds += t1.elapsed().as_secs_f64();
            s.gpu_seconds += f64::from(start.elapsed_ms(&end).map_err(cuda_err)?) / 1e3;
            s.replays += 1;
            return Ok(());
        }
        let t0 = std::time::Instant::now();
        // The real step, eagerly: it also fills candle's cache of layout uploads, which the
        // capture then reads instead of uploading.
        let _uploads = dev.enable_cuda_graph_htod_cache();
        model.decode_static(&cur.io, &cur.bufs)?;
        self.stats.eager_steps += 1;
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(cuda_err)?;
        let body = model.decode_static(&cur.io, &cur.bufs);
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        let graph = match (body, graph) {
            (Ok(()), Ok(Some(g))) => g.upload().map(|()| g).map_err(cuda_err),
            (Err(e), _) => Err(e),
            (_, Err(e)) => Err(cuda_err(e)),
            (_, Ok(None)) => Err(crate::error::Error::invalid(
                "the capture recorded no graph",
            )),
        };
        match graph {
            Ok(g) => {
                cur.graph = Some(Graph(g));
                self.stats.captures += 1;
                self.stats.capture_seconds += t0.elapsed().as_secs_f64();
            }
            // The eager step above already produced this token; later steps go the ordinary way.
            Err(e) => self.stats.error = Some(e.to_string()),
        }
        Ok(())
    }

    #[cfg(not(feature = "cuda"))]
    fn graph_step(&mut self, _model: &Qwen3) -> Result<()> {
        Err(crate::error::Error::invalid(
            "CUDA graphs need a build with the `cuda` feature",
        ))
    }
}

#[cfg(feature = "cuda")]
fn cuda_err(e: candle_core::cuda::cudarc::driver::DriverError) -> crate::error::Error {
    crate::error::Error::invalid(format!("CUDA graph: {e}"))
}

/// Every layer's whole packed buffers, the common length and capacity, if every layer is
/// packed at the same length.
fn packed(cache: &KvCache) -> Option<(LayerBuffers, usize, usize)> {
    let mut bufs = Vec::with_capacity(cache.n_layers());
    let mut shape = None;
    for layer in &cache.layers {
        let (k, v, len) = layer.packed_buffers()?;
        let cap = k.dim(1).ok()?;
        if *shape.get_or_insert((len, cap)) != (len, cap) {
            return None;
        }
        bufs.push((k.clone(), v.clone()));
    }
    shape.map(|(len, cap)| (bufs, len, cap))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Engine;

    fn tiny() -> Result<Qwen3> {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/kvfast/data/qwen3-tiny");
        Ok(Engine::load(&dir, "cpu", Some("f32"))?.model)
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn ordinary_step(model: &Qwen3, cache: &mut KvCache, id: u32) -> Result<Vec<f32>> {
        let h = model.forward(&[id], cache)?;
        Ok(model.logits(&h)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// The static step (scatter at a device row, masked span, RoPE by table row) gives the
    /// ordinary step's logits and cache rows, over steps that cross a capacity and a span.
    #[test]
    fn static_step_matches_ordinary_step() -> Result<()> {
        let model = tiny()?;
        let prompt: Vec<u32> = (0..60).map(|i| (i * 37 % 199) as u32).collect();
        let mut a = model.new_cache()?;
        model.forward(&prompt, &mut a)?;
        let mut b = a.clone();
        let mut graphs = DecodeGraphs::default();
        let mut static_steps = 0;
        for (i, id) in (0..1500u32).map(|i| (i * 11 + 3) % 199).enumerate() {
            let want = ordinary_step(&model, &mut a, id)?;
            let got = match graphs.step_in(Mode::Eager, &model, &mut b, id)? {
                Some(l) => {
                    static_steps += 1;
                    l.flatten_all()?.to_vec1::<f32>()?
                }
                // Capacity full: the ordinary step grows the buffers, as the engine does.
                None => ordinary_step(&model, &mut b, id)?,
            };
            let d = max_diff(&got, &want);
            assert!(d < 1e-4, "step {i}: logits differ by {d}");
            assert_eq!(a.next_position(), b.next_position());
        }
        // 60 + 1500 tokens fill capacities 64, 128, 256, 512 and 1024 (5 ordinary steps); the
        // spans are 64, 128, 256, 512, 1024, then 1536 and 2048 in the 2048-row buffers.
        assert_eq!(static_steps, 1495);
        assert_eq!(graphs.stats.setups, 7);
        assert_eq!(graphs.stats.eager_steps, static_steps);
        // Rows written by scatter equal the appended ones up to f32 rounding (the two paths
        // attend with different kernels, so the layers' inputs differ in the last bits).
        for l in 0..a.n_layers() {
            for h in 0..a.n_kv_heads() {
                let (ka, kb) = (a.head(l, h).keys()?, b.head(l, h).keys()?);
                let (va, vb) = (a.head(l, h).values()?, b.head(l, h).values()?);
                let dk = (ka - kb)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let dv = (va - vb)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(dk < 1e-4 && dv < 1e-4, "layer {l} head {h}: {dk} {dv}");
            }
        }
        Ok(())
    }

    /// A compacted (ragged) layer, or the graph mode on the CPU, is not covered: the caller
    /// runs the ordinary step and the cache is untouched.
    #[test]
    fn uncovered_caches_take_the_ordinary_step() -> Result<()> {
        let model = tiny()?;
        let mut cache = model.new_cache()?;
        model.forward(&[1, 2, 3, 4], &mut cache)?;
        let mut graphs = DecodeGraphs::default();
        assert!(graphs
            .step_in(Mode::Graph, &model, &mut cache, 5)?
            .is_none());
        assert!(graphs.step_in(Mode::Off, &model, &mut cache, 5)?.is_none());
        let k = cache.head(0, 0).keys()?.narrow(0, 0, 2)?;
        cache.replace_head(0, 0, &k, &k, None)?;
        assert!(graphs
            .step_in(Mode::Eager, &model, &mut cache, 5)?
            .is_none());
        assert_eq!(cache.next_position(), 4);
        assert_eq!(graphs.stats.eager_steps, 0);
        Ok(())
    }
}
