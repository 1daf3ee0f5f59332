//! Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks", sec. 2.1 and
//! appendix A), with its importance and load losses.
//!
//! H(x)_i = (x W_g)_i + eps_i * (softplus((x W_noise)_i) + 0.01), eps ~ N(0, 1) from Philox
//! (`rng::normal_noise` keyed by (seed, step, layer, token, expert)), in training only. The m largest
//! H are kept (the rest set to -inf) and the gates are G = softmax(KeepTopK(H, m)), so the combine
//! weights are the softmax over the m kept values. Losses (`Routing::aux_loss`):
//!
//! - importance: Importance = sum_x G(x) (E), L_imp = CV(Importance)^2;
//! - load: P(x, i) = Phi((clean_i - kth_excluding(H, m, i)) / noise_std_i), the probability that
//!   expert i stays in the top m if only its own noise were drawn again, where kth_excluding is the
//!   m-th largest H_j over j != i: the (m+1)-th largest H for a kept expert, the m-th for the others;
//!   Load = sum_x P(x, .) (E), a smooth count of tokens per expert; L_load = CV(Load)^2.
//!
//! aux = importance_coef * L_imp + load_coef * L_load. `logits` are the clean logits x W_g (z-loss),
//! `probs` their softmax (the Switch balance loss, if its coefficient is not 0).
//!
//! Parameters: `weight` (E, d) = W_g and `noise.weight` (E, d) = W_noise (zero init by default,
//! as in the paper). Shapes: T tokens, E experts, m kept per token.

use super::{router_linear, top_k_indices, Gate};
use crate::config::Config;
use crate::moe::losses::cv_squared;
use crate::moe::{RouteCtx, Router, Routing};
use crate::nn::ops::softmax;
use crate::nn::Linear;
use crate::rng::normal_noise;
use candle_core::{Result, Tensor};
use candle_nn::{Module, VarBuilder};

pub struct NoisyTopkRouter {
    gate: Gate,
    noise: Linear,
    e: usize,
    m: usize,
    load_coef: f64,
    importance_coef: f64,
}

impl NoisyTopkRouter {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (e, r) = (cfg.model.moe.num_experts, &cfg.model.router);
        if r.top_m == 0 || r.top_m > e {
            candle_core::bail!("noisy_topk router needs 1 <= top_m ({}) <= num_experts ({e})", r.top_m);
        }
        let gate = Gate::new(cfg, vb.clone())?;
        let noise = router_linear(cfg.model.n_embd, e, r.noise_init_std, vb.pp("noise"))?;
        Ok(Self { gate, noise, e, m: r.top_m, load_coef: r.load_coef, importance_coef: r.importance_coef })
    }
}

/// Floor of the noise std, as in the reference implementations (tensor2tensor's
/// `noisy_top_k_gating`, FastMoE's `NoisyGate`: `noise_epsilon = 1e-2`). Without it, a noise
/// projection that training drives negative makes softplus underflow to 0, the load loss's
/// (clean - thr) / std infinite, and its gradient NaN.
pub const NOISE_EPSILON: f64 = 1e-2;

/// softplus(z) = ln(1 + e^z), written as relu(z) + ln(1 + e^-|z|) so it never overflows.
pub fn softplus(z: &Tensor) -> Result<Tensor> {
    z.relu()? + (z.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// Standard normal CDF Phi(z) = (1 + erf(z / sqrt 2)) / 2, differentiable.
pub fn normal_cdf(z: &Tensor) -> Result<Tensor> {
    ((z / std::f64::consts::SQRT_2)?.erf()? + 1.0)? * 0.5
}

/// Standard-normal noise (T, E) for tokens `token_base..token_base + t`.
pub fn noise(t: usize, e: usize, seed: u64, step: u64, layer: u32, token_base: u32) -> Vec<f32> {
    (0..t)
        .flat_map(|tok| {
            (0..e).map(move |ex| normal_noise(seed, step as u32, layer, token_base + tok as u32, ex as u32))
        })
        .collect()
}

impl Router for NoisyTopkRouter {
    fn route(&self, x: &Tensor, rc: &RouteCtx) -> Result<Routing> {
        let (e, m) = (self.e, self.m);
        let clean = self.gate.logits(x, rc)?; // (T, E)
        let std = (softplus(&self.noise.forward(x)?)? + NOISE_EPSILON)?; // (T, E) noise std per expert, >= 0.01
        let t = clean.dim(0)?;
        let h = if rc.ctx.train {
            let c = &rc.ctx;
            let eps = noise(t, e, c.seed, c.step, rc.layer, c.micro * t as u32);
            let eps = Tensor::from_vec(eps, (t, e), x.device())?.to_dtype(clean.dtype())?;
            (&clean + (eps * &std)?)? // (T, E)
        } else {
            clean.clone()
        };
        // Top m + 1 of each row: the kept experts, and the thresholds of the load estimator.
        let order = top_k_indices(&h.detach(), (m + 1).min(e))?; // (T, m + 1) u32, or (T, E) when m = E
        let indices = order.narrow(1, 0, m)?.contiguous()?; // (T, m)
        let ids = Tensor::arange(0u32, e as u32, x.device())?.reshape((1, 1, e))?;
        let keep = indices.unsqueeze(2)?.broadcast_eq(&ids)?.sum(1)?; // (T, E) u8, 1 on the top m
        let neg_inf = Tensor::full(f32::NEG_INFINITY, (), x.device())?.to_dtype(h.dtype())?;
        let gates = softmax(&keep.where_cond(&h, &neg_inf.broadcast_as((t, e))?)?)?; // (T, E), 0 off the top m
        let weights = gates.gather(&indices, 1)?; // (T, m): softmax over the kept values
        let importance = gates.sum(0)?; // (E)
        let mut aux = (cv_squared(&importance)? * self.importance_coef)?;
        if m < e {
            // kth_excluding(H, m, i): the (m+1)-th largest for a kept expert, else the m-th.
            let kept_thr = order.narrow(1, m, 1)?.broadcast_as((t, e))?; // (T, E)
            let other_thr = order.narrow(1, m - 1, 1)?.broadcast_as((t, e))?; // (T, E)
            let thr_idx = keep.where_cond(&kept_thr, &other_thr)?; // (T, E) u32
            let thr = h.gather(&thr_idx, 1)?; // (T, E)
            let p = normal_cdf(&((&clean - thr)? / std)?)?; // (T, E) P(x, i)
            let load = p.sum(0)?; // (E)
            aux = (aux + (cv_squared(&load)? * self.load_coef)?)?;
        } // m = E: every expert is always kept, the load is constant and so is its loss.
        let probs = softmax(&clean)?; // (T, E)
        let mut r = Routing::new(indices, weights, clean, probs)?;
        r.aux_loss = Some(aux);
        Ok(r)
    }

    fn num_experts(&self) -> usize {
        self.e
    }
}
