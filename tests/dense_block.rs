//! A dense block's feed-forward as one expert-MLP op (`Mlp::forward_block`, graph and training
//! forms) against the three-op MLP of unfused layers (`model.fused_layers = false`: Candle's
//! matmuls and the plain activations), for GELU and SwiGLU, with and without biases: the same
//! output and the same gradient of the input and of every weight.

mod common;

use candle_core::{DType, Device, Tensor};
use common::host::{flat, Rng};
use common::tiny_config;
use gumbel_moe::nn::{Mlp, Params};
use std::collections::HashMap;

/// (output, gradient of x, gradients by parameter name) of sum(mlp(x) * w).
fn run(
    fused: bool,
    train: bool,
    sets: &[&str],
    x: &[f64],
    w: &[f64],
) -> (Vec<f64>, Vec<f64>, HashMap<String, Vec<f64>>) {
    let f = format!("model.fused_layers={fused}");
    let mut o: Vec<&str> = sets.to_vec();
    o.extend(["model.n_embd=12", &f]);
    let cfg = tiny_config("gumbel", &o);
    let params = Params::new();
    let mlp = Mlp::new(&cfg, 20, params.var_builder(5, DType::F32, &Device::Cpu).pp("mlp")).unwrap();
    // The same weights in every run: fixed values, not the seeded init.
    let mut rng = Rng(3);
    for (_, v) in params.named() {
        let t = Tensor::from_vec(rng.normals(v.elem_count(), 0.4), v.shape(), &Device::Cpu).unwrap();
        v.set(&t.to_dtype(DType::F32).unwrap()).unwrap();
    }
    let xv = candle_core::Var::from_tensor(
        &Tensor::from_slice(x, (2, 5, 12), &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap(),
    )
    .unwrap();
    let wt = Tensor::from_slice(w, (2, 5, 12), &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    let (y, side) = mlp.forward_block(xv.as_tensor(), train).unwrap();
    assert_eq!(side.is_some(), fused && train, "out-of-band gradients only from the fused training form");
    let gs = (&y * &wt).unwrap().sum_all().unwrap().backward().unwrap();
    let side: HashMap<_, _> = side.map(|s| s.grads()).unwrap_or_default().into_iter().collect();
    let grads = params
        .named()
        .into_iter()
        .map(|(name, v)| {
            let g =
                gs.get(v.as_tensor()).or_else(|| side.get(&v.id())).unwrap_or_else(|| panic!("no gradient for {name}"));
            (name, flat(g))
        })
        .collect();
    (flat(&y), flat(gs.get(xv.as_tensor()).expect("gradient of x")), grads)
}

fn close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    assert!(d <= 2e-6 * scale, "{what}: max difference {d:e} (scale {scale})");
}

#[test]
fn dense_block_as_one_op_matches_the_unfused_mlp() {
    let mut rng = Rng(11);
    let x = rng.normals(120, 1.0);
    let w = rng.normals(120, 1.0);
    for sets in [
        &["model.moe.activation=\"gelu\"", "model.bias=true"][..],
        &["model.moe.activation=\"gelu\"", "model.bias=false"],
        &["model.moe.activation=\"swiglu\"", "model.bias=true"],
        &["model.moe.activation=\"swiglu\"", "model.bias=false"],
    ] {
        let (y0, dx0, g0) = run(false, true, sets, &x, &w);
        for train in [false, true] {
            let what = format!("{sets:?} training form {train}");
            let (y, dx, g) = run(true, train, sets, &x, &w);
            close(&y, &y0, &format!("{what}: output"));
            close(&dx, &dx0, &format!("{what}: gradient of x"));
            assert_eq!(g.len(), g0.len(), "{what}: parameters");
            for (name, want) in &g0 {
                close(&g[name], want, &format!("{what}: gradient of {name}"));
            }
        }
    }
}
