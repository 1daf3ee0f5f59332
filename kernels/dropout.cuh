// Philox dropout: the per-group body, written once and included by dropout.cu (CUDA) and
// dropout.metal (Metal). The CPU twin is src/ops/dropout.rs (`PhiloxDropout::group`).
//
// Element i of the contiguous input uses word i % 4 of Philox4x32-10 with counter
// (site, hi, i / 4, Stream::Dropout << 16) and the seed as key: rng::draw(seed, Stream::Dropout,
// site, hi, i / 4). It is dropped when its top 23 bits k satisfy k < threshold, where the host sets
// threshold = ceil(p * 2^23 - 0.5): the same test as (k + 0.5) / 2^23 < p, in integers, so every
// backend drops the same elements. Kept elements are multiplied by scale = 1 / (1 - p), dropped ones
// by 0 (so a NaN input stays NaN, as x * mask does).
//
// One thread owns one group of 4 elements. The including file defines GM_FN, GM_GLOBAL, GM_MULHI
// and gm_u32 (see philox.h).
#pragma once
#ifndef GM_INLINED
#include "philox.h"
#endif

// Stream::Dropout in src/rng/philox.rs.
#define GM_STREAM_DROPOUT 4u

// Scalar arguments; #[repr(C)] twin: `DropoutKernelArgs` in src/ops/dropout.rs.
struct DropoutKernelArgs {
    gm_u32 n;         // elements
    gm_u32 site;      // counter word 0
    gm_u32 hi;        // counter word 1: (step & 0xffff) << 16 | (micro & 0xffff)
    gm_u32 threshold; // drop when (word >> 9) < threshold
    gm_u32 seed_lo;
    gm_u32 seed_hi;
    float scale;      // 1 / (1 - p), rounded to f32
    gm_u32 pad;
};

// Elements 4g .. 4g + 3 (those below n) of y = x * mask.
GM_FN void gm_dropout_group(const GM_GLOBAL float* x, GM_GLOBAL float* y, DropoutKernelArgs p, gm_u32 g) {
    GmU4 r = gm_philox4x32_10(p.site, p.hi, g, GM_STREAM_DROPOUT << 16, p.seed_lo, p.seed_hi);
    gm_u32 w[4] = {r.x, r.y, r.z, r.w};
    gm_u32 base = g * 4u;
    for (gm_u32 j = 0u; j < 4u; ++j) {
        gm_u32 i = base + j;
        if (i < p.n) {
            float m = (w[j] >> 9) < p.threshold ? 0.0f : p.scale;
            y[i] = x[i] * m;
        }
    }
}
