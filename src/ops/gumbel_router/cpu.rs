//! The CPU kernels of the Gumbel router ops: the Rust twins of `gm_select_row`,
//! `gm_weights_row` and `gm_weights_bwd_elem` in `kernels/gumbel_router.cuh`, with the row loops
//! the ops run over rayon blocks.

use super::*;
// CPU row kernels: the Rust twins of gm_select_row / gm_weights_row / gm_weights_bwd_elem.
//
// Where the time goes (T = 65,536, E = 64, K = 8): the top-K scan of the E logits, then per
// candidate one Philox call and two logs, then the softmax over K. So:
// - the top-K of 8 rows at a time is a sorting network with the rows in AVX2 lanes
//   (`network_avx2`: f32, K <= 16, E a multiple of 8), else per row a threshold filter plus a rank
//   counted 8 survivors at a time (f32, K <= 8), else an insertion scan;
// - rows go in batches of `BATCH` (all top-Ks, then all noise, then the choices);
// - the noise is 8 candidates per AVX2 register with two chains interleaved (two rows for K <= 8,
//   a row's two registers for K <= 16; `rng::gumbel_noise_avx2`, `rng::gumbel_noise_lanes` in the
//   portable build);
// - the select op saves y for the weights op (no second pass over the logits);
// - the choice and the softmax of K <= 8 are one register, of K <= 16 two;
// - the row loops are compiled twice (baseline and AVX2+FMA+POPCNT, picked at run time). No FMA
//   contraction happens in either build, so both give the same bits (tested).

/// Noise lanes per Philox batch (8 u32 = one AVX2 register).
pub(super) const LANES: usize = 8;

/// Gumbel noise of the first `k` candidates `ci` of row `row` into `g` (0 when not noisy).
#[inline(always)]
pub(super) fn noise_row<const AVX2: bool>(
    p: &GumbelParams,
    row: usize,
    ci: &[u32; MAX_K],
    k: usize,
    g: &mut [f32; MAX_K],
) {
    if !p.noisy {
        *g = [0.0; MAX_K];
        return;
    }
    let token = p.token_base.wrapping_add(row as u32);
    let mut c = 0;
    while c < k {
        let lanes: &[u32; LANES] = ci[c..c + LANES].try_into().expect("MAX_K is a multiple of LANES");
        #[cfg(target_arch = "x86_64")]
        if AVX2 && c + LANES < k {
            // Two registers of candidates (K > 8): their Philox chains interleaved.
            let next: &[u32; LANES] = ci[c + LANES..c + 2 * LANES].try_into().expect("MAX_K is a multiple of 16");
            // SAFETY: AVX2 is true only inside the `*_avx2` block functions, run only on AVX2 CPUs.
            let [a, b] = unsafe { rng::gumbel_noise_avx2(p.seed, p.step, p.layer, [token; 2], [lanes, next]) };
            g[c..c + LANES].copy_from_slice(&a);
            g[c + LANES..c + 2 * LANES].copy_from_slice(&b);
            c += 2 * LANES;
            continue;
        }
        #[cfg(target_arch = "x86_64")]
        let v = if AVX2 {
            // SAFETY: AVX2 is true only inside the `*_avx2` block functions, run only on AVX2 CPUs.
            unsafe { rng::gumbel_noise_avx2(p.seed, p.step, p.layer, [token], [lanes])[0] }
        } else {
            rng::gumbel_noise_lanes(p.seed, p.step, p.layer, token, lanes)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let v = rng::gumbel_noise_lanes(p.seed, p.step, p.layer, token, lanes);
        g[c..c + LANES].copy_from_slice(&v);
        c += LANES;
    }
}

// `exp_f32` and its constants live in `ops::float`, shared with the layer ops.
pub(super) use crate::ops::float::exp_f32;
#[cfg(target_arch = "x86_64")]
use crate::ops::float::{EXP_C1, EXP_C2, EXP_HI, EXP_LO, EXP_MAGIC, EXP_P};

/// [`exp_f32`] on 8 lanes: the same operations in the same order (no FMA), so the same bits.
///
/// # Safety
/// AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exp8_avx2(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // The clamp as max then min: NaN stays NaN (the second operand is returned for NaN).
    let x = _mm256_min_ps(_mm256_set1_ps(EXP_HI), _mm256_max_ps(_mm256_set1_ps(EXP_LO), x));
    let t = _mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)), _mm256_set1_ps(EXP_MAGIC));
    let n = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(EXP_MAGIC.to_bits() as i32));
    let fx = _mm256_sub_ps(t, _mm256_set1_ps(EXP_MAGIC));
    let r = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(EXP_C1)));
    let r = _mm256_sub_ps(r, _mm256_mul_ps(fx, _mm256_set1_ps(EXP_C2)));
    let z = _mm256_mul_ps(r, r);
    let mut y = _mm256_set1_ps(EXP_P[0]);
    for &p in &EXP_P[1..] {
        y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(p));
    }
    let y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(y, z), r), _mm256_set1_ps(1.0));
    let scale = _mm256_slli_epi32::<23>(_mm256_add_epi32(n, _mm256_set1_epi32(127)));
    _mm256_mul_ps(y, _mm256_castsi256_ps(scale))
}

/// The float types the CPU kernels run in.
pub(super) trait Real: Copy + PartialOrd + Send + Sync + std::fmt::Display + 'static {
    const ZERO: Self;
    /// f32, whose weights the select op can save as bits for the weights op to copy.
    const IS_F32: bool;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    fn from_f64(v: f64) -> Self;
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    /// The exp of the softmax: [`exp_f32`] for f32, libm for f64 (the gradient-check precision).
    fn exp(self) -> Self;
    /// Rows as f32 (for the one-register AVX2 paths), None for f64.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn as_f32_rows(rows: &[[Self; MAX_K]]) -> Option<&[[f32; MAX_K]]>;
    fn is_finite(self) -> bool;
    /// Top-K of a row into `cv`/`ci` (best first, ties to the lower index); Err(expert) at the
    /// first non-finite logit. `AVX2`: the caller runs on a CPU with AVX2 (the `*_avx2` blocks).
    fn top_k<const AVX2: bool>(
        lg: &[Self],
        k: usize,
        cv: &mut [Self; MAX_K],
        ci: &mut [u32; MAX_K],
    ) -> std::result::Result<(), usize>;
    /// Top-K of 8 rows at once into `cv`/`ci` (8 rows each); returns the mask of the rows done
    /// (the others go through [`Real::top_k`]). 0 where no batched path applies.
    fn top_k_8rows<const AVX2: bool>(
        rows: [&[Self]; LANES],
        k: usize,
        cv: &mut [[Self; MAX_K]],
        ci: &mut [[u32; MAX_K]],
    ) -> u32;
}

macro_rules! real {
    ($t:ty, $is_f32:expr, $exp:expr, $top_k:ident, $top_k_8rows:ident, $as_f32s:expr) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const IS_F32: bool = $is_f32;
            #[inline(always)]
            fn to_f32(self) -> f32 {
                self as f32
            }
            #[inline(always)]
            fn from_f32(v: f32) -> Self {
                v as $t
            }
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn add(self, o: Self) -> Self {
                self + o
            }
            #[inline(always)]
            fn sub(self, o: Self) -> Self {
                self - o
            }
            #[inline(always)]
            fn mul(self, o: Self) -> Self {
                self * o
            }
            #[inline(always)]
            fn div(self, o: Self) -> Self {
                self / o
            }
            #[inline(always)]
            fn exp(self) -> Self {
                $exp(self)
            }
            #[inline(always)]
            fn as_f32_rows(rows: &[[Self; MAX_K]]) -> Option<&[[f32; MAX_K]]> {
                $as_f32s(rows)
            }
            #[inline(always)]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            #[inline(always)]
            fn top_k<const AVX2: bool>(
                lg: &[Self],
                k: usize,
                cv: &mut [Self; MAX_K],
                ci: &mut [u32; MAX_K],
            ) -> std::result::Result<(), usize> {
                $top_k::<AVX2>(lg, k, cv, ci)
            }
            #[inline(always)]
            fn top_k_8rows<const AVX2: bool>(
                rows: [&[Self]; LANES],
                k: usize,
                cv: &mut [[Self; MAX_K]],
                ci: &mut [[u32; MAX_K]],
            ) -> u32 {
                $top_k_8rows::<AVX2>(rows, k, cv, ci)
            }
        }
    };
}
real!(f32, true, exp_f32, top_k_f32_dispatch, top_k_8rows_f32, Some);
real!(f64, false, f64::exp, top_k_f64_dispatch, top_k_8rows_none, |_| None);

/// [`Real::top_k_8rows`] for f32: the network of `network_avx2` where it applies.
#[inline(always)]
fn top_k_8rows_f32<const AVX2: bool>(
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

/// [`Real::top_k_8rows`] for f64 (the gradient-check precision): no batched path.
#[inline(always)]
fn top_k_8rows_none<const AVX2: bool>(
    _rows: [&[f64]; LANES],
    _k: usize,
    _cv: &mut [[f64; MAX_K]],
    _ci: &mut [[u32; MAX_K]],
) -> u32 {
    0
}

/// The largest of 8 lanes, broadcast (exact in any order).
///
/// # Safety
/// AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn hmax8(v: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_max_ss(h, _mm_shuffle_ps::<0b01>(h, h));
    _mm256_broadcastss_ps(h)
}

/// The sum of 8 lanes in [`softmax_sum`]'s tree order, broadcast: (a0 + a4, a1 + a5, a2 + a6,
/// a3 + a7), then ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)).
///
/// # Safety
/// AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn hsum8(v: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_shuffle_ps::<0b01>(h, h));
    _mm256_broadcastss_ps(h)
}

/// [`choose_row`] for a batch of rows with K <= 16 f32 candidates. For K <= 8, each row's perturbed
/// values z = cv + g in one AVX2 register, two rows at a time (their chains interleaved); for
/// 8 < K <= 16, in two registers, one row at a time ([`choose16_avx2`]). The same results as the
/// scalar loops (tested) without a data-dependent branch:
/// - each of the m rounds takes the lowest lane holding the maximum of the untaken lanes (the
///   scalar strict-> scan's tie rule) and sets it to -inf;
/// - y = softmax(z * inv_tau): the scale, [`exp_f32`] and the division lane-parallel with the same
///   operations (no FMA), the lanes past K zeroed and the sum in [`softmax_sum`]'s order, so the
///   same bits as [`softmax_scaled`].
///
/// # Safety
/// AVX2; 1 <= k <= 16, m <= k; `out` holds `cv.len()` rows of `w` = K + m (+ K when `save`) columns.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn choose_batch_avx2(
    p: &GumbelParams,
    cv: &[[f32; MAX_K]],
    ci: &[[u32; MAX_K]],
    g: &[[f32; MAX_K]],
    out: &mut [u32],
    w: usize,
    save: bool,
) {
    let (k, m, inv_tau) = (p.k, p.m, (1.0 / p.tau) as f32);
    if k > LANES {
        for (i, a) in out.chunks_exact_mut(w).enumerate() {
            a[..k].copy_from_slice(&ci[i][..k]);
            choose16_avx2(&cv[i], &g[i], k, m, inv_tau, a, save);
        }
        return;
    }
    let mut rows = out.chunks_exact_mut(w).enumerate();
    while let Some((i, a)) = rows.next() {
        a[..k].copy_from_slice(&ci[i][..k]);
        if let Some((j, b)) = rows.next() {
            b[..k].copy_from_slice(&ci[j][..k]);
            choose8_avx2::<2>([&cv[i], &cv[j]], [&g[i], &g[j]], k, m, inv_tau, [a, b], save);
        } else {
            choose8_avx2::<1>([&cv[i]], [&g[i]], k, m, inv_tau, [a], save);
        }
    }
}

/// The choice (columns K..K+m) and, when `save`, the y bits (columns K+m..2K+m) of N rows; see
/// [`choose_batch_avx2`].
///
/// # Safety
/// As [`choose_batch_avx2`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn choose8_avx2<const N: usize>(
    cv: [&[f32; MAX_K]; N],
    g: [&[f32; MAX_K]; N],
    k: usize,
    m: usize,
    inv_tau: f32,
    out: [&mut [u32]; N],
    save: bool,
) {
    use std::arch::x86_64::*;
    let c = |v: f32| _mm256_set1_ps(v);
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(k as i32), lane));
    let zv: [__m256; N] =
        std::array::from_fn(|j| _mm256_add_ps(_mm256_loadu_ps(cv[j].as_ptr()), _mm256_loadu_ps(g[j].as_ptr())));
    let mut open: [__m256; N] = std::array::from_fn(|j| _mm256_blendv_ps(c(f32::NEG_INFINITY), zv[j], valid));
    for s in 0..m {
        for j in 0..N {
            let hit = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(open[j], hmax8(open[j]))) as u32;
            let best = hit.trailing_zeros();
            // SAFETY: the row holds K + m >= k + s + 1 columns.
            *out[j].get_unchecked_mut(k + s) = best;
            let taken = _mm256_cmpeq_epi32(lane, _mm256_set1_epi32(best as i32));
            open[j] = _mm256_blendv_ps(open[j], c(f32::NEG_INFINITY), _mm256_castsi256_ps(taken));
        }
    }
    if !save {
        return;
    }
    for j in 0..N {
        let x = _mm256_mul_ps(zv[j], c(inv_tau));
        let mx = hmax8(_mm256_blendv_ps(c(f32::NEG_INFINITY), x, valid));
        // Lanes past K: +0.
        let e = _mm256_and_ps(exp8_avx2(_mm256_sub_ps(x, mx)), valid);
        let yv = _mm256_castps_si256(_mm256_div_ps(e, hsum8(e)));
        let dst = &mut out[j][k + m..2 * k + m];
        if k == LANES {
            _mm256_storeu_si256(dst.as_mut_ptr() as *mut __m256i, yv);
        } else {
            // Only the first k lanes: the row's y columns end there.
            _mm256_maskstore_epi32(dst.as_mut_ptr() as *mut i32, _mm256_castps_si256(valid), yv);
        }
    }
}

/// The choice and the y bits of one row with 8 < K <= 16 candidates, in two registers: z[0..8]
/// and z[8..16] (the lanes past K are -inf for the choice and 0 in the sum). The sum's lane l is
/// z[l] + z[l + 8], [`softmax_sum`]'s order, so the same bits as [`softmax_scaled`].
///
/// # Safety
/// AVX2; 8 < k <= 16, m <= k; `out` holds K + m (+ K when `save`) columns.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn choose16_avx2(
    cv: &[f32; MAX_K],
    g: &[f32; MAX_K],
    k: usize,
    m: usize,
    inv_tau: f32,
    out: &mut [u32],
    save: bool,
) {
    use std::arch::x86_64::*;
    let c = |v: f32| _mm256_set1_ps(v);
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((k - LANES) as i32), lane));
    let za = _mm256_add_ps(_mm256_loadu_ps(cv.as_ptr()), _mm256_loadu_ps(g.as_ptr()));
    let zb = _mm256_add_ps(_mm256_loadu_ps(cv.as_ptr().add(LANES)), _mm256_loadu_ps(g.as_ptr().add(LANES)));
    let (mut oa, mut ob) = (za, _mm256_blendv_ps(c(f32::NEG_INFINITY), zb, valid));
    for s in 0..m {
        let mx = hmax8(_mm256_max_ps(oa, ob));
        let ha = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(oa, mx)) as u32;
        let hb = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(ob, mx)) as u32;
        let best = (ha | hb << LANES).trailing_zeros() as i32;
        // SAFETY: the row holds K + m >= k + s + 1 columns.
        *out.get_unchecked_mut(k + s) = best as u32;
        let ta = _mm256_cmpeq_epi32(lane, _mm256_set1_epi32(best));
        let tb = _mm256_cmpeq_epi32(lane, _mm256_set1_epi32(best - LANES as i32));
        oa = _mm256_blendv_ps(oa, c(f32::NEG_INFINITY), _mm256_castsi256_ps(ta));
        ob = _mm256_blendv_ps(ob, c(f32::NEG_INFINITY), _mm256_castsi256_ps(tb));
    }
    if !save {
        return;
    }
    let (xa, xb) = (_mm256_mul_ps(za, c(inv_tau)), _mm256_mul_ps(zb, c(inv_tau)));
    let mx = hmax8(_mm256_max_ps(xa, _mm256_blendv_ps(c(f32::NEG_INFINITY), xb, valid)));
    let ea = exp8_avx2(_mm256_sub_ps(xa, mx));
    // Lanes past K: +0.
    let eb = _mm256_and_ps(exp8_avx2(_mm256_sub_ps(xb, mx)), valid);
    // softmax_sum's order: lane sums z[l] + z[l + 8], then the tree of hsum8.
    let sum = hsum8(_mm256_add_ps(ea, eb));
    let dst = &mut out[k + m..2 * k + m];
    _mm256_storeu_si256(dst.as_mut_ptr() as *mut __m256i, _mm256_castps_si256(_mm256_div_ps(ea, sum)));
    let yb = _mm256_castps_si256(_mm256_div_ps(eb, sum));
    _mm256_maskstore_epi32(dst.as_mut_ptr().add(LANES) as *mut i32, _mm256_castps_si256(valid), yb);
}

#[inline(always)]
pub(super) fn top_k_f32_dispatch<const AVX2: bool>(
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

#[inline(always)]
pub(super) fn top_k_f64_dispatch<const AVX2: bool>(
    lg: &[f64],
    k: usize,
    cv: &mut [f64; MAX_K],
    ci: &mut [u32; MAX_K],
) -> std::result::Result<(), usize> {
    top_k_insertion(lg, k, cv, ci)
}

/// Top-K by insertion, for any K and E: a value enters only if strictly larger than the current
/// K-th and moves up only past strictly smaller ones, so equal logits keep the lower index first.
#[inline(always)]
pub(super) fn top_k_insertion<T: Real>(
    lg: &[T],
    k: usize,
    cv: &mut [T; MAX_K],
    ci: &mut [u32; MAX_K],
) -> std::result::Result<(), usize> {
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
        while j > 0 && v > cv[j - 1] {
            cv[j] = cv[j - 1];
            ci[j] = ci[j - 1];
            j -= 1;
        }
        cv[j] = v;
        ci[j] = e as u32;
    }
    Ok(())
}

/// Most survivors of the threshold that [`top_k_f32`] ranks before it falls back to insertion.
pub(super) const SURVIVORS: usize = 48;

/// Top-K of an f32 row, the same result as [`top_k_insertion`] (the top K in the order "larger
/// value, then lower index"), branch-free for K <= 8 <= E:
/// 1. the maxima of the 8 residue classes e mod 8 are 8 distinct logits, so the K-th largest of them
///    is a lower bound `thr` of the row's K-th largest logit (the same pass checks finiteness);
/// 2. the logits >= thr (about 2K of E = 64 for random logits) are the survivors, in index order;
/// 3. each survivor's rank is the number of survivors above it; rank < K is its slot (rows with
///    equal survivors, rare for real logits, take the insertion path).
#[inline(always)]
pub(super) fn top_k_f32(
    lg: &[f32],
    k: usize,
    cv: &mut [f32; MAX_K],
    ci: &mut [u32; MAX_K],
) -> std::result::Result<(), usize> {
    if k > LANES || lg.len() < LANES {
        return top_k_insertion(lg, k, cv, ci);
    }
    let mut mx = [f32::NEG_INFINITY; LANES];
    let mut nan = [0f32; LANES]; // x * 0 is NaN for an infinite or NaN x
    let chunks = lg.chunks_exact(LANES);
    let tail = chunks.remainder();
    for ch in chunks {
        for l in 0..LANES {
            mx[l] = if ch[l] > mx[l] { ch[l] } else { mx[l] };
            nan[l] += ch[l] * 0.0;
        }
    }
    for (l, &v) in tail.iter().enumerate() {
        mx[l] = if v > mx[l] { v } else { mx[l] };
        nan[l] += v * 0.0;
    }
    if nan.iter().any(|v| v.is_nan()) {
        return top_k_insertion(lg, k, cv, ci); // reports the first non-finite logit
    }
    let thr = if k == LANES {
        mx.iter().fold(f32::INFINITY, |a, &b| if b < a { b } else { a })
    } else {
        mx.sort_unstable_by(|a, b| b.total_cmp(a));
        mx[k - 1]
    };
    // Survivors, padded with -inf (which never outranks a finite logit) to whole lanes.
    let mut sv = [f32::NEG_INFINITY; SURVIVORS + LANES];
    let mut si = [0u32; SURVIVORS + LANES];
    let mut n = 0usize;
    for (e, &v) in lg.iter().enumerate() {
        sv[n] = v;
        si[n] = e as u32;
        n += (v >= thr) as usize;
        if n == SURVIVORS {
            return top_k_insertion(lg, k, cv, ci);
        }
    }
    sv[n] = f32::NEG_INFINITY;
    let nl = n.div_ceil(LANES) * LANES;
    // rank = #(survivors above): a permutation of 0..n when the values are distinct; a tie (rare
    // for real logits) takes the insertion path, which orders equal values by index.
    let mut ties = 0u32;
    for i in 0..n {
        let v = sv[i];
        let (mut gt, mut eq) = ([0u32; LANES], [0u32; LANES]);
        for c in (0..nl).step_by(LANES) {
            for l in 0..LANES {
                gt[l] += (sv[c + l] > v) as u32;
                eq[l] += (sv[c + l] == v) as u32;
            }
        }
        let r = gt.iter().sum::<u32>() as usize;
        ties |= eq.iter().sum::<u32>() - 1;
        if r < k {
            cv[r] = v;
            ci[r] = si[i];
        }
    }
    if ties != 0 {
        return top_k_insertion(lg, k, cv, ci);
    }
    Ok(())
}

/// For each 8-bit mask, the lane order that packs the set lanes first (then the others): the
/// permutation of an AVX2 left-pack, one byte per lane.
#[cfg(target_arch = "x86_64")]
pub(super) const PACK: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut m = 0;
    while m < 256 {
        let (mut v, mut j, mut l) = (0u64, 0, 0);
        while l < 8 {
            if m >> l & 1 == 1 {
                v |= (l as u64) << (8 * j);
                j += 1;
            }
            l += 1;
        }
        l = 0;
        while l < 8 {
            if m >> l & 1 == 0 {
                v |= (l as u64) << (8 * j);
                j += 1;
            }
            l += 1;
        }
        t[m] = v;
        m += 1;
    }
    t
};

/// [`top_k_f32`] with AVX2: the same three steps, the survivors left-packed 8 lanes at a time
/// (no branch per logit) and the ranks counted with compare + movemask + popcount.
///
/// # Safety
/// The CPU must have AVX2 (callers: the `*_avx2` block functions only).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn top_k_f32_avx2(
    lg: &[f32],
    k: usize,
    cv: &mut [f32; MAX_K],
    ci: &mut [u32; MAX_K],
) -> std::result::Result<(), usize> {
    use std::arch::x86_64::*;
    let e = lg.len();
    if k > LANES || e < LANES {
        return top_k_insertion(lg, k, cv, ci);
    }
    let full = e / LANES * LANES;
    let p = lg.as_ptr();
    // 1. Maxima of the residue classes (e mod 8) and a finiteness check (x * 0 is NaN for inf/NaN).
    let zero = _mm256_setzero_ps();
    let (mut mx, mut bad) = (_mm256_set1_ps(f32::NEG_INFINITY), zero);
    let mut c = 0;
    while c < full {
        let v = _mm256_loadu_ps(p.add(c));
        mx = _mm256_max_ps(mx, v);
        bad = _mm256_add_ps(bad, _mm256_mul_ps(v, zero));
        c += LANES;
    }
    let mut m8 = [0f32; LANES];
    _mm256_storeu_ps(m8.as_mut_ptr(), mx);
    let mut nonfinite = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(bad, bad)) != 0;
    for (l, &v) in lg[full..].iter().enumerate() {
        nonfinite |= !v.is_finite();
        m8[l] = if v > m8[l] { v } else { m8[l] };
    }
    if nonfinite {
        return top_k_insertion(lg, k, cv, ci); // reports the first non-finite logit
    }
    let thr = if k == LANES {
        m8.iter().fold(f32::INFINITY, |a, &b| if b < a { b } else { a })
    } else {
        m8.sort_unstable_by(|a, b| b.total_cmp(a));
        m8[k - 1]
    };
    // 2. Survivors (>= thr) left-packed in index order. Lanes past n hold non-survivors of the
    //    last chunk (< thr) or -inf, which never count in step 3.
    let mut sv = [f32::NEG_INFINITY; SURVIVORS + LANES];
    let mut si = [0u32; SURVIVORS + LANES];
    let tv = _mm256_set1_ps(thr);
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mut n = 0usize;
    c = 0;
    while c < full {
        let v = _mm256_loadu_ps(p.add(c));
        let bits = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(v, tv)) as usize;
        let perm = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(PACK[bits] as i64));
        _mm256_storeu_ps(sv.as_mut_ptr().add(n), _mm256_permutevar8x32_ps(v, perm));
        let idx = _mm256_add_epi32(_mm256_permutevar8x32_epi32(lane, perm), _mm256_set1_epi32(c as i32));
        _mm256_storeu_si256(si.as_mut_ptr().add(n) as *mut __m256i, idx);
        n += bits.count_ones() as usize;
        if n > SURVIVORS - LANES {
            return top_k_insertion(lg, k, cv, ci);
        }
        c += LANES;
    }
    for (j, &v) in lg[full..].iter().enumerate() {
        if v >= thr {
            sv[n] = v;
            si[n] = (full + j) as u32;
            n += 1;
        }
    }
    // 3. rank = #(survivors above): a permutation of 0..n exactly when the survivors are distinct;
    //    a tie (rare for real logits) takes the insertion path, which orders equal values by index.
    //    Counted 8 survivors at a time: for each survivor j, broadcast it and add (sv[j] > lane) to
    //    the counts of every lane (no horizontal sum, one loop exit per row).
    let mut cnt = [0u32; SURVIVORS + LANES];
    if n <= 3 * LANES {
        // The common case (about 2K survivors): slot r takes the one lane whose count is r, found
        // with a compare per register (no loop over the survivors). Lanes past n count >= n >= K.
        // A rank r < K held by no lane or by several means a tie at or above the K-th value (rare
        // for real logits): the insertion path orders equal values by index.
        rank_lanes::<3>(&sv, n, &mut cnt);
        let c0 = _mm256_loadu_si256(cnt.as_ptr() as *const __m256i);
        let c1 = _mm256_loadu_si256(cnt.as_ptr().add(LANES) as *const __m256i);
        let c2 = _mm256_loadu_si256(cnt.as_ptr().add(2 * LANES) as *const __m256i);
        // (A function, not a closure: closures do not inherit the caller's target features.)
        #[inline(always)]
        unsafe fn hits(c: [__m256i; 3], r: i32) -> u32 {
            let rv = _mm256_set1_epi32(r);
            let m0 = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(c[0], rv))) as u32;
            let m1 = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(c[1], rv))) as u32;
            let m2 = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(c[2], rv))) as u32;
            m0 | m1 << LANES | m2 << (2 * LANES)
        }
        for r in 0..k {
            let hit = hits([c0, c1, c2], r as i32);
            if hit.count_ones() != 1 {
                return top_k_insertion(lg, k, cv, ci);
            }
            let i = hit.trailing_zeros() as usize;
            cv[r] = sv[i];
            ci[r] = si[i];
        }
        return Ok(());
    }
    // Many survivors: rank = a permutation of 0..n exactly when the survivors are distinct; a tie
    // takes the insertion path.
    rank_lanes::<{ SURVIVORS / LANES }>(&sv, n, &mut cnt);
    let mut ranks = 0u64; // n <= SURVIVORS < 64
    for i in 0..n {
        let gt = cnt[i];
        ranks |= 1 << gt;
        // Branch-free: ranks >= K land in slot MAX_K - 1, which K <= 8 never reads.
        let r = (gt as usize).min(MAX_K - 1);
        cv[r] = sv[i];
        ci[r] = si[i];
    }
    if ranks != (1u64 << n) - 1 {
        return top_k_insertion(lg, k, cv, ci);
    }
    Ok(())
}

/// cnt[i] = #{j < n: sv[j] > sv[i]} for the lanes i < 8R (R registers of survivors; lanes past n
/// get counts that nobody reads).
///
/// # Safety
/// AVX2 (callers: [`top_k_f32_avx2`]); `8R <= sv.len()`, `8R <= cnt.len()`, `n <= sv.len()`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn rank_lanes<const R: usize>(sv: &[f32; SURVIVORS + LANES], n: usize, cnt: &mut [u32; SURVIVORS + LANES]) {
    use std::arch::x86_64::*;
    let mut vals = [_mm256_setzero_ps(); R];
    let mut acc = [_mm256_setzero_si256(); R];
    for (r, v) in vals.iter_mut().enumerate() {
        *v = _mm256_loadu_ps(sv.as_ptr().add(r * LANES));
    }
    for &x in &sv[..n] {
        let b = _mm256_set1_ps(x);
        for r in 0..R {
            // The compare mask is -1 where b > lane: subtracting it counts.
            let gt = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(b, vals[r]));
            acc[r] = _mm256_sub_epi32(acc[r], gt);
        }
    }
    for (r, a) in acc.iter().enumerate() {
        _mm256_storeu_si256(cnt.as_mut_ptr().add(r * LANES) as *mut __m256i, *a);
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

/// z[..k] <- softmax(z[..k] * inv_tau): scale, max, exp(z - max), sum ([`softmax_sum`]), divide.
/// The one definition of the weights arithmetic on the CPU (select's saved y and the weights op).
#[inline(always)]
fn softmax_scaled<T: Real>(z: &mut [T; MAX_K], k: usize, inv_tau: T) {
    for v in &mut z[..k] {
        *v = v.mul(inv_tau);
    }
    let mut mx = z[0];
    for &v in &z[1..k] {
        if v > mx {
            mx = v;
        }
    }
    for v in &mut z[..k] {
        *v = v.sub(mx).exp();
    }
    let sum = softmax_sum(&z[..k]);
    for v in &mut z[..k] {
        *v = v.div(sum);
    }
}

/// The sum of the softmax terms in a fixed order that one AVX2 register computes without leaving
/// registers: 8 lane sums (lane l adds z[l], z[l + 8], ... in order, the rows past K count as 0),
/// then the tree ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)). Every CPU path (f32 and f64,
/// portable and AVX2) sums in this order, so they give the same bits; the GPU kernels sum in index
/// order, which can differ in the last bit.
#[inline(always)]
fn softmax_sum<T: Real>(z: &[T]) -> T {
    let mut a = [T::ZERO; LANES];
    for (i, &v) in z.iter().enumerate() {
        a[i % LANES] = a[i % LANES].add(v);
    }
    let b = [a[0].add(a[4]), a[1].add(a[5]), a[2].add(a[6]), a[3].add(a[7])];
    b[0].add(b[2]).add(b[1].add(b[3]))
}

/// The end of one row of the selection: `out` gets the K candidates `ci`, then the m chosen
/// positions of the top m of cv + g, then (when `save` is true) the K weights
/// y = softmax((cv + g) / tau) as f32 bits.
#[inline(always)]
fn choose_row<T: Real>(
    p: &GumbelParams,
    cv: &[T; MAX_K],
    ci: &[u32; MAX_K],
    g: &[f32; MAX_K],
    out: &mut [u32],
    save: bool,
) {
    let k = p.k;
    let mut z = [T::ZERO; MAX_K];
    for i in 0..k {
        z[i] = cv[i].add(T::from_f32(g[i]));
    }
    out[..k].copy_from_slice(&ci[..k]);
    // Gumbel-top-m: m rounds of argmax over the untaken positions (strict >: ties to lower position).
    let mut taken = 0u32;
    for s in 0..p.m {
        let mut best = usize::MAX;
        for i in 0..k {
            if (taken >> i) & 1 == 0 && (best == usize::MAX || z[i] > z[best]) {
                best = i;
            }
        }
        taken |= 1 << best;
        out[k + s] = best as u32;
    }
    if save {
        softmax_scaled(&mut z, k, T::from_f64(1.0 / p.tau)); // z is y from here
        for (o, v) in out[k + p.m..2 * k + p.m].iter_mut().zip(&z[..k]) {
            *o = v.to_f32().to_bits();
        }
    }
}

/// One row of y = softmax((cand + g) * inv_tau), copied from `cand[y_col..]` (the f32 bits the
/// select op saved, for f32 only) or computed, regenerating g, when `y_col` is 0. Err(position) on
/// an out-of-range candidate or a non-finite candidate logit.
#[inline(always)]
pub(super) fn weights_row<T: Real>(
    lg: &[T],
    cand: &[u32],
    y: &mut [T],
    p: &GumbelParams,
    inv_tau: T,
    row: usize,
    y_col: usize,
) -> std::result::Result<(), usize> {
    let k = p.k;
    if y_col > 0 {
        for (i, (o, &b)) in y.iter_mut().zip(&cand[y_col..y_col + k]).enumerate() {
            if cand[i] as usize >= lg.len() {
                return Err(i);
            }
            *o = T::from_f32(f32::from_bits(b));
        }
        return Ok(());
    }
    let mut ci = [0u32; MAX_K];
    ci[..k].copy_from_slice(&cand[..k]);
    let mut g = [0f32; MAX_K];
    noise_row::<false>(p, row, &ci, k, &mut g);
    let mut z = [T::ZERO; MAX_K];
    for i in 0..k {
        let Some(&l) = lg.get(ci[i] as usize).filter(|l| l.is_finite()) else { return Err(i) };
        // Same rounding steps as the reference: (cand + g) in T, then `* (1/tau)` (candle's `t / tau`).
        z[i] = l.add(T::from_f32(g[i]));
    }
    softmax_scaled(&mut z, k, inv_tau);
    y.copy_from_slice(&z[..k]);
    Ok(())
}

/// One row of the backward: dlogits (E, zeroed by the caller) from y (K), dy (K) and the candidates (K).
#[inline]
pub(super) fn bwd_row<T: Real>(
    y: &[T],
    dy: &[T],
    cand: &[u32],
    dl: &mut [T],
    inv_tau: T,
) -> std::result::Result<(), usize> {
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
pub(super) fn select_block_impl<T: Real, const AVX2: bool>(
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
pub(super) unsafe fn select_block_avx2<T: Real>(
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
pub(super) fn select_block<T: Real>(
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
pub(super) fn weights_block_impl<T: Real>(
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
pub(super) unsafe fn weights_block_avx2<T: Real>(
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
pub(super) fn weights_block<T: Real>(
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
