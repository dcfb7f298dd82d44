// Token permutation by expert: the (token, choice) pairs are grouped so that each expert's rows
// are contiguous, which lets the expert kernels stream an expert's weights once for all its rows.
#pragma once

#include <cstdint>

namespace lynx {

// slot_of[t*K+k] = the pair's rank among its expert's pairs (in arrival order; the outputs do not
// depend on it, since every row is computed on its own and combined per token in choice order).
__global__ void count_pairs(int64_t pairs, const int32_t* ids, int* counts, int32_t* slot_of) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < pairs) slot_of[i] = atomicAdd(&counts[ids[i]], 1);
}

// offsets[e] = first row of expert e; one thread scans (E dependent L2 round trips: see
// scan_counts_parallel).
__global__ void scan_counts(int experts, const int* counts, int* offsets) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    int running = 0;
    for (int e = 0; e < experts; ++e) {
        offsets[e] = running;
        running += counts[e];
    }
    offsets[experts] = running;
}

// The same offsets by one block (LYNX_KERNEL_PARALLEL_SCAN): one thread per expert, warp
// inclusive scans, then a scan of the warps' totals. E <= LYNX_MOE_MAX_EXPERTS = 1024 threads;
// the block has ceil(E / 32) warps.
constexpr int kScanMaxThreads = 1024;
__global__ void __launch_bounds__(kScanMaxThreads) scan_counts_parallel(int experts, const int* counts, int* offsets) {
    __shared__ int warp_totals[kScanMaxThreads / 32];
    const int e = threadIdx.x, lane = e & 31, warp = e >> 5;
    const int count = e < experts ? counts[e] : 0;
    int inclusive = count;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
        const int below = __shfl_up_sync(0xffffffffu, inclusive, d);
        if (lane >= d) inclusive += below;
    }
    if (lane == 31) warp_totals[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
        int total = lane < static_cast<int>(blockDim.x >> 5) ? warp_totals[lane] : 0;
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
            const int below = __shfl_up_sync(0xffffffffu, total, d);
            if (lane >= d) total += below;
        }
        warp_totals[lane] = total;  // inclusive over warps 0..lane
    }
    __syncthreads();
    const int exclusive = (warp > 0 ? warp_totals[warp - 1] : 0) + inclusive - count;
    if (e < experts) offsets[e] = exclusive;
    if (e == experts - 1) offsets[experts] = exclusive + count;
}

// Row `slot_of[i]` of the permuted order holds pair i; row_token[row] is its token.
__global__ void place_pairs(int64_t pairs, int top_k, const int32_t* ids, const int* offsets, int32_t* slot_of, int32_t* row_token) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= pairs) return;
    const int32_t row = offsets[ids[i]] + slot_of[i];
    slot_of[i] = row;
    row_token[row] = static_cast<int32_t>(i / top_k);
}

// output[t,:] = sum over k, in choice order, of weights[t,k] * rows[slot_of[t,k],:].
template <typename TA>
__global__ void combine(int64_t tokens, int hidden, int top_k, const float* weights, const int32_t* slot_of, const float* rows, TA* output) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= tokens * hidden) return;
    const int64_t t = i / hidden;
    const int h = static_cast<int>(i % hidden);
    float acc = 0.0f;
    for (int k = 0; k < top_k; ++k) {
        const float w = weights[t * top_k + k];
        if (w != 0.0f) acc += w * rows[static_cast<int64_t>(slot_of[t * top_k + k]) * hidden + h];
    }
    output[i] = from_float<TA>(acc);
}

}  // namespace lynx
