//! The two factors of the Switch load-balance loss as one Candle custom op with CPU, CUDA and Metal
//! kernels: f_i, the share of routed slots that went to expert i (a count, no gradient), and P_i,
//! the mean over tokens of softmax(logits)_i, without materializing the (T, E) softmax. The
//! plain-tensor twin is [`balance_stats_reference`]; the loss on top is
//! `moe::losses::load_balance_fused`.
//!
//! - [`BalanceStats`]: (logits (T, E), indices (T, m) u32) -> (2, E), row 0 f, row 1 P.
//! - [`BalanceStatsBwd`]: (logits, grad (2, E)) -> dlogits = p_t (g - <p_t, g>) / T with g =
//!   grad row 1 (row 0 is ignored: f is a count).
//!
//! Deterministic: P is summed in two fixed-order levels, chunks of [`chunk_rows`]`(T)` rows in row
//! order, then the chunks in order (one GPU thread or rayon task per chunk and expert); the CPU
//! (`cpu.rs`) follows the kernels' order (`kernels/balance_stats.cuh`), so backends differ only by
//! the rounding of `exp`. f32 everywhere, f64 too on the CPU. An index >= E is an error on the CPU
//! and a NaN f row on a GPU.

use crate::ops::backend::cpu::{u32_slice, Rows};
use crate::ops::backend::fits;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, D};

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "metal")]
mod metal;

use cpu::{backward_cpu, forward_cpu};

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

/// The scalar arguments of every kernel entry point: the `#[repr(C)]` twin of `BalanceKernelArgs`
/// in `kernels/balance_stats.cuh` (12 four-byte fields, same order).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub(crate) struct BalanceKernelArgs {
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

impl BalanceKernelArgs {
    /// The kernel arguments for T rows of width E with m index slots each; every count the kernels
    /// index with must fit in u32.
    fn new(t: usize, e: usize, m: usize, logits_stride: usize, idx_stride: usize) -> Result<Self> {
        let chunk = chunk_rows(t);
        let n_chunks = t.div_ceil(chunk);
        let fits = |v: usize, what: &str| fits(v, what, "balance-stats");
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

/// (logits (T, E), indices (T, m) u32) -> (2, E): row 0 = f, row 1 = P. See the module docs.
#[derive(Clone, Copy, Debug, Default)]
pub struct BalanceStats;

impl BalanceStats {
    fn rows(&self, l1: &Layout, l2: &Layout) -> Result<(Rows, Rows, BalanceKernelArgs)> {
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
        let bp = BalanceKernelArgs::new(rl.rows, rl.cols, ri.cols, rl.stride, ri.stride)?;
        Ok((rl, ri, bp))
    }
}

impl CustomOp2 for BalanceStats {
    fn name(&self) -> &'static str {
        "balance-stats"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rl, ri, _) = self.rows(l1, l2)?;
        let idx = u32_slice(s2, "indices", self.name())?;
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

/// (logits (T, E), grad (2, E)) -> dlogits (T, E) = `p_t * (grad[1] - <p_t, grad[1]>) / T`: the
/// backward of [`BalanceStats`] (grad row 0, the gradient of the count row, is ignored).
#[derive(Clone, Copy, Debug, Default)]
pub struct BalanceStatsBwd;

impl BalanceStatsBwd {
    /// The logits rows, the element offset of grad row 1, and the kernel arguments.
    fn rows(&self, l1: &Layout, l2: &Layout) -> Result<(Rows, usize, BalanceKernelArgs)> {
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
        let bp = BalanceKernelArgs::new(rl.rows, rl.cols, 0, rl.stride, 0)?;
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

/// f_i: the counts of each expert among `indices` divided by their number.
pub fn expert_fractions(indices: &[u32], e: usize) -> Vec<f64> {
    let mut f = vec![0f64; e];
    for &i in indices {
        f[i as usize] += 1.0;
    }
    let n = indices.len().max(1) as f64;
    f.iter_mut().for_each(|x| *x /= n);
    f
}

/// The plain-tensor twin of [`balance_stats`]: f from the indices on the host
/// ([`expert_fractions`]), P = softmax(logits).mean(0).
pub fn balance_stats_reference(logits: &Tensor, indices: &Tensor) -> Result<Tensor> {
    let e = logits.dim(1)?;
    let host = indices.flatten_all()?.to_vec1::<u32>()?;
    if let Some(&i) = host.iter().find(|&&i| i as usize >= e) {
        candle_core::bail!("balance_stats_reference: expert index {i} is out of range (E = {e})");
    }
    let f = Tensor::from_vec(expert_fractions(&host, e), e, logits.device())?.to_dtype(logits.dtype())?; // (E)
    let p = candle_nn::ops::softmax(logits, D::Minus1)?.mean(0)?; // (E)
    Tensor::stack(&[f, p], 0) // (2, E)
}
