//! Weighted combine of the expert outputs back to their tokens, as Candle custom ops with CPU, CUDA
//! and Metal kernels. The plain twin is [`combine_reference`] (per-slot `index_select`, weighted,
//! summed; its backward is candle's).
//!
//! # Design
//!
//! * [`Combine`] (`CustomOp3`: out (N, C), w (T, m), order) -> y (T, C):
//!   `y[t] = sum_s w[t, s] out[slot_row[t, s]]`, slots in order, dropped slots adding nothing.
//!   Each output element is one thread's fixed-order sum: no scatter-add, no float atomics.
//! * Its backward needs two gradients, so it is two custom ops, each with its own kernels:
//!   - [`CombineBwdOut`] (dy (T, C), w (T, m), order) -> d_out (N, C): `d_out[r] = w[f] dy[t]`,
//!     `f = row_slot[r] = t m + s` (every kept row belongs to exactly one slot: a gather, one writer
//!     per element);
//!   - [`CombineBwdW`] (out (N, C), dy (T, C), order) -> d_w (T, m): `d_w[t, s] = <out[row], dy[t]>`
//!     (0 when dropped), summed as 32 column-strided partial sums (`LANES`: coalesced GPU reads)
//!     added in lane order; on the GPU a partial kernel then a reduction kernel, on the CPU the same
//!     arithmetic in the same order.
//!
//! Each is computed only when its input takes part in the graph.
//!
//! GPU entry points: `combine_f32`, `combine_bwd_out_f32`, `combine_bwd_w_part_f32`,
//! `combine_bwd_w_f32` (kernels/moe_dispatch.{cu,metal}, bodies in moe_dispatch.cuh). CPU: rayon over
//! output rows, f32 and f64. Float inputs may have strided rows; the order must be contiguous.

use crate::ops::backend::cpu::{u32_slice, Float, Rows};
use crate::ops::dispatch_common::{host_order, OrderDims, ROWS_PER_TASK};
use crate::ops::expert_sort::ExpertOrder;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
#[cfg(feature = "metal")]
use {
    crate::ops::backend::metal::{output, Arg},
    crate::ops::dispatch_common::metal_dispatch as launch,
    candle_core::DType,
};

mod bwd;
pub use bwd::{CombineBwdOut, CombineBwdW};

/// (out (N, C), w (T, m), order) -> y (T, C).
#[derive(Clone, Copy, Debug)]
pub struct Combine {
    pub dims: OrderDims,
    /// Kept rows `N = offsets[E]`.
    pub n: usize,
}

/// The checked layouts of two float inputs, shapes (rows_a, C) and (rows_b, cols_b), plus the order's start.
pub(super) fn layouts(
    op: &str,
    d: OrderDims,
    (la, rows_a, lena): (&Layout, usize, usize),
    (lb, rows_b, cols_b, lenb): (&Layout, usize, Option<usize>, usize),
    lo: &Layout,
) -> Result<(Rows, Rows, usize)> {
    let ra = Rows::of(la, "first input", op)?;
    let ra = ra.expect(rows_a, ra.cols, lena, "first input", op)?;
    let rb = Rows::of(lb, "second input", op)?;
    let rb = rb.expect(rows_b, cols_b.unwrap_or(ra.cols), lenb, "second input", op)?;
    Ok((ra, rb, d.check(lo, op)?))
}

/// Checks the dtypes of a combine op's Metal inputs: two f32 tensors named `names`, the u32 order.
#[cfg(feature = "metal")]
pub(super) fn metal_inputs(op: &str, s: [&candle_core::MetalStorage; 3], names: [&str; 2]) -> Result<()> {
    use crate::ops::backend::expect_dtype;
    expect_dtype(op, names[0], s[0].dtype(), DType::F32)?;
    expect_dtype(op, names[1], s[1].dtype(), DType::F32)?;
    expect_dtype(op, "order", s[2].dtype(), DType::U32)
}

#[cfg(any(feature = "cuda", feature = "metal"))]
pub(super) fn params(
    op: &str,
    d: OrderDims,
    n: usize,
    c: usize,
    (a, b, w): (usize, usize, usize),
) -> Result<crate::ops::dispatch_common::DispatchKernelArgs> {
    let mut p = crate::ops::dispatch_common::DispatchKernelArgs::new(d, n, c, op)?;
    p.a_stride = a as u32;
    p.b_stride = b as u32;
    p.w_stride = w as u32;
    Ok(p)
}

// ---------------------------------------------------------------------------------------------
// CPU kernels.

fn combine_cpu<T: Float>(out: &[T], ro: Rows, w: &[T], rw: Rows, slot_row: &[u32], n: usize, m: usize) -> Vec<T> {
    let c = ro.cols;
    let mut y = vec![T::ZERO; rw.rows * c];
    y.par_chunks_mut(c.max(1)).with_min_len(ROWS_PER_TASK).enumerate().for_each(|(t, yr)| {
        let wr = rw.row(w, t);
        for (s, &r) in slot_row[t * m..(t + 1) * m].iter().enumerate() {
            if (r as usize) < n {
                let ws = wr[s];
                for (a, &b) in yr.iter_mut().zip(ro.row(out, r as usize)) {
                    *a = *a + ws * b;
                }
            }
        }
    });
    y
}

/// The CPU storages of two float inputs as slices of one type (f32 or f64), into `$body`.
macro_rules! float_pair {
    ($op:expr, $s1:expr, $s2:expr, |$a:ident, $b:ident| $body:expr) => {
        match ($s1, $s2) {
            (CpuStorage::F32($a), CpuStorage::F32($b)) => CpuStorage::F32($body),
            (CpuStorage::F64($a), CpuStorage::F64($b)) => CpuStorage::F64($body),
            (a, b) => candle_core::bail!(
                "{}: float inputs must both be f32 or f64, got {:?} and {:?}",
                $op,
                a.dtype(),
                b.dtype()
            ),
        }
    };
}
pub(super) use float_pair;

// ---------------------------------------------------------------------------------------------
// Op: Combine.

impl CustomOp3 for Combine {
    fn name(&self) -> &'static str {
        "combine"
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
        let (d, n, op) = (self.dims, self.n, self.name());
        let order = u32_slice(s3, "order", op)?;
        let c;
        let y = float_pair!(op, s1, s2, |out, w| {
            let (ro, rw, st) = layouts(op, d, (l1, n, out.len()), (l2, d.t, Some(d.m), w.len()), l3)?;
            c = ro.cols;
            combine_cpu(out, ro, w, rw, host_order(order, st, d).1, n, d.m)
        });
        Ok((y, Shape::from((d.t, c))))
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
        use crate::ops::backend::expect_dtype;
        use crate::ops::dispatch_common::cuda_launch as launch;
        use candle_core::DType;
        let (d, n, op) = (self.dims, self.n, self.name());
        expect_dtype(op, "expert_out", s1.dtype(), DType::F32)?;
        expect_dtype(op, "weights", s2.dtype(), DType::F32)?;
        expect_dtype(op, "order", s3.dtype(), DType::U32)?;
        let (ro, rw, st) = layouts(op, d, (l1, n, usize::MAX), (l2, d.t, Some(d.m), usize::MAX), l3)?;
        let p = params(op, d, n, ro.cols, (ro.stride, 0, rw.stride))?;
        let dev = s1.device();
        let out = s1.as_cuda_slice::<f32>()?.slice(ro.offset..);
        let w = s2.as_cuda_slice::<f32>()?.slice(rw.offset..);
        let order = s3.as_cuda_slice::<u32>()?.slice(st..);
        let y = dev.alloc_zeros::<f32>(d.t * ro.cols)?;
        launch(dev, "combine_f32", p.t * p.c, &[&out, &w, &order, &y, &p])?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone()), Shape::from((d.t, ro.cols))))
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
        let (d, n, op) = (self.dims, self.n, self.name());
        metal_inputs(op, [s1, s2, s3], ["expert_out", "weights"])?;
        let (ro, rw, st) = layouts(op, d, (l1, n, usize::MAX), (l2, d.t, Some(d.m), usize::MAX), l3)?;
        let p = params(op, d, n, ro.cols, (ro.stride, 0, rw.stride))?;
        let (y, buf) = output(s1.device(), d.t * ro.cols, DType::F32, op)?;
        let args = [
            Arg::input(s1, ro.offset),
            Arg::input(s2, rw.offset),
            Arg::input(s3, st),
            Arg::Out(&buf, 0),
            Arg::value(&p),
        ];
        launch(s1.device(), "combine_f32", p.t * p.c, &args)?;
        Ok((y, Shape::from((d.t, ro.cols))))
    }

    fn bwd(
        &self,
        out: &Tensor,
        w: &Tensor,
        order: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = grad.contiguous()?;
        let (dims, n) = (self.dims, self.n);
        let d_out =
            if out.track_op() { Some(dy.apply_op3_no_bwd(w, order, &CombineBwdOut { dims, n })?) } else { None };
        let d_w = if w.track_op() { Some(out.apply_op3_no_bwd(&dy, order, &CombineBwdW { dims, n })?) } else { None };
        Ok((d_out, d_w, None))
    }
}

// ---------------------------------------------------------------------------------------------
// Public entry points.

/// y (T, C) = sum_s w[t, s] expert_out[row of (t, s)]: `expert_out` (N, C) in the order `o`, `weights`
/// (T, m). Differentiable in both.
pub fn combine(expert_out: &Tensor, weights: &Tensor, o: &ExpertOrder) -> Result<Tensor> {
    expert_out.apply_op3(weights, &o.order, Combine { dims: o.dims, n: o.n() })
}

/// The reference twin from plain tensor ops: per slot s, `index_select` the slot's rows (dropped
/// slots read row 0 with weight 0), scale by the weight column, and sum over slots.
pub fn combine_reference(expert_out: &Tensor, weights: &Tensor, o: &ExpertOrder) -> Result<Tensor> {
    let (t, m) = (o.dims.t, o.dims.m);
    let c = expert_out.dim(1)?;
    let slot_row = o.slot_row()?.to_vec2::<u32>()?;
    let mut y = Tensor::zeros((t, c), expert_out.dtype(), expert_out.device())?;
    if o.n() == 0 {
        return Ok(y);
    }
    for s in 0..m {
        let rows: Vec<u32> = slot_row.iter().map(|r| if r[s] == u32::MAX { 0 } else { r[s] }).collect();
        let keep: Vec<f64> = slot_row.iter().map(|r| if r[s] == u32::MAX { 0.0 } else { 1.0 }).collect();
        let keep = Tensor::new(keep.as_slice(), weights.device())?.to_dtype(weights.dtype())?;
        let ws = weights.narrow(1, s, 1)?.squeeze(1)?.mul(&keep)?.unsqueeze(1)?; // (T, 1)
        let rows = expert_out.index_select(&Tensor::new(rows.as_slice(), expert_out.device())?, 0)?; // (T, C)
        y = (y + rows.broadcast_mul(&ws)?)?;
    }
    Ok(y)
}
