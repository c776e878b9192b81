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
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
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
    let err = e
        .prefill(&[1, 2, 999_999], LogitsWant::Last)
        .unwrap_err()
        .to_string();
    assert!(err.contains("999999"), "{err}");
    assert!(e
        .prefill(&[], LogitsWant::Last)
        .unwrap_err()
        .to_string()
        .contains("empty"));
    assert_eq!(e.cache.next_position(), 5);
    assert_eq!(e.history().len(), 5);
}

#[test]
fn query_capture_leaves_outputs_unchanged() {
    let all = ids(40);
    let (mut a, mut b) = (tiny(), tiny());
    let ha = a.model.forward(&all, &mut a.cache).unwrap();
    let mut qs = Vec::new();
    let hb = b
        .model
        .forward_capture(&all, &mut b.cache, Some(&mut qs))
        .unwrap();
    let diff = (ha - hb)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
    assert_eq!(qs.len(), 4);
    assert!(qs.iter().all(|q| q.dims() == [4, 40, 64]));
}

#[test]
fn compacted_cache_keeps_decoding_from_the_original_positions() {
    use _native::compact::{keep_rows, select};
    let all = ids(300);
    let mut full = tiny();
    full.prefill(&all, LogitsWant::None).unwrap();
    let bytes_full = full.cache.bytes_used();

    // Keeping every row is exact: the next logits are bit-identical.
    let mut same = tiny();
    same.prefill(&all, LogitsWant::None).unwrap();
    for l in 0..4 {
        for h in 0..2 {
            keep_rows(&mut same.cache, l, h, &(0..300).collect::<Vec<u32>>()).unwrap();
        }
    }
    let next = [42u32, 43];
    let want = full.prefill(&next, LogitsWant::All).unwrap().unwrap();
    assert_eq!(same.prefill(&next, LogitsWant::All).unwrap().unwrap(), want);

    // Uniform 64-token budget per head: memory shrinks, positions continue, decode still works.
    let mut small = tiny();
    small.prefill(&all, LogitsWant::None).unwrap();
    for l in 0..4 {
        for h in 0..2 {
            let keep = select::baseline(300, 64, 4, 16, select::Baseline::Uniform);
            keep_rows(&mut small.cache, l, h, &keep).unwrap();
        }
    }
    assert_eq!(small.cache.bytes_used() * 300, bytes_full * 64);
    assert_eq!(small.cache.next_position(), 300);
    let got = small.prefill(&next, LogitsWant::All).unwrap().unwrap();
    assert!(got.iter().all(|x| x.is_finite()));
    assert_eq!(small.cache.next_position(), 302);
    assert_eq!(small.cache.tokens_per_head(), vec![vec![66; 2]; 4]);
    // The compacted cache answers differently from the full one, but not wildly: same shape.
    assert_eq!(got.len(), want.len());
}
