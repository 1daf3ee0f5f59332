// Host run of the Philox dropout body (dropout.cuh) through its Metal entry point (dropout.metal
// compiled as C++ against metal_shim.h): the integer threshold against the float definition
// (k + 0.5) / 2^23 < p, the drop rate within 5 sigma of p, kept values scaled by 1 / (1 - p), and
// a tail that is not a multiple of 4 left untouched past n. Built and run by scripts/check_kernels.sh.
#include "dropout.metal"

#include <cmath>
#include <cstdio>
#include <vector>

static int fail(const char* what) {
    std::printf("host_check_dropout: FAIL: %s\n", what);
    return 1;
}

int main() {
    const gm_u32 n = 200003;
    for (double prob : {0.1, 0.2, 0.5}) {
        DropoutKernelArgs p{};
        p.n = n;
        p.site = 3;
        p.hi = (12u << 16) | 1u;
        p.threshold = (gm_u32)std::ceil(prob * 8388608.0 - 0.5);
        p.seed_lo = 0x9abcu;
        p.seed_hi = 0x1234u;
        p.scale = (float)(1.0 / (1.0 - prob));
        std::vector<float> x(n + 5, 1.0f), y(n + 5, -7.0f);
        for (gm_u32 g = 0; g < (n + 3) / 4 + 1; ++g) {
            philox_dropout_f32(x.data(), y.data(), p, g);
        }
        size_t dropped = 0;
        for (gm_u32 i = 0; i < n; ++i) {
            GmU4 r = gm_philox4x32_10(p.site, p.hi, i / 4, 4u << 16, p.seed_lo, p.seed_hi);
            gm_u32 w[4] = {r.x, r.y, r.z, r.w};
            double u = ((double)(w[i % 4] >> 9) + 0.5) / 8388608.0;
            float want = u < prob ? 0.0f : p.scale;
            if (y[i] != want) {
                return fail("integer threshold differs from the float definition");
            }
            dropped += y[i] == 0.0f;
        }
        double sd = std::sqrt(n * prob * (1.0 - prob));
        if (std::fabs((double)dropped - n * prob) > 5.0 * sd) {
            return fail("drop rate");
        }
        for (gm_u32 i = n; i < n + 5; ++i) {
            if (y[i] != -7.0f) {
                return fail("wrote past n");
            }
        }
    }
    std::printf("host_check_dropout: ok\n");
    return 0;
}
