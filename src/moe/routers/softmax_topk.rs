//! Softmax top-m routing: Switch Transformer (m = 1, weight = the expert's probability) and Mixtral
//! (m > 1, weights renormalised over the chosen experts).

use super::{top_k_indices, Gate};
use crate::config::Config;
use crate::moe::{RouteCtx, Router, Routing};
use crate::nn::ops::softmax;
use candle_core::{Result, Tensor, D};
use candle_nn::VarBuilder;

pub struct SoftmaxTopkRouter {
    gate: Gate,
    e: usize,
    m: usize,
}

impl SoftmaxTopkRouter {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let e = cfg.model.moe.num_experts;
        let gate = Gate::new(cfg, vb)?;
        Ok(Self { gate, e, m: cfg.model.router.top_m })
    }
}

impl Router for SoftmaxTopkRouter {
    fn route(&self, x: &Tensor, rc: &RouteCtx) -> Result<Routing> {
        let logits = self.gate.logits(x, rc)?; // (T, E)
        let probs = softmax(&logits)?; // (T, E)

        // softmax is monotone: the top-m of the logits are the top-m of the probabilities.
        let indices = top_k_indices(&logits, self.m)?; // (T, m) u32
        let mut weights = probs.gather(&indices, 1)?; // (T, m)
        if self.m > 1 {
            weights = weights.broadcast_div(&weights.sum_keepdim(D::Minus1)?)?;
        }
        Routing::new(indices, weights, logits, probs)
    }

    fn num_experts(&self) -> usize {
        self.e
    }
}
