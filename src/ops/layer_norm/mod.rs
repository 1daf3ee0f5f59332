//! LayerNorm and RMSNorm over the last dimension as one op each way. Forward: per row, the mean
//! (LayerNorm) and 1/sqrt(var + eps), then xhat * gamma (+ beta). Backward ([`NormBwd`], itself an
//! op): dx, dgamma and dbeta in one pass over the rows, the row statistics recomputed.
//!
//! Candle's `layer_norm`/`rms_norm` have no backward, and the composite form pays for a dozen
//! graph nodes plus Candle's strided leading-dimension sum for the gain and bias gradients.
//! dgamma/dbeta are summed in fixed blocks of rows, then the blocks in order: deterministic for
//! any thread count. CPU kernel here; on other devices [`norm`] runs the plain-tensor twin
//! [`norm_reference`].

use super::backend::cpu::{contiguous, out_vec, Float};
use super::backend::simd::widest;
use super::float::{dot, sum8_f64, sum_of};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

#[cfg(any(feature = "cuda", feature = "metal"))]
mod gpu;

/// Rows per block of the parameter-gradient sums.
const BLOCK: usize = 32;

/// The normalisation of one call.
#[derive(Clone, Copy, Debug)]
pub struct Norm {
    pub eps: f64,
    /// RMSNorm (no mean, no bias) instead of LayerNorm.
    pub rms: bool,
}

/// y = norm(x) * gamma (+ beta) over the last dimension. x: (..., C), gamma, beta: (C).
pub fn norm(x: &Tensor, gamma: &Tensor, beta: Option<&Tensor>, op: Norm) -> Result<Tensor> {
    if !super::layer_kernels::has_kernel(x) {
        return norm_reference(x, gamma, beta, op);
    }
    let x = x.contiguous()?;
    match beta {
        Some(b) => x.apply_op3_arc(gamma, b, std::sync::Arc::new(Box::new(op))),
        None => x.apply_op2_arc(gamma, std::sync::Arc::new(Box::new(op))),
    }
}

/// The plain-tensor twin of [`norm`] (differentiable Candle ops).
pub fn norm_reference(x: &Tensor, gamma: &Tensor, beta: Option<&Tensor>, op: Norm) -> Result<Tensor> {
    let xn = if op.rms {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?; // (..., 1)
        x.broadcast_div(&(ms + op.eps)?.sqrt()?)?
    } else {
        let mean = x.mean_keepdim(D::Minus1)?; // (..., 1)
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + op.eps)?.sqrt()?)?
    };
    let y = xn.broadcast_mul(gamma)?;
    match beta {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// Mean (0 for RMSNorm) and 1/sqrt(var + eps) of one row, accumulated in f64.
#[inline(always)]
fn stats<T: Float>(row: &[T], op: Norm) -> (T, T) {
    let c = row.len() as f64;
    if op.rms {
        let ms = sum8_f64(row, |v| v * v) / c;
        return (T::ZERO, T::from_f64(1.0 / (ms + op.eps).sqrt()));
    }
    let mean = sum8_f64(row, |v| v) / c;
    let var = sum8_f64(row, |v| (v - mean) * (v - mean)) / c;
    (T::from_f64(mean), T::from_f64(1.0 / (var + op.eps).sqrt()))
}

/// Input checks shared by both directions: x (rows, C) contiguous, gamma/beta (C) contiguous.
fn shape(l: &Layout, what: &str) -> Result<(usize, usize)> {
    let c = l.dims().last().copied().unwrap_or(0);
    if l.dims().is_empty() || c == 0 {
        candle_core::bail!("norm: {what} must have a non-empty last dimension, got {:?}", l.shape());
    }
    Ok((l.shape().elem_count() / c, c))
}

fn param<'a, T: Float>(s: &'a CpuStorage, l: &Layout, c: usize, what: &str) -> Result<&'a [T]> {
    let (a, b) = contiguous(l, what, "norm")?;
    if b - a != c || l.dims().len() != 1 {
        candle_core::bail!("norm: {what} must have shape ({c}), got {:?}", l.shape());
    }
    Ok(&T::slice(s, what, "norm")?[a..b])
}

fn fwd_cpu<T: Float>(op: Norm, x: &[T], c: usize, g: &[T], b: Option<&[T]>) -> Vec<T> {
    let mut y = out_vec::<T>(x.len());
    y.par_chunks_mut(c * BLOCK).zip(x.par_chunks(c * BLOCK)).for_each(|(ys, xs)| fwd_rows(op, ys, xs, g, b));
    y
}

widest! {
    /// y = (x - mean) r g (+ b), row by row (rows of g.len()).
    fn fwd_rows<T: Float>(op: Norm, ys: &mut [T], xs: &[T], g: &[T], b: Option<&[T]>) {
        let c = g.len();
        for (yr, xr) in ys.chunks_mut(c).zip(xs.chunks(c)) {
            let (mean, r) = stats(xr, op);
            match b {
                Some(b) => {
                    for j in 0..c {
                        yr[j] = (xr[j] - mean) * r * g[j] + b[j];
                    }
                }
                None => {
                    for j in 0..c {
                        yr[j] = (xr[j] - mean) * r * g[j];
                    }
                }
            }
        }
    }
}

impl Norm {
    fn fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
        beta: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c) = shape(lx, "x")?;
        let (a, z) = contiguous(lx, "x", "norm")?;
        macro_rules! run {
            ($t:ty) => {{
                let x = &<$t>::slice(sx, "x", "norm")?[a..z];
                let g = param::<$t>(sg, lg, c, "gamma")?;
                let b = match beta {
                    Some((sb, lb)) => Some(param::<$t>(sb, lb, c, "beta")?),
                    None => None,
                };
                <$t>::storage(fwd_cpu(*self, x, c, g, b))
            }};
        }
        let out = match sx {
            CpuStorage::F32(_) => run!(f32),
            CpuStorage::F64(_) => run!(f64),
            other => candle_core::bail!("norm: f32 or f64 input required, got {:?}", other.dtype()),
        };
        Ok((out, lx.shape().clone()))
    }

    /// dx (shape of x), dgamma, dbeta (C) from the packed output of [`NormBwd`].
    fn grads(&self, x: &Tensor, gamma: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let c = gamma.elem_count();
        let rows = x.elem_count() / c;
        let packed = x.apply_op3_no_bwd(gamma, &grad.contiguous()?, &NormBwd(*self))?; // (rows + 2, C)
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        Ok((dx, packed.get(rows)?, packed.get(rows + 1)?))
    }
}

impl CustomOp2 for Norm {
    fn name(&self) -> &'static str {
        "norm"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sg: &CpuStorage, lg: &Layout) -> Result<(CpuStorage, Shape)> {
        self.fwd(sx, lx, sg, lg, None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sg: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let p = gpu::Plan::new(*self, "norm", (sx.dtype(), lx), &[(sg.dtype(), lg, "gamma")], false)?;
        Ok((gpu::cuda::fwd(&p, sx, sg, None)?, lx.shape().clone()))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        sx: &candle_core::MetalStorage,
        lx: &Layout,
        sg: &candle_core::MetalStorage,
        lg: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        let p = gpu::Plan::new(*self, "norm", (sx.dtype(), lx), &[(sg.dtype(), lg, "gamma")], false)?;
        Ok((gpu::metal::fwd(&p, sx, sg, None)?, lx.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, gamma: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dg, _) = self.grads(x, gamma, grad)?;
        Ok((Some(dx), Some(dg)))
    }
}

impl CustomOp3 for Norm {
    fn name(&self) -> &'static str {
        "norm"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd(sx, lx, sg, lg, Some((sb, lb)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sg: &candle_core::CudaStorage,
        lg: &Layout,
        sb: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let params = [(sg.dtype(), lg, "gamma"), (sb.dtype(), lb, "beta")];
        let p = gpu::Plan::new(*self, "norm", (sx.dtype(), lx), &params, true)?;
        Ok((gpu::cuda::fwd(&p, sx, sg, Some(sb))?, lx.shape().clone()))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        sx: &candle_core::MetalStorage,
        lx: &Layout,
        sg: &candle_core::MetalStorage,
        lg: &Layout,
        sb: &candle_core::MetalStorage,
        lb: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        let params = [(sg.dtype(), lg, "gamma"), (sb.dtype(), lb, "beta")];
        let p = gpu::Plan::new(*self, "norm", (sx.dtype(), lx), &params, true)?;
        Ok((gpu::metal::fwd(&p, sx, sg, Some(sb))?, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dg, db) = self.grads(x, gamma, grad)?;
        Ok((Some(dx), Some(dg), Some(db)))
    }
}

widest! {
    /// dx of each row, and the rows' dgamma, dbeta added to `p` (2 C).
    fn bwd_rows<T: Float>(op: Norm, dxs: &mut [T], xs: &[T], dys: &[T], g: &[T], p: &mut [T]) {
        let c = g.len();
        let inv_c = T::from_f64(1.0 / c as f64);
        let (mut xhat, mut gx) = (vec![T::ZERO; c], vec![T::ZERO; c]);
        for ((dxr, xr), dyr) in dxs.chunks_mut(c).zip(xs.chunks(c)).zip(dys.chunks(c)) {
            let (mean, r) = stats(xr, op);
            for j in 0..c {
                let xh = (xr[j] - mean) * r;
                xhat[j] = xh;
                gx[j] = dyr[j] * g[j];
                p[j] = p[j] + dyr[j] * xh;
                p[c + j] = p[c + j] + dyr[j];
            }
            let s1 = if op.rms { T::ZERO } else { sum_of(&gx) }; // sum gx
            let s2 = dot(&gx, &xhat); // sum gx * xhat
            let (m1, m2) = (s1 * inv_c, s2 * inv_c);
            for j in 0..c {
                dxr[j] = r * (gx[j] - m1 - xhat[j] * m2);
            }
        }
    }
}

/// The backward of [`Norm`]: (x, gamma, dy) -> (rows + 2, C) holding dx, then dgamma, then dbeta
/// (zero for RMSNorm).
#[derive(Clone, Copy, Debug)]
pub struct NormBwd(pub Norm);

fn bwd_cpu<T: Float>(op: Norm, x: &[T], g: &[T], dy: &[T], c: usize) -> Vec<T> {
    let rows = x.len() / c;
    let mut out = out_vec::<T>((rows + 2) * c);
    let (dx, params) = out.split_at_mut(rows * c);
    // Per block of rows: dx rows, and the block's partial dgamma, dbeta.
    let partials: Vec<Vec<T>> = dx
        .par_chunks_mut(c * BLOCK)
        .zip(x.par_chunks(c * BLOCK))
        .zip(dy.par_chunks(c * BLOCK))
        .map(|((dxs, xs), dys)| {
            let mut p = vec![T::ZERO; 2 * c];
            bwd_rows(op, dxs, xs, dys, g, &mut p);
            p
        })
        .collect();
    params.fill(T::ZERO);
    for p in &partials {
        for (o, &v) in params.iter_mut().zip(p) {
            *o = *o + v;
        }
    }
    if op.rms {
        params[c..].fill(T::ZERO);
    }
    out
}

impl CustomOp3 for NormBwd {
    fn name(&self) -> &'static str {
        "norm-bwd"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
        sd: &CpuStorage,
        ld: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, c) = shape(lx, "x")?;
        if ld.shape() != lx.shape() {
            candle_core::bail!("norm-bwd: dy has shape {:?}, x has {:?}", ld.shape(), lx.shape());
        }
        let (a, z) = contiguous(lx, "x", "norm-bwd")?;
        let (da, dz) = contiguous(ld, "dy", "norm-bwd")?;
        macro_rules! run {
            ($t:ty) => {{
                let x = &<$t>::slice(sx, "x", "norm-bwd")?[a..z];
                let dy = &<$t>::slice(sd, "dy", "norm-bwd")?[da..dz];
                let g = param::<$t>(sg, lg, c, "gamma")?;
                <$t>::storage(bwd_cpu(self.0, x, g, dy, c))
            }};
        }
        let out = match sx {
            CpuStorage::F32(_) => run!(f32),
            CpuStorage::F64(_) => run!(f64),
            other => candle_core::bail!("norm-bwd: f32 or f64 input required, got {:?}", other.dtype()),
        };
        Ok((out, Shape::from((rows + 2, c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sg: &candle_core::CudaStorage,
        lg: &Layout,
        sd: &candle_core::CudaStorage,
        ld: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (p, dy) = self.gpu_plan((sx.dtype(), lx), (sg.dtype(), lg), (sd.dtype(), ld))?;
        Ok((gpu::cuda::bwd(&p, sx, sg, sd, dy)?, Shape::from((p.rows + 2, p.c))))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        sx: &candle_core::MetalStorage,
        lx: &Layout,
        sg: &candle_core::MetalStorage,
        lg: &Layout,
        sd: &candle_core::MetalStorage,
        ld: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        let (p, dy) = self.gpu_plan((sx.dtype(), lx), (sg.dtype(), lg), (sd.dtype(), ld))?;
        Ok((gpu::metal::bwd(&p, sx, sg, sd, dy.0)?, Shape::from((p.rows + 2, p.c))))
    }
}

impl NormBwd {
    /// The GPU launch plan and dy's element range; dbeta is written (zeros for RMSNorm).
    #[cfg(any(feature = "cuda", feature = "metal"))]
    fn gpu_plan(
        &self,
        x: (candle_core::DType, &Layout),
        g: (candle_core::DType, &Layout),
        dy: (candle_core::DType, &Layout),
    ) -> Result<(gpu::Plan, (usize, usize))> {
        if dy.1.shape() != x.1.shape() {
            candle_core::bail!("norm-bwd: dy has shape {:?}, x has {:?}", dy.1.shape(), x.1.shape());
        }
        crate::ops::backend::expect_dtype("norm-bwd", "dy", dy.0, candle_core::DType::F32)?;
        let p = gpu::Plan::new(self.0, "norm-bwd", x, &[(g.0, g.1, "gamma")], !self.0.rms)?;
        Ok((p, contiguous(dy.1, "dy", "norm-bwd")?))
    }
}
