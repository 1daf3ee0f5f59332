// The Gumbel-Softmax router kernels: the per-row logic, written once and included by both
// gumbel_router.cu (CUDA) and gumbel_router.metal (Metal), so the body the H100 tests is the body
// Metal runs. The CPU twin is src/ops/gumbel_router/cpu.rs (`choose_row`, `weights_row`,
// `bwd_row`).
//
// select and weights: one thread owns one token row, its arrays in registers (templates over the
// largest K they hold); weights_bwd: one thread per element of the (T, E) output. The including file
// defines GM_FN, GM_GLOBAL (address space of device buffers), GM_MULHI, GM_LOGF, GM_EXPF, GM_NAN (a
// quiet NaN float), GM_INF (+infinity), GM_UNROLL (an unroll pragma, or nothing), GM_F2U / GM_U2F
// (f32 <-> u32 bit casts) and gm_u32 (see philox.h).
//
// Ops (entry points `<op>_f32` in both languages):
//   gumbel_select:      logits (T, E) -> (T, K + m) u32: K candidate experts (best logit first, ties
//                       to the lower index), then m positions within K (largest cand + g first,
//                       ties to the lower position); with y_col != 0 (= K + m), (T, 2K + m): then
//                       the K weights y = softmax((cand + g) * inv_tau) as f32 bits (gm_softmax_t,
//                       the same arithmetic as gumbel_weights, so the same bits).
//   gumbel_weights:     logits (T, E), cand (T, >= K) u32 -> y = softmax((cand + g) * inv_tau) (T, K),
//                       copied from cand[y_col ..] when y_col != 0 (the select output of the same
//                       logits), else computed with g regenerated.
//   gumbel_weights_bwd: y (T, K), dy (T, K), cand (T, >= K) u32 -> dlogits (T, E):
//                       y * (dy - sum(y * dy)) * inv_tau at the candidate columns, 0 elsewhere.
#pragma once
#ifndef GM_INLINED
#include "philox.h"
#endif

// Largest pre-filter K the kernels accept (the taken-set is a 32-bit mask). Keep in sync with
// MAX_K in src/ops/gumbel_router/mod.rs.
#define GM_MAX_K 32

// Scalar arguments of every entry point; #[repr(C)] twin: `GumbelKernelArgs` in src/ops/gumbel_router/mod.rs.
struct GumbelKernelArgs {
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
    gm_u32 y_col;         // column of the saved weights y in a select row (K + m); 0: not saved
};

GM_FN float gm_noise(GumbelKernelArgs p, gm_u32 row, gm_u32 expert) {
    if (p.noisy == 0u) {
        return 0.0f;
    }
    return gm_gumbel_noise(p.seed_lo, p.seed_hi, p.step, p.layer, p.token_base + row, expert);
}

// Whether (v, e) ranks before (w, f) among candidates: larger logit first, ties to the lower expert
// index. A total order, so the insertion network below keeps exactly the CPU's top-K order.
GM_FN bool gm_before(float v, gm_u32 e, float w, gm_u32 f) {
    return v > w || (v == w && e < f);
}

// A row of K <= KMAX floats passed by value (no address-space qualifiers needed in Metal; it stays
// in registers once inlined).
template <int KMAX>
struct GmVec {
    float v[KMAX];
};

// softmax(z * inv_tau) over the first k entries (the rest untouched): scale, max, exp(z - max), sum
// in order, divide. The one definition of the weights arithmetic, for select's saved y and for
// gumbel_weights (the CPU twin is `softmax_scaled` in src/ops/gumbel_router/cpu.rs).
template <int KMAX>
GM_FN GmVec<KMAX> gm_softmax_t(GmVec<KMAX> z, gm_u32 k, float inv_tau) {
    float mx = -GM_INF;
    GM_UNROLL
    for (int i = 0; i < KMAX; ++i) {
        if ((gm_u32)i < k) {
            z.v[i] = z.v[i] * inv_tau;
            mx = (i == 0 || z.v[i] > mx) ? z.v[i] : mx;
        }
    }
    float sum = 0.0f;
    GM_UNROLL
    for (int i = 0; i < KMAX; ++i) {
        if ((gm_u32)i < k) {
            z.v[i] = GM_EXPF(z.v[i] - mx);
            sum += z.v[i];
        }
    }
    GM_UNROLL
    for (int i = 0; i < KMAX; ++i) {
        if ((gm_u32)i < k) {
            z.v[i] = z.v[i] / sum;
        }
    }
    return z;
}

// One row of gumbel_select for K <= KMAX, everything in registers: every array index is a
// compile-time constant after unrolling (a runtime index would put the arrays in local memory).
// `lg` points at the row's logits, `out` at its output row.
template <int KMAX>
GM_FN void gm_select_row_t(const GM_GLOBAL float* lg, GM_GLOBAL gm_u32* out, GumbelKernelArgs p, gm_u32 row) {
    float cv[KMAX];
    gm_u32 ci[KMAX];
    GM_UNROLL
    for (int j = 0; j < KMAX; ++j) {
        cv[j] = -GM_INF;
        ci[j] = 0xffffffffu;
    }
    // Top-K by an insertion network: each logit walks down the sorted slots, swapping with every
    // slot it ranks before, so the slots stay sorted by gm_before and the K best remain.
    for (gm_u32 e = 0u; e < p.e; ++e) {
        float v = lg[e];
        gm_u32 x = e;
        GM_UNROLL
        for (int j = 0; j < KMAX; ++j) {
            if ((gm_u32)j < p.k && gm_before(v, x, cv[j], ci[j])) {
                float tv = cv[j];
                gm_u32 tx = ci[j];
                cv[j] = v;
                ci[j] = x;
                v = tv;
                x = tx;
            }
        }
    }
    // Perturbed candidate values: cand + g, g keyed by the global expert index; when y_col != 0
    // their softmax y is saved for gumbel_weights.
    GmVec<KMAX> z;
    GM_UNROLL
    for (int i = 0; i < KMAX; ++i) {
        if ((gm_u32)i < p.k) {
            cv[i] = cv[i] + gm_noise(p, row, ci[i]);
            out[i] = ci[i];
        }
        z.v[i] = cv[i];
    }
    if (p.y_col != 0u) {
        z = gm_softmax_t<KMAX>(z, p.k, p.inv_tau);
        GM_UNROLL
        for (int i = 0; i < KMAX; ++i) {
            if ((gm_u32)i < p.k) {
                out[p.y_col + i] = GM_F2U(z.v[i]);
            }
        }
    }
    // Gumbel-top-m: m rounds of argmax over the positions not yet taken; strict > keeps ties on
    // the lower position.
    gm_u32 taken = 0u;
    for (gm_u32 s = 0u; s < p.m; ++s) {
        gm_u32 best = 0u;
        float bv = 0.0f;
        bool found = false;
        GM_UNROLL
        for (int i = 0; i < KMAX; ++i) {
            if ((gm_u32)i < p.k && ((taken >> i) & 1u) == 0u && (!found || cv[i] > bv)) {
                best = (gm_u32)i;
                bv = cv[i];
                found = true;
            }
        }
        taken |= 1u << best;
        out[p.k + s] = best;
    }
}

// One row of gumbel_select: the register variant for the smallest KMAX that holds K (K is
// uniform across a launch, so this branch does not diverge).
GM_FN void gm_select_row(const GM_GLOBAL float* lg, GM_GLOBAL gm_u32* out, GumbelKernelArgs p, gm_u32 row) {
    if (p.k <= 4u) {
        gm_select_row_t<4>(lg, out, p, row);
    } else if (p.k <= 8u) {
        gm_select_row_t<8>(lg, out, p, row);
    } else if (p.k <= 16u) {
        gm_select_row_t<16>(lg, out, p, row);
    } else {
        gm_select_row_t<GM_MAX_K>(lg, out, p, row);
    }
}

// One row of gumbel_weights for K <= KMAX, in registers: y copied from the select output when
// y_col != 0, else computed with the noise regenerated. An out-of-range candidate index makes the
// row NaN (no stray reads).
template <int KMAX>
GM_FN void gm_weights_row_t(const GM_GLOBAL float* lg, const GM_GLOBAL gm_u32* cand, GM_GLOBAL float* y, GumbelKernelArgs p,
                            gm_u32 row) {
    GmVec<KMAX> z;
    bool bad = false;
    GM_UNROLL
    for (int i = 0; i < KMAX; ++i) {
        z.v[i] = -GM_INF;
        if ((gm_u32)i < p.k) {
            gm_u32 e = cand[i];
            if (e >= p.e) {
                bad = true;
                z.v[i] = 0.0f;
            } else if (p.y_col != 0u) {
                z.v[i] = GM_U2F(cand[p.y_col + i]);
            } else {
                z.v[i] = lg[e] + gm_noise(p, row, e);
            }
        }
    }
    if (p.y_col == 0u) {
        z = gm_softmax_t<KMAX>(z, p.k, p.inv_tau);
    }
    GM_UNROLL
    for (int i = 0; i < KMAX; ++i) {
        if ((gm_u32)i < p.k) {
            y[i] = bad ? GM_NAN : z.v[i];
        }
    }
}

// One row of gumbel_weights (see gm_select_row for the KMAX dispatch).
GM_FN void gm_weights_row(const GM_GLOBAL float* lg, const GM_GLOBAL gm_u32* cand, GM_GLOBAL float* y, GumbelKernelArgs p,
                          gm_u32 row) {
    if (p.k <= 4u) {
        gm_weights_row_t<4>(lg, cand, y, p, row);
    } else if (p.k <= 8u) {
        gm_weights_row_t<8>(lg, cand, y, p, row);
    } else if (p.k <= 16u) {
        gm_weights_row_t<16>(lg, cand, y, p, row);
    } else {
        gm_weights_row_t<GM_MAX_K>(lg, cand, y, p, row);
    }
}

// One element dlogits[row, col] of gumbel_weights_bwd: the softmax JVP at the candidate columns, 0
// elsewhere. One thread per element, so the (T, E) output is written with coalesced stores; the row's
// y, dy and candidates (K values each) are re-read per element from cache. Same summation order as
// the CPU's bwd_row: dot over i in order, then 0 + y_i * (dy_i - dot) * inv_tau.
GM_FN float gm_weights_bwd_elem(const GM_GLOBAL float* y, const GM_GLOBAL float* dy, const GM_GLOBAL gm_u32* cand,
                                GumbelKernelArgs p, gm_u32 col) {
    float dot = 0.0f;
    for (gm_u32 i = 0u; i < p.k; ++i) {
        dot += y[i] * dy[i];
    }
    float v = 0.0f;
    for (gm_u32 i = 0u; i < p.k; ++i) {
        if (cand[i] == col) {
            v += y[i] * (dy[i] - dot) * p.inv_tau;
        }
    }
    return v;
}
