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
//!     f = row_slot[r] = t m + s (every kept row belongs to exactly one slot: a gather, one writer
//!     per element);
//!   - [`CombineBwdW`] (out (N, C), dy (T, C), order) -> d_w (T, m): `d_w[t, s] = <out[row], dy[t]>`
//!     (0 when dropped), summed as 32 column-strided partial sums (`LANES`: coalesced GPU reads)
//!     added in lane order; on the GPU a partial kernel then a reduction kernel, on the CPU the same
//!     arithmetic in the same order.
//!   Each is computed only when its input takes part in the graph.
//!
//! GPU entry points: `combine_f32`, `combine_bwd_out_f32`, `combine_bwd_w_part_f32`,
//! `combine_bwd_w_f32` (kernels/moe_dispatch.{cu,metal}, bodies in moe_dispatch.cuh). CPU: rayon over
//! output rows, f32 and f64. Float inputs may have strided rows; the order must be contiguous.

use super::dispatch_common::{host_order, u32_slice, OrderDims, Real, Rows, LANES, ROWS_PER_TASK};
use super::expert_sort::ExpertOrder;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// (out (N, C), w (T, m), order) -> y (T, C).
#[derive(Clone, Copy, Debug)]
pub struct Combine {
    pub dims: OrderDims,
    /// Kept rows N = offsets[E].
    pub n: usize,
}

/// (dy (T, C), w (T, m), order) -> d_out (N, C).
#[derive(Clone, Copy, Debug)]
pub struct CombineBwdOut {
    pub dims: OrderDims,
    pub n: usize,
}

/// (out (N, C), dy (T, C), order) -> d_w (T, m).
#[derive(Clone, Copy, Debug)]
pub struct CombineBwdW {
    pub dims: OrderDims,
    pub n: usize,
}

/// The checked layouts of two float inputs, shapes (rows_a, C) and (rows_b, cols_b), plus the order's start.
fn layouts(
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

#[cfg(any(feature = "cuda", feature = "metal"))]
fn params(
    op: &str,
    d: OrderDims,
    n: usize,
    c: usize,
    (a, b, w): (usize, usize, usize),
) -> Result<super::dispatch_common::MdParams> {
    let mut p = super::dispatch_common::MdParams::new(d, n, c, op)?;
    p.a_stride = a as u32;
    p.b_stride = b as u32;
    p.w_stride = w as u32;
    Ok(p)
}

// ---------------------------------------------------------------------------------------------
// CPU kernels.

fn combine_cpu<T: Real>(out: &[T], ro: Rows, w: &[T], rw: Rows, slot_row: &[u32], n: usize, m: usize) -> Vec<T> {
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

fn bwd_out_cpu<T: Real>(dy: &[T], rd: Rows, w: &[T], rw: Rows, row_slot: &[u32], n: usize, m: usize) -> Vec<T> {
    let c = rd.cols;
    let mut d_out = vec![T::ZERO; n * c];
    d_out.par_chunks_mut(c.max(1)).with_min_len(ROWS_PER_TASK).enumerate().for_each(|(r, o)| {
        let f = row_slot[r] as usize;
        let (t, s) = (f / m, f % m);
        if t < rw.rows {
            let ws = rw.row(w, t)[s];
            for (a, &b) in o.iter_mut().zip(rd.row(dy, t)) {
                *a = ws * b;
            }
        }
    });
    d_out
}

fn bwd_w_cpu<T: Real>(out: &[T], ro: Rows, dy: &[T], rd: Rows, slot_row: &[u32], n: usize, m: usize) -> Vec<T> {
    let mut dw = vec![T::ZERO; rd.rows * m];
    dw.par_chunks_mut(m.max(1)).with_min_len(ROWS_PER_TASK).enumerate().for_each(|(t, o)| {
        let dyr = rd.row(dy, t);
        for (s, &r) in slot_row[t * m..(t + 1) * m].iter().enumerate() {
            if (r as usize) < n {
                // The GPU's order: lane l sums columns l, l + LANES, ...; then lanes in order.
                let mut part = [T::ZERO; LANES];
                for (i, (&a, &b)) in ro.row(out, r as usize).iter().zip(dyr).enumerate() {
                    part[i % LANES] = part[i % LANES] + a * b;
                }
                o[s] = part.iter().fold(T::ZERO, |acc, &v| acc + v);
            }
        }
    });
    dw
}

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
        use super::dispatch_common::cuda::{launch, want};
        use candle_core::DType;
        let (d, n, op) = (self.dims, self.n, self.name());
        want(s1, DType::F32, "expert_out", op)?;
        want(s2, DType::F32, "weights", op)?;
        want(s3, DType::U32, "order", op)?;
        let (ro, rw, st) = layouts(op, d, (l1, n, usize::MAX), (l2, d.t, Some(d.m), usize::MAX), l3)?;
        let p = params(op, d, n, ro.cols, (ro.stride, 0, rw.stride))?;
        let dev = s1.device();
        let out = s1.as_cuda_slice::<f32>()?.slice(ro.offset..);
        let w = s2.as_cuda_slice::<f32>()?.slice(rw.offset..);
        let order = s3.as_cuda_slice::<u32>()?.slice(st..);
        let y = dev.alloc_zeros::<f32>(d.t * ro.cols)?;
        launch!(dev, "combine_f32", p.t * p.c, &out, &w, &order, &y, &p);
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
        use super::dispatch_common::metal::{f32_u32, launch, output};
        let (d, n, op) = (self.dims, self.n, self.name());
        f32_u32(&[s1, s2], &[s3], op)?;
        let (ro, rw, st) = layouts(op, d, (l1, n, usize::MAX), (l2, d.t, Some(d.m), usize::MAX), l3)?;
        let p = params(op, d, n, ro.cols, (ro.stride, 0, rw.stride))?;
        let (y, buf) = output(s1, d.t * ro.cols)?;
        let args = [
            (s1.buffer(), ro.offset * 4, false),
            (s2.buffer(), rw.offset * 4, false),
            (s3.buffer(), st * 4, false),
            (&*buf, 0, true),
        ];
        launch(s1.device(), "combine_f32", &args, p, p.t * p.c)?;
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
// Op: CombineBwdOut.

impl CustomOp3 for CombineBwdOut {
    fn name(&self) -> &'static str {
        "combine-bwd-out"
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
        let d_out = float_pair!(op, s1, s2, |dy, w| {
            let (rd, rw, st) = layouts(op, d, (l1, d.t, dy.len()), (l2, d.t, Some(d.m), w.len()), l3)?;
            c = rd.cols;
            bwd_out_cpu(dy, rd, w, rw, host_order(order, st, d).0, n, d.m)
        });
        Ok((d_out, Shape::from((n, c))))
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
        use super::dispatch_common::cuda::{launch, want};
        use candle_core::DType;
        let (d, n, op) = (self.dims, self.n, self.name());
        want(s1, DType::F32, "dy", op)?;
        want(s2, DType::F32, "weights", op)?;
        want(s3, DType::U32, "order", op)?;
        let (rd, rw, st) = layouts(op, d, (l1, d.t, usize::MAX), (l2, d.t, Some(d.m), usize::MAX), l3)?;
        let p = params(op, d, n, rd.cols, (0, rd.stride, rw.stride))?;
        let dev = s1.device();
        let dy = s1.as_cuda_slice::<f32>()?.slice(rd.offset..);
        let w = s2.as_cuda_slice::<f32>()?.slice(rw.offset..);
        let order = s3.as_cuda_slice::<u32>()?.slice(st..);
        let d_out = dev.alloc_zeros::<f32>(n * rd.cols)?;
        launch!(dev, "combine_bwd_out_f32", p.n * p.c, &dy, &w, &order, &d_out, &p);
        Ok((candle_core::CudaStorage::wrap_cuda_slice(d_out, dev.clone()), Shape::from((n, rd.cols))))
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
        use super::dispatch_common::metal::{f32_u32, launch, output};
        let (d, n, op) = (self.dims, self.n, self.name());
        f32_u32(&[s1, s2], &[s3], op)?;
        let (rd, rw, st) = layouts(op, d, (l1, d.t, usize::MAX), (l2, d.t, Some(d.m), usize::MAX), l3)?;
        let p = params(op, d, n, rd.cols, (0, rd.stride, rw.stride))?;
        let (d_out, buf) = output(s1, n * rd.cols)?;
        let args = [
            (s1.buffer(), rd.offset * 4, false),
            (s2.buffer(), rw.offset * 4, false),
            (s3.buffer(), st * 4, false),
            (&*buf, 0, true),
        ];
        launch(s1.device(), "combine_bwd_out_f32", &args, p, p.n * p.c)?;
        Ok((d_out, Shape::from((n, rd.cols))))
    }
}

// ---------------------------------------------------------------------------------------------
// Op: CombineBwdW.

impl CustomOp3 for CombineBwdW {
    fn name(&self) -> &'static str {
        "combine-bwd-w"
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
        let d_w = float_pair!(op, s1, s2, |out, dy| {
            let (ro, rd, st) = layouts(op, d, (l1, n, out.len()), (l2, d.t, None, dy.len()), l3)?;
            bwd_w_cpu(out, ro, dy, rd, host_order(order, st, d).1, n, d.m)
        });
        Ok((d_w, Shape::from((d.t, d.m))))
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
        use super::dispatch_common::cuda::{launch, want};
        use candle_core::DType;
        let (d, n, op) = (self.dims, self.n, self.name());
        want(s1, DType::F32, "expert_out", op)?;
        want(s2, DType::F32, "dy", op)?;
        want(s3, DType::U32, "order", op)?;
        let (ro, rd, st) = layouts(op, d, (l1, n, usize::MAX), (l2, d.t, None, usize::MAX), l3)?;
        let p = params(op, d, n, ro.cols, (ro.stride, rd.stride, 0))?;
        let slots = super::dispatch_common::fits(d.t * d.m * LANES, "T m lanes", op)?;
        let dev = s1.device();
        let out = s1.as_cuda_slice::<f32>()?.slice(ro.offset..);
        let dy = s2.as_cuda_slice::<f32>()?.slice(rd.offset..);
        let order = s3.as_cuda_slice::<u32>()?.slice(st..);
        let part = dev.alloc_zeros::<f32>(slots as usize)?;
        let d_w = dev.alloc_zeros::<f32>(d.t * d.m)?;
        launch!(dev, "combine_bwd_w_part_f32", slots, &out, &dy, &order, &part, &p);
        launch!(dev, "combine_bwd_w_f32", p.t * p.m, &part, &d_w, &p);
        Ok((candle_core::CudaStorage::wrap_cuda_slice(d_w, dev.clone()), Shape::from((d.t, d.m))))
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
        use super::dispatch_common::metal::{f32_u32, launch, output};
        let (d, n, op) = (self.dims, self.n, self.name());
        f32_u32(&[s1, s2], &[s3], op)?;
        let (ro, rd, st) = layouts(op, d, (l1, n, usize::MAX), (l2, d.t, None, usize::MAX), l3)?;
        let p = params(op, d, n, ro.cols, (ro.stride, rd.stride, 0))?;
        let slots = super::dispatch_common::fits(d.t * d.m * LANES, "T m lanes", op)?;
        let (_, part) = output(s1, slots as usize)?;
        let (d_w, buf) = output(s1, d.t * d.m)?;
        let args = [
            (s1.buffer(), ro.offset * 4, false),
            (s2.buffer(), rd.offset * 4, false),
            (s3.buffer(), st * 4, false),
            (&*part, 0, true),
        ];
        launch(s1.device(), "combine_bwd_w_part_f32", &args, p, slots)?;
        launch(s1.device(), "combine_bwd_w_f32", &[(&*part, 0, false), (&*buf, 0, true)], p, p.t * p.m)?;
        Ok((d_w, Shape::from((d.t, d.m))))
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
