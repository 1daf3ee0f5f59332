//! Philox4x32-10, the counter-based generator of Salmon et al. (SC'11, "Random123").
//!
//! A counter-based generator is a pure function `(key, counter) -> 4 x u32`: there is no state to
//! carry, so the same (seed, step, layer, token, expert) gives the same number on every backend and
//! a backward pass can regenerate the noise its forward used instead of storing it. This file is the
//! CPU definition; the CUDA/Metal kernels implement the same rounds.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = (a as u64) * (b as u64);
    ((p >> 32) as u32, p as u32)
}

/// Ten Philox rounds over `ctr` with `key`.
#[inline]
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = ctr;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// Splits a 64-bit seed into a Philox key.
#[inline]
pub fn key_from_seed(seed: u64) -> [u32; 2] {
    [seed as u32, (seed >> 32) as u32]
}

/// A u32 in [0, 2^32) to a uniform f32 strictly inside (0, 1): the top 23 bits, centred in their
/// bucket, so that `-ln(-ln u)` is always finite (PyTorch's `exponential_` returned 0 on CUDA once).
/// 23 bits, not 24: (2^24 - 1) + 0.5 is not representable in f32 and would round u up to exactly 1.
#[inline]
pub fn u32_to_open_unit(x: u32) -> f32 {
    ((x >> 9) as f32 + 0.5) * (1.0 / 8_388_608.0)
}

// The constants of `ln_pos` and of its 8-lane twin in `gumbel_noise_avx2`.
const LN2_HI: f32 = f32::from_bits(0x3f31_7180); // 6.9313812256e-01
const LN2_LO: f32 = f32::from_bits(0x3717_f7d1); // 9.0580006145e-06
const LG1: f32 = f32::from_bits(0x3f2a_aaaa); // 0.66666662693
const LG2: f32 = f32::from_bits(0x3ecc_ce13); // 0.40000972152
const LG3: f32 = f32::from_bits(0x3e91_e9ee); // 0.28498786688
const LG4: f32 = f32::from_bits(0x3e78_9e26); // 0.24279078841

/// Natural log of a positive, normal, finite f32 (the only inputs the noise has: u in (0, 1) from
/// 23 bits, and -ln u in [2^-24, 16.7]); error under 1 ulp. The musl/FreeBSD `logf` algorithm
/// (ln(1 + f) = 2 atanh(f / (2 + f)) with a degree-4 polynomial in s^2), written with plain IEEE
/// operations and no table, so that it gives the same bits whether it runs on one value or is
/// vectorized over lanes (Rust never contracts a * b + c into an FMA), and is several times faster
/// than a libm call when vectorized. The GPU kernels use their `logf`, which may differ by an ulp.
#[inline(always)]
pub fn ln_pos(x: f32) -> f32 {
    // x = 2^k * (1 + f) with 1 + f in [sqrt(2)/2, sqrt(2)).
    let ix = x.to_bits().wrapping_add(0x3f80_0000 - 0x3f35_04f3);
    let k = (ix >> 23) as i32 - 0x7f;
    let f = f32::from_bits((ix & 0x007f_ffff) + 0x3f35_04f3) - 1.0;
    let s = f / (2.0 + f);
    let z = s * s;
    let w = z * z;
    let t1 = w * (LG2 + w * LG4);
    let t2 = z * (LG1 + w * LG3);
    let r = t2 + t1;
    let hfsq = 0.5 * f * f;
    let dk = k as f32;
    s * (hfsq + r) + dk * LN2_LO - hfsq + f + dk * LN2_HI
}

/// Standard Gumbel(0, 1) from one uniform: g = -ln(-ln u), with [`ln_pos`].
#[inline(always)]
pub fn gumbel_from_u32(x: u32) -> f32 {
    let u = u32_to_open_unit(x);
    -ln_pos(-ln_pos(u))
}

/// Domains keep the streams of different uses apart (noise, batches, init, dropout, sampling).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Stream {
    Gumbel = 1,
    Batch = 2,
    Init = 3,
    Dropout = 4,
    Sample = 5,
    /// Standard-normal router noise (noisy top-k).
    Normal = 6,
}

/// The Gumbel noise of the router: keyed by (seed, step, layer, token, expert). The expert index is
/// the global one, so the noise of an expert does not depend on which candidates the pre-filter kept.
#[inline]
pub fn gumbel_noise(seed: u64, step: u32, layer: u32, token: u32, expert: u32) -> f32 {
    let key = key_from_seed(seed);
    let r = philox4x32_10([token, expert, step, (Stream::Gumbel as u32) << 16 | (layer & 0xffff)], key);
    gumbel_from_u32(r[0])
}

/// Standard-normal noise of a router (noisy top-k gating), keyed like [`gumbel_noise`] by (seed,
/// step, layer, token, expert) but on its own stream: Box-Muller on two Philox uniforms,
/// z = sqrt(-2 ln u1) cos(2 pi u2), computed in f64 on the host (same bits on every backend).
#[inline]
pub fn normal_noise(seed: u64, step: u32, layer: u32, token: u32, expert: u32) -> f32 {
    let key = key_from_seed(seed);
    let r = philox4x32_10([token, expert, step, (Stream::Normal as u32) << 16 | (layer & 0xffff)], key);
    let (u1, u2) = (u32_to_open_unit(r[0]) as f64, u32_to_open_unit(r[1]) as f64);
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// [`gumbel_noise`] for `L` experts of one token at once: the same bits, lane by lane, written so
/// that the Philox rounds and the logs vectorize (8 lanes of u32 per AVX2 register).
#[inline(always)]
pub fn gumbel_noise_lanes<const L: usize>(seed: u64, step: u32, layer: u32, token: u32, expert: &[u32; L]) -> [f32; L] {
    let [k0, k1] = key_from_seed(seed);
    let c3 = (Stream::Gumbel as u32) << 16 | (layer & 0xffff);
    let (mut a, mut b, mut c, mut d) = ([token; L], *expert, [step; L], [c3; L]);
    let (mut k0, mut k1) = (k0, k1);
    for round in 0..10 {
        if round > 0 {
            k0 = k0.wrapping_add(W0);
            k1 = k1.wrapping_add(W1);
        }
        for l in 0..L {
            let (hi0, lo0) = mulhilo(M0, a[l]);
            let (hi1, lo1) = mulhilo(M1, c[l]);
            (a[l], b[l], c[l], d[l]) = (hi1 ^ b[l] ^ k0, lo1, hi0 ^ d[l] ^ k1, lo0);
        }
    }
    let mut g = [0f32; L];
    for l in 0..L {
        g[l] = gumbel_from_u32(a[l]);
    }
    g
}

/// [`gumbel_noise_lanes`] for 8 experts of each of `N` tokens with AVX2 intrinsics: the same bits
/// (tested). The 32 x 32 -> 64-bit products are two `vpmuludq` per multiplier (the compiler widens
/// and narrows the portable loop instead), and the `N` tokens' chains of rounds and logs are
/// interleaved, so that one row's latency hides behind the other's. Mul and add stay separate
/// instructions (no FMA), in the order of [`ln_pos`].
///
/// # Safety
/// The CPU must have AVX2 (callers: the `*_avx2` block functions of the router op).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn gumbel_noise_avx2<const N: usize>(
    seed: u64,
    step: u32,
    layer: u32,
    token: [u32; N],
    expert: [&[u32; 8]; N],
) -> [[f32; 8]; N] {
    use std::arch::x86_64::*;
    #[inline(always)]
    unsafe fn mulhilo8(a: __m256i, m: __m256i) -> (__m256i, __m256i) {
        let even = _mm256_mul_epu32(a, m); // lanes 0, 2, 4, 6 as 64-bit products
        let odd = _mm256_mul_epu32(_mm256_srli_epi64::<32>(a), m); // lanes 1, 3, 5, 7
        let hi = _mm256_blend_epi32::<0b1010_1010>(_mm256_srli_epi64::<32>(even), odd);
        let lo = _mm256_blend_epi32::<0b1010_1010>(even, _mm256_slli_epi64::<32>(odd)); // wrapping
        (hi, lo)
    }
    #[inline(always)]
    unsafe fn ln8(x: __m256) -> __m256 {
        let c = |v: f32| _mm256_set1_ps(v);
        let ix = _mm256_add_epi32(_mm256_castps_si256(x), _mm256_set1_epi32(0x3f80_0000 - 0x3f35_04f3));
        let k = _mm256_sub_epi32(_mm256_srli_epi32::<23>(ix), _mm256_set1_epi32(0x7f));
        let mant =
            _mm256_add_epi32(_mm256_and_si256(ix, _mm256_set1_epi32(0x007f_ffff)), _mm256_set1_epi32(0x3f35_04f3));
        let f = _mm256_sub_ps(_mm256_castsi256_ps(mant), c(1.0));
        let s = _mm256_div_ps(f, _mm256_add_ps(c(2.0), f));
        let z = _mm256_mul_ps(s, s);
        let w = _mm256_mul_ps(z, z);
        let t1 = _mm256_mul_ps(w, _mm256_add_ps(c(LG2), _mm256_mul_ps(w, c(LG4))));
        let t2 = _mm256_mul_ps(z, _mm256_add_ps(c(LG1), _mm256_mul_ps(w, c(LG3))));
        let r = _mm256_add_ps(t2, t1);
        let hfsq = _mm256_mul_ps(_mm256_mul_ps(c(0.5), f), f);
        let dk = _mm256_cvtepi32_ps(k);
        let a = _mm256_mul_ps(s, _mm256_add_ps(hfsq, r));
        let a = _mm256_add_ps(a, _mm256_mul_ps(dk, c(LN2_LO)));
        let a = _mm256_sub_ps(a, hfsq);
        let a = _mm256_add_ps(a, f);
        _mm256_add_ps(a, _mm256_mul_ps(dk, c(LN2_HI)))
    }
    let [k0, k1] = key_from_seed(seed);
    let c3 = (Stream::Gumbel as u32) << 16 | (layer & 0xffff);
    let (m0, m1) = (_mm256_set1_epi32(M0 as i32), _mm256_set1_epi32(M1 as i32));
    let set = |v: u32| _mm256_set1_epi32(v as i32);
    let key = |r: u32| (k0.wrapping_add(r.wrapping_mul(W0)), k1.wrapping_add(r.wrapping_mul(W1)));
    // The counter is (token, expert, step, c3): only the expert differs between lanes. So the
    // products of the first three rounds that do not depend on it are scalars per row (and round
    // 1's M1 * step one for all rows): 4 of the 19 vector products are not needed.
    let (mut a, mut b, mut c, mut d) = ([set(0); N], [set(0); N], [set(0); N], [set(0); N]);
    let (h1s, l1s) = mulhilo(M1, step);
    let ((ka0, kb0), (ka1, kb1), (ka2, kb2)) = (key(0), key(1), key(2));
    for i in 0..N {
        // Round 1: a = hi(M1 step) ^ expert ^ k, b = lo(M1 step), c and d per row.
        let (h0, l0) = mulhilo(M0, token[i]);
        let a1 = _mm256_xor_si256(_mm256_loadu_si256(expert[i].as_ptr() as *const __m256i), set(h1s ^ ka0));
        let (c1, d1) = (h0 ^ c3 ^ kb0, l0);
        // Round 2: M0 * a per lane, M1 * c per row.
        let (hv, lv) = mulhilo8(a1, m0);
        let (h1, l1) = mulhilo(M1, c1);
        let (a2, b2) = (h1 ^ l1s ^ ka1, l1);
        let (c2, d2) = (_mm256_xor_si256(hv, set(d1 ^ kb1)), lv);
        // Round 3: M0 * a per row, M1 * c per lane.
        let (h0, l0) = mulhilo(M0, a2);
        let (hv, lv) = mulhilo8(c2, m1);
        a[i] = _mm256_xor_si256(hv, set(b2 ^ ka2));
        b[i] = lv;
        c[i] = _mm256_xor_si256(d2, set(h0 ^ kb2));
        d[i] = set(l0);
    }
    for round in 3..9 {
        let (k0, k1) = key(round);
        let (kv0, kv1) = (set(k0), set(k1));
        for i in 0..N {
            let (hi0, lo0) = mulhilo8(a[i], m0);
            let (hi1, lo1) = mulhilo8(c[i], m1);
            a[i] = _mm256_xor_si256(_mm256_xor_si256(hi1, b[i]), kv0);
            b[i] = lo1;
            c[i] = _mm256_xor_si256(_mm256_xor_si256(hi0, d[i]), kv1);
            d[i] = lo0;
        }
    }
    // Round 10 only for the first output word, the one the noise uses: a = hi(M1 c) ^ b ^ k0 (the
    // low word of mulhilo8 is not used here).
    let kv0 = set(key(9).0);
    for i in 0..N {
        a[i] = _mm256_xor_si256(_mm256_xor_si256(mulhilo8(c[i], m1).0, b[i]), kv0);
    }
    // u32_to_open_unit, then -ln(-ln u).
    let neg = _mm256_set1_ps(-0.0);
    let mut out = [[0f32; 8]; N];
    for i in 0..N {
        let u = _mm256_mul_ps(
            _mm256_add_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32::<9>(a[i])), _mm256_set1_ps(0.5)),
            _mm256_set1_ps(1.0 / 8_388_608.0),
        );
        let g = _mm256_xor_ps(ln8(_mm256_xor_ps(ln8(u), neg)), neg);
        _mm256_storeu_ps(out[i].as_mut_ptr(), g);
    }
    out
}

/// Four uniform u32 words for (stream, a, b, c): the general-purpose draw.
#[inline]
pub fn draw(seed: u64, stream: Stream, a: u32, b: u32, c: u32) -> [u32; 4] {
    philox4x32_10([a, b, c, (stream as u32) << 16], key_from_seed(seed))
}

/// Standard normals by Box-Muller from a Philox stream, `n` of them, keyed by (seed, stream, tag).
pub fn normals(seed: u64, stream: Stream, tag: u32, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    let mut i = 0u32;
    while out.len() < n {
        let r = draw(seed, stream, tag, i, 0);
        for pair in [(r[0], r[1]), (r[2], r[3])] {
            let u1 = u32_to_open_unit(pair.0) as f64;
            let u2 = u32_to_open_unit(pair.1) as f64;
            let rad = (-2.0 * u1.ln()).sqrt();
            let th = 2.0 * std::f64::consts::PI * u2;
            out.push((rad * th.cos()) as f32);
            out.push((rad * th.sin()) as f32);
        }
        i += 1;
    }
    out.truncate(n);
    out
}

/// FNV-1a of a string: a stable 32-bit tag for a parameter name.
pub fn fnv1a(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    // Known-answer vectors from Random123's kat_vectors for philox4x32_10.
    #[test]
    fn known_answers() {
        assert_eq!(philox4x32_10([0; 4], [0; 2]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
        assert_eq!(philox4x32_10([u32::MAX; 4], [u32::MAX; 2]), [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]);
        assert_eq!(
            philox4x32_10([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0]),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn gumbel_noise_avx2_matches_scalar_bits() {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            for t in 0..20_000u32 {
                let token = t.wrapping_mul(2_654_435_761);
                let experts: [u32; 8] = std::array::from_fn(|i| (t * 8 + i as u32) % 300);
                let seed = 0x1234_5678_9abc_def0 ^ t as u64;
                // SAFETY: AVX2 checked above.
                let other: [u32; 8] = std::array::from_fn(|i| experts[7 - i] ^ 0x55);
                let [one] = unsafe { gumbel_noise_avx2(seed, t % 7, t % 3, [token], [&experts]) };
                let two = unsafe { gumbel_noise_avx2(seed, t % 7, t % 3, [token, token ^ 1], [&experts, &other]) };
                for l in 0..8 {
                    let want = gumbel_noise(seed, t % 7, t % 3, token, experts[l]);
                    assert_eq!(one[l].to_bits(), want.to_bits(), "token {token} expert {}", experts[l]);
                    assert_eq!(two[0][l].to_bits(), want.to_bits(), "token {token} expert {}", experts[l]);
                    let want = gumbel_noise(seed, t % 7, t % 3, token ^ 1, other[l]);
                    assert_eq!(two[1][l].to_bits(), want.to_bits(), "token {} expert {}", token ^ 1, other[l]);
                }
            }
        }
    }

    #[test]
    fn ln_pos_is_within_an_ulp_of_f64() {
        // Every input the noise can produce: u = (j + 0.5) 2^-23, then -ln u.
        let mut worst = 0f64;
        for j in (0u32..1 << 23).step_by(7).chain([0, 1, 2, (1 << 23) - 1]) {
            let u = (j as f32 + 0.5) * (1.0 / 8_388_608.0);
            for x in [u, -ln_pos(u)] {
                let want = (x as f64).ln();
                let ulp = (want.abs() as f32).max(f32::MIN_POSITIVE);
                let ulp = (f32::from_bits(ulp.to_bits() + 1) - ulp) as f64;
                worst = worst.max((ln_pos(x) as f64 - want).abs() / ulp);
            }
        }
        assert!(worst < 1.0, "ln_pos error {worst} ulp");
    }

    #[test]
    fn noise_lanes_match_scalar() {
        let experts: [u32; 8] = [0, 1, 7, 63, 64, 255, 1000, u32::MAX];
        for (seed, step, layer, token) in
            [(42u64, 3u32, 1u32, 0u32), (0x1234_5678_9abc, 17, 3, 65535), (u64::MAX, 0, 0xffff, 7)]
        {
            let g = gumbel_noise_lanes(seed, step, layer, token, &experts);
            for (l, &e) in experts.iter().enumerate() {
                assert_eq!(g[l].to_bits(), gumbel_noise(seed, step, layer, token, e).to_bits());
            }
        }
    }

    #[test]
    fn open_unit_interval() {
        assert!(u32_to_open_unit(0) > 0.0);
        assert!(u32_to_open_unit(u32::MAX) < 1.0);
        assert!(gumbel_from_u32(0).is_finite() && gumbel_from_u32(u32::MAX).is_finite());
    }
}
