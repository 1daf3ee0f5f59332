//! Differentiable softmax and deterministic dropout.
//!
//! `candle_nn::ops::softmax_last_dim` is a fused kernel without backward: gradients stop there
//! silently. `candle_nn::ops::{softmax, log_softmax}` and `Tensor::log_sum_exp` have backward and
//! the same forward (max, subtract, exp, sum), but they also differentiate through the max:
//! mathematically zero, in floating point a rounding-sized term at each row's argmax. These detach
//! the max, so the gradient is the softmax's alone.

use candle_core::{Result, Tensor, D};

/// Softmax over the last dimension, with gradient. The max is detached: softmax is shift-invariant,
/// so the gradient is unchanged and exp never overflows.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// log-softmax over the last dimension, with gradient.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// logsumexp over the last dimension (keepdim), with gradient.
pub fn logsumexp(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    x.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()?.broadcast_add(&max)
}

/// Inverted dropout keyed by (seed, step, micro, site): the [`crate::ops::PhiloxDropout`] op, whose
/// mask is drawn on the tensor's own device (reproducible, resumable, identical on every backend).
/// `p == 0` or eval is identity.
pub fn dropout(x: &Tensor, p: f64, train: bool, seed: u64, step: u64, micro: u32, site: u32) -> Result<Tensor> {
    if !train || p == 0.0 {
        return Ok(x.clone());
    }
    let d = crate::ops::PhiloxDropout { p, seed, site, hi: crate::ops::PhiloxDropout::hi(step, micro) };
    crate::ops::philox_dropout(x, &d)
}

pub use crate::ops::attention::causal_mask;
