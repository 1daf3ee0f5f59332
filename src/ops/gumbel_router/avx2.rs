//! The AVX2 row code of the Gumbel select op (x86-64 only): the top-K of one f32 row by threshold,
//! left-pack and rank, the choice and softmax of K <= 16 candidates in registers, and an 8-lane
//! `exp_f32`. Each gives the same bits as its portable twin in `cpu.rs` (no FMA; tested).

use super::cpu::{top_k_insertion, LANES, SURVIVORS};
use super::{GumbelParams, MAX_K};
use crate::ops::float::{EXP_C1, EXP_C2, EXP_HI, EXP_LO, EXP_MAGIC, EXP_P};

/// [`exp_f32`](crate::ops::float::exp_f32) on 8 lanes: the same operations in the same order (no FMA), so the same bits.
///
/// # Safety
/// AVX2.
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

/// # Safety
/// AVX2.
#[inline(always)]
unsafe fn hmax8(v: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_max_ss(h, _mm_shuffle_ps::<0b01>(h, h));
    _mm256_broadcastss_ps(h)
}

/// The sum of 8 lanes in `softmax_sum`'s tree order, broadcast: (a0 + a4, a1 + a5, a2 + a6,
/// a3 + a7), then ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)).
///
/// # Safety
/// AVX2.
#[inline(always)]
unsafe fn hsum8(v: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_shuffle_ps::<0b01>(h, h));
    _mm256_broadcastss_ps(h)
}

/// `choose_row` for a batch of rows with K <= 16 f32 candidates. For K <= 8, each row's perturbed
/// values z = cv + g in one AVX2 register, two rows at a time (their chains interleaved); for
/// 8 < K <= 16, in two registers, one row at a time ([`choose16_avx2`]). The same results as the
/// scalar loops (tested) without a data-dependent branch:
/// - each of the m rounds takes the lowest lane holding the maximum of the untaken lanes (the
///   scalar strict-> scan's tie rule) and sets it to -inf;
/// - y = softmax(z * inv_tau): the scale, [`exp_f32`] and the division lane-parallel with the same
///   operations (no FMA), the lanes past K zeroed and the sum in `softmax_sum`'s order, so the
///   same bits as `softmax_scaled`.
///
/// # Safety
/// AVX2; 1 <= k <= 16, m <= k; `out` holds `cv.len()` rows of `w` = K + m (+ K when `save`) columns.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn choose_batch_avx2(
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
/// z[l] + z[l + 8], `softmax_sum`'s order, so the same bits as `softmax_scaled`.
///
/// # Safety
/// AVX2; 8 < k <= 16, m <= k; `out` holds K + m (+ K when `save`) columns.
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

/// For each 8-bit mask, the lane order that packs the set lanes first (then the others): the
/// permutation of an AVX2 left-pack, one byte per lane.
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

/// [`top_k_f32`](super::cpu::top_k_f32) with AVX2: the same three steps, the survivors left-packed 8 lanes at a time
/// (no branch per logit) and the ranks counted with compare + movemask + popcount.
///
/// # Safety
/// The CPU must have AVX2 (callers: the `*_avx2` block functions only).
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
