//! The two factors of the Switch load-balance loss as one Candle custom op, with CPU, CUDA and
//! Metal kernels.
//!
//! The plain-tensor twin is [`balance_stats_reference`] (built from `moe::losses::expert_fractions`
//! and `nn::ops::softmax(logits).mean(0)`); the loss E * sum_i f_i * P_i on top of it is
//! `moe::losses::load_balance_fused` (twin: `moe::losses::load_balance`).
//!
//! # Design
//!
//! 1. [`BalanceStats`] (`CustomOp2`: logits (T, E), indices (T, m) u32) -> (2, E). Row 0 is
//!    f_i = count_i / (T * m), the share of routed slots that went to expert i (a count: no
//!    gradient). Row 1 is P_i = mean over t of softmax(logits_t)_i. The op never materializes the
//!    (T, E) softmax.
//! 2. [`BalanceStatsBwd`] (`CustomOp2`: logits (T, E), grad (2, E)) -> dlogits (T, E), the backward
//!    of 1 as a kernel of its own: with p_t = softmax(logits_t) recomputed and g = grad row 1 (dL/dP),
//!    dlogits_t = p_t * (g - <p_t, g>) / T. Grad row 0 (dL/df) is ignored: f is a count.
//!
//! Determinism: no float atomics anywhere. P is a sum over T, done in two fixed-order levels: the
//! rows are cut into C chunks of [`chunk_rows`]`(T)` = max(32, ceil(sqrt(T))) rows (a function of T
//! only); each chunk sums its rows in row order (one GPU thread per (chunk, expert), one rayon task
//! per chunk on the CPU), then the C partial sums are added in chunk order. The CPU op follows the
//! same order as the kernels, so CPU and GPU differ only by the `exp`/division rounding of each
//! term, and each backend gives the same bits on every run whatever its thread count. Counts are
//! integers (exact in any order); the GPU still counts them without atomics (each (chunk, expert)
//! thread scans its chunk's index rows).
//!
//! GPU forward = three launches: `balance_stats_rows_f32` (per-row max and softmax denominator,
//! (T, 2)), `balance_stats_partial_f32` ((C, E) partial P sums and (C, E + 1) partial counts, the
//! last column counting out-of-range indices), `balance_stats_finish_f32` (per expert: sums the
//! chunks, scales). Backward = one launch, `balance_stats_bwd_f32`, one thread per row.
//!
//! Precision: f32 on every backend; the CPU also runs f64 (finite-difference gradient checks).
//! Sums are kept in the input precision (as candle's reference does). f is computed as the f64
//! quotient count / (T * m) rounded to the dtype, bit-identical to the reference; the f32 kernels
//! give the same bits while T * m < 2^24. E has no upper limit (no per-thread arrays); E >= 1,
//! T >= 1. Bad indices (>= E): the CPU op fails naming the token, slot and index; the GPU kernels
//! return a NaN f row instead (they cannot raise).
//!
//! Kernels: `kernels/balance_stats.cuh` holds the per-thread bodies once (`bs_row_stats`,
//! `bs_partial_cell`, `bs_finish_col`, `bs_bwd_row`); `kernels/balance_stats.cu` (PTX, built by
//! `build.rs` under feature `cuda`) and `kernels/balance_stats.metal` (compiled at run time, library
//! and pipelines cached per device) are thin entry points `<op>_f32`.

use super::cpu_layout::Rows;
use crate::moe::losses::expert_fractions;
use crate::nn::ops::softmax;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::ops::{Add, Div, Mul, Sub};

/// Rows per rayon task of the backward.
const ROWS_PER_TASK: usize = 256;

/// Rows per chunk of the two-level P reduction: max(32, ceil(sqrt(T))), so both levels (rows within
/// a chunk, then chunks) are about sqrt(T) long. A function of T only, so the summation order, and
/// with it the result, does not depend on the device or the thread count.
pub fn chunk_rows(t: usize) -> usize {
    let mut c = (t as f64).sqrt() as usize;
    while c * c < t {
        c += 1;
    }
    c.max(32)
}

/// The scalar arguments of every kernel entry point: the `#[repr(C)]` twin of `BsParams` in
/// `kernels/balance_stats.cuh` (12 four-byte fields).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct BsParams {
    pub rows: u32,
    pub e: u32,
    pub m: u32,
    pub chunk: u32,
    pub n_chunks: u32,
    pub logits_stride: u32,
    pub idx_stride: u32,
    pub slots: u32,
    pub inv_rows: f32,
    pub pad: [u32; 3],
}

impl BsParams {
    /// The kernel arguments for T rows of width E with m index slots each; every count the kernels
    /// index with must fit in u32.
    fn new(t: usize, e: usize, m: usize, logits_stride: usize, idx_stride: usize) -> Result<Self> {
        let chunk = chunk_rows(t);
        let n_chunks = t.div_ceil(chunk);
        let fits = |v: usize, what: &str| -> Result<u32> {
            u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("balance-stats: {what} = {v} exceeds u32")))
        };
        fits(n_chunks * (e + 1), "chunks * (E + 1)")?;
        fits(t.saturating_mul(logits_stride.max(e)), "T * logits row stride")?;
        fits(t.saturating_mul(idx_stride.max(m)), "T * index row stride")?;
        Ok(Self {
            rows: fits(t, "T")?,
            e: fits(e, "E")?,
            m: fits(m, "m")?,
            chunk: chunk as u32,
            n_chunks: n_chunks as u32,
            logits_stride: logits_stride as u32,
            idx_stride: idx_stride as u32,
            slots: fits(t * m, "T * m")?,
            inv_rows: (1.0 / t as f64) as f32,
            pad: [0; 3],
        })
    }
}

/// The float types the CPU kernels run in.
trait Real:
    Copy
    + PartialOrd
    + Send
    + Sync
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
{
    const ZERO: Self;
    fn from_f64(v: f64) -> Self;
    fn exp(self) -> Self;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    fn from_f64(v: f64) -> Self {
        v
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
}

// ---------------------------------------------------------------------------------------------
// CPU kernels: the Rust twins of bs_row_stats + bs_partial_cell (per chunk), bs_finish_col and
// bs_bwd_row, summing in the same order.

/// Writes exp(l - max) of one row into `ex` and returns their sum (j order).
#[inline]
fn row_exp<T: Real>(lg: &[T], ex: &mut [T]) -> T {
    let mut mx = lg[0];
    for &v in &lg[1..] {
        if v > mx {
            mx = v;
        }
    }
    let mut sum = T::ZERO;
    for (o, &v) in ex.iter_mut().zip(lg) {
        *o = (v - mx).exp();
        sum = sum + *o;
    }
    sum
}

/// Chunk c: the sums over its rows (in row order) of p_tj into `acc` (E), and the counts of each
/// expert among the rows' indices into `counts` (E). Err((token, slot, index)) on an index >= E.
fn partial_chunk<T: Real>(
    (lg, rl): (&[T], Rows),
    (idx, ri): (&[u32], Rows),
    rows: std::ops::Range<usize>,
    acc: &mut [T],
    counts: &mut [u64],
) -> std::result::Result<(), (usize, usize, u32)> {
    let mut ex = vec![T::ZERO; rl.cols]; // one scratch row per chunk, not per element
    for t in rows {
        let sum = row_exp(rl.row(lg, t), &mut ex);
        for (a, &v) in acc.iter_mut().zip(&ex) {
            *a = *a + v / sum;
        }
        for (s, &i) in ri.row(idx, t).iter().enumerate() {
            let Some(c) = counts.get_mut(i as usize) else { return Err((t, s, i)) };
            *c += 1;
        }
    }
    Ok(())
}

/// out (2, E): row 0 = f, row 1 = P.
fn forward_cpu<T: Real>(lg: &[T], rl: Rows, idx: &[u32], ri: Rows) -> Result<Vec<T>> {
    let (t, e, m) = (rl.rows, rl.cols, ri.cols);
    let chunk = chunk_rows(t);
    let parts = (0..t.div_ceil(chunk))
        .into_par_iter()
        .map(|c| {
            let (mut acc, mut counts) = (vec![T::ZERO; e], vec![0u64; e]);
            partial_chunk((lg, rl), (idx, ri), c * chunk..((c + 1) * chunk).min(t), &mut acc, &mut counts).map_err(
                |(tok, s, i)| {
                    candle_core::Error::Msg(format!(
                        "balance-stats: expert index {i} of token {tok} (slot {s}) is out of range (E = {e})"
                    ))
                },
            )?;
            Ok((acc, counts))
        })
        .collect::<Result<Vec<_>>>()?; // in chunk order
    let mut out = vec![T::ZERO; 2 * e];
    let mut counts = vec![0u64; e];
    for (acc, cn) in &parts {
        for j in 0..e {
            out[e + j] = out[e + j] + acc[j];
            counts[j] += cn[j];
        }
    }
    // The same rounding steps as the reference: f in f64 then cast, P = sum * (1/T) (candle's mean).
    let inv_rows = T::from_f64(1.0 / t as f64);
    for j in 0..e {
        out[j] = if t * m == 0 { T::ZERO } else { T::from_f64(counts[j] as f64 / (t * m) as f64) };
        out[e + j] = out[e + j] * inv_rows;
    }
    Ok(out)
}

/// One row of the backward: dl = p * (g - <p, g>) / T.
#[inline]
fn bwd_row<T: Real>(lg: &[T], g: &[T], dl: &mut [T], inv_rows: T) {
    let sum = row_exp(lg, dl);
    let mut dot = T::ZERO;
    for (q, &gj) in dl.iter_mut().zip(g) {
        *q = *q / sum;
        dot = dot + *q * gj;
    }
    for (q, &gj) in dl.iter_mut().zip(g) {
        *q = *q * (gj - dot) * inv_rows;
    }
}

fn backward_cpu<T: Real>(lg: &[T], rl: Rows, g: &[T]) -> Vec<T> {
    let (t, e) = (rl.rows, rl.cols);
    let inv_rows = T::from_f64(1.0 / t as f64);
    let mut dl = vec![T::ZERO; t * e];
    dl.par_chunks_mut(e)
        .with_min_len(ROWS_PER_TASK)
        .enumerate()
        .for_each(|(r, o)| bwd_row(rl.row(lg, r), g, o, inv_rows));
    dl
}

// ---------------------------------------------------------------------------------------------
// The forward op.

/// (logits (T, E), indices (T, m) u32) -> (2, E): row 0 = f, row 1 = P. See the module docs.
#[derive(Clone, Copy, Debug, Default)]
pub struct BalanceStats;

impl BalanceStats {
    fn rows(&self, l1: &Layout, l2: &Layout) -> Result<(Rows, Rows, BsParams)> {
        let rl = Rows::of(l1, "logits", self.name())?;
        let ri = Rows::of(l2, "indices", self.name())?;
        if rl.rows == 0 || rl.cols == 0 {
            candle_core::bail!("{}: logits {:?} must have T >= 1 rows and E >= 1 columns", self.name(), l1.shape());
        }
        if ri.rows != rl.rows {
            candle_core::bail!(
                "{}: indices {:?} must have one row per token (T = {})",
                self.name(),
                l2.shape(),
                rl.rows
            );
        }
        let bp = BsParams::new(rl.rows, rl.cols, ri.cols, rl.stride, ri.stride)?;
        Ok((rl, ri, bp))
    }
}

impl CustomOp2 for BalanceStats {
    fn name(&self) -> &'static str {
        "balance-stats"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rl, ri, _) = self.rows(l1, l2)?;
        let CpuStorage::U32(idx) = s2 else {
            candle_core::bail!("{}: indices must be u32, got {:?}", self.name(), s2.dtype())
        };
        ri.check_len(idx.len(), "indices", self.name())?;
        let out = match s1 {
            CpuStorage::F32(v) => {
                rl.check_len(v.len(), "logits", self.name())?;
                CpuStorage::F32(forward_cpu(v, rl, idx, ri)?)
            }
            CpuStorage::F64(v) => {
                rl.check_len(v.len(), "logits", self.name())?;
                CpuStorage::F64(forward_cpu(v, rl, idx, ri)?)
            }
            other => candle_core::bail!("{}: logits must be f32 or f64, got {:?}", self.name(), other.dtype()),
        };
        Ok((out, Shape::from((2, rl.cols))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rl, ri, bp) = self.rows(l1, l2)?;
        let out = cuda::forward((s1, rl.offset), (s2, ri.offset), bp)?;
        Ok((out, Shape::from((2, rl.cols))))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        let (rl, ri, bp) = self.rows(l1, l2)?;
        let out = metal::forward((s1, rl.offset), (s2, ri.offset), bp)?;
        Ok((out, Shape::from((2, rl.cols))))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        _indices: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dl = logits.apply_op2_no_bwd(&grad_res.contiguous()?, &BalanceStatsBwd)?;
        Ok((Some(dl), None))
    }
}

// ---------------------------------------------------------------------------------------------
// The backward op.

/// (logits (T, E), grad (2, E)) -> dlogits (T, E) = p_t * (grad[1] - <p_t, grad[1]>) / T: the
/// backward of [`BalanceStats`] (grad row 0, the gradient of the count row, is ignored).
#[derive(Clone, Copy, Debug, Default)]
pub struct BalanceStatsBwd;

impl BalanceStatsBwd {
    /// The logits rows, the element offset of grad row 1, and the kernel arguments.
    fn rows(&self, l1: &Layout, l2: &Layout) -> Result<(Rows, usize, BsParams)> {
        let rl = Rows::of(l1, "logits", self.name())?;
        let rg = Rows::of(l2, "grad", self.name())?;
        if rl.rows == 0 || rl.cols == 0 || rg.rows != 2 || rg.cols != rl.cols {
            candle_core::bail!(
                "{}: logits {:?} must be (T >= 1, E >= 1) and grad {:?} (2, E)",
                self.name(),
                l1.shape(),
                l2.shape()
            );
        }
        let bp = BsParams::new(rl.rows, rl.cols, 0, rl.stride, 0)?;
        Ok((rl, rg.offset + rg.stride, bp))
    }
}

impl CustomOp2 for BalanceStatsBwd {
    fn name(&self) -> &'static str {
        "balance-stats-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rl, g_off, _) = self.rows(l1, l2)?;
        let e = rl.cols;
        let out = match (s1, s2) {
            (CpuStorage::F32(lg), CpuStorage::F32(g)) if g.len() >= g_off + e => {
                rl.check_len(lg.len(), "logits", self.name())?;
                CpuStorage::F32(backward_cpu(lg, rl, &g[g_off..g_off + e]))
            }
            (CpuStorage::F64(lg), CpuStorage::F64(g)) if g.len() >= g_off + e => {
                rl.check_len(lg.len(), "logits", self.name())?;
                CpuStorage::F64(backward_cpu(lg, rl, &g[g_off..g_off + e]))
            }
            (a, b) => candle_core::bail!(
                "{}: logits and grad must both be f32 or both f64 (and grad hold 2 rows), got {:?} and {:?}",
                self.name(),
                a.dtype(),
                b.dtype()
            ),
        };
        Ok((out, Shape::from((rl.rows, e))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rl, g_off, bp) = self.rows(l1, l2)?;
        let out = cuda::backward((s1, rl.offset), (s2, g_off), bp)?;
        Ok((out, Shape::from((rl.rows, rl.cols))))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        let (rl, g_off, bp) = self.rows(l1, l2)?;
        let out = metal::backward((s1, rl.offset), (s2, g_off), bp)?;
        Ok((out, Shape::from((rl.rows, rl.cols))))
    }
}

// ---------------------------------------------------------------------------------------------
// The public entry points.

/// (logits (T, E) float, indices (T, m) u32) -> (2, E): row 0 = f (no gradient), row 1 = P
/// (differentiable in the logits).
///
/// # Errors
/// Shapes that do not match, a dtype other than f32/f64 (f32 only on a GPU), and, on the CPU, an
/// index >= E (the message names it).
///
/// ```
/// use candle_core::{Device, Tensor};
/// let logits = Tensor::new(&[[0f32, 0.0], [0.0, 0.0]], &Device::Cpu)?;
/// let indices = Tensor::new(&[[1u32], [1]], &Device::Cpu)?;
/// let s = gumbel_moe::ops::balance_stats(&logits, &indices)?;
/// assert_eq!(s.to_vec2::<f32>()?, [[0.0, 1.0], [0.5, 0.5]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn balance_stats(logits: &Tensor, indices: &Tensor) -> Result<Tensor> {
    logits.apply_op2(indices, BalanceStats)
}

/// The plain-tensor twin of [`balance_stats`]: f from the indices on the host
/// (`moe::losses::expert_fractions`), P = softmax(logits).mean(0).
pub fn balance_stats_reference(logits: &Tensor, indices: &Tensor) -> Result<Tensor> {
    let e = logits.dim(1)?;
    let host = indices.flatten_all()?.to_vec1::<u32>()?;
    if let Some(&i) = host.iter().find(|&&i| i as usize >= e) {
        candle_core::bail!("balance_stats_reference: expert index {i} is out of range (E = {e})");
    }
    let f = Tensor::from_vec(expert_fractions(&host, e), e, logits.device())?.to_dtype(logits.dtype())?; // (E)
    let p = softmax(logits)?.mean(0)?; // (E)
    Tensor::stack(&[f, p], 0) // (2, E)
}

// ---------------------------------------------------------------------------------------------
// CUDA launch glue.

#[cfg(feature = "cuda")]
mod cuda {
    use super::BsParams;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, DType, Result};

    /// PTX of kernels/balance_stats.cu, compiled by build.rs.
    pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/balance_stats.ptx"));
    const MODULE: &str = "gumbel_moe_balance_stats";
    const BLOCK: u32 = 128;

    // SAFETY: #[repr(C)] plain old data, laid out as the C struct BsParams the kernels take by value.
    unsafe impl DeviceRepr for BsParams {}

    fn cfg(threads: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: ((threads as u32).div_ceil(BLOCK), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn check(s: &CudaStorage, want: DType, what: &str) -> Result<()> {
        if s.dtype() != want {
            candle_core::bail!("balance-stats on CUDA: {what} must be {want:?}, got {:?}", s.dtype());
        }
        Ok(())
    }

    /// (logits, element offset), (indices, element offset) -> (2, E) f32.
    pub fn forward(
        (s1, o1): (&CudaStorage, usize),
        (s2, o2): (&CudaStorage, usize),
        bp: BsParams,
    ) -> Result<CudaStorage> {
        check(s1, DType::F32, "logits")?;
        check(s2, DType::U32, "indices")?;
        let dev = s1.device();
        let (t, e, c) = (bp.rows as usize, bp.e as usize, bp.n_chunks as usize);
        let lg = s1.as_cuda_slice::<f32>()?.slice(o1..);
        let idx = s2.as_cuda_slice::<u32>()?.slice(o2..);
        // SAFETY (all four): every element is written by the kernels below before it is read.
        let stats = unsafe { dev.alloc::<f32>(t * 2)? };
        let part_p = unsafe { dev.alloc::<f32>(c * e)? };
        let part_n = unsafe { dev.alloc::<u32>(c * (e + 1))? };
        let out = unsafe { dev.alloc::<f32>(2 * e)? };

        let func = dev.get_or_load_custom_func("balance_stats_rows_f32", MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&lg);
        b.arg(&stats);
        b.arg(&bp);
        // SAFETY: reads T rows of the checked logits layout, writes T * 2 floats.
        unsafe { b.launch(cfg(t)) }.w()?;

        let func = dev.get_or_load_custom_func("balance_stats_partial_f32", MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&lg);
        b.arg(&stats);
        b.arg(&idx);
        b.arg(&part_p);
        b.arg(&part_n);
        b.arg(&bp);
        // SAFETY: reads within the checked layouts and `stats`, writes C * E and C * (E + 1) values.
        unsafe { b.launch(cfg(c * e)) }.w()?;

        let func = dev.get_or_load_custom_func("balance_stats_finish_f32", MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&part_p);
        b.arg(&part_n);
        b.arg(&out);
        b.arg(&bp);
        // SAFETY: reads the partial buffers, writes 2 * E floats.
        unsafe { b.launch(cfg(e)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }

    /// (logits, element offset), (grad, element offset of its row 1) -> dlogits (T, E) f32.
    pub fn backward(
        (s1, o1): (&CudaStorage, usize),
        (s2, o2): (&CudaStorage, usize),
        bp: BsParams,
    ) -> Result<CudaStorage> {
        check(s1, DType::F32, "logits")?;
        check(s2, DType::F32, "grad")?;
        let dev = s1.device();
        let (t, e) = (bp.rows as usize, bp.e as usize);
        let lg = s1.as_cuda_slice::<f32>()?.slice(o1..);
        let g = s2.as_cuda_slice::<f32>()?.slice(o2..o2 + e);
        // SAFETY: every element is written by the kernel (one thread per row writes its E values).
        let dl = unsafe { dev.alloc::<f32>(t * e)? };
        let func = dev.get_or_load_custom_func("balance_stats_bwd_f32", MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&lg);
        b.arg(&g);
        b.arg(&dl);
        b.arg(&bp);
        // SAFETY: reads T checked logits rows and E grad values, writes T * E floats.
        unsafe { b.launch(cfg(t)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dl, dev.clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// Metal launch glue: the library is compiled from source once per device and its pipelines cached
// (ops::metal_glue); the forward encodes its three dispatches with their intermediate buffers.

#[cfg(feature = "metal")]
mod metal {
    use super::BsParams;
    use crate::ops::metal_glue::{inline_source, pipeline};
    use candle_core::backend::BackendStorage;
    use candle_core::{DType, MetalDevice, MetalStorage, Result};
    use candle_metal_kernels::metal::{Buffer, ComputeCommandEncoder};
    use objc2_metal::MTLSize;

    const CUH: &str = include_str!("../../kernels/balance_stats.cuh");
    const METAL: &str = include_str!("../../kernels/balance_stats.metal");

    /// The .metal file with its `#include "balance_stats.cuh"` replaced by the header's text.
    fn source() -> String {
        inline_source(METAL, &[("balance_stats.cuh", CUH)])
    }

    /// Encodes `name` over `threads` threads: buffers `args` (buffer, byte offset, written?) at
    /// indices 0.., then the params. Reads after writes of the same buffer get a barrier from the
    /// encoder's hazard tracking (set_input_buffer / set_output_buffer).
    fn dispatch(
        dev: &MetalDevice,
        name: &'static str,
        args: &[(&Buffer, usize, bool)],
        bp: &BsParams,
        threads: usize,
    ) -> Result<()> {
        if threads == 0 {
            return Ok(());
        }
        let pipe = pipeline(dev, "balance_stats", source, name)?;
        let guard = dev.command_encoder()?;
        let enc: &ComputeCommandEncoder = guard.as_ref();
        enc.set_compute_pipeline_state(&pipe);
        for (i, &(buf, off, written)) in args.iter().enumerate() {
            if written {
                enc.set_output_buffer(i, Some(buf), off);
            } else {
                enc.set_input_buffer(i, Some(buf), off);
            }
        }
        enc.set_bytes(args.len(), bp);
        let width = pipe.max_total_threads_per_threadgroup().min(threads).max(1);
        enc.dispatch_thread_groups(
            MTLSize { width: threads.div_ceil(width), height: 1, depth: 1 },
            MTLSize { width, height: 1, depth: 1 },
        );
        Ok(())
    }

    fn check(s: &MetalStorage, want: DType, what: &str) -> Result<()> {
        if s.dtype() != want {
            candle_core::bail!("balance-stats on Metal: {what} must be {want:?}, got {:?}", s.dtype());
        }
        Ok(())
    }

    fn buffer(dev: &MetalDevice, n: usize, dtype: DType, label: &str) -> Result<std::sync::Arc<Buffer>> {
        dev.new_buffer_builder().with_size_for(n.max(1), dtype).with_label(label).build()
    }

    /// (logits, element offset), (indices, element offset) -> (2, E) f32.
    pub fn forward(
        (s1, o1): (&MetalStorage, usize),
        (s2, o2): (&MetalStorage, usize),
        bp: BsParams,
    ) -> Result<MetalStorage> {
        check(s1, DType::F32, "logits")?;
        check(s2, DType::U32, "indices")?;
        let dev = s1.device();
        let (t, e, c) = (bp.rows as usize, bp.e as usize, bp.n_chunks as usize);
        let (lg, idx) = ((s1.buffer(), o1 * 4, false), (s2.buffer(), o2 * 4, false));
        let stats = buffer(dev, t * 2, DType::F32, "balance_stats_rows")?;
        let part_p = buffer(dev, c * e, DType::F32, "balance_stats_part_p")?;
        let part_n = buffer(dev, c * (e + 1), DType::U32, "balance_stats_part_n")?;
        let out = buffer(dev, 2 * e, DType::F32, "balance_stats")?;
        dispatch(dev, "balance_stats_rows_f32", &[lg, (&*stats, 0, true)], &bp, t)?;
        dispatch(
            dev,
            "balance_stats_partial_f32",
            &[lg, (&*stats, 0, false), idx, (&*part_p, 0, true), (&*part_n, 0, true)],
            &bp,
            c * e,
        )?;
        dispatch(
            dev,
            "balance_stats_finish_f32",
            &[(&*part_p, 0, false), (&*part_n, 0, false), (&*out, 0, true)],
            &bp,
            e,
        )?;
        Ok(MetalStorage::new(out, dev.clone(), 2 * e, DType::F32))
    }

    /// (logits, element offset), (grad, element offset of its row 1) -> dlogits (T, E) f32.
    pub fn backward(
        (s1, o1): (&MetalStorage, usize),
        (s2, o2): (&MetalStorage, usize),
        bp: BsParams,
    ) -> Result<MetalStorage> {
        check(s1, DType::F32, "logits")?;
        check(s2, DType::F32, "grad")?;
        let dev = s1.device();
        let (t, e) = (bp.rows as usize, bp.e as usize);
        let dl = buffer(dev, t * e, DType::F32, "balance_stats_bwd")?;
        dispatch(
            dev,
            "balance_stats_bwd_f32",
            &[(s1.buffer(), o1 * 4, false), (s2.buffer(), o2 * 4, false), (&*dl, 0, true)],
            &bp,
            t,
        )?;
        Ok(MetalStorage::new(dl, dev.clone(), t * e, DType::F32))
    }
}
