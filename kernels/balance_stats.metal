// Metal entry points of the balance-statistics ops; the per-thread logic is in balance_stats.cuh.
// src/ops/balance_stats/metal.rs compiles this at run time (newLibraryWithSource cannot follow
// #include): it replaces the `#include "balance_stats.cuh"` line below with the header's text.
// scripts/check_kernels.sh compiles it as C++ with g++ against kernels/metal_shim.h and runs it on
// the host (kernels/host_check_balance.cpp).
#ifdef __METAL_VERSION__
#include <metal_stdlib>
using namespace metal;
#else
#include "metal_shim.h"
#endif

typedef uint bs_u32;
typedef ulong bs_size;
#define BS_FN inline
#define BS_GLOBAL device
// precise:: so the numbers do not depend on the fast-math setting.
#define BS_EXPF(x) precise::exp(x)
#define BS_DIV(a, b) precise::divide((a), (b))
#define BS_NAN as_type<float>(0x7fc00000u)

#include "balance_stats.cuh"

kernel void balance_stats_rows_f32(const device float* logits [[buffer(0)]], device float* stats [[buffer(1)]],
                                   constant BalanceKernelArgs& params [[buffer(2)]], uint t [[thread_position_in_grid]]) {
    BalanceKernelArgs p = params;
    if (t >= p.rows) {
        return;
    }
    bs_row_stats(logits + (bs_size)t * p.logits_stride, stats + (bs_size)t * 2u, p);
}

kernel void balance_stats_partial_f32(const device float* logits [[buffer(0)]], const device float* stats [[buffer(1)]],
                                      const device bs_u32* idx [[buffer(2)]], device float* part_p [[buffer(3)]],
                                      device bs_u32* part_n [[buffer(4)]], constant BalanceKernelArgs& params [[buffer(5)]],
                                      uint i [[thread_position_in_grid]]) {
    BalanceKernelArgs p = params;
    if (i >= p.n_chunks * p.e) {
        return;
    }
    bs_partial_cell(logits, stats, idx, part_p, part_n, p, i / p.e, i % p.e);
}

kernel void balance_stats_finish_f32(const device float* part_p [[buffer(0)]], const device bs_u32* part_n [[buffer(1)]],
                                     device float* out [[buffer(2)]], constant BalanceKernelArgs& params [[buffer(3)]],
                                     uint j [[thread_position_in_grid]]) {
    BalanceKernelArgs p = params;
    if (j >= p.e) {
        return;
    }
    bs_finish_col(part_p, part_n, out, p, j);
}

kernel void balance_stats_bwd_f32(const device float* logits [[buffer(0)]], const device float* g [[buffer(1)]],
                                  device float* dl [[buffer(2)]], constant BalanceKernelArgs& params [[buffer(3)]],
                                  uint t [[thread_position_in_grid]]) {
    BalanceKernelArgs p = params;
    if (t >= p.rows) {
        return;
    }
    bs_bwd_row(logits + (bs_size)t * p.logits_stride, g, dl + (bs_size)t * p.e, p);
}
