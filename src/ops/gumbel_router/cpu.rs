//! The portable CPU row kernels of the Gumbel router ops, the Rust twins of `gm_select_row`,
//! `gm_weights_row` and `gm_weights_bwd_elem` in `kernels/gumbel_router.cuh`: Philox noise, top-K,
//! the choice, the softmax and the backward of one row.

use super::{GumbelParams, MAX_K};
use crate::ops::backend::cpu::Float;
use crate::rng;

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

#[inline(always)]
pub(super) fn top_k_insertion<T: Float>(
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

/// The one definition of the weights arithmetic on the CPU (select's saved y and the weights op).
#[inline(always)]
pub(super) fn softmax_scaled<T: Float>(z: &mut [T; MAX_K], k: usize, inv_tau: T) {
    for v in &mut z[..k] {
        *v = *v * inv_tau;
    }
    let mut mx = z[0];
    for &v in &z[1..k] {
        if v > mx {
            mx = v;
        }
    }
    for v in &mut z[..k] {
        *v = (*v - mx).exp();
    }
    let sum = softmax_sum(&z[..k]);
    for v in &mut z[..k] {
        *v = *v / sum;
    }
}

/// The sum of the softmax terms in a fixed order that one AVX2 register computes without leaving
/// registers: 8 lane sums (lane l adds z[l], z[l + 8], ... in order, the rows past K count as 0),
/// then the tree ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)). Every CPU path (f32 and f64,
/// portable and AVX2) sums in this order, so they give the same bits; the GPU kernels sum in index
/// order, which can differ in the last bit.
#[inline(always)]
pub(super) fn softmax_sum<T: Float>(z: &[T]) -> T {
    let mut a = [T::ZERO; LANES];
    for (i, &v) in z.iter().enumerate() {
        a[i % LANES] = a[i % LANES] + v;
    }
    let b = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (b[0] + b[2]) + (b[1] + b[3])
}

/// The end of one row of the selection: `out` gets the K candidates `ci`, then the m chosen
/// positions of the top m of cv + g, then (when `save` is true) the K weights
/// y = softmax((cv + g) / tau) as f32 bits.
#[inline(always)]
pub(super) fn choose_row<T: Float>(
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
        z[i] = cv[i] + T::from_f32(g[i]);
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
pub(super) fn weights_row<T: Float>(
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
        z[i] = l + T::from_f32(g[i]);
    }
    softmax_scaled(&mut z, k, inv_tau);
    y.copy_from_slice(&z[..k]);
    Ok(())
}

/// One row of the backward: dlogits (E, zeroed by the caller) from y (K), dy (K) and the candidates (K).
#[inline]
pub(super) fn bwd_row<T: Float>(
    y: &[T],
    dy: &[T],
    cand: &[u32],
    dl: &mut [T],
    inv_tau: T,
) -> std::result::Result<(), usize> {
    let mut dot = T::ZERO;
    for (&a, &b) in y.iter().zip(dy) {
        dot = dot + a * b;
    }
    for (i, ((&a, &b), &e)) in y.iter().zip(dy).zip(cand).enumerate() {
        let Some(slot) = dl.get_mut(e as usize) else { return Err(i) };
        *slot = *slot + a * (b - dot) * inv_tau;
    }
    Ok(())
}
