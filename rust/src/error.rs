//! One error type for the crate. `python.rs` maps each variant to the Python exception a user
//! expects (FileNotFoundError, ValueError, RuntimeError, ModelLoadError).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory the user named does not exist.
    #[error("{what} not found: {path}")]
    NotFound { what: &'static str, path: PathBuf },

    /// `config.json` is missing fields, unparsable, or describes another architecture.
    #[error("bad config {path}: {msg}")]
    Config { path: PathBuf, msg: String },

    /// A weight file is unreadable, truncated or holds an unsupported dtype.
    #[error("cannot read weights {path}: {msg}")]
    Weights { path: PathBuf, msg: String },

    #[error("missing tensor {name:?} (looked in {files})")]
    MissingTensor { name: String, files: String },

    #[error("tensor {name:?} has shape {got:?}, expected {expected:?} from config.json")]
    TensorShape {
        name: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },

    /// Bad argument from the caller (unknown dtype, token id out of range, empty input, ...).
    #[error("{0}")]
    InvalidArgument(String),

    /// The requested device exists as a name but this build or machine cannot provide it.
    #[error("{0}")]
    DeviceUnavailable(String),

    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
}
