//! The noisy top-k router (Shazeer et al. 2017): selection, weights and the load / importance
//! losses against host f64 math, gradients of both projections against central finite
//! differences, and its normal noise against the standard normal (Kolmogorov-Smirnov).

#![allow(clippy::needless_range_loop)] // index loops mirror the maths

use candle_core::DType;
use gumbel_moe::nn::Ctx;
use gumbel_moe::rng::normal_noise;

mod common;
use common::fd::fd_check;
use common::host::*;
use common::routing::router_with;

/// The noise std: softplus plus the reference implementations' floor of 1e-2.
fn noise_std(z: f64) -> f64 {
    z.max(0.0) + (-z.abs()).exp().ln_1p() + 1e-2
}

fn cv2(v: &[f64]) -> f64 {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / (n - 1.0);
    var / (mean * mean + 1e-10)
}

/// Host noisy top-k: (indices, weights, aux) from x, W_g, W_noise, with or without noise.
#[allow(clippy::too_many_arguments)]
fn host_noisy_topk(
    x: &[f64],
    wg: &[f64],
    wn: &[f64],
    (t, d, e, m): (usize, usize, usize, usize),
    noise: Option<(u64, u64, u32)>,
    (load_coef, imp_coef): (f64, f64),
) -> (Vec<u32>, Vec<Vec<f64>>, f64) {
    let clean = reference_logits(x, wg, t, d, e);
    let raw = reference_logits(x, wn, t, d, e);
    let (mut indices, mut weights) = (Vec::new(), Vec::new());
    let (mut importance, mut load) = (vec![0f64; e], vec![0f64; e]);
    for tok in 0..t {
        let std: Vec<f64> = raw[tok].iter().map(|&z| noise_std(z)).collect();
        let h: Vec<f64> = (0..e)
            .map(|i| {
                let eps = noise.map_or(0.0, |(seed, step, layer)| {
                    normal_noise(seed, step as u32, layer, tok as u32, i as u32) as f64
                });
                clean[tok][i] + eps * std[i]
            })
            .collect();
        let top = host_topk(&h, m);
        let g = host_softmax(&top.iter().map(|&i| h[i]).collect::<Vec<_>>());
        for (s, &i) in top.iter().enumerate() {
            indices.push(i as u32);
            importance[i] += g[s];
        }
        weights.push(g);
        for i in 0..e {
            // The m-th largest of H without component i.
            let others: Vec<f64> = (0..e).filter(|&j| j != i).map(|j| h[j]).collect();
            let thr = others[host_topk(&others, m)[m - 1]];
            load[i] += 1.0 - normal_sf((clean[tok][i] - thr) / std[i]);
        }
    }
    (indices, weights, load_coef * cv2(&load) + imp_coef * cv2(&importance))
}

#[test]
fn noisy_topk_matches_host_math() {
    let (e, d, t) = (6, 5, 30);
    let mut rng = Rng(17);
    let wg = rng.normals(e * d, 0.6);
    let wn = rng.normals(e * d, 0.4);
    let x = rng.normals(t * d, 1.0);
    let xt = tensor2(&x, t, d, DType::F64);
    for m in [1, 2, 3] {
        let mut cfg = router_config("noisy_topk", e, d, m, m, true);
        cfg.model.router.load_coef = 0.3;
        cfg.model.router.importance_coef = 0.7;
        let (router, _) = router_with(&cfg, &[("weight", wg.clone()), ("noise.weight", wn.clone())], &mut Rng(0));
        let (seed, step, layer) = (21u64, 6u64, 1u32);
        for (train, label) in [(true, "train"), (false, "eval")] {
            let ctx = Ctx { train, ..train_ctx(seed, step, 1.0) };
            let r = route(router.as_ref(), &xt, ctx, layer);
            let noise = if train { Some((seed, step, layer)) } else { None };
            let (idx, wts, aux) = host_noisy_topk(&x, &wg, &wn, (t, d, e, m), noise, (0.3, 0.7));
            let label = format!("noisy_topk m={m} {label}");
            assert_eq!(index_vec(&r.indices), idx, "{label}: selection differs from the host top-m of H");
            for (tok, row) in vec2(&r.weights).iter().enumerate() {
                for s in 0..m {
                    assert_close(row[s], wts[tok][s], 1e-12, 1e-14, &format!("{label}: weight [{tok}][{s}]"));
                }
            }
            // The host Phi has |error| < 7.5e-8 (A&S 26.2.17).
            assert_close(scalar(r.aux_loss.as_ref().expect("aux loss")), aux, 1e-5, 1e-7, &format!("{label}: aux"));
        }
        if m > 1 {
            // The noise changes the selection of some tokens.
            let a = index_vec(&route(router.as_ref(), &xt, train_ctx(seed, step, 1.0), layer).indices);
            let b = index_vec(&route(router.as_ref(), &xt, Ctx::eval(seed, 1.0), layer).indices);
            assert_ne!(a, b, "m={m}: training noise changed no selection among {t} tokens");
        }
    }
}

#[test]
fn noisy_topk_gradients_match_finite_differences() {
    let (e, d, t, m) = (6, 4, 16, 2);
    let mut rng = Rng(23);
    let wg = rng.normals(e * d, 0.6);
    let wn = rng.normals(e * d, 0.5);
    let x = rng.normals(t * d, 1.0);
    let xt = tensor2(&x, t, d, DType::F64);
    let mut cfg = router_config("noisy_topk", e, d, m, m, true);
    cfg.model.router.load_coef = 0.5;
    cfg.model.router.importance_coef = 0.5;
    let (router, params) = router_with(&cfg, &[("weight", wg), ("noise.weight", wn)], &mut Rng(0));
    let c = tensor2(&rng.normals(t * m, 1.0), t, m, DType::F64);
    let ctx = train_ctx(4, 2, 1.0);
    let loss = || {
        let r = route(router.as_ref(), &xt, ctx, 0);
        ((&r.weights * &c).unwrap().sum_all().unwrap() + r.aux_loss.unwrap()).unwrap()
    };
    let elems = [0, 5, 9, 14, 18, 23];
    fd_check(&params, &loss, "weight", &elems, 1e-6, "noisy_topk gate");
    fd_check(&params, &loss, "noise.weight", &elems, 1e-6, "noisy_topk noise");
    // The losses alone also reach both projections (the load loss through Phi).
    let aux_only = || route(router.as_ref(), &xt, ctx, 0).aux_loss.unwrap();
    fd_check(&params, &aux_only, "noise.weight", &elems, 1e-6, "noisy_topk aux -> noise");
}

#[test]
fn noisy_topk_gradients_stay_finite_when_the_learned_noise_vanishes() {
    // A noise projection driven far negative, as training drives it: softplus underflows to
    // exactly 0 (below about -37 in f64), and without a floor the load loss's (clean - thr) / std
    // is infinite and its gradient 0 * inf = NaN. Both projections' gradients must stay finite.
    let (e, d, t, m) = (6, 4, 16, 2);
    let mut rng = Rng(29);
    let wg = rng.normals(e * d, 0.6);
    let wn = vec![-40.0; e * d];
    let x: Vec<f64> = rng.normals(t * d, 1.0).iter().map(|v| v.abs() + 0.5).collect(); // x W_noise < -80
    let xt = tensor2(&x, t, d, DType::F64);
    let mut cfg = router_config("noisy_topk", e, d, m, m, true);
    cfg.model.router.load_coef = 0.5;
    cfg.model.router.importance_coef = 0.5;
    let (router, params) = router_with(&cfg, &[("weight", wg.clone()), ("noise.weight", wn.clone())], &mut Rng(0));
    let r = route(router.as_ref(), &xt, train_ctx(4, 2, 1.0), 0);
    let aux = r.aux_loss.expect("aux loss");
    let grads = (r.weights.sum_all().unwrap() + &aux).unwrap().backward().unwrap();
    for (name, var) in params.named() {
        let g = flat(grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}")));
        let bad = g.iter().position(|v| !v.is_finite());
        assert!(bad.is_none(), "{name}: gradient element {bad:?} is {:?}", bad.map(|i| g[i]));
    }
    let (_, _, host_aux) = host_noisy_topk(&x, &wg, &wn, (t, d, e, m), Some((4, 2, 0)), (0.5, 0.5));
    assert_close(scalar(&aux), host_aux, 1e-5, 1e-7, "aux with a vanished noise projection");
}

#[test]
fn normal_noise_is_standard_normal_and_keyed() {
    // Kolmogorov-Smirnov against Phi over draws spread across every key field.
    let mut z: Vec<f64> =
        (0..100_000u32).map(|i| normal_noise(0xC0FF_EE00_1234, i % 5, i % 3, i / 15, (i / 3) % 5) as f64).collect();
    let n = z.len() as f64;
    let mean = z.iter().sum::<f64>() / n;
    let var = z.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    assert!(mean.abs() < 5.0 / n.sqrt(), "normal noise mean {mean}");
    // var of the sample variance of N(0, 1) is 2 / (n - 1).
    assert!((var - 1.0).abs() < 5.0 * (2.0 / n).sqrt(), "normal noise variance {var}");
    z.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let ks = z
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let f = 1.0 - normal_sf(v);
            (f - i as f64 / n).abs().max((f - (i + 1) as f64 / n).abs())
        })
        .fold(0.0, f64::max);
    assert!(ks < 1.949 / n.sqrt(), "normal noise KS statistic {ks:.5}");
    // Every key field matters, and the stream is not the Gumbel one.
    let base = normal_noise(7, 1, 2, 3, 4);
    for other in [normal_noise(8, 1, 2, 3, 4), normal_noise(7, 2, 2, 3, 4), normal_noise(7, 1, 3, 3, 4)] {
        assert_ne!(base, other);
    }
    assert_ne!(base, normal_noise(7, 1, 2, 4, 4));
    assert_ne!(base, normal_noise(7, 1, 2, 3, 5));
}
