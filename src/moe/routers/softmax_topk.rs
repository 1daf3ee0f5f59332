//! Softmax top-m routing: Switch Transformer (m = 1, weight = the expert's probability) and Mixtral
//! (m > 1, weights renormalised over the chosen experts).

use super::{host_logits, index_tensor, top_k, Gate};
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
        let host = host_logits(&logits, rc)?;
        let probs = softmax(&logits)?; // (T, E)
        let t = host.len();
        // softmax is monotone: the top-m of the logits are the top-m of the probabilities.
        let indices: Vec<u32> = host.iter().flat_map(|row| top_k(row, self.m)).map(|i| i as u32).collect();
        let idx = index_tensor(indices.clone(), t, self.m, &logits)?;
        let mut weights = probs.gather(&idx, 1)?; // (T, m)
        if self.m > 1 {
            weights = weights.broadcast_div(&weights.sum_keepdim(D::Minus1)?)?;
        }
        Ok(Routing::new(indices, self.m, weights, logits, probs))
    }

    fn num_experts(&self) -> usize {
        self.e
    }
}
