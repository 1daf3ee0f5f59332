// A stand-in for <metal_stdlib> so that scripts/check_kernels.sh can compile the .metal sources as
// C++17 with g++ on Linux: address-space qualifiers become empty macros, `kernel` an external
// function, and the few Metal builtins the kernels use get host definitions. It checks names,
// types and signatures; it is not Metal (no Apple compiler here), and nothing of it ships.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#define kernel extern "C"
#define device
#define constant
#define thread
#define threadgroup

typedef uint32_t uint;
typedef uint64_t ulong;
typedef uint16_t ushort;

inline uint mulhi(uint a, uint b) {
    return (uint)(((ulong)a * (ulong)b) >> 32);
}

template <typename To, typename From>
inline To as_type(From x) {
    static_assert(sizeof(To) == sizeof(From), "as_type: sizes differ");
    To y;
    std::memcpy(&y, &x, sizeof(To));
    return y;
}

namespace precise {
inline float log(float x) {
    return std::log(x);
}
inline float exp(float x) {
    return std::exp(x);
}
inline float divide(float a, float b) {
    return a / b;
}
inline float sqrt(float x) {
    return std::sqrt(x);
}
} // namespace precise

inline void threadgroup_barrier(int) {}
#define mem_flags_mem_threadgroup 0
