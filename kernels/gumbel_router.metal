// Metal entry points of the Gumbel router ops; the row logic is in gumbel_router.cuh.
// src/ops/gumbel_router/metal.rs compiles this at run time (newLibraryWithSource cannot follow #include):
// it prepends `#define GM_INLINED` and replaces the `#include "gumbel_router.cuh"` line below with
// philox.h and gumbel_router.cuh. scripts/check_kernels.sh compiles it as C++ with g++ against
// kernels/metal_shim.h.
#ifdef __METAL_VERSION__
#include <metal_stdlib>
using namespace metal;
#else
#include "metal_shim.h"
#endif

typedef uint gm_u32;
#define GM_FN inline
#define GM_GLOBAL device
#define GM_MULHI(a, b) mulhi((a), (b))
// precise:: so the noise and the softmax do not depend on the fast-math setting.
#define GM_LOGF(x) precise::log(x)
#define GM_EXPF(x) precise::exp(x)
#define GM_NAN as_type<float>(0x7fc00000u)
#define GM_F2U(x) as_type<uint>(x)
#define GM_U2F(x) as_type<float>(x)
#define GM_INF as_type<float>(0x7f800000u)
#ifdef __METAL_VERSION__
#define GM_UNROLL _Pragma("unroll")
#else
#define GM_UNROLL
#endif

#include "gumbel_router.cuh"

kernel void gumbel_select_f32(const device float* logits [[buffer(0)]], device gm_u32* out [[buffer(1)]],
                              constant GumbelKernelArgs& params [[buffer(2)]], uint row [[thread_position_in_grid]]) {
    GumbelKernelArgs p = params;
    if (row >= p.rows) {
        return;
    }
    gm_select_row(logits + (ulong)row * p.logits_stride, out + (ulong)row * p.y_stride, p, row);
}

kernel void gumbel_weights_f32(const device float* logits [[buffer(0)]], const device gm_u32* cand [[buffer(1)]],
                               device float* y [[buffer(2)]], constant GumbelKernelArgs& params [[buffer(3)]],
                               uint row [[thread_position_in_grid]]) {
    GumbelKernelArgs p = params;
    if (row >= p.rows) {
        return;
    }
    gm_weights_row(logits + (ulong)row * p.logits_stride, cand + (ulong)row * p.idx_stride,
                   y + (ulong)row * p.y_stride, p, row);
}

kernel void gumbel_weights_bwd_f32(const device float* y [[buffer(0)]], const device float* dy [[buffer(1)]],
                                   const device gm_u32* cand [[buffer(2)]], device float* dl [[buffer(3)]],
                                   constant GumbelKernelArgs& params [[buffer(4)]], uint gid [[thread_position_in_grid]]) {
    // One thread per element of dlogits (T, E): gid = row * E + col.
    GumbelKernelArgs p = params;
    if (gid >= p.rows * p.e) {
        return;
    }
    uint row = gid / p.e, col = gid - row * p.e;
    dl[(ulong)row * p.logits_stride + col] = gm_weights_bwd_elem(y + (ulong)row * p.y_stride, dy + (ulong)row * p.dy_stride,
                                                                 cand + (ulong)row * p.idx_stride, p, col);
}
