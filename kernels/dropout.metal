// Metal entry point of the Philox dropout op; the body is in dropout.cuh.
// src/ops/dropout.rs compiles this at run time: it prepends `#define GM_INLINED` and replaces the
// `#include "dropout.cuh"` line below with philox.h and dropout.cuh. scripts/check_kernels.sh
// compiles it as C++ with g++ against kernels/metal_shim.h.
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
#define GM_LOGF(x) precise::log(x)

#include "dropout.cuh"

kernel void philox_dropout_f32(const device float* x [[buffer(0)]], device float* y [[buffer(1)]],
                               constant DropoutKernelArgs& params [[buffer(2)]], uint g [[thread_position_in_grid]]) {
    DropoutKernelArgs p = params;
    if ((ulong)g * 4u >= (ulong)p.n) {
        return;
    }
    gm_dropout_group(x, y, p, g);
}
