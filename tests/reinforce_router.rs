//! The REINFORCE router: samples from the softmax (chi-square) with exact log-probs and the argmax
//! at eval, an unbiased surrogate gradient (against the exact expectation by enumerating the
//! experts), the surrogate and its baseline through the model, and an exact resume.

#![allow(clippy::needless_range_loop)] // index loops mirror the maths

use candle_core::{DType, Device, Tensor};
use gumbel_moe::model::{cross_entropy, per_token_cross_entropy, router_surrogate};
use gumbel_moe::moe::losses::score_function_surrogate;
use gumbel_moe::moe::{build_router, MoeLayer};
use gumbel_moe::nn::{Ctx, Mlp, Params};

mod common;
use common::host::*;
use common::routing::{router_with, tiny_gpt};
use common::straight_and_resumed;

const CPU: Device = Device::Cpu;

#[test]
fn reinforce_samples_from_the_softmax_and_takes_the_argmax_at_eval() {
    let (e, d, t) = (5, 3, 4000);
    let mut rng = Rng(61);
    let w = rng.normals(e * d, 0.8);
    let x1 = rng.normals(d, 1.0);
    let xt = tensor2(&x1.repeat(t), t, d, DType::F64);
    let logits = reference_logits(&x1, &w, 1, d, e).remove(0);
    let cfg = router_config("reinforce", e, d, 1, 1, true);
    let (router, _) = router_with(&cfg, &[("weight", w)], &mut Rng(0));
    let mut counts = vec![0usize; e];
    for step in 0..3u64 {
        let r = route(router.as_ref(), &xt, train_ctx(50 + step, step, 1.0), 2);
        assert_eq!(flat(&r.weights), vec![1.0; t], "forward weights are exactly 1");
        let lp = flat(r.log_prob.as_ref().expect("training routes carry log-probs"));
        let lse = logits.iter().map(|v| v.exp()).sum::<f64>().ln();
        for (tok, &i) in index_vec(&r.indices).iter().enumerate() {
            counts[i as usize] += 1;
            assert_close(lp[tok], logits[i as usize] - lse, 1e-12, 1e-12, "log p(chosen)");
        }
    }
    chi_square(&counts, &host_softmax(&logits), "reinforce samples vs softmax");
    let r = route(router.as_ref(), &xt, Ctx::eval(1, 1.0), 2);
    assert!(r.log_prob.is_none(), "no score log-probs at eval");
    let argmax = host_topk(&logits, 1)[0] as u32;
    assert!(index_vec(&r.indices).iter().all(|&i| i == argmax), "eval must take the argmax");
}

/// The surrogate's gradient, averaged over seeds, is the exact gradient of E[mean_t L_t], computed
/// by enumerating each token's expert: d/dW sum_e p_e(x_t) L_t(e) = sum_e L_t(e) p_e (1[e=j] - p_j) x_t.
#[test]
fn reinforce_surrogate_gradient_is_unbiased() {
    let (e, d, b, t) = (4, 5, 1, 6);
    let n = b * t;
    let mut cfg = router_config("reinforce", e, d, 1, 1, true);
    cfg.model.moe.expert_hidden = 8;
    cfg.model.moe.balance_coef = 0.0;
    cfg.model.moe.z_coef = 0.0;
    let params = Params::new();
    let vb = params.var_builder(11, DType::F64, &CPU);
    let layer = MoeLayer::new(&cfg, 0, vb.clone(), &build_router).unwrap();
    let mut rng = Rng(71);
    for (_, v) in params.named() {
        v.set(&Tensor::from_vec(rng.normals(v.elem_count(), 0.7), v.shape(), &CPU).unwrap()).unwrap();
    }
    let x = rng.normals(n * d, 1.0);
    let xt = Tensor::from_vec(x.clone(), (b, t, d), &CPU).unwrap();
    let c = Tensor::from_vec(rng.normals(n * d, 1.0), (n, d), &CPU).unwrap();
    // Exact: L_t(e) = expert_e(x_t) . c_t for every expert.
    let xf = xt.reshape((n, d)).unwrap();
    let l_te: Vec<Vec<f64>> = (0..e)
        .map(|ex| {
            let mlp = Mlp::new(&cfg, cfg.expert_hidden(), vb.pp("experts").pp(ex)).unwrap();
            flat(&(mlp.forward(&xf).unwrap() * &c).unwrap().sum(1).unwrap())
        })
        .collect();
    let w = flat(params.get("router.weight").unwrap().as_tensor());
    let logits = reference_logits(&x, &w, n, d, e);
    let mut exact = vec![0f64; e * d];
    for tok in 0..n {
        let p = host_softmax(&logits[tok]);
        for ex in 0..e {
            for j in 0..e {
                let coef = l_te[ex][tok] * p[ex] * ((ex == j) as u8 as f64 - p[j]) / n as f64;
                (0..d).for_each(|q| exact[j * d + q] += coef * x[tok * d + q]);
            }
        }
    }
    // Monte Carlo: the surrogate's gradient over many seeds, with a fixed baseline (decay 1).
    let rw = params.get("router.weight").unwrap();
    let seeds = 3000;
    let (mut sum, mut sq) = (vec![0f64; e * d], vec![0f64; e * d]);
    for seed in 0..seeds {
        let out = layer.forward(&xt, &train_ctx(seed, 1, 1.0)).unwrap();
        let per_token = (out.y.reshape((n, d)).unwrap() * &c).unwrap().sum(1).unwrap(); // (N,)
        let mut baseline = 0.3;
        let logp = vec![out.score_logp.expect("reinforce returns log-probs")];
        let s = score_function_surrogate(&logp, &per_token, &mut baseline, 1.0).unwrap().unwrap();
        let total = ((per_token.sum_all().unwrap() / n as f64).unwrap() + s).unwrap();
        let g = flat(total.backward().unwrap().get(rw.as_tensor()).expect("router gradient"));
        for i in 0..e * d {
            sum[i] += g[i];
            sq[i] += g[i] * g[i];
        }
    }
    let sn = seeds as f64;
    let mut significant = 0;
    for i in 0..e * d {
        let mean = sum[i] / sn;
        let se = ((sq[i] / sn - mean * mean) / (sn - 1.0)).sqrt();
        assert!(
            (mean - exact[i]).abs() <= 4.5 * se + 1e-12,
            "W[{i}]: mean surrogate gradient {mean:e} vs exact {:e} (standard error {se:e})",
            exact[i]
        );
        significant += (exact[i].abs() > 5.0 * se) as usize;
    }
    assert!(significant >= 4, "only {significant} exact gradients stand out of the noise: the test is too weak");
}

#[test]
fn router_surrogate_through_the_model() {
    let params = Params::new();
    let (cfg, gpt) = tiny_gpt("reinforce", &params, 4);
    let ids: Vec<u32> = (0..16u32).map(|i| (i * 5 + 1) % 11).collect();
    let idx = Tensor::from_vec(ids.clone(), (2, 8), &CPU).unwrap();
    let targets = Tensor::from_vec(ids.iter().map(|&i| (i + 3) % 11).collect::<Vec<u32>>(), (2, 8), &CPU).unwrap();
    let out = gpt.forward(&idx, &train_ctx(3, 0, 1.0)).unwrap();
    assert_eq!(out.score_logps.len(), cfg.model.n_layer, "one log-prob vector per MoE layer");
    // Per-token CE is aligned with the (B, T) rows and averages to the model's cross-entropy.
    let ptl = per_token_cross_entropy(&out.logits, &targets).unwrap();
    assert_eq!(ptl.dims(), &[16]);
    assert_close(
        scalar(&ptl.mean_all().unwrap()),
        scalar(&cross_entropy(&out.logits, &targets).unwrap()),
        1e-6,
        0.0,
        "mean per-token CE",
    );
    let lv = flat(&ptl);
    let mut baseline = f64::NAN;
    let s = router_surrogate(&out, &targets, &mut baseline, 0.9).unwrap().expect("a surrogate for reinforce");
    let mean = lv.iter().sum::<f64>() / 16.0;
    // First call: the baseline starts at the batch mean and then moves by (1 - decay) toward it.
    assert_close(baseline, mean, 1e-6, 0.0, "baseline after the first call");
    let want: f64 = out
        .score_logps
        .iter()
        .map(|lp| flat(lp).iter().zip(&lv).map(|(l, v)| (v - mean) * l).sum::<f64>() / 16.0)
        .sum();
    assert_close(scalar(&s), want, 1e-5, 1e-7, "surrogate value");
    let loss = ((cross_entropy(&out.logits, &targets).unwrap() + &out.aux_loss).unwrap() + s).unwrap();
    let grads = loss.backward().unwrap();
    for (name, v) in params.named() {
        if name.ends_with("router.weight") {
            assert!(grads.get(v.as_tensor()).is_some(), "{name}: no gradient from the surrogate");
        }
    }
    let mut b2 = 1.0;
    router_surrogate(&out, &targets, &mut b2, 0.9).unwrap();
    assert_close(b2, 0.9 + 0.1 * mean, 1e-6, 0.0, "moving-average baseline");
    // Eval passes and other routers have nothing to add.
    let ev = gpt.forward(&idx, &Ctx::eval(3, 1.0)).unwrap();
    assert!(router_surrogate(&ev, &targets, &mut b2, 0.9).unwrap().is_none(), "no surrogate at eval");
    let p2 = Params::new();
    let (_, g2) = tiny_gpt("softmax_topk", &p2, 4);
    let o2 = g2.forward(&idx, &train_ctx(3, 0, 1.0)).unwrap();
    assert!(router_surrogate(&o2, &targets, &mut b2, 0.9).unwrap().is_none(), "no surrogate for softmax_topk");
}

/// The REINFORCE baseline is in the trainer state: 6 steps in one go and 3 + resume 3 end with the
/// same weights and the same baseline.
#[test]
fn reinforce_resume_is_exact() {
    let ((wa, ba), (wb, bb)) = straight_and_resumed("reinforce", &["train.grad_accum=2"]);
    assert!(ba.is_some_and(|x| x.is_finite() && x > 0.0), "no REINFORCE baseline saved: {ba:?}");
    assert_eq!(ba, bb, "the resumed baseline differs");
    assert_eq!(wa, wb, "resumed weights differ from the uninterrupted run");
}
