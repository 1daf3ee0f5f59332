// CUDA entry points of the balance-statistics ops; the per-thread logic is in balance_stats.cuh.
// Compiled to PTX by build.rs (feature `cuda`), loaded by src/ops/balance_stats/cuda.rs.
#include <stdint.h>

typedef uint32_t bs_u32;
typedef unsigned long long bs_size;
#define BS_FN __device__ __forceinline__
#define BS_GLOBAL
#define BS_EXPF(x) expf(x)
// Round-to-nearest division even under --use_fast_math.
#define BS_DIV(a, b) __fdiv_rn((a), (b))
#define BS_NAN __int_as_float(0x7fffffff)

#include "balance_stats.cuh"

__device__ __forceinline__ bs_u32 bs_gid() {
    return blockIdx.x * blockDim.x + threadIdx.x;
}

// One thread per row: stats (T, 2).
extern "C" __global__ void balance_stats_rows_f32(const float* logits, float* stats, BalanceKernelArgs p) {
    bs_u32 t = bs_gid();
    if (t >= p.rows) {
        return;
    }
    bs_row_stats(logits + (bs_size)t * p.logits_stride, stats + (bs_size)t * 2u, p);
}

// One thread per (chunk, expert), expert fastest: part_p (C, E), part_n (C, E + 1).
extern "C" __global__ void balance_stats_partial_f32(const float* logits, const float* stats, const bs_u32* idx,
                                                     float* part_p, bs_u32* part_n, BalanceKernelArgs p) {
    bs_u32 i = bs_gid();
    if (i >= p.n_chunks * p.e) {
        return;
    }
    bs_partial_cell(logits, stats, idx, part_p, part_n, p, i / p.e, i % p.e);
}

// One thread per expert: out (2, E).
extern "C" __global__ void balance_stats_finish_f32(const float* part_p, const bs_u32* part_n, float* out,
                                                    BalanceKernelArgs p) {
    bs_u32 j = bs_gid();
    if (j >= p.e) {
        return;
    }
    bs_finish_col(part_p, part_n, out, p, j);
}

// One thread per row: dlogits (T, E) from logits (T, E) and g = dL/dP (E).
extern "C" __global__ void balance_stats_bwd_f32(const float* logits, const float* g, float* dl, BalanceKernelArgs p) {
    bs_u32 t = bs_gid();
    if (t >= p.rows) {
        return;
    }
    bs_bwd_row(logits + (bs_size)t * p.logits_stride, g, dl + (bs_size)t * p.e, p);
}
