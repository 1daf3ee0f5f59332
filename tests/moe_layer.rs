//! The MoE layer: the balance and z auxiliary losses and the layer's aux loss and statistics
//! against host math, the layer's gradients against central finite differences, dispatch and
//! combine (with capacity and dropped slots) against a per-token loop over the experts, and the
//! error naming the first non-finite router logit.
//!
//! Every expected value is computed independently of the code under test: host f64 math (softmax,
//! top-k, logsumexp), central finite differences, or a per-token loop over the experts.

#![allow(clippy::needless_range_loop)] // index loops mirror the maths

use candle_core::{DType, Device, Tensor};
use gumbel_moe::config::Config;
use gumbel_moe::moe::losses::{expert_fractions, load_balance, z_loss};
use gumbel_moe::moe::{build_router, MoeLayer, RouteCtx};
use gumbel_moe::nn::{Ctx, Mlp, Params};

mod common;
use common::fd::central_diff;
use common::host::*;
use common::routing::config;

const CPU: Device = Device::Cpu;

fn host_logsumexp(v: &[f64]) -> f64 {
    let mx = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    mx + v.iter().map(|a| (a - mx).exp()).sum::<f64>().ln()
}

// ---------- auxiliary losses ----------

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
        scalar(&load_balance(&pt, &u32_tensor(&indices)).unwrap()),
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
    assert_close(
        scalar(&load_balance(&uniform_p, &u32_tensor(&round_robin)).unwrap()),
        1.0,
        1e-12,
        0.0,
        "uniform balance",
    );
    // Equal counts alone give 1 whatever P is (sum_i P_i = 1).
    assert_close(
        scalar(&load_balance(&pt, &u32_tensor(&round_robin)).unwrap()),
        1.0,
        1e-12,
        0.0,
        "balance with uniform f",
    );
    // All slots on one expert: E * P_j.
    let one = vec![2u32; t];
    let p2: f64 = logits.iter().map(|r| host_softmax(r)[2]).sum::<f64>() / t as f64;
    assert_close(
        scalar(&load_balance(&pt, &u32_tensor(&one)).unwrap()),
        e as f64 * p2,
        1e-12,
        0.0,
        "balance, all on expert 2",
    );
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
    let logits = reference_logits(&x, &w, n, d, e);
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

// ---------- dispatch and combine ----------

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
    let r_indices = index_vec(&r.indices); // (T, m) row-major
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
            let ex = r_indices[tok * m + slot] as usize;
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
                let ex = r_indices[tok * m + slot] as usize;
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

/// Routers other than the Gumbel op do not check their logits: the MoE layer flags non-finite
/// logits on the device (read with the dispatch plan) and names the first one, on both paths.
#[test]
fn moe_layer_names_the_first_non_finite_logit() {
    let (e, d, b, t) = (5, 3, 2, 4);
    for kind in ["softmax_topk", "sigmoid_bias", "noisy_topk", "dense"] {
        for imp in ["fused", "reference"] {
            let mut cfg = router_config(kind, e, d, 2, 2, true);
            cfg.model.router.implementation = imp.parse().unwrap();
            let params = Params::new();
            let layer = MoeLayer::new(&cfg, 1, params.var_builder(4, DType::F64, &CPU), &build_router).unwrap();
            let mut rng = Rng(12);
            for (_, v) in params.named() {
                let vals = Tensor::from_vec(rng.normals(v.elem_count(), 0.5), v.shape(), &CPU).unwrap();
                v.set(&vals.to_dtype(v.dtype()).unwrap()).unwrap(); // the sigmoid router's bias is f32
            }
            // Column 0 of x is 0 except for row 5 (batch 1, position 1), and router row 3 has
            // f64::MAX there: logit (5, 3) is +inf, every other logit finite.
            let rw = params.get("router.weight").unwrap();
            let mut w = flat(rw.as_tensor());
            w[3 * d] = f64::MAX;
            rw.set(&Tensor::from_vec(w, (e, d), &CPU).unwrap()).unwrap();
            let mut x = rng.normals(b * t * d, 1.0);
            (0..b * t).for_each(|row| x[row * d] = 0.0);
            let fine = Tensor::from_vec(x.clone(), (b, t, d), &CPU).unwrap();
            x[5 * d] = 2.0;
            let xt = Tensor::from_vec(x, (b, t, d), &CPU).unwrap();
            let ctx = Ctx { train: true, step: 7, tau: 1.0, seed: 3, micro: 0 };
            let err = match layer.forward(&xt, &ctx) {
                Ok(_) => panic!("{kind} {imp}: an infinite logit must stop the layer"),
                Err(e) => e.to_string(),
            };
            let want = "non-finite router logit inf at step 7, layer 1, token 5, expert 3: training diverged";
            assert!(err.contains(want), "{kind} {imp}: {err}");
            // The same layer with finite logits routes.
            assert!(layer.forward(&fine, &ctx).is_ok(), "{kind} {imp}: finite logits refused");
        }
    }
}
