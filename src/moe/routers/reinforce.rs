//! REINFORCE routing: the score-function estimator (Williams 1992), the high-variance baseline of
//! the Gumbel-Softmax paper (Jang et al. 2017, sec. 3).
//!
//! Training: each token samples one expert from softmax(logits) (Gumbel-max with the router's
//! Philox noise, `rng::gumbel_noise` keyed by (seed, step, layer, token, expert), over all E) and
//! uses it with weight exactly 1, so no gradient reaches the router through the forward pass.
//! The router learns from the surrogate sum_t (L_t - b) log p(chosen_t) / N, whose gradient is an
//! unbiased estimate of `d E[L_t] / d router` when token t's loss depends on its own choice. L_t is
//! only known after the LM head, so the router returns `log_prob` (T,) and the trainer adds
//! `model::router_surrogate` to the loss. At eval (`eval_mode = "argmax"`) the most probable
//! expert, no noise.

use super::{select_dtype, top_k_indices, Gate};
use crate::config::{Config, EvalMode};
use crate::moe::{RouteCtx, Router, Routing};
use crate::nn::ops::{log_softmax, softmax};
use crate::rng::gumbel_noise;
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

pub struct ReinforceRouter {
    gate: Gate,
    e: usize,
    sample_at_eval: bool,
}

impl ReinforceRouter {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let e = cfg.model.moe.num_experts;
        let r = &cfg.model.router;
        if r.top_m != 1 {
            candle_core::bail!("reinforce router samples exactly 1 expert per token, top_m = {}", r.top_m);
        }
        let gate = Gate::new(cfg, vb)?;
        Ok(Self { gate, e, sample_at_eval: r.eval_mode == EvalMode::Sample })
    }
}

impl Router for ReinforceRouter {
    fn route(&self, x: &Tensor, rc: &RouteCtx) -> Result<Routing> {
        let logits = self.gate.logits(x, rc)?; // (T, E)
        let t = logits.dim(0)?;
        let c = &rc.ctx;
        let indices = if c.train || self.sample_at_eval {
            // argmax_e (logit_e + g_e), g ~ Gumbel(0, 1): a sample from softmax(logits).
            let base = c.micro * t as u32;
            let g: Vec<f32> = (0..t)
                .flat_map(|tok| {
                    (0..self.e)
                        .map(move |ex| gumbel_noise(c.seed, c.step as u32, rc.layer, base + tok as u32, ex as u32))
                })
                .collect();
            let dt = select_dtype(&logits);
            let g = Tensor::from_vec(g, (t, self.e), logits.device())?.to_dtype(dt)?; // (T, E)
            top_k_indices(&(logits.detach().to_dtype(dt)? + g)?, 1)? // (T, 1) u32
        } else {
            top_k_indices(&logits.detach(), 1)? // (T, 1) u32: the most probable expert
        };
        let weights = Tensor::ones((t, 1), logits.dtype(), logits.device())?; // (T, 1), no gradient
        let probs = softmax(&logits)?; // (T, E)
        let log_prob = if c.train {
            Some(log_softmax(&logits)?.gather(&indices, 1)?.flatten_all()?) // (T,)
        } else {
            None
        };
        let mut r = Routing::new(indices, weights, logits, probs)?;
        r.log_prob = log_prob;
        Ok(r)
    }

    fn num_experts(&self) -> usize {
        self.e
    }
}
