// Shared by the kernels/host_check*.cpp programs (scripts/check_kernels.sh builds and runs them):
// a failure counter and CHECK(cond, printf-args...), which prints and counts a failed condition
// instead of stopping, so one run reports every failure; main returns failures != 0.
#pragma once

#include <cstdio>

static int failures = 0;
#define CHECK(c, ...)                 \
    do {                              \
        if (!(c)) {                   \
            std::printf("FAIL: ");    \
            std::printf(__VA_ARGS__); \
            std::printf("\n");        \
            ++failures;               \
        }                             \
    } while (0)
