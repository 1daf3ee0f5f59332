// The fused layer ops' GPU bodies (f32): exact GELU, LayerNorm/RMSNorm and the causal softmax of
// attention, each way. Written once, included by layers.cu (CUDA) and layers.metal (Metal). The CPU
// kernels and plain-tensor twins are src/ops/{gelu,layer_norm,causal_softmax}.rs.
//
// The including file defines LY_FN, LY_GLOBAL, LY_EXPF, LY_SQRTF (IEEE-rounded, whatever the
// fast-math setting), ly_u32 and ly_size (an unsigned 64-bit index type). Every sum runs in one fixed
// order inside one thread (no atomics, no tree reductions), so results do not depend on scheduling.
//   gelu_f32 / gelu_bwd_f32:  one thread per element.
//   norm_f32:                 one thread per row: y = (x - mean) rstd gamma (+ beta).
//   norm_bwd_rows_f32:        one thread per row: dx, and the row's (mean, rstd) for the next launch.
//   norm_bwd_params_f32:      one thread per column j: dgamma_j, dbeta_j summed over rows in order.
//   causal_softmax_f32:       one thread per score row i: p_j = softmax_j(scale s_j), j <= i; 0 after.
//   causal_softmax_bwd_f32:   one thread per row: ds_j = scale p_j (dp_j - <p, dp>).
#pragma once

// Scalar arguments of the GELU entry points; #[repr(C)] twin: `GeluKernelArgs` (src/ops/gelu.rs).
struct GeluKernelArgs {
    ly_u32 n; // elements
    ly_u32 pad0;
    ly_u32 pad1;
    ly_u32 pad2;
};

// Scalar arguments of the norm entry points; #[repr(C)] twin: `NormKernelArgs` (src/ops/layer_norm.rs).
struct NormKernelArgs {
    ly_u32 rows;     // R = elements / C
    ly_u32 c;        // C, the normalised (last) dimension
    ly_u32 rms;      // 1: RMSNorm (no mean, no beta)
    ly_u32 has_beta; // 1: beta is read (forward) / dbeta is written (backward, else zeros)
    float eps;
    float inv_c; // 1 / C rounded to f32
    ly_u32 pad0;
    ly_u32 pad1;
};

// Scalar arguments of the causal softmax entry points; #[repr(C)] twin: `CausalSoftmaxKernelArgs`
// (src/ops/causal_softmax.rs). Scores are (B, T, T) row-major: row r is query position r % T.
struct CausalSoftmaxKernelArgs {
    ly_u32 rows; // B * T
    ly_u32 t;    // T (keys per row)
    float scale; // applied to the scores before the softmax
    ly_u32 pad0;
};

// (Phi(x), phi(x)) of the standard normal, as the f32 CPU kernel (src/ops/gelu.rs, `Normal for
// f32`): erfc from the Numerical Recipes Chebyshev fit (relative error < 1.2e-7).
struct LyNormal {
    float cdf;
    float pdf;
};

LY_FN LyNormal ly_cdf_pdf(float x) {
    float z = (x < 0.0f ? -x : x) * 0.70710678118654752f;
    float e = LY_EXPF(-0.5f * x * x);
    float t = 1.0f / (1.0f + 0.5f * z);
    float p = -1.2655122f +
              t * (1.0000237f +
                   t * (0.37409196f +
                        t * (0.09678418f +
                             t * (-0.18628806f +
                                  t * (0.27886807f + t * (-1.135204f + t * (1.4885159f + t * (-0.8221522f + t * 0.17087277f))))))));
    float erfc = t * e * LY_EXPF(p);
    LyNormal r;
    r.cdf = x < 0.0f ? 0.5f * erfc : 1.0f - 0.5f * erfc;
    r.pdf = 0.3989423f * e;
    return r;
}

LY_FN void ly_gelu(const LY_GLOBAL float* x, LY_GLOBAL float* y, ly_u32 i) {
    y[i] = x[i] * ly_cdf_pdf(x[i]).cdf;
}

LY_FN void ly_gelu_bwd(const LY_GLOBAL float* x, const LY_GLOBAL float* dy, LY_GLOBAL float* dx, ly_u32 i) {
    LyNormal n = ly_cdf_pdf(x[i]);
    dx[i] = dy[i] * (n.cdf + x[i] * n.pdf);
}

// Mean (0 for RMSNorm) and 1 / sqrt(var + eps) of one row, two passes.
struct LyStats {
    float mean;
    float rstd;
};

LY_FN LyStats ly_norm_stats(const LY_GLOBAL float* xr, NormKernelArgs p) {
    float m = 0.0f;
    if (p.rms == 0u) {
        for (ly_u32 j = 0u; j < p.c; ++j) {
            m += xr[j];
        }
        m *= p.inv_c;
    }
    float v = 0.0f;
    for (ly_u32 j = 0u; j < p.c; ++j) {
        float d = xr[j] - m;
        v += d * d;
    }
    LyStats st;
    st.mean = m;
    st.rstd = 1.0f / LY_SQRTF(v * p.inv_c + p.eps);
    return st;
}

// Row r of y = norm(x) gamma (+ beta).
LY_FN void ly_norm_row(const LY_GLOBAL float* x, const LY_GLOBAL float* g, const LY_GLOBAL float* b, LY_GLOBAL float* y,
                       NormKernelArgs p, ly_u32 r) {
    const LY_GLOBAL float* xr = x + (ly_size)r * p.c;
    LY_GLOBAL float* yr = y + (ly_size)r * p.c;
    LyStats st = ly_norm_stats(xr, p);
    float mean = st.mean, rstd = st.rstd;
    for (ly_u32 j = 0u; j < p.c; ++j) {
        float v = (xr[j] - mean) * rstd * g[j];
        yr[j] = p.has_beta != 0u ? v + b[j] : v;
    }
}

// Row r of dx = rstd (dy g - mean(dy g) - xhat mean(dy g xhat)) (no mean term for RMSNorm); writes
// the row's (mean, rstd) to stats[2r..2r+2] for ly_norm_params.
LY_FN void ly_norm_bwd_row(const LY_GLOBAL float* x, const LY_GLOBAL float* g, const LY_GLOBAL float* dy,
                           LY_GLOBAL float* dx, LY_GLOBAL float* stats, NormKernelArgs p, ly_u32 r) {
    const LY_GLOBAL float* xr = x + (ly_size)r * p.c;
    const LY_GLOBAL float* dyr = dy + (ly_size)r * p.c;
    LY_GLOBAL float* dxr = dx + (ly_size)r * p.c;
    LyStats st = ly_norm_stats(xr, p);
    float mean = st.mean, rstd = st.rstd;
    float s1 = 0.0f, s2 = 0.0f; // sum dy g, sum dy g xhat
    for (ly_u32 j = 0u; j < p.c; ++j) {
        float gx = dyr[j] * g[j];
        s1 += gx;
        s2 += gx * (xr[j] - mean) * rstd;
    }
    float m1 = p.rms != 0u ? 0.0f : s1 * p.inv_c;
    float m2 = s2 * p.inv_c;
    for (ly_u32 j = 0u; j < p.c; ++j) {
        dxr[j] = rstd * (dyr[j] * g[j] - m1 - (xr[j] - mean) * rstd * m2);
    }
    stats[2u * (ly_size)r] = mean;
    stats[2u * (ly_size)r + 1u] = rstd;
}

// Column j of dgamma = sum_r dy xhat and dbeta = sum_r dy (zero without beta), rows in order.
LY_FN void ly_norm_params(const LY_GLOBAL float* x, const LY_GLOBAL float* dy, const LY_GLOBAL float* stats,
                          LY_GLOBAL float* dgamma, LY_GLOBAL float* dbeta, NormKernelArgs p, ly_u32 j) {
    float dg = 0.0f, db = 0.0f;
    for (ly_u32 r = 0u; r < p.rows; ++r) {
        ly_size at = (ly_size)r * p.c + j;
        dg += dy[at] * (x[at] - stats[2u * (ly_size)r]) * stats[2u * (ly_size)r + 1u];
        db += dy[at];
    }
    dgamma[j] = dg;
    dbeta[j] = p.has_beta != 0u ? db : 0.0f;
}

// Row r of the causal softmax of scale * s: keys j <= i = r % T, zeros after.
LY_FN void ly_causal_softmax_row(const LY_GLOBAL float* s, LY_GLOBAL float* y, CausalSoftmaxKernelArgs p, ly_u32 r) {
    const LY_GLOBAL float* sr = s + (ly_size)r * p.t;
    LY_GLOBAL float* yr = y + (ly_size)r * p.t;
    ly_u32 n = r % p.t + 1u;
    float mx = sr[0] * p.scale;
    for (ly_u32 j = 1u; j < n; ++j) {
        float v = sr[j] * p.scale;
        mx = v > mx ? v : mx;
    }
    float sum = 0.0f;
    for (ly_u32 j = 0u; j < n; ++j) {
        float e = LY_EXPF(sr[j] * p.scale - mx);
        yr[j] = e;
        sum += e;
    }
    float inv = 1.0f / sum;
    for (ly_u32 j = 0u; j < n; ++j) {
        yr[j] *= inv;
    }
    for (ly_u32 j = n; j < p.t; ++j) {
        yr[j] = 0.0f;
    }
}

// Row r of ds = scale p (dp - <p, dp>) from the forward's output p.
LY_FN void ly_causal_softmax_bwd_row(const LY_GLOBAL float* y, const LY_GLOBAL float* dy, LY_GLOBAL float* ds,
                                     CausalSoftmaxKernelArgs p, ly_u32 r) {
    ly_size at = (ly_size)r * p.t;
    ly_u32 n = r % p.t + 1u;
    float dot = 0.0f;
    for (ly_u32 j = 0u; j < n; ++j) {
        dot += y[at + j] * dy[at + j];
    }
    for (ly_u32 j = 0u; j < n; ++j) {
        ds[at + j] = p.scale * y[at + j] * (dy[at + j] - dot);
    }
    for (ly_u32 j = n; j < p.t; ++j) {
        ds[at + j] = 0.0f;
    }
}
