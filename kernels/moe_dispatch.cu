// CUDA entry points of the MoE dispatch / combine ops; the per-thread logic is in moe_dispatch.cuh.
// Compiled to PTX by build.rs (feature `cuda`), loaded by src/ops/dispatch_common.rs. Every entry
// point takes one thread per output element (or per chunk x expert for the sort) on a 1-D grid,
// `total` threads in all.
#include <stdint.h>

typedef uint32_t md_u32;
#define MD_FN __device__ __forceinline__
#define MD_GLOBAL

#include "moe_dispatch.cuh"

#define MD_TID(total)                                        \
    md_u32 tid = blockIdx.x * blockDim.x + threadIdx.x;      \
    if (tid >= (total)) {                                    \
        return;                                              \
    }

extern "C" __global__ void expert_sort_count_u32(const md_u32* idx, md_u32* hist, DispatchKernelArgs p, md_u32 total) {
    MD_TID(total)
    md_sort_count(idx, hist, p, tid);
}

extern "C" __global__ void expert_sort_scan_u32(md_u32* hist, DispatchKernelArgs p, md_u32 total) {
    MD_TID(total)
    md_sort_scan(hist, p, tid);
}

extern "C" __global__ void expert_sort_offsets_u32(const md_u32* hist, md_u32* order, DispatchKernelArgs p, md_u32 total) {
    MD_TID(total)
    md_sort_offsets(hist, order, p);
}

extern "C" __global__ void expert_sort_rank_u32(const md_u32* idx, const md_u32* hist, md_u32* order, DispatchKernelArgs p,
                                                md_u32 total) {
    MD_TID(total)
    md_sort_rank(idx, hist, order, p, tid);
}

extern "C" __global__ void expert_sort_pad_u32(const md_u32* idx, md_u32* order, DispatchKernelArgs p, md_u32 total) {
    MD_TID(total)
    md_sort_pad(idx, order, p, tid);
}

extern "C" __global__ void gather_rows_f32(const float* x, const md_u32* order, float* xs, DispatchKernelArgs p, md_u32 total) {
    MD_TID(total)
    md_gather(x, order, xs, p, tid);
}

extern "C" __global__ void gather_rows_bwd_f32(const float* dxs, const md_u32* order, float* dx, DispatchKernelArgs p,
                                               md_u32 total) {
    MD_TID(total)
    md_gather_bwd(dxs, order, dx, p, tid);
}

extern "C" __global__ void combine_f32(const float* out, const float* w, const md_u32* order, float* y, DispatchKernelArgs p,
                                       md_u32 total) {
    MD_TID(total)
    md_combine(out, w, order, y, p, tid);
}

extern "C" __global__ void combine_bwd_out_f32(const float* dy, const float* w, const md_u32* order, float* dout,
                                               DispatchKernelArgs p, md_u32 total) {
    MD_TID(total)
    md_combine_bwd_out(dy, w, order, dout, p, tid);
}

extern "C" __global__ void combine_bwd_w_part_f32(const float* out, const float* dy, const md_u32* order, float* part,
                                                  DispatchKernelArgs p, md_u32 total) {
    MD_TID(total)
    md_combine_bwd_w_part(out, dy, order, part, p, tid);
}

extern "C" __global__ void combine_bwd_w_f32(const float* part, float* dw, DispatchKernelArgs p, md_u32 total) {
    MD_TID(total)
    md_combine_bwd_w(part, dw, p, tid);
}
