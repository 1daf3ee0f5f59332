//! The straight-through step of the hard Gumbel router as one op: forward, the combine weights of
//! the m selected experts, exactly 1/m; backward, their gradient into the relaxed sample y at the
//! selected positions (the soft gradient of the chosen experts).
//!
//! The tensor form it replaces (the reference twin, `moe::routers::gumbel::straight_through`) is
//! `ys = y.gather(sel); (ys - ys.detach()) + 1/m` after a `narrow(..).contiguous()` of the selected
//! positions: four tensor ops and three (T, m) temporaries per layer per step, about 0.5-1 ms of
//! the CPU router's forward at T = 65,536. Here the forward only fills (T, m) with 1/m on every
//! backend (no kernel of its own: the device's zeros and `const_set`); the backward is
//! `zeros(T, K).scatter_add(sel, grad)`, Candle's own op on all three backends, with one source
//! element per destination (the m positions of a row are distinct), so no float atomics collide.

use candle_core::backend::BackendStorage;
#[cfg(any(feature = "cuda", feature = "metal"))]
use candle_core::DType;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::backend::cpu::{u32_slice, Rows};

/// (y (T, K), cand_sel (T, >= K + m) u32) -> (T, m) weights equal to 1/m; the selected positions
/// within K are columns K..K+m of `cand_sel` (the output of `GumbelSelect`).
#[derive(Clone, Copy, Debug)]
pub struct StraightThrough {
    pub k: usize,
    pub m: usize,
}

impl StraightThrough {
    /// The output shape, after checking the two layouts against K and m.
    fn shape(&self, l1: &Layout, l2: &Layout) -> Result<Shape> {
        let name = self.name();
        let y = Rows::of(l1, "y", name)?;
        let cs = Rows::of(l2, "cand_sel", name)?;
        if self.m == 0 || self.m > self.k {
            candle_core::bail!("{name}: need 1 <= m ({}) <= K ({})", self.m, self.k);
        }
        if y.cols != self.k || cs.rows != y.rows || cs.cols < self.k + self.m {
            candle_core::bail!(
                "{name}: y {:?} must be (T, K = {}) and cand_sel {:?} (T, >= K + m = {})",
                l1.shape(),
                self.k,
                l2.shape(),
                self.k + self.m
            );
        }
        Ok(Shape::from((y.rows, self.m)))
    }

    fn value(&self) -> f64 {
        1.0 / self.m as f64
    }

    /// The device's zeros set to 1/m (CUDA and Metal).
    #[cfg(any(feature = "cuda", feature = "metal"))]
    fn filled<D: candle_core::backend::BackendDevice>(&self, dev: &D, shape: &Shape, dtype: DType) -> Result<D::Storage>
    where
        D::Storage: BackendStorage,
    {
        use candle_core::scalar::Scalar;
        let v = match dtype {
            DType::F32 => Scalar::F32(self.value() as f32),
            other => candle_core::bail!("{}: y must be f32 on a GPU, got {other:?}", self.name()),
        };
        let mut out = dev.zeros_impl(shape, dtype)?;
        out.const_set(v, &Layout::contiguous(shape))?;
        Ok(out)
    }
}

impl CustomOp2 for StraightThrough {
    fn name(&self) -> &'static str {
        "straight-through"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let shape = self.shape(l1, l2)?;
        u32_slice(s2, "cand_sel", self.name())?;
        let n = shape.elem_count();
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(vec![self.value() as f32; n]),
            CpuStorage::F64(_) => CpuStorage::F64(vec![self.value(); n]),
            other => candle_core::bail!("{}: y must be f32 or f64, got {:?}", self.name(), other.dtype()),
        };
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        _s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let shape = self.shape(l1, l2)?;
        Ok((self.filled(s1.device(), &shape, s1.dtype())?, shape))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        _s2: &candle_core::MetalStorage,
        l2: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        let shape = self.shape(l1, l2)?;
        Ok((self.filled(s1.device(), &shape, s1.dtype())?, shape))
    }

    fn bwd(
        &self,
        y: &Tensor,
        cand_sel: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let sel = cand_sel.narrow(1, self.k, self.m)?.contiguous()?; // (T, m) positions within K
        let dy = y.zeros_like()?.scatter_add(&sel, &grad.to_dtype(y.dtype())?, 1)?; // (T, K)
        Ok((Some(dy), None))
    }
}

/// The straight-through weights (T, m): exactly 1/m forward, d y at the selected positions
/// backward. `y` (T, K) is the relaxed sample, `cand_sel` the select op's output.
pub fn straight_through(y: &Tensor, cand_sel: &Tensor, k: usize, m: usize) -> Result<Tensor> {
    y.apply_op2(cand_sel, StraightThrough { k, m })
}
