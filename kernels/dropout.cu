// CUDA entry point of the Philox dropout op; the body is in dropout.cuh.
// Compiled to PTX by build.rs (feature `cuda`), loaded by src/ops/dropout.rs.
#include <stdint.h>

typedef uint32_t gm_u32;
#define GM_FN __device__ __forceinline__
#define GM_GLOBAL
#define GM_MULHI(a, b) __umulhi((a), (b))
#define GM_LOGF(x) logf(x)

#include "dropout.cuh"

extern "C" __global__ void philox_dropout_f32(const float* x, float* y, DropoutKernelArgs p) {
    gm_u32 g = blockIdx.x * blockDim.x + threadIdx.x;
    if ((size_t)g * 4u >= (size_t)p.n) {
        return;
    }
    gm_dropout_group(x, y, p, g);
}
