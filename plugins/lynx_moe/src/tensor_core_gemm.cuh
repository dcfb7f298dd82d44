// LYNX_KERNEL_TENSOR_CORE_GEMM: the grouped GEMM of experts with more than kGemvMaxRows rows on
// tensor cores (WMMA 16x16x16, fp16 or bf16 inputs, fp32 accumulation), for fp16 and bf16
// weights. Same work split as expert_gemm: grid (ceil(N / kTcCols), E, row tiles strided by
// gridDim.z); each block reads its expert's row count and offset on the device (no host sync) and
// returns at once for experts with few rows, which the GEMV kernels take.
//
// Block tile 64 rows x 128 outputs x 32 depth, 8 warps of 32x32 (2x2 fragments). Input rows
// (gathered tokens for fc1, fp32 activations for fc2) are converted to the weight's 16-bit type as
// they are staged, so fp32 inputs lose precision here that the fp32 SIMT kernel keeps; the fp32
// accumulators go through shared memory to the same epilogues (store_pair) as the other kernels.
// Two shared-memory stages: the next depth slice is loaded into registers while the tensor cores
// work on the current one. Padded rows (40 elements, 80 bytes) spread WMMA's loads over the banks.
#pragma once

#include <mma.h>

#include "expert_ffn.cuh"

namespace lynx {

constexpr int kTcRows = 64, kTcCols = 128, kTcDepth = 32, kTcThreads = 256;
constexpr int kTcStride = kTcDepth + 8;  // staged row length in elements (16-bit)
constexpr int kTcOutStride = kTcCols + 4;  // fp32 output tile row length

template <typename T>
struct TcStage {
    T a[kTcRows][kTcStride];  // input rows x depth
    T b[kTcCols][kTcStride];  // weight rows (outputs) x depth: the B operand, column-major
};

template <typename T>
union TcShared {
    TcStage<T> stage[2];
    float c[kTcRows][kTcOutStride];
};

// 8 consecutive elements of one row from k, zero past `depth`, as fp32.
template <typename T>
__device__ __forceinline__ void load_row8(const T* row, int k, int depth, bool vec, float (&v)[8]) {
    if (vec && k + 8 <= depth) {
        load8(row + k, v);
        return;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = k + i < depth ? to_float(row[k + i]) : 0.0f;
}

template <typename T>
__device__ __forceinline__ void store8(T* dst, const float (&v)[8]) {
    alignas(16) T packed[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) packed[i] = from_float<T>(v[i]);
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(packed);
}

template <Epilogue EPI, typename TIn, typename TW>
__global__ void __launch_bounds__(kTcThreads) expert_gemm_tc(Rows<TIn> in, Projection<TW> w, const int* counts, const int* offsets, float* out) {
    static_assert(sizeof(TW) == 2, "tensor cores take fp16 or bf16 weights");
    const int e = blockIdx.y;
    const int count = counts[e];
    if (count <= kGemvMaxRows) return;
    const int n0 = blockIdx.x * kTcCols;
    const int64_t first_row = offsets[e];
    const TW* weight = w.weight + static_cast<int64_t>(e) * w.outputs * w.depth;
    const int tid = threadIdx.x;
#if __CUDA_ARCH__ >= 800
    using namespace nvcuda;
    __shared__ __align__(128) TcShared<TW> smem;
    const int warp = tid >> 5, warp_m = warp / 4, warp_n = warp % 4;
    // Staging: thread tid loads 8 depth elements of input row tid/4 and of weight rows tid/4, tid/4+64.
    const int stage_row = tid / 4, stage_k = (tid % 4) * 8;
    float va[8], vb0[8], vb1[8];
    auto fetch = [&](int m0, int k0) {
        const int r = m0 + stage_row;
        if (r < count) load_row8(in.row(first_row + r), k0 + stage_k, w.depth, in.vec, va);
        else
            for (float& x : va) x = 0.0f;
        const int n = n0 + stage_row;
        if (n < w.outputs) load_row8(weight + static_cast<int64_t>(n) * w.depth, k0 + stage_k, w.depth, w.vec, vb0);
        else
            for (float& x : vb0) x = 0.0f;
        if (n + 64 < w.outputs) load_row8(weight + static_cast<int64_t>(n + 64) * w.depth, k0 + stage_k, w.depth, w.vec, vb1);
        else
            for (float& x : vb1) x = 0.0f;
    };
    auto stage = [&](int s) {
        store8(&smem.stage[s].a[stage_row][stage_k], va);
        store8(&smem.stage[s].b[stage_row][stage_k], vb0);
        store8(&smem.stage[s].b[stage_row + 64][stage_k], vb1);
    };

    for (int m0 = blockIdx.z * kTcRows; m0 < count; m0 += gridDim.z * kTcRows) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
        fetch(m0, 0);
        stage(0);
        __syncthreads();
        int s = 0;
        for (int k0 = 0; k0 < w.depth; k0 += kTcDepth) {
            const bool more = k0 + kTcDepth < w.depth;
            if (more) fetch(m0, k0 + kTcDepth);
#pragma unroll
            for (int kk = 0; kk < kTcDepth; kk += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, TW, wmma::row_major> fa[2];
                wmma::fragment<wmma::matrix_b, 16, 16, 16, TW, wmma::col_major> fb[2];
#pragma unroll
                for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &smem.stage[s].a[warp_m * 32 + i * 16][kk], kTcStride);
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &smem.stage[s].b[warp_n * 32 + j * 16][kk], kTcStride);
#pragma unroll
                for (int i = 0; i < 2; ++i)
#pragma unroll
                    for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
            }
            if (more) stage(s ^ 1);
            __syncthreads();
            s ^= 1;
        }
        // The stages are dead (the loop ended on a barrier): the output tile reuses their memory.
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 2; ++j)
                wmma::store_matrix_sync(&smem.c[warp_m * 32 + i * 16][warp_n * 32 + j * 16], acc[i][j], kTcOutStride, wmma::mem_row_major);
        __syncthreads();
        for (int i = tid; i < kTcRows * (kTcCols / 2); i += kTcThreads) {
            const int r = i / (kTcCols / 2), pair = i % (kTcCols / 2);
            const int n = n0 + 2 * pair;
            if (m0 + r < count && n < w.outputs)
                store_pair<EPI>(w, e, n, first_row + m0 + r, smem.c[r][2 * pair], smem.c[r][2 * pair + 1], out);
        }
        __syncthreads();
    }
#else
    // No bf16 WMMA below sm_80: one output pair per thread and step, plain fp32 dot products.
    for (int m0 = blockIdx.z * kTcRows; m0 < count; m0 += gridDim.z * kTcRows) {
        for (int i = tid; i < kTcRows * (kTcCols / 2); i += kTcThreads) {
            const int r = m0 + i / (kTcCols / 2), n = n0 + 2 * (i % (kTcCols / 2));
            if (r >= count || n >= w.outputs) continue;
            const TIn* x = in.row(first_row + r);
            const TW* w0 = weight + static_cast<int64_t>(n) * w.depth;
            const TW* w1 = n + 1 < w.outputs ? w0 + w.depth : w0;
            float s0 = 0.0f, s1 = 0.0f;
            for (int k = 0; k < w.depth; ++k) {
                s0 += to_float(w0[k]) * to_float(x[k]);
                s1 += to_float(w1[k]) * to_float(x[k]);
            }
            store_pair<EPI>(w, e, n, first_row + r, s0, s1, out);
        }
    }
#endif
}

}  // namespace lynx
