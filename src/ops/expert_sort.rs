//! Expert sort: groups the (token, slot) pairs of a routing by expert, as a Candle custom op with
//! CPU, CUDA and Metal kernels. The plain twin is [`expert_sort_reference`], built on
//! [`plan`](super::dispatch_plan::plan); the op returns exactly its order.
//!
//! # Design
//!
//! [`ExpertSort`] (`CustomOp1`, no backward: indices carry no gradient): indices (T, m) u32 -> the
//! packed order tensor (E + 1 + 2 T m) u32 described in `ops::dispatch_common`:
//! offsets per expert, then the flat slot of each sorted row, then the sorted row of each slot.
//! Sorted order is slot-major (every first choice before any second choice, GShard priority),
//! tokens in order within a slot; with a capacity, an expert keeps only its first `cap` arrivals
//! and later slots are dropped (u32::MAX).
//!
//! It is a stable counting sort over the slot-major sequence i = s T + t, split into chunks:
//! 1. per-chunk histograms (chunk x expert),
//! 2. per expert, an exclusive scan over chunks in chunk order (the expert's arrivals before each
//!    chunk) and its total demand,
//! 3. offsets = scan over experts of min(demand, cap),
//! 4. per chunk, each element's arrival rank = chunk prefix + count so far: kept when rank < cap.
//!
//! Every output element has one writer and no step depends on thread timing, so the result is the
//! same on every backend and for any chunk size. The CPU runs 1, 2 and 4 in parallel over chunks
//! (rayon); the GPUs run one thread per (chunk, expert) for 1 and 4 (threads of a chunk read the same
//! index, a broadcast), one per expert for 2, and one thread for 3 (entry points
//! `expert_sort_{count,scan,offsets,rank,pad}_u32` in `kernels/moe_dispatch.{cu,metal}`). Chunks of
//! about sqrt(T m) balance the serial lengths of steps 1/4 and 2. Work is O(T m E) on the GPU
//! (each (chunk, expert) thread scans its chunk), which is small next to the experts for E <= 256.
//!
//! Out-of-range expert ids (>= E): an error on the CPU; on a GPU the slot is dropped (never a stray
//! write). Only the E + 1 offsets need to reach the host (`N = offsets[E]`, tokens per expert).

use super::backend::cpu::{u32_slice, Rows};
use super::backend::fits;
use super::dispatch_common::{OrderDims, NONE};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::atomic::{AtomicU32, Ordering};

/// indices (T, m) u32 -> order (E + 1 + 2 T m) u32 (see the module docs).
#[derive(Clone, Copy, Debug)]
pub struct ExpertSort {
    /// Number of experts E (>= 1).
    pub e: usize,
    /// Expert capacity in token-slots; 0 = unlimited (dropless).
    pub cap: usize,
}

impl ExpertSort {
    fn dims(&self, l: &Layout) -> Result<(OrderDims, Rows)> {
        let r = Rows::of(l, "indices", self.name())?;
        if self.e == 0 {
            candle_core::bail!("{}: need E >= 1", self.name());
        }
        let d = OrderDims { t: r.rows, m: r.cols, e: self.e };
        fits(d.len(), "E + 1 + 2 T m", self.name())?;
        fits(self.cap, "capacity", self.name())?;
        Ok((d, r))
    }

    #[cfg(any(feature = "cuda", feature = "metal"))]
    /// GPU chunk length: about sqrt(T m), at least 64.
    fn gpu_params(&self, d: OrderDims, r: Rows) -> Result<(super::dispatch_common::DispatchKernelArgs, u32)> {
        let n = d.t * d.m;
        let chunk = ((n as f64).sqrt().ceil() as usize).max(64);
        let n_chunks = n.div_ceil(chunk);
        let mut p = super::dispatch_common::DispatchKernelArgs::new(d, 0, 0, self.name())?;
        p.cap = self.cap as u32;
        p.chunk = chunk as u32;
        p.n_chunks = n_chunks as u32;
        p.w_stride = r.stride as u32;
        let hist_len = fits((n_chunks + 1) * d.e, "chunks x E", self.name())?;
        Ok((p, hist_len))
    }

    /// The CPU kernel: the same four steps as the GPU, parallel over chunks.
    fn cpu(&self, idx: &[u32], r: Rows, d: OrderDims) -> Result<Vec<u32>> {
        let (t, m, e) = (d.t, d.m, d.e);
        let n = t * m;
        let key = |i: usize| idx[r.offset + (i % t) * r.stride + i / t]; // slot-major i = s T + t
        let chunk = n.div_ceil(4 * rayon::current_num_threads()).max(4096);
        let n_chunks = n.div_ceil(chunk);
        // 1. Per-chunk histograms.
        let mut hist = vec![0u32; n_chunks * e];
        hist.par_chunks_mut(e).enumerate().try_for_each(|(c, h)| {
            for i in c * chunk..((c + 1) * chunk).min(n) {
                let k = key(i) as usize;
                if k >= e {
                    candle_core::bail!(
                        "expert-sort: expert {k} of token {}, slot {} is out of range (E = {e})",
                        i % t,
                        i / t
                    );
                }
                h[k] += 1;
            }
            Ok(())
        })?;
        // 2-3. Exclusive prefix over chunks per expert (in place), then offsets with the capacity.
        let mut out = vec![0u32; d.len()];
        let mut acc = 0u32;
        for ex in 0..e {
            let mut run = 0u32;
            for c in 0..n_chunks {
                let v = hist[c * e + ex];
                hist[c * e + ex] = run;
                run += v;
            }
            acc += if self.cap > 0 { run.min(self.cap as u32) } else { run };
            out[ex + 1] = acc;
        }
        // 4. Arrival ranks per chunk. Each row / slot has exactly one writer; the integer atomics
        //    only let chunks write disjoint positions from several threads (no ordering involved).
        let row_slot: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(NONE)).collect();
        let slot_row: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(NONE)).collect();
        let offsets = &out[..e + 1];
        hist.par_chunks_mut(e).enumerate().for_each(|(c, rank)| {
            for i in c * chunk..((c + 1) * chunk).min(n) {
                let k = key(i) as usize;
                let f = (i % t) * m + i / t; // flat slot t * m + s
                if self.cap == 0 || (rank[k] as usize) < self.cap {
                    let row = offsets[k] + rank[k];
                    row_slot[row as usize].store(f as u32, Ordering::Relaxed);
                    slot_row[f].store(row, Ordering::Relaxed);
                }
                rank[k] += 1;
            }
        });
        let (rs, sr) = out[e + 1..].split_at_mut(n);
        rs.par_iter_mut().zip(row_slot.par_iter()).for_each(|(o, a)| *o = a.load(Ordering::Relaxed));
        sr.par_iter_mut().zip(slot_row.par_iter()).for_each(|(o, a)| *o = a.load(Ordering::Relaxed));
        Ok(out)
    }
}

impl CustomOp1 for ExpertSort {
    fn name(&self) -> &'static str {
        "expert-sort"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (d, r) = self.dims(l)?;
        let idx = u32_slice(s, "indices", self.name())?;
        r.expect(d.t, d.m, idx.len(), "indices", self.name())?;
        Ok((CpuStorage::U32(self.cpu(idx, r, d)?), Shape::from(d.len())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::dispatch_common::cuda_launch as launch;
        use candle_core::backend::BackendStorage;
        let (d, r) = self.dims(l)?;
        super::backend::expect_dtype(self.name(), "indices", s.dtype(), candle_core::DType::U32)?;
        let (p, hist_len) = self.gpu_params(d, r)?;
        let dev = s.device();
        let idx = s.as_cuda_slice::<u32>()?.slice(r.offset..);
        let hist = dev.alloc_zeros::<u32>(hist_len as usize)?;
        let out = dev.alloc_zeros::<u32>(d.len())?;
        let (grid, n, e) = (p.n_chunks * p.e, p.t * p.m, p.e);
        launch(dev, "expert_sort_count_u32", grid, &[&idx, &hist, &p])?;
        launch(dev, "expert_sort_scan_u32", e, &[&hist, &p])?;
        launch(dev, "expert_sort_offsets_u32", 1, &[&hist, &out, &p])?;
        launch(dev, "expert_sort_rank_u32", grid, &[&idx, &hist, &out, &p])?;
        launch(dev, "expert_sort_pad_u32", n, &[&idx, &out, &p])?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from(d.len())))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(&self, s: &candle_core::MetalStorage, l: &Layout) -> Result<(candle_core::MetalStorage, Shape)> {
        use super::backend::metal::Arg;
        use super::dispatch_common::metal_dispatch as launch;
        use candle_core::backend::BackendStorage;
        use candle_core::DType;
        let (d, r) = self.dims(l)?;
        super::backend::expect_dtype(self.name(), "indices", s.dtype(), DType::U32)?;
        let (p, hist_len) = self.gpu_params(d, r)?;
        let dev = s.device();
        let hist = dev.allocate_zeros(hist_len as usize * 4)?;
        let out_buf = dev.allocate_zeros(d.len() * 4)?;
        let out = candle_core::MetalStorage::new(out_buf.clone(), dev.clone(), d.len(), DType::U32);
        let (idx, pa) = (Arg::input(s, r.offset), Arg::value(&p));
        let (h_in, h_out, o_out) = (Arg::In(&hist, 0), Arg::Out(&hist, 0), Arg::Out(&out_buf, 0));
        let (grid, n, e) = (p.n_chunks * p.e, p.t * p.m, p.e);
        launch(dev, "expert_sort_count_u32", grid, &[idx, h_out, pa])?;
        launch(dev, "expert_sort_scan_u32", e, &[h_out, pa])?;
        launch(dev, "expert_sort_offsets_u32", 1, &[h_in, o_out, pa])?;
        launch(dev, "expert_sort_rank_u32", grid, &[idx, h_in, o_out, pa])?;
        launch(dev, "expert_sort_pad_u32", n, &[idx, o_out, pa])?;
        Ok((out, Shape::from(d.len())))
    }
}

/// The result of [`expert_sort`]: the order tensor (on the device of the indices) and the host
/// copy of its E + 1 offsets.
#[derive(Clone, Debug)]
pub struct ExpertOrder {
    /// (E + 1 + 2 T m) u32, the packed layout of `ops::dispatch_common`.
    pub order: Tensor,
    /// (E + 1) host offsets: expert e owns sorted rows `offsets[e]..offsets[e + 1]`.
    pub offsets: Vec<u32>,
    pub dims: OrderDims,
}

impl ExpertOrder {
    /// Kept rows N.
    pub fn n(&self) -> usize {
        self.offsets[self.dims.e] as usize
    }

    /// Token-slots dropped by the capacity: T m - N.
    pub fn dropped(&self) -> usize {
        self.dims.t * self.dims.m - self.n()
    }

    /// Rows kept per expert.
    pub fn tokens_per_expert(&self) -> Vec<u32> {
        self.offsets.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// (N) u32: the flat slot t * m + s of each sorted row.
    pub fn row_slot(&self) -> Result<Tensor> {
        self.order.narrow(0, self.dims.row_slot(), self.n())
    }

    /// (T, m) u32: the sorted row of each slot, u32::MAX when dropped.
    pub fn slot_row(&self) -> Result<Tensor> {
        self.order.narrow(0, self.dims.slot_row(), self.dims.t * self.dims.m)?.reshape((self.dims.t, self.dims.m))
    }
}

/// Sorts the slots of `indices` (T, m) u32 by expert (E experts, capacity `cap`, 0 = unlimited) and
/// copies the E + 1 offsets to the host.
pub fn expert_sort(indices: &Tensor, e: usize, cap: usize) -> Result<ExpertOrder> {
    let (t, m) = indices.dims2()?;
    let order = indices.apply_op1_no_bwd(&ExpertSort { e, cap })?;
    let offsets = order.narrow(0, 0, e + 1)?.to_vec1::<u32>()?;
    Ok(ExpertOrder { order, offsets, dims: OrderDims { t, m, e } })
}

/// [`expert_sort`] that also brings back `flags` (k,) u32 (on the device of the indices) in the
/// same copy as the offsets: returns the order and the k flag values.
pub fn expert_sort_with_flags(
    indices: &Tensor,
    e: usize,
    cap: usize,
    flags: &Tensor,
) -> Result<(ExpertOrder, Vec<u32>)> {
    let (t, m) = indices.dims2()?;
    let order = indices.apply_op1_no_bwd(&ExpertSort { e, cap })?;
    let mut offsets = Tensor::cat(&[&order.narrow(0, 0, e + 1)?, &flags.flatten_all()?], 0)?.to_vec1::<u32>()?;
    let flags = offsets.split_off(e + 1);
    Ok((ExpertOrder { order, offsets, dims: OrderDims { t, m, e } }, flags))
}

/// The reference: the same packed order built on the host from [`plan`](super::dispatch_plan::plan).
pub fn expert_sort_reference(indices: &[u32], t: usize, m: usize, e: usize, cap: usize) -> Vec<u32> {
    let p = super::dispatch_plan::plan(indices, t, m, e, cap);
    let d = OrderDims { t, m, e };
    let mut out = vec![NONE; d.len()];
    out[0] = 0;
    let mut row = 0usize;
    for (ex, slots) in p.slots.iter().enumerate() {
        for &f in slots {
            out[d.row_slot() + row] = f;
            out[d.slot_row() + f as usize] = row as u32;
            row += 1;
        }
        out[ex + 1] = row as u32;
    }
    out
}
