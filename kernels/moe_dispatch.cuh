// MoE dispatch / combine kernels: the per-thread bodies, written once and included by both
// moe_dispatch.cu (CUDA) and moe_dispatch.metal (Metal). The CPU twins are in src/ops/expert_sort.rs,
// gather_rows.rs and combine/. No float atomics anywhere: every output element is written by
// exactly one thread, and every sum runs in a fixed order, so results do not depend on scheduling.
//
// The including file defines MD_FN and MD_GLOBAL (address space of device buffers) and md_u32.
//
// The expert order ("order", one u32 buffer, produced by expert_sort) for T tokens, m slots, E experts:
//   [0, E]                 offsets: rows of expert e are offsets[e] .. offsets[e + 1]; N = offsets[E]
//   [E + 1, E + 1 + T m)   row_slot: for each sorted row r < N, its flat slot t * m + s (MD_NONE after N)
//   [E + 1 + T m, + T m)   slot_row: for each flat slot t * m + s, its row, or MD_NONE when dropped
// Rows are slot-major (all first choices, then all second choices), tokens in order within a slot,
// and an expert keeps only its first `cap` arrivals (cap 0: no limit): moe::dispatch::plan's order.
//
// Ops (entry points `<op>_<dtype>` in both languages):
//   expert_sort_{count,scan,offsets,rank,pad}_u32: indices (T, m) u32 -> order (a counting sort:
//       per-chunk histograms, a fixed-order scan per expert, then per-chunk stable ranks)
//   gather_rows_f32:       x (T, C), order -> xs (N, C):  xs[r] = x[row_slot[r] / m]
//   gather_rows_bwd_f32:   dxs (N, C), order -> dx (T, C): dx[t] = sum_s dxs[slot_row[t, s]]
//   combine_f32:           out (N, C), w (T, m), order -> y (T, C): y[t] = sum_s w[t, s] out[slot_row[t, s]]
//   combine_bwd_out_f32:   dy (T, C), w (T, m), order -> dout (N, C): dout[r] = w[f] dy[f / m], f = row_slot[r]
//   combine_bwd_w_part_f32 / combine_bwd_w_f32: out (N, C), dy (T, C), order -> dw (T, m):
//       dw[t, s] = <out[slot_row[t, s]], dy[t]>, as MD_LANES strided partial sums reduced in lane order.
#pragma once

// Marks a dropped slot (slot_row) or an unused row (row_slot past N).
#define MD_NONE 0xffffffffu
// Partial sums per slot in combine_bwd_w (the CPU twin uses the same split: same rounding steps).
#define MD_LANES 32u

// Scalar arguments of every entry point; #[repr(C)] twin: `DispatchKernelArgs` in src/ops/dispatch_common.rs.
struct DispatchKernelArgs {
    md_u32 t;        // tokens T
    md_u32 m;        // slots per token
    md_u32 e;        // experts E
    md_u32 n;        // kept rows N = offsets[E] (known on the host before the float ops run)
    md_u32 c;        // row width C
    md_u32 cap;      // expert capacity, 0 = unlimited
    md_u32 chunk;    // expert_sort: slot-major elements per chunk
    md_u32 n_chunks; // expert_sort: ceil(T m / chunk)
    md_u32 a_stride; // row stride of the first float input (elements)
    md_u32 b_stride; // row stride of the second float input
    md_u32 w_stride; // row stride of the weights / of the indices (expert_sort)
    md_u32 pad;
};

// Pointers into the order buffer.
#define MD_ROW_SLOT(order, p) ((order) + (p).e + 1u)
#define MD_SLOT_ROW(order, p) ((order) + (p).e + 1u + (p).t * (p).m)

// The expert of slot-major element i = s * T + t (indices are (T, m) with row stride w_stride).
MD_FN md_u32 md_key(const MD_GLOBAL md_u32* idx, DispatchKernelArgs p, md_u32 i) {
    return idx[(i % p.t) * p.w_stride + i / p.t];
}

// ---- expert_sort -------------------------------------------------------------------------------

// Thread g = chunk * E + e: hist[g] = how many elements of the chunk go to expert e. Threads of one
// chunk read the same index at each step (a broadcast), so the loads are shared.
MD_FN void md_sort_count(const MD_GLOBAL md_u32* idx, MD_GLOBAL md_u32* hist, DispatchKernelArgs p, md_u32 g) {
    md_u32 ch = g / p.e, ex = g % p.e;
    md_u32 lo = ch * p.chunk, hi = lo + p.chunk;
    hi = hi < p.t * p.m ? hi : p.t * p.m;
    md_u32 cnt = 0u;
    for (md_u32 i = lo; i < hi; ++i) {
        cnt += md_key(idx, p, i) == ex ? 1u : 0u;
    }
    hist[g] = cnt;
}

// Thread e: hist[., e] becomes the exclusive prefix over chunks (in chunk order), and
// hist[n_chunks * E + e] the expert's total demand.
MD_FN void md_sort_scan(MD_GLOBAL md_u32* hist, DispatchKernelArgs p, md_u32 ex) {
    md_u32 run = 0u;
    for (md_u32 ch = 0u; ch < p.n_chunks; ++ch) {
        md_u32 v = hist[ch * p.e + ex];
        hist[ch * p.e + ex] = run;
        run += v;
    }
    hist[p.n_chunks * p.e + ex] = run;
}

// One thread: offsets[e + 1] = offsets[e] + min(demand, cap).
MD_FN void md_sort_offsets(const MD_GLOBAL md_u32* hist, MD_GLOBAL md_u32* order, DispatchKernelArgs p) {
    md_u32 acc = 0u;
    order[0] = 0u;
    for (md_u32 ex = 0u; ex < p.e; ++ex) {
        md_u32 d = hist[p.n_chunks * p.e + ex];
        acc += (p.cap != 0u && d > p.cap) ? p.cap : d;
        order[ex + 1u] = acc;
    }
}

// Thread g = chunk * E + e: walks its chunk in order and places each element of expert e at its
// arrival rank (the chunk's prefix plus the count so far): stable, and each element has one writer.
MD_FN void md_sort_rank(const MD_GLOBAL md_u32* idx, const MD_GLOBAL md_u32* hist, MD_GLOBAL md_u32* order,
                        DispatchKernelArgs p, md_u32 g) {
    md_u32 ch = g / p.e, ex = g % p.e;
    md_u32 lo = ch * p.chunk, hi = lo + p.chunk;
    hi = hi < p.t * p.m ? hi : p.t * p.m;
    md_u32 rank = hist[g];
    md_u32 base = order[ex];
    MD_GLOBAL md_u32* row_slot = MD_ROW_SLOT(order, p);
    MD_GLOBAL md_u32* slot_row = MD_SLOT_ROW(order, p);
    for (md_u32 i = lo; i < hi; ++i) {
        if (md_key(idx, p, i) != ex) {
            continue;
        }
        md_u32 f = (i % p.t) * p.m + i / p.t; // flat slot t * m + s
        if (p.cap == 0u || rank < p.cap) {
            row_slot[base + rank] = f;
            slot_row[f] = base + rank;
        } else {
            slot_row[f] = MD_NONE;
        }
        rank += 1u;
    }
}

// Thread f (flat slot): rows past N are unused; a slot whose expert is out of range is dropped
// (the rank pass never visits it). Disjoint from what md_sort_rank writes.
MD_FN void md_sort_pad(const MD_GLOBAL md_u32* idx, MD_GLOBAL md_u32* order, DispatchKernelArgs p, md_u32 f) {
    md_u32 n = order[p.e];
    if (f >= n) {
        MD_ROW_SLOT(order, p)[f] = MD_NONE;
    }
    if (idx[(f / p.m) * p.w_stride + f % p.m] >= p.e) {
        MD_SLOT_ROW(order, p)[f] = MD_NONE;
    }
}

// ---- gather_rows -------------------------------------------------------------------------------

// Element i = r * C + c of xs (N, C). An out-of-range slot gives 0, never a stray read.
MD_FN void md_gather(const MD_GLOBAL float* x, const MD_GLOBAL md_u32* order, MD_GLOBAL float* xs, DispatchKernelArgs p,
                     md_u32 i) {
    md_u32 r = i / p.c, col = i % p.c;
    md_u32 f = MD_ROW_SLOT(order, p)[r];
    md_u32 tok = f / p.m;
    xs[i] = (f != MD_NONE && tok < p.t) ? x[tok * p.a_stride + col] : 0.0f;
}

// Element i = t * C + c of dx (T, C): the token's rows summed in slot order.
MD_FN void md_gather_bwd(const MD_GLOBAL float* dxs, const MD_GLOBAL md_u32* order, MD_GLOBAL float* dx, DispatchKernelArgs p,
                         md_u32 i) {
    md_u32 tok = i / p.c, col = i % p.c;
    const MD_GLOBAL md_u32* sr = MD_SLOT_ROW(order, p) + tok * p.m;
    float acc = 0.0f;
    for (md_u32 s = 0u; s < p.m; ++s) {
        md_u32 r = sr[s];
        if (r < p.n) {
            acc += dxs[r * p.a_stride + col];
        }
    }
    dx[i] = acc;
}

// ---- combine -----------------------------------------------------------------------------------

// Element i = t * C + c of y (T, C): sum_s w[t, s] out[row, c] in slot order; dropped slots add 0.
MD_FN void md_combine(const MD_GLOBAL float* out, const MD_GLOBAL float* w, const MD_GLOBAL md_u32* order,
                      MD_GLOBAL float* y, DispatchKernelArgs p, md_u32 i) {
    md_u32 tok = i / p.c, col = i % p.c;
    const MD_GLOBAL md_u32* sr = MD_SLOT_ROW(order, p) + tok * p.m;
    float acc = 0.0f;
    for (md_u32 s = 0u; s < p.m; ++s) {
        md_u32 r = sr[s];
        if (r < p.n) {
            acc += w[tok * p.w_stride + s] * out[r * p.a_stride + col];
        }
    }
    y[i] = acc;
}

// Element i = r * C + c of dout (N, C): each row belongs to exactly one slot f.
MD_FN void md_combine_bwd_out(const MD_GLOBAL float* dy, const MD_GLOBAL float* w, const MD_GLOBAL md_u32* order,
                              MD_GLOBAL float* dout, DispatchKernelArgs p, md_u32 i) {
    md_u32 r = i / p.c, col = i % p.c;
    md_u32 f = MD_ROW_SLOT(order, p)[r];
    md_u32 tok = f / p.m, s = f % p.m;
    dout[i] = (f != MD_NONE && tok < p.t) ? w[tok * p.w_stride + s] * dy[tok * p.b_stride + col] : 0.0f;
}

// Thread g = f * MD_LANES + lane: part[g] = sum over c = lane, lane + MD_LANES, ... of out[row, c] dy[t, c]
// (consecutive lanes read consecutive columns).
MD_FN void md_combine_bwd_w_part(const MD_GLOBAL float* out, const MD_GLOBAL float* dy, const MD_GLOBAL md_u32* order,
                                 MD_GLOBAL float* part, DispatchKernelArgs p, md_u32 g) {
    md_u32 f = g / MD_LANES, lane = g % MD_LANES;
    md_u32 tok = f / p.m;
    md_u32 r = MD_SLOT_ROW(order, p)[f];
    float acc = 0.0f;
    if (r < p.n) {
        for (md_u32 col = lane; col < p.c; col += MD_LANES) {
            acc += out[r * p.a_stride + col] * dy[tok * p.b_stride + col];
        }
    }
    part[g] = acc;
}

// Thread f: dw[t, s] = the MD_LANES partial sums added in lane order.
MD_FN void md_combine_bwd_w(const MD_GLOBAL float* part, MD_GLOBAL float* dw, DispatchKernelArgs p, md_u32 f) {
    (void)p; // one signature for every body
    float acc = 0.0f;
    for (md_u32 lane = 0u; lane < MD_LANES; ++lane) {
        acc += part[f * MD_LANES + lane];
    }
    dw[f] = acc;
}
