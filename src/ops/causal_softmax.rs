//! The causal softmax of attention scores as one op each way: p = softmax(scale s + causal mask)
//! over the last dimension of (..., T, T) scores, with no (T, T) mask tensor and no composite
//! softmax; the backward ([`CausalSoftmaxBwd`], itself an op) is ds = scale p (dp - <p, dp>).
//! Attention uses it wherever its fully fused op does not run (GPUs, attention dropout in training).
//! CPU kernel here, CUDA/Metal bodies in `kernels/layers.cuh`; plain twin [`causal_softmax_reference`].

use super::backend::cpu::{contiguous, out_vec, Float};
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

/// The GPU kernels' scalar arguments (`CausalSoftmaxKernelArgs` in kernels/layers.cuh).
#[cfg(any(feature = "cuda", feature = "metal"))]
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct CausalSoftmaxKernelArgs {
    rows: u32,
    t: u32,
    scale: f32,
    pad: u32,
}

#[cfg(feature = "cuda")]
super::backend::cuda::by_value!(CausalSoftmaxKernelArgs);

/// The element range of the f32 scores (or p) and the kernel arguments.
#[cfg(any(feature = "cuda", feature = "metal"))]
fn gpu_args(
    op: &str,
    dtype: candle_core::DType,
    l: &Layout,
    scale: f64,
) -> Result<((usize, usize), CausalSoftmaxKernelArgs)> {
    let (rows, t) = dims(l, op)?;
    super::backend::expect_dtype(op, "scores", dtype, candle_core::DType::F32)?;
    let args = CausalSoftmaxKernelArgs {
        rows: super::backend::fits(rows, "rows", op)?,
        t: super::backend::fits(t, "T", op)?,
        scale: scale as f32,
        pad: 0,
    };
    Ok((contiguous(l, "scores", op)?, args))
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let ((a, z), p) = gpu_args(self.name(), s.dtype(), l, self.scale)?;
        let dev = s.device();
        // SAFETY: one thread per row writes all T elements of its row.
        let y = unsafe { dev.alloc::<f32>(z - a)? };
        let sv = s.as_cuda_slice::<f32>()?.slice(a..z);
        let m = &super::layer_kernels::MODULE;
        super::backend::cuda::launch(dev, m, "causal_softmax_f32", p.rows as usize, &[&sv, &y, &p])?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone()), l.shape().clone()))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(&self, s: &candle_core::MetalStorage, l: &Layout) -> Result<(candle_core::MetalStorage, Shape)> {
        use super::backend::metal::{dispatch, output, Arg};
        let ((a, z), p) = gpu_args(self.name(), s.dtype(), l, self.scale)?;
        let (y, buf) = output(s.device(), z - a, candle_core::DType::F32, self.name())?;
        let args = [Arg::input(s, a), Arg::Out(&buf, 0), Arg::value(&p)];
        dispatch(s.device(), &super::layer_kernels::LIBRARY, "causal_softmax_f32", &args, p.rows as usize)?;
        Ok((y, l.shape().clone()))
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sy: &candle_core::CudaStorage,
        ly: &Layout,
        sg: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let ((a, z), (ga, gz), p) = self.gpu_plan((sy.dtype(), ly), (sg.dtype(), lg))?;
        let dev = sy.device();
        // SAFETY: one thread per row writes all T elements of its row.
        let ds = unsafe { dev.alloc::<f32>(z - a)? };
        let yv = sy.as_cuda_slice::<f32>()?.slice(a..z);
        let gv = sg.as_cuda_slice::<f32>()?.slice(ga..gz);
        let m = &super::layer_kernels::MODULE;
        super::backend::cuda::launch(dev, m, "causal_softmax_bwd_f32", p.rows as usize, &[&yv, &gv, &ds, &p])?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(ds, dev.clone()), ly.shape().clone()))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        sy: &candle_core::MetalStorage,
        ly: &Layout,
        sg: &candle_core::MetalStorage,
        lg: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        use super::backend::metal::{dispatch, output, Arg};
        let ((a, z), (ga, _), p) = self.gpu_plan((sy.dtype(), ly), (sg.dtype(), lg))?;
        let (ds, buf) = output(sy.device(), z - a, candle_core::DType::F32, self.name())?;
        let args = [Arg::input(sy, a), Arg::input(sg, ga), Arg::Out(&buf, 0), Arg::value(&p)];
        dispatch(sy.device(), &super::layer_kernels::LIBRARY, "causal_softmax_bwd_f32", &args, p.rows as usize)?;
        Ok((ds, ly.shape().clone()))
    }
}

impl CausalSoftmaxBwd {
    /// The element ranges of p and dp (one shape, both f32) and the kernel arguments.
    #[cfg(any(feature = "cuda", feature = "metal"))]
    fn gpu_plan(
        &self,
        y: (candle_core::DType, &Layout),
        g: (candle_core::DType, &Layout),
    ) -> Result<((usize, usize), (usize, usize), CausalSoftmaxKernelArgs)> {
        if g.1.shape() != y.1.shape() {
            candle_core::bail!("causal-softmax-bwd: dp has shape {:?}, p has {:?}", g.1.shape(), y.1.shape());
        }
        super::backend::expect_dtype(self.name(), "dp", g.0, candle_core::DType::F32)?;
        let (yr, p) = gpu_args(self.name(), y.0, y.1, self.scale)?;
        Ok((yr, contiguous(g.1, "dp", self.name())?, p))
    }
}
