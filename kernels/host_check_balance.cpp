// Runs the Metal entry points of balance_stats.metal (and so the shared bodies of
// balance_stats.cuh) on the host, compiled as C++ by g++ against metal_shim.h, one "thread" at a
// time, and compares them with a plain double-precision loop: f exactly, P and the backward to a
// relative 1e-5. Shapes: E not a multiple of 32, E = 256, T = 1, m = 2, several chunks with a
// ragged last one; an out-of-range index must turn the f row into NaN.
// Built and run by scripts/check_kernels.sh; exit status 1 on any failure.
#include "balance_stats.metal"

#include <cstdio>
#include <vector>

#include "host_check.h"

// Rows per chunk as src/ops/balance_stats/mod.rs chooses them: max(32, ceil(sqrt(T))).
static uint chunk_rows(uint t) {
    uint c = 1;
    while ((ulong)c * c < t) ++c;
    return c < 32 ? 32 : c;
}

static void run(uint T, uint E, uint M, bool bad_index) {
    // Logits rows strided by E + 3 (a narrow of a wider tensor), indices rows by M + 1.
    const uint LS = E + 3, IS = M + 1;
    std::vector<float> lg((size_t)T * LS, 1e30f);
    std::vector<uint> idx((size_t)T * IS, 0xdeadu);
    uint s = 12345u;
    for (uint t = 0; t < T; ++t) {
        for (uint j = 0; j < E; ++j) {
            s = s * 1664525u + 1013904223u;
            lg[(size_t)t * LS + j] = (float)(s >> 8) / (float)(1u << 24) * 8.0f - 4.0f;
        }
        for (uint k = 0; k < M; ++k) {
            s = s * 1664525u + 1013904223u;
            idx[(size_t)t * IS + k] = (s >> 8) % E;
        }
    }
    if (bad_index) idx[(size_t)(T / 2) * IS + M - 1] = E + 7;
    BalanceKernelArgs p = {};
    p.rows = T; p.e = E; p.m = M; p.chunk = chunk_rows(T); p.n_chunks = (T + p.chunk - 1) / p.chunk;
    p.logits_stride = LS; p.idx_stride = IS; p.slots = T * M; p.inv_rows = (float)(1.0 / T);

    std::vector<float> stats((size_t)T * 2), part_p((size_t)p.n_chunks * E), out(2 * E);
    std::vector<uint> part_n((size_t)p.n_chunks * (E + 1));
    for (uint t = 0; t < T; ++t) balance_stats_rows_f32(lg.data(), stats.data(), p, t);
    for (uint i = 0; i < p.n_chunks * E; ++i)
        balance_stats_partial_f32(lg.data(), stats.data(), idx.data(), part_p.data(), part_n.data(), p, i);
    for (uint j = 0; j < E; ++j) balance_stats_finish_f32(part_p.data(), part_n.data(), out.data(), p, j);

    // The plain loop, in double.
    std::vector<double> f(E, 0.0), P(E, 0.0), g(E), probs((size_t)T * E);
    for (uint t = 0; t < T; ++t) {
        const float* row = &lg[(size_t)t * LS];
        double mx = row[0], sum = 0.0;
        for (uint j = 1; j < E; ++j) mx = row[j] > mx ? row[j] : mx;
        for (uint j = 0; j < E; ++j) sum += std::exp(row[j] - mx);
        for (uint j = 0; j < E; ++j) {
            probs[(size_t)t * E + j] = std::exp(row[j] - mx) / sum;
            P[j] += probs[(size_t)t * E + j] / T;
        }
        for (uint k = 0; k < M; ++k) {
            uint e = idx[(size_t)t * IS + k];
            if (e < E) f[e] += 1.0 / (T * M);
        }
    }
    double pmax = 0.0;
    for (uint j = 0; j < E; ++j) pmax = P[j] > pmax ? P[j] : pmax;
    for (uint j = 0; j < E; ++j) {
        if (bad_index) {
            CHECK(std::isnan(out[j]), "T=%u E=%u: f[%u] = %g with a bad index, want NaN", T, E, j, out[j]);
        } else {
            CHECK(out[j] == (float)f[j], "T=%u E=%u: f[%u] = %.9g, want %.9g", T, E, j, out[j], (float)f[j]);
        }
        CHECK(std::fabs(out[E + j] - P[j]) <= 1e-5 * pmax, "T=%u E=%u: P[%u] = %.9g, want %.9g", T, E, j,
              out[E + j], P[j]);
    }

    // Backward against p_t * (g - <p_t, g>) / T in double.
    std::vector<float> gf(E), dl((size_t)T * E);
    for (uint j = 0; j < E; ++j) gf[j] = (float)((j * 37u) % 11u) - 5.0f;
    for (uint t = 0; t < T; ++t) balance_stats_bwd_f32(lg.data(), gf.data(), dl.data(), p, t);
    double worst = 0.0, scale = 0.0;
    for (uint t = 0; t < T; ++t) {
        const double* q = &probs[(size_t)t * E];
        double dot = 0.0;
        for (uint j = 0; j < E; ++j) dot += q[j] * gf[j];
        for (uint j = 0; j < E; ++j) {
            double want = q[j] * (gf[j] - dot) / T;
            double d = std::fabs(dl[(size_t)t * E + j] - want);
            worst = d > worst ? d : worst;
            scale = std::fabs(want) > scale ? std::fabs(want) : scale;
        }
    }
    CHECK(worst <= 1e-5 * scale, "T=%u E=%u: backward max error %g (scale %g)", T, E, worst, scale);
}

int main() {
    run(1, 8, 1, false);
    run(1, 256, 4, false);
    run(100, 37, 2, false);   // 4 chunks of 32, the last one ragged
    run(1500, 64, 1, false);  // 39 rows per chunk
    run(300, 256, 2, false);
    run(50, 37, 2, true);
    std::printf("host_check_balance: %s (%d failures)\n", failures ? "FAIL" : "ok", failures);
    return failures ? 1 : 0;
}
