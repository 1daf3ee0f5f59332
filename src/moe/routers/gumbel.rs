//! The Gumbel-Softmax router (Jang et al. 2017; Maddison et al. 2017) with a top-K pre-filter.
//!
//! For each token: logits (E) -> keep the K best as candidates -> add Gumbel noise
//! g = -ln(-ln u), u from Philox keyed by (seed, step, layer, token, expert) -> y = softmax((cand + g) / tau)
//! over the K candidates. `hard = true`: the m largest perturbed candidates are used
//! (Gumbel-top-m, sampling without replacement) with forward weight exactly 1/m and the softmax
//! gradient backward (straight-through, z = y_hard + (y - stopgrad y)). `hard = false`: the same m
//! largest perturbed candidates (the same selection as hard), weighted by the relaxed y at those
//! positions renormalised to sum to 1 (`soft_top_m`); with m = K that is all K candidates with the
//! soft weights y, unchanged. (Soft with m = 1 < K has weight exactly 1 and so no gradient through
//! the weights: the router then learns only from the auxiliary losses.) At eval
//! (`eval_mode = "argmax"`) there is no noise.
//!
//! The steps are separate functions (`prefilter`, `noise`, `relaxed`, `straight_through`), so a fused
//! kernel can replace them one by one and tests can compare against each.

use super::{index_tensor, top_k, Gate};
use crate::config::{Config, EvalMode, RouterConfig, RouterImpl};
use crate::moe::finite::checked_host_rows;
use crate::moe::{RouteCtx, Router, Routing};
use crate::nn::ops::softmax;
use crate::ops::gumbel_router::{gumbel_select_saving_y, gumbel_weights};
use crate::ops::GumbelParams;
use crate::rng::gumbel_noise;
use candle_core::{Result, Tensor, D};
use candle_nn::VarBuilder;

pub struct GumbelRouter {
    gate: Gate,
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
        if r.implementation == RouterImpl::Fused && r.prefilter > crate::ops::gumbel_router::MAX_K {
            candle_core::bail!(
                "model.router.impl = \"fused\" supports prefilter K <= {}, got {}",
                crate::ops::gumbel_router::MAX_K,
                r.prefilter
            );
        }
        let gate = Gate::new(cfg, vb)?;
        Ok(Self { gate, e, cfg: r })
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

/// Soft top-m weights: the relaxed y at the selected positions, renormalised to sum to 1.
/// y: (T, K), sel: (T, m) positions within K -> (T, m), differentiable in y.
pub fn soft_top_m(y: &Tensor, sel: &Tensor) -> Result<Tensor> {
    let ys = y.gather(sel, 1)?; // (T, m)
    ys.broadcast_div(&ys.sum_keepdim(D::Minus1)?)
}

/// The router after the gate matmul in the fused ops (`ops::gumbel_router`), on the logits' device
/// with no host copy: (indices (T, m') u32, weights (T, m')), m' as in [`reference_route`].
pub fn fused_route(logits: &Tensor, p: &GumbelParams, hard: bool) -> Result<(Tensor, Tensor)> {
    let (k, m) = (p.k, p.m);
    let all_k = !hard && (m == 0 || m >= k);
    let p = GumbelParams { m: if all_k { 0 } else { m }, ..*p };
    let cand_sel = gumbel_select_saving_y(logits, &p)?; // (T, 2K + m) u32: candidates, positions, y
    let y = gumbel_weights(logits, &cand_sel, &p)?; // (T, K), copied from the select pass (f32)
    let cand = cand_sel.narrow(1, 0, k)?.contiguous()?; // (T, K) candidate experts, best first
    if all_k {
        return Ok((cand, y));
    }
    let sel = cand_sel.narrow(1, k, m)?.contiguous()?; // (T, m) selected positions within K
    let indices = cand.gather(&sel, 1)?; // (T, m) experts
    let weights = if hard {
        crate::ops::straight_through(&y, &cand_sel, k, m)? // exactly 1/m forward, d y backward
    } else {
        soft_top_m(&y, &sel)?
    };
    Ok((indices, weights))
}

/// The plain-tensor twin of [`fused_route`], from logits (T, E) and their host copy, selecting on
/// the host. Returns (indices (T, m') row-major on the host, m', weights (T, m'), y (T, K)).
/// m' = m when `hard`, or when soft with 1 <= m < K (the m largest perturbed candidates, weights
/// [`soft_top_m`]); m' = K when soft with m = 0 or m >= K (the indices are then the K candidates
/// in pre-filter order, the weights y).
pub fn reference_route(
    logits: &Tensor,
    host: &[Vec<f64>],
    p: &GumbelParams,
    hard: bool,
) -> Result<(Vec<u32>, usize, Tensor, Tensor)> {
    let (t, k) = (host.len(), p.k);
    let cands = prefilter(host, k); // (T, K)
    let g = if p.noisy { noise(&cands, p.seed, p.step as u64, p.layer, p.token_base) } else { vec![vec![0.0; k]; t] };
    let cand_idx: Vec<u32> = cands.iter().flatten().map(|&e| e as u32).collect();
    let cand = logits.gather(&index_tensor(cand_idx.clone(), t, k, logits)?, 1)?; // (T, K)
    let g_t = Tensor::from_vec(g.iter().flatten().copied().collect::<Vec<f64>>(), (t, k), logits.device())?
        .to_dtype(logits.dtype())?;
    let y = relaxed(&cand, &g_t, p.tau)?; // (T, K)
    let m = p.m;
    if !hard && (m == 0 || m >= k) {
        return Ok((cand_idx, k, y.clone(), y));
    }
    // The m largest perturbed candidates (Gumbel-top-m): positions within K.
    let (mut sel, mut indices) = (Vec::with_capacity(t * m), Vec::with_capacity(t * m));
    for (tok, c) in cands.iter().enumerate() {
        let pert: Vec<f64> = c.iter().zip(&g[tok]).map(|(&e, gi)| host[tok][e] + gi).collect();
        for q in top_k(&pert, m) {
            sel.push(q as u32);
            indices.push(c[q] as u32);
        }
    }
    let sel = index_tensor(sel, t, m, logits)?; // (T, m)
    let weights = if hard { straight_through(&y, &sel, m)? } else { soft_top_m(&y, &sel)? };
    Ok((indices, m, weights, y))
}

impl Router for GumbelRouter {
    fn route(&self, x: &Tensor, rc: &RouteCtx) -> Result<Routing> {
        let r = &self.cfg;
        let logits = self.gate.logits(x, rc)?; // (T, E)
        let probs = softmax(&logits)?; // (T, E)
        let tau = rc.ctx.tau;
        // Refuses NaN too.
        if tau.is_nan() || tau <= 0.0 {
            candle_core::bail!("gumbel router: temperature tau = {tau} must be > 0");
        }
        let t = logits.dim(0)?;
        let p = GumbelParams {
            k: r.prefilter,
            m: r.top_m,
            tau,
            seed: rc.ctx.seed,
            step: rc.ctx.step as u32,
            layer: rc.layer,
            token_base: rc.ctx.micro * t as u32,
            noisy: rc.ctx.train || r.eval_mode == EvalMode::Sample,
        };
        let (indices, weights) = if r.implementation == RouterImpl::Fused {
            // The same math in custom ops (src/ops/gumbel_router/), with CUDA/Metal kernels; the
            // select op stops on a non-finite logit.
            fused_route(&logits, &p, r.hard)?
        } else {
            let host = checked_host_rows(&logits, rc.ctx.step, rc.layer)?;
            let (indices, m, weights, _) = reference_route(&logits, &host, &p, r.hard)?;
            (index_tensor(indices, t, m, &logits)?, weights)
        };
        Routing::new(indices, weights, logits, probs)
    }

    fn num_experts(&self) -> usize {
        self.e
    }
}
