//! Gather rows to the expert order, as Candle custom ops with CPU, CUDA and Metal kernels. The plain
//! twin is [`gather_rows_reference`] (`index_select`, whose backward is `index_add`).
//!
//! # Design
//!
//! * [`GatherRows`] (`CustomOp2`: x (T, C), order) -> xs (N, C): `xs[r] = x[row_slot[r] / m]`, the
//!   input rows in the order of [`expert_sort`](super::expert_sort()), so expert e's tokens are the
//!   contiguous rows `offsets[e]..offsets[e + 1]`.
//! * Its backward, [`GatherRowsBwd`] (`CustomOp2`: dxs (N, C), order) -> dx (T, C):
//!   `dx[t] = sum_s dxs[slot_row[t, s]]` over the token's kept slots in slot order. A gather
//!   through the slot -> row map, so no scatter and no atomics: deterministic on every backend.
//!
//! Both run one GPU thread per output element (`gather_rows_f32`, `gather_rows_bwd_f32`), and on the
//! CPU in parallel over output rows (rayon). f32 on every backend; f64 too on the CPU (for gradient
//! checks). `x` / `dxs` rows may be strided (a narrow); the order tensor must be contiguous.
//!
//! [`split_rows`] cuts the sorted rows into per-expert views with a binary tree of `narrow`s: Candle's
//! `narrow` backward pads each view's gradient to its parent's full size, so E flat narrows cost
//! E x N x C in the backward, the tree 2 log2(E) x N x C.

use super::backend::cpu::{u32_slice, Float, Rows};
use super::dispatch_common::{host_order, OrderDims, NONE, ROWS_PER_TASK};
use super::expert_sort::ExpertOrder;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// (x (T, C), order) -> xs (N, C).
#[derive(Clone, Copy, Debug)]
pub struct GatherRows {
    pub dims: OrderDims,
    /// Kept rows `N = offsets[E]`.
    pub n: usize,
}

/// (dxs (N, C), order) -> dx (T, C): the backward of [`GatherRows`].
#[derive(Clone, Copy, Debug)]
pub struct GatherRowsBwd {
    pub dims: OrderDims,
    pub n: usize,
}

fn gather_cpu<T: Float>(x: &[T], rx: Rows, order: &[u32], start: usize, d: OrderDims, n: usize) -> Result<Vec<T>> {
    let c = rx.cols;
    let (row_slot, _, _) = host_order(order, start, d);
    let mut out = vec![T::ZERO; n * c];
    out.par_chunks_mut(c.max(1)).with_min_len(ROWS_PER_TASK).enumerate().try_for_each(|(r, o)| {
        let f = row_slot[r];
        if f == NONE || f as usize / d.m >= d.t {
            candle_core::bail!("gather-rows: sorted row {r} has no valid slot ({f}); order and N = {n} disagree");
        }
        o.copy_from_slice(rx.row(x, f as usize / d.m));
        Ok(())
    })?;
    Ok(out)
}

fn gather_bwd_cpu<T: Float>(dxs: &[T], rd: Rows, order: &[u32], start: usize, d: OrderDims, n: usize) -> Vec<T> {
    let c = rd.cols;
    let (_, slot_row, _) = host_order(order, start, d);
    let mut dx = vec![T::ZERO; d.t * c];
    dx.par_chunks_mut(c.max(1)).with_min_len(ROWS_PER_TASK).enumerate().for_each(|(t, o)| {
        for &r in &slot_row[t * d.m..(t + 1) * d.m] {
            if (r as usize) < n {
                for (a, &b) in o.iter_mut().zip(rd.row(dxs, r as usize)) {
                    *a = *a + b;
                }
            }
        }
    });
    dx
}

impl GatherRows {
    fn check(&self, l1: &Layout, l2: &Layout, len: usize) -> Result<(Rows, usize)> {
        let rx = Rows::of(l1, "x", self.name())?;
        let rx = rx.expect(self.dims.t, rx.cols, len, "x", self.name())?;
        Ok((rx, self.dims.check(l2, self.name())?))
    }

    #[cfg(any(feature = "cuda", feature = "metal"))]
    fn params(&self, rx: Rows) -> Result<super::dispatch_common::DispatchKernelArgs> {
        let mut p = super::dispatch_common::DispatchKernelArgs::new(self.dims, self.n, rx.cols, self.name())?;
        p.a_stride = rx.stride as u32;
        Ok(p)
    }
}

impl CustomOp2 for GatherRows {
    fn name(&self) -> &'static str {
        "gather-rows"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let order = u32_slice(s2, "order", self.name())?;
        let (d, n) = (self.dims, self.n);
        let (out, c) = match s1 {
            CpuStorage::F32(x) => {
                let (rx, st) = self.check(l1, l2, x.len())?;
                (CpuStorage::F32(gather_cpu(x, rx, order, st, d, n)?), rx.cols)
            }
            CpuStorage::F64(x) => {
                let (rx, st) = self.check(l1, l2, x.len())?;
                (CpuStorage::F64(gather_cpu(x, rx, order, st, d, n)?), rx.cols)
            }
            other => candle_core::bail!("{}: x must be f32 or f64, got {:?}", self.name(), other.dtype()),
        };
        Ok((out, Shape::from((n, c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::backend::expect_dtype;
        use super::dispatch_common::cuda_launch as launch;
        use candle_core::DType;
        expect_dtype(self.name(), "x", s1.dtype(), DType::F32)?;
        expect_dtype(self.name(), "order", s2.dtype(), DType::U32)?;
        let (rx, st) = self.check(l1, l2, usize::MAX)?;
        let p = self.params(rx)?;
        let dev = s1.device();
        let x = s1.as_cuda_slice::<f32>()?.slice(rx.offset..);
        let order = s2.as_cuda_slice::<u32>()?.slice(st..);
        let out = dev.alloc_zeros::<f32>(self.n * rx.cols)?;
        launch(dev, "gather_rows_f32", p.n * p.c, &[&x, &order, &out, &p])?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((self.n, rx.cols))))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        use super::backend::expect_dtype;
        use super::backend::metal::{output, Arg};
        use super::dispatch_common::metal_dispatch as launch;
        use candle_core::DType;
        let (rx, st) = self.check(l1, l2, usize::MAX)?;
        expect_dtype(self.name(), "x", s1.dtype(), DType::F32)?;
        expect_dtype(self.name(), "order", s2.dtype(), DType::U32)?;
        let p = self.params(rx)?;
        let (out, buf) = output(s1.device(), self.n * rx.cols, DType::F32, self.name())?;
        let args = [Arg::input(s1, rx.offset), Arg::input(s2, st), Arg::Out(&buf, 0), Arg::value(&p)];
        launch(s1.device(), "gather_rows_f32", p.n * p.c, &args)?;
        Ok((out, Shape::from((self.n, rx.cols))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        order: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = grad.contiguous()?.apply_op2_no_bwd(order, &GatherRowsBwd { dims: self.dims, n: self.n })?;
        Ok((Some(dx), None))
    }
}

impl GatherRowsBwd {
    fn check(&self, l1: &Layout, l2: &Layout, len: usize) -> Result<(Rows, usize)> {
        let rd = Rows::of(l1, "dxs", self.name())?;
        let rd = rd.expect(self.n, rd.cols, len, "dxs", self.name())?;
        Ok((rd, self.dims.check(l2, self.name())?))
    }

    #[cfg(any(feature = "cuda", feature = "metal"))]
    fn params(&self, rd: Rows) -> Result<super::dispatch_common::DispatchKernelArgs> {
        let mut p = super::dispatch_common::DispatchKernelArgs::new(self.dims, self.n, rd.cols, self.name())?;
        p.a_stride = rd.stride as u32;
        Ok(p)
    }
}

impl CustomOp2 for GatherRowsBwd {
    fn name(&self) -> &'static str {
        "gather-rows-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let order = u32_slice(s2, "order", self.name())?;
        let (d, n) = (self.dims, self.n);
        let (out, c) = match s1 {
            CpuStorage::F32(v) => {
                let (rd, st) = self.check(l1, l2, v.len())?;
                (CpuStorage::F32(gather_bwd_cpu(v, rd, order, st, d, n)), rd.cols)
            }
            CpuStorage::F64(v) => {
                let (rd, st) = self.check(l1, l2, v.len())?;
                (CpuStorage::F64(gather_bwd_cpu(v, rd, order, st, d, n)), rd.cols)
            }
            other => candle_core::bail!("{}: dxs must be f32 or f64, got {:?}", self.name(), other.dtype()),
        };
        Ok((out, Shape::from((d.t, c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::backend::expect_dtype;
        use super::dispatch_common::cuda_launch as launch;
        use candle_core::DType;
        expect_dtype(self.name(), "dxs", s1.dtype(), DType::F32)?;
        expect_dtype(self.name(), "order", s2.dtype(), DType::U32)?;
        let (rd, st) = self.check(l1, l2, usize::MAX)?;
        let p = self.params(rd)?;
        let dev = s1.device();
        let dxs = s1.as_cuda_slice::<f32>()?.slice(rd.offset..);
        let order = s2.as_cuda_slice::<u32>()?.slice(st..);
        let out = dev.alloc_zeros::<f32>(self.dims.t * rd.cols)?;
        launch(dev, "gather_rows_bwd_f32", p.t * p.c, &[&dxs, &order, &out, &p])?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((self.dims.t, rd.cols))))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        use super::backend::expect_dtype;
        use super::backend::metal::{output, Arg};
        use super::dispatch_common::metal_dispatch as launch;
        use candle_core::DType;
        let (rd, st) = self.check(l1, l2, usize::MAX)?;
        expect_dtype(self.name(), "dxs", s1.dtype(), DType::F32)?;
        expect_dtype(self.name(), "order", s2.dtype(), DType::U32)?;
        let p = self.params(rd)?;
        let (out, buf) = output(s1.device(), self.dims.t * rd.cols, DType::F32, self.name())?;
        let args = [Arg::input(s1, rd.offset), Arg::input(s2, st), Arg::Out(&buf, 0), Arg::value(&p)];
        launch(s1.device(), "gather_rows_bwd_f32", p.t * p.c, &args)?;
        Ok((out, Shape::from((self.dims.t, rd.cols))))
    }
}

/// x (T, C) -> xs (N, C): the rows of `x` in the expert order `o` (differentiable in `x`).
pub fn gather_rows(x: &Tensor, o: &ExpertOrder) -> Result<Tensor> {
    x.apply_op2(&o.order, GatherRows { dims: o.dims, n: o.n() })
}

/// The reference twin: `index_select` of each sorted row's token (host indices from the order).
pub fn gather_rows_reference(x: &Tensor, o: &ExpertOrder) -> Result<Tensor> {
    let m = o.dims.m as u32;
    let tokens: Vec<u32> = o.row_slot()?.to_vec1::<u32>()?.into_iter().map(|f| f / m).collect();
    x.index_select(&Tensor::new(tokens.as_slice(), x.device())?, 0)
}

/// xs (N, C) -> per expert e, `Some(rows offsets[e]..offsets[e + 1])` or `None` when it has no rows.
/// Views from a binary tree of `narrow`s: the backward costs O(N C log E) instead of O(N C E).
pub fn split_rows(xs: &Tensor, offsets: &[u32]) -> Result<Vec<Option<Tensor>>> {
    fn go(xs: &Tensor, off: &[u32], lo: usize, hi: usize, out: &mut Vec<Option<Tensor>>) -> Result<()> {
        // xs holds the rows of experts lo..hi.
        if off[hi] == off[lo] {
            out.extend((lo..hi).map(|_| None));
            return Ok(());
        }
        if hi - lo == 1 {
            out.push(Some(xs.clone()));
            return Ok(());
        }
        let mid = (lo + hi) / 2;
        let left = (off[mid] - off[lo]) as usize;
        let right = (off[hi] - off[mid]) as usize;
        // Narrow only when both halves have rows: otherwise xs already is the non-empty half.
        let (l, r) = if left == 0 || right == 0 {
            (xs.clone(), xs.clone())
        } else {
            (xs.narrow(0, 0, left)?, xs.narrow(0, left, right)?)
        };
        go(&l, off, lo, mid, out)?;
        go(&r, off, mid, hi, out)
    }
    let e = offsets.len() - 1;
    let mut out = Vec::with_capacity(e);
    go(xs, offsets, 0, e, &mut out)?;
    Ok(out)
}
