//! The Gumbel router's top-m without replacement and its token input: selected pairs follow
//! Plackett-Luce (chi-square), soft top-m weights are the renormalised relaxed sample with
//! finite-difference gradients, fused and reference agree, and `input = "token"` looks the logits
//! up in a learned (V, E) table.

#![allow(clippy::needless_range_loop)] // index loops mirror the maths

use candle_core::{DType, Device, Tensor};
use gumbel_moe::config::{RouterInput, RouterKind};
use gumbel_moe::moe::{build_router, RouteCtx};
use gumbel_moe::nn::Params;
use gumbel_moe::rng::gumbel_noise;

mod common;
use common::fd::fd_check;
use common::host::*;
use common::routing::{hash_route, router_with};

const CPU: Device = Device::Cpu;

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
    let xt = tensor2(&x, t, d, DType::F64);
    let logits = reference_logits(&x1, &w, 1, d, e).remove(0);
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
                all.extend(index_vec(&r.indices));
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
    let xt = tensor2(&x, t, d, DType::F64);
    let logits = reference_logits(&x, &w, t, d, e);
    let c = tensor2(&rng.normals(t * m, 1.0), t, m, DType::F64);
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
                assert_eq!(
                    index_vec(&r.indices)[tok * m + s] as usize,
                    cand[sel[s]],
                    "{imp}: token {tok} slot {s} expert"
                );
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
    let err = router.route(&x, &RouteCtx::new(train_ctx(1, 0, 1.0), 0)).expect_err("no ids must fail").to_string();
    assert!(err.contains("token ids"), "{err}");
    let mut bad = cfg.clone();
    bad.model.router.kind = RouterKind::Hash;
    let err = bad.validate().expect_err("token input on hash must fail").to_string();
    assert!(err.contains("model.router.input"), "{err}");
}
