// Element types of the core library: loads convert to fp32, every accumulation is fp32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace lynx {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// VEC consecutive elements from a 16-byte aligned address, as fp32.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* src, float (&dst)[VEC]) {
    if constexpr (VEC * sizeof(T) == 16) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(src));
        const T* parts = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int i = 0; i < VEC; ++i) dst[i] = to_float(parts[i]);
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) dst[i] = to_float(src[i]);
    }
}

// 8 consecutive elements from a 16-byte aligned address, as fp32 (one or two 16-byte loads).
template <typename T>
__device__ __forceinline__ void load8(const T* src, float (&dst)[8]) {
    static_assert(sizeof(T) == 2 || sizeof(T) == 4, "8 elements are 16 or 32 bytes");
    constexpr int kPerLoad = static_cast<int>(16 / sizeof(T));
#pragma unroll
    for (int part = 0; part < 8 / kPerLoad; ++part) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(src) + part);
        const T* values = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int i = 0; i < kPerLoad; ++i) dst[part * kPerLoad + i] = to_float(values[i]);
    }
}

// Whether `ptr` may be read with 16-byte vector loads (the host decides before a launch).
inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace lynx
