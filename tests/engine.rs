//! Engine-level checks on the embedded qwen3-tiny checkpoint (no fixtures needed): prefill in
//! pieces equals one pass, across the decode-kernel and prefill-chunk boundaries.

use std::path::PathBuf;

use _native::engine::{Engine, LogitsWant, PREFILL_CHUNK};

fn tiny() -> Engine {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/kvfast/data/qwen3-tiny");
    Engine::load(&dir, "cpu", Some("f32")).expect("embedded model loads")
}

fn ids(n: usize) -> Vec<u32> {
    (0..n).map(|i| (1 + (i * 7919) % 8000) as u32).collect()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn pieces_equal_one_pass_across_chunk_boundaries() {
    let n = PREFILL_CHUNK + 100;
    let all = ids(n);
    let mut one = tiny();
    let want = one.prefill(&all, LogitsWant::All).unwrap().unwrap();
    let mut inc = tiny();
    let mut got = Vec::new();
    // 1 token (decode kernel), 7 (decode kernel, causal), 300 (GEMM path), then the rest.
    for range in [0..1, 1..8, 8..308, 308..n] {
        got.extend(inc.prefill(&all[range], LogitsWant::All).unwrap().unwrap());
    }
    let err = max_abs(&got, &want);
    assert!(err < 1e-4, "max abs logit difference {err}");
    assert_eq!(inc.cache.next_position(), n);
    assert_eq!(inc.cache.tokens_per_head(), vec![vec![n; 2]; 4]);
    assert_eq!(inc.history(), &all[..]);
}

#[test]
fn score_matches_log_softmax_of_prefill_logits() {
    let all = ids(40);
    let mut a = tiny();
    let logits = a.prefill(&all, LogitsWant::All).unwrap().unwrap();
    let vocab = a.config().vocab_size;
    let mut b = tiny();
    b.prefill(&all[..1], LogitsWant::None).unwrap();
    let nll = b.score(&all[1..]).unwrap();
    for (i, &x) in nll.iter().enumerate() {
        let row = &logits[i * vocab..(i + 1) * vocab];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
        let want = lse - row[all[i + 1] as usize];
        assert!((x - want).abs() < 1e-3, "token {i}: {x} vs {want}");
    }
}

#[test]
fn bad_ids_leave_the_cache_untouched() {
    let mut e = tiny();
    e.prefill(&ids(5), LogitsWant::None).unwrap();
    let err = e.prefill(&[1, 2, 999_999], LogitsWant::Last).unwrap_err().to_string();
    assert!(err.contains("999999"), "{err}");
    assert!(e.prefill(&[], LogitsWant::Last).unwrap_err().to_string().contains("empty"));
    assert_eq!(e.cache.next_position(), 5);
    assert_eq!(e.history().len(), 5);
}
