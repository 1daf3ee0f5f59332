// CUDA entry points of the Gumbel router ops; the row logic is in gumbel_router.cuh.
// Compiled to PTX by build.rs (feature `cuda`), loaded by src/ops/gumbel_router/cuda.rs.
#include <stdint.h>

typedef uint32_t gm_u32;
#define GM_FN __device__ __forceinline__
#define GM_GLOBAL
#define GM_MULHI(a, b) __umulhi((a), (b))
#define GM_LOGF(x) logf(x)
#define GM_EXPF(x) expf(x)
#define GM_NAN __int_as_float(0x7fffffff)
#define GM_F2U(x) __float_as_uint(x)
#define GM_U2F(x) __uint_as_float(x)
#define GM_INF __int_as_float(0x7f800000)
#define GM_UNROLL _Pragma("unroll")

#include "gumbel_router.cuh"

extern "C" __global__ void gumbel_select_f32(const float* logits, gm_u32* out, GumbelKernelArgs p) {
    gm_u32 row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= p.rows) {
        return;
    }
    gm_select_row(logits + (size_t)row * p.logits_stride, out + (size_t)row * p.y_stride, p, row);
}

extern "C" __global__ void gumbel_weights_f32(const float* logits, const gm_u32* cand, float* y, GumbelKernelArgs p) {
    gm_u32 row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= p.rows) {
        return;
    }
    gm_weights_row(logits + (size_t)row * p.logits_stride, cand + (size_t)row * p.idx_stride,
                   y + (size_t)row * p.y_stride, p, row);
}

extern "C" __global__ void gumbel_weights_bwd_f32(const float* y, const float* dy, const gm_u32* cand, float* dl,
                                                  GumbelKernelArgs p) {
    // One thread per element of dlogits (T, E): gid = row * E + col.
    gm_u32 gid = blockIdx.x * blockDim.x + threadIdx.x;
    if (gid >= p.rows * p.e) {
        return;
    }
    gm_u32 row = gid / p.e, col = gid - row * p.e;
    dl[(size_t)row * p.logits_stride + col] =
        gm_weights_bwd_elem(y + (size_t)row * p.y_stride, dy + (size_t)row * p.dy_stride,
                            cand + (size_t)row * p.idx_stride, p, col);
}
