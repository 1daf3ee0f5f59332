//! The Gumbel router's noise and eval modes: the noise is crate::rng's Philox Gumbel keyed by
//! (seed, step, layer, token, expert) and follows the standard Gumbel distribution; eval takes the
//! noiseless top-m (ties to the lower index) unless eval_mode = "sample".
//!
//! Expected values come from host f64 math and a Kolmogorov-Smirnov test against the Gumbel CDF.

#![allow(clippy::needless_range_loop)] // index loops mirror the maths

use candle_core::{DType, Device, Tensor};
use gumbel_moe::config::EvalMode;
use gumbel_moe::nn::Ctx;
use gumbel_moe::rng::gumbel_noise;

mod common;
use common::host::*;
use common::routing::{config, noise_of, router_from};

const CPU: Device = Device::Cpu;

// ---------- the noise is crate::rng's, keyed by (seed, step, layer, token, expert) ----------

#[test]
fn noise_is_philox_gumbel_keyed_by_token_and_global_expert() {
    let (e, d, t) = (8, 5, 200);
    let (step, layer, micro, tau) = (17u64, 2u32, 3u32, 0.9);
    let mut rng = Rng(21);
    let w = rng.normals(e * d, 1.0);
    let x = rng.normals(t * d, 1.0);
    let xt = tensor2(&x, t, d, DType::F64);
    let ref_logits = reference_logits(&x, &w, t, d, e);
    let base = micro * t as u32;
    let ctx = |seed| Ctx { train: true, step, tau, seed, micro };
    for (m, k) in [(1, 8), (1, 3), (2, 5)] {
        let label = format!("hard m={m} K={k}");
        let cfg = config("gumbel", e, d, m, k, true);
        let router = router_from(&cfg, &tensor2(&w, e, d, DType::F64));
        let mut per_seed = Vec::new();
        for seed in [42u64, 43] {
            let r = route(router.as_ref(), &xt, ctx(seed), layer);
            let r_indices = index_vec(&r.indices); // (T, m) row-major
            let logits = vec2(&r.logits);
            for tok in 0..t {
                for j in 0..e {
                    assert_close(logits[tok][j], ref_logits[tok][j], 1e-12, 1e-12, &format!("{label}: logits"));
                }
                let cand = host_topk(&logits[tok], k);
                let pert: Vec<f64> =
                    cand.iter().map(|&j| logits[tok][j] + noise_of(seed, step, layer, base + tok as u32, j)).collect();
                let want: Vec<u32> = host_topk(&pert, m).iter().map(|&p| cand[p] as u32).collect();
                assert_eq!(
                    &r_indices[tok * m..(tok + 1) * m],
                    want.as_slice(),
                    "{label} seed {seed}: token {tok} selection differs from host Gumbel-top-{m} with crate::rng noise"
                );
            }
            per_seed.push(r_indices);
        }
        let differ = per_seed[0].chunks(m).zip(per_seed[1].chunks(m)).filter(|(a, b)| a != b).count();
        if k > m {
            assert!(differ > 0, "{label}: changing the seed changed no selection among {t} tokens");
        }
    }
    // Soft router: the weights are softmax((cand + g) / tau) with the same noise.
    let k = 5;
    let cfg = config("gumbel", e, d, 1, k, false);
    let router = router_from(&cfg, &tensor2(&w, e, d, DType::F64));
    let r = route(router.as_ref(), &xt, ctx(42), layer);
    let r_indices = index_vec(&r.indices); // (T, m) row-major
    let wts = vec2(&r.weights);
    for tok in 0..t {
        let cand = host_topk(&ref_logits[tok], k);
        let y = host_softmax(
            &cand
                .iter()
                .map(|&j| (ref_logits[tok][j] + noise_of(42, step, layer, base + tok as u32, j)) / tau)
                .collect::<Vec<_>>(),
        );
        for col in 0..k {
            let ex = r_indices[tok * k + col] as usize;
            let p = cand.iter().position(|&c| c == ex).expect("soft index outside the candidates");
            assert_close(wts[tok][col], y[p], 1e-12, 1e-14, &format!("soft weight of token {tok}, expert {ex}"));
        }
    }
}

#[test]
fn gumbel_noise_follows_the_standard_gumbel_distribution() {
    // Kolmogorov-Smirnov against F(g) = exp(-exp(-g)) over draws spread across every key field.
    let mut g: Vec<f64> = (0..100_000u32)
        .map(|i| gumbel_noise(0xDEAD_BEEF_0000_0001, i % 7, i % 3, i / 21, (i / 3) % 7) as f64)
        .collect();
    g.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = g.len() as f64;
    let ks = g
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let f = (-(-x).exp()).exp();
            (f - i as f64 / n).abs().max((f - (i + 1) as f64 / n).abs())
        })
        .fold(0.0, f64::max);
    // KS critical value at p = 0.001: 1.949 / sqrt(n).
    assert!(ks < 1.949 / n.sqrt(), "Gumbel noise KS statistic {ks:.5} >= {:.5}", 1.949 / n.sqrt());
    let mean = g.iter().sum::<f64>() / n;
    // Mean is the Euler-Mascheroni constant; sd pi/sqrt(6) -> 5 standard errors.
    let se = std::f64::consts::PI / 6f64.sqrt() / n.sqrt();
    assert!((mean - 0.577_215_664_9).abs() < 5.0 * se, "Gumbel noise mean {mean} is not Euler's gamma");
}

// ---------- eval ----------

#[test]
fn eval_argmax_has_no_noise_and_sample_mode_has() {
    let (e, d, t, seed, tau) = (8, 5, 200, 4u64, 0.5);
    let mut rng = Rng(5);
    let w = rng.normals(e * d, 1.0);
    let x = rng.normals(t * d, 1.0);
    let xt = tensor2(&x, t, d, DType::F64);
    let logits = reference_logits(&x, &w, t, d, e);
    let eval = Ctx::eval(seed, tau);
    for (m, k) in [(1, 1), (1, 3), (1, e), (2, 4)] {
        let cfg = config("gumbel", e, d, m, k, true);
        assert_eq!(cfg.model.router.eval_mode, EvalMode::Argmax);
        let router = router_from(&cfg, &tensor2(&w, e, d, DType::F64));
        let r = route(router.as_ref(), &xt, eval, 0);
        let r_indices = index_vec(&r.indices); // (T, m) row-major
        for tok in 0..t {
            let want: Vec<u32> = host_topk(&logits[tok], m).iter().map(|&i| i as u32).collect();
            assert_eq!(
                &r_indices[tok * m..(tok + 1) * m],
                want.as_slice(),
                "eval m={m} K={k}: token {tok} is not the top-{m} of its logits"
            );
        }
    }
    // Ties (all-zero logits) go to the lower expert index, as documented by `top_k`.
    let router = router_from(&config("gumbel", e, d, 2, 4, true), &tensor2(&w, e, d, DType::F64));
    let r = route(router.as_ref(), &Tensor::zeros((3, d), DType::F64, &CPU).unwrap(), eval, 0);
    let r_indices = index_vec(&r.indices); // (T, m) row-major
    assert_eq!(r_indices, vec![0, 1, 0, 1, 0, 1], "eval with tied logits must pick the lowest indices");
    // Soft eval: weights = softmax(cand / tau), no noise.
    let k = 3;
    let router = router_from(&config("gumbel", e, d, 1, k, false), &tensor2(&w, e, d, DType::F64));
    let r = route(router.as_ref(), &xt, eval, 0);
    let r_indices = index_vec(&r.indices); // (T, m) row-major
    let wts = vec2(&r.weights);
    for tok in 0..t {
        let cand = host_topk(&logits[tok], k);
        let y = host_softmax(&cand.iter().map(|&j| logits[tok][j] / tau).collect::<Vec<_>>());
        for col in 0..k {
            assert_eq!(r_indices[tok * k + col] as usize, cand[col], "soft eval: candidate order of token {tok}");
            assert_close(wts[tok][col], y[col], 1e-12, 1e-14, &format!("soft eval weight [{tok}][{col}]"));
        }
    }
    // eval_mode = "sample": eval draws the same noise as training at the same (seed, step, micro).
    let mut cfg = config("gumbel", e, d, 1, e, true);
    cfg.model.router.eval_mode = EvalMode::Sample;
    let router = router_from(&cfg, &tensor2(&w, e, d, DType::F64));
    let sampled = route(router.as_ref(), &xt, eval, 0);
    let trained = route(router.as_ref(), &xt, Ctx { train: true, ..eval }, 0);
    assert_eq!(
        index_vec(&sampled.indices),
        index_vec(&trained.indices),
        "eval_mode=sample must use the training noise"
    );
    let argmax: Vec<u32> = logits.iter().map(|l| host_topk(l, 1)[0] as u32).collect();
    assert_ne!(index_vec(&sampled.indices), argmax, "eval_mode=sample gave the noiseless argmax on all {t} tokens");
}
