//! Parsing of the user's device and dtype strings.

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// Opens the device named by `spec`: "cpu", "cuda", "cuda:N" or "metal" ("metal:N").
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    let (kind, ordinal) = match spec.split_once(':') {
        Some((k, n)) => {
            let n: usize = n
                .parse()
                .map_err(|_| Error::invalid(format!("bad device ordinal in {spec:?}")))?;
            (k.to_string(), n)
        }
        None => (spec.clone(), 0),
    };
    match kind.as_str() {
        "cpu" if !spec.contains(':') => Ok(Device::Cpu),
        "cuda" => open_cuda(ordinal),
        "metal" => open_metal(ordinal),
        _ => Err(Error::invalid(format!(
            "unknown device {spec:?}: expected \"cpu\", \"cuda\", \"cuda:N\" or \"metal\""
        ))),
    }
}

/// One owned stream for all of kvfast's GPU work. candle's default is CUDA's per-thread default
/// stream, so work issued from different host threads (our entry points run on pool workers,
/// compaction reads heads in parallel) lands on different, unordered streams. With one stream
/// every op is ordered whatever thread issues it; cudarc's cross-stream event tracking is then
/// pure overhead (an event record per buffer per op), so it is turned off.
#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device> {
    let device = Device::new_cuda_with_stream(ordinal)
        .map_err(|e| Error::DeviceUnavailable(format!("cannot open cuda:{ordinal}: {e}")))?;
    if let Device::Cuda(d) = &device {
        // SAFETY: all of kvfast's CUDA work goes to this device's one stream, so no buffer is
        // ever used on another stream (the case event tracking exists for).
        unsafe { d.disable_event_tracking() };
    }
    Ok(device)
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_ordinal: usize) -> Result<Device> {
    Err(Error::DeviceUnavailable(
        "device \"cuda\" is not available: this build of kvfast has no CUDA support \
         (build it with the `cuda` feature)"
            .into(),
    ))
}

#[cfg(feature = "metal")]
fn open_metal(ordinal: usize) -> Result<Device> {
    Device::new_metal(ordinal)
        .map_err(|e| Error::DeviceUnavailable(format!("cannot open metal:{ordinal}: {e}")))
}

#[cfg(not(feature = "metal"))]
fn open_metal(_ordinal: usize) -> Result<Device> {
    Err(Error::DeviceUnavailable(
        "device \"metal\" is not available: this build of kvfast has no Metal support \
         (build it on macOS with the `metal` feature)"
            .into(),
    ))
}

/// Weight formats a safetensors checkpoint can be quantized to on load (`dtype="q8_0"`, ...):
/// the matrices become llama.cpp blocks (candle's `QMatMul`), computed with f32 activations.
pub const WEIGHT_FORMATS: [(&str, GgmlDType); 8] = [
    ("q8_0", GgmlDType::Q8_0),
    ("q4_0", GgmlDType::Q4_0),
    ("q4_1", GgmlDType::Q4_1),
    ("q5_0", GgmlDType::Q5_0),
    ("q5_1", GgmlDType::Q5_1),
    ("q4k", GgmlDType::Q4K),
    ("q5k", GgmlDType::Q5K),
    ("q6k", GgmlDType::Q6K),
];

/// The quantized weight format named by `spec`, if it names one.
pub fn parse_weight_format(spec: &str) -> Option<GgmlDType> {
    let s = spec.trim().to_ascii_lowercase().replace("_k", "k");
    WEIGHT_FORMATS
        .iter()
        .find(|(n, _)| n.replace("_k", "k") == s)
        .map(|(_, d)| *d)
}

/// Parses "f32" | "f16" | "bf16" (and the torch-style long names).
pub fn parse_dtype(spec: &str) -> Result<DType> {
    match spec.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" | "float" => Ok(DType::F32),
        "f16" | "float16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(Error::invalid(format!(
            "unsupported dtype {other:?}: expected \"f32\", \"f16\", \"bf16\" or a weight \
             format ({})",
            WEIGHT_FORMATS.map(|(n, _)| n).join(", ")
        ))),
    }
}

pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F64 => "f64",
        _ => "other",
    }
}

pub fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            _ => "cuda".into(),
        },
        Device::Metal(_) => "metal".into(),
    }
}

/// The features compiled into this build.
pub fn build_features() -> Vec<&'static str> {
    let mut f = Vec::new();
    if cfg!(feature = "cuda") {
        f.push("cuda");
    }
    if cfg!(feature = "metal") {
        f.push("metal");
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_and_dtypes() {
        assert!(matches!(parse_device("cpu"), Ok(Device::Cpu)));
        assert!(matches!(
            parse_device("tpu"),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            parse_device("cuda:x"),
            Err(Error::InvalidArgument(_))
        ));
        #[cfg(not(feature = "cuda"))]
        assert!(matches!(
            parse_device("cuda:0"),
            Err(Error::DeviceUnavailable(_))
        ));
        assert_eq!(parse_dtype("bf16").unwrap(), DType::BF16);
        assert_eq!(parse_dtype("float16").unwrap(), DType::F16);
        assert!(parse_dtype("f8").unwrap_err().to_string().contains("f8"));
    }
}
