//! The row blocks of the Gumbel router's CPU ops: batches of rows through top-K (eight rows at a
//! time where the AVX2 network applies), noise and choice, compiled twice (portable and
//! AVX2 + FMA + POPCNT, chosen at run time; both give the same bits), and the per-dtype top-K
//! dispatch [`TopK`].

#[cfg(target_arch = "x86_64")]
use super::avx2::{choose_batch_avx2, top_k_f32_avx2};
use super::cpu::{choose_row, noise_row, top_k_f32, top_k_insertion, weights_row, LANES};
#[cfg(target_arch = "x86_64")]
use super::network_avx2;
use super::{GumbelParams, MAX_K};
use crate::ops::backend::cpu::{Float, Rows};
#[cfg(target_arch = "x86_64")]
use crate::rng;

/// The router's top-K paths per element type (the f32 ones have AVX2 builds).
pub(super) trait TopK: Float {
    /// Rows as f32 (for the one-register AVX2 paths), None for f64.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn as_f32_rows(rows: &[[Self; MAX_K]]) -> Option<&[[f32; MAX_K]]>;
    /// Top-K of a row into `cv`/`ci` (best first, ties to the lower index); Err(expert) at the
    /// first non-finite logit. `AVX2`: the caller runs on a CPU with AVX2 (the `*_avx2` blocks).
    fn top_k<const AVX2: bool>(
        lg: &[Self],
        k: usize,
        cv: &mut [Self; MAX_K],
        ci: &mut [u32; MAX_K],
    ) -> std::result::Result<(), usize>;
    /// Top-K of 8 rows at once into `cv`/`ci` (8 rows each); returns the mask of the rows done
    /// (the others go through [`TopK::top_k`]). 0 where no batched path applies.
    fn top_k_8rows<const AVX2: bool>(
        rows: [&[Self]; LANES],
        k: usize,
        cv: &mut [[Self; MAX_K]],
        ci: &mut [[u32; MAX_K]],
    ) -> u32;
}

impl TopK for f32 {
    #[inline(always)]
    fn as_f32_rows(rows: &[[Self; MAX_K]]) -> Option<&[[f32; MAX_K]]> {
        Some(rows)
    }

    #[inline(always)]
    fn top_k<const AVX2: bool>(
        lg: &[f32],
        k: usize,
        cv: &mut [f32; MAX_K],
        ci: &mut [u32; MAX_K],
    ) -> std::result::Result<(), usize> {
        #[cfg(target_arch = "x86_64")]
        if AVX2 {
            // SAFETY: AVX2 is true only inside the `*_avx2` block functions, run only on AVX2 CPUs.
            return unsafe { top_k_f32_avx2(lg, k, cv, ci) };
        }
        top_k_f32(lg, k, cv, ci)
    }

    /// The network of `network_avx2` where it applies.
    #[inline(always)]
    fn top_k_8rows<const AVX2: bool>(
        rows: [&[f32]; LANES],
        k: usize,
        cv: &mut [[f32; MAX_K]],
        ci: &mut [[u32; MAX_K]],
    ) -> u32 {
        #[cfg(target_arch = "x86_64")]
        if AVX2 && network_avx2::fits(rows[0].len(), k) {
            // SAFETY: AVX2 is true only inside the `*_avx2` block functions, run only on AVX2 CPUs;
            // the rows of one tensor all hold E logits.
            return unsafe { network_avx2::top_k_8rows(rows, k, cv, ci) };
        }
        let _ = (rows, k, cv, ci);
        0
    }
}

/// f64 (the gradient-check precision): the insertion scan, no batched path.
impl TopK for f64 {
    #[inline(always)]
    fn as_f32_rows(_rows: &[[Self; MAX_K]]) -> Option<&[[f32; MAX_K]]> {
        None
    }

    #[inline(always)]
    fn top_k<const AVX2: bool>(
        lg: &[f64],
        k: usize,
        cv: &mut [f64; MAX_K],
        ci: &mut [u32; MAX_K],
    ) -> std::result::Result<(), usize> {
        top_k_insertion(lg, k, cv, ci)
    }

    #[inline(always)]
    fn top_k_8rows<const AVX2: bool>(
        _rows: [&[f64]; LANES],
        _k: usize,
        _cv: &mut [[f64; MAX_K]],
        _ci: &mut [[u32; MAX_K]],
    ) -> u32 {
        0
    }
}

/// Rows per batch of the selection: first the top-K of every row (8 rows at a time, or one by
/// one), then the noise of all of them (branch-free, two rows' Philox chains interleaved), then the
/// choice. At most 32 (a u32 holds the batch's rows left to the per-row top-K), a multiple of 8.
pub(super) const BATCH: usize = 16;
const _: () = assert!(BATCH <= 32 && BATCH.is_multiple_of(LANES));
/// Rows whose noise is drawn together (interleaved chains).
#[cfg(target_arch = "x86_64")]
const NX: usize = 2;

/// The noise of a batch of rows t0.. (their candidates `ci`) into `g`.
#[inline(always)]
fn noise_batch<const AVX2: bool>(p: &GumbelParams, t0: usize, ci: &[[u32; MAX_K]], g: &mut [[f32; MAX_K]]) {
    let k = p.k;
    #[cfg(target_arch = "x86_64")]
    if AVX2 && p.noisy && k <= LANES {
        let lanes = |c: &[u32; MAX_K]| -> [u32; LANES] { c[..LANES].try_into().expect("MAX_K >= LANES") };
        let token = |i: usize| p.token_base.wrapping_add((t0 + i) as u32);
        let mut i = 0;
        while i + NX <= ci.len() {
            let ls: [[u32; LANES]; NX] = std::array::from_fn(|j| lanes(&ci[i + j]));
            // SAFETY: AVX2 is true only inside the `*_avx2` block functions, run only on AVX2 CPUs.
            let gs = unsafe {
                rng::gumbel_noise_avx2::<NX>(
                    p.seed,
                    p.step,
                    p.layer,
                    std::array::from_fn(|j| token(i + j)),
                    std::array::from_fn(|j| &ls[j]),
                )
            };
            for j in 0..NX {
                g[i + j][..LANES].copy_from_slice(&gs[j]);
            }
            i += NX;
        }
        while i < ci.len() {
            noise_row::<AVX2>(p, t0 + i, &ci[i], k, &mut g[i]);
            i += 1;
        }
        return;
    }
    for (i, (c, gi)) in ci.iter().zip(g.iter_mut()).enumerate() {
        noise_row::<AVX2>(p, t0 + i, c, k, gi);
    }
}

/// Whether the `*_avx2` block functions may run (x86-64 with AVX2, FMA and POPCNT).
#[inline]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) fn use_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("popcnt")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Rows t0.. of the selection into `out` (w columns per row), in batches of [`BATCH`] rows. The row
/// kernels are `#[inline(always)]` all the way down, so `select_block_avx2` compiles them for
/// AVX2 + FMA. Err((token, expert)) at the first non-finite logit.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn select_block_impl<T: TopK, const AVX2: bool>(
    data: &[T],
    r: Rows,
    p: &GumbelParams,
    t0: usize,
    out: &mut [u32],
    w: usize,
    save: bool,
) -> std::result::Result<(), (usize, usize)> {
    let mut cv = [[T::ZERO; MAX_K]; BATCH];
    let mut ci = [[0u32; MAX_K]; BATCH];
    let mut g = [[0f32; MAX_K]; BATCH];
    for (b, ob) in out.chunks_mut(w * BATCH).enumerate() {
        let (tb, n) = (t0 + b * BATCH, ob.len() / w);
        // Eight rows at a time where the network applies, then the rows it left and the tail.
        let mut left = 0u32; // bit i: row i still needs the per-row top-K
        for i0 in (0..n).step_by(LANES) {
            let rows = n.min(i0 + LANES) - i0;
            let done = if AVX2 && rows == LANES {
                let rs = std::array::from_fn(|j| r.row(data, tb + i0 + j));
                T::top_k_8rows::<AVX2>(rs, p.k, &mut cv[i0..i0 + LANES], &mut ci[i0..i0 + LANES])
            } else {
                0
            };
            left |= (!done & ((1 << rows) - 1)) << i0;
        }
        while left != 0 {
            let i = left.trailing_zeros() as usize;
            left &= left - 1;
            T::top_k::<AVX2>(r.row(data, tb + i), p.k, &mut cv[i], &mut ci[i]).map_err(|e| (tb + i, e))?;
        }
        noise_batch::<AVX2>(p, tb, &ci[..n], &mut g[..n]);
        #[cfg(target_arch = "x86_64")]
        if AVX2 && p.k <= 2 * LANES {
            if let Some(cvf) = T::as_f32_rows(&cv[..n]) {
                // SAFETY: AVX2 is true only inside the `*_avx2` block functions (AVX2 CPUs); K <= 16.
                unsafe { choose_batch_avx2(p, cvf, &ci[..n], &g[..n], ob, w, save) };
                continue;
            }
        }
        for (i, o) in ob.chunks_exact_mut(w).enumerate() {
            choose_row(p, &cv[i], &ci[i], &g[i], o, save);
        }
    }
    Ok(())
}

/// # Safety
/// The CPU must have AVX2 and FMA ([`use_avx2`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,popcnt")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn select_block_avx2<T: TopK>(
    data: &[T],
    r: Rows,
    p: &GumbelParams,
    t0: usize,
    out: &mut [u32],
    w: usize,
    save: bool,
) -> std::result::Result<(), (usize, usize)> {
    select_block_impl::<T, true>(data, r, p, t0, out, w, save)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn select_block<T: TopK>(
    data: &[T],
    r: Rows,
    p: &GumbelParams,
    t0: usize,
    out: &mut [u32],
    w: usize,
    save: bool,
) -> std::result::Result<(), (usize, usize)> {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: the CPU has the features the function was compiled for.
        return unsafe { select_block_avx2(data, r, p, t0, out, w, save) };
    }
    select_block_impl::<T, false>(data, r, p, t0, out, w, save)
}

/// Rows t0.. of the weights into `y` (K per row); see [`select_block_impl`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn weights_block_impl<T: Float>(
    lg: &[T],
    rl: Rows,
    cand: &[u32],
    rc: Rows,
    p: &GumbelParams,
    t0: usize,
    y: &mut [T],
    inv_tau: T,
    y_col: usize,
) -> std::result::Result<(), (usize, usize)> {
    for (i, yr) in y.chunks_exact_mut(p.k).enumerate() {
        let t = t0 + i;
        weights_row(rl.row(lg, t), rc.row(cand, t), yr, p, inv_tau, t, y_col).map_err(|e| (t, e))?;
    }
    Ok(())
}

/// # Safety
/// The CPU must have AVX2 and FMA ([`use_avx2`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,popcnt")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn weights_block_avx2<T: Float>(
    lg: &[T],
    rl: Rows,
    cand: &[u32],
    rc: Rows,
    p: &GumbelParams,
    t0: usize,
    y: &mut [T],
    inv_tau: T,
    y_col: usize,
) -> std::result::Result<(), (usize, usize)> {
    weights_block_impl(lg, rl, cand, rc, p, t0, y, inv_tau, y_col)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn weights_block<T: Float>(
    lg: &[T],
    rl: Rows,
    cand: &[u32],
    rc: Rows,
    p: &GumbelParams,
    t0: usize,
    y: &mut [T],
    inv_tau: T,
    y_col: usize,
) -> std::result::Result<(), (usize, usize)> {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: the CPU has the features the function was compiled for.
        return unsafe { weights_block_avx2(lg, rl, cand, rc, p, t0, y, inv_tau, y_col) };
    }
    weights_block_impl(lg, rl, cand, rc, p, t0, y, inv_tau, y_col)
}
