//! [`GumbelSelect`]: the top-K candidates, the Gumbel-top-m selection and (optionally) the saved
//! weights of each logits row, one op (no gradient: indices).

use super::blocks::{select_block, TopK};
use super::{GumbelKernelArgs, GumbelParams, ROWS_PER_TASK};
use crate::ops::backend::cpu::{output_vec, Rows};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};
use rayon::prelude::*;

/// logits (T, E) -> (T, K + m) u32: K candidates (best first), then m selected positions within K;
/// with `save_y`, (T, 2K + m): then the K weights y = softmax((cand + g) / tau) as f32 bits, which
/// [`GumbelWeights`](super::GumbelWeights) copies instead of computing them again.
#[derive(Clone, Debug)]
pub struct GumbelSelect {
    pub p: GumbelParams,
    pub save_y: bool,
}

impl GumbelSelect {
    /// Columns of the output: K + m, plus K weight columns when `save_y`.
    pub fn width(&self) -> usize {
        self.p.k + self.p.m + if self.save_y { self.p.k } else { 0 }
    }

    /// The kernel arguments: `y_col` is where the row's saved weights start (0: not saved).
    #[cfg_attr(not(any(feature = "cuda", feature = "metal")), allow(dead_code))]
    fn kernel_args(&self, r: Rows) -> Result<GumbelKernelArgs> {
        let mut gp = GumbelKernelArgs::new(&self.p, r.rows, r.cols)?;
        gp.logits_stride = r.stride as u32;
        gp.y_stride = self.width() as u32;
        gp.y_col = if self.save_y { (self.p.k + self.p.m) as u32 } else { 0 };
        Ok(gp)
    }

    fn cpu<T: TopK>(&self, data: &[T], r: Rows) -> Result<Vec<u32>> {
        r.check_len(data.len(), "logits", self.name())?;
        let p = &self.p;
        let w = self.width();
        let mut out = output_vec(r.rows * w, u32::MAX); // every column of every row is written
        out.par_chunks_mut(w * ROWS_PER_TASK).enumerate().try_for_each(|(b, o)| {
            select_block(data, r, p, b * ROWS_PER_TASK, o, w, self.save_y).map_err(|(t, e)| {
                candle_core::Error::Msg(format!(
                    "non-finite router logit {} at layer {}, step {}, token {t}, expert {e}: training diverged",
                    r.row(data, t)[e],
                    p.layer,
                    p.step
                ))
            })
        })?;
        Ok(out)
    }
}

impl CustomOp1 for GumbelSelect {
    fn name(&self) -> &'static str {
        "gumbel-select"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let r = Rows::of(l, "logits", self.name())?;
        self.p.check(r.cols)?;
        let out = match s {
            CpuStorage::F32(v) => self.cpu(v, r)?,
            CpuStorage::F64(v) => self.cpu(v, r)?,
            other => candle_core::bail!("{}: logits must be f32 or f64, got {:?}", self.name(), other.dtype()),
        };
        Ok((CpuStorage::U32(out), Shape::from((r.rows, self.width()))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let r = Rows::of(l, "logits", self.name())?;
        self.p.check(r.cols)?;
        let w = self.width();
        let out = super::cuda::select(s, r, self.kernel_args(r)?, r.rows * w)?;
        Ok((out, Shape::from((r.rows, w))))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(&self, s: &candle_core::MetalStorage, l: &Layout) -> Result<(candle_core::MetalStorage, Shape)> {
        let r = Rows::of(l, "logits", self.name())?;
        self.p.check(r.cols)?;
        let w = self.width();
        let out = super::metal::select(s, r, self.kernel_args(r)?, r.rows * w)?;
        Ok((out, Shape::from((r.rows, w))))
    }
}
