//! The CPU kernels of the Gumbel router ops: the Rust twins of `gm_select_row`,
//! `gm_weights_row` and `gm_weights_bwd_elem` in `kernels/gumbel_router.cuh`, with the row loops
//! the ops run over rayon blocks.

use super::*;
// CPU row kernels: the Rust twins of gm_select_row / gm_weights_row / gm_weights_bwd_elem.
//
// Where the time goes (T = 65,536, E = 64, K = 8): the top-K scan of the E logits, then per
// candidate one Philox call and two logs. So the top-K is a threshold filter plus a branch-free
// rank (f32), the noise is computed 8 candidates at a time (`rng::gumbel_noise_lanes`, which the
// compiler vectorizes: Philox on u32 lanes, `rng::ln_pos` instead of a libm call), the select op
// saves the noise it drew for the weights op (no second Philox pass), the softmax uses a
// vectorizable `exp`, and the row loops are compiled twice (baseline and AVX2+FMA+POPCNT, picked at
// run time). No FMA contraction happens in either build, so both give the same bits.

/// Noise lanes per Philox batch (8 u32 = one AVX2 register).
pub(super) const LANES: usize = 8;

/// Gumbel noise of the first `k` candidates `ci` of row `row` into `g` (0 when not noisy).
#[inline(always)]
pub(super) fn noise_row(p: &GumbelParams, row: usize, ci: &[u32; MAX_K], k: usize, g: &mut [f32; MAX_K]) {
    if !p.noisy {
        *g = [0.0; MAX_K];
        return;
    }
    let token = p.token_base.wrapping_add(row as u32);
    let mut c = 0;
    while c < k {
        let lanes: &[u32; LANES] = ci[c..c + LANES].try_into().expect("MAX_K is a multiple of LANES");
        let v = rng::gumbel_noise_lanes(p.seed, p.step, p.layer, token, lanes);
        g[c..c + LANES].copy_from_slice(&v);
        c += LANES;
    }
}

/// exp(x) for f32 without a libm call, so that the softmax over K lanes vectorizes: Cephes `expf`
/// (x = n ln2 + r, degree-5 polynomial for e^r, scale by 2^n), error about 1 ulp. Used only on
/// x = z - max(z) <= 0; below -87.3 (e^x < 2^-126) it returns 2^-126 instead of a subnormal, which
/// no softmax weight can tell apart from 0. NaN stays NaN.
#[inline(always)]
pub(super) fn exp_f32(x: f32) -> f32 {
    const LO: f32 = -87.336_55; // ln(2^-126)
    const HI: f32 = 88.376_26;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4; // 0.693359375, ln2 split in two
    const C2: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let x = if x < LO {
        LO
    } else if x > HI {
        HI
    } else {
        x
    };
    let t = x * LOG2E + MAGIC;
    let n = t.to_bits().wrapping_sub(MAGIC.to_bits()) as i32; // round(x log2 e)
    let fx = t - MAGIC;
    let r = x - fx * C1;
    let r = r - fx * C2;
    let z = r * r;
    let y = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 5.000_000_1e-1;
    let y = y * z + r + 1.0;
    y * f32::from_bits(((n + 127) as u32) << 23)
}

/// The float types the CPU kernels run in.
pub(super) trait Real: Copy + PartialOrd + Send + Sync + std::fmt::Display + 'static {
    const ZERO: Self;
    fn from_f32(v: f32) -> Self;
    fn from_f64(v: f64) -> Self;
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    /// The exp of the softmax: [`exp_f32`] for f32, libm for f64 (the gradient-check precision).
    fn exp(self) -> Self;
    fn is_finite(self) -> bool;
    /// Top-K of a row into `cv`/`ci` (best first, ties to the lower index); Err(expert) at the
    /// first non-finite logit. `AVX2`: the caller runs on a CPU with AVX2 (the `*_avx2` blocks).
    fn top_k<const AVX2: bool>(
        lg: &[Self],
        k: usize,
        cv: &mut [Self; MAX_K],
        ci: &mut [u32; MAX_K],
    ) -> std::result::Result<(), usize>;
}

macro_rules! real {
    ($t:ty, $exp:expr, $top_k:ident) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
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
        }
    };
}
real!(f32, exp_f32, top_k_f32_dispatch);
real!(f64, f64::exp, top_k_f64_dispatch);

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
    let mut ranks = 0u64; // n <= SURVIVORS < 64
    for i in 0..n {
        let b = _mm256_set1_ps(sv[i]);
        let mut gt = 0u32;
        let mut j = 0;
        while j < n {
            let w = _mm256_loadu_ps(sv.as_ptr().add(j));
            gt += (_mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(w, b)) as u32).count_ones();
            j += LANES;
        }
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

/// One row of the selection: `out` gets K candidates, then m positions, then (when `save` is
/// true) the K noise values as f32 bits. Err(expert) on a non-finite logit.
#[inline(always)]
pub(super) fn select_row<T: Real, const AVX2: bool>(
    lg: &[T],
    out: &mut [u32],
    p: &GumbelParams,
    row: usize,
    save: bool,
) -> std::result::Result<(), usize> {
    let k = p.k;
    let mut cv = [T::ZERO; MAX_K];
    let mut ci = [0u32; MAX_K];
    T::top_k::<AVX2>(lg, k, &mut cv, &mut ci)?;
    let mut g = [0f32; MAX_K];
    noise_row(p, row, &ci, k, &mut g);
    for i in 0..k {
        cv[i] = cv[i].add(T::from_f32(g[i]));
    }
    out[..k].copy_from_slice(&ci[..k]);
    if save {
        for (o, v) in out[k + p.m..2 * k + p.m].iter_mut().zip(&g[..k]) {
            *o = v.to_bits();
        }
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

/// One row of y = softmax((cand + g) * inv_tau), g read from `cand[noise_col..]` (the bits the
/// select op saved) or regenerated when `noise_col` is 0. Err(position) on an out-of-range
/// candidate or a non-finite candidate logit.
#[inline(always)]
pub(super) fn weights_row<T: Real>(
    lg: &[T],
    cand: &[u32],
    y: &mut [T],
    p: &GumbelParams,
    inv_tau: T,
    row: usize,
    noise_col: usize,
) -> std::result::Result<(), usize> {
    let k = p.k;
    let mut ci = [0u32; MAX_K];
    ci[..k].copy_from_slice(&cand[..k]);
    let mut g = [0f32; MAX_K];
    if noise_col > 0 {
        for (gi, &b) in g.iter_mut().zip(&cand[noise_col..noise_col + k]) {
            *gi = f32::from_bits(b);
        }
    } else {
        noise_row(p, row, &ci, k, &mut g);
    }
    let mut z = [T::ZERO; MAX_K];
    for i in 0..k {
        let Some(&l) = lg.get(ci[i] as usize).filter(|l| l.is_finite()) else { return Err(i) };
        // Same rounding steps as the reference: (cand + g) in T, then `* (1/tau)` (candle's `t / tau`).
        z[i] = l.add(T::from_f32(g[i])).mul(inv_tau);
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

/// Rows t0.. of the selection into `out` (w columns per row). The row kernels are
/// `#[inline(always)]` all the way down, so `select_block_avx2` compiles them for AVX2 + FMA.
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
    for (i, o) in out.chunks_exact_mut(w).enumerate() {
        let t = t0 + i;
        select_row::<T, AVX2>(r.row(data, t), o, p, t, save).map_err(|e| (t, e))?;
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
    noise_col: usize,
) -> std::result::Result<(), (usize, usize)> {
    for (i, yr) in y.chunks_exact_mut(p.k).enumerate() {
        let t = t0 + i;
        weights_row(rl.row(lg, t), rc.row(cand, t), yr, p, inv_tau, t, noise_col).map_err(|e| (t, e))?;
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
    noise_col: usize,
) -> std::result::Result<(), (usize, usize)> {
    weights_block_impl(lg, rl, cand, rc, p, t0, y, inv_tau, noise_col)
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
    noise_col: usize,
) -> std::result::Result<(), (usize, usize)> {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: the CPU has the features the function was compiled for.
        return unsafe { weights_block_avx2(lg, rl, cand, rc, p, t0, y, inv_tau, noise_col) };
    }
    weights_block_impl(lg, rl, cand, rc, p, t0, y, inv_tau, noise_col)
}
