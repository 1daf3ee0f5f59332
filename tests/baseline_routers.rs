//! The routers other than Gumbel, together: softmax top-m (Switch and Mixtral weights), router
//! gradients against central finite differences, every router's routing tensors on the input's
//! device, the refusal of expert-choice routing and of bad settings, and a few training steps of
//! each new router end to end.

#![allow(clippy::needless_range_loop)] // index loops mirror the maths

use candle_core::{DType, Device, Tensor, Var};
use gumbel_moe::config::{Config, RouterKind};
use gumbel_moe::model::{cross_entropy, router_surrogate};
use gumbel_moe::moe::RouteCtx;
use gumbel_moe::nn::Ctx;

mod common;
use common::fd::central_diff;
use common::host::*;
use common::routing::{config, router_from, router_with};

const CPU: Device = Device::Cpu;

// ---------- softmax top-m ----------

#[test]
fn softmax_topk_switch_and_mixtral_weights() {
    let (e, d, t) = (9, 4, 40);
    let mut rng = Rng(31);
    let w = rng.normals(e * d, 1.0);
    let x = rng.normals(t * d, 1.0);
    let logits = reference_logits(&x, &w, t, d, e);
    for m in [1usize, 2, 3] {
        let router = router_from(&config("softmax_topk", e, d, m, m, true), &tensor2(&w, e, d, DType::F64));
        let r = route(router.as_ref(), &tensor2(&x, t, d, DType::F64), train_ctx(0, 0, 1.0), 0);
        let r_indices = index_vec(&r.indices); // (T, m) row-major
        assert_eq!(r.m, m);
        let wts = vec2(&r.weights);
        for tok in 0..t {
            let p = host_softmax(&logits[tok]);
            let top = host_topk(&logits[tok], m);
            let got: Vec<usize> = r_indices[tok * m..(tok + 1) * m].iter().map(|&i| i as usize).collect();
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

// ---------- the routing's tensors ----------

/// Every built-in router, on both router implementations, returns its routing as tensors on the
/// input's device: indices (T, m) u32 of distinct valid experts per token, weights (T, m), logits
/// and probs (T, E) with probs = softmax(logits). The hash router, with the vocabulary known,
/// looks its experts up on the device and matches the host hash.
#[test]
fn every_router_returns_device_tensors() {
    let (e, d, t, v) = (6, 4, 12, 40);
    let cases = [
        ("gumbel", 2, 4, true, 2),
        ("gumbel", 2, 4, false, 2),
        ("gumbel", 3, 3, false, 3),
        ("softmax_topk", 2, 2, true, 2),
        ("dense", 1, 1, true, e),
        ("noisy_topk", 2, 2, true, 2),
        ("sigmoid_bias", 3, 3, true, 3),
        ("hash", 1, 1, true, 1),
        ("reinforce", 1, 1, true, 1),
    ];
    let mut rng = Rng(77);
    let x = tensor2(&rng.normals(t * d, 1.0), t, d, DType::F64);
    let ids: Vec<u32> = (0..t as u32).map(|i| (i * 7 + 1) % v as u32).collect();
    for (kind, m, k, hard, want_m) in cases {
        for imp in ["fused", "reference"] {
            let label = format!("{kind} m={m} hard={hard} {imp}");
            let mut cfg = router_config(kind, e, d, m, k, hard);
            cfg.model.router.implementation = imp.parse().unwrap();
            cfg.model.vocab_size = v;
            let (router, _) = router_with(&cfg, &[], &mut Rng(5));
            for ctx in [train_ctx(3, 2, 0.9), Ctx::eval(3, 0.9)] {
                let rc = RouteCtx { ctx, layer: 1, token_ids: Some(Tensor::new(ids.as_slice(), &CPU).unwrap()) };
                let r = router.route(&x, &rc).unwrap_or_else(|err| panic!("{label}: {err}"));
                for (name, tensor) in
                    [("indices", &r.indices), ("weights", &r.weights), ("logits", &r.logits), ("probs", &r.probs)]
                {
                    assert!(tensor.device().same_device(x.device()), "{label}: {name} on {:?}", tensor.device());
                }
                assert_eq!(r.indices.dtype(), DType::U32, "{label}: indices dtype");
                assert_eq!((r.m, r.indices.dims()), (want_m, &[t, want_m][..]), "{label}: indices shape");
                assert_eq!(r.weights.dims(), &[t, want_m], "{label}: weights shape");
                assert_eq!((r.logits.dims(), r.probs.dims()), (&[t, e][..], &[t, e][..]), "{label}: logits, probs");
                let idx = index_vec(&r.indices);
                for row in idx.chunks(want_m) {
                    let set: std::collections::BTreeSet<u32> = row.iter().copied().collect();
                    assert!(set.len() == want_m && row.iter().all(|&i| (i as usize) < e), "{label}: row {row:?}");
                }
                let (lg, pr) = (vec2(&r.logits), vec2(&r.probs));
                for tok in 0..t {
                    let want = host_softmax(&lg[tok]);
                    for j in 0..e {
                        assert_close(pr[tok][j], want[j], 1e-12, 1e-14, &format!("{label}: probs[{tok}][{j}]"));
                    }
                }
                if kind == "hash" {
                    let want: Vec<u32> = ids.iter().map(|&id| host_hash(id, e)).collect();
                    assert_eq!(idx, want, "{label}: device table differs from the host hash");
                }
            }
        }
    }
}

// ---------- expert choice is refused ----------

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

// ---------- end to end ----------

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
