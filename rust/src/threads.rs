//! One worker pool for all CPU compute. Entry points run *inside* it (`install`), so the many
//! small parallel loops of a decode step (ours, candle's, gemm's) fork and join among pool
//! workers instead of each waking the pool from an outside thread and sleeping on a latch: that
//! hand-off cost two context switches per parallel op and dominated small-model decode.

use std::sync::OnceLock;

static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();

fn pool() -> &'static rayon::ThreadPool {
    POOL.get_or_init(|| {
        // RAYON_NUM_THREADS is honoured by the builder; default: all available cores.
        rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("kvfast-{i}"))
            .build()
            .expect("cannot start the kvfast worker pool")
    })
}

/// Runs `f` on the kvfast pool (directly, if already on one of its workers).
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    pool().install(f)
}

/// Number of worker threads.
pub fn num_threads() -> usize {
    pool().current_num_threads()
}
