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
//!    (Gumbel-top-m, ties to the lower position). Indices carry no gradient.
//! 2. [`GumbelWeights`] (`CustomOp2`: logits (T, E), cand (T, >= K) u32): y = softmax((cand + g) / tau)
//!    over the K candidates -> (T, K), differentiable in the logits. The noise g is regenerated from
//!    Philox keyed by (seed, step, layer, token_base + t, expert), never stored: the selection and the
//!    weights see the same g because it is a pure function of the key. `cand` may be the (T, K + m)
//!    output of [`GumbelSelect`] itself (only its first K columns are read).
//! 3. [`GumbelWeightsBwd`] (`CustomOp3`: y, dy, cand -> dlogits (T, E)): the backward of 2, a kernel of
//!    its own: y * (dy - sum(y * dy)) / tau at the candidate columns, zero elsewhere. It uses the
//!    forward result y (given to `bwd` as `res`), so the backward needs neither the noise nor the logits.
//!
//! The straight-through estimator on top (forward weight exactly 1/m, backward the soft gradient of
//! the m selected) stays plain tensor ops (`gather` has a backward): see [`gumbel_route`], which
//! is the whole router path given logits.
//!
//! Noise: the kernels implement Philox4x32-10 bit-identically to `rng::philox` (`kernels/philox.h`)
//! with the same u32 -> (0, 1) -> -ln(-ln u) mapping. The CPU op calls `rng::gumbel_noise` itself, so
//! on the CPU the noise is bit-identical to the reference; on a GPU only the final `log` may differ by
//! an ulp, which can flip a selection only at a near-exact tie of two perturbed values.
//!
//! Precision: f32 on every backend; the CPU also runs f64 (for finite-difference gradient checks).
//! The CPU forward is multi-threaded over rows (rayon) with no per-element allocation. Limits:
//! 1 <= K <= min(E, 32), m <= K, tau > 0. Non-finite logits: the CPU ops fail with the row and
//! expert; the GPU kernels do not check (an out-of-range candidate index gives a NaN row, never a
//! stray read).
//!
//! Kernels: `kernels/gumbel_router.cuh` holds the row bodies once (`gm_select_row`,
//! `gm_weights_row`, `gm_weights_bwd_row`); `kernels/gumbel_router.cu` (PTX, built by `build.rs`
//! under feature `cuda`) and `kernels/gumbel_router.metal` (compiled at run time, pipelines cached
//! per device) are thin entry points `<op>_f32` with one thread per row.

use crate::rng::gumbel_noise;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

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

    #[inline]
    fn noise(&self, row: usize, expert: usize) -> f32 {
        if !self.noisy {
            return 0.0;
        }
        gumbel_noise(self.seed, self.step, self.layer, self.token_base.wrapping_add(row as u32), expert as u32)
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
    pub pad: u32,
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

/// A 2-D layout read row by row: (rows, cols, row stride, start offset). Rows may be strided (a
/// `narrow` of a wider tensor); within a row the elements must be contiguous.
#[derive(Clone, Copy, Debug)]
struct Rows {
    rows: usize,
    cols: usize,
    stride: usize,
    offset: usize,
}

impl Rows {
    fn of(l: &Layout, what: &str, op: &str) -> Result<Self> {
        let dims = l.dims();
        if dims.len() != 2 {
            candle_core::bail!("{op}: {what} must be 2-D (T, _), got shape {:?}", l.shape());
        }
        let (rows, cols) = (dims[0], dims[1]);
        let st = l.stride();
        if cols > 1 && st[1] != 1 {
            candle_core::bail!("{op}: {what} rows must be contiguous (stride {st:?}); call .contiguous()");
        }
        let stride = if rows > 1 { st[0] } else { cols };
        Ok(Self { rows, cols, stride, offset: l.start_offset() })
    }

    /// The `r`-th row of `data` (the slice the storage holds).
    #[inline]
    fn row<'a, T>(&self, data: &'a [T], r: usize) -> &'a [T] {
        let s = self.offset + r * self.stride;
        &data[s..s + self.cols]
    }

    fn check_len(&self, len: usize, what: &str, op: &str) -> Result<()> {
        let need = if self.rows == 0 { 0 } else { self.offset + (self.rows - 1) * self.stride + self.cols };
        if need > len {
            candle_core::bail!("{op}: {what} layout reaches element {need} of a storage of {len}");
        }
        Ok(())
    }
}

/// The float types the CPU kernels run in.
trait Real: Copy + PartialOrd + Send + Sync + std::fmt::Display + 'static {
    const ZERO: Self;
    fn from_f32(v: f32) -> Self;
    fn from_f64(v: f64) -> Self;
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    fn exp(self) -> Self;
    fn is_finite(self) -> bool;
}

macro_rules! real {
    ($t:ty) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            #[inline]
            fn from_f32(v: f32) -> Self {
                v as $t
            }
            #[inline]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline]
            fn add(self, o: Self) -> Self {
                self + o
            }
            #[inline]
            fn sub(self, o: Self) -> Self {
                self - o
            }
            #[inline]
            fn mul(self, o: Self) -> Self {
                self * o
            }
            #[inline]
            fn div(self, o: Self) -> Self {
                self / o
            }
            #[inline]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
        }
    };
}
real!(f32);
real!(f64);

// ---------------------------------------------------------------------------------------------
// CPU row kernels: the Rust twins of gm_select_row / gm_weights_row / gm_weights_bwd_row.

/// One row of the selection: `out` gets K candidates then m positions. Err((expert, value)) on a
/// non-finite logit.
#[inline]
fn select_row<T: Real>(lg: &[T], out: &mut [u32], p: &GumbelParams, row: usize) -> std::result::Result<(), usize> {
    let k = p.k;
    let mut cv = [T::ZERO; MAX_K];
    let mut ci = [0u32; MAX_K];
    let mut n = 0usize;
    for (e, &v) in lg.iter().enumerate() {
        if !v.is_finite() {
            return Err(e);
        }
        let mut j = if n < k {
            n += 1;
            n - 1
        } else if v > cv[k - 1] {
            k - 1
        } else {
            continue;
        };
        // Strictly larger values move up: equal logits keep the lower expert index first.
        while j > 0 && v > cv[j - 1] {
            cv[j] = cv[j - 1];
            ci[j] = ci[j - 1];
            j -= 1;
        }
        cv[j] = v;
        ci[j] = e as u32;
    }
    for i in 0..k {
        cv[i] = cv[i].add(T::from_f32(p.noise(row, ci[i] as usize)));
        out[i] = ci[i];
    }
    // Gumbel-top-m: m rounds of argmax over the untaken positions (strict >: ties to lower position).
    let mut taken = 0u32;
    for s in 0..p.m {
        let mut best = usize::MAX;
        for i in 0..k {
            if (taken >> i) & 1 == 0 && (best == usize::MAX || cv[i] > cv[best]) {
                best = i;
            }
        }
        taken |= 1 << best;
        out[k + s] = best as u32;
    }
    Ok(())
}

/// One row of y = softmax((cand + g) * inv_tau). Err(position) on an out-of-range candidate or a
/// non-finite candidate logit.
#[inline]
fn weights_row<T: Real>(
    lg: &[T],
    cand: &[u32],
    y: &mut [T],
    p: &GumbelParams,
    inv_tau: T,
    row: usize,
) -> std::result::Result<(), usize> {
    let k = p.k;
    let mut z = [T::ZERO; MAX_K];
    for i in 0..k {
        let e = cand[i] as usize;
        let Some(&l) = lg.get(e).filter(|l| l.is_finite()) else { return Err(i) };
        // Same rounding steps as the reference: (cand + g) in T, then `* (1/tau)` (candle's `t / tau`).
        z[i] = l.add(T::from_f32(p.noise(row, e))).mul(inv_tau);
    }
    let mut mx = z[0];
    for &v in &z[1..k] {
        if v > mx {
            mx = v;
        }
    }
    let mut sum = T::ZERO;
    for v in &mut z[..k] {
        *v = v.sub(mx).exp();
        sum = sum.add(*v);
    }
    for (o, &v) in y.iter_mut().zip(&z[..k]) {
        *o = v.div(sum);
    }
    Ok(())
}

/// One row of the backward: dlogits (E) from y (K), dy (K) and the candidates (K).
#[inline]
fn bwd_row<T: Real>(y: &[T], dy: &[T], cand: &[u32], dl: &mut [T], inv_tau: T) -> std::result::Result<(), usize> {
    dl.fill(T::ZERO);
    let mut dot = T::ZERO;
    for (&a, &b) in y.iter().zip(dy) {
        dot = dot.add(a.mul(b));
    }
    for (i, ((&a, &b), &e)) in y.iter().zip(dy).zip(cand).enumerate() {
        let Some(slot) = dl.get_mut(e as usize) else { return Err(i) };
        *slot = slot.add(a.mul(b.sub(dot)).mul(inv_tau));
    }
    Ok(())
}

fn u32_slice<'a>(s: &'a CpuStorage, what: &str, op: &str) -> Result<&'a [u32]> {
    match s {
        CpuStorage::U32(v) => Ok(v),
        other => candle_core::bail!("{op}: {what} must be u32, got {:?}", other.dtype()),
    }
}

// ---------------------------------------------------------------------------------------------
// Op 1: GumbelSelect.

/// logits (T, E) -> (T, K + m) u32: K candidates (best first), then m selected positions within K.
#[derive(Clone, Debug)]
pub struct GumbelSelect(pub GumbelParams);

impl GumbelSelect {
    fn cpu<T: Real>(&self, data: &[T], r: Rows) -> Result<Vec<u32>> {
        let p = &self.0;
        let w = p.k + p.m;
        let mut out = vec![0u32; r.rows * w];
        out.par_chunks_mut(w).with_min_len(ROWS_PER_TASK).enumerate().try_for_each(|(t, o)| {
            let row = r.row(data, t);
            select_row(row, o, p, t).map_err(|e| {
                candle_core::Error::Msg(format!(
                    "non-finite router logit {} at layer {}, step {}, token {t}, expert {e}: training diverged",
                    row[e], p.layer, p.step
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
        self.0.check(r.cols)?;
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
        Ok((CpuStorage::U32(out), Shape::from((r.rows, self.0.k + self.0.m))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let r = Rows::of(l, "logits", self.name())?;
        self.0.check(r.cols)?;
        let w = self.0.k + self.0.m;
        let mut gp = GmParams::new(&self.0, r.rows, r.cols)?;
        gp.logits_stride = r.stride as u32;
        gp.y_stride = w as u32;
        let out = cuda::select(s, r, gp, r.rows * w)?;
        Ok((out, Shape::from((r.rows, w))))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(&self, s: &candle_core::MetalStorage, l: &Layout) -> Result<(candle_core::MetalStorage, Shape)> {
        let r = Rows::of(l, "logits", self.name())?;
        self.0.check(r.cols)?;
        let w = self.0.k + self.0.m;
        let mut gp = GmParams::new(&self.0, r.rows, r.cols)?;
        gp.logits_stride = r.stride as u32;
        gp.y_stride = w as u32;
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
#[derive(Clone, Debug)]
pub struct GumbelWeights(pub GumbelParams);

impl GumbelWeights {
    fn cpu<T: Real>(&self, lg: &[T], rl: Rows, cand: &[u32], rc: Rows) -> Result<Vec<T>> {
        let p = &self.0;
        let k = p.k;
        let inv_tau = T::from_f64(1.0 / p.tau);
        let mut y = vec![T::ZERO; rl.rows * k];
        y.par_chunks_mut(k).with_min_len(ROWS_PER_TASK).enumerate().try_for_each(|(t, yr)| {
            let c = &rc.row(cand, t)[..k];
            weights_row(rl.row(lg, t), c, yr, p, inv_tau, t).map_err(|i| {
                candle_core::Error::Msg(format!(
                    "gumbel-weights: candidate {} of token {t} is out of range (E = {}) or its logit is not finite",
                    c[i], rl.cols
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
        let mut gp = GmParams::new(&self.0, rl.rows, rl.cols)?;
        gp.logits_stride = rl.stride as u32;
        gp.idx_stride = rc.stride as u32;
        gp.y_stride = self.0.k as u32;
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
        let mut gp = GmParams::new(&self.0, rl.rows, rl.cols)?;
        gp.logits_stride = rl.stride as u32;
        gp.idx_stride = rc.stride as u32;
        gp.y_stride = self.0.k as u32;
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
        let mut dl = vec![T::ZERO; ry.rows * e];
        dl.par_chunks_mut(e.max(1)).with_min_len(ROWS_PER_TASK).enumerate().try_for_each(|(t, o)| {
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
        let mut gp = GmParams::new(&self.p, ry.rows, self.e)?;
        gp.y_stride = ry.stride as u32;
        gp.dy_stride = rd.stride as u32;
        gp.idx_stride = rc.stride as u32;
        gp.logits_stride = self.e as u32;
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
        let mut gp = GmParams::new(&self.p, ry.rows, self.e)?;
        gp.y_stride = ry.stride as u32;
        gp.dy_stride = rd.stride as u32;
        gp.idx_stride = rc.stride as u32;
        gp.logits_stride = self.e as u32;
        let out = metal::launch(
            "gumbel_weights_bwd_f32",
            &[
                (s1, ry.offset, candle_core::DType::F32),
                (s2, rd.offset, candle_core::DType::F32),
                (s3, rc.offset, candle_core::DType::U32),
            ],
            (ry.rows * self.e, candle_core::DType::F32),
            gp,
            ry.rows,
        )?;
        Ok((out, Shape::from((ry.rows, self.e))))
    }
}

// ---------------------------------------------------------------------------------------------
// The public entry points.

/// logits (T, E) -> (T, K + m) u32: candidates, then selected positions within them. No gradient.
pub fn gumbel_select(logits: &Tensor, p: &GumbelParams) -> Result<Tensor> {
    logits.apply_op1_no_bwd(&GumbelSelect(*p))
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
    /// (T, K + m) u32 output of [`gumbel_select`] (candidates, then selected positions).
    pub cand_sel: Tensor,
}

/// Runs the whole Gumbel router on `logits` (T, E): select, weights, straight-through.
/// With `hard = false`, `p.m` is ignored (no selection) and the K candidates are the experts.
pub fn gumbel_route(logits: &Tensor, p: &GumbelParams, hard: bool) -> Result<FusedRouting> {
    let p = GumbelParams { m: if hard { p.m } else { 0 }, ..*p };
    if hard && p.m == 0 {
        candle_core::bail!("gumbel_route: hard routing needs m >= 1");
    }
    let (k, m) = (p.k, p.m);
    let cand_sel = gumbel_select(logits, &p)?; // (T, K + m) u32
    let y = gumbel_weights(logits, &cand_sel, &p)?; // (T, K)
    let host = cand_sel.flatten_all()?.to_vec1::<u32>()?; // (T * (K + m)), one copy
    if !hard {
        return Ok(FusedRouting { indices: host, m: k, weights: y.clone(), y, cand_sel });
    }
    let mut indices = Vec::with_capacity(host.len() / (k + m) * m);
    for row in host.chunks_exact(k + m) {
        indices.extend(row[k..].iter().map(|&s| row[s as usize]));
    }
    let sel = cand_sel.narrow(1, k, m)?.contiguous()?; // (T, m) positions within K
    let ys = y.gather(&sel, 1)?; // (T, m)
                                 // (ys - ys) is exactly 0 forward, so each weight is exactly 1/m; the gradient is d ys.
    let weights = (ys.sub(&ys.detach())? + 1.0 / m as f64)?;
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
        // The kernel writes every element of each row (zeros included), so no memset is needed.
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
            // SAFETY: reads within the checked layouts, writes rows * E floats.
            unsafe { b.launch(cfg(ry.rows)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// Metal launch glue: the library is compiled from source once per device and its pipelines cached.

#[cfg(feature = "metal")]
mod metal {
    use super::GmParams;
    use candle_core::backend::BackendStorage;
    use candle_core::metal_backend::DeviceId;
    use candle_core::{DType, MetalStorage, Result};
    use candle_metal_kernels::metal::{ComputeCommandEncoder, ComputePipeline, Library};
    use objc2_metal::MTLSize;
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    const PHILOX_H: &str = include_str!("../../kernels/philox.h");
    const ROUTER_CUH: &str = include_str!("../../kernels/gumbel_router.cuh");
    const ROUTER_METAL: &str = include_str!("../../kernels/gumbel_router.metal");

    /// The .metal file with its `#include "gumbel_router.cuh"` replaced by the headers' text.
    fn source() -> String {
        let body = format!("{PHILOX_H}\n{ROUTER_CUH}\n").replace("#pragma once", "");
        let src = ROUTER_METAL.replace("#include \"gumbel_router.cuh\"", &body);
        format!("#define GM_INLINED 1\n{src}")
    }

    type Cache = Mutex<HashMap<DeviceId, (Library, HashMap<&'static str, ComputePipeline>)>>;

    fn pipeline(dev: &candle_core::MetalDevice, name: &'static str) -> Result<ComputePipeline> {
        static CACHE: OnceLock<Cache> = OnceLock::new();
        let mut cache =
            CACHE.get_or_init(Default::default).lock().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let entry = match cache.entry(dev.id()) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let lib = dev
                    .device()
                    .new_library_with_source(&source(), None)
                    .map_err(|e| candle_core::Error::Msg(format!("gumbel router metal library: {e}")))?;
                v.insert((lib, HashMap::new()))
            }
        };
        if let Some(p) = entry.1.get(name) {
            return Ok(p.clone());
        }
        let func = entry.0.get_function(name, None).map_err(|e| candle_core::Error::Msg(format!("{name}: {e}")))?;
        let p = dev
            .device()
            .new_compute_pipeline_state_with_function(&func)
            .map_err(|e| candle_core::Error::Msg(format!("{name}: {e}")))?;
        entry.1.insert(name, p.clone());
        Ok(p)
    }

    /// Launches `name` with one thread per row: buffers `inputs` (storage, element offset, expected
    /// dtype) at indices 0.., the new output (n, dtype) next, then the params.
    pub fn launch(
        name: &'static str,
        inputs: &[(&MetalStorage, usize, DType)],
        (n, dtype): (usize, DType),
        gp: GmParams,
        rows: usize,
    ) -> Result<MetalStorage> {
        let dev = inputs[0].0.device();
        for (s, _, want) in inputs {
            if s.dtype() != *want {
                candle_core::bail!("{name}: Metal input must be {want:?}, got {:?}", s.dtype());
            }
        }
        let out = dev.new_buffer_builder().with_size_for(n.max(1), dtype).with_label(name).build()?;
        if rows > 0 {
            let pipe = pipeline(dev, name)?;
            let guard = dev.command_encoder()?;
            let enc: &ComputeCommandEncoder = guard.as_ref();
            enc.set_compute_pipeline_state(&pipe);
            for (i, (s, off, dt)) in inputs.iter().enumerate() {
                enc.set_input_buffer(i, Some(s.buffer()), off * dt.size_in_bytes());
            }
            let j = inputs.len();
            enc.set_output_buffer(j, Some(&out), 0);
            enc.set_bytes(j + 1, &gp);
            let width = pipe.max_total_threads_per_threadgroup().min(rows).max(1);
            enc.dispatch_thread_groups(
                MTLSize { width: rows.div_ceil(width), height: 1, depth: 1 },
                MTLSize { width, height: 1, depth: 1 },
            );
        }
        Ok(MetalStorage::new(out, dev.clone(), n, dtype))
    }
}
