// Runs the Metal entry points of gumbel_router.metal (and so the shared row bodies of
// gumbel_router.cuh and philox.h) on the host, compiled as C++ by g++ against metal_shim.h.
// Checks: Philox4x32-10 known answers (Random123 kat_vectors, the same as src/rng/philox.rs's
// tests), the router noise for fixed keys (the same values as tests/ops.rs
// `kernel_noise_constants`), the invariants of select / weights / weights_bwd on a small input, and
// that the y saved by select (y_col) are the bits gumbel_weights computes.
// Built and run by scripts/check_kernels.sh; exit status 1 on any failure.
#include "gumbel_router.metal"

#include <cstdio>
#include <vector>

#include "host_check.h"

int main() {
    // Random123 known answers.
    GmU4 a = gm_philox4x32_10(0, 0, 0, 0, 0, 0);
    CHECK(a.x == 0x6627e8d5u && a.y == 0xe169c58du && a.z == 0xbc57ac4cu && a.w == 0x9b00dbd8u, "philox kat 0");
    GmU4 b = gm_philox4x32_10(~0u, ~0u, ~0u, ~0u, ~0u, ~0u);
    CHECK(b.x == 0x408f276du && b.y == 0x41c83b0eu && b.z == 0xa20bc7c6u && b.w == 0x6d5451fdu, "philox kat 1");
    GmU4 c = gm_philox4x32_10(0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u, 0xa4093822u, 0x299f31d0u);
    CHECK(c.x == 0xd16cfe09u && c.y == 0x94fdccebu && c.z == 0x5001e420u && c.w == 0x24126ea1u, "philox kat 2");

    // The router noise for fixed (seed, step, layer, token, expert).
    struct {
        unsigned long long seed;
        uint step, layer, token, expert, word;
        double g;
    } keys[] = {
        {0x123456789abcull, 17u, 3u, 5u, 0u, 0x51cd9c65u, -0.13178364170919343},
        {0x2aull, 3u, 1u, 65535u, 63u, 0x1e826c93u, -0.7547785332091538},
        {0xfeedbeef1234ull, 9u, 2u, 77u, 255u, 0xa8304807u, 0.8672828807788139},
    };
    for (auto& k : keys) {
        uint lo = (uint)k.seed, hi = (uint)(k.seed >> 32);
        GmU4 r = gm_philox4x32_10(k.token, k.expert, k.step, (GM_STREAM_GUMBEL << 16) | k.layer, lo, hi);
        CHECK(r.x == k.word, "philox word for token %u expert %u: %08x", k.token, k.expert, r.x);
        float g = gm_gumbel_noise(lo, hi, k.step, k.layer, k.token, k.expert);
        CHECK(std::fabs(g - k.g) < 2e-6 * (1.0 + std::fabs(k.g)), "gumbel noise %.9g vs %.9g", g, k.g);
    }

    // select / weights / bwd on T = 3 rows, E = 37, K = 5, m = 2.
    const uint T = 3, E = 37, K = 5, M = 2;
    std::vector<float> lg(T * E);
    for (uint i = 0; i < T * E; ++i) lg[i] = (float)((i * 2654435761u) % 1000u) / 250.0f - 2.0f;
    GumbelKernelArgs p = {};
    p.rows = T; p.e = E; p.k = K; p.m = M; p.logits_stride = E; p.idx_stride = K + M; p.y_stride = K + M;
    p.dy_stride = K; p.seed_lo = 7; p.seed_hi = 1; p.step = 4; p.layer = 2; p.token_base = 10; p.noisy = 1;
    p.inv_tau = 1.0f / 0.7f;
    std::vector<uint> sel(T * (K + M));
    for (uint r = 0; r < T; ++r) gumbel_select_f32(lg.data(), sel.data(), p, r);
    for (uint r = 0; r < T; ++r) {
        const float* row = &lg[r * E];
        const uint* s = &sel[r * (K + M)];
        for (uint i = 1; i < K; ++i) CHECK(row[s[i - 1]] >= row[s[i]], "row %u candidates not sorted", r);
        uint above = 0;
        for (uint e = 0; e < E; ++e) above += row[e] > row[s[K - 1]];
        CHECK(above < K, "row %u: %u logits beat the K-th candidate", r, above);
        CHECK(s[K] < K && s[K + 1] < K && s[K] != s[K + 1], "row %u selection", r);
    }
    GumbelKernelArgs pw = p;
    pw.y_stride = K;
    std::vector<float> y(T * K), dy(T * K), dl(T * E);
    for (uint r = 0; r < T; ++r) gumbel_weights_f32(lg.data(), sel.data(), y.data(), pw, r);
    for (uint i = 0; i < T * K; ++i) dy[i] = (float)(i % 7) - 3.0f;
    for (uint r = 0; r < T; ++r) {
        float sum = 0.0f;
        uint best = 0;
        for (uint i = 0; i < K; ++i) {
            sum += y[r * K + i];
            if (y[r * K + i] > y[r * K + best]) best = i;
        }
        CHECK(std::fabs(sum - 1.0f) < 1e-6f, "row %u: y sums to %g", r, sum);
        CHECK(best == sel[r * (K + M) + K], "row %u: argmax y %u is not the first selection", r, best);
    }
    // Select saving y (T, 2K + m): the same selection, its y bit-identical to the computed y, and
    // gumbel_weights given that output copies them.
    GumbelKernelArgs ps = p;
    ps.y_stride = 2 * K + M;
    ps.y_col = K + M;
    std::vector<uint> sel_y(T * (2 * K + M));
    for (uint r = 0; r < T; ++r) gumbel_select_f32(lg.data(), sel_y.data(), ps, r);
    GumbelKernelArgs pc = pw;
    pc.idx_stride = 2 * K + M;
    pc.y_col = K + M;
    std::vector<float> y_copied(T * K);
    for (uint r = 0; r < T; ++r) gumbel_weights_f32(lg.data(), sel_y.data(), y_copied.data(), pc, r);
    for (uint r = 0; r < T; ++r) {
        for (uint i = 0; i < K + M; ++i) {
            CHECK(sel_y[r * (2 * K + M) + i] == sel[r * (K + M) + i], "row %u col %u: saving y changed the selection", r, i);
        }
        for (uint i = 0; i < K; ++i) {
            float saved = GM_U2F(sel_y[r * (2 * K + M) + K + M + i]);
            CHECK(GM_F2U(saved) == GM_F2U(y[r * K + i]), "row %u: saved y %g is not the computed %g", r, saved, y[r * K + i]);
            CHECK(GM_F2U(y_copied[r * K + i]) == GM_F2U(y[r * K + i]), "row %u: copied y %g is not %g", r, y_copied[r * K + i], y[r * K + i]);
        }
    }
    GumbelKernelArgs pb = pw;
    pb.idx_stride = K + M;
    for (uint g = 0; g < T * E; ++g) gumbel_weights_bwd_f32(y.data(), dy.data(), sel.data(), dl.data(), pb, g);
    for (uint r = 0; r < T; ++r) {
        float sum = 0.0f;
        uint nonzero = 0;
        for (uint e = 0; e < E; ++e) {
            sum += dl[r * E + e];
            nonzero += dl[r * E + e] != 0.0f;
        }
        CHECK(std::fabs(sum) < 1e-5f, "row %u: dlogits sum to %g, not 0", r, sum);
        CHECK(nonzero <= K, "row %u: %u nonzero gradients", r, nonzero);
    }
    std::printf("host_check: %s (%d failures)\n", failures ? "FAIL" : "ok", failures);
    return failures ? 1 : 0;
}
