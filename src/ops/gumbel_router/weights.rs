//! [`GumbelWeights`], the relaxed sample y of the K candidates (differentiable in the logits), and
//! its backward op [`GumbelWeightsBwd`].

use super::blocks::weights_block;
use super::cpu::bwd_row;
#[cfg(any(feature = "cuda", feature = "metal"))]
use super::GumbelKernelArgs;
use super::{GumbelParams, ROWS_PER_TASK};
use crate::ops::backend::cpu::{output_vec, u32_slice, Float, Rows};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// (logits (T, E), cand (T, >= K) u32) -> y = `softmax((logits[cand] + g) / tau)` (T, K).
///
/// `cand` of width exactly 2K + m is taken for the output of `GumbelSelect { save_y: true }` on the
/// same logits: with f32 logits y is then copied from its columns K + m .. 2K + m. Any other width
/// (>= K), or f64 logits: y is computed, g regenerated.
#[derive(Clone, Debug)]
pub struct GumbelWeights(pub GumbelParams);

impl GumbelWeights {
    /// The kernel arguments for the CUDA and Metal launches.
    #[cfg(any(feature = "cuda", feature = "metal"))]
    fn kernel_args(&self, rl: Rows, rc: Rows) -> Result<GumbelKernelArgs> {
        let mut gp = GumbelKernelArgs::new(&self.0, rl.rows, rl.cols)?;
        gp.logits_stride = rl.stride as u32;
        gp.idx_stride = rc.stride as u32;
        gp.y_stride = self.0.k as u32;
        gp.y_col = self.y_col(rc.cols) as u32;
        Ok(gp)
    }

    /// Where the saved weights start in a candidate row of width `cols`; 0: compute them.
    fn y_col(&self, cols: usize) -> usize {
        let (k, m) = (self.0.k, self.0.m);
        if cols == 2 * k + m {
            k + m
        } else {
            0
        }
    }

    fn cpu<T: Float>(&self, lg: &[T], rl: Rows, cand: &[u32], rc: Rows) -> Result<Vec<T>> {
        let p = &self.0;
        let k = p.k;
        let inv_tau = T::from_f64(1.0 / p.tau);
        // Saved y are f32 bits: f64 (gradient checks) computes y at full precision.
        let y_col = if T::IS_F32 { self.y_col(rc.cols) } else { 0 };
        let mut y = output_vec(rl.rows * k, T::from_f64(f64::NAN)); // every weight is written
        y.par_chunks_mut(k * ROWS_PER_TASK).enumerate().try_for_each(|(b, yb)| {
            weights_block(lg, rl, cand, rc, p, b * ROWS_PER_TASK, yb, inv_tau, y_col).map_err(|(t, i)| {
                candle_core::Error::Msg(format!(
                    "gumbel-weights: candidate {} of token {t} is out of range (E = {}) or its logit is not finite",
                    rc.row(cand, t)[i],
                    rl.cols
                ))
            })
        })?;
        Ok(y)
    }

    fn rows(&self, l1: &Layout, l2: &Layout) -> Result<(Rows, Rows)> {
        let rl = Rows::of(l1, "logits", self.name())?;
        let rc = Rows::of(l2, "candidates", self.name())?;
        self.0.check(rl.cols)?;
        if rc.rows != rl.rows || rc.cols < self.0.k {
            candle_core::bail!(
                "{}: candidates {:?} must be (T = {}, >= K = {})",
                self.name(),
                l2.shape(),
                rl.rows,
                self.0.k
            );
        }
        Ok((rl, rc))
    }
}

impl CustomOp2 for GumbelWeights {
    fn name(&self) -> &'static str {
        "gumbel-weights"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rl, rc) = self.rows(l1, l2)?;
        let cand = u32_slice(s2, "candidates", self.name())?;
        rc.check_len(cand.len(), "candidates", self.name())?;
        let out = match s1 {
            CpuStorage::F32(v) => {
                rl.check_len(v.len(), "logits", self.name())?;
                CpuStorage::F32(self.cpu(v, rl, cand, rc)?)
            }
            CpuStorage::F64(v) => {
                rl.check_len(v.len(), "logits", self.name())?;
                CpuStorage::F64(self.cpu(v, rl, cand, rc)?)
            }
            other => candle_core::bail!("{}: logits must be f32 or f64, got {:?}", self.name(), other.dtype()),
        };
        Ok((out, Shape::from((rl.rows, self.0.k))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rl, rc) = self.rows(l1, l2)?;
        let out = super::cuda::weights((s1, rl), (s2, rc), self.kernel_args(rl, rc)?, rl.rows * self.0.k)?;
        Ok((out, Shape::from((rl.rows, self.0.k))))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        let (rl, rc) = self.rows(l1, l2)?;
        let out = super::metal::weights((s1, rl), (s2, rc), self.kernel_args(rl, rc)?, rl.rows * self.0.k)?;
        Ok((out, Shape::from((rl.rows, self.0.k))))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        cand: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let e = logits.dim(1)?;
        let dl = res.apply_op3_no_bwd(&grad_res.contiguous()?, cand, &GumbelWeightsBwd { p: self.0, e })?;
        Ok((Some(dl), None))
    }
}

/// (y (T, K), dy (T, K), cand (T, >= K) u32) -> dlogits (T, E): the backward of [`GumbelWeights`].
#[derive(Clone, Debug)]
pub struct GumbelWeightsBwd {
    pub p: GumbelParams,
    /// E, the width of dlogits.
    pub e: usize,
}

impl GumbelWeightsBwd {
    /// The kernel arguments for the CUDA and Metal launches (one thread per output element, so
    /// T * E must fit in u32).
    #[cfg(any(feature = "cuda", feature = "metal"))]
    fn kernel_args(&self, ry: Rows, rd: Rows, rc: Rows) -> Result<GumbelKernelArgs> {
        let mut gp = GumbelKernelArgs::new(&self.p, ry.rows, self.e)?;
        if ry.rows * self.e > u32::MAX as usize {
            candle_core::bail!("{}: T * E = {} exceeds u32 on the GPU", self.name(), ry.rows * self.e);
        }
        gp.y_stride = ry.stride as u32;
        gp.dy_stride = rd.stride as u32;
        gp.idx_stride = rc.stride as u32;
        gp.logits_stride = self.e as u32;
        Ok(gp)
    }

    fn rows(&self, l1: &Layout, l2: &Layout, l3: &Layout) -> Result<(Rows, Rows, Rows)> {
        let ry = Rows::of(l1, "y", self.name())?;
        let rd = Rows::of(l2, "dy", self.name())?;
        let rc = Rows::of(l3, "candidates", self.name())?;
        self.p.check(self.e)?;
        let k = self.p.k;
        if ry.cols != k || rd.cols != k || rd.rows != ry.rows || rc.rows != ry.rows || rc.cols < k {
            candle_core::bail!(
                "{}: y {:?}, dy {:?}, candidates {:?} must be (T, K = {k}), (T, K), (T, >= K)",
                self.name(),
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        Ok((ry, rd, rc))
    }

    #[allow(clippy::too_many_arguments)]
    fn cpu<T: Float>(&self, y: &[T], ry: Rows, dy: &[T], rd: Rows, cand: &[u32], rc: Rows) -> Result<Vec<T>> {
        let (k, e) = (self.p.k, self.e);
        let inv_tau = T::from_f64(1.0 / self.p.tau);
        // Zeroed row by row inside the parallel loop (a zeroed allocation is a serial memset when
        // the allocator reuses memory).
        let mut dl = output_vec(ry.rows * e, T::from_f64(f64::NAN));
        dl.par_chunks_mut(e.max(1)).with_min_len(ROWS_PER_TASK).enumerate().try_for_each(|(t, o)| {
            o.fill(T::ZERO);
            let c = &rc.row(cand, t)[..k];
            bwd_row(ry.row(y, t), rd.row(dy, t), c, o, inv_tau).map_err(|i| {
                candle_core::Error::Msg(format!(
                    "gumbel-weights-bwd: candidate {} of token {t} is out of range (E = {e})",
                    c[i]
                ))
            })
        })?;
        Ok(dl)
    }
}

impl CustomOp3 for GumbelWeightsBwd {
    fn name(&self) -> &'static str {
        "gumbel-weights-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (ry, rd, rc) = self.rows(l1, l2, l3)?;
        let cand = u32_slice(s3, "candidates", self.name())?;
        rc.check_len(cand.len(), "candidates", self.name())?;
        let out = match (s1, s2) {
            (CpuStorage::F32(y), CpuStorage::F32(dy)) => {
                ry.check_len(y.len(), "y", self.name())?;
                rd.check_len(dy.len(), "dy", self.name())?;
                CpuStorage::F32(self.cpu(y, ry, dy, rd, cand, rc)?)
            }
            (CpuStorage::F64(y), CpuStorage::F64(dy)) => {
                ry.check_len(y.len(), "y", self.name())?;
                rd.check_len(dy.len(), "dy", self.name())?;
                CpuStorage::F64(self.cpu(y, ry, dy, rd, cand, rc)?)
            }
            (a, b) => candle_core::bail!(
                "{}: y and dy must both be f32 or both f64, got {:?} and {:?}",
                self.name(),
                a.dtype(),
                b.dtype()
            ),
        };
        Ok((out, Shape::from((ry.rows, self.e))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (ry, rd, rc) = self.rows(l1, l2, l3)?;
        let gp = self.kernel_args(ry, rd, rc)?;
        let out = super::cuda::weights_bwd((s1, ry), (s2, rd), (s3, rc), gp, ry.rows * self.e)?;
        Ok((out, Shape::from((ry.rows, self.e))))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
        s3: &candle_core::MetalStorage,
        l3: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        let (ry, rd, rc) = self.rows(l1, l2, l3)?;
        let gp = self.kernel_args(ry, rd, rc)?;
        let out = super::metal::weights_bwd((s1, ry), (s2, rd), (s3, rc), gp, ry.rows * self.e)?;
        Ok((out, Shape::from((ry.rows, self.e))))
    }
}
