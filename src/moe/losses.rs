//! Router auxiliary losses.
//!
//! - Switch load balance (Fedus et al. 2021): E * sum_i f_i * P_i, f_i = share of routed
//!   token-slots that went to expert i (hard, no gradient), P_i = mean softmax probability of i.
//!   It is 1 when routing is uniform and grows as it concentrates.
//! - Router z-loss (ST-MoE, Zoph et al. 2022): mean over tokens of logsumexp(logits)^2.
//! - CV^2 (Shazeer et al. 2017): squared coefficient of variation of a per-expert quantity, the
//!   importance and load losses of noisy top-k gating.
//! - The score-function (REINFORCE) surrogate: sum_t (L_t - b) log p(chosen_t) / N, whose gradient is
//!   an unbiased estimate of the gradient of `E[L]` through a sampled discrete choice.

use crate::nn::ops::logsumexp;
use candle_core::{DType, Result, Tensor};

pub use crate::ops::balance_stats::expert_fractions;

/// (E,) u32: how often each of the `e` experts occurs in `indices` (any shape, u32), counted on
/// their device (one-hot rows summed).
pub fn expert_counts(indices: &Tensor, e: usize) -> Result<Tensor> {
    let flat = indices.detach().flatten_all()?.unsqueeze(1)?; // (N, 1)
    let ids = Tensor::arange(0u32, e as u32, indices.device())?.unsqueeze(0)?; // (1, E)
    flat.broadcast_eq(&ids)?.to_dtype(DType::U32)?.sum(0) // (E,)
}

/// E * sum_i f_i * P_i with probs: (T, E) and indices (T, m) u32 on the same device; f is counted
/// there ([`expert_counts`]). Gradient flows through P.
pub fn load_balance(probs: &Tensor, indices: &Tensor) -> Result<Tensor> {
    let e = probs.dim(1)?;
    let n = indices.elem_count().max(1);
    let f = (expert_counts(indices, e)?.to_dtype(probs.dtype())? / n as f64)?; // (E)
    let p = probs.mean(0)?; // (E)
    (p * f)?.sum_all()? * e as f64
}

/// The same loss through the fused [`crate::ops::balance_stats()`] op: logits (T, E), indices (T, m)
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

/// CV(v)^2 = var(v) / (mean(v)^2 + 1e-10) of a (E,) vector, with the unbiased (E - 1) variance as
/// in Shazeer et al.'s reference code (`torch.var`); 0 when E = 1. Differentiable.
pub fn cv_squared(v: &Tensor) -> Result<Tensor> {
    let e = v.dim(0)?;
    if e < 2 {
        return Tensor::zeros((), v.dtype(), v.device());
    }
    let mean = v.mean_all()?; // ()
    let var = (v.broadcast_sub(&mean)?.sqr()?.sum_all()? / (e - 1) as f64)?;
    var / (mean.sqr()? + 1e-10)?
}

/// The score-function surrogate of one batch: `logps` one (N,) tensor per layer of the log-prob
/// of each token's sampled expert, `per_token_loss` (N,) the loss of each token (detached here).
/// Returns sum_layers sum_t (L_t - b) * logp_t / N, a scalar to add to the loss: its gradient is the
/// REINFORCE estimate of `d E[L] / d router` (each token's choice credited with its own loss); its
/// value carries no meaning. `baseline` b is a moving average of the mean loss: a non-finite value
/// (start it at `f64::NAN`) means unset and takes this batch's mean; after use it becomes
/// decay * b + (1 - decay) * mean(L). None when `logps` is empty.
pub fn score_function_surrogate(
    logps: &[Tensor],
    per_token_loss: &Tensor,
    baseline: &mut f64,
    decay: f64,
) -> Result<Option<Tensor>> {
    let Some(first) = logps.first() else { return Ok(None) };
    let l = per_token_loss.detach().flatten_all()?.to_dtype(DType::F64)?; // (N,)
    let n = l.dim(0)?;
    let mean = l.mean_all()?.to_scalar::<f64>()?;
    let b = if baseline.is_finite() { *baseline } else { mean };
    // The advantage is a constant of the graph: only log p carries the gradient.
    let adv = (l - b)?.to_dtype(first.dtype())?; // (N,)
    let mut total: Option<Tensor> = None;
    for lp in logps {
        if lp.dims() != [n] {
            candle_core::bail!("score surrogate: log-probs {:?} do not match the {n} per-token losses", lp.shape());
        }
        let s = ((lp * &adv)?.sum_all()? / n as f64)?;
        total = Some(match total {
            Some(t) => (t + s)?,
            None => s,
        });
    }
    *baseline = decay * b + (1.0 - decay) * mean;
    Ok(total)
}
