// Metal entry points of the MoE dispatch / combine ops; the per-thread logic is in moe_dispatch.cuh.
// src/ops/dispatch_common.rs compiles this at run time (newLibraryWithSource cannot follow #include):
// it replaces the `#include "moe_dispatch.cuh"` line below with the header's text.
// scripts/check_kernels.sh compiles it as C++ with g++ against kernels/metal_shim.h, and
// kernels/host_check_dispatch.cpp runs it on the host. Buffers in the order of the CUDA entry points,
// then the params, then `total` (threads past it return).
#ifdef __METAL_VERSION__
#include <metal_stdlib>
using namespace metal;
#else
#include "metal_shim.h"
#endif

typedef uint md_u32;
#define MD_FN inline
#define MD_GLOBAL device

#include "moe_dispatch.cuh"

#define MD_TID            \
    if (tid >= total) {   \
        return;           \
    }                     \
    DispatchKernelArgs p = params;

kernel void expert_sort_count_u32(const device md_u32* idx [[buffer(0)]], device md_u32* hist [[buffer(1)]],
                                  constant DispatchKernelArgs& params [[buffer(2)]], constant md_u32& total [[buffer(3)]],
                                  uint tid [[thread_position_in_grid]]) {
    MD_TID
    md_sort_count(idx, hist, p, tid);
}

kernel void expert_sort_scan_u32(device md_u32* hist [[buffer(0)]], constant DispatchKernelArgs& params [[buffer(1)]],
                                 constant md_u32& total [[buffer(2)]], uint tid [[thread_position_in_grid]]) {
    MD_TID
    md_sort_scan(hist, p, tid);
}

kernel void expert_sort_offsets_u32(const device md_u32* hist [[buffer(0)]], device md_u32* order [[buffer(1)]],
                                    constant DispatchKernelArgs& params [[buffer(2)]], constant md_u32& total [[buffer(3)]],
                                    uint tid [[thread_position_in_grid]]) {
    MD_TID
    md_sort_offsets(hist, order, p);
}

kernel void expert_sort_rank_u32(const device md_u32* idx [[buffer(0)]], const device md_u32* hist [[buffer(1)]],
                                 device md_u32* order [[buffer(2)]], constant DispatchKernelArgs& params [[buffer(3)]],
                                 constant md_u32& total [[buffer(4)]], uint tid [[thread_position_in_grid]]) {
    MD_TID
    md_sort_rank(idx, hist, order, p, tid);
}

kernel void expert_sort_pad_u32(const device md_u32* idx [[buffer(0)]], device md_u32* order [[buffer(1)]],
                                constant DispatchKernelArgs& params [[buffer(2)]], constant md_u32& total [[buffer(3)]],
                                uint tid [[thread_position_in_grid]]) {
    MD_TID
    md_sort_pad(idx, order, p, tid);
}

kernel void gather_rows_f32(const device float* x [[buffer(0)]], const device md_u32* order [[buffer(1)]],
                            device float* xs [[buffer(2)]], constant DispatchKernelArgs& params [[buffer(3)]],
                            constant md_u32& total [[buffer(4)]], uint tid [[thread_position_in_grid]]) {
    MD_TID
    md_gather(x, order, xs, p, tid);
}

kernel void gather_rows_bwd_f32(const device float* dxs [[buffer(0)]], const device md_u32* order [[buffer(1)]],
                                device float* dx [[buffer(2)]], constant DispatchKernelArgs& params [[buffer(3)]],
                                constant md_u32& total [[buffer(4)]], uint tid [[thread_position_in_grid]]) {
    MD_TID
    md_gather_bwd(dxs, order, dx, p, tid);
}

kernel void combine_f32(const device float* out [[buffer(0)]], const device float* w [[buffer(1)]],
                        const device md_u32* order [[buffer(2)]], device float* y [[buffer(3)]],
                        constant DispatchKernelArgs& params [[buffer(4)]], constant md_u32& total [[buffer(5)]],
                        uint tid [[thread_position_in_grid]]) {
    MD_TID
    md_combine(out, w, order, y, p, tid);
}

kernel void combine_bwd_out_f32(const device float* dy [[buffer(0)]], const device float* w [[buffer(1)]],
                                const device md_u32* order [[buffer(2)]], device float* dout [[buffer(3)]],
                                constant DispatchKernelArgs& params [[buffer(4)]], constant md_u32& total [[buffer(5)]],
                                uint tid [[thread_position_in_grid]]) {
    MD_TID
    md_combine_bwd_out(dy, w, order, dout, p, tid);
}

kernel void combine_bwd_w_part_f32(const device float* out [[buffer(0)]], const device float* dy [[buffer(1)]],
                                   const device md_u32* order [[buffer(2)]], device float* part [[buffer(3)]],
                                   constant DispatchKernelArgs& params [[buffer(4)]], constant md_u32& total [[buffer(5)]],
                                   uint tid [[thread_position_in_grid]]) {
    MD_TID
    md_combine_bwd_w_part(out, dy, order, part, p, tid);
}

kernel void combine_bwd_w_f32(const device float* part [[buffer(0)]], device float* dw [[buffer(1)]],
                              constant DispatchKernelArgs& params [[buffer(2)]], constant md_u32& total [[buffer(3)]],
                              uint tid [[thread_position_in_grid]]) {
    MD_TID
    md_combine_bwd_w(part, dw, p, tid);
}
