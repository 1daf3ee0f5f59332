// Metal entry points of the fused layer ops (GELU, LayerNorm/RMSNorm, causal softmax); the bodies are
// in layers.cuh. The Rust glue compiles this at run time, replacing the `#include "layers.cuh"`
// line with the header's text. scripts/check_kernels.sh compiles it as C++ with g++ against
// kernels/metal_shim.h and runs it on the host (kernels/host_check_layers.cpp).
#ifdef __METAL_VERSION__
#include <metal_stdlib>
using namespace metal;
#else
#include "metal_shim.h"
#endif

typedef uint ly_u32;
typedef ulong ly_size;
#define LY_FN inline
#define LY_GLOBAL device
// precise:: so the numbers do not depend on the fast-math setting.
#define LY_EXPF(x) precise::exp(x)
#define LY_SQRTF(x) precise::sqrt(x)

#include "layers.cuh"

kernel void gelu_f32(const device float* x [[buffer(0)]], device float* y [[buffer(1)]],
                     constant GeluKernelArgs& params [[buffer(2)]], uint i [[thread_position_in_grid]]) {
    if (i < params.n) {
        ly_gelu(x, y, i);
    }
}

kernel void gelu_bwd_f32(const device float* x [[buffer(0)]], const device float* dy [[buffer(1)]],
                         device float* dx [[buffer(2)]], constant GeluKernelArgs& params [[buffer(3)]],
                         uint i [[thread_position_in_grid]]) {
    if (i < params.n) {
        ly_gelu_bwd(x, dy, dx, i);
    }
}

kernel void norm_f32(const device float* x [[buffer(0)]], const device float* g [[buffer(1)]],
                     const device float* b [[buffer(2)]], device float* y [[buffer(3)]],
                     constant NormKernelArgs& params [[buffer(4)]], uint r [[thread_position_in_grid]]) {
    NormKernelArgs p = params;
    if (r < p.rows) {
        ly_norm_row(x, g, b, y, p, r);
    }
}

// out (R + 2, C): dx in rows 0..R, dgamma in row R, dbeta in row R + 1.
kernel void norm_bwd_rows_f32(const device float* x [[buffer(0)]], const device float* g [[buffer(1)]],
                              const device float* dy [[buffer(2)]], device float* out [[buffer(3)]],
                              device float* stats [[buffer(4)]], constant NormKernelArgs& params [[buffer(5)]],
                              uint r [[thread_position_in_grid]]) {
    NormKernelArgs p = params;
    if (r < p.rows) {
        ly_norm_bwd_row(x, g, dy, out, stats, p, r);
    }
}

kernel void norm_bwd_params_f32(const device float* x [[buffer(0)]], const device float* dy [[buffer(1)]],
                                const device float* stats [[buffer(2)]], device float* out [[buffer(3)]],
                                constant NormKernelArgs& params [[buffer(4)]], uint j [[thread_position_in_grid]]) {
    NormKernelArgs p = params;
    if (j < p.c) {
        device float* dgamma = out + (ly_size)p.rows * p.c;
        ly_norm_params(x, dy, stats, dgamma, dgamma + p.c, p, j);
    }
}

kernel void causal_softmax_f32(const device float* s [[buffer(0)]], device float* y [[buffer(1)]],
                               constant CausalSoftmaxKernelArgs& params [[buffer(2)]], uint r [[thread_position_in_grid]]) {
    CausalSoftmaxKernelArgs p = params;
    if (r < p.rows) {
        ly_causal_softmax_row(s, y, p, r);
    }
}

kernel void causal_softmax_bwd_f32(const device float* y [[buffer(0)]], const device float* dy [[buffer(1)]],
                                   device float* ds [[buffer(2)]], constant CausalSoftmaxKernelArgs& params [[buffer(3)]],
                                   uint r [[thread_position_in_grid]]) {
    CausalSoftmaxKernelArgs p = params;
    if (r < p.rows) {
        ly_causal_softmax_bwd_row(y, dy, ds, p, r);
    }
}
