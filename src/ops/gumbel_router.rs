//! The Gumbel-Softmax router as Candle custom ops, with CPU, CUDA and Metal kernels.
//!
//! The plain-tensor twin is `moe::routers::gumbel` (`prefilter`, `noise`, `relaxed`,
//! `straight_through`); these ops compute the same numbers per token row in one pass, without
//! host round trips, without storing the noise, and on the GPU.
//!
//! # Design
//!
//! Candle custom ops have one output, at most 3 inputs, and a backward that only sees
//! `(args, result, grad_result)`. So the router is split into three ops:
//!
//! 1. [`GumbelSelect`] (`CustomOp1`, no backward): logits (T, E) -> (T, K + m) u32. Columns 0..K are
//!    the top-K candidate experts, best logit first, ties to the lower index (as `routers::top_k`).
//!    Columns K..K+m are the positions within K of the m largest perturbed candidates cand + g
//!    (Gumbel-top-m, ties to the lower position). Indices carry no gradient. With `save_y`
//!    (what [`gumbel_route`] uses) the output is (T, 2K + m): columns K+m..2K+m hold the K weights
//!    y = softmax((cand + g) / tau) as f32 bits, computed in the same pass from the values and noise
//!    already in registers (the same arithmetic as op 2, so the same bits).
//! 2. [`GumbelWeights`] (`CustomOp2`: logits (T, E), cand (T, >= K) u32): y = softmax((cand + g) / tau)
//!    over the K candidates -> (T, K), differentiable in the logits. Given the (T, 2K + m) output of
//!    the select op and f32 logits it copies y from there (no second pass over the logits, no
//!    second Philox); given any other candidate list, or f64 logits, it computes y, regenerating g
//!    from Philox keyed by (seed, step, layer, token_base + t, expert). Either way the selection and
//!    the weights see the same g, a pure function of the key.
//! 3. [`GumbelWeightsBwd`] (`CustomOp3`: y, dy, cand -> dlogits (T, E)): the backward of 2, a kernel of
//!    its own: y * (dy - sum(y * dy)) / tau at the candidate columns, zero elsewhere. It uses the
//!    forward result y (given to `bwd` as `res`), so the backward needs neither the noise nor the logits.
//!
//! The straight-through estimator on top (forward weight exactly 1/m, backward the soft gradient of
//! the m selected) is one more op, `ops::straight_through` (its backward is Candle's
//! `scatter_add`): see [`gumbel_route`], which is the whole router path given logits.
//!
//! Noise: the kernels implement Philox4x32-10 bit-identically to `rng::philox` (`kernels/philox.h`)
//! with the same u32 -> (0, 1) -> -ln(-ln u) mapping. The CPU op calls `rng::gumbel_noise_avx2` (AVX2
//! intrinsics, two rows at a time) or `rng::gumbel_noise_lanes`, 8-lane forms of `rng::gumbel_noise`
//! (same bits, tested; all use `rng::ln_pos`, a table-free logf under 1 ulp, or its intrinsics
//! twin), so on the CPU the noise is bit-identical to the reference; on a GPU only the `log`s may
//! differ by an ulp, which can flip a selection only at a near-exact tie of two perturbed values.
//!
//! Precision: f32 on every backend; the CPU also runs f64 (for finite-difference gradient checks).
//! The CPU forward is multi-threaded over blocks of rows (rayon) with no per-element allocation;
//! on x86-64 with AVX2 the row kernels run an AVX2 build (for K <= 16 a sorting-network top-K of 8
//! rows at a time, `gumbel_router/network_avx2.rs`, else threshold + left-pack + rank per row;
//! 8-lane Philox and logs; the choice and softmax in one register for K <= 8, two for K <= 16),
//! else a portable build; see `gumbel_router/cpu.rs`.
//! The f32 softmax uses a Cephes-style `exp` (about 1 ulp), so y matches the reference softmax to
//! ~1e-7, not bit for bit. Limits:
//! 1 <= K <= min(E, 32), m <= K, tau > 0. Non-finite logits: the CPU ops fail with the row and
//! expert; the GPU kernels do not check (an out-of-range candidate index gives a NaN row, never a
//! stray read).
//!
//! Kernels: `kernels/gumbel_router.cuh` holds the row bodies once (`gm_select_row`,
//! `gm_weights_row`, `gm_weights_bwd_elem`); `kernels/gumbel_router.cu` (PTX, built by `build.rs`
//! under feature `cuda`) and `kernels/gumbel_router.metal` (compiled at run time, pipelines cached
//! per device) are thin entry points `<op>_f32`: one thread per row for select and weights, one per
//! output element for weights_bwd. The CPU kernels live in `gumbel_router/cpu.rs`.

use super::cpu_layout::{output_vec, u32_slice, Rows};
use crate::rng;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

mod cpu;
use cpu::*;
#[cfg(target_arch = "x86_64")]
mod network_avx2;

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

/// The scalar arguments of every kernel entry point: the `#[repr(C)]` twin of `GmParams` in
/// `kernels/gumbel_router.cuh` (16 four-byte fields).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct GmParams {
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

impl GmParams {
    /// The kernel arguments for `p` over `rows` rows of width `e`; the strides are left 0 for the
    /// caller to fill in.
    pub fn new(p: &GumbelParams, rows: usize, e: usize) -> Result<Self> {
        let fits = |v: usize, what: &str| -> Result<u32> {
            u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("gumbel router op: {what} = {v} exceeds u32")))
        };
        Ok(Self {
            rows: fits(rows, "T")?,
            e: fits(e, "E")?,
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
// Op 1: GumbelSelect.

/// logits (T, E) -> (T, K + m) u32: K candidates (best first), then m selected positions within K;
/// with `save_y`, (T, 2K + m): then the K weights y = softmax((cand + g) / tau) as f32 bits, which
/// [`GumbelWeights`] copies instead of computing them again.
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
    fn gm_params(&self, r: Rows) -> Result<GmParams> {
        let mut gp = GmParams::new(&self.p, r.rows, r.cols)?;
        gp.logits_stride = r.stride as u32;
        gp.y_stride = self.width() as u32;
        gp.y_col = if self.save_y { (self.p.k + self.p.m) as u32 } else { 0 };
        Ok(gp)
    }

    fn cpu<T: Real>(&self, data: &[T], r: Rows) -> Result<Vec<u32>> {
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
            CpuStorage::F32(v) => {
                r.check_len(v.len(), "logits", self.name())?;
                self.cpu(v, r)?
            }
            CpuStorage::F64(v) => {
                r.check_len(v.len(), "logits", self.name())?;
                self.cpu(v, r)?
            }
            other => candle_core::bail!("{}: logits must be f32 or f64, got {:?}", self.name(), other.dtype()),
        };
        Ok((CpuStorage::U32(out), Shape::from((r.rows, self.width()))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let r = Rows::of(l, "logits", self.name())?;
        self.p.check(r.cols)?;
        let w = self.width();
        let gp = self.gm_params(r)?;
        let out = cuda::select(s, r, gp, r.rows * w)?;
        Ok((out, Shape::from((r.rows, w))))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(&self, s: &candle_core::MetalStorage, l: &Layout) -> Result<(candle_core::MetalStorage, Shape)> {
        let r = Rows::of(l, "logits", self.name())?;
        self.p.check(r.cols)?;
        let w = self.width();
        let gp = self.gm_params(r)?;
        let out = metal::launch(
            "gumbel_select_f32",
            &[(s, r.offset, candle_core::DType::F32)],
            (r.rows * w, candle_core::DType::U32),
            gp,
            r.rows,
        )?;
        Ok((out, Shape::from((r.rows, w))))
    }
}

// ---------------------------------------------------------------------------------------------
// Op 2: GumbelWeights, with its backward op GumbelWeightsBwd.

/// (logits (T, E), cand (T, >= K) u32) -> y = softmax((logits[cand] + g) / tau) (T, K).
///
/// `cand` of width exactly 2K + m is taken for the output of `GumbelSelect { save_y: true }` on the
/// same logits: with f32 logits y is then copied from its columns K + m .. 2K + m. Any other width
/// (>= K), or f64 logits: y is computed, g regenerated.
#[derive(Clone, Debug)]
pub struct GumbelWeights(pub GumbelParams);

impl GumbelWeights {
    /// The kernel arguments for the CUDA and Metal launches.
    #[cfg(any(feature = "cuda", feature = "metal"))]
    fn gm_params(&self, rl: Rows, rc: Rows) -> Result<GmParams> {
        let mut gp = GmParams::new(&self.0, rl.rows, rl.cols)?;
        gp.logits_stride = rl.stride as u32;
        gp.idx_stride = rc.stride as u32;
        gp.y_stride = self.0.k as u32;
        gp.y_col = self.y_col(rc.cols) as u32;
        Ok(gp)
    }

    /// Where the saved weights start in a candidate row of width `cols`; 0: compute them.
    fn y_col(&self, cols: usize) -> usize {
        let (k, m) = (self.0.k, self.0.m);
        if cols == 2 * k + m {
            k + m
        } else {
            0
        }
    }

    fn cpu<T: Real>(&self, lg: &[T], rl: Rows, cand: &[u32], rc: Rows) -> Result<Vec<T>> {
        let p = &self.0;
        let k = p.k;
        let inv_tau = T::from_f64(1.0 / p.tau);
        // Saved y are f32 bits: f64 (gradient checks) computes y at full precision.
        let y_col = if T::IS_F32 { self.y_col(rc.cols) } else { 0 };
        let mut y = output_vec(rl.rows * k, T::from_f64(f64::NAN)); // every weight is written
        y.par_chunks_mut(k * ROWS_PER_TASK).enumerate().try_for_each(|(b, yb)| {
            weights_block(lg, rl, cand, rc, p, b * ROWS_PER_TASK, yb, inv_tau, y_col).map_err(|(t, i)| {
                candle_core::Error::Msg(format!(
                    "gumbel-weights: candidate {} of token {t} is out of range (E = {}) or its logit is not finite",
                    rc.row(cand, t)[i],
                    rl.cols
                ))
            })
        })?;
        Ok(y)
    }

    fn rows(&self, l1: &Layout, l2: &Layout) -> Result<(Rows, Rows)> {
        let rl = Rows::of(l1, "logits", self.name())?;
        let rc = Rows::of(l2, "candidates", self.name())?;
        self.0.check(rl.cols)?;
        if rc.rows != rl.rows || rc.cols < self.0.k {
            candle_core::bail!(
                "{}: candidates {:?} must be (T = {}, >= K = {})",
                self.name(),
                l2.shape(),
                rl.rows,
                self.0.k
            );
        }
        Ok((rl, rc))
    }
}

impl CustomOp2 for GumbelWeights {
    fn name(&self) -> &'static str {
        "gumbel-weights"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rl, rc) = self.rows(l1, l2)?;
        let cand = u32_slice(s2, "candidates", self.name())?;
        rc.check_len(cand.len(), "candidates", self.name())?;
        let out = match s1 {
            CpuStorage::F32(v) => {
                rl.check_len(v.len(), "logits", self.name())?;
                CpuStorage::F32(self.cpu(v, rl, cand, rc)?)
            }
            CpuStorage::F64(v) => {
                rl.check_len(v.len(), "logits", self.name())?;
                CpuStorage::F64(self.cpu(v, rl, cand, rc)?)
            }
            other => candle_core::bail!("{}: logits must be f32 or f64, got {:?}", self.name(), other.dtype()),
        };
        Ok((out, Shape::from((rl.rows, self.0.k))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rl, rc) = self.rows(l1, l2)?;
        let gp = self.gm_params(rl, rc)?;
        let out = cuda::weights(s1, rl, s2, rc, gp, rl.rows * self.0.k)?;
        Ok((out, Shape::from((rl.rows, self.0.k))))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        let (rl, rc) = self.rows(l1, l2)?;
        let gp = self.gm_params(rl, rc)?;
        let out = metal::launch(
            "gumbel_weights_f32",
            &[(s1, rl.offset, candle_core::DType::F32), (s2, rc.offset, candle_core::DType::U32)],
            (rl.rows * self.0.k, candle_core::DType::F32),
            gp,
            rl.rows,
        )?;
        Ok((out, Shape::from((rl.rows, self.0.k))))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        cand: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let e = logits.dim(1)?;
        let dl = res.apply_op3_no_bwd(&grad_res.contiguous()?, cand, &GumbelWeightsBwd { p: self.0, e })?;
        Ok((Some(dl), None))
    }
}

/// (y (T, K), dy (T, K), cand (T, >= K) u32) -> dlogits (T, E): the backward of [`GumbelWeights`].
#[derive(Clone, Debug)]
pub struct GumbelWeightsBwd {
    pub p: GumbelParams,
    /// E, the width of dlogits.
    pub e: usize,
}

impl GumbelWeightsBwd {
    /// The kernel arguments for the CUDA and Metal launches (one thread per output element, so
    /// T * E must fit in u32).
    #[cfg(any(feature = "cuda", feature = "metal"))]
    fn gm_params(&self, ry: Rows, rd: Rows, rc: Rows) -> Result<GmParams> {
        let mut gp = GmParams::new(&self.p, ry.rows, self.e)?;
        if ry.rows * self.e > u32::MAX as usize {
            candle_core::bail!("{}: T * E = {} exceeds u32 on the GPU", self.name(), ry.rows * self.e);
        }
        gp.y_stride = ry.stride as u32;
        gp.dy_stride = rd.stride as u32;
        gp.idx_stride = rc.stride as u32;
        gp.logits_stride = self.e as u32;
        Ok(gp)
    }

    fn rows(&self, l1: &Layout, l2: &Layout, l3: &Layout) -> Result<(Rows, Rows, Rows)> {
        let ry = Rows::of(l1, "y", self.name())?;
        let rd = Rows::of(l2, "dy", self.name())?;
        let rc = Rows::of(l3, "candidates", self.name())?;
        self.p.check(self.e)?;
        let k = self.p.k;
        if ry.cols != k || rd.cols != k || rd.rows != ry.rows || rc.rows != ry.rows || rc.cols < k {
            candle_core::bail!(
                "{}: y {:?}, dy {:?}, candidates {:?} must be (T, K = {k}), (T, K), (T, >= K)",
                self.name(),
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        Ok((ry, rd, rc))
    }

    #[allow(clippy::too_many_arguments)]
    fn cpu<T: Real>(&self, y: &[T], ry: Rows, dy: &[T], rd: Rows, cand: &[u32], rc: Rows) -> Result<Vec<T>> {
        let (k, e) = (self.p.k, self.e);
        let inv_tau = T::from_f64(1.0 / self.p.tau);
        // Zeroed row by row inside the parallel loop (a zeroed allocation is a serial memset when
        // the allocator reuses memory).
        let mut dl = output_vec(ry.rows * e, T::from_f64(f64::NAN));
        dl.par_chunks_mut(e.max(1)).with_min_len(ROWS_PER_TASK).enumerate().try_for_each(|(t, o)| {
            o.fill(T::ZERO);
            let c = &rc.row(cand, t)[..k];
            bwd_row(ry.row(y, t), rd.row(dy, t), c, o, inv_tau).map_err(|i| {
                candle_core::Error::Msg(format!(
                    "gumbel-weights-bwd: candidate {} of token {t} is out of range (E = {e})",
                    c[i]
                ))
            })
        })?;
        Ok(dl)
    }
}

impl CustomOp3 for GumbelWeightsBwd {
    fn name(&self) -> &'static str {
        "gumbel-weights-bwd"
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
        let (ry, rd, rc) = self.rows(l1, l2, l3)?;
        let cand = u32_slice(s3, "candidates", self.name())?;
        rc.check_len(cand.len(), "candidates", self.name())?;
        let out = match (s1, s2) {
            (CpuStorage::F32(y), CpuStorage::F32(dy)) => {
                ry.check_len(y.len(), "y", self.name())?;
                rd.check_len(dy.len(), "dy", self.name())?;
                CpuStorage::F32(self.cpu(y, ry, dy, rd, cand, rc)?)
            }
            (CpuStorage::F64(y), CpuStorage::F64(dy)) => {
                ry.check_len(y.len(), "y", self.name())?;
                rd.check_len(dy.len(), "dy", self.name())?;
                CpuStorage::F64(self.cpu(y, ry, dy, rd, cand, rc)?)
            }
            (a, b) => candle_core::bail!(
                "{}: y and dy must both be f32 or both f64, got {:?} and {:?}",
                self.name(),
                a.dtype(),
                b.dtype()
            ),
        };
        Ok((out, Shape::from((ry.rows, self.e))))
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
        let (ry, rd, rc) = self.rows(l1, l2, l3)?;
        let gp = self.gm_params(ry, rd, rc)?;
        let out = cuda::weights_bwd((s1, ry), (s2, rd), (s3, rc), gp, ry.rows * self.e)?;
        Ok((out, Shape::from((ry.rows, self.e))))
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
        let (ry, rd, rc) = self.rows(l1, l2, l3)?;
        let gp = self.gm_params(ry, rd, rc)?;
        let out = metal::launch(
            "gumbel_weights_bwd_f32",
            &[
                (s1, ry.offset, candle_core::DType::F32),
                (s2, rd.offset, candle_core::DType::F32),
                (s3, rc.offset, candle_core::DType::U32),
            ],
            (ry.rows * self.e, candle_core::DType::F32),
            gp,
            ry.rows * self.e, // one thread per element
        )?;
        Ok((out, Shape::from((ry.rows, self.e))))
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

/// y = softmax((logits[cand] + g) / tau): (T, K), differentiable in `logits`. `cand` (T, >= K) u32,
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

// ---------------------------------------------------------------------------------------------
// CUDA launch glue.

#[cfg(feature = "cuda")]
mod cuda {
    use super::{GmParams, Rows};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, DType, Result};

    /// PTX of kernels/gumbel_router.cu, compiled by build.rs.
    pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/gumbel_router.ptx"));
    const MODULE: &str = "gumbel_moe_router";
    const BLOCK: u32 = 128;

    // SAFETY: #[repr(C)] plain old data, laid out as the C struct GmParams the kernels take by value.
    unsafe impl DeviceRepr for GmParams {}

    fn cfg(rows: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: ((rows as u32).div_ceil(BLOCK), 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
    }

    fn f32_only(s: &CudaStorage, what: &str) -> Result<()> {
        if s.dtype() != DType::F32 {
            candle_core::bail!("gumbel router op on CUDA: {what} must be f32 (or u32 indices), got {:?}", s.dtype());
        }
        Ok(())
    }

    pub fn select(s: &CudaStorage, r: Rows, gp: GmParams, n_out: usize) -> Result<CudaStorage> {
        f32_only(s, "logits")?;
        let dev = s.device();
        let out = dev.alloc_zeros::<u32>(n_out)?;
        if r.rows > 0 {
            let src = s.as_cuda_slice::<f32>()?.slice(r.offset..);
            let func = dev.get_or_load_custom_func("gumbel_select_f32", MODULE, PTX)?;
            let mut b = func.builder();
            b.arg(&src);
            b.arg(&out);
            b.arg(&gp);
            // SAFETY: the kernel reads rows * logits_stride floats from src and writes n_out u32.
            unsafe { b.launch(cfg(r.rows)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }

    pub fn weights(
        s1: &CudaStorage,
        rl: Rows,
        s2: &CudaStorage,
        rc: Rows,
        gp: GmParams,
        n_out: usize,
    ) -> Result<CudaStorage> {
        f32_only(s1, "logits")?;
        let dev = s1.device();
        let out = dev.alloc_zeros::<f32>(n_out)?;
        if rl.rows > 0 {
            let lg = s1.as_cuda_slice::<f32>()?.slice(rl.offset..);
            let cand = s2.as_cuda_slice::<u32>()?.slice(rc.offset..);
            let func = dev.get_or_load_custom_func("gumbel_weights_f32", MODULE, PTX)?;
            let mut b = func.builder();
            b.arg(&lg);
            b.arg(&cand);
            b.arg(&out);
            b.arg(&gp);
            // SAFETY: reads within the checked layouts, writes rows * K floats.
            unsafe { b.launch(cfg(rl.rows)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }

    pub fn weights_bwd(
        (s1, ry): (&CudaStorage, Rows),
        (s2, rd): (&CudaStorage, Rows),
        (s3, rc): (&CudaStorage, Rows),
        gp: GmParams,
        n_out: usize,
    ) -> Result<CudaStorage> {
        f32_only(s1, "y")?;
        f32_only(s2, "dy")?;
        let dev = s1.device();
        // One thread per element writes every element (zeros included), so no memset is needed.
        // SAFETY: fully written by the kernel below when rows > 0; empty otherwise.
        let out = unsafe { dev.alloc::<f32>(n_out.max(1))? };
        if ry.rows > 0 {
            let y = s1.as_cuda_slice::<f32>()?.slice(ry.offset..);
            let dy = s2.as_cuda_slice::<f32>()?.slice(rd.offset..);
            let cand = s3.as_cuda_slice::<u32>()?.slice(rc.offset..);
            let func = dev.get_or_load_custom_func("gumbel_weights_bwd_f32", MODULE, PTX)?;
            let mut b = func.builder();
            b.arg(&y);
            b.arg(&dy);
            b.arg(&cand);
            b.arg(&out);
            b.arg(&gp);
            // SAFETY: reads within the checked layouts, writes rows * E floats (one thread each).
            unsafe { b.launch(cfg(n_out)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// Metal launch glue: the library is compiled from source once per device and its pipelines cached.

#[cfg(feature = "metal")]
mod metal {
    use super::GmParams;
    use crate::ops::metal_glue;
    use candle_core::{DType, MetalStorage, Result};

    /// The .metal file with its `#include "gumbel_router.cuh"` replaced by philox.h and the body.
    fn source() -> String {
        let body =
            format!("{}\n{}", include_str!("../../kernels/philox.h"), include_str!("../../kernels/gumbel_router.cuh"));
        metal_glue::inline_source(include_str!("../../kernels/gumbel_router.metal"), &[("gumbel_router.cuh", &body)])
    }

    /// Launches `name` over `threads` threads: buffers `inputs` (storage, element offset, dtype), the
    /// new output (n, dtype), then the params (see `metal_glue::launch`).
    pub fn launch(
        name: &'static str,
        inputs: &[(&MetalStorage, usize, DType)],
        out: (usize, DType),
        gp: GmParams,
        threads: usize,
    ) -> Result<MetalStorage> {
        metal_glue::launch(("gumbel_router", source, name), inputs, out, &gp, threads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows of E logits from Philox: `levels` > 0 quantizes them to that many values (ties).
    fn row(seed: u32, e: usize, levels: u32) -> Vec<f32> {
        (0..e as u32)
            .map(|i| {
                let r = rng::philox4x32_10([i, seed, 1, 2], [3, 4]);
                let u = rng::u32_to_open_unit(r[0]) * 2.0 - 1.0;
                if levels > 0 {
                    (r[1] % levels) as f32
                } else {
                    u * 3.0
                }
            })
            .collect()
    }

    /// The threshold top-K paths (portable and AVX2) give exactly what the insertion scan gives,
    /// ties, E not a multiple of 8, K < 8 and non-finite logits included.
    #[test]
    fn top_k_paths_agree() {
        for &(e, k) in &[(8usize, 8usize), (64, 8), (64, 1), (64, 5), (37, 8), (100, 8), (256, 8), (9, 3), (64, 16)] {
            for seed in 0..400u32 {
                let levels = [0, 0, 3, 17, 1][seed as usize % 5];
                let mut lg = row(seed, e, levels);
                if seed % 97 == 5 {
                    lg[(seed as usize * 7) % e] = if seed % 2 == 0 { f32::NAN } else { f32::INFINITY };
                }
                let (mut cv0, mut ci0) = ([0f32; MAX_K], [0u32; MAX_K]);
                let want = top_k_insertion(&lg, k, &mut cv0, &mut ci0);
                let (mut cv1, mut ci1) = ([0f32; MAX_K], [0u32; MAX_K]);
                let got = top_k_f32(&lg, k, &mut cv1, &mut ci1);
                assert_eq!(got, want, "portable e={e} k={k} seed={seed}");
                if want.is_ok() {
                    assert_eq!(ci1[..k], ci0[..k], "portable e={e} k={k} seed={seed} {lg:?}");
                }
                #[cfg(target_arch = "x86_64")]
                if use_avx2() {
                    let (mut cv2, mut ci2) = ([0f32; MAX_K], [0u32; MAX_K]);
                    // SAFETY: checked just above.
                    let got = unsafe { top_k_f32_avx2(&lg, k, &mut cv2, &mut ci2) };
                    assert_eq!(got, want, "avx2 e={e} k={k} seed={seed}");
                    if want.is_ok() {
                        assert_eq!(ci2[..k], ci0[..k], "avx2 e={e} k={k} seed={seed} {lg:?}");
                    }
                }
            }
        }
    }

    /// The portable and the AVX2 builds of the select and weights blocks give the same bits, for
    /// K below, at and above one AVX2 register, and the y the select op saves are the bits the
    /// weights op computes.
    #[test]
    fn portable_and_avx2_blocks_agree() {
        // 301 rows: whole batches, pairs and one row left over.
        let (t, e) = (301usize, 64usize);
        let data: Vec<f32> = (0..t as u32).flat_map(|s| row(s, e, if s % 4 == 0 { 9 } else { 0 })).collect();
        let r = Rows { rows: t, cols: e, stride: e, offset: 0 };
        for (k, m) in [(8usize, 2usize), (5, 1), (1, 1), (3, 0), (12, 2)] {
            let p = GumbelParams { k, m, tau: 0.7, seed: 9, step: 4, layer: 1, token_base: 3, noisy: true };
            let w = 2 * p.k + p.m;
            let mut a = vec![0u32; t * w];
            select_block_impl::<f32, false>(&data, r, &p, 0, &mut a, w, true).unwrap();
            let mut b = vec![0u32; t * w];
            select_block(&data, r, &p, 0, &mut b, w, true).unwrap();
            assert_eq!(a, b, "k={k} m={m}");
            let rc = Rows { rows: t, cols: w, stride: w, offset: 0 };
            let inv_tau = (1.0 / p.tau) as f32;
            let mut ya = vec![0f32; t * p.k];
            weights_block_impl(&data, r, &a, rc, &p, 0, &mut ya, inv_tau, p.k + p.m).unwrap();
            let mut yb = vec![0f32; t * p.k];
            weights_block(&data, r, &a, rc, &p, 0, &mut yb, inv_tau, p.k + p.m).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&ya), bits(&yb), "k={k} m={m}");
            // The saved y (copied above) are the bits the weights op computes from the logits.
            let mut yc = vec![0f32; t * p.k];
            weights_block(&data, r, &a, rc, &p, 0, &mut yc, inv_tau, 0).unwrap();
            assert_eq!(bits(&ya), bits(&yc), "k={k} m={m}");
        }
    }

    #[test]
    fn exp_f32_is_close_to_libm() {
        let mut worst = 0f64;
        for i in 0..200_000 {
            let x = -90.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            if want < f32::MIN_POSITIVE as f64 {
                assert!(exp_f32(x) <= f32::MIN_POSITIVE);
                continue;
            }
            worst = worst.max(((exp_f32(x) as f64 - want) / want).abs());
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(f32::NAN).is_nan());
    }
}
