// The expert projections over permuted rows: out[row, n] = W[e, n, :] . in[row, :] (+ bias), for
// every row routed to expert e. Two kernels share the work by the expert's row count, decided on
// the device so that nothing synchronises with the host:
//   - expert_gemv: experts with few rows (decode). A warp streams a pair of weight rows and dots
//     them with kGemvTile rows at a time: read once per expert up to 8 rows, ceil(rows / 8) times
//     above; expert_gemv_one_pass (LYNX_KERNEL_GEMV_ONE_PASS) reads them once up to 32 rows.
//   - expert_gemm: experts with many rows (prefill), a shared-memory tiled grouped GEMM in fp32;
//     expert_gemm_tc (tensor_core_gemm.cuh, LYNX_KERNEL_TENSOR_CORE_GEMM) on tensor cores.
// An expert with no rows returns before touching its weights, in both kernels.
//
// Epilogues: kSwiGLU (fc1) pairs output rows 2i (gate) and 2i+1 (up) into act[row, i] =
// silu(gate) * up, which the interleaved fc1 layout keeps inside one warp or one thread;
// kBias (fc2) writes out[row, n] + bias.
#pragma once

#include "dtype.cuh"

namespace lynx {

enum class Epilogue { kSwiGLU, kBias };

constexpr int kGemvWarps = 4;
constexpr int kGemvTile = 8;       // rows dotted per pass over the weights
constexpr int kGemvMaxRows = 32;   // experts with more rows go to the GEMM
constexpr int kTileRows = 64, kTileCols = 64, kTileDepth = 16;  // GEMM tile; 256 threads, 4x4 each

// Input rows: either gathered from the tokens (fc1 reads hidden[row_token[row]]) or the permuted
// rows themselves (fc2 reads act[row]).
template <typename TIn>
struct Rows {
    const TIn* data;
    const int32_t* gather;  // row -> source row, or nullptr
    int64_t stride;
    bool vec = false;       // every row start is 16-byte aligned: 8 elements at k % 8 == 0 load as vectors

    __device__ __forceinline__ const TIn* row(int64_t r) const { return data + (gather ? static_cast<int64_t>(gather[r]) : r) * stride; }
};

// gate * sigmoid(alpha * gate) * (up + beta), gate <= limit, |up| <= limit (see lynx_moe.h).
struct SwiGLU {
    float alpha;
    float beta;
    float limit;

    __device__ __forceinline__ float operator()(float gate, float up) const {
        gate = fminf(gate, limit);
        up = fminf(fmaxf(up, -limit), limit);
        return gate / (1.0f + expf(-alpha * gate)) * (up + beta);
    }
};

template <typename TW>
struct Projection {
    const TW* weight;  // [E, N, depth]
    const TW* bias;    // [E, N] or nullptr
    int outputs;       // N
    int depth;         // the dot-product length
    SwiGLU act;        // the kSwiGLU epilogue's activation
    bool vec = false;  // weight is 16-byte aligned and depth a multiple of 16 bytes' elements
};

template <typename TW>
__device__ __forceinline__ float bias_at(const Projection<TW>& w, int e, int n) {
    return w.bias ? to_float(w.bias[static_cast<int64_t>(e) * w.outputs + n]) : 0.0f;
}

template <Epilogue EPI, typename TW>
__device__ __forceinline__ void store_pair(const Projection<TW>& w, int e, int n, int64_t row, float first, float second, float* out) {
    // n is even; for kBias the second row may be past the end when N is odd.
    if constexpr (EPI == Epilogue::kSwiGLU) {
        out[row * (w.outputs / 2) + n / 2] = w.act(first + bias_at(w, e, n), second + bias_at(w, e, n + 1));
    } else {
        out[row * w.outputs + n] = first + bias_at(w, e, n);
        if (n + 1 < w.outputs) out[row * w.outputs + n + 1] = second + bias_at(w, e, n + 1);
    }
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Rows base .. base+tile-1 of expert e dotted with weight rows n, n+1 in one pass over the weights.
template <Epilogue EPI, int VEC, int TILE, typename TIn, typename TW>
__device__ __forceinline__ void gemv_pass(const Rows<TIn>& in, const Projection<TW>& w, int e, int n, int64_t first_row, int base, int tile,
                                          float* out) {
    const int lane = threadIdx.x & 31;
    const bool has_second = n + 1 < w.outputs;
    const TW* w0 = w.weight + (static_cast<int64_t>(e) * w.outputs + n) * w.depth;
    const TW* w1 = has_second ? w0 + w.depth : w0;
    float acc0[TILE] = {}, acc1[TILE] = {};
    for (int k = lane * VEC; k < w.depth; k += 32 * VEC) {
        float a[VEC], b[VEC];
        load_vec<TW, VEC>(w0 + k, a);
        load_vec<TW, VEC>(w1 + k, b);
#pragma unroll
        for (int j = 0; j < TILE; ++j) {
            if (j >= tile) break;
            const TIn* x = in.row(first_row + base + j) + k;
            float xv[VEC];
            bool loaded = false;
            if constexpr (VEC == 8) {
                if (in.vec) {
                    load8(x, xv);
                    loaded = true;
                }
            }
            if (!loaded) {
#pragma unroll
                for (int v = 0; v < VEC; ++v) xv[v] = to_float(x[v]);
            }
#pragma unroll
            for (int v = 0; v < VEC; ++v) {
                acc0[j] += a[v] * xv[v];
                acc1[j] += b[v] * xv[v];
            }
        }
    }
#pragma unroll
    for (int j = 0; j < TILE; ++j) {
        if (j >= tile) break;
        const float s0 = warp_sum(acc0[j]);
        const float s1 = warp_sum(acc1[j]);
        if (lane == 0) store_pair<EPI>(w, e, n, first_row + base + j, s0, s1, out);
    }
}

// grid (ceil(N / (2 * kGemvWarps)), E); each warp owns output rows n, n+1. Experts with 1..max_rows
// rows, kGemvTile rows per pass over the weights (so ceil(rows / 8) passes).
template <Epilogue EPI, int VEC, typename TIn, typename TW>
__global__ void __launch_bounds__(kGemvWarps * 32) expert_gemv(Rows<TIn> in, Projection<TW> w, const int* counts, const int* offsets, float* out,
                                                               int max_rows) {
    const int e = blockIdx.y;
    const int count = counts[e];
    if (count == 0 || count > max_rows) return;
    const int n = 2 * (blockIdx.x * kGemvWarps + (threadIdx.x >> 5));
    if (n >= w.outputs) return;
    const int64_t first_row = offsets[e];
    for (int base = 0; base < count; base += kGemvTile)
        gemv_pass<EPI, VEC, kGemvTile>(in, w, e, n, first_row, base, min(kGemvTile, count - base), out);
}

// LYNX_KERNEL_GEMV_ONE_PASS: experts with TILE/2+1 .. TILE rows (TILE 16 or 32) in one pass, so
// each weight is read once for up to 32 rows. Vectorised 16-bit weights only (the caller's choice).
// Up to 2 * TILE accumulators per lane: the explicit bound of one block per SM lets ptxas use up to
// 255 registers (without it, it kept TILE 32 at 128 and spilled; with it, 212-254, no spills).
template <Epilogue EPI, int VEC, int TILE, typename TIn, typename TW>
__global__ void __launch_bounds__(kGemvWarps * 32, 1) expert_gemv_one_pass(Rows<TIn> in, Projection<TW> w, const int* counts, const int* offsets,
                                                                        float* out) {
    const int e = blockIdx.y;
    const int count = counts[e];
    if (count <= TILE / 2 || count > TILE) return;
    const int n = 2 * (blockIdx.x * kGemvWarps + (threadIdx.x >> 5));
    if (n >= w.outputs) return;
    gemv_pass<EPI, VEC, TILE>(in, w, e, n, offsets[e], 0, count, out);
}

// grid (ceil(N / kTileCols), E, tiles of rows strided by gridDim.z); 256 threads.
template <Epilogue EPI, typename TIn, typename TW>
__global__ void __launch_bounds__(256) expert_gemm(Rows<TIn> in, Projection<TW> w, const int* counts, const int* offsets, float* out) {
    const int e = blockIdx.y;
    const int count = counts[e];
    if (count <= kGemvMaxRows) return;
    __shared__ float tile_in[kTileDepth][kTileRows];
    __shared__ float tile_w[kTileDepth][kTileCols];
    const int tid = threadIdx.x;
    const int tx = tid % 16, ty = tid / 16;  // 4 output columns x 4 rows per thread
    const int n0 = blockIdx.x * kTileCols;
    const int64_t first_row = offsets[e];
    const TW* weight = w.weight + static_cast<int64_t>(e) * w.outputs * w.depth;

    for (int m0 = blockIdx.z * kTileRows; m0 < count; m0 += gridDim.z * kTileRows) {
        float acc[4][4] = {};
        for (int k0 = 0; k0 < w.depth; k0 += kTileDepth) {
            for (int i = tid; i < kTileRows * kTileDepth; i += 256) {
                const int r = i / kTileDepth, k = i % kTileDepth;
                const bool inside = m0 + r < count && k0 + k < w.depth;
                tile_in[k][r] = inside ? to_float(in.row(first_row + m0 + r)[k0 + k]) : 0.0f;
                const bool w_inside = n0 + r < w.outputs && k0 + k < w.depth;
                tile_w[k][r] = w_inside ? to_float(weight[static_cast<int64_t>(n0 + r) * w.depth + k0 + k]) : 0.0f;
            }
            __syncthreads();
#pragma unroll
            for (int k = 0; k < kTileDepth; ++k) {
                float a[4], b[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) a[i] = tile_in[k][ty * 4 + i];
#pragma unroll
                for (int j = 0; j < 4; ++j) b[j] = tile_w[k][tx * 4 + j];
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
            }
            __syncthreads();
        }
        for (int i = 0; i < 4; ++i) {
            const int r = m0 + ty * 4 + i;
            if (r >= count) break;
            for (int j = 0; j < 4; j += 2) {
                const int n = n0 + tx * 4 + j;
                if (n < w.outputs) store_pair<EPI>(w, e, n, first_row + r, acc[i][j], acc[i][j + 1], out);
            }
        }
    }
}

}  // namespace lynx
