//! Sigmoid routing with a loss-free balancing bias (DeepSeek-V3): selection by biased scores and
//! weights by unbiased ones, the bias moving toward balance once per step from the load of every
//! call (never by AdamW), and an exact resume with the bias in the checkpoint.

#![allow(clippy::needless_range_loop)] // index loops mirror the maths

use candle_core::{DType, Device, Tensor};
use gumbel_moe::moe::{build_router, MoeLayer};
use gumbel_moe::nn::{Ctx, Params};
use gumbel_moe::train::optim::{AdamW, AdamWConfig};

mod common;
use common::fd::fd_check;
use common::host::*;
use common::routing::router_with;
use common::straight_and_resumed;

const CPU: Device = Device::Cpu;

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
    let xt = tensor2(&x, t, d, DType::F64);
    let cfg = router_config("sigmoid_bias", e, d, m, m, true);
    let (router, params) = router_with(&cfg, &[("weight", w.clone()), ("expert_bias", bias.clone())], &mut Rng(0));
    // Eval: no bias update, so the loss is a function of W alone.
    let r = route(router.as_ref(), &xt, Ctx::eval(1, 1.0), 0);
    let logits = reference_logits(&x, &w, t, d, e);
    let mut unbiased_differs = false;
    for tok in 0..t {
        let s: Vec<f64> = logits[tok].iter().map(|&l| sigmoid(l)).collect();
        let biased: Vec<f64> = s.iter().zip(&bias).map(|(a, b)| a + *b as f32 as f64).collect();
        let sel = host_topk(&biased, m);
        unbiased_differs |= host_topk(&s, m) != sel;
        let z: f64 = sel.iter().map(|&i| s[i]).sum();
        let wts = vec2(&r.weights);
        for q in 0..m {
            assert_eq!(index_vec(&r.indices)[tok * m + q] as usize, sel[q], "token {tok}: top-m of s + b");
            assert_close(wts[tok][q], s[sel[q]] / z, 1e-12, 1e-14, &format!("weight [{tok}][{q}]"));
        }
    }
    assert!(unbiased_differs, "the bias changed no selection: the test is vacuous");
    let c = tensor2(&rng.normals(t * m, 1.0), t, m, DType::F64);
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
        assert_eq!(flat(bias_var.as_tensor()), before, "step {step}: routing moved the bias");
        layer.after_step().unwrap(); // what the trainer calls after each optimizer step
        let load = &out.stats.tokens_per_expert;
        let after = flat(bias_var.as_tensor());
        // b_i += rate * sign(mean - load_i), mean = T m / E, from this step's counts.
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
    layer.after_step().unwrap();
    assert_eq!(flat(bias_var.as_tensor()), b, "an eval call moved the bias");
    let first_max = first_max.unwrap();
    assert!(first_max as f64 > 2.0 * (t * m) as f64 / e as f64, "routing was not skewed ({first_max}): vacuous");
    assert!(last_max < first_max, "the bias did not reduce the largest load ({first_max} -> {last_max})");
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

/// The bias is fixed within a step and moves once after it, from the load of all the step's
/// training calls (host math on their indices), whether the calls run in turn or side by side.
#[test]
fn sigmoid_bias_steps_once_from_the_load_of_every_call() {
    let (e, d, t, m, rate) = (5, 6, 48, 2, 0.05);
    let mut cfg = router_config("sigmoid_bias", e, d, m, m, true);
    cfg.model.router.bias_update_rate = rate;
    let mut rng = Rng(19);
    let mut w = rng.normals(e * d, 1.0);
    w[..d].iter_mut().for_each(|v| *v = 2.0); // expert 0 aligned with the positive tokens
    let (router, params) = router_with(&cfg, &[("weight", w), ("expert_bias", vec![0.0; e])], &mut Rng(0));
    let bias_var = params.get("expert_bias").unwrap();
    let xs: Vec<Tensor> = (0..2)
        .map(|_| tensor2(&rng.normals(t * d, 1.0).iter().map(|v| v.abs()).collect::<Vec<_>>(), t, d, DType::F64))
        .collect();
    let ctx = |micro| Ctx { micro, ..train_ctx(4, 3, 1.0) };
    let before = flat(bias_var.as_tensor());
    // In turn: both calls see the bias of before the step.
    let routed: Vec<Vec<u32>> =
        (0..2).map(|i| index_vec(&route(router.as_ref(), &xs[i], ctx(i as u32), 0).indices)).collect();
    assert_eq!(flat(bias_var.as_tensor()), before, "routing moved the bias");
    router.after_step().unwrap();
    let mut load = vec![0usize; e];
    routed.iter().flatten().for_each(|&i| load[i as usize] += 1);
    let mean = (2 * t * m) as f64 / e as f64;
    let sign = |v: f64| {
        if v > 0.0 {
            1.0
        } else if v < 0.0 {
            -1.0
        } else {
            0.0
        }
    };
    let want: Vec<f64> = (0..e).map(|i| (before[i] + rate * sign(mean - load[i] as f64)) as f32 as f64).collect();
    assert!(load[0] as f64 > mean, "routing was not skewed ({load:?}): vacuous");
    assert_eq!(flat(bias_var.as_tensor()), want, "bias after the step (load {load:?})");
    router.after_step().unwrap();
    assert_eq!(flat(bias_var.as_tensor()), want, "a second after_step without calls moved the bias");
    // Side by side on two threads, from the same bias: the same step.
    bias_var.set(&Tensor::from_vec(before.iter().map(|&b| b as f32).collect::<Vec<_>>(), e, &CPU).unwrap()).unwrap();
    std::thread::scope(|s| {
        let r = router.as_ref();
        let calls: Vec<_> = xs
            .iter()
            .enumerate()
            .map(|(i, x)| s.spawn(move || index_vec(&route(r, x, ctx(i as u32), 0).indices)))
            .collect();
        let again: Vec<Vec<u32>> = calls.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(again, routed, "routing on two threads differs");
    });
    router.after_step().unwrap();
    assert_eq!(flat(bias_var.as_tensor()), want, "bias after a step whose calls ran side by side");
}
