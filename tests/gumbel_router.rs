//! The Gumbel-Softmax router's selection and gradient: hard top-1 frequencies against softmax over
//! the pre-filtered logits (chi-square), nothing chosen outside the top-K pre-filter, exact 1/m hard
//! weights with the relaxed sample's gradient (straight-through), and the refusal of bad settings.
//!
//! Expected values come from host f64 math (softmax, top-k, the analytic softmax gradient) and a
//! chi-square test against the Gumbel-max distribution; no number is copied from a run.

#![allow(clippy::needless_range_loop)] // index loops mirror the maths

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use gumbel_moe::moe::routers::gumbel::{relaxed, straight_through};
use gumbel_moe::moe::{build_router, RouteCtx};
use gumbel_moe::nn::Ctx;
use std::collections::{BTreeSet, HashMap};

mod common;
use common::host::*;
use common::routing::{config, noise_of, router_from};

const CPU: Device = Device::Cpu;

// ---------- Gumbel-max selection frequencies ----------

/// Counts the hard top-1 selections of `tokens` identical rows with the given logits over the
/// given (step, micro) calls, and checks them against softmax over the top-K logits by chi-square.
fn gumbel_max_chi_square(logits: &[f64], k: usize, tokens: usize, calls: &[(u64, u32)], critical: f64, label: &str) {
    let e = logits.len();
    let cfg = config("gumbel", e, e, 1, k, true);
    // W = identity: the logits are exactly the (f32) token row.
    let mut eye = vec![0f64; e * e];
    (0..e).for_each(|i| eye[i * e + i] = 1.0);
    let router = router_from(&cfg, &tensor2(&eye, e, e, DType::F32));
    let row: Vec<f64> = logits.iter().map(|&v| v as f32 as f64).collect();
    let x = tensor2(&row.repeat(tokens), tokens, e, DType::F32);

    let mut counts = vec![0u64; e];
    for &(step, micro) in calls {
        let ctx = Ctx { train: true, step, tau: 0.7, seed: 2024, micro };
        let r = route(router.as_ref(), &x, ctx, 3);
        let r_indices = index_vec(&r.indices); // (T, m) row-major
        assert_eq!(r.m, 1, "{label}: hard top-1 routing must have m = 1");
        assert_eq!(r_indices.len(), tokens, "{label}: one index per token");
        let distinct: BTreeSet<u32> = r_indices.iter().copied().collect();
        assert!(
            distinct.len() > 1,
            "{label}: all {tokens} identical tokens of step {step} micro {micro} chose the same expert: noise is not per token"
        );
        for &i in &r_indices {
            counts[i as usize] += 1;
        }
    }
    let n: u64 = counts.iter().sum();
    let top = host_topk(&row, k);
    let outside: u64 = (0..e).filter(|i| !top.contains(i)).map(|i| counts[i]).sum();
    assert_eq!(outside, 0, "{label}: {outside} selections outside the top-{k} logits (counts {counts:?})");
    let p = host_softmax(&top.iter().map(|&i| row[i]).collect::<Vec<_>>());
    let chi2: f64 = top
        .iter()
        .zip(&p)
        .map(|(&i, &pi)| {
            let exp = pi * n as f64;
            (counts[i] as f64 - exp).powi(2) / exp
        })
        .sum();
    let observed: Vec<f64> = top.iter().map(|&i| counts[i] as f64 / n as f64).collect();
    assert!(
        chi2 < critical,
        "{label}: chi-square {chi2:.2} >= {critical} (df {}, p < 0.001) over {n} draws; observed {observed:?}, softmax of top-{k} {p:?}",
        k - 1
    );
}

#[test]
fn gumbel_max_frequencies_match_softmax_of_prefiltered_logits() {
    // E = 10 (not a multiple of 32), K = 4, tie-free logits; top-4 are experts 5, 2, 7, 3.
    let logits = [0.3, -1.2, 1.5, 0.9, -0.4, 2.1, 0.0, 1.1, -2.0, 0.6];
    let calls: Vec<(u64, u32)> = (0..10).map(|s| (s * 7 + 1, 0)).collect();
    // chi-square critical value, df = 3, upper tail 0.001.
    gumbel_max_chi_square(&logits, 4, 5000, &calls, 16.266, "E=10 K=4");

    // E = 37, K = 5, logits a permutation of 0.25 * (0..37) - 4: top-5 probabilities ~ exp(-0.25 j).
    let logits: Vec<f64> = (0..37).map(|i| ((i * 11) % 37) as f64 * 0.25 - 4.0).collect();
    let calls: Vec<(u64, u32)> = (0..5).flat_map(|s| (0..2).map(move |m| (1000 + s, m))).collect();
    // df = 4, upper tail 0.001.
    gumbel_max_chi_square(&logits, 5, 4000, &calls, 18.467, "E=37 K=5");
}

// ---------- pre-filter ----------

#[test]
fn nothing_outside_the_prefilter_is_ever_selected() {
    let (e, d, t) = (13, 6, 96);
    let mut rng = Rng(11);
    let w = rng.normals(e * d, 1.0);
    let x = rng.normals(t * d, 1.0);
    let xt = tensor2(&x, t, d, DType::F32);
    let ref_logits = reference_logits(&x, &w, t, d, e);
    for k in [1, 5, e] {
        for m in [1, 2] {
            if m > k {
                continue;
            }
            for hard in [true, false] {
                let label = format!("K={k} m={m} hard={hard}");
                let cfg = config("gumbel", e, d, m, k, hard);
                let router = router_from(&cfg, &tensor2(&w, e, d, DType::F32));
                for step in 0..4u64 {
                    let r = route(router.as_ref(), &xt, train_ctx(5, step, 1.0), 0);
                    let r_indices = index_vec(&r.indices); // (T, m) row-major
                    let got_logits = vec2(&r.logits);
                    let want_m = if hard { m } else { k };
                    assert_eq!(r.m, want_m, "{label}: experts per token");
                    assert_eq!(r_indices.len(), t * want_m, "{label}: indices length");
                    assert_eq!(r.weights.dims(), &[t, want_m], "{label}: weights shape");
                    for tok in 0..t {
                        for j in 0..e {
                            assert_close(
                                got_logits[tok][j],
                                ref_logits[tok][j],
                                1e-5,
                                1e-5,
                                &format!("{label}: logit"),
                            );
                        }
                        let cand: BTreeSet<u32> = host_topk(&got_logits[tok], k).iter().map(|&i| i as u32).collect();
                        let chosen = &r_indices[tok * want_m..(tok + 1) * want_m];
                        let chosen_set: BTreeSet<u32> = chosen.iter().copied().collect();
                        assert_eq!(
                            chosen_set.len(),
                            want_m,
                            "{label}: token {tok} chose a repeated expert: {chosen:?}"
                        );
                        if hard {
                            assert!(
                                chosen_set.is_subset(&cand),
                                "{label}: token {tok} chose {chosen:?} outside its top-{k} {cand:?}"
                            );
                        } else {
                            assert_eq!(
                                chosen_set, cand,
                                "{label}: soft router must use exactly the top-{k} candidates"
                            );
                        }
                    }
                    if !hard {
                        for (tok, row) in vec2(&r.weights).iter().enumerate() {
                            let s: f64 = row.iter().sum();
                            assert!(row.iter().all(|&v| v >= 0.0), "{label}: negative soft weight at token {tok}");
                            assert_close(s, 1.0, 0.0, 1e-5, &format!("{label}: soft weights of token {tok} sum"));
                        }
                    }
                }
            }
        }
    }
}

// ---------- straight-through: exact forward, softmax gradient ----------

/// Host analytic gradient of L = sum_t sum_j c[t][j] * y_t[idx[t][j]] wrt W, with
/// y_t = softmax over the top-K candidates of (l + g) / tau (y = 0 outside), l = W x_t.
#[allow(clippy::too_many_arguments)]
fn host_relaxed_grad(
    x: &[f64],
    w: &[f64],
    (t, d, e, k): (usize, usize, usize, usize),
    idx: &[u32],
    m: usize,
    c: &[f64],
    g: impl Fn(usize, usize) -> f64,
    tau: f64,
) -> Vec<f64> {
    let logits = reference_logits(x, w, t, d, e);
    let mut grad = vec![0f64; e * d];
    for tok in 0..t {
        let cand = host_topk(&logits[tok], k);
        let y = host_softmax(&cand.iter().map(|&j| (logits[tok][j] + g(tok, j)) / tau).collect::<Vec<_>>());
        // a_e: the coefficient each candidate gets in the loss.
        let a: Vec<f64> = cand
            .iter()
            .map(|&ex| (0..m).filter(|&s| idx[tok * m + s] as usize == ex).map(|s| c[tok * m + s]).sum())
            .collect();
        let ay: f64 = a.iter().zip(&y).map(|(a, y)| a * y).sum();
        for (p, &ex) in cand.iter().enumerate() {
            let dl = y[p] * (a[p] - ay) / tau;
            for q in 0..d {
                grad[ex * d + q] += dl * x[tok * d + q];
            }
        }
    }
    grad
}

#[test]
fn hard_weights_are_exact_and_gradient_is_the_relaxed_one() {
    let (e, d, t, k) = (6, 4, 16, 4);
    let (seed, step, layer, tau) = (77, 9, 1, 0.6);
    let mut rng = Rng(3);
    let w = rng.normals(e * d, 1.0);
    let x = rng.normals(t * d, 1.0);
    for m in [1usize, 2] {
        // Forward weights exactly 1/m, in f32 and f64.
        for dtype in [DType::F32, DType::F64] {
            let cfg = config("gumbel", e, d, m, k, true);
            let router = router_from(&cfg, &tensor2(&w, e, d, dtype));
            let r = route(router.as_ref(), &tensor2(&x, t, d, dtype), train_ctx(seed, step, tau), layer);
            for (tok, row) in vec2(&r.weights).iter().enumerate() {
                for &v in row {
                    assert!(
                        v.to_bits() == (1.0 / m as f64).to_bits(),
                        "m={m} {dtype:?}: hard weight of token {tok} is {v:e}, not exactly 1/{m}"
                    );
                }
            }
        }
        // Backward: straight-through gradient equals the gradient of the relaxed sample at the
        // selected experts, computed on the host.
        let cfg = config("gumbel", e, d, m, k, true);
        let wv = Var::from_tensor(&tensor2(&w, e, d, DType::F64)).unwrap();
        let router = router_from(&cfg, wv.as_tensor());
        let r = route(router.as_ref(), &tensor2(&x, t, d, DType::F64), train_ctx(seed, step, tau), layer);
        let r_indices = index_vec(&r.indices); // (T, m) row-major
        let c = rng.normals(t * m, 1.0);
        let loss = (&r.weights * tensor2(&c, t, m, DType::F64)).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let got = flat(grads.get(wv.as_tensor()).expect("no gradient reached the router weight"));
        let want = host_relaxed_grad(
            &x,
            &w,
            (t, d, e, k),
            &r_indices,
            m,
            &c,
            |tok, ex| noise_of(seed, step, layer, tok as u32, ex),
            tau,
        );
        assert!(want.iter().any(|v| v.abs() > 1e-3), "m={m}: reference gradient is trivially zero");
        for (i, (&g, &r)) in got.iter().zip(&want).enumerate() {
            assert_close(g, r, 1e-12, 1e-13, &format!("m={m}: straight-through dL/dW[{i}]"));
        }
    }
}

#[test]
fn relaxed_and_straight_through_building_blocks() {
    let (t, k, m, tau) = (5, 4, 2, 0.8);
    let mut rng = Rng(99);
    let cand = rng.normals(t * k, 1.5);
    let g = rng.normals(t * k, 1.0);
    let c = rng.normals(t * m, 1.0);
    let sel: Vec<u32> = (0..t).flat_map(|i| [(i % k) as u32, ((i + 2) % k) as u32]).collect();
    let cv = Var::from_tensor(&tensor2(&cand, t, k, DType::F64)).unwrap();
    let y = relaxed(cv.as_tensor(), &tensor2(&g, t, k, DType::F64), tau).unwrap();
    let yh = vec2(&y);
    for tok in 0..t {
        let want = host_softmax(&(0..k).map(|j| (cand[tok * k + j] + g[tok * k + j]) / tau).collect::<Vec<_>>());
        for j in 0..k {
            assert_close(yh[tok][j], want[j], 1e-14, 1e-15, &format!("relaxed y[{tok}][{j}]"));
        }
    }
    let sel_t = Tensor::from_vec(sel.clone(), (t, m), &CPU).unwrap();
    let st = straight_through(&y, &sel_t, m).unwrap();
    for v in flat(&st) {
        assert_eq!(v.to_bits(), 0.5f64.to_bits(), "straight-through forward must be exactly 1/m = 0.5, got {v:e}");
    }
    let loss = (&st * tensor2(&c, t, m, DType::F64)).unwrap().sum_all().unwrap();
    let got = flat(loss.backward().unwrap().get(cv.as_tensor()).expect("no gradient to the candidates"));
    for tok in 0..t {
        let y = &yh[tok];
        let a: Vec<f64> =
            (0..k).map(|p| (0..m).filter(|&s| sel[tok * m + s] as usize == p).map(|s| c[tok * m + s]).sum()).collect();
        let ay: f64 = a.iter().zip(y).map(|(a, y)| a * y).sum();
        for p in 0..k {
            let want = y[p] * (a[p] - ay) / tau;
            assert_close(got[tok * k + p], want, 1e-12, 1e-14, &format!("d loss / d cand[{tok}][{p}]"));
        }
    }
}

#[test]
fn invalid_settings_are_refused() {
    let (e, d) = (6, 3);
    let w = tensor2(&Rng(1).normals(e * d, 1.0), e, d, DType::F32);
    let build = |m, k| {
        let mut ts = HashMap::new();
        ts.insert("weight".to_string(), w.clone());
        build_router(&config("gumbel", e, d, m, k, true), 0, VarBuilder::from_tensors(ts, DType::F32, &CPU))
    };
    assert!(build(1, e + 1).is_err(), "prefilter K > E must be refused");
    assert!(build(3, 2).is_err(), "top_m > K must be refused");
    assert!(build(0, 2).is_err(), "top_m = 0 must be refused");
    let router = build(1, 3).unwrap();
    let x = tensor2(&[0.5; 6], 2, d, DType::F32);
    let err = router.route(&x, &RouteCtx::new(train_ctx(0, 0, 0.0), 0)).err();
    assert!(err.is_some(), "tau = 0 must be refused");
    let bad = tensor2(&[f64::NAN, 0.0, 0.0, 1.0, 1.0, 1.0], 2, d, DType::F32);
    let err = match router.route(&bad, &RouteCtx::new(train_ctx(0, 5, 1.0), 4)) {
        Ok(_) => panic!("NaN logits must be refused"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(msg.contains("token 0") && msg.contains("layer 4"), "error should locate the non-finite logit: {msg}");
}
