//! Differentiable softmax and deterministic dropout.
//!
//! `candle_nn::ops::softmax_last_dim` is a fused kernel without backward: gradients stop there
//! silently. This softmax is written from `exp`, `sum` and `div`, which all have backward.

use crate::rng::{draw, u32_to_open_unit, Stream};
use candle_core::{DType, Device, Result, Tensor, D};

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

/// Inverted dropout with a mask drawn from the Philox stream keyed by (seed, step, micro, site).
/// On the CPU the mask is built on the host (reproducible, resumable); `p == 0` or eval is identity.
pub fn dropout(x: &Tensor, p: f64, train: bool, seed: u64, step: u64, micro: u32, site: u32) -> Result<Tensor> {
    if !train || p == 0.0 {
        return Ok(x.clone());
    }
    let n = x.elem_count();
    let scale = (1.0 / (1.0 - p)) as f32;
    let mut mask = Vec::with_capacity(n);
    let hi = ((step as u32) & 0xffff) << 16 | (micro & 0xffff);
    let mut i = 0u32;
    while mask.len() < n {
        let r = draw(seed, Stream::Dropout, site, hi, i);
        for w in r {
            mask.push(if (u32_to_open_unit(w) as f64) < p { 0f32 } else { scale });
        }
        i += 1;
    }
    mask.truncate(n);
    let mask = Tensor::from_vec(mask, x.shape(), &Device::Cpu)?.to_device(x.device())?.to_dtype(x.dtype())?;
    x.mul(&mask)
}

/// An additive causal mask (T, T): 0 on and below the diagonal, a large negative number above.
/// A finite value (not -inf) keeps every intermediate finite.
pub fn causal_mask(t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..t).flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { -1e9 })).collect();
    Tensor::from_vec(data, (t, t), device)?.to_dtype(dtype)
}
