//! The causal softmax of attention scores as one op each way: p = softmax(scale s + causal mask)
//! over the last dimension of (..., T, T) scores, with no (T, T) mask tensor and no composite
//! softmax; the backward ([`CausalSoftmaxBwd`], itself an op) is ds = scale p (dp - <p, dp>).
//! Attention uses it wherever its fully fused op does not run (GPUs, attention dropout in training).
//! CPU kernel here, CUDA/Metal bodies in `kernels/layers.cuh`; plain twin [`causal_softmax_reference`].

use super::float::{contiguous, out_vec, Float};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Score rows per rayon task.
const ROWS: usize = 64;

/// p = softmax over the last dim of scale * s, key j of query row i kept iff j <= i.
/// s: (..., T, T) -> p: (..., T, T).
pub fn causal_softmax(s: &Tensor, scale: f64) -> Result<Tensor> {
    s.contiguous()?.apply_op1(CausalSoftmax { scale })
}

/// The plain-tensor twin of [`causal_softmax`]: scale, additive -inf mask, Candle's softmax.
pub fn causal_softmax_reference(s: &Tensor, scale: f64) -> Result<Tensor> {
    let t = s.dim(candle_core::D::Minus1)?;
    let mask = super::attention::causal_mask(t, s.dtype(), s.device())?; // (T, T)
    candle_nn::ops::softmax(&(s * scale)?.broadcast_add(&mask)?, candle_core::D::Minus1)
}

/// The forward op.
#[derive(Clone, Copy, Debug)]
pub struct CausalSoftmax {
    pub scale: f64,
}

/// The backward op: (p, dp) -> ds.
#[derive(Clone, Copy, Debug)]
pub struct CausalSoftmaxBwd {
    pub scale: f64,
}

/// (rows, T) of (..., T, T) scores, or an error naming the op.
fn dims(l: &Layout, op: &str) -> Result<(usize, usize)> {
    let d = l.dims();
    if d.len() < 2 || d[d.len() - 1] != d[d.len() - 2] || d[d.len() - 1] == 0 {
        candle_core::bail!("{op}: scores must be (..., T, T) with T >= 1, got {:?}", l.shape());
    }
    let t = d[d.len() - 1];
    Ok((l.shape().elem_count() / t, t))
}

fn fwd_cpu<T: Float>(s: &[T], t: usize, scale: T) -> Vec<T> {
    let mut y = out_vec::<T>(s.len());
    y.par_chunks_mut(t * ROWS).zip(s.par_chunks(t * ROWS)).enumerate().for_each(|(blk, (ys, ss))| {
        for (k, (yr, sr)) in ys.chunks_mut(t).zip(ss.chunks(t)).enumerate() {
            let n = (blk * ROWS + k) % t + 1; // keys 0..=i
            let mx = sr[..n].iter().fold(sr[0] * scale, |m, &v| m.max(v * scale));
            let mut sum = T::ZERO;
            for j in 0..n {
                let e = (sr[j] * scale - mx).exp();
                yr[j] = e;
                sum = sum + e;
            }
            let inv = T::ONE / sum;
            yr[..n].iter_mut().for_each(|v| *v = *v * inv);
            yr[n..].iter_mut().for_each(|v| *v = T::ZERO);
        }
    });
    y
}

fn bwd_cpu<T: Float>(y: &[T], dy: &[T], t: usize, scale: T) -> Vec<T> {
    let mut ds = out_vec::<T>(y.len());
    ds.par_chunks_mut(t * ROWS).zip(y.par_chunks(t * ROWS)).zip(dy.par_chunks(t * ROWS)).enumerate().for_each(
        |(blk, ((dss, ys), dys))| {
            for (k, ((dr, yr), gr)) in dss.chunks_mut(t).zip(ys.chunks(t)).zip(dys.chunks(t)).enumerate() {
                let n = (blk * ROWS + k) % t + 1;
                let dot = (0..n).fold(T::ZERO, |a, j| a + yr[j] * gr[j]);
                for j in 0..n {
                    dr[j] = scale * yr[j] * (gr[j] - dot);
                }
                dr[n..].iter_mut().for_each(|v| *v = T::ZERO);
            }
        },
    );
    ds
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, t) = dims(l, self.name())?;
        let (a, z) = contiguous(l, "scores", self.name())?;
        let out = match s {
            CpuStorage::F32(v) => f32::storage(fwd_cpu(&v[a..z], t, self.scale as f32)),
            CpuStorage::F64(v) => f64::storage(fwd_cpu(&v[a..z], t, self.scale)),
            other => candle_core::bail!("causal-softmax: f32 or f64 scores required, got {:?}", other.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _s: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&grad.contiguous()?, &CausalSoftmaxBwd { scale: self.scale })?))
    }
}

impl CustomOp2 for CausalSoftmaxBwd {
    fn name(&self) -> &'static str {
        "causal-softmax-bwd"
    }

    fn cpu_fwd(&self, sy: &CpuStorage, ly: &Layout, sg: &CpuStorage, lg: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, t) = dims(ly, self.name())?;
        if lg.shape() != ly.shape() {
            candle_core::bail!("causal-softmax-bwd: dp has shape {:?}, p has {:?}", lg.shape(), ly.shape());
        }
        let (a, z) = contiguous(ly, "p", self.name())?;
        let (ga, gz) = contiguous(lg, "dp", self.name())?;
        let out = match sy {
            CpuStorage::F32(v) => {
                f32::storage(bwd_cpu(&v[a..z], &f32::slice(sg, "dp", self.name())?[ga..gz], t, self.scale as f32))
            }
            CpuStorage::F64(v) => {
                f64::storage(bwd_cpu(&v[a..z], &f64::slice(sg, "dp", self.name())?[ga..gz], t, self.scale))
            }
            other => candle_core::bail!("causal-softmax-bwd: f32 or f64 required, got {:?}", other.dtype()),
        };
        Ok((out, ly.shape().clone()))
    }
}
