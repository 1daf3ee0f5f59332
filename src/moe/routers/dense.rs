//! Dense routing: every token uses every expert, weighted by the softmax over all E. This is exact
//! marginalisation over the expert choice, the baseline the Gumbel-Softmax estimator approximates.

use super::{all_experts, Gate};
use crate::config::Config;
use crate::moe::{RouteCtx, Router, Routing};
use crate::nn::ops::softmax;
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

pub struct DenseRouter {
    gate: Gate,
    e: usize,
}

impl DenseRouter {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let e = cfg.model.moe.num_experts;
        Ok(Self { gate: Gate::new(cfg, vb)?, e })
    }
}

impl Router for DenseRouter {
    fn route(&self, x: &Tensor, rc: &RouteCtx) -> Result<Routing> {
        let logits = self.gate.logits(x, rc)?; // (T, E)
        let probs = softmax(&logits)?; // (T, E)
        let indices = all_experts(logits.dim(0)?, self.e, &logits)?; // (T, E) u32
        Routing::new(indices, probs.clone(), logits, probs)
    }

    fn num_experts(&self) -> usize {
        self.e
    }
}
