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

/// Largest absolute elementwise difference of two f32 tensors.
fn tensor_diff(x: &candle_core::Tensor, y: &candle_core::Tensor) -> f32 {
    (x - y)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
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
    assert_eq!(tensor_diff(&ha, &hb), 0.0);
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

#[test]
fn layerwise_forward_equals_the_token_major_pass() {
    // With a hook that changes nothing, the layer-major pass (used for on-policy compaction)
    // must fill the cache exactly as the ordinary forward does and see the same queries.
    let all = ids(PREFILL_CHUNK + 40);
    let mut a = tiny();
    let mut want_q = Vec::new();
    let mut cache = a.model.new_cache().unwrap();
    a.model
        .forward_capture(&all, &mut cache, Some(&mut want_q))
        .unwrap();
    let mut got_q = Vec::new();
    let mut hook = |_l: usize,
                    q: &candle_core::Tensor,
                    _c: &mut _|
     -> _native::error::Result<Option<candle_core::Tensor>> {
        got_q.push(q.clone());
        Ok(None)
    };
    a.model
        .forward_layerwise(&all, &mut a.cache, 100, &mut hook)
        .unwrap();
    assert_eq!(a.cache.next_position(), all.len());
    let diff = tensor_diff;
    for l in 0..4 {
        assert!(diff(&got_q[l], &want_q[l]) < 1e-4, "layer {l} queries");
        for h in 0..2 {
            let (x, y) = (a.cache.head(l, h), cache.head(l, h));
            assert!(diff(&x.keys().unwrap(), &y.keys().unwrap()) < 1e-4);
            assert!(diff(&x.values().unwrap(), &y.values().unwrap()) < 1e-4);
        }
    }
}

mod compaction {
    use super::*;
    use _native::compact::pipeline::{HeadBudgets, Method, Options, QuerySource};

    const N: usize = 400;

    fn context() -> Vec<u32> {
        ids(N)
    }

    /// A stand-in for the repeat prompt: a few instruction ids, then the context again.
    fn suffix() -> Vec<u32> {
        let mut s = vec![11u32, 12, 13, 14];
        s.extend(context());
        s
    }

    fn opts(method: Method, budget: usize) -> Options {
        let mut o = Options::new(method, budget);
        o.recent = 16;
        o
    }

    /// KL(full || compacted) of the next-token distributions of a few continuation tokens.
    fn kl_after(o: &Options) -> (f64, Engine) {
        let next = [42u32, 43, 44, 45];
        let mut full = tiny();
        full.prefill(&context(), LogitsWant::None).unwrap();
        let p = full.prefill(&next, LogitsWant::All).unwrap().unwrap();
        let mut e = tiny();
        e.prefill(&context(), LogitsWant::None).unwrap();
        e.compact(o, Some(&suffix())).unwrap();
        let mut probe = tiny();
        probe.cache = e.cache.clone();
        let q = probe.prefill(&next, LogitsWant::All).unwrap().unwrap();
        let vocab = full.config().vocab_size;
        let mut kl = 0f64;
        for (pr, qr) in p.chunks(vocab).zip(q.chunks(vocab)) {
            let lse = |r: &[f32]| {
                let m = r.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                m + r.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
            };
            let (lp, lq) = (lse(pr), lse(qr));
            kl += pr
                .iter()
                .zip(qr)
                .map(|(&a, &b)| (a as f64 - lp).exp() * ((a as f64 - lp) - (b as f64 - lq)))
                .sum::<f64>();
        }
        (kl / next.len() as f64, e)
    }

    #[test]
    fn attention_matching_beats_every_baseline_at_the_same_budget() {
        let budget = N / 4;
        let (am, e) = kl_after(&opts(Method::Am, budget));
        let tokens: usize = e.cache.tokens_per_head().iter().flatten().sum();
        // The global pool spends the same total as a uniform budget (sink and recent included).
        assert!(tokens <= budget * 8 && tokens + 8 >= budget * 8, "{tokens}");
        let mut no_fit = opts(Method::Am, budget);
        no_fit.fit = _native::compact::pipeline::Fit::None;
        let mut cases = vec![("am fit=none", no_fit)];
        for m in [
            Method::Streaming,
            Method::Uniform,
            Method::Random,
            Method::H2o,
            Method::SnapKv,
            Method::Tova,
            Method::Kvzip,
        ] {
            cases.push((Method::NAMES[m as usize], opts(m, budget)));
        }
        for (name, o) in cases {
            let (kl, _) = kl_after(&o);
            eprintln!("{name}: KL {kl:.5} vs am {am:.5}");
            assert!(am < kl, "am KL {am} is not below {name}'s {kl}");
        }
    }

    #[test]
    fn every_method_and_budget_policy_keeps_decoding() {
        for m in Method::NAMES {
            let method = Method::parse(m).unwrap();
            for hb in [HeadBudgets::Uniform, HeadBudgets::Global] {
                let mut o = opts(method, 64);
                o.head_budgets = hb.clone();
                let mut e = tiny();
                e.prefill(&context(), LogitsWant::None).unwrap();
                let bytes = e.cache.bytes_used();
                let r = e.compact(&o, Some(&suffix())).unwrap();
                let kept: usize = r.tokens_after.iter().flatten().sum();
                assert!(kept <= 64 * 8, "{m} {hb:?}: {kept}");
                assert_eq!(r.bytes_after, e.cache.bytes_used());
                assert!(
                    r.bytes_after < bytes / 4,
                    "{m}: {} of {bytes}",
                    r.bytes_after
                );
                assert_eq!(e.cache.next_position(), N);
                if method.needs_queries() {
                    assert!(
                        r.heads.iter().flatten().all(|h| h.fidelity.is_some()),
                        "{m} {hb:?} {:?}",
                        r.heads
                    );
                }
                let out = e.prefill(&[5, 6], LogitsWant::Last).unwrap().unwrap();
                assert!(out.iter().all(|x| x.is_finite()), "{m}");
                assert_eq!(e.cache.next_position(), N + 2);
            }
        }
    }

    #[test]
    fn global_budgets_are_ragged_and_save_real_memory() {
        let mut e = tiny();
        e.prefill(&context(), LogitsWant::None).unwrap();
        let per_token = e.cache.bytes_used() / (N * 8);
        let r = e.compact(&opts(Method::Am, 60), Some(&suffix())).unwrap();
        let lens: Vec<usize> = r.tokens_after.iter().flatten().copied().collect();
        assert!(
            lens.iter().any(|&n| n != lens[0]),
            "global allocation gave uniform heads {lens:?}"
        );
        assert!(
            lens.iter().all(|&n| n >= 20),
            "sink + recent always kept: {lens:?}"
        );
        assert_eq!(r.bytes_after, lens.iter().sum::<usize>() * per_token);
    }

    #[test]
    fn compaction_repeats_and_context_queries_need_an_exact_cache() {
        let mut e = tiny();
        e.prefill(&context(), LogitsWant::None).unwrap();
        let mut o = opts(Method::Am, 200);
        o.queries = QuerySource::Context;
        let r1 = e.compact(&o, None).unwrap();
        assert!(r1
            .heads
            .iter()
            .flatten()
            .all(|h| h.fidelity.unwrap().out_rel_err < 1.0));
        // Now compacted: the context's own queries can no longer be recomputed...
        let before = e.cache.tokens_per_head();
        let err = e
            .compact(&opts(Method::H2o, 100), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("compacted"), "{err}");
        assert_eq!(
            e.cache.tokens_per_head(),
            before,
            "a failed call leaves the cache as it was"
        );
        // ...but repeat queries fit the current, biased cache again.
        e.prefill(&[7, 8, 9], LogitsWant::None).unwrap();
        let r2 = e.compact(&opts(Method::Am, 100), Some(&suffix())).unwrap();
        let kept: usize = r2.tokens_after.iter().flatten().sum();
        assert!(kept <= 800 && kept > 700, "{kept}");
        assert!(r2
            .heads
            .iter()
            .flatten()
            .all(|h| h.fidelity.unwrap().out_rel_err.is_finite()));
        assert_eq!(e.cache.next_position(), N + 3);
        assert!(e.prefill(&[1], LogitsWant::Last).unwrap().unwrap()[0].is_finite());
    }

    #[test]
    fn bad_arguments_are_refused_before_anything_changes() {
        let mut e = tiny();
        let o = opts(Method::Am, 100);
        assert!(e
            .compact(&o, Some(&suffix()))
            .unwrap_err()
            .to_string()
            .contains("empty cache"));
        e.prefill(&context(), LogitsWant::None).unwrap();
        let bytes = e.cache.bytes_used();
        for (o, sfx, want) in [
            (
                opts(Method::Am, N),
                Some(suffix()),
                "below the cache length",
            ),
            (opts(Method::Am, 10), Some(suffix()), "sink + recent"),
            (opts(Method::Am, 100), None, "suffix"),
            (opts(Method::Kvzip, 100), Some(vec![]), "suffix"),
        ] {
            let err = e.compact(&o, sfx.as_deref()).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
            assert_eq!(e.cache.bytes_used(), bytes);
        }
        let mut o = opts(Method::Am, 100);
        o.layers = Some(vec![9]);
        assert!(e.compact(&o, Some(&suffix())).is_err());
        assert!(Method::parse("foo")
            .unwrap_err()
            .to_string()
            .contains("snapkv"));
    }
}
