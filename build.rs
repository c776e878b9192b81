//! With the `cuda` feature, compiles the fused decode kernels (rust/src/kernels/decode.cu) to
//! PTX with nvcc, for the compute capability in CUDA_COMPUTE_CAP (as candle's kernels; default
//! 75). The driver JIT-compiles the PTX for the GPU at hand. Other builds need no nvcc.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const SOURCE: &str = "rust/src/kernels/decode.cu";

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed={SOURCE}");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("decode.ptx");
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "75".into());
    let nvcc = env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = Command::new(&nvcc)
        .args(["-ptx", "-O3", &format!("-arch=compute_{cap}"), SOURCE, "-o"])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {nvcc} (needed by the `cuda` feature): {e}"));
    assert!(status.success(), "{nvcc} failed on {SOURCE}");
}
