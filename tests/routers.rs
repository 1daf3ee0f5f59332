//! Tests of the routers beyond the Gumbel and softmax defaults: Gumbel top-m without replacement
//! (soft and hard), noisy top-k with Shazeer's losses, sigmoid routing with a loss-free balancing
//! bias, hash routing, REINFORCE with its surrogate, and the refusal of expert-choice routing.
//!
//! Expected values are computed independently of the code under test: host f64 math, central
//! finite differences, exact expectations by enumerating the experts, and chi-square /
//! Kolmogorov-Smirnov tests against known distributions. No number is copied from a run.

#![allow(clippy::needless_range_loop)] // index loops mirror the maths

use candle_core::{DType, Device, Tensor};
use gumbel_moe::config::{Config, RouterInput, RouterKind};
use gumbel_moe::model::{cross_entropy, per_token_cross_entropy, router_surrogate, Gpt};
use gumbel_moe::moe::losses::score_function_surrogate;
use gumbel_moe::moe::{build_router, MoeLayer, RouteCtx, Router, Routing};
use gumbel_moe::nn::{Ctx, Mlp, Params};
use gumbel_moe::rng::{gumbel_noise, normal_noise};
use gumbel_moe::train::optim::{AdamW, AdamWConfig};
use std::collections::BTreeMap;

mod common;
use common::host::*;

const CPU: Device = Device::Cpu;

// ---------- helpers ----------

/// A router over fresh parameters (f64), its named variables set to `vals` (others N(0, 1)).
fn router_with(cfg: &Config, vals: &[(&str, Vec<f64>)], rng: &mut Rng) -> (Box<dyn Router>, Params) {
    let params = Params::new();
    let router = build_router(cfg, 0, params.var_builder(3, DType::F64, &CPU)).expect("build router");
    for (name, v) in params.named() {
        let data = match vals.iter().find(|(n, _)| *n == name) {
            Some((_, d)) => d.clone(),
            None => rng.normals(v.elem_count(), 1.0),
        };
        v.set(&Tensor::from_vec(data, v.shape(), &CPU).unwrap().to_dtype(v.dtype()).unwrap()).unwrap();
    }
    (router, params)
}

fn tensor2(data: &[f64], rows: usize, cols: usize) -> Tensor {
    Tensor::from_vec(data.to_vec(), (rows, cols), &CPU).unwrap()
}

/// Pearson chi-square of `counts` against probabilities `probs`; panics when p < 1e-3.
#[track_caller]
fn chi_square(counts: &[usize], probs: &[f64], label: &str) {
    let n: usize = counts.iter().sum();
    let chi2: f64 = counts.iter().zip(probs).map(|(&c, &q)| (c as f64 - n as f64 * q).powi(2) / (n as f64 * q)).sum();
    let p = chi2_sf(chi2, (counts.len() - 1) as f64);
    assert!(p > 1e-3, "{label}: counts {counts:?} vs probabilities {probs:?}: chi2 = {chi2:.2}, p = {p:.2e}");
}

const H: f64 = 1e-5;

/// Central-difference check of d loss / d (elements of parameter `name`) against backward.
fn fd_check(params: &Params, loss: &dyn Fn() -> Tensor, name: &str, elems: &[usize], rtol: f64, label: &str) {
    let var = params.get(name).unwrap_or_else(|| panic!("{label}: no parameter {name}"));
    let grads = loss().backward().unwrap();
    let grad = flat(grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{label}: no gradient for {name}")));
    let base = flat(var.as_tensor());
    let at = |i: usize, delta: f64| {
        let mut v = base.clone();
        v[i] += delta;
        var.set(&Tensor::from_vec(v, var.shape(), &CPU).unwrap()).unwrap();
        scalar(&loss())
    };
    let mut largest = 0f64;
    for &i in elems {
        let fd = (-at(i, 2.0 * H) + 8.0 * at(i, H) - 8.0 * at(i, -H) + at(i, -2.0 * H)) / (12.0 * H);
        largest = largest.max(fd.abs());
        assert_close(grad[i], fd, rtol, 1e-9, &format!("{label}: d loss / d {name}[{i}] vs central difference"));
    }
    var.set(&Tensor::from_vec(base, var.shape(), &CPU).unwrap()).unwrap();
    assert!(largest > 1e-4, "{label}: every checked gradient of {name} is ~0, the check is vacuous");
}

// ---------- 1. Gumbel top-m without replacement ----------

/// The probability of the unordered set {a, b} under sampling two without replacement with
/// probabilities p (Plackett-Luce): p_a p_b / (1 - p_a) + p_b p_a / (1 - p_b).
fn plackett_luce_pair(p: &[f64], a: usize, b: usize) -> f64 {
    p[a] * p[b] / (1.0 - p[a]) + p[b] * p[a] / (1.0 - p[b])
}

#[test]
fn gumbel_top2_sets_follow_plackett_luce() {
    let (e, d, k, m, t) = (6, 4, 4, 2, 2500);
    let mut rng = Rng(41);
    let w = rng.normals(e * d, 0.7);
    let x1 = rng.normals(d, 1.0);
    let x: Vec<f64> = x1.repeat(t); // every token has the same logits, its own noise
    let xt = tensor2(&x, t, d);
    let logits = host_logits(&x1, &w, 1, d, e).remove(0);
    let cand = host_topk(&logits, k);
    let p = host_softmax(&cand.iter().map(|&j| logits[j]).collect::<Vec<_>>());
    let pairs: Vec<(usize, usize)> = (0..k).flat_map(|a| (a + 1..k).map(move |b| (a, b))).collect();
    let probs: Vec<f64> = pairs.iter().map(|&(a, b)| plackett_luce_pair(&p, a, b)).collect();
    assert_close(probs.iter().sum(), 1.0, 0.0, 1e-12, "Plackett-Luce pair probabilities");
    let mut selections: Vec<(String, Vec<u32>)> = Vec::new();
    for imp in ["reference", "fused"] {
        for hard in [true, false] {
            let mut cfg = router_config("gumbel", e, d, m, k, hard);
            cfg.model.router.implementation = imp.parse().unwrap();
            let (router, _) = router_with(&cfg, &[("weight", w.clone())], &mut Rng(0));
            let mut all = Vec::new();
            for step in 0..4u64 {
                let r = route(router.as_ref(), &xt, train_ctx(1000 + step, step, 0.9), 1);
                assert_eq!(r.m, m, "{imp} hard={hard}: experts per token");
                all.extend(r.indices);
            }
            selections.push((format!("{imp} hard={hard}"), all));
        }
    }
    // Hard and soft, reference and fused, draw the same noise and pick the same experts.
    for (label, sel) in &selections[1..] {
        assert_eq!(sel, &selections[0].1, "{label} selects differently from {}", selections[0].0);
    }
    let mut counts = vec![0usize; pairs.len()];
    for pair in selections[0].1.chunks(m) {
        let (a, b) =
            (cand.iter().position(|&c| c == pair[0] as usize), cand.iter().position(|&c| c == pair[1] as usize));
        let (a, b) = (a.expect("selected outside the pre-filter"), b.expect("selected outside the pre-filter"));
        assert_ne!(a, b, "the same expert selected twice");
        counts[pairs.iter().position(|&q| q == (a.min(b), a.max(b))).unwrap()] += 1;
    }
    chi_square(&counts, &probs, "Gumbel top-2 selected sets vs Plackett-Luce");
    // The first pick alone follows the softmax over the candidates (Gumbel-max).
    let mut first = vec![0usize; k];
    for pair in selections[0].1.chunks(m) {
        first[cand.iter().position(|&c| c == pair[0] as usize).unwrap()] += 1;
    }
    chi_square(&first, &p, "Gumbel top-2 first pick vs softmax");
}

#[test]
fn soft_top_m_weights_are_the_renormalised_relaxed_sample() {
    let (e, d, t, k, m, tau) = (7, 5, 20, 5, 2, 0.7);
    let (seed, step, layer) = (9u64, 4u64, 2u32);
    let mut rng = Rng(5);
    let w = rng.normals(e * d, 1.0);
    let x = rng.normals(t * d, 1.0);
    let xt = tensor2(&x, t, d);
    let logits = host_logits(&x, &w, t, d, e);
    let c = tensor2(&rng.normals(t * m, 1.0), t, m);
    let mut grads = Vec::new();
    for imp in ["reference", "fused"] {
        let mut cfg = router_config("gumbel", e, d, m, k, false);
        cfg.model.router.implementation = imp.parse().unwrap();
        let (router, params) = router_with(&cfg, &[("weight", w.clone())], &mut Rng(0));
        let r = route(router.as_ref(), &xt, train_ctx(seed, step, tau), layer);
        assert_eq!((r.m, r.weights.dims()), (m, &[t, m][..]), "{imp}: soft top-m shapes");
        let wts = vec2(&r.weights);
        for tok in 0..t {
            let cand = host_topk(&logits[tok], k);
            let pert: Vec<f64> = cand
                .iter()
                .map(|&j| logits[tok][j] + gumbel_noise(seed, step as u32, layer, tok as u32, j as u32) as f64)
                .collect();
            let y = host_softmax(&pert.iter().map(|v| v / tau).collect::<Vec<_>>());
            let sel = host_topk(&pert, m);
            let z: f64 = sel.iter().map(|&q| y[q]).sum();
            for s in 0..m {
                assert_eq!(r.indices[tok * m + s] as usize, cand[sel[s]], "{imp}: token {tok} slot {s} expert");
                assert_close(wts[tok][s], y[sel[s]] / z, 1e-12, 1e-14, &format!("{imp}: soft weight [{tok}][{s}]"));
            }
        }
        let ctx = train_ctx(seed, step, tau);
        let loss = || (&route(router.as_ref(), &xt, ctx, layer).weights * &c).unwrap().sum_all().unwrap();
        fd_check(&params, &loss, "weight", &[0, 3, 8, 12, 19, 24, 30], 1e-6, &format!("{imp} soft top-2"));
        grads.push(flat(loss().backward().unwrap().get(params.get("weight").unwrap().as_tensor()).unwrap()));
    }
    for (a, b) in grads[0].iter().zip(&grads[1]) {
        assert_close(*b, *a, 1e-10, 1e-12, "soft top-m gradient: fused vs reference");
    }
}

// ---------- 2. noisy top-k (Shazeer et al. 2017) ----------

fn softplus(z: f64) -> f64 {
    z.max(0.0) + (-z.abs()).exp().ln_1p()
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
    let clean = host_logits(x, wg, t, d, e);
    let raw = host_logits(x, wn, t, d, e);
    let (mut indices, mut weights) = (Vec::new(), Vec::new());
    let (mut importance, mut load) = (vec![0f64; e], vec![0f64; e]);
    for tok in 0..t {
        let std: Vec<f64> = raw[tok].iter().map(|&z| softplus(z)).collect();
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
    let xt = tensor2(&x, t, d);
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
            assert_eq!(r.indices, idx, "{label}: selection differs from the host top-m of H");
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
            let a = route(router.as_ref(), &xt, train_ctx(seed, step, 1.0), layer).indices;
            let b = route(router.as_ref(), &xt, Ctx::eval(seed, 1.0), layer).indices;
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
    let xt = tensor2(&x, t, d);
    let mut cfg = router_config("noisy_topk", e, d, m, m, true);
    cfg.model.router.load_coef = 0.5;
    cfg.model.router.importance_coef = 0.5;
    let (router, params) = router_with(&cfg, &[("weight", wg), ("noise.weight", wn)], &mut Rng(0));
    let c = tensor2(&rng.normals(t * m, 1.0), t, m);
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

// ---------- 3. sigmoid routing with a balancing bias (DeepSeek-V3) ----------

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

#[test]
fn sigmoid_bias_selects_by_biased_scores_and_weights_by_scores() {
    let (e, d, t, m) = (6, 4, 40, 2);
    let mut rng = Rng(31);
    let w = rng.normals(e * d, 1.0);
    let x = rng.normals(t * d, 1.0);
    let bias = vec![0.3, -0.2, 0.0, 0.15, -0.4, 0.25];
    let xt = tensor2(&x, t, d);
    let cfg = router_config("sigmoid_bias", e, d, m, m, true);
    let (router, params) = router_with(&cfg, &[("weight", w.clone()), ("expert_bias", bias.clone())], &mut Rng(0));
    // Eval: no bias update, so the loss is a function of W alone.
    let r = route(router.as_ref(), &xt, Ctx::eval(1, 1.0), 0);
    let logits = host_logits(&x, &w, t, d, e);
    let mut unbiased_differs = false;
    for tok in 0..t {
        let s: Vec<f64> = logits[tok].iter().map(|&l| sigmoid(l)).collect();
        let biased: Vec<f64> = s.iter().zip(&bias).map(|(a, b)| a + *b as f32 as f64).collect();
        let sel = host_topk(&biased, m);
        unbiased_differs |= host_topk(&s, m) != sel;
        let z: f64 = sel.iter().map(|&i| s[i]).sum();
        let wts = vec2(&r.weights);
        for q in 0..m {
            assert_eq!(r.indices[tok * m + q] as usize, sel[q], "token {tok}: top-m of s + b");
            assert_close(wts[tok][q], s[sel[q]] / z, 1e-12, 1e-14, &format!("weight [{tok}][{q}]"));
        }
    }
    assert!(unbiased_differs, "the bias changed no selection: the test is vacuous");
    let c = tensor2(&rng.normals(t * m, 1.0), t, m);
    let loss = || (&route(router.as_ref(), &xt, Ctx::eval(1, 1.0), 0).weights * &c).unwrap().sum_all().unwrap();
    fd_check(&params, &loss, "weight", &[0, 5, 10, 13, 19, 22], 1e-6, "sigmoid_bias");
    let g = loss().backward().unwrap();
    assert!(g.get(params.get("expert_bias").unwrap().as_tensor()).is_none(), "the bias must get no gradient");
}

#[test]
fn sigmoid_bias_moves_toward_balance_and_adamw_leaves_it_alone() {
    let (e, d, t, m) = (5, 6, 64, 1);
    let mut cfg = router_config("sigmoid_bias", e, d, m, m, true);
    cfg.model.router.bias_update_rate = 0.05;
    cfg.model.moe.expert_hidden = 8;
    let params = Params::new();
    let layer = MoeLayer::new(&cfg, 0, params.var_builder(5, DType::F64, &CPU), &build_router).unwrap();
    let bias_var = params.get("router.expert_bias").expect("the bias is a named parameter (saved in checkpoints)");
    assert_eq!(bias_var.dtype(), DType::F32, "the bias is kept in f32");
    let mut rng = Rng(8);
    for (name, v) in params.named() {
        if name != "router.expert_bias" {
            v.set(&Tensor::from_vec(rng.normals(v.elem_count(), 0.5), v.shape(), &CPU).unwrap()).unwrap();
        }
    }
    // Skew: expert 0's router row aligned with mostly-positive tokens.
    let rw = params.get("router.weight").unwrap();
    let mut wv = flat(rw.as_tensor());
    wv[..d].iter_mut().for_each(|v| *v = 2.0);
    rw.set(&Tensor::from_vec(wv, (e, d), &CPU).unwrap()).unwrap();
    let x: Vec<f64> = rng.normals(t * d, 1.0).into_iter().map(|v| v.abs()).collect();
    let xt = Tensor::from_vec(x, (2, t / 2, d), &CPU).unwrap();
    let mut opt =
        AdamW::new(params.named(), AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 }).unwrap();
    let named = params.named();
    let mut first_max = None;
    let mut last_max = 0;
    for step in 0..60u64 {
        let before: Vec<f64> = flat(bias_var.as_tensor());
        let out = layer.forward(&xt, &train_ctx(1, step, 1.0)).unwrap();
        let load = &out.stats.tokens_per_expert;
        let after = flat(bias_var.as_tensor());
        // b_i += rate * sign(mean - load_i), mean = T m / E, from this call's counts.
        let mean = (t * m) as f64 / e as f64;
        for i in 0..e {
            let diff = mean - load[i] as f64;
            let sign = if diff > 0.0 {
                1.0
            } else if diff < 0.0 {
                -1.0
            } else {
                0.0
            };
            let want = (before[i] + 0.05 * sign) as f32 as f64;
            assert_eq!(after[i], want, "step {step}: bias[{i}] after the update (load {load:?})");
        }
        let mx = *load.iter().max().unwrap();
        first_max.get_or_insert(mx);
        last_max = mx;
        // An optimizer step on the full loss: the bias has no gradient, so AdamW must skip it.
        let loss = ((out.y.sqr().unwrap().sum_all().unwrap()) + out.aux_loss).unwrap();
        let gs = loss.backward().unwrap();
        let grads: Vec<Option<Tensor>> = named.iter().map(|(_, v)| gs.get(v.as_tensor()).cloned()).collect();
        let bi = named.iter().position(|(n, _)| n == "router.expert_bias").unwrap();
        assert!(grads[bi].is_none(), "step {step}: the bias got a gradient");
        let w_before = flat(rw.as_tensor());
        opt.step(&grads, 1e-2).unwrap();
        assert_eq!(flat(bias_var.as_tensor()), after, "step {step}: AdamW changed the bias");
        assert_ne!(flat(rw.as_tensor()), w_before, "step {step}: AdamW did not update the router weight");
    }
    // Eval calls never move the bias.
    let b = flat(bias_var.as_tensor());
    layer.forward(&xt, &Ctx::eval(1, 1.0)).unwrap();
    assert_eq!(flat(bias_var.as_tensor()), b, "an eval call moved the bias");
    let first_max = first_max.unwrap();
    assert!(first_max as f64 > 2.0 * (t * m) as f64 / e as f64, "routing was not skewed ({first_max}): vacuous");
    assert!(last_max < first_max, "the bias did not reduce the largest load ({first_max} -> {last_max})");
}

/// Trains `kind` 6 steps in one go (in dir a) and 3 steps + resume + 3 (in dir b); returns each
/// run's final weights (sorted by name) and REINFORCE baseline.
type Ckpt = (Vec<(String, Vec<f64>)>, Option<f64>);
fn straight_and_resumed(kind: &str, extra: &[&str]) -> (Ckpt, Ckpt) {
    use gumbel_moe::train::{checkpoint, Trainer};
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let run = |dir: &std::path::Path, more: &[&str]| {
        let o: Vec<&str> = extra.iter().chain(more).copied().collect();
        let mut t = Trainer::new(common::tiny_config(kind, &o), dir).unwrap();
        t.progress = false;
        t.fit().unwrap();
    };
    run(a.path(), &[]);
    run(b.path(), &["train.max_iters=3"]);
    let mut r = Trainer::resume(b.path(), &["train.max_iters=6".into()], None).unwrap();
    r.progress = false;
    r.fit().unwrap();
    let ckpt = |dir: &std::path::Path| {
        let loaded = checkpoint::load(&dir.join("ckpt-0000006")).unwrap();
        let m = candle_core::safetensors::load(dir.join("ckpt-0000006/model.safetensors"), &CPU).unwrap();
        let mut v: Vec<(String, Vec<f64>)> = m.into_iter().map(|(k, t)| (k, flat(&t))).collect();
        v.sort_by(|x, y| x.0.cmp(&y.0));
        (v, loaded.state.reinforce_baseline)
    };
    (ckpt(a.path()), ckpt(b.path()))
}

/// The bias is in the checkpoint: 6 steps in one go and 3 + resume 3 end with the same weights and
/// the same (moved) bias.
#[test]
fn sigmoid_bias_resume_is_exact() {
    let extra = ["model.router.top_m=2", "model.router.bias_update_rate=0.01", "train.grad_accum=2"];
    let ((wa, _), (wb, _)) = straight_and_resumed("sigmoid_bias", &extra);
    let biases: Vec<&(String, Vec<f64>)> = wa.iter().filter(|(k, _)| k.ends_with("expert_bias")).collect();
    assert!(!biases.is_empty(), "no expert_bias in the checkpoint");
    assert!(biases.iter().all(|(_, v)| v.iter().any(|&x| x != 0.0)), "the bias never moved: vacuous");
    assert_eq!(wa, wb, "resumed weights (bias included) differ from the uninterrupted run");
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

// ---------- 4. hash routing (Roller et al. 2021) ----------

/// The test's own SplitMix64 finaliser of a token id.
fn host_hash(id: u32, e: usize) -> u32 {
    let mut z = (id as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) % e as u64) as u32
}

fn hash_route(router: &dyn Router, ids: &[u32], d: usize, ctx: Ctx, layer: u32) -> Routing {
    let n = ids.len();
    let x = Tensor::zeros((n, d), DType::F32, &CPU).unwrap();
    let rc = RouteCtx { ctx, layer, token_ids: Some(Tensor::new(ids, &CPU).unwrap()) };
    router.route(&x, &rc).unwrap()
}

#[test]
fn hash_routing_is_a_fixed_uniform_function_of_the_id() {
    let (e, d) = (8, 4);
    let cfg = router_config("hash", e, d, 1, 1, true);
    let router = build_router(&cfg, 0, Params::new().var_builder(1, DType::F32, &CPU)).unwrap();
    let ids: Vec<u32> = (0..40_000).collect();
    let r = hash_route(router.as_ref(), &ids, d, train_ctx(1, 0, 1.0), 0);
    assert_eq!(r.m, 1);
    let want: Vec<u32> = ids.iter().map(|&id| host_hash(id, e)).collect();
    assert_eq!(r.indices, want, "routing differs from the host hash");
    assert_eq!(flat(&r.weights), vec![1.0; ids.len()], "hash weights must be 1");
    // One expert per id, whatever the position, layer, step, seed or mode.
    let mut rng = Rng(3);
    let shuffled: Vec<u32> = (0..5000).map(|_| (rng.next_u64() % 300) as u32).collect();
    let mut seen: BTreeMap<u32, u32> = BTreeMap::new();
    for (ctx, layer) in [(train_ctx(2, 5, 1.0), 0), (train_ctx(9, 77, 0.5), 3), (Ctx::eval(4, 1.0), 1)] {
        let r = hash_route(router.as_ref(), &shuffled, d, ctx, layer);
        for (&id, &ex) in shuffled.iter().zip(&r.indices) {
            assert_eq!(*seen.entry(id).or_insert(ex), ex, "token id {id} went to two experts");
        }
    }
    // Ids spread uniformly over the experts.
    let mut counts = vec![0usize; e];
    r.indices.iter().for_each(|&i| counts[i as usize] += 1);
    chi_square(&counts, &vec![1.0 / e as f64; e], "hash: ids per expert vs uniform");
    // Without ids the router says what it needs.
    let err = router.route(&Tensor::zeros((3, d), DType::F32, &CPU).unwrap(), &RouteCtx::new(Ctx::eval(1, 1.0), 0));
    assert!(err.err().unwrap().to_string().contains("token ids"), "hash without ids must ask for them");
}

/// A tiny GPT with the given router in every block.
fn tiny_gpt(kind: &str, params: &Params, e: usize) -> (Config, Gpt) {
    let mut cfg = router_config(kind, e, 8, 1, 1, true);
    cfg.model.vocab_size = 11;
    cfg.model.block_size = 8;
    cfg.model.n_head = 2;
    cfg.model.moe_every = 1;
    cfg.model.router.init_std = 0.5;
    let gpt = Gpt::new(&cfg, params.var_builder(2, DType::F32, &CPU)).unwrap();
    (cfg, gpt)
}

/// Gumbel with `input = "token"`: the logits are the rows of a learned (V, E) table picked by the
/// token ids (exactly), the gradient reaches only the rows of ids that occur, and a call without
/// ids or the parameter-free hash router is refused with a clear error.
#[test]
fn gumbel_token_input_looks_up_a_learned_table() {
    let (e, d, v) = (6, 4, 11);
    let mut cfg = router_config("gumbel", e, d, 1, 3, true);
    cfg.model.router.input = RouterInput::Token;
    cfg.model.vocab_size = v;
    let params = Params::new();
    let router = build_router(&cfg, 0, params.var_builder(5, DType::F64, &CPU)).unwrap();
    let named = params.named();
    assert_eq!(named.len(), 1, "one table, no projection: {:?}", named.iter().map(|(n, _)| n).collect::<Vec<_>>());
    let table = vec2(named[0].1.as_tensor());
    assert_eq!((table.len(), table[0].len()), (v, e));
    let ids: Vec<u32> = vec![3, 7, 3, 0, 10, 7];
    let r = hash_route(router.as_ref(), &ids, d, train_ctx(1, 2, 0.7), 0);
    let want: Vec<Vec<f64>> = ids.iter().map(|&i| table[i as usize].clone()).collect();
    assert_eq!(vec2(&r.logits), want, "logits are not the table rows of the ids");
    // Gradient of sum(weights * c) + z-loss-like term: only used rows get one.
    let loss = (r.weights.sum_all().unwrap() + r.logits.sqr().unwrap().sum_all().unwrap()).unwrap();
    let g = vec2(loss.backward().unwrap().get(named[0].1.as_tensor()).unwrap());
    for (row, gr) in g.iter().enumerate() {
        let used = ids.contains(&(row as u32));
        assert_eq!(gr.iter().any(|&x| x != 0.0), used, "row {row}: used = {used}, gradient {gr:?}");
    }
    // No ids: refused, naming the problem.
    let x = Tensor::zeros((2, d), DType::F64, &CPU).unwrap();
    let err = router.route(&x, &RouteCtx::new(train_ctx(1, 0, 1.0), 0)).err().expect("no ids must fail").to_string();
    assert!(err.contains("token ids"), "{err}");
    let mut bad = cfg.clone();
    bad.model.router.kind = RouterKind::Hash;
    let err = bad.validate().err().expect("token input on hash must fail").to_string();
    assert!(err.contains("model.router.input"), "{err}");
}

#[test]
fn hash_router_gets_the_input_ids_through_the_model_and_trains() {
    let e = 4;
    let params = Params::new();
    let (_, gpt) = tiny_gpt("hash", &params, e);
    assert!(params.named().iter().all(|(n, _)| !n.contains("router")), "the hash router has no parameters");
    let ids: Vec<u32> = (0..16u32).map(|i| (i * 7 + 3) % 11).collect();
    let idx = Tensor::from_vec(ids.clone(), (2, 8), &CPU).unwrap();
    let out = gpt.forward(&idx, &train_ctx(1, 0, 1.0)).unwrap();
    let mut want = vec![0u32; e];
    ids.iter().for_each(|&id| want[host_hash(id, e) as usize] += 1);
    for (l, s) in out.moe_stats.iter().enumerate() {
        assert_eq!(s.tokens_per_expert, want, "layer {l}: tokens per expert differ from the hash of the ids");
    }
    let targets = Tensor::from_vec(ids.iter().map(|&i| (i + 1) % 11).collect::<Vec<u32>>(), (2, 8), &CPU).unwrap();
    let loss = (cross_entropy(&out.logits, &targets).unwrap() + &out.aux_loss).unwrap();
    let grads = loss.backward().unwrap();
    for (name, v) in params.named() {
        if name.contains("experts") {
            let used = want[name.split('.').nth(4).unwrap().parse::<usize>().unwrap()] > 0;
            assert_eq!(grads.get(v.as_tensor()).is_some(), used, "{name}: gradient iff its expert got tokens");
        }
    }
}

// ---------- 5. REINFORCE ----------

#[test]
fn reinforce_samples_from_the_softmax_and_takes_the_argmax_at_eval() {
    let (e, d, t) = (5, 3, 4000);
    let mut rng = Rng(61);
    let w = rng.normals(e * d, 0.8);
    let x1 = rng.normals(d, 1.0);
    let xt = tensor2(&x1.repeat(t), t, d);
    let logits = host_logits(&x1, &w, 1, d, e).remove(0);
    let cfg = router_config("reinforce", e, d, 1, 1, true);
    let (router, _) = router_with(&cfg, &[("weight", w)], &mut Rng(0));
    let mut counts = vec![0usize; e];
    for step in 0..3u64 {
        let r = route(router.as_ref(), &xt, train_ctx(50 + step, step, 1.0), 2);
        assert_eq!(flat(&r.weights), vec![1.0; t], "forward weights are exactly 1");
        let lp = flat(r.log_prob.as_ref().expect("training routes carry log-probs"));
        let lse = logits.iter().map(|v| v.exp()).sum::<f64>().ln();
        for (tok, &i) in r.indices.iter().enumerate() {
            counts[i as usize] += 1;
            assert_close(lp[tok], logits[i as usize] - lse, 1e-12, 1e-12, "log p(chosen)");
        }
    }
    chi_square(&counts, &host_softmax(&logits), "reinforce samples vs softmax");
    let r = route(router.as_ref(), &xt, Ctx::eval(1, 1.0), 2);
    assert!(r.log_prob.is_none(), "no score log-probs at eval");
    let argmax = host_topk(&logits, 1)[0] as u32;
    assert!(r.indices.iter().all(|&i| i == argmax), "eval must take the argmax");
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
    let logits = host_logits(&x, &w, n, d, e);
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

// ---------- 6. expert choice is refused ----------

#[test]
fn expert_choice_is_refused_because_it_is_not_causal() {
    // A `Config` cannot hold "expert_choice" (so `build_router` never sees it): reading the kind refuses it.
    let err = match "expert_choice".parse::<RouterKind>() {
        Ok(_) => panic!("expert_choice must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("causal") && err.contains("future"), "the error must say why: {err}");
    let err = format!("{:#}", Config::resolve("", "t", &["model.router.kind=expert_choice".into()]).unwrap_err());
    assert!(err.contains("causal") && err.contains("future"), "config validation must say why: {err}");
}

#[test]
fn new_router_settings_are_validated() {
    let err = |o: &[&str]| {
        let o: Vec<String> = o.iter().map(|s| s.to_string()).collect();
        format!("{:#}", Config::resolve("", "t", &o).unwrap_err())
    };
    assert!(err(&["model.router.kind=hash", "model.router.top_m=2"]).contains("top_m"));
    assert!(err(&["model.router.kind=reinforce", "model.router.top_m=2"]).contains("top_m"));
    assert!(err(&["model.router.reinforce_baseline_decay=1.0"]).contains("reinforce_baseline_decay"));
    assert!(err(&["model.router.bias_update_rate=-1"]).contains("bias_update_rate"));
    assert!(err(&["model.router.load_coef=-0.1"]).contains("load_coef"));
    for kind in ["noisy_topk", "sigmoid_bias", "hash", "reinforce"] {
        Config::resolve("", "t", &[format!("model.router.kind={kind}")]).unwrap();
    }
}

// ---------- 7. end to end ----------

/// Every trainable parameter of a tiny model gets a non-zero gradient from cross-entropy + aux
/// (+ the REINFORCE surrogate), except the sigmoid router's selection bias, which must get none;
/// then a few trainer steps run with finite losses.
#[test]
fn new_routers_train_end_to_end() {
    use gumbel_moe::train::Trainer;
    for (kind, extra) in [
        ("noisy_topk", vec!["model.router.top_m=2"]),
        ("sigmoid_bias", vec!["model.router.top_m=2"]),
        ("hash", vec![]),
        ("reinforce", vec![]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Trainer::new(common::tiny_config(kind, &extra), dir.path()).unwrap();
        t.progress = false;
        let (x, y) = t.train.as_ref().unwrap().random_batch(0, 0);
        let x = Tensor::from_slice(&x, (4, 16), &t.device).unwrap();
        let y = Tensor::from_slice(&y, (4, 16), &t.device).unwrap();
        let out = t.model.forward(&x, &train_ctx(t.cfg.seed, 0, 1.0)).unwrap();
        let mut loss = (cross_entropy(&out.logits, &y).unwrap() + &out.aux_loss).unwrap();
        let mut baseline = f64::NAN;
        if let Some(s) = router_surrogate(&out, &y, &mut baseline, t.cfg.model.router.reinforce_baseline_decay).unwrap()
        {
            loss = (loss + s).unwrap();
        }
        assert_eq!(kind == "reinforce", baseline.is_finite(), "{kind}: surrogate only for reinforce");
        let grads = loss.backward().unwrap();
        for (name, v) in t.params.named() {
            let g = grads.get(v.as_tensor());
            if name.ends_with("expert_bias") {
                assert!(g.is_none(), "{kind}: {name} got a gradient");
                continue;
            }
            let s = scalar(
                &g.unwrap_or_else(|| panic!("{kind}: no gradient for {name}")).abs().unwrap().sum_all().unwrap(),
            );
            assert!(s > 0.0 && s.is_finite(), "{kind}: gradient of {name} is {s}");
        }
        let summary = t.fit().unwrap();
        assert!(summary.val_loss.is_finite(), "{kind}: validation loss {}", summary.val_loss);
    }
}
