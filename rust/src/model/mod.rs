//! Model architectures. Each file reads top to bottom as its architecture.

pub mod qwen3;
pub mod rope;
