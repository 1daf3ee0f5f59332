//! Tests of the routers, their auxiliary losses and the MoE layer's dispatch/combine.
//!
//! Every expected value is computed independently of the code under test: host f64 math (softmax,
//! top-k, logsumexp, the analytic softmax gradient), central finite differences, a chi-square test
//! against the Gumbel-max distribution, or a per-token loop over the experts. Nothing here is a
//! number copied from a run of the code.

#![allow(clippy::needless_range_loop)] // index loops mirror the maths

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use gumbel_moe::config::{Config, EvalMode};
use gumbel_moe::moe::losses::{expert_fractions, load_balance, z_loss};
use gumbel_moe::moe::routers::gumbel::{relaxed, straight_through};
use gumbel_moe::moe::{build_router, MoeLayer, RouteCtx, Router};
use gumbel_moe::nn::{Ctx, Mlp, Params};
use gumbel_moe::rng::gumbel_noise;
use std::collections::{BTreeSet, HashMap};

mod common;
use common::host::*;

const CPU: Device = Device::Cpu;

// ---------- helpers ----------

/// A small config: `e` experts over `d`-dim tokens, the given router.
fn config(kind: &str, e: usize, d: usize, m: usize, k: usize, hard: bool) -> Config {
    // Soft Gumbel here means all K candidates (top_m = K); soft top-m < K is tested in routers.rs.
    router_config(kind, e, d, if kind == "gumbel" && !hard { k } else { m }, k, hard)
}

/// A router whose projection weight is exactly `w` (E, d): logits = x w^T.
fn router_from(cfg: &Config, w: &Tensor) -> Box<dyn Router> {
    let mut ts = HashMap::new();
    ts.insert("weight".to_string(), w.clone());
    let vb = VarBuilder::from_tensors(ts, w.dtype(), &CPU);
    build_router(cfg, 0, vb).expect("build router")
}

fn tensor2(data: &[f64], rows: usize, cols: usize, dtype: DType) -> Tensor {
    Tensor::from_vec(data.to_vec(), (rows, cols), &CPU).unwrap().to_dtype(dtype).unwrap()
}

fn host_logsumexp(v: &[f64]) -> f64 {
    let mx = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    mx + v.iter().map(|a| (a - mx).exp()).sum::<f64>().ln()
}

fn noise_of(seed: u64, step: u64, layer: u32, token: u32, expert: usize) -> f64 {
    gumbel_noise(seed, step as u32, layer, token, expert as u32) as f64
}

// ---------- 1. Gumbel-max selection frequencies ----------

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
        assert_eq!(r.m, 1, "{label}: hard top-1 routing must have m = 1");
        assert_eq!(r.indices.len(), tokens, "{label}: one index per token");
        let distinct: BTreeSet<u32> = r.indices.iter().copied().collect();
        assert!(
            distinct.len() > 1,
            "{label}: all {tokens} identical tokens of step {step} micro {micro} chose the same expert: noise is not per token"
        );
        for &i in &r.indices {
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

// ---------- 2. pre-filter ----------

#[test]
fn nothing_outside_the_prefilter_is_ever_selected() {
    let (e, d, t) = (13, 6, 96);
    let mut rng = Rng(11);
    let w = rng.normals(e * d, 1.0);
    let x = rng.normals(t * d, 1.0);
    let xt = tensor2(&x, t, d, DType::F32);
    let ref_logits = host_logits(&x, &w, t, d, e);
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
                    let got_logits = vec2(&r.logits);
                    let want_m = if hard { m } else { k };
                    assert_eq!(r.m, want_m, "{label}: experts per token");
                    assert_eq!(r.indices.len(), t * want_m, "{label}: indices length");
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
                        let chosen = &r.indices[tok * want_m..(tok + 1) * want_m];
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

// ---------- 3. straight-through: exact forward, softmax gradient ----------

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
    let logits = host_logits(x, w, t, d, e);
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
        let c = rng.normals(t * m, 1.0);
        let loss = (&r.weights * tensor2(&c, t, m, DType::F64)).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let got = flat(grads.get(wv.as_tensor()).expect("no gradient reached the router weight"));
        let want = host_relaxed_grad(
            &x,
            &w,
            (t, d, e, k),
            &r.indices,
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

// ---------- 4. the noise is crate::rng's, keyed by (seed, step, layer, token, expert) ----------

#[test]
fn noise_is_philox_gumbel_keyed_by_token_and_global_expert() {
    let (e, d, t) = (8, 5, 200);
    let (step, layer, micro, tau) = (17u64, 2u32, 3u32, 0.9);
    let mut rng = Rng(21);
    let w = rng.normals(e * d, 1.0);
    let x = rng.normals(t * d, 1.0);
    let xt = tensor2(&x, t, d, DType::F64);
    let ref_logits = host_logits(&x, &w, t, d, e);
    let base = micro * t as u32;
    let ctx = |seed| Ctx { train: true, step, tau, seed, micro };
    for (m, k) in [(1, 8), (1, 3), (2, 5)] {
        let label = format!("hard m={m} K={k}");
        let cfg = config("gumbel", e, d, m, k, true);
        let router = router_from(&cfg, &tensor2(&w, e, d, DType::F64));
        let mut per_seed = Vec::new();
        for seed in [42u64, 43] {
            let r = route(router.as_ref(), &xt, ctx(seed), layer);
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
                    &r.indices[tok * m..(tok + 1) * m],
                    want.as_slice(),
                    "{label} seed {seed}: token {tok} selection differs from host Gumbel-top-{m} with crate::rng noise"
                );
            }
            per_seed.push(r.indices);
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
            let ex = r.indices[tok * k + col] as usize;
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

// ---------- 5. eval ----------

#[test]
fn eval_argmax_has_no_noise_and_sample_mode_has() {
    let (e, d, t, seed, tau) = (8, 5, 200, 4u64, 0.5);
    let mut rng = Rng(5);
    let w = rng.normals(e * d, 1.0);
    let x = rng.normals(t * d, 1.0);
    let xt = tensor2(&x, t, d, DType::F64);
    let logits = host_logits(&x, &w, t, d, e);
    let eval = Ctx::eval(seed, tau);
    for (m, k) in [(1, 1), (1, 3), (1, e), (2, 4)] {
        let cfg = config("gumbel", e, d, m, k, true);
        assert_eq!(cfg.model.router.eval_mode, EvalMode::Argmax);
        let router = router_from(&cfg, &tensor2(&w, e, d, DType::F64));
        let r = route(router.as_ref(), &xt, eval, 0);
        for tok in 0..t {
            let want: Vec<u32> = host_topk(&logits[tok], m).iter().map(|&i| i as u32).collect();
            assert_eq!(
                &r.indices[tok * m..(tok + 1) * m],
                want.as_slice(),
                "eval m={m} K={k}: token {tok} is not the top-{m} of its logits"
            );
        }
    }
    // Ties (all-zero logits) go to the lower expert index, as documented by `top_k`.
    let router = router_from(&config("gumbel", e, d, 2, 4, true), &tensor2(&w, e, d, DType::F64));
    let r = route(router.as_ref(), &Tensor::zeros((3, d), DType::F64, &CPU).unwrap(), eval, 0);
    assert_eq!(r.indices, vec![0, 1, 0, 1, 0, 1], "eval with tied logits must pick the lowest indices");
    // Soft eval: weights = softmax(cand / tau), no noise.
    let k = 3;
    let router = router_from(&config("gumbel", e, d, 1, k, false), &tensor2(&w, e, d, DType::F64));
    let r = route(router.as_ref(), &xt, eval, 0);
    let wts = vec2(&r.weights);
    for tok in 0..t {
        let cand = host_topk(&logits[tok], k);
        let y = host_softmax(&cand.iter().map(|&j| logits[tok][j] / tau).collect::<Vec<_>>());
        for col in 0..k {
            assert_eq!(r.indices[tok * k + col] as usize, cand[col], "soft eval: candidate order of token {tok}");
            assert_close(wts[tok][col], y[col], 1e-12, 1e-14, &format!("soft eval weight [{tok}][{col}]"));
        }
    }
    // eval_mode = "sample": eval draws the same noise as training at the same (seed, step, micro).
    let mut cfg = config("gumbel", e, d, 1, e, true);
    cfg.model.router.eval_mode = EvalMode::Sample;
    let router = router_from(&cfg, &tensor2(&w, e, d, DType::F64));
    let sampled = route(router.as_ref(), &xt, eval, 0);
    let trained = route(router.as_ref(), &xt, Ctx { train: true, ..eval }, 0);
    assert_eq!(sampled.indices, trained.indices, "eval_mode=sample must use the training noise");
    let argmax: Vec<u32> = logits.iter().map(|l| host_topk(l, 1)[0] as u32).collect();
    assert_ne!(sampled.indices, argmax, "eval_mode=sample gave the noiseless argmax on all {t} tokens");
}

// ---------- 6. auxiliary losses ----------

fn host_balance(logits: &[Vec<f64>], indices: &[u32], e: usize) -> f64 {
    let t = logits.len();
    let mut f = vec![0f64; e];
    indices.iter().for_each(|&i| f[i as usize] += 1.0);
    let mut p = vec![0f64; e];
    for row in logits {
        for (j, v) in host_softmax(row).iter().enumerate() {
            p[j] += v / t as f64;
        }
    }
    e as f64 * (0..e).map(|j| f[j] / indices.len() as f64 * p[j]).sum::<f64>()
}

fn host_z(logits: &[Vec<f64>]) -> f64 {
    logits.iter().map(|r| host_logsumexp(r).powi(2)).sum::<f64>() / logits.len() as f64
}

#[test]
fn balance_and_z_losses_match_host_math() {
    let (e, t, m) = (7, 50, 2);
    let mut rng = Rng(8);
    // Include large logits so a naive logsumexp would overflow.
    let mut raw = rng.normals(t * e, 2.0);
    raw[3] = 800.0;
    raw[e + 1] = -750.0;
    let logits: Vec<Vec<f64>> = raw.chunks(e).map(|c| c.to_vec()).collect();
    let lt = tensor2(&raw, t, e, DType::F64);
    let probs: Vec<f64> = logits.iter().flat_map(|r| host_softmax(r)).collect();
    let pt = tensor2(&probs, t, e, DType::F64);
    let indices: Vec<u32> = logits.iter().flat_map(|r| host_topk(r, m)).map(|i| i as u32).collect();

    let f = expert_fractions(&indices, e);
    for j in 0..e {
        let want = indices.iter().filter(|&&i| i as usize == j).count() as f64 / (t * m) as f64;
        assert_close(f[j], want, 0.0, 1e-15, &format!("f_{j}"));
    }
    assert_close(
        scalar(&load_balance(&pt, &indices).unwrap()),
        host_balance(&logits, &indices, e),
        1e-12,
        0.0,
        "load balance",
    );
    assert_close(scalar(&z_loss(&lt).unwrap()), host_z(&logits), 1e-12, 0.0, "z-loss");

    // Uniform routing: equal probabilities and equal counts -> balance exactly 1.
    let zeros = Tensor::zeros((t, e), DType::F64, &CPU).unwrap();
    let uniform_p = gumbel_moe::nn::ops::softmax(&zeros).unwrap();
    let round_robin: Vec<u32> = (0..t * e).map(|i| (i % e) as u32).collect();
    assert_close(scalar(&load_balance(&uniform_p, &round_robin).unwrap()), 1.0, 1e-12, 0.0, "uniform balance");
    // Equal counts alone give 1 whatever P is (sum_i P_i = 1).
    assert_close(scalar(&load_balance(&pt, &round_robin).unwrap()), 1.0, 1e-12, 0.0, "balance with uniform f");
    // All slots on one expert: E * P_j.
    let one = vec![2u32; t];
    let p2: f64 = logits.iter().map(|r| host_softmax(r)[2]).sum::<f64>() / t as f64;
    assert_close(scalar(&load_balance(&pt, &one).unwrap()), e as f64 * p2, 1e-12, 0.0, "balance, all on expert 2");
    // z-loss of zero logits: ln(E)^2.
    assert_close(scalar(&z_loss(&zeros).unwrap()), (e as f64).ln().powi(2), 1e-12, 0.0, "z-loss of zeros");
}

#[test]
fn layer_aux_loss_and_stats_match_host_math() {
    let (e, d, b, t) = (5, 8, 2, 9);
    let n = b * t;
    let mut cfg = config("softmax_topk", e, d, 2, 2, true);
    cfg.model.moe.balance_coef = 0.3;
    cfg.model.moe.z_coef = 0.05;
    let params = Params::new();
    let layer = MoeLayer::new(&cfg, 0, params.var_builder(1, DType::F64, &CPU), &build_router).unwrap();
    let mut rng = Rng(12);
    let x = rng.normals(n * d, 1.0);
    let out = layer.forward(&Tensor::from_vec(x.clone(), (b, t, d), &CPU).unwrap(), &train_ctx(1, 0, 1.0)).unwrap();
    let w = flat(params.get("router.weight").expect("router.weight").as_tensor());
    let logits = host_logits(&x, &w, n, d, e);
    let indices: Vec<u32> = logits.iter().flat_map(|r| host_topk(r, 2)).map(|i| i as u32).collect();
    let bal = host_balance(&logits, &indices, e);
    let z = host_z(&logits);
    assert_close(
        scalar(&out.aux_loss),
        0.3 * bal + 0.05 * z,
        1e-12,
        0.0,
        "aux loss = balance_coef * balance + z_coef * z",
    );
    let s = &out.stats;
    assert_close(scalar(s.balance.as_ref().unwrap()), bal, 1e-6, 0.0, "stats.balance");
    assert_close(scalar(s.z.as_ref().unwrap()), z, 1e-6, 0.0, "stats.z");
    let ent: f64 =
        logits.iter().map(|r| -host_softmax(r).iter().map(|p| p * p.ln()).sum::<f64>()).sum::<f64>() / n as f64;
    assert_close(scalar(s.entropy.as_ref().unwrap()), ent, 1e-6, 0.0, "stats.entropy");
    let mut counts = vec![0u32; e];
    indices.iter().for_each(|&i| counts[i as usize] += 1);
    assert_eq!(s.tokens_per_expert, counts, "tokens per expert");
    assert_eq!((s.routed, s.dropped), (n * 2, 0), "routed / dropped slots (dropless)");
}

// ---------- 7. softmax top-m ----------

#[test]
fn softmax_topk_switch_and_mixtral_weights() {
    let (e, d, t) = (9, 4, 40);
    let mut rng = Rng(31);
    let w = rng.normals(e * d, 1.0);
    let x = rng.normals(t * d, 1.0);
    let logits = host_logits(&x, &w, t, d, e);
    for m in [1usize, 2, 3] {
        let router = router_from(&config("softmax_topk", e, d, m, m, true), &tensor2(&w, e, d, DType::F64));
        let r = route(router.as_ref(), &tensor2(&x, t, d, DType::F64), train_ctx(0, 0, 1.0), 0);
        assert_eq!(r.m, m);
        let wts = vec2(&r.weights);
        for tok in 0..t {
            let p = host_softmax(&logits[tok]);
            let top = host_topk(&logits[tok], m);
            let got: Vec<usize> = r.indices[tok * m..(tok + 1) * m].iter().map(|&i| i as usize).collect();
            assert_eq!(got, top, "m={m}: token {tok} indices are not the top-{m}");
            if m == 1 {
                assert_close(
                    wts[tok][0],
                    p[top[0]],
                    1e-12,
                    1e-15,
                    &format!("Switch weight of token {tok} = softmax prob"),
                );
            } else {
                let s: f64 = top.iter().map(|&i| p[i]).sum();
                for (j, &i) in top.iter().enumerate() {
                    assert_close(wts[tok][j], p[i] / s, 1e-12, 1e-15, &format!("Mixtral m={m} weight [{tok}][{j}]"));
                }
                assert_close(wts[tok].iter().sum(), 1.0, 0.0, 1e-14, &format!("Mixtral weights of token {tok} sum"));
            }
        }
        let probs = vec2(&r.probs);
        for tok in 0..t {
            for (j, p) in host_softmax(&logits[tok]).iter().enumerate() {
                assert_close(probs[tok][j], *p, 1e-12, 1e-15, "routing.probs");
            }
        }
    }
}

// ---------- 8. finite differences ----------

/// Step of the finite differences. The five-point central stencil below has truncation error
/// h^4 f^(5) / 30 (~1e-18 here) and rounding error ~1.5 / h ulps of the loss (~1e-11 relative), so
/// a 1e-6 relative tolerance leaves a wide margin; the two-point stencil with h = 1e-6 has ~1e-8
/// absolute rounding noise, too close to the tolerance for the small gradients.
const H: f64 = 1e-4;

/// d f / d x at 0 by the five-point central difference of f(x + delta).
fn central_diff(mut f: impl FnMut(f64) -> f64) -> f64 {
    (-f(2.0 * H) + 8.0 * f(H) - 8.0 * f(-H) + f(-2.0 * H)) / (12.0 * H)
}

/// Central-difference check of d sum(c * weights) / dW for a router built from `cfg`.
fn fd_router(cfg: &Config, w: &[f64], x: &[f64], t: usize, ctx: Ctx, elems: &[usize], label: &str) {
    let (e, d) = (cfg.model.moe.num_experts, cfg.model.n_embd);
    let xt = tensor2(x, t, d, DType::F64);
    let wv = Var::from_tensor(&tensor2(w, e, d, DType::F64)).unwrap();
    let r = route(router_from(cfg, wv.as_tensor()).as_ref(), &xt, ctx, 1);
    let c = tensor2(&Rng(1234).normals(t * r.m, 1.0), t, r.m, DType::F64);
    let loss = (&r.weights * &c).unwrap().sum_all().unwrap();
    let grad = flat(loss.backward().unwrap().get(wv.as_tensor()).expect("no gradient to the router weight"));
    let loss_at = |wp: &[f64]| {
        let r = route(router_from(cfg, &tensor2(wp, e, d, DType::F64)).as_ref(), &xt, ctx, 1);
        scalar(&(&r.weights * &c).unwrap().sum_all().unwrap())
    };
    let mut largest = 0f64;
    for &i in elems {
        let fd = central_diff(|delta| {
            let mut wp = w.to_vec();
            wp[i] += delta;
            loss_at(&wp)
        });
        largest = largest.max(fd.abs());
        if std::env::var("ROUTER_TEST_VERBOSE").is_ok() {
            eprintln!(
                "{label} W[{i}] grad {:e} fd {fd:e} rel err {:e}",
                grad[i],
                (grad[i] - fd).abs() / fd.abs().max(1e-12)
            );
        }
        assert_close(grad[i], fd, 1e-6, 1e-10, &format!("{label}: dL/dW[{i}] analytic vs central difference"));
    }
    assert!(largest > 1e-3, "{label}: all checked gradients are ~0, the check is vacuous");
}

#[test]
fn router_gradients_match_finite_differences() {
    let (e, d, t) = (7, 5, 12);
    let mut rng = Rng(77);
    let w = rng.normals(e * d, 1.0);
    let x = rng.normals(t * d, 1.0);
    let elems = [0, 4, 9, 13, 17, 22, 28, 34];
    let ctx = train_ctx(3, 12, 0.7);
    fd_router(&config("gumbel", e, d, 1, 4, false), &w, &x, t, ctx, &elems, "soft gumbel K=4");
    fd_router(&config("gumbel", e, d, 1, e, false), &w, &x, t, ctx, &elems, "soft gumbel K=E");
    fd_router(&config("softmax_topk", e, d, 2, 2, true), &w, &x, t, ctx, &elems, "softmax_topk m=2");
    fd_router(&config("softmax_topk", e, d, 1, 1, true), &w, &x, t, ctx, &elems, "softmax_topk m=1");
    fd_router(&config("dense", e, d, 1, 1, true), &w, &x, t, ctx, &elems, "dense");
}

/// Sets every parameter to N(0, 0.5) values so that all terms of the loss are O(1).
fn randomise(params: &Params, rng: &mut Rng) {
    for (_, v) in params.named() {
        let vals = rng.normals(v.elem_count(), 0.5);
        v.set(&Tensor::from_vec(vals, v.shape(), &CPU).unwrap()).unwrap();
    }
}

fn layer_loss(layer: &MoeLayer, x: &Tensor, ctx: &Ctx, c: &Tensor) -> Tensor {
    let out = layer.forward(x, ctx).unwrap();
    ((out.y * c).unwrap().sum_all().unwrap() + out.aux_loss).unwrap()
}

/// Central differences of loss = sum(c * y) + aux_loss wrt chosen elements of named parameters,
/// to relative tolerance `rtol`.
fn fd_layer(cfg: &Config, ctx: Ctx, checks: &[(&str, &[usize])], rtol: f64, label: &str) {
    let (e, d, b, t) = (cfg.model.moe.num_experts, cfg.model.n_embd, 2, 5);
    let params = Params::new();
    let layer = MoeLayer::new(cfg, 1, params.var_builder(9, DType::F64, &CPU), &build_router).unwrap();
    assert_eq!(layer.num_experts(), e);
    let mut rng = Rng(4242);
    randomise(&params, &mut rng);
    let x = Tensor::from_vec(rng.normals(b * t * d, 1.0), (b, t, d), &CPU).unwrap();
    let c = Tensor::from_vec(rng.normals(b * t * d, 1.0), (b, t, d), &CPU).unwrap();
    let grads = layer_loss(&layer, &x, &ctx, &c).backward().unwrap();
    let mut largest = 0f64;
    for &(name, elems) in checks {
        let var = params.get(name).unwrap_or_else(|| panic!("{label}: no parameter {name}"));
        let base = flat(var.as_tensor());
        // An expert that received no token is not in the graph: its gradient is zero.
        let grad = match grads.get(var.as_tensor()) {
            Some(g) => flat(g),
            None if name.starts_with("experts.") => vec![0.0; base.len()],
            None => panic!("{label}: no gradient for {name}"),
        };
        for &i in elems {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &CPU).unwrap()).unwrap();
                scalar(&layer_loss(&layer, &x, &ctx, &c))
            };
            let fd = central_diff(at);
            var.set(&Tensor::from_vec(base.clone(), var.shape(), &CPU).unwrap()).unwrap();
            largest = largest.max(fd.abs());
            if std::env::var("ROUTER_TEST_VERBOSE").is_ok() {
                eprintln!(
                    "{label} {name}[{i}] grad {:e} fd {:e} rel err {:e}",
                    grad[i],
                    fd,
                    (grad[i] - fd).abs() / fd.abs().max(1e-12)
                );
            }
            assert_close(
                grad[i],
                fd,
                rtol,
                1e-10,
                &format!("{label}: d loss / d {name}[{i}] analytic vs central difference"),
            );
        }
    }
    assert!(largest > 1e-3, "{label}: all checked gradients are ~0, the check is vacuous");
}

/// Tolerance of the checks whose gradient passes through a GELU expert. candle-core 0.11.1's
/// backward of `gelu_erf` (backprop.rs, `Op::Unary(_, UnaryOp::GeluErf)`) uses 0.398942 for
/// 1/sqrt(2 pi) = 0.3989422804..., a relative error of 7e-7 in one term, so GELU experts get a looser
/// bound than the SwiGLU ones (whose SiLU backward is exact), which are held to 1e-6.
const GELU_RTOL: f64 = 2e-5;

#[test]
fn moe_layer_gradients_match_finite_differences() {
    let (e, d) = (5, 8);
    let ctx = train_ctx(5, 3, 0.8);
    let experts: [(&str, &[usize]); 5] = [
        ("experts.0.c_fc.weight", &[0, 17, 100]),
        ("experts.2.c_fc.bias", &[1, 9]),
        ("experts.3.c_proj.weight", &[5, 60, 127]),
        ("experts.4.c_proj.bias", &[0, 7]),
        ("experts.1.c_fc.weight", &[3, 77]),
    ];
    let gate: [(&str, &[usize]); 2] = [("experts.0.c_gate.weight", &[2, 50]), ("experts.3.c_gate.weight", &[9])];
    let router: (&str, &[usize]) = ("router.weight", &[0, 6, 11, 19, 25, 33, 39]);
    let routers = [
        ("soft gumbel K=3", config("gumbel", e, d, 1, 3, false)),
        ("dense", config("dense", e, d, 1, 1, true)),
        ("softmax_topk m=2", config("softmax_topk", e, d, 2, 2, true)),
        // Hard Gumbel: the forward is piecewise constant in the routing, smooth in the experts.
        ("hard gumbel m=2 K=4 (experts only)", config("gumbel", e, d, 2, 4, true)),
    ];
    for (name, mut cfg) in routers {
        cfg.model.moe.balance_coef = 0.2;
        cfg.model.moe.z_coef = 0.05;
        let smooth_router = !name.starts_with("hard");
        for act in ["gelu", "swiglu"] {
            cfg.model.moe.activation = act.parse().unwrap();
            let mut checks: Vec<(&str, &[usize])> = experts.to_vec();
            if smooth_router {
                checks.push(router);
            }
            if act == "swiglu" {
                checks.extend(gate);
            }
            let rtol = if act == "gelu" { GELU_RTOL } else { 1e-6 };
            fd_layer(&cfg, ctx, &checks, rtol, &format!("{name} layer, {act}"));
        }
    }
}

// ---------- 9. dispatch and combine ----------

/// Checks a layer's output against a per-token loop over the routing of a router built on the same
/// parameters, applying `cfg`'s capacity slot-major; returns the dropped token-slots.
fn check_dispatch(cfg: &Config, ctx: Ctx, skew: bool, label: &str) -> usize {
    let (e, d, b, t) = (cfg.model.moe.num_experts, cfg.model.n_embd, 3, 7);
    let n = b * t;
    let params = Params::new();
    let layer = MoeLayer::new(cfg, 2, params.var_builder(17, DType::F64, &CPU), &build_router).unwrap();
    let mut rng = Rng(555);
    randomise(&params, &mut rng);
    let mut x = rng.normals(n * d, 1.0);
    if skew {
        // Positive tokens and a router row of ones: most tokens prefer expert 0.
        x.iter_mut().for_each(|v| *v = v.abs());
        let rw = params.get("router.weight").unwrap();
        let mut w = flat(rw.as_tensor());
        w[..d].iter_mut().for_each(|v| *v = 3.0);
        rw.set(&Tensor::from_vec(w, (e, d), &CPU).unwrap()).unwrap();
    }
    let xt = Tensor::from_vec(x, (b, t, d), &CPU).unwrap();
    let out = layer.forward(&xt, &ctx).unwrap();
    let y = flat(&out.y);

    // The same parameters by name: the routing the layer saw and each expert alone.
    let vb = params.var_builder(17, DType::F64, &CPU);
    let router = build_router(cfg, 2, vb.pp("router")).unwrap();
    let xf = xt.reshape((n, d)).unwrap();
    let r = router.route(&xf, &RouteCtx::new(ctx, 2)).unwrap();
    let mlps: Vec<Mlp> = (0..e).map(|i| Mlp::new(cfg, cfg.expert_hidden(), vb.pp("experts").pp(i)).unwrap()).collect();
    let wts = vec2(&r.weights);
    let m = r.m;
    let cap = if cfg.model.moe.capacity_factor > 0.0 {
        ((cfg.model.moe.capacity_factor * (n * m) as f64 / e as f64).ceil() as usize).max(1)
    } else {
        usize::MAX
    };
    let mut load = vec![0usize; e];
    let mut kept = vec![false; n * m];
    let mut dropped = 0;
    for slot in 0..m {
        for tok in 0..n {
            let ex = r.indices[tok * m + slot] as usize;
            if load[ex] < cap {
                load[ex] += 1;
                kept[tok * m + slot] = true;
            } else {
                dropped += 1;
            }
        }
    }
    for tok in 0..n {
        let xrow = xf.narrow(0, tok, 1).unwrap();
        let mut want = vec![0f64; d];
        for slot in 0..m {
            if kept[tok * m + slot] {
                let ex = r.indices[tok * m + slot] as usize;
                let o = flat(&mlps[ex].forward(&xrow).unwrap());
                (0..d).for_each(|q| want[q] += wts[tok][slot] * o[q]);
            }
        }
        let all_dropped = (0..m).all(|s| !kept[tok * m + s]);
        for q in 0..d {
            let got = y[tok * d + q];
            if all_dropped {
                assert_eq!(got, 0.0, "{label}: token {tok} lost all its slots but its output[{q}] = {got:e}");
            } else {
                assert_close(got, want[q], 1e-12, 1e-13, &format!("{label}: output of token {tok}[{q}]"));
            }
        }
    }
    assert_eq!(out.stats.dropped, dropped, "{label}: stats.dropped");
    assert_eq!(out.stats.routed, n * m, "{label}: stats.routed");
    assert_eq!(
        out.stats.tokens_per_expert,
        load.iter().map(|&v| v as u32).collect::<Vec<_>>(),
        "{label}: tokens per expert"
    );
    dropped
}

#[test]
fn dispatch_and_combine_match_a_per_token_loop() {
    let (e, d) = (5, 8);
    let ctx = train_ctx(8, 21, 0.5);
    let hard1 = config("gumbel", e, d, 1, 3, true);
    assert_eq!(check_dispatch(&hard1, ctx, false, "hard gumbel top-1, dropless"), 0);
    let hard2 = config("gumbel", e, d, 2, 4, true);
    check_dispatch(&hard2, ctx, false, "hard gumbel top-2, dropless");
    check_dispatch(&config("softmax_topk", e, d, 2, 2, true), ctx, false, "softmax_topk m=2, dropless");
    check_dispatch(&config("gumbel", e, d, 1, 4, false), ctx, false, "soft gumbel K=4, dropless");
    check_dispatch(&config("dense", e, d, 1, 1, true), ctx, false, "dense");

    // With a capacity and skewed routing, tokens are dropped.
    let mut cap1 = hard1.clone();
    cap1.model.moe.capacity_factor = 1.0;
    let dropped = check_dispatch(&cap1, ctx, true, "hard gumbel top-1, capacity 1.0");
    assert!(dropped > 0, "hard top-1 with capacity 1.0 and skewed routing dropped nothing: the test is vacuous");
    let mut cap2 = config("softmax_topk", e, d, 2, 2, true);
    cap2.model.moe.capacity_factor = 0.6;
    let dropped = check_dispatch(&cap2, ctx, true, "softmax_topk m=2, capacity 0.6");
    assert!(dropped > 0, "softmax_topk m=2 with capacity 0.6 and skewed routing dropped nothing");
    // Spread routing with a tight capacity: second choices compete with later first choices, so
    // the slot-major order (all first choices before any second) decides who is dropped.
    let mut cap3 = config("softmax_topk", e, d, 2, 2, true);
    cap3.model.moe.capacity_factor = 0.7;
    let dropped = check_dispatch(&cap3, ctx, false, "softmax_topk m=2, capacity 0.7");
    assert!(dropped > 0, "softmax_topk m=2 with capacity 0.7 dropped nothing");
    let mut cap4 = hard2.clone();
    cap4.model.moe.capacity_factor = 0.8;
    let dropped = check_dispatch(&cap4, ctx, false, "hard gumbel top-2, capacity 0.8");
    assert!(dropped > 0, "hard gumbel top-2 with capacity 0.8 dropped nothing");
}

// ---------- misc ----------

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
