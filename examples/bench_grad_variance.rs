//! The Gumbel-Softmax paper's variance claim as a benchmark: bias and variance of router-gradient
//! estimators on a small fixed routing objective, against the exact gradient from enumerating the
//! experts.
//!
//! Objective: E experts with fixed outputs v_i (D-dim), a target c, routing weights w over the
//! experts, L(w) = ||sum_i w_i v_i - c||^2, and J(theta) = E_{z ~ softmax(theta)} L(onehot z). The
//! exact gradient is dJ/dtheta_j = p_j (L_j - sum_i p_i L_i). Estimators, each from N independent
//! samples (one token each; noise from our Philox keyed by token):
//! - REINFORCE: L(z) grad log p(z), without and with a moving-average baseline (decay 0.99):
//!   unbiased, high variance.
//! - Gumbel straight-through (our hard router, `ops::gumbel_route`): one-hot forward, relaxed
//!   softmax gradient backward: biased, low variance.
//! - Soft Gumbel (`ops::gumbel_route`, soft): w = the relaxed sample y; biased (it differentiates
//!   L(y), not L(z)), variance growing as tau falls.
//!
//! The Gumbel estimators' gradients come from Candle autograd through our custom op's backward.
//! Per estimator and tau: bias = ||mean estimate - exact|| (and in units of its standard error),
//! total variance of one sample, and the mean squared error of one sample.
//!
//! `cargo run --release --example bench_grad_variance -- [N]`

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var, D};
use gumbel_moe::nn::ops::log_softmax;
use gumbel_moe::ops::{gumbel_route, GumbelParams};

const E: usize = 8;
const DIM: usize = 4;

/// The fixed problem: logits theta (E), expert outputs v (E x DIM), target c (DIM).
struct Problem {
    theta: Vec<f64>,
    v: Vec<[f64; DIM]>,
    c: [f64; DIM],
}

impl Problem {
    fn new() -> Self {
        let theta = (0..E).map(|i| (1.7 * i as f64).sin() * 1.5).collect();
        let v = (0..E).map(|i| std::array::from_fn(|d| ((i * DIM + d) as f64 * 0.77).cos())).collect();
        Self { theta, v, c: [0.3, -0.2, 0.5, 0.1] }
    }

    fn probs(&self) -> Vec<f64> {
        let mx = self.theta.iter().cloned().fold(f64::MIN, f64::max);
        let ex: Vec<f64> = self.theta.iter().map(|t| (t - mx).exp()).collect();
        let s: f64 = ex.iter().sum();
        ex.iter().map(|x| x / s).collect()
    }

    /// L(onehot i).
    fn loss_of(&self, i: usize) -> f64 {
        (0..DIM).map(|d| (self.v[i][d] - self.c[d]).powi(2)).sum()
    }

    /// The exact gradient of J by enumeration.
    fn exact_grad(&self) -> Vec<f64> {
        let p = self.probs();
        let mean: f64 = (0..E).map(|i| p[i] * self.loss_of(i)).sum();
        (0..E).map(|j| p[j] * (self.loss_of(j) - mean)).collect()
    }
}

/// Per-sample gradients (N, E) of one estimator.
type Samples = Vec<Vec<f64>>;

fn params(tau: f64, seed: u64) -> GumbelParams {
    GumbelParams { k: E, m: 1, tau, seed, step: 0, layer: 0, token_base: 0, noisy: true }
}

/// Logits (N, E) as a variable: row t is theta, so the gradient's row t is sample t's estimate.
fn logits_var(p: &Problem, n: usize) -> Result<Var> {
    let t = Tensor::new(p.theta.as_slice(), &Device::Cpu)?.unsqueeze(0)?.broadcast_as((n, E))?.contiguous()?;
    Ok(Var::from_tensor(&t)?)
}

/// sum_t L(sum_j w_tj v_{idx_tj}) for weights (N, m) over experts `idx` (N*m, row-major).
fn total_loss(p: &Problem, w: &Tensor, idx: &[u32], m: usize) -> Result<Tensor> {
    let n = w.dim(0)?;
    let vt: Vec<f64> = p.v.iter().flatten().copied().collect();
    let v = Tensor::from_vec(vt, (E, DIM), &Device::Cpu)?;
    let sel = v.index_select(&Tensor::new(idx, &Device::Cpu)?, 0)?.reshape((n, m, DIM))?; // (N, m, D)
    let out = w.unsqueeze(2)?.broadcast_mul(&sel)?.sum(1)?; // (N, D)
    let c = Tensor::new(&p.c, &Device::Cpu)?.unsqueeze(0)?;
    Ok(out.broadcast_sub(&c)?.sqr()?.sum_all()?)
}

fn grads_rows(var: &Var, loss: &Tensor) -> Result<Samples> {
    let g = loss.backward()?;
    let g = g.get(var.as_tensor()).expect("the logits receive a gradient");
    Ok(g.to_dtype(DType::F64)?.to_vec2::<f64>()?)
}

/// Gumbel straight-through (hard) or soft estimates at temperature tau.
fn gumbel_estimates(p: &Problem, n: usize, tau: f64, hard: bool) -> Result<Samples> {
    let var = logits_var(p, n)?;
    let r = gumbel_route(var.as_tensor(), &params(tau, 7), hard)?;
    let loss = total_loss(p, &r.weights, &r.indices, r.m)?;
    grads_rows(&var, &loss)
}

/// REINFORCE: (L(z) - b) grad log p(z) with z the Gumbel-max sample (the same draws as the hard
/// router); `decay` = None: no baseline, else a moving average of L updated after each sample.
fn reinforce_estimates(p: &Problem, n: usize, decay: Option<f64>) -> Result<Samples> {
    let var = logits_var(p, n)?;
    let r = gumbel_route(var.as_tensor(), &params(1.0, 7), true)?;
    let mut b = 0.0;
    let mut coef = Vec::with_capacity(n);
    for &z in &r.indices {
        let l = p.loss_of(z as usize);
        coef.push(l - if decay.is_some() { b } else { 0.0 });
        if let Some(d) = decay {
            b = d * b + (1.0 - d) * l;
        }
    }
    let logp = log_softmax(var.as_tensor())?; // (N, E)
    let z = Tensor::from_vec(r.indices.clone(), (n, 1), &Device::Cpu)?;
    let logp_z = logp.gather(&z, D::Minus1)?.squeeze(1)?; // (N)
    let surrogate = (logp_z * Tensor::from_vec(coef, n, &Device::Cpu)?)?.sum_all()?;
    grads_rows(&var, &surrogate)
}

struct Row {
    bias: f64,
    bias_se: f64,
    var: f64,
    cos: f64,
}

fn summarize(s: &Samples, exact: &[f64]) -> Row {
    let n = s.len() as f64;
    let mean: Vec<f64> = (0..E).map(|j| s.iter().map(|g| g[j]).sum::<f64>() / n).collect();
    let var = s.iter().map(|g| (0..E).map(|j| (g[j] - mean[j]).powi(2)).sum::<f64>()).sum::<f64>() / (n - 1.0);
    let bias = (0..E).map(|j| (mean[j] - exact[j]).powi(2)).sum::<f64>().sqrt();
    let dot: f64 = (0..E).map(|j| mean[j] * exact[j]).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    Row { bias, bias_se: bias / (var / n).sqrt(), var, cos: dot / (norm(&mean) * norm(exact)) }
}

fn main() -> Result<()> {
    let n: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let p = Problem::new();
    let exact = p.exact_grad();
    let enorm = exact.iter().map(|x| x * x).sum::<f64>().sqrt();
    println!("E = {E} experts, {n} samples per estimator, ||exact gradient|| = {enorm:.4}\n");
    println!("| estimator | tau | bias | bias / s.e. | variance (1 sample) | MSE (1 sample) | cos(mean, exact) |");
    println!("|---|---|---|---|---|---|---|");
    let mut rows: Vec<(String, String, Row)> = vec![
        ("REINFORCE".into(), "-".into(), summarize(&reinforce_estimates(&p, n, None)?, &exact)),
        ("REINFORCE + baseline".into(), "-".into(), summarize(&reinforce_estimates(&p, n, Some(0.99))?, &exact)),
    ];
    for tau in [0.1, 0.5, 1.0, 2.0] {
        rows.push((
            "Gumbel straight-through".into(),
            format!("{tau}"),
            summarize(&gumbel_estimates(&p, n, tau, true)?, &exact),
        ));
    }
    for tau in [0.1, 0.5, 1.0, 2.0] {
        rows.push(("Gumbel soft".into(), format!("{tau}"), summarize(&gumbel_estimates(&p, n, tau, false)?, &exact)));
    }
    for (name, tau, r) in rows {
        println!(
            "| {name} | {tau} | {:.4} | {:.1} | {:.4} | {:.4} | {:.3} |",
            r.bias,
            r.bias_se,
            r.var,
            r.bias * r.bias + r.var,
            r.cos
        );
    }
    Ok(())
}
