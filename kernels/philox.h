// Philox4x32-10 and the router's Gumbel noise, shared by the CUDA (.cu) and Metal (.metal) kernels.
//
// Bit-identical to src/rng/philox.rs: the same rounds, the same key schedule, the same counter
// layout (token, expert, step, Stream::Gumbel << 16 | layer) and the same u32 -> (0,1) -> Gumbel
// mapping. Only the final `log` may differ from the host libm by an ulp or so.
//
// The including file defines, before including this header:
//   GM_FN          function qualifier (CUDA: __device__ __forceinline__, Metal: inline)
//   GM_MULHI(a,b)  high 32 bits of a*b (CUDA: __umulhi, Metal: mulhi)
//   GM_LOGF(x)     single-precision natural log (CUDA: logf, Metal: precise::log)
//   gm_u32         a 32-bit unsigned integer type
#pragma once

#define GM_PHILOX_M0 0xD2511F53u
#define GM_PHILOX_M1 0xCD9E8D57u
#define GM_PHILOX_W0 0x9E3779B9u
#define GM_PHILOX_W1 0xBB67AE85u
// Stream::Gumbel in src/rng/philox.rs.
#define GM_STREAM_GUMBEL 1u

struct GmU4 {
    gm_u32 x, y, z, w;
};

// Ten Philox rounds over (c0, c1, c2, c3) with key (k0, k1).
GM_FN GmU4 gm_philox4x32_10(gm_u32 c0, gm_u32 c1, gm_u32 c2, gm_u32 c3, gm_u32 k0, gm_u32 k1) {
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += GM_PHILOX_W0;
            k1 += GM_PHILOX_W1;
        }
        gm_u32 hi0 = GM_MULHI(GM_PHILOX_M0, c0);
        gm_u32 lo0 = GM_PHILOX_M0 * c0;
        gm_u32 hi1 = GM_MULHI(GM_PHILOX_M1, c2);
        gm_u32 lo1 = GM_PHILOX_M1 * c2;
        gm_u32 n0 = hi1 ^ c1 ^ k0;
        gm_u32 n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
    }
    GmU4 r;
    r.x = c0;
    r.y = c1;
    r.z = c2;
    r.w = c3;
    return r;
}

// The top 23 bits, centred in their bucket: strictly inside (0, 1).
GM_FN float gm_u32_to_open_unit(gm_u32 x) {
    return ((float)(x >> 9) + 0.5f) * (1.0f / 8388608.0f); /* 23 bits: see src/rng/philox.rs */
}

// Standard Gumbel(0, 1): g = -ln(-ln u).
GM_FN float gm_gumbel_from_u32(gm_u32 x) {
    float u = gm_u32_to_open_unit(x);
    return -GM_LOGF(-GM_LOGF(u));
}

// rng::gumbel_noise(seed, step, layer, token, expert) with seed = (seed_hi << 32) | seed_lo.
GM_FN float gm_gumbel_noise(gm_u32 seed_lo, gm_u32 seed_hi, gm_u32 step, gm_u32 layer, gm_u32 token,
                            gm_u32 expert) {
    GmU4 r = gm_philox4x32_10(token, expert, step, (GM_STREAM_GUMBEL << 16) | (layer & 0xffffu), seed_lo,
                              seed_hi);
    return gm_gumbel_from_u32(r.x);
}
