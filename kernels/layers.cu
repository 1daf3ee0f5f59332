// CUDA entry points of the fused layer ops (GELU, LayerNorm/RMSNorm, causal softmax); the bodies are
// in layers.cuh. Compiled to PTX by build.rs (feature `cuda`), loaded by src/ops/{gelu,layer_norm,
// causal_softmax}.rs. Every entry point takes one thread per element, row or column on a 1-D grid.
#include <stdint.h>

typedef uint32_t ly_u32;
typedef uint64_t ly_size;
#define LY_FN __device__ __forceinline__
#define LY_GLOBAL
#define LY_EXPF(x) expf(x)
#define LY_SQRTF(x) __fsqrt_rn(x)

#include "layers.cuh"

#define LY_TID ((ly_size)blockIdx.x * blockDim.x + threadIdx.x)

extern "C" __global__ void gelu_f32(const float* x, float* y, GeluKernelArgs p) {
    ly_size i = LY_TID;
    if (i < p.n) {
        ly_gelu(x, y, (ly_u32)i);
    }
}

extern "C" __global__ void gelu_bwd_f32(const float* x, const float* dy, float* dx, GeluKernelArgs p) {
    ly_size i = LY_TID;
    if (i < p.n) {
        ly_gelu_bwd(x, dy, dx, (ly_u32)i);
    }
}

extern "C" __global__ void norm_f32(const float* x, const float* g, const float* b, float* y, NormKernelArgs p) {
    ly_size r = LY_TID;
    if (r < p.rows) {
        ly_norm_row(x, g, b, y, p, (ly_u32)r);
    }
}

// out (R + 2, C): dx in rows 0..R, dgamma in row R, dbeta in row R + 1.
extern "C" __global__ void norm_bwd_rows_f32(const float* x, const float* g, const float* dy, float* out, float* stats,
                                             NormKernelArgs p) {
    ly_size r = LY_TID;
    if (r < p.rows) {
        ly_norm_bwd_row(x, g, dy, out, stats, p, (ly_u32)r);
    }
}

extern "C" __global__ void norm_bwd_params_f32(const float* x, const float* dy, const float* stats, float* out,
                                               NormKernelArgs p) {
    ly_size j = LY_TID;
    if (j < p.c) {
        float* dgamma = out + (ly_size)p.rows * p.c;
        ly_norm_params(x, dy, stats, dgamma, dgamma + p.c, p, (ly_u32)j);
    }
}

extern "C" __global__ void causal_softmax_f32(const float* s, float* y, CausalSoftmaxKernelArgs p) {
    ly_size r = LY_TID;
    if (r < p.rows) {
        ly_causal_softmax_row(s, y, p, (ly_u32)r);
    }
}

extern "C" __global__ void causal_softmax_bwd_f32(const float* y, const float* dy, float* ds, CausalSoftmaxKernelArgs p) {
    ly_size r = LY_TID;
    if (r < p.rows) {
        ly_causal_softmax_bwd_row(y, dy, ds, p, (ly_u32)r);
    }
}
