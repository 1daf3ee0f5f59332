// Runs the Metal entry points of moe_dispatch.metal (and so the shared bodies of moe_dispatch.cuh)
// on the host, compiled as C++ by g++ against metal_shim.h, one "thread" at a time in launch order,
// and checks them against plain loops written here: the sort against a slot-major capacity plan
// (GShard order, as moe::dispatch::plan), gather / gather_bwd / combine / combine_bwd against direct
// sums, for E not a multiple of 32, E = 256, m = 1 and 2, with and without capacity, T = 1.
// Built and run by scripts/check_kernels.sh; exit status 1 on any failure.
#include "moe_dispatch.metal"

#include <cmath>
#include <cstdio>
#include <vector>

#include "host_check.h"

static uint64_t rng_state = 0x1234;
static uint32_t next_u32() {
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(rng_state >> 33);
}
static float next_f() { return (float)(next_u32() % 2001u) / 1000.0f - 1.0f; }

static void run_case(uint T, uint m, uint E, uint cap, uint C) {
    uint n = T * m;
    // indices (T, m), distinct per token, skewed to low experts.
    std::vector<uint> idx(n);
    for (uint t = 0; t < T; ++t) {
        for (uint s = 0; s < m; ++s) {
            uint x;
            bool dup;
            do {
                uint u = next_u32() % 1000u;
                x = (uint)((u * u / 1000u) * E / 1000u);
                dup = false;
                for (uint j = 0; j < s; ++j) dup |= idx[t * m + j] == x;
            } while (dup);
            idx[t * m + s] = x;
        }
    }
    // Reference order: slot-major, tokens in order, first `cap` arrivals kept per expert.
    std::vector<std::vector<uint>> slots(E);
    for (uint s = 0; s < m; ++s)
        for (uint t = 0; t < T; ++t) {
            uint ex = idx[t * m + s];
            if (cap == 0 || slots[ex].size() < cap) slots[ex].push_back(t * m + s);
        }
    std::vector<uint> want(E + 1 + 2 * n, MD_NONE);
    uint row = 0;
    want[0] = 0;
    for (uint ex = 0; ex < E; ++ex) {
        for (uint f : slots[ex]) {
            want[E + 1 + row] = f;
            want[E + 1 + n + f] = row;
            ++row;
        }
        want[ex + 1] = row;
    }
    uint N = row;

    // The five sort kernels in launch order.
    DispatchKernelArgs p = {};
    p.t = T; p.m = m; p.e = E; p.cap = cap; p.w_stride = m;
    p.chunk = 7; // small chunks: many chunk boundaries
    p.n_chunks = (n + p.chunk - 1) / p.chunk;
    std::vector<uint> hist((p.n_chunks + 1) * E, 0), order(E + 1 + 2 * n, 0xdeadbeefu);
    uint grid = p.n_chunks * E, n_slots = n;
    for (uint g = 0; g < grid; ++g) expert_sort_count_u32(idx.data(), hist.data(), p, grid, g);
    for (uint e = 0; e < E; ++e) expert_sort_scan_u32(hist.data(), p, p.e, e);
    uint one = 1;
    expert_sort_offsets_u32(hist.data(), order.data(), p, one, 0);
    for (uint g = 0; g < grid; ++g) expert_sort_rank_u32(idx.data(), hist.data(), order.data(), p, grid, g);
    for (uint f = 0; f < n; ++f) expert_sort_pad_u32(idx.data(), order.data(), p, n_slots, f);
    uint bad = 0;
    for (uint i = 0; i < order.size(); ++i) bad += order[i] != want[i];
    CHECK(bad == 0, "T=%u m=%u E=%u cap=%u: %u order entries differ from the plan", T, m, E, cap, bad);

    // Float ops on the reference order.
    p.n = N; p.c = C; p.a_stride = C; p.b_stride = C;
    std::vector<float> x(T * C), w(n), out(N * C), dy(T * C), dxs(N * C);
    for (auto& v : x) v = next_f();
    for (auto& v : w) v = next_f();
    for (auto& v : out) v = next_f();
    for (auto& v : dy) v = next_f();
    for (auto& v : dxs) v = next_f();
    const uint* rs = &want[E + 1];
    const uint* sr = &want[E + 1 + n];
    uint nc = N * C, tc = T * C, lanes = n * MD_LANES;
    std::vector<float> xs(N * C), dx(T * C), y(T * C), dout(N * C), part(n * MD_LANES), dw(n);
    for (uint i = 0; i < N * C; ++i) gather_rows_f32(x.data(), want.data(), xs.data(), p, nc, i);
    for (uint i = 0; i < T * C; ++i) gather_rows_bwd_f32(dxs.data(), want.data(), dx.data(), p, tc, i);
    for (uint i = 0; i < T * C; ++i) combine_f32(out.data(), w.data(), want.data(), y.data(), p, tc, i);
    for (uint i = 0; i < N * C; ++i) combine_bwd_out_f32(dy.data(), w.data(), want.data(), dout.data(), p, nc, i);
    for (uint i = 0; i < n * MD_LANES; ++i)
        combine_bwd_w_part_f32(out.data(), dy.data(), want.data(), part.data(), p, lanes, i);
    for (uint f = 0; f < n; ++f) combine_bwd_w_f32(part.data(), dw.data(), p, n_slots, f);
    double err = 0.0;
    for (uint r = 0; r < N; ++r)
        for (uint c = 0; c < C; ++c) {
            uint f = rs[r], t = f / m;
            err = std::fmax(err, std::fabs(xs[r * C + c] - x[t * C + c]));
            err = std::fmax(err, std::fabs(dout[r * C + c] - w[f] * dy[t * C + c]));
        }
    for (uint t = 0; t < T; ++t)
        for (uint c = 0; c < C; ++c) {
            double a = 0.0, b = 0.0;
            for (uint s = 0; s < m; ++s) {
                uint r = sr[t * m + s];
                if (r == MD_NONE) continue;
                a += dxs[r * C + c];
                b += (double)w[t * m + s] * out[r * C + c];
            }
            err = std::fmax(err, std::fabs(dx[t * C + c] - a));
            err = std::fmax(err, std::fabs(y[t * C + c] - b));
        }
    for (uint f = 0; f < n; ++f) {
        uint r = sr[f], t = f / m;
        double d = 0.0;
        if (r != MD_NONE)
            for (uint c = 0; c < C; ++c) d += (double)out[r * C + c] * dy[t * C + c];
        err = std::fmax(err, std::fabs(dw[f] - d) / (1.0 + std::sqrt((double)C)));
    }
    CHECK(err < 1e-5, "T=%u m=%u E=%u cap=%u C=%u: float ops max error %g", T, m, E, cap, C, err);
}

int main() {
    run_case(1, 1, 8, 0, 16);
    run_case(1, 2, 8, 1, 3);
    run_case(100, 2, 37, 0, 33);
    run_case(100, 2, 37, 6, 33);
    run_case(500, 1, 256, 3, 8);
    run_case(300, 2, 256, 0, 40);
    run_case(64, 2, 5, 20, 64);
    std::printf("host_check_dispatch: %s (%d failures)\n", failures ? "FAIL" : "ok", failures);
    return failures ? 1 : 0;
}
