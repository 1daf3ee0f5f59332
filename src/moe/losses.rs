//! Router auxiliary losses.
//!
//! - Switch load balance (Fedus et al. 2021): E * sum_i f_i * P_i, f_i = share of routed
//!   token-slots that went to expert i (hard, no gradient), P_i = mean softmax probability of i.
//!   It is 1 when routing is uniform and grows as it concentrates.
//! - Router z-loss (ST-MoE, Zoph et al. 2022): mean over tokens of logsumexp(logits)^2.

use crate::nn::ops::logsumexp;
use candle_core::{Result, Tensor};

/// f_i: counts of each expert among `indices` divided by their number.
pub fn expert_fractions(indices: &[u32], e: usize) -> Vec<f64> {
    let mut f = vec![0f64; e];
    for &i in indices {
        f[i as usize] += 1.0;
    }
    let n = indices.len().max(1) as f64;
    f.iter_mut().for_each(|x| *x /= n);
    f
}

/// E * sum_i f_i * P_i with probs: (T, E). Gradient flows through P.
pub fn load_balance(probs: &Tensor, indices: &[u32]) -> Result<Tensor> {
    let e = probs.dim(1)?;
    let f = expert_fractions(indices, e);
    let f = Tensor::from_vec(f, e, probs.device())?.to_dtype(probs.dtype())?;
    let p = probs.mean(0)?; // (E)
    (p * f)?.sum_all()? * e as f64
}

/// The same loss through the fused [`crate::ops::balance_stats`] op: logits (T, E), indices (T, m)
/// u32 on the logits' device. The softmax over all experts is never materialized; the gradient
/// reaches the logits through the op's backward kernel.
pub fn load_balance_fused(logits: &Tensor, indices: &Tensor) -> Result<Tensor> {
    let e = logits.dim(1)?;
    let s = crate::ops::balance_stats(logits, indices)?; // (2, E): f, P
    (s.get(0)? * s.get(1)?)?.sum_all()? * e as f64
}

/// mean_t logsumexp(logits_t)^2 with logits: (T, E).
pub fn z_loss(logits: &Tensor) -> Result<Tensor> {
    logsumexp(logits)?.sqr()?.mean_all()
}
