// The Gumbel-Softmax router kernels: the per-row logic, written once and included by both
// gumbel_router.cu (CUDA) and gumbel_router.metal (Metal), so the body the H100 tests is the body
// Metal runs. The CPU twin is src/ops/gumbel_router.rs (`select_row`, `weights_row`, `bwd_row`).
//
// One thread owns one token row. The including file defines GM_FN, GM_GLOBAL (address space of
// device buffers), GM_MULHI, GM_LOGF, GM_EXPF, GM_NAN (a quiet NaN float), GM_F2U / GM_U2F (f32 <->
// u32 bit casts) and gm_u32 (see philox.h).
//
// Ops (entry points `<op>_f32` in both languages):
//   gumbel_select:      logits (T, E) -> (T, K + m) u32: K candidate experts (best logit first, ties
//                       to the lower index), then m positions within K (largest cand + g first,
//                       ties to the lower position); with noise_col != 0 (= K + m), (T, 2K + m): then
//                       the K noise values g as f32 bits.
//   gumbel_weights:     logits (T, E), cand (T, >= K) u32 -> y = softmax((cand + g) * inv_tau) (T, K),
//                       g read from cand[noise_col ..] when noise_col != 0, else regenerated.
//   gumbel_weights_bwd: y (T, K), dy (T, K), cand (T, >= K) u32 -> dlogits (T, E):
//                       y * (dy - sum(y * dy)) * inv_tau at the candidate columns, 0 elsewhere.
#pragma once
#ifndef GM_INLINED
#include "philox.h"
#endif

// Largest pre-filter K the kernels accept (the taken-set is a 32-bit mask). Keep in sync with
// MAX_K in src/ops/gumbel_router.rs.
#define GM_MAX_K 32

// Scalar arguments of every entry point; #[repr(C)] twin: `GmParams` in src/ops/gumbel_router.rs.
struct GmParams {
    gm_u32 rows;          // T
    gm_u32 e;             // E
    gm_u32 k;             // K candidates
    gm_u32 m;             // m selected (gumbel_select only)
    gm_u32 logits_stride; // row stride of logits / dlogits, in elements
    gm_u32 idx_stride;    // row stride of the candidate index rows
    gm_u32 y_stride;      // row stride of y (and of the select output)
    gm_u32 dy_stride;     // row stride of dy
    gm_u32 seed_lo;       // seed, low 32 bits
    gm_u32 seed_hi;       // seed, high 32 bits
    gm_u32 step;
    gm_u32 layer;
    gm_u32 token_base;    // token index of row 0 (micro-batch offset)
    gm_u32 noisy;         // 0: no noise (eval argmax)
    float inv_tau;        // 1 / tau, rounded to f32 (as candle's `t / tau` does)
    gm_u32 noise_col;     // column of the saved noise in a select row (K + m); 0: not saved
};

GM_FN float gm_noise(GmParams p, gm_u32 row, gm_u32 expert) {
    if (p.noisy == 0u) {
        return 0.0f;
    }
    return gm_gumbel_noise(p.seed_lo, p.seed_hi, p.step, p.layer, p.token_base + row, expert);
}

// One row of gumbel_select. `lg` points at the row's logits, `out` at its K + m output slots.
GM_FN void gm_select_row(const GM_GLOBAL float* lg, GM_GLOBAL gm_u32* out, GmParams p, gm_u32 row) {
    float cv[GM_MAX_K];
    gm_u32 ci[GM_MAX_K];
    gm_u32 n = 0u;
    // Top-K by insertion: a value enters only if strictly larger than the current K-th, and moves
    // up only past strictly smaller ones, so equal logits keep the lower expert index first.
    for (gm_u32 e = 0u; e < p.e; ++e) {
        float v = lg[e];
        gm_u32 j;
        if (n < p.k) {
            j = n;
            n += 1u;
        } else if (v > cv[p.k - 1u]) {
            j = p.k - 1u;
        } else {
            continue;
        }
        while (j > 0u && v > cv[j - 1u]) {
            cv[j] = cv[j - 1u];
            ci[j] = ci[j - 1u];
            j -= 1u;
        }
        cv[j] = v;
        ci[j] = e;
    }
    // Perturbed candidate values: cand + g, g keyed by the global expert index (and saved for
    // gumbel_weights when noise_col != 0).
    for (gm_u32 i = 0u; i < p.k; ++i) {
        float g = gm_noise(p, row, ci[i]);
        cv[i] = cv[i] + g;
        out[i] = ci[i];
        if (p.noise_col != 0u) {
            out[p.noise_col + i] = GM_F2U(g);
        }
    }
    // Gumbel-top-m: m rounds of argmax over the positions not yet taken; strict > keeps ties on
    // the lower position.
    gm_u32 taken = 0u;
    for (gm_u32 s = 0u; s < p.m; ++s) {
        gm_u32 best = GM_MAX_K;
        for (gm_u32 i = 0u; i < p.k; ++i) {
            if ((taken >> i) & 1u) {
                continue;
            }
            if (best == GM_MAX_K || cv[i] > cv[best]) {
                best = i;
            }
        }
        if (best == GM_MAX_K) {
            best = 0u; // unreachable for m <= K; keeps the index in range
        }
        taken |= 1u << best;
        out[p.k + s] = best;
    }
}

// One row of gumbel_weights. An out-of-range candidate index makes the row NaN (no stray reads).
GM_FN void gm_weights_row(const GM_GLOBAL float* lg, const GM_GLOBAL gm_u32* cand, GM_GLOBAL float* y, GmParams p,
                          gm_u32 row) {
    float z[GM_MAX_K];
    bool bad = false;
    for (gm_u32 i = 0u; i < p.k; ++i) {
        gm_u32 e = cand[i];
        if (e >= p.e) {
            bad = true;
            z[i] = 0.0f;
            continue;
        }
        float g = p.noise_col != 0u ? GM_U2F(cand[p.noise_col + i]) : gm_noise(p, row, e);
        z[i] = (lg[e] + g) * p.inv_tau;
    }
    float mx = z[0];
    for (gm_u32 i = 1u; i < p.k; ++i) {
        mx = z[i] > mx ? z[i] : mx;
    }
    float sum = 0.0f;
    for (gm_u32 i = 0u; i < p.k; ++i) {
        z[i] = GM_EXPF(z[i] - mx);
        sum += z[i];
    }
    for (gm_u32 i = 0u; i < p.k; ++i) {
        y[i] = bad ? GM_NAN : z[i] / sum;
    }
}

// One row of gumbel_weights_bwd: the softmax JVP scattered to the candidate columns.
GM_FN void gm_weights_bwd_row(const GM_GLOBAL float* y, const GM_GLOBAL float* dy, const GM_GLOBAL gm_u32* cand,
                              GM_GLOBAL float* dl, GmParams p) {
    for (gm_u32 j = 0u; j < p.e; ++j) {
        dl[j] = 0.0f;
    }
    float dot = 0.0f;
    for (gm_u32 i = 0u; i < p.k; ++i) {
        dot += y[i] * dy[i];
    }
    for (gm_u32 i = 0u; i < p.k; ++i) {
        gm_u32 e = cand[i];
        if (e < p.e) {
            dl[e] += y[i] * (dy[i] - dot) * p.inv_tau;
        }
    }
}
