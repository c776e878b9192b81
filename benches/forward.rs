//! Criterion benchmarks of the forward pass: one decode step at 512 and 2048 cached tokens and
//! a 512-token prefill, for `qwen3-small` (../shared/models) and a random-weight model of the
//! real Qwen3-0.6B shape (../shared/configs). Paths can be overridden with
//! KVFAST_BENCH_SMALL=<checkpoint dir> and KVFAST_BENCH_CONFIG=<config.json>.

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

use _native::engine::{Engine, LogitsWant};
use _native::sample::{Sampler, SamplingParams};

fn shared(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared")
        .join(rel)
}

fn engines() -> Vec<(&'static str, Engine)> {
    let small = std::env::var("KVFAST_BENCH_SMALL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| shared("models/qwen3-small"));
    let cfg = std::env::var("KVFAST_BENCH_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|_| shared("configs/qwen3-0.6b.json"));
    let small = Engine::load(&small, "cpu", None)
        .unwrap_or_else(|e| panic!("cannot load qwen3-small ({e}); set KVFAST_BENCH_SMALL"));
    let big = Engine::random(&cfg, "cpu", None, 0)
        .unwrap_or_else(|e| panic!("cannot build the 0.6B shape ({e}); set KVFAST_BENCH_CONFIG"));
    vec![("qwen3-small", small), ("qwen3-0.6b-shape", big)]
}

fn prompt(n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| (1 + (i * 7919) % (vocab - 1)) as u32)
        .collect()
}

fn bench(c: &mut Criterion) {
    for (name, mut engine) in engines() {
        let vocab = engine.config().vocab_size;
        let mut g = c.benchmark_group(name);
        g.sample_size(10);
        g.bench_function("prefill_512", |b| {
            b.iter(|| {
                engine.reset().unwrap();
                engine
                    .prefill(&prompt(512, vocab), LogitsWant::Last)
                    .unwrap();
            })
        });
        for ctx in [512usize, 2048] {
            engine.reset().unwrap();
            engine
                .prefill(&prompt(ctx, vocab), LogitsWant::None)
                .unwrap();
            let mut sampler = Sampler::new(SamplingParams::default(), Some(0)).unwrap();
            g.bench_with_input(BenchmarkId::new("decode_step", ctx), &ctx, |b, _| {
                // Each step appends one token; a few hundred steps barely move the context.
                b.iter(|| engine.step(&mut sampler).unwrap())
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
