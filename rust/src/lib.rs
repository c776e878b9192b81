//! kvfast: Qwen3 inference on candle with a ragged, biased KV cache built for compaction.
//!
//! Pipeline: `config` + `weights` / `gguf` (load) -> `model` (forward) -> `cache` + `attention` ->
//! `sample` (decode); `engine` ties one model to one sequence; `python` is the PyO3 boundary.

pub mod attention;
pub mod attention_cpu;
pub mod blas;
pub mod cache;
pub mod compact;
pub mod config;
pub mod decode_graph;
pub mod device;
pub mod engine;
pub mod error;
pub mod fused;
pub mod gemv;
pub mod gguf;
pub mod kv_quant;
pub mod model;
pub mod qgemv;
pub mod sample;
pub mod threads;
pub mod weights;

mod python;
