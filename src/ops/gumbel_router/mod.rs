//! The Gumbel-Softmax router as Candle custom ops with CPU, CUDA and Metal kernels: per token row,
//! the top-K pre-filter, Philox noise, the relaxed softmax and the Gumbel-top-m selection in one
//! pass, and the backward of the weights. The plain-tensor twin is `moe::routers::gumbel`.
//!
//! - [`GumbelSelect`] (`select.rs`): logits (T, E) -> (T, K + m) u32, the K candidates (best logit
//!   first, ties to the lower index) then the positions within K of the m largest cand + g; with
//!   `save_y`, (T, 2K + m): then y = softmax((cand + g) / tau) as f32 bits. No gradient.
//! - [`GumbelWeights`] (`weights.rs`): (logits, cand) -> y (T, K), differentiable in the logits;
//!   copied from a `save_y` select output (f32), else computed with g regenerated from Philox keyed
//!   by (seed, step, layer, token_base + t, expert), so selection and weights see the same g.
//! - [`GumbelWeightsBwd`]: (y, dy, cand) -> dlogits (T, E) = y (dy - <y, dy>) / tau at the
//!   candidates, 0 elsewhere.
//!
//! [`gumbel_route`] is the whole router path from logits (with `ops::straight_through` on top).
//! CPU kernels: `cpu.rs` (portable rows), `blocks.rs` (row blocks, the run-time AVX2 switch),
//! `avx2.rs` and `network_avx2.rs`; GPU launches: `cuda.rs`, `metal.rs`; kernel bodies:
//! `kernels/gumbel_router.cuh`. The noise is bit-identical to `rng::philox` on the CPU (a GPU `log`
//! may differ by an ulp). f32 on every backend, f64 too on the CPU; 1 <= K <= min(E, 32), m <= K,
//! tau > 0. Non-finite logits: an error on the CPU naming the row and expert; NaN rows on a GPU.

use super::backend::cpu::output_vec;
use super::backend::fits;
use candle_core::{CpuStorage, Result, Tensor};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod avx2;
mod blocks;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "metal")]
mod metal;
#[cfg(target_arch = "x86_64")]
mod network_avx2;
mod select;
#[cfg(test)]
mod tests;
mod weights;

pub use select::GumbelSelect;
pub use weights::{GumbelWeights, GumbelWeightsBwd};

/// Largest pre-filter K the kernels accept (`GM_MAX_K` in `kernels/gumbel_router.cuh`).
pub const MAX_K: usize = 32;

/// Rows per rayon task: enough work per task that scheduling costs little.
const ROWS_PER_TASK: usize = 256;

/// What keys and shapes the router ops.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GumbelParams {
    /// Pre-filter K: candidates per token.
    pub k: usize,
    /// Experts selected per token among the K (Gumbel-top-m); 0 when only the soft weights are used.
    pub m: usize,
    /// Temperature of the relaxed softmax, > 0.
    pub tau: f64,
    pub seed: u64,
    /// Training step (the noise key takes its low 32 bits, as `routers::gumbel::noise` does).
    pub step: u32,
    pub layer: u32,
    /// Token index of row 0 (the micro-batch offset `micro * T`).
    pub token_base: u32,
    /// false: no noise (g = 0), the eval "argmax" mode.
    pub noisy: bool,
}

impl GumbelParams {
    fn check(&self, e: usize) -> Result<()> {
        if self.k == 0 || self.k > e.min(MAX_K) {
            candle_core::bail!("gumbel router op: need 1 <= K ({}) <= min(E ({e}), {MAX_K})", self.k);
        }
        if self.m > self.k {
            candle_core::bail!("gumbel router op: need m ({}) <= K ({})", self.m, self.k);
        }
        if !(self.tau > 0.0 && self.tau.is_finite()) {
            candle_core::bail!("gumbel router op: temperature tau = {} must be finite and > 0", self.tau);
        }
        if e > u32::MAX as usize {
            candle_core::bail!("gumbel router op: E = {e} does not fit in u32");
        }
        Ok(())
    }
}

/// The scalar arguments of every kernel entry point: the `#[repr(C)]` twin of `GumbelKernelArgs`
/// in `kernels/gumbel_router.cuh` (16 four-byte fields, same order).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub(crate) struct GumbelKernelArgs {
    pub rows: u32,
    pub e: u32,
    pub k: u32,
    pub m: u32,
    pub logits_stride: u32,
    pub idx_stride: u32,
    pub y_stride: u32,
    pub dy_stride: u32,
    pub seed_lo: u32,
    pub seed_hi: u32,
    pub step: u32,
    pub layer: u32,
    pub token_base: u32,
    pub noisy: u32,
    pub inv_tau: f32,
    /// Column of the select output row where the saved weights y (K f32 bits) start; 0: none saved
    /// (the select op does not write them, the weights op computes y from the logits).
    pub y_col: u32,
}

impl GumbelKernelArgs {
    /// The kernel arguments for `p` over `rows` rows of width `e`; the strides are left 0 for the
    /// caller to fill in.
    fn new(p: &GumbelParams, rows: usize, e: usize) -> Result<Self> {
        Ok(Self {
            rows: fits(rows, "T", "gumbel router op")?,
            e: fits(e, "E", "gumbel router op")?,
            k: p.k as u32,
            m: p.m as u32,
            seed_lo: p.seed as u32,
            seed_hi: (p.seed >> 32) as u32,
            step: p.step,
            layer: p.layer,
            token_base: p.token_base,
            noisy: p.noisy as u32,
            inv_tau: (1.0 / p.tau) as f32,
            ..Default::default()
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The public entry points.

/// logits (T, E) -> (T, K + m) u32: candidates, then selected positions within them. No gradient.
pub fn gumbel_select(logits: &Tensor, p: &GumbelParams) -> Result<Tensor> {
    logits.apply_op1_no_bwd(&GumbelSelect { p: *p, save_y: false })
}

/// [`gumbel_select`] that also returns the weights y = softmax((cand + g) / tau) of the same pass:
/// (T, 2K + m) u32, the last K columns the f32 bits of y. [`gumbel_weights`] on this output and
/// the same f32 logits copies y instead of computing it again (its backward is unchanged).
pub fn gumbel_select_saving_y(logits: &Tensor, p: &GumbelParams) -> Result<Tensor> {
    logits.apply_op1_no_bwd(&GumbelSelect { p: *p, save_y: true })
}

/// y = `softmax((logits[cand] + g) / tau)`: (T, K), differentiable in `logits`. `cand` (T, >= K) u32,
/// e.g. the output of [`gumbel_select`].
pub fn gumbel_weights(logits: &Tensor, cand: &Tensor, p: &GumbelParams) -> Result<Tensor> {
    logits.apply_op2(cand, GumbelWeights(*p))
}

/// The fused router path from logits, the twin of `GumbelRouter::route` after its `gate` matmul.
#[derive(Clone, Debug)]
pub struct FusedRouting {
    /// (T, m) expert indices on the host (the K candidates when `hard` is false).
    pub indices: Vec<u32>,
    /// Experts per token: m when hard, K when soft.
    pub m: usize,
    /// (T, m) combine weights carrying the router gradient: straight-through (forward exactly 1/m)
    /// when hard, the soft y (T, K) otherwise.
    pub weights: Tensor,
    /// (T, K) relaxed sample y.
    pub y: Tensor,
    /// (T, 2K + m) u32 output of [`gumbel_select_saving_y`] (candidates, selected positions,
    /// y bits).
    pub cand_sel: Tensor,
}

/// The experts of each row of the select output (T, W): the m selected (`hard`) or the K
/// candidates, row-major on the host. On the CPU it reads the storage in place (no copy); on a GPU
/// it copies only the K + m index columns.
fn host_indices(cand_sel: &Tensor, k: usize, m: usize, hard: bool) -> Result<Vec<u32>> {
    // Blocks of rows in parallel (rayon), each row's experts into its own slots.
    let pick = |rows: &[u32], w: usize| -> Vec<u32> {
        let per = if hard { m } else { k };
        let mut out = output_vec(rows.len() / w * per, u32::MAX); // every slot is written
        out.par_chunks_mut(per * ROWS_PER_TASK).zip(rows.par_chunks(w * ROWS_PER_TASK)).for_each(|(o, b)| {
            for (o, r) in o.chunks_exact_mut(per).zip(b.chunks_exact(w)) {
                if hard {
                    for (o, &s) in o.iter_mut().zip(&r[k..k + m]) {
                        *o = r[s as usize];
                    }
                } else {
                    o.copy_from_slice(&r[..k]);
                }
            }
        });
        out
    };
    if cand_sel.device().is_cpu() {
        let w = cand_sel.dim(1)?;
        let (s, l) = cand_sel.storage_and_layout();
        if let (candle_core::Storage::Cpu(CpuStorage::U32(v)), Some((a, b))) = (&*s, l.contiguous_offsets()) {
            return Ok(pick(&v[a..b], w));
        }
    }
    let used = if hard { k + m } else { k };
    let host = cand_sel.narrow(1, 0, used)?.contiguous()?.flatten_all()?.to_vec1::<u32>()?;
    Ok(pick(&host, used))
}

/// Runs the whole Gumbel router on `logits` (T, E): select, weights, straight-through.
/// With `hard = false`, `p.m` is ignored (no selection) and the K candidates are the experts.
pub fn gumbel_route(logits: &Tensor, p: &GumbelParams, hard: bool) -> Result<FusedRouting> {
    let p = GumbelParams { m: if hard { p.m } else { 0 }, ..*p };
    if hard && p.m == 0 {
        candle_core::bail!("gumbel_route: hard routing needs m >= 1");
    }
    let (k, m) = (p.k, p.m);
    let cand_sel = gumbel_select_saving_y(logits, &p)?; // (T, 2K + m) u32
    let y = gumbel_weights(logits, &cand_sel, &p)?; // (T, K), copied from the select pass (f32)
    let indices = host_indices(&cand_sel, k, m, hard)?;
    if !hard {
        return Ok(FusedRouting { indices, m: k, weights: y.clone(), y, cand_sel });
    }
    // Exactly 1/m forward; the gradient is d y at the selected positions.
    let weights = super::straight_through::straight_through(&y, &cand_sel, k, m)?; // (T, m)
    Ok(FusedRouting { indices, m, weights, y, cand_sel })
}
