//! The two backward ops of [`Combine`](super::Combine), one per gradient: [`CombineBwdOut`]
//! (d_out, a gather through row_slot, one writer per element) and [`CombineBwdW`] (d_w, dot
//! products as `LANES` strided partial sums added in lane order, the GPUs' order).

#[cfg(feature = "metal")]
use super::metal_inputs;
#[cfg(any(feature = "cuda", feature = "metal"))]
use super::params;
use super::{float_pair, layouts};
use crate::ops::backend::cpu::{u32_slice, Float, Rows};
use crate::ops::dispatch_common::{host_order, OrderDims, LANES, ROWS_PER_TASK};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};
use rayon::prelude::*;
#[cfg(feature = "metal")]
use {
    crate::ops::backend::metal::{buffer, output, Arg},
    crate::ops::dispatch_common::metal_dispatch as launch,
    candle_core::DType,
};

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

fn bwd_out_cpu<T: Float>(dy: &[T], rd: Rows, w: &[T], rw: Rows, row_slot: &[u32], n: usize, m: usize) -> Vec<T> {
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

fn bwd_w_cpu<T: Float>(out: &[T], ro: Rows, dy: &[T], rd: Rows, slot_row: &[u32], n: usize, m: usize) -> Vec<T> {
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
        use crate::ops::backend::expect_dtype;
        use crate::ops::dispatch_common::cuda_launch as launch;
        use candle_core::DType;
        let (d, n, op) = (self.dims, self.n, self.name());
        expect_dtype(op, "dy", s1.dtype(), DType::F32)?;
        expect_dtype(op, "weights", s2.dtype(), DType::F32)?;
        expect_dtype(op, "order", s3.dtype(), DType::U32)?;
        let (rd, rw, st) = layouts(op, d, (l1, d.t, usize::MAX), (l2, d.t, Some(d.m), usize::MAX), l3)?;
        let p = params(op, d, n, rd.cols, (0, rd.stride, rw.stride))?;
        let dev = s1.device();
        let dy = s1.as_cuda_slice::<f32>()?.slice(rd.offset..);
        let w = s2.as_cuda_slice::<f32>()?.slice(rw.offset..);
        let order = s3.as_cuda_slice::<u32>()?.slice(st..);
        let d_out = dev.alloc_zeros::<f32>(n * rd.cols)?;
        launch(dev, "combine_bwd_out_f32", p.n * p.c, &[&dy, &w, &order, &d_out, &p])?;
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
        let (d, n, op) = (self.dims, self.n, self.name());
        metal_inputs(op, [s1, s2, s3], ["dy", "weights"])?;
        let (rd, rw, st) = layouts(op, d, (l1, d.t, usize::MAX), (l2, d.t, Some(d.m), usize::MAX), l3)?;
        let p = params(op, d, n, rd.cols, (0, rd.stride, rw.stride))?;
        let (d_out, buf) = output(s1.device(), n * rd.cols, DType::F32, op)?;
        let args = [
            Arg::input(s1, rd.offset),
            Arg::input(s2, rw.offset),
            Arg::input(s3, st),
            Arg::Out(&buf, 0),
            Arg::value(&p),
        ];
        launch(s1.device(), "combine_bwd_out_f32", p.n * p.c, &args)?;
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
        use crate::ops::backend::expect_dtype;
        use crate::ops::dispatch_common::cuda_launch as launch;
        use candle_core::DType;
        let (d, n, op) = (self.dims, self.n, self.name());
        expect_dtype(op, "expert_out", s1.dtype(), DType::F32)?;
        expect_dtype(op, "dy", s2.dtype(), DType::F32)?;
        expect_dtype(op, "order", s3.dtype(), DType::U32)?;
        let (ro, rd, st) = layouts(op, d, (l1, n, usize::MAX), (l2, d.t, None, usize::MAX), l3)?;
        let p = params(op, d, n, ro.cols, (ro.stride, rd.stride, 0))?;
        let slots = crate::ops::backend::fits(d.t * d.m * LANES, "T m lanes", op)?;
        let dev = s1.device();
        let out = s1.as_cuda_slice::<f32>()?.slice(ro.offset..);
        let dy = s2.as_cuda_slice::<f32>()?.slice(rd.offset..);
        let order = s3.as_cuda_slice::<u32>()?.slice(st..);
        let part = dev.alloc_zeros::<f32>(slots as usize)?;
        let d_w = dev.alloc_zeros::<f32>(d.t * d.m)?;
        launch(dev, "combine_bwd_w_part_f32", slots, &[&out, &dy, &order, &part, &p])?;
        launch(dev, "combine_bwd_w_f32", p.t * p.m, &[&part, &d_w, &p])?;
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
        let (d, n, op) = (self.dims, self.n, self.name());
        metal_inputs(op, [s1, s2, s3], ["expert_out", "dy"])?;
        let (ro, rd, st) = layouts(op, d, (l1, n, usize::MAX), (l2, d.t, None, usize::MAX), l3)?;
        let p = params(op, d, n, ro.cols, (ro.stride, rd.stride, 0))?;
        let slots = crate::ops::backend::fits(d.t * d.m * LANES, "T m lanes", op)?;
        let part = buffer(s1.device(), slots as usize, DType::F32, op)?;
        let (d_w, buf) = output(s1.device(), d.t * d.m, DType::F32, op)?;
        let args = [
            Arg::input(s1, ro.offset),
            Arg::input(s2, rd.offset),
            Arg::input(s3, st),
            Arg::Out(&part, 0),
            Arg::value(&p),
        ];
        launch(s1.device(), "combine_bwd_w_part_f32", slots, &args)?;
        let args = [Arg::In(&part, 0), Arg::Out(&buf, 0), Arg::value(&p)];
        launch(s1.device(), "combine_bwd_w_f32", p.t * p.m, &args)?;
        Ok((d_w, Shape::from((d.t, d.m))))
    }
}
