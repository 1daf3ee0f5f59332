//! The select op's top-K for eight f32 rows at once, one row per AVX2 lane (K <= 16, E a multiple
//! of 8, E <= 1024): a sorting network over keys that carry their expert index, with an exactness
//! check that sends the rare undecided row to the per-row path (`avx2::top_k_f32_avx2`).
//!
//! - **Keys.** A logit's key is its f32 bits with the low `nb` mantissa bits replaced by its expert
//!   index (nb = the bits of E - 1). The keys of a row are distinct, and as floats they are ordered
//!   like their *buckets* (the logit with those bits cleared, a monotone rounding toward zero),
//!   then by index. So plain `max`/`min` sort them, and the index travels inside the value.
//! - **Network.** The best R = 8 (K <= 8) or 16 keys of each row are kept sorted in R registers.
//!   Per group of 8 experts: an 8x8 transpose puts the 8 rows in the lanes, a 19-comparator network
//!   sorts the group's 8 keys, and a bitonic merge keeps the best R of the running R and the group
//!   (8 + 12 comparators for R = 8, 8 + 32 for R = 16). The largest key the merges drop is kept too.
//! - **Exactness.** A row's K best keys are its top K (larger value, then lower index) when their
//!   buckets are strictly decreasing and above the bucket of every other key (the kept keys past K
//!   and the largest dropped one): then no two of the values that decide the answer are equal, and
//!   the order of the keys is the order of the values. Rows where that fails (equal or nearly equal
//!   logits at the top: -0 and +0, or values within 2^-(23 - nb) relative; 0.06% of random rows at
//!   E = 64) and rows with a non-finite logit are left to the caller.

use super::cpu::LANES;
use super::MAX_K;
use std::arch::x86_64::*;

/// Largest E whose expert index the key holds (10 mantissa bits).
pub(super) const MAX_E: usize = 1024;

/// Whether [`top_k_8rows`] takes rows of `e` logits for pre-filter `k`.
#[inline(always)]
pub(super) fn fits(e: usize, k: usize) -> bool {
    (1..=2 * LANES).contains(&k) && k <= e && e.is_multiple_of(LANES) && e <= MAX_E
}

/// The top-`k` of 8 rows of E logits into `cv`/`ci` (best first), for the rows whose bit is set in
/// the returned mask; the other rows' entries are unspecified (the caller runs them one by one).
///
/// # Safety
/// AVX2 (callers: the `*_avx2` block functions); [`fits`]`(E, k)`; every row holds E logits;
/// `cv` and `ci` hold 8 rows.
#[inline(always)]
pub(super) unsafe fn top_k_8rows(
    rows: [&[f32]; LANES],
    k: usize,
    cv: &mut [[f32; MAX_K]],
    ci: &mut [[u32; MAX_K]],
) -> u32 {
    if k <= LANES {
        top_r::<LANES>(rows, k, cv, ci)
    } else {
        top_r::<{ 2 * LANES }>(rows, k, cv, ci)
    }
}

/// [`top_k_8rows`] keeping the best R keys per row (R = 8 or 16, K <= R).
#[inline(always)]
unsafe fn top_r<const R: usize>(
    rows: [&[f32]; LANES],
    k: usize,
    cv: &mut [[f32; MAX_K]],
    ci: &mut [[u32; MAX_K]],
) -> u32 {
    let e = rows[0].len();
    debug_assert!(fits(e, k) && k <= R && rows.iter().all(|r| r.len() == e) && cv.len() == LANES && ci.len() == LANES);
    let nb = (usize::BITS - (e - 1).leading_zeros()).max(3);
    let low = (1i32 << nb) - 1;
    let hi = _mm256_castsi256_ps(_mm256_set1_epi32(!low));
    let zero = _mm256_setzero_ps();
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let neg_inf = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut best = [neg_inf; R]; // (8 rows) per rank, best first; -inf until E >= R keys came
    let mut dropped = neg_inf; // (8 rows) the largest dropped key
    let mut bad = zero; // NaN in the lane of a row with a non-finite logit (x * 0)
    for g in 0..e / LANES {
        let idx = _mm256_castsi256_ps(_mm256_add_epi32(lane, _mm256_set1_epi32((g * LANES) as i32)));
        // (8 experts) per row -> (8 rows) per expert.
        let mut v = transpose8(std::array::from_fn(|i| {
            _mm256_or_ps(_mm256_and_ps(_mm256_loadu_ps(rows[i].as_ptr().add(g * LANES)), hi), idx)
        }));
        for x in &v {
            bad = _mm256_add_ps(bad, _mm256_mul_ps(*x, zero));
        }
        sort8(&mut v);
        if g == 0 {
            best[..LANES].copy_from_slice(&v);
            continue;
        }
        // The group, padded with -inf to R and reversed, against best: the larger R form a bitonic
        // sequence (only the last 8 ranks can change), the smaller ones are dropped.
        let lo: [__m256; LANES] = std::array::from_fn(|i| _mm256_min_ps(best[R - LANES + i], v[LANES - 1 - i]));
        for i in 0..LANES {
            best[R - LANES + i] = _mm256_max_ps(best[R - LANES + i], v[LANES - 1 - i]);
        }
        let m4: [__m256; 4] = std::array::from_fn(|i| _mm256_max_ps(lo[i], lo[i + 4]));
        let m = _mm256_max_ps(_mm256_max_ps(m4[0], m4[2]), _mm256_max_ps(m4[1], m4[3]));
        dropped = _mm256_max_ps(dropped, m);
        bitonic(&mut best);
    }
    // The exactness check on the buckets (floats: -0 == +0 counts as equal).
    let t: [__m256; R] = std::array::from_fn(|j| _mm256_and_ps(best[j], hi));
    let mut ok = _mm256_cmp_ps::<_CMP_ORD_Q>(bad, bad);
    for j in 0..k - 1 {
        ok = _mm256_and_ps(ok, _mm256_cmp_ps::<_CMP_GT_OQ>(t[j], t[j + 1]));
    }
    let mut rest = _mm256_and_ps(dropped, hi);
    if k < R {
        rest = _mm256_max_ps(rest, t[k]);
    }
    ok = _mm256_and_ps(ok, _mm256_cmp_ps::<_CMP_GT_OQ>(t[k - 1], rest));
    let done = _mm256_movemask_ps(ok) as u32;
    if done == 0 {
        return 0;
    }
    // (8 rows) per rank -> (8 ranks) per row, 8 ranks at a time; the index is the key's low bits.
    let low = _mm256_set1_epi32(low);
    for c in (0..R).step_by(LANES) {
        let per_row = transpose8(best[c..c + LANES].try_into().expect("R is a multiple of 8"));
        for i in 0..LANES {
            if done >> i & 1 == 1 {
                let ids = _mm256_and_si256(_mm256_castps_si256(per_row[i]), low);
                _mm256_storeu_si256(ci[i].as_mut_ptr().add(c) as *mut __m256i, ids);
            }
        }
    }
    for i in 0..LANES {
        if done >> i & 1 == 1 {
            for j in 0..k {
                cv[i][j] = rows[i][ci[i][j] as usize];
            }
        }
    }
    done
}

/// Compare-exchange of the descending networks: v[a] <- max, v[b] <- min.
#[inline(always)]
unsafe fn cx<const N: usize>(v: &mut [__m256; N], a: usize, b: usize) {
    let (x, y) = (v[a], v[b]);
    v[a] = _mm256_max_ps(x, y);
    v[b] = _mm256_min_ps(x, y);
}

/// A comparator network written out as straight-line [`cx`] calls: as a loop over a table of pairs,
/// the compiler kept `v` in memory and the op ran slower than the per-row path it replaces.
macro_rules! network {
    ($v:ident: $(($a:literal, $b:literal)),* $(,)?) => {
        $(cx($v, $a, $b);)*
    };
}

/// Sorts 8 lanes-wise keys in descending order: the 19-comparator, depth-6 network for n = 8
/// (Knuth, TAOCP 5.3.4).
#[inline(always)]
unsafe fn sort8(v: &mut [__m256; LANES]) {
    // One line per layer.
    network!(v:
        (0, 2), (1, 3), (4, 6), (5, 7),
        (0, 4), (1, 5), (2, 6), (3, 7),
        (0, 1), (2, 3), (4, 5), (6, 7),
        (2, 4), (3, 5),
        (1, 4), (3, 6),
        (1, 2), (3, 4), (5, 6),
    );
}

/// Sorts a bitonic sequence of 8 in descending order (strides 4, 2, 1).
#[inline(always)]
unsafe fn bitonic8(v: &mut [__m256; LANES]) {
    network!(v:
        (0, 4), (1, 5), (2, 6), (3, 7),
        (0, 2), (1, 3), (4, 6), (5, 7),
        (0, 1), (2, 3), (4, 5), (6, 7),
    );
}

/// Sorts a bitonic sequence of R = 8 or 16 in descending order: for 16, stride 8, then each half.
#[inline(always)]
unsafe fn bitonic<const R: usize>(v: &mut [__m256; R]) {
    if R == LANES {
        bitonic8((&mut v[..]).try_into().expect("R = 8"));
        return;
    }
    let v16: &mut [__m256; 2 * LANES] = (&mut v[..]).try_into().expect("R = 16");
    network!(v16: (0, 8), (1, 9), (2, 10), (3, 11), (4, 12), (5, 13), (6, 14), (7, 15));
    let (a, b) = v16.split_at_mut(LANES);
    bitonic8(a.try_into().expect("8"));
    bitonic8(b.try_into().expect("8"));
}

/// out[j] lane i = r[i] lane j.
#[inline(always)]
unsafe fn transpose8(r: [__m256; LANES]) -> [__m256; LANES] {
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(s0, s4),
        _mm256_permute2f128_ps::<0x20>(s1, s5),
        _mm256_permute2f128_ps::<0x20>(s2, s6),
        _mm256_permute2f128_ps::<0x20>(s3, s7),
        _mm256_permute2f128_ps::<0x31>(s0, s4),
        _mm256_permute2f128_ps::<0x31>(s1, s5),
        _mm256_permute2f128_ps::<0x31>(s2, s6),
        _mm256_permute2f128_ps::<0x31>(s3, s7),
    ]
}

#[cfg(test)]
mod tests {
    use super::super::cpu::{top_k_insertion, LANES};
    use super::super::MAX_K;
    use super::{fits, sort8, top_k_8rows, transpose8};
    use crate::rng;
    use std::arch::x86_64::{__m256, _mm256_cvtss_f32, _mm256_loadu_ps, _mm256_set1_ps, _mm256_storeu_ps};

    /// A row of E logits from Philox: normal-ish values, or (`levels` > 0) that many distinct values
    /// (ties), or values 1 ulp apart, with signed zeros or a non-finite logit in some rows.
    fn logits(seed: u32, e: usize, kind: u32) -> Vec<f32> {
        let mut v: Vec<f32> = (0..e as u32)
            .map(|i| {
                let r = rng::philox4x32_10([i, seed, 7, kind], [5, 6]);
                let u = rng::u32_to_open_unit(r[0]) * 2.0 - 1.0;
                match kind {
                    1 => (r[1] % 3) as f32,
                    2 => (r[1] % 40) as f32 - 20.0,
                    3 => f32::from_bits(1.0f32.to_bits() + r[1] % 64), // within 2^-17 of 1
                    4 => [0.0, -0.0, -1.0][r[1] as usize % 3],
                    _ => u * 4.0,
                }
            })
            .collect();
        if kind == 5 {
            v[seed as usize % e] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][seed as usize % 3];
        }
        v
    }

    /// Every row the network reports done holds exactly the per-row insertion scan's top-K (values
    /// and indices), ties, near ties, signed zeros and non-finite rows included; and continuous
    /// logits almost never leave the network.
    #[test]
    fn top_k_8rows_matches_insertion() {
        if !std::is_x86_feature_detected!("avx2") {
            return;
        }
        let (mut done_rows, mut plain_rows, mut plain_done) = (0, 0, 0);
        let shapes = [(8usize, 8usize), (8, 1), (16, 8), (64, 8), (64, 1), (64, 5), (128, 7), (256, 8), (1024, 8)];
        // R = 16: K from 9 to 16, E = K included.
        let wide = [(16usize, 16usize), (16, 9), (24, 12), (64, 16), (64, 9), (256, 16), (1024, 16)];
        for &(e, k) in shapes.iter().chain(&wide) {
            for seed in 0..120u32 {
                let kind = seed % 6;
                let rows: Vec<Vec<f32>> = (0..LANES as u32).map(|i| logits(seed * 8 + i, e, kind)).collect();
                let (mut cv, mut ci) = ([[f32::NAN; MAX_K]; LANES], [[u32::MAX; MAX_K]; LANES]);
                // SAFETY: AVX2 checked above; fits(e, k) for every pair in the list.
                let done = unsafe {
                    assert!(fits(e, k));
                    top_k_8rows(std::array::from_fn(|i| &rows[i][..]), k, &mut cv, &mut ci)
                };
                for (i, lg) in rows.iter().enumerate() {
                    let (mut wv, mut wi) = ([0f32; MAX_K], [0u32; MAX_K]);
                    let want = top_k_insertion(lg, k, &mut wv, &mut wi);
                    if kind == 0 && e <= 128 {
                        plain_rows += 1;
                        plain_done += (done >> i & 1) as usize;
                    }
                    if done >> i & 1 == 0 {
                        continue;
                    }
                    done_rows += 1;
                    assert!(want.is_ok(), "e={e} k={k} seed={seed} row {i}: a non-finite row was reported done");
                    assert_eq!(ci[i][..k], wi[..k], "e={e} k={k} seed={seed} row {i}: {lg:?}");
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&cv[i][..k]), bits(&wv[..k]), "e={e} k={k} seed={seed} row {i}");
                }
            }
        }
        assert!(done_rows > 0);
        // Continuous logits: the network decides (almost) every row at E <= 128. Measured on 28,000
        // rows of these uniform logits, the share left to the per-row path is 0.06% at E = 64
        // (K = 8), 0.2% at E = 128, 0.8% at E = 256 and 12% at E = 1024 (buckets 2^-13 wide).
        assert!(plain_done * 100 >= plain_rows * 99, "{plain_done} of {plain_rows} rows");
    }

    /// The network sorts every 0/1 input of 8 (the 0-1 principle: then it sorts every input).
    #[test]
    fn sort8_sorts_all_binary_inputs() {
        if !std::is_x86_feature_detected!("avx2") {
            return;
        }
        for bits in 0..256u32 {
            let x: [f32; LANES] = std::array::from_fn(|j| (bits >> j & 1) as f32);
            // SAFETY: AVX2 checked above.
            let got = unsafe {
                let mut v = x.map(|f| _mm256_set1_ps(f));
                sort8(&mut v);
                v.map(|r| _mm256_cvtss_f32(r))
            };
            let mut want = x;
            want.sort_by(|a, b| b.total_cmp(a));
            assert_eq!(got, want, "input {bits:08b}");
        }
    }

    /// The transpose moves lane j of row i to lane i of output j.
    #[test]
    fn transpose8_transposes() {
        if !std::is_x86_feature_detected!("avx2") {
            return;
        }
        // SAFETY: AVX2 checked above.
        unsafe {
            let r: [__m256; LANES] = std::array::from_fn(|i| {
                let row: [f32; LANES] = std::array::from_fn(|j| (10 * i + j) as f32);
                _mm256_loadu_ps(row.as_ptr())
            });
            for (j, o) in transpose8(r).iter().enumerate() {
                let mut got = [0f32; LANES];
                _mm256_storeu_ps(got.as_mut_ptr(), *o);
                let want: [f32; LANES] = std::array::from_fn(|i| (10 * i + j) as f32);
                assert_eq!(got, want);
            }
        }
    }
}
