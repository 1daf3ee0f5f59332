// Host run of the fused layer bodies (layers.cuh) through their Metal entry points (layers.metal
// compiled as C++ against metal_shim.h), against float64 math: GELU and its derivative against
// erf, LayerNorm/RMSNorm forward and dx/dgamma/dbeta against central differences of a float64
// forward, and the causal softmax both ways against float64 softmax and its Jacobian. Odd sizes, a
// last row of a tail, and a row of large values. Built and run by scripts/check_kernels.sh.
#include "layers.metal"

#include "host_check.h"

#include <cmath>
#include <vector>

static double frand(unsigned& s) { // uniform in [-1, 1)
    s = s * 1664525u + 1013904223u;
    return (double)(s >> 8) / 8388608.0 - 1.0;
}

static void check_gelu() {
    const ly_u32 n = 1001;
    std::vector<float> x(n), y(n), dy(n), dx(n);
    for (ly_u32 i = 0; i < n; ++i) {
        x[i] = (float)(-9.0 + 18.0 * i / (n - 1));
        dy[i] = 1.0f + 0.001f * i;
    }
    GeluKernelArgs p{n, 0, 0, 0};
    for (ly_u32 i = 0; i < n; ++i) {
        gelu_f32(x.data(), y.data(), p, i);
        gelu_bwd_f32(x.data(), dy.data(), dx.data(), p, i);
    }
    for (ly_u32 i = 0; i < n; ++i) {
        double v = x[i], cdf = 0.5 * std::erfc(-v / std::sqrt(2.0)), pdf = std::exp(-0.5 * v * v) / std::sqrt(2.0 * M_PI);
        double want = v * cdf, dwant = dy[i] * (cdf + v * pdf);
        // f32 exps and products: a few ulp relative to the terms (the derivative's two terms cancel
        // near x = -0.75).
        double dscale = std::fabs(dy[i]) * (cdf + std::fabs(v) * pdf);
        CHECK(std::fabs(y[i] - want) <= 5e-6 * std::fabs(want), "gelu(%g) = %.9g, want %.9g", v, y[i], want);
        CHECK(std::fabs(dx[i] - dwant) <= 5e-6 * dscale, "gelu'(%g) = %.9g, want %.9g", v, dx[i], dwant);
    }
}

// float64 norm of one row (beta optional).
static void norm_f64(const std::vector<double>& x, const std::vector<double>& g, const std::vector<double>* b,
                     bool rms, double eps, std::vector<double>& y, ly_u32 rows, ly_u32 c) {
    for (ly_u32 r = 0; r < rows; ++r) {
        double m = 0, v = 0;
        if (!rms) {
            for (ly_u32 j = 0; j < c; ++j) m += x[r * c + j];
            m /= c;
        }
        for (ly_u32 j = 0; j < c; ++j) v += (x[r * c + j] - m) * (x[r * c + j] - m);
        double rs = 1.0 / std::sqrt(v / c + eps);
        for (ly_u32 j = 0; j < c; ++j) y[r * c + j] = (x[r * c + j] - m) * rs * g[j] + (b ? (*b)[j] : 0.0);
    }
}

static void check_norm(bool rms, bool beta) {
    const ly_u32 rows = 7, c = 37;
    const double eps = 1e-5;
    unsigned s = 12345u + rms * 7 + beta;
    std::vector<float> x(rows * c), g(c), b(c), dy(rows * c), y(rows * c), out((rows + 2) * c), stats(2 * rows);
    for (auto& v : x) v = (float)(3.0 * frand(s) + 0.5);
    for (auto& v : g) v = (float)(1.0 + 0.3 * frand(s));
    for (auto& v : b) v = (float)(0.2 * frand(s));
    for (auto& v : dy) v = (float)frand(s);
    NormKernelArgs p{rows, c, rms ? 1u : 0u, beta ? 1u : 0u, (float)eps, 1.0f / c, 0, 0};
    for (ly_u32 r = 0; r < rows; ++r) {
        norm_f32(x.data(), g.data(), b.data(), y.data(), p, r);
        norm_bwd_rows_f32(x.data(), g.data(), dy.data(), out.data(), stats.data(), p, r);
    }
    for (ly_u32 j = 0; j < c; ++j) norm_bwd_params_f32(x.data(), dy.data(), stats.data(), out.data(), p, j);
    const float* dx = out.data();
    const float* dg = dx + rows * c;
    const float* db = dg + c;
    std::vector<double> xd(x.begin(), x.end()), gd(g.begin(), g.end()), bd(b.begin(), b.end()), yd(rows * c);
    norm_f64(xd, gd, beta ? &bd : nullptr, rms, eps, yd, rows, c);
    for (ly_u32 i = 0; i < rows * c; ++i) CHECK(std::fabs(y[i] - yd[i]) <= 1e-5, "norm y[%u] = %.7g, want %.7g", i, y[i], yd[i]);
    // loss = sum dy * y; central differences of the float64 forward.
    auto loss = [&](const std::vector<double>& xv, const std::vector<double>& gv, const std::vector<double>& bv) {
        std::vector<double> yv(rows * c);
        norm_f64(xv, gv, beta ? &bv : nullptr, rms, eps, yv, rows, c);
        double l = 0;
        for (ly_u32 i = 0; i < rows * c; ++i) l += dy[i] * yv[i];
        return l;
    };
    const double h = 1e-6;
    for (ly_u32 i = 0; i < rows * c; i += 5) {
        auto xp = xd, xm = xd;
        xp[i] += h, xm[i] -= h;
        double want = (loss(xp, gd, bd) - loss(xm, gd, bd)) / (2 * h);
        CHECK(std::fabs(dx[i] - want) <= 1e-4, "norm dx[%u] = %.7g, want %.7g", i, dx[i], want);
    }
    for (ly_u32 j = 0; j < c; ++j) {
        auto gp = gd, gm = gd, bp = bd, bm = bd;
        gp[j] += h, gm[j] -= h, bp[j] += h, bm[j] -= h;
        double wg = (loss(xd, gp, bd) - loss(xd, gm, bd)) / (2 * h);
        double wb = beta ? (loss(xd, gd, bp) - loss(xd, gd, bm)) / (2 * h) : 0.0;
        CHECK(std::fabs(dg[j] - wg) <= 1e-4, "norm dgamma[%u] = %.7g, want %.7g", j, dg[j], wg);
        CHECK(std::fabs(db[j] - wb) <= 1e-4, "norm dbeta[%u] = %.7g, want %.7g", j, db[j], wb);
    }
}

static void check_causal_softmax() {
    const ly_u32 b = 3, t = 13, rows = b * t;
    const float scale = 0.37f;
    unsigned s = 99u;
    std::vector<float> sc(rows * t), y(rows * t, -1.0f), dy(rows * t), ds(rows * t, -1.0f);
    for (auto& v : sc) v = (float)(4.0 * frand(s));
    for (ly_u32 j = 0; j < t; ++j) sc[(rows - 1) * t + j] = 80.0f + j; // large: the max must be subtracted
    for (auto& v : dy) v = (float)frand(s);
    CausalSoftmaxKernelArgs p{rows, t, scale, 0};
    for (ly_u32 r = 0; r < rows; ++r) {
        causal_softmax_f32(sc.data(), y.data(), p, r);
        causal_softmax_bwd_f32(y.data(), dy.data(), ds.data(), p, r);
    }
    for (ly_u32 r = 0; r < rows; ++r) {
        ly_u32 n = r % t + 1;
        double mx = -1e300, z = 0;
        for (ly_u32 j = 0; j < n; ++j) mx = std::fmax(mx, (double)scale * sc[r * t + j]);
        std::vector<double> pr(t, 0.0);
        for (ly_u32 j = 0; j < n; ++j) z += pr[j] = std::exp((double)scale * sc[r * t + j] - mx);
        double dot = 0;
        for (ly_u32 j = 0; j < n; ++j) dot += (pr[j] /= z) * dy[r * t + j];
        for (ly_u32 j = 0; j < t; ++j) {
            double dw = j < n ? scale * pr[j] * (dy[r * t + j] - dot) : 0.0;
            CHECK(std::fabs(y[r * t + j] - pr[j]) <= 1e-6, "softmax y[%u,%u] = %.7g, want %.7g", r, j, y[r * t + j], pr[j]);
            CHECK(std::fabs(ds[r * t + j] - dw) <= 1e-6, "softmax ds[%u,%u] = %.7g, want %.7g", r, j, ds[r * t + j], dw);
            CHECK(j < n || (y[r * t + j] == 0.0f && ds[r * t + j] == 0.0f), "softmax: future key %u of row %u not zero", j, r);
        }
    }
}

int main() {
    check_gelu();
    for (bool rms : {false, true})
        for (bool beta : {false, true})
            if (!(rms && beta)) check_norm(rms, beta);
    check_causal_softmax();
    std::printf("host_check_layers: %s\n", failures ? "FAILED" : "ok");
    return failures != 0;
}
