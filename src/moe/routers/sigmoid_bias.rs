//! Sigmoid routing with auxiliary-loss-free load balancing (DeepSeek-V3, Liu et al. 2024, sec.
//! 2.1.2; Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for MoE").
//!
//! Affinities s = sigmoid(x W) (T, E). A per-expert bias b is added for the choice only:
//! the experts are the top m of s + b, and the weights are the s of the chosen, normalised to sum
//! to 1 (gradient through s, none through b). After each training call the bias moves by a fixed
//! step toward balance, b_i += rate * sign(mean load - load_i), with load_i the token-slots expert i
//! got in this call (so once per micro-batch) and mean load = T m / E: overloaded experts get less
//! attractive, idle ones more.
//!
//! The bias is the non-trainable parameter `expert_bias` (E,), f32 whatever the model dtype (a
//! 1e-3 step would vanish in bf16). It lives in the model's parameter set, so checkpoints save and
//! restore it and a resume is exact; it never enters the autograd graph (read on the host, updated
//! with `Var::set`), so it has no gradient and the optimizer, which skips parameters without one,
//! never touches it. `logits` = x W (z-loss) and `probs` = their softmax (Switch balance loss and
//! entropy statistics); set `model.moe.balance_coef = 0` for the loss-free recipe.

use super::{host_logits, index_tensor, top_k, Gate};
use crate::config::Config;
use crate::moe::{RouteCtx, Router, Routing};
use crate::nn::ops::softmax;
use candle_core::{DType, Result, Tensor, Var, D};
use candle_nn::{Init, VarBuilder};

pub struct SigmoidBiasRouter {
    gate: Gate,
    /// (E,) f32 selection bias.
    bias: Var,
    e: usize,
    m: usize,
    rate: f64,
}

impl SigmoidBiasRouter {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (e, r) = (cfg.model.moe.num_experts, &cfg.model.router);
        if r.top_m == 0 || r.top_m > e {
            candle_core::bail!("sigmoid_bias router needs 1 <= top_m ({}) <= num_experts ({e})", r.top_m);
        }
        let gate = Gate::new(cfg, vb.clone())?;
        let b = vb.get_with_hints_dtype(e, "expert_bias", Init::Const(0.0), DType::F32)?;
        // A VarBuilder over `Params` hands out the variable itself, so `set` updates the saved one.
        let bias = Var::from_tensor(&b)?;
        Ok(Self { gate, bias, e, m: r.top_m, rate: r.bias_update_rate })
    }

    /// The current selection bias (E,) on the host.
    pub fn bias(&self) -> Result<Vec<f32>> {
        self.bias.as_tensor().to_vec1::<f32>()
    }
}

/// One balancing step: b_i + rate * sign(mean - load_i), with load counted from `indices` (T*m
/// expert ids over `e` experts) and mean = indices.len() / e.
pub fn bias_step(bias: &[f32], indices: &[u32], e: usize, rate: f64) -> Vec<f32> {
    let mut load = vec![0usize; e];
    indices.iter().for_each(|&i| load[i as usize] += 1);
    let mean = indices.len() as f64 / e as f64;
    bias.iter()
        .zip(&load)
        .map(|(&b, &l)| {
            let d = mean - l as f64;
            let sign = if d > 0.0 {
                1.0
            } else if d < 0.0 {
                -1.0
            } else {
                0.0
            };
            (b as f64 + rate * sign) as f32
        })
        .collect()
}

impl Router for SigmoidBiasRouter {
    fn route(&self, x: &Tensor, rc: &RouteCtx) -> Result<Routing> {
        let (e, m) = (self.e, self.m);
        let logits = self.gate.logits(x, rc)?; // (T, E)
        let host = host_logits(&logits, rc)?;
        let t = host.len();
        let s = (logits.neg()?.exp()? + 1.0)?.recip()?; // (T, E) sigmoid, with backward
        let b = self.bias()?;
        // Choose by s + b on the host (sigmoid in f64 there: only the order matters).
        let indices: Vec<u32> = host
            .iter()
            .flat_map(|row| {
                let biased: Vec<f64> =
                    row.iter().zip(&b).map(|(&l, &bi)| 1.0 / (1.0 + (-l).exp()) + bi as f64).collect();
                top_k(&biased, m)
            })
            .map(|i| i as u32)
            .collect();
        let idx = index_tensor(indices.clone(), t, m, &logits)?;
        let sel = s.gather(&idx, 1)?; // (T, m)
        let weights = sel.broadcast_div(&sel.sum_keepdim(D::Minus1)?)?; // (T, m), sums to 1
        if rc.ctx.train && self.rate > 0.0 {
            let nb = bias_step(&b, &indices, e, self.rate);
            self.bias.set(&Tensor::from_vec(nb, e, self.bias.device())?)?;
        }
        let probs = softmax(&logits)?; // (T, E)
        Ok(Routing::new(indices, m, weights, logits, probs))
    }

    fn num_experts(&self) -> usize {
        self.e
    }
}
