// The balance-statistics kernels: the per-thread logic, written once and included by both
// balance_stats.cu (CUDA) and balance_stats.metal (Metal). The CPU twin is src/ops/balance_stats/cpu.rs
// (`row_stats`, `partial_chunk`, `bwd_row`), which sums in the same order.
//
// The including file defines BS_FN, BS_GLOBAL (address space of device buffers), BS_EXPF, BS_DIV
// (an IEEE-rounded f32 division, whatever the fast-math setting), BS_NAN (a quiet NaN float),
// bs_u32 and bs_size (an unsigned 64-bit index type).
//
// Forward, logits (T, E) f32 and indices (T, m) u32 -> out (2, E): out[0] = f (share of the T*m
// slots routed to each expert), out[1] = P (mean over tokens of softmax(logits_t)). Three
// launches, no atomics, so every sum has one fixed order whatever the scheduling:
//   balance_stats_rows_f32:    one thread per row t: stats[t] = (max_j l_tj, sum_j exp(l_tj - max)).
//   balance_stats_partial_f32: one thread per (chunk c, expert j): the sum over the chunk's rows,
//                              in row order, of p_tj = exp(l_tj - max_t) / sum_t -> part_p (C, E),
//                              and the number of slots of those rows equal to j -> part_n (C, E + 1)
//                              (column E, written by j = 0: slots with an index >= E).
//   balance_stats_finish_f32:  one thread per expert j: sums the C chunks in chunk order; f_j is
//                              NaN when any index was out of range (the CPU op fails instead).
// Backward, logits (T, E), g (E) = dL/dP -> dlogits (T, E):
//   balance_stats_bwd_f32:     one thread per row: p_t * (g - <p_t, g>) / T, with p_t recomputed.
#pragma once

// Scalar arguments of every entry point; #[repr(C)] twin: `BalanceKernelArgs` in src/ops/balance_stats/mod.rs.
struct BalanceKernelArgs {
    bs_u32 rows;          // T
    bs_u32 e;             // E (>= 1)
    bs_u32 m;             // index slots per token
    bs_u32 chunk;         // rows per chunk of the P reduction
    bs_u32 n_chunks;      // C = ceil(T / chunk)
    bs_u32 logits_stride; // row stride of the logits, in elements (dlogits rows are dense: E)
    bs_u32 idx_stride;    // row stride of the index rows
    bs_u32 slots;         // T * m, the denominator of f
    float inv_rows;       // 1 / T rounded to f32 (candle's `mean` multiplies by it too)
    bs_u32 pad0;
    bs_u32 pad1;
    bs_u32 pad2;
};

// Max and softmax denominator of one logits row.
BS_FN void bs_row_stats(const BS_GLOBAL float* lg, BS_GLOBAL float* stats, BalanceKernelArgs p) {
    float mx = lg[0];
    for (bs_u32 j = 1u; j < p.e; ++j) {
        mx = lg[j] > mx ? lg[j] : mx;
    }
    float sum = 0.0f;
    for (bs_u32 j = 0u; j < p.e; ++j) {
        sum += BS_EXPF(lg[j] - mx);
    }
    stats[0] = mx;
    stats[1] = sum;
}

// Cell (chunk c, expert j) of the partial sums; `lg`, `stats`, `idx` point at row 0.
BS_FN void bs_partial_cell(const BS_GLOBAL float* lg, const BS_GLOBAL float* stats, const BS_GLOBAL bs_u32* idx,
                           BS_GLOBAL float* part_p, BS_GLOBAL bs_u32* part_n, BalanceKernelArgs p, bs_u32 c, bs_u32 j) {
    bs_u32 t0 = c * p.chunk;
    bs_u32 t1 = p.rows - t0 < p.chunk ? p.rows : t0 + p.chunk;
    float acc = 0.0f;
    bs_u32 n = 0u;
    bs_u32 bad = 0u;
    for (bs_u32 t = t0; t < t1; ++t) {
        float mx = stats[(bs_size)t * 2u];
        float sum = stats[(bs_size)t * 2u + 1u];
        acc += BS_DIV(BS_EXPF(lg[(bs_size)t * p.logits_stride + j] - mx), sum);
        const BS_GLOBAL bs_u32* it = idx + (bs_size)t * p.idx_stride;
        for (bs_u32 s = 0u; s < p.m; ++s) {
            n += it[s] == j ? 1u : 0u;
            bad += it[s] >= p.e ? 1u : 0u;
        }
    }
    part_p[(bs_size)c * p.e + j] = acc;
    part_n[(bs_size)c * (p.e + 1u) + j] = n;
    if (j == 0u) {
        part_n[(bs_size)c * (p.e + 1u) + p.e] = bad;
    }
}

// Column j of the output: out[j] = f_j, out[E + j] = P_j.
BS_FN void bs_finish_col(const BS_GLOBAL float* part_p, const BS_GLOBAL bs_u32* part_n, BS_GLOBAL float* out,
                         BalanceKernelArgs p, bs_u32 j) {
    float acc = 0.0f;
    bs_u32 n = 0u;
    bs_u32 bad = 0u;
    for (bs_u32 c = 0u; c < p.n_chunks; ++c) {
        acc += part_p[(bs_size)c * p.e + j];
        n += part_n[(bs_size)c * (p.e + 1u) + j];
        bad += part_n[(bs_size)c * (p.e + 1u) + p.e];
    }
    // count / slots in f32 equals the f64 quotient rounded to f32 (double rounding of a division
    // is exact for 53 >= 2 * 24 + 2 bits), so f matches the CPU op while T * m < 2^24.
    float f = p.slots == 0u ? 0.0f : BS_DIV((float)n, (float)p.slots);
    out[j] = bad != 0u ? BS_NAN : f;
    out[p.e + j] = acc * p.inv_rows;
}

// One row of the backward; `g` is dL/dP (E), `dl` the row's E outputs.
BS_FN void bs_bwd_row(const BS_GLOBAL float* lg, const BS_GLOBAL float* g, BS_GLOBAL float* dl, BalanceKernelArgs p) {
    float mx = lg[0];
    for (bs_u32 j = 1u; j < p.e; ++j) {
        mx = lg[j] > mx ? lg[j] : mx;
    }
    float sum = 0.0f;
    for (bs_u32 j = 0u; j < p.e; ++j) {
        float v = BS_EXPF(lg[j] - mx);
        dl[j] = v;
        sum += v;
    }
    float dot = 0.0f;
    for (bs_u32 j = 0u; j < p.e; ++j) {
        float q = BS_DIV(dl[j], sum);
        dl[j] = q;
        dot += q * g[j];
    }
    for (bs_u32 j = 0u; j < p.e; ++j) {
        dl[j] = dl[j] * (g[j] - dot) * p.inv_rows;
    }
}
