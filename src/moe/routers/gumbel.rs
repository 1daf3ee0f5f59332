//! The Gumbel-Softmax router (Jang et al. 2017; Maddison et al. 2017) with a top-K pre-filter.
//!
//! For each token: logits (E) -> keep the K best as candidates -> add Gumbel noise
//! g = -ln(-ln u), u from Philox keyed by (seed, step, layer, token, expert) -> y = softmax((cand + g) / tau)
//! over the K candidates. `hard = true`: the m largest perturbed candidates are used
//! (Gumbel-top-m, sampling without replacement) with forward weight exactly 1/m and the softmax
//! gradient backward (straight-through, z = y_hard + (y - stopgrad y)). `hard = false`: all K
//! candidates with the soft weights y. At eval (`eval_mode = "argmax"`) there is no noise.
//!
//! The steps are separate functions (`prefilter`, `noise`, `relaxed`, `straight_through`), so a fused
//! kernel can replace them one by one and tests can compare against each.

use super::{host_logits, index_tensor, router_linear, top_k};
use crate::config::{Config, RouterConfig};
use crate::moe::{RouteCtx, Router, Routing};
use crate::nn::ops::softmax;
use crate::nn::Linear;
use crate::ops::{gumbel_route, GumbelParams};
use crate::rng::gumbel_noise;
use candle_core::{Result, Tensor};
use candle_nn::{Module, VarBuilder};

pub struct GumbelRouter {
    gate: Linear,
    e: usize,
    cfg: RouterConfig,
}

impl GumbelRouter {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let e = cfg.model.moe.num_experts;
        let r = cfg.model.router.clone();
        if r.prefilter > e || r.prefilter < r.top_m || r.top_m == 0 {
            candle_core::bail!(
                "gumbel router needs 1 <= top_m ({}) <= prefilter K ({}) <= num_experts E ({e})",
                r.top_m,
                r.prefilter
            );
        }
        Ok(Self { gate: router_linear(cfg.model.n_embd, e, r.init_std, vb)?, e, cfg: r })
    }
}

/// Top-K candidates of each row: (T, K) expert indices, best first.
pub fn prefilter(logits: &[Vec<f64>], k: usize) -> Vec<Vec<usize>> {
    logits.iter().map(|row| top_k(row, k)).collect()
}

/// Gumbel noise for the candidates: (T, K). `token_base` offsets the token index (micro-batches).
pub fn noise(cands: &[Vec<usize>], seed: u64, step: u64, layer: u32, token_base: u32) -> Vec<Vec<f64>> {
    cands
        .iter()
        .enumerate()
        .map(|(t, c)| {
            c.iter().map(|&e| gumbel_noise(seed, step as u32, layer, token_base + t as u32, e as u32) as f64).collect()
        })
        .collect()
}

/// The relaxed sample y = softmax((cand + g) / tau): (T, K) -> (T, K), differentiable in `cand`.
pub fn relaxed(cand: &Tensor, g: &Tensor, tau: f64) -> Result<Tensor> {
    // Multiply by 1/tau (not divide) so the fused kernels, which do the same, match bit for bit.
    softmax(&((cand + g)? * (1.0 / tau))?)
}

/// Straight-through weights of the selected positions: forward exactly 1/m, backward d y.
/// y: (T, K), sel: (T, m) positions within K -> (T, m).
pub fn straight_through(y: &Tensor, sel: &Tensor, m: usize) -> Result<Tensor> {
    let ys = y.gather(sel, 1)?; // (T, m)
                                // (ys - ys) is exactly 0 in the forward pass, so the weight is exactly 1/m; the gradient is d ys.
    ys.sub(&ys.detach())? + 1.0 / m as f64
}

impl Router for GumbelRouter {
    fn route(&self, x: &Tensor, rc: &RouteCtx) -> Result<Routing> {
        let r = &self.cfg;
        let logits = self.gate.forward(x)?; // (T, E)
        let host = host_logits(&logits, rc)?;
        let probs = softmax(&logits)?; // (T, E)
        let tau = rc.ctx.tau;
        if !(tau > 0.0) {
            candle_core::bail!("gumbel router: temperature tau = {tau} must be > 0");
        }
        let t = host.len();
        let k = r.prefilter;
        let noisy = rc.ctx.train || r.eval_mode == "sample";
        if r.implementation == "fused" {
            // The same math as below in three custom ops (src/ops/gumbel_router.rs): bit-identical
            // on the CPU, and the path with CUDA and Metal kernels.
            let p = GumbelParams {
                k,
                m: r.top_m,
                tau: rc.ctx.tau,
                seed: rc.ctx.seed,
                step: rc.ctx.step as u32,
                layer: rc.layer,
                token_base: rc.ctx.micro * t as u32,
                noisy,
            };
            let f = gumbel_route(&logits, &p, r.hard)?;
            return Ok(Routing { indices: f.indices, m: f.m, weights: f.weights, logits, probs });
        }
        let cands = prefilter(&host, k); // (T, K)
        let g = if noisy {
            noise(&cands, rc.ctx.seed, rc.ctx.step, rc.layer, rc.ctx.micro * t as u32)
        } else {
            vec![vec![0.0; k]; t]
        };
        let cand_idx: Vec<u32> = cands.iter().flatten().map(|&e| e as u32).collect();
        let cand_t = index_tensor(cand_idx.clone(), t, k, &logits)?;
        let cand = logits.gather(&cand_t, 1)?; // (T, K)
        let g_t = Tensor::from_vec(g.iter().flatten().copied().collect::<Vec<f64>>(), (t, k), x.device())?
            .to_dtype(x.dtype())?;
        let y = relaxed(&cand, &g_t, tau)?; // (T, K)
        if !r.hard {
            return Ok(Routing { indices: cand_idx, m: k, weights: y, logits, probs });
        }
        // The m largest perturbed candidates (Gumbel-top-m): positions within K.
        let m = r.top_m;
        let mut sel = Vec::with_capacity(t * m);
        let mut indices = Vec::with_capacity(t * m);
        for (tok, c) in cands.iter().enumerate() {
            let pert: Vec<f64> = c.iter().zip(&g[tok]).map(|(&e, gi)| host[tok][e] + gi).collect();
            for p in top_k(&pert, m) {
                sel.push(p as u32);
                indices.push(c[p] as u32);
            }
        }
        let sel = index_tensor(sel, t, m, &logits)?;
        let weights = straight_through(&y, &sel, m)?;
        Ok(Routing { indices, m, weights, logits, probs })
    }

    fn num_experts(&self) -> usize {
        self.e
    }
}
