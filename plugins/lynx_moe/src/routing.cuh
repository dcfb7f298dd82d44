// Routing and batch-aware expert selection, bit for bit as the numpy oracle computes it
// (lynx_export/routing.py: fp32 arithmetic, exp and pow correctly rounded, sums sequential in
// index order, top-K taking equal values by lower index).
//
// The explicit __f*_rn intrinsics keep nvcc from contracting a*b+c into an fma, which would
// round differently from the oracle and flip routing decisions at bin boundaries.
#pragma once

#include <cfloat>
#include <cmath>

#include "dtype.cuh"

namespace lynx {

constexpr int kRouteWarps = 4;  // tokens per block in the per-token kernels

struct RoutingProblem {
    int64_t tokens;  // T
    int experts;     // E
    int top_k;       // K
    int router;      // lynx_router_t
    int normalize;
    int policy;      // lynx_policy_t
    float alpha;
    int beta;        // -1: no bin floor
    int budget;
    int tie_break;   // lynx_tie_break_t
    const int64_t* seq_len;    // device scalar or nullptr
    const int64_t* num_valid;  // device scalar or nullptr
};

// Rows that vote, and whether this call is a decode step; read on the device, never synchronised.
__device__ __forceinline__ int64_t voting_rows(const RoutingProblem& p) {
    if (p.num_valid == nullptr) return p.tokens;
    const int64_t v = *p.num_valid;
    return v < 0 ? 0 : (v > p.tokens ? p.tokens : v);
}

__device__ __forceinline__ bool policy_runs(const RoutingProblem& p) {
    const bool decode = p.seq_len == nullptr || *p.seq_len == 1;
    return p.policy != 0 && decode && voting_rows(p) > 0;
}

__device__ __forceinline__ float exp_rounded(float x) { return static_cast<float>(exp(static_cast<double>(x))); }

__host__ __device__ __forceinline__ float pow_rounded(float base, float exponent) {
    return static_cast<float>(pow(static_cast<double>(base), static_cast<double>(exponent)));
}

// (value, secondary, index) ordered: larger value first, then larger secondary, then lower index.
struct Ranked {
    float value;
    float secondary;
    int index;
};

__device__ __forceinline__ bool ranks_before(const Ranked& a, const Ranked& b) {
    if (a.value != b.value) return a.value > b.value;
    if (a.secondary != b.secondary) return a.secondary > b.secondary;
    return a.index < b.index;
}

__device__ __forceinline__ Ranked warp_best(Ranked r) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        Ranked other;
        other.value = __shfl_xor_sync(0xffffffffu, r.value, offset);
        other.secondary = __shfl_xor_sync(0xffffffffu, r.secondary, offset);
        other.index = __shfl_xor_sync(0xffffffffu, r.index, offset);
        if (ranks_before(other, r)) r = other;
    }
    return r;
}

// Top-k of values[0..n) (ties by larger secondary when given, then lower index), by one warp.
// picked[] (k entries, warp-uniform on return) receives the indices in rank order. The order is
// a total order, so the result does not depend on how lanes split the row.
__device__ void warp_topk(const float* values, const float* secondary, int n, int k, int* picked) {
    const int lane = threadIdx.x & 31;
    for (int r = 0; r < k; ++r) {
        Ranked best{-INFINITY, -INFINITY, INT_MAX};
        for (int i = lane; i < n; i += 32) {
            bool taken = false;
            for (int j = 0; j < r; ++j) taken |= picked[j] == i;
            if (taken) continue;
            const Ranked c{values[i], secondary ? secondary[i] : 0.0f, i};
            if (best.index == INT_MAX || ranks_before(c, best)) best = c;
        }
        best = warp_best(best);
        if (lane == 0) picked[r] = best.index;
        __syncwarp();
    }
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

struct SoftmaxTerms {
    float top;  // the max subtracted (0 for a row with no finite value)
    float sum;  // sequential sum of the rounded exps
};

__device__ __forceinline__ float softmax_prob(float logit, SoftmaxTerms s) {
    return s.sum > 0.0f ? __fdiv_rn(exp_rounded(__fsub_rn(logit, s.top)), s.sum) : 0.0f;
}

// In-place softmax of row[0..n) as the oracle's _softmax: max subtracted (0 when the row has no
// finite value), exp rounded once, sum sequential, division guarded so an all -inf row gives 0.
__device__ SoftmaxTerms warp_softmax(float* row, int n) {
    const int lane = threadIdx.x & 31;
    float top = -INFINITY;
    for (int i = lane; i < n; i += 32) top = fmaxf(top, row[i]);
    top = warp_max(top);
    if (!isfinite(top)) top = 0.0f;
    for (int i = lane; i < n; i += 32) row[i] = exp_rounded(__fsub_rn(row[i], top));
    __syncwarp();
    float sum = 0.0f;
    if (lane == 0)
        for (int i = 0; i < n; ++i) sum = __fadd_rn(sum, row[i]);
    sum = __shfl_sync(0xffffffffu, sum, 0);
    for (int i = lane; i < n; i += 32) row[i] = sum > 0.0f ? __fdiv_rn(row[i], sum) : 0.0f;
    __syncwarp();
    return {top, sum};
}

// Shared memory of the per-token kernels: per warp, two rows of E floats and K picked ids.
__host__ __device__ inline size_t route_smem_bytes(int experts, int top_k) {
    return static_cast<size_t>(kRouteWarps) * (2 * experts * sizeof(float) + top_k * sizeof(int));
}

struct WarpRow {
    float* values;
    float* secondary;
    int* picked;
};

__device__ __forceinline__ WarpRow warp_row(int experts, int top_k) {
    extern __shared__ unsigned char smem[];
    const int warp = threadIdx.x >> 5;
    unsigned char* base = smem + warp * (2 * experts * sizeof(float) + top_k * sizeof(int));
    float* values = reinterpret_cast<float*>(base);
    return {values, values + experts, reinterpret_cast<int*>(values + 2 * experts)};
}

__device__ __forceinline__ int64_t warp_token() { return static_cast<int64_t>(blockIdx.x) * kRouteWarps + (threadIdx.x >> 5); }

template <typename TA>
__device__ __forceinline__ void load_logits(const TA* logits, int64_t t, int experts, float* row) {
    for (int e = threadIdx.x & 31; e < experts; e += 32) row[e] = to_float(logits[t * experts + e]);
    __syncwarp();
}

// allowed[e] = 1 for every expert unless a policy runs this call, in which case it starts empty.
__global__ void init_selection(RoutingProblem p, int* allowed, int* votes) {
    const bool selecting = policy_runs(p);
    for (int e = threadIdx.x; e < p.experts; e += blockDim.x) {
        allowed[e] = selecting ? 0 : 1;
        votes[e] = 0;
    }
}

// --- lynx -------------------------------------------------------------------------------------

template <typename TA>
__global__ void lynx_row_max(RoutingProblem p, const TA* logits, float* row_max) {
    if (!policy_runs(p)) return;
    const int64_t t = warp_token();
    if (t >= voting_rows(p)) return;
    const int lane = threadIdx.x & 31;
    float top = -INFINITY;
    for (int e = lane; e < p.experts; e += 32) top = fmaxf(top, to_float(logits[t * p.experts + e]));
    top = warp_max(top);
    if (lane == 0) row_max[t] = top;
}

__device__ __forceinline__ float lynx_bin(const RoutingProblem& p, float logit, float top) {
    float bin = ceilf(__fmul_rn(p.alpha, __fsub_rn(logit, top)));
    if (p.beta >= 0) bin = fmaxf(bin, -static_cast<float>(p.beta));
    return bin;
}

// pop[e] = sum over voting rows t, in order, of B ** bin[t,e]. One thread per expert keeps the
// sum sequential, as the oracle's, but also computes a double pow per token: E threads on the
// whole GPU, T pows each (see lynx_popularity_table).
template <typename TA>
__global__ void lynx_popularity(RoutingProblem p, const TA* logits, const float* row_max, float* popularity) {
    if (!policy_runs(p)) return;
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= p.experts) return;
    const int64_t rows = voting_rows(p);
    const float batch = static_cast<float>(rows);
    float pop = 0.0f;
    for (int64_t t = 0; t < rows; ++t)
        pop = __fadd_rn(pop, pow_rounded(batch, lynx_bin(p, to_float(logits[t * p.experts + e]), row_max[t])));
    popularity[e] = pop;
}

// The same sums (LYNX_KERNEL_POPULARITY_TABLE), bit for bit: one block per expert. B ** bin for
// the integer bins 0, -1, ..., -(kPowTable - 1) comes from a table the block computes once (the
// same correctly rounded pow, so the same values); other bins (deeper, -inf, NaN) call pow. The
// block's threads compute a chunk of weights in parallel and thread 0 adds them in token order.
constexpr int kPowTable = 64;
constexpr int kPopularityThreads = 256;

// Host and device: test/routing_host_test.cu checks it against pow_rounded for every kind of bin.
__host__ __device__ __forceinline__ float table_weight(const float* table, float batch, float bin) {
    const float down = -bin;  // bins are integers (ceil, then the integer floor) or +-inf / NaN; checked anyway
    if (down >= 0.0f && down < static_cast<float>(kPowTable)) {
        const int j = static_cast<int>(down);
        if (static_cast<float>(j) == down) return table[j];
    }
    return pow_rounded(batch, bin);
}

template <typename TA>
__global__ void __launch_bounds__(kPopularityThreads) lynx_popularity_table(RoutingProblem p, const TA* logits, const float* row_max,
                                                                            float* popularity) {
    if (!policy_runs(p)) return;
    __shared__ float table[kPowTable];
    __shared__ float weights[kPopularityThreads];
    const int e = blockIdx.x;
    const int64_t rows = voting_rows(p);
    const float batch = static_cast<float>(rows);
    for (int j = threadIdx.x; j < kPowTable; j += blockDim.x) table[j] = pow_rounded(batch, -static_cast<float>(j));
    __syncthreads();
    float pop = 0.0f;  // thread 0's running sum
    for (int64_t base = 0; base < rows; base += kPopularityThreads) {
        const int64_t t = base + threadIdx.x;
        if (t < rows) weights[threadIdx.x] = table_weight(table, batch, lynx_bin(p, to_float(logits[t * p.experts + e]), row_max[t]));
        __syncthreads();
        if (threadIdx.x == 0) {
            const int n = static_cast<int>(rows - base < kPopularityThreads ? rows - base : kPopularityThreads);
#pragma unroll 8
            for (int i = 0; i < n; ++i) pop = __fadd_rn(pop, weights[i]);
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) popularity[e] = pop;
}

// Each voting token picks the top-K of score = bin + (pop - w) / B; the union is allowed.
template <typename TA>
__global__ void lynx_pick(RoutingProblem p, const TA* logits, const float* row_max, const float* popularity, int* allowed) {
    if (!policy_runs(p)) return;
    const int64_t t = warp_token();
    if (t >= voting_rows(p)) return;
    const WarpRow row = warp_row(p.experts, p.top_k);
    const float batch = static_cast<float>(voting_rows(p));
    for (int e = threadIdx.x & 31; e < p.experts; e += 32) {
        const float logit = to_float(logits[t * p.experts + e]);
        const float bin = lynx_bin(p, logit, row_max[t]);
        const float weight = pow_rounded(batch, bin);
        row.values[e] = __fadd_rn(bin, __fdiv_rn(__fsub_rn(popularity[e], weight), batch));
        row.secondary[e] = logit;
    }
    __syncwarp();
    warp_topk(row.values, p.tie_break == 0 ? row.secondary : nullptr, p.experts, p.top_k, row.picked);
    for (int k = threadIdx.x & 31; k < p.top_k; k += 32) allowed[row.picked[k]] = 1;
}

// --- budget -----------------------------------------------------------------------------------

// votes[e] += 1 for each voting token whose plain top-K holds e (integer counts make the atomics
// order-independent); each row's softmax terms are kept for the mass sums.
template <typename TA>
__global__ void budget_vote(RoutingProblem p, const TA* logits, int* votes, SoftmaxTerms* terms) {
    if (!policy_runs(p)) return;
    const int64_t t = warp_token();
    if (t >= voting_rows(p)) return;
    const WarpRow row = warp_row(p.experts, p.top_k);
    load_logits(logits, t, p.experts, row.values);
    warp_topk(row.values, nullptr, p.experts, p.top_k, row.picked);
    for (int k = threadIdx.x & 31; k < p.top_k; k += 32) atomicAdd(&votes[row.picked[k]], 1);
    const SoftmaxTerms s = warp_softmax(row.values, p.experts);
    if ((threadIdx.x & 31) == 0) terms[t] = s;
}

// mass[e] = sum over voting rows, in order, of softmax(row)[e], recomputed from the row's terms.
template <typename TA>
__global__ void budget_mass(RoutingProblem p, const TA* logits, const SoftmaxTerms* terms, float* mass) {
    if (!policy_runs(p)) return;
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= p.experts) return;
    float sum = 0.0f;
    for (int64_t t = 0; t < voting_rows(p); ++t) sum = __fadd_rn(sum, softmax_prob(to_float(logits[t * p.experts + e]), terms[t]));
    mass[e] = sum;
}

// One warp keeps the `budget` experts with most votes (then most mass, then lowest index).
__global__ void budget_keep(RoutingProblem p, const int* votes, const float* mass, int* allowed) {
    if (!policy_runs(p)) return;
    extern __shared__ unsigned char smem[];
    float* counts = reinterpret_cast<float*>(smem);
    float* masses = counts + p.experts;
    int* picked = reinterpret_cast<int*>(masses + p.experts);
    for (int e = threadIdx.x; e < p.experts; e += 32) {
        counts[e] = static_cast<float>(votes[e]);  // exact: counts never exceed 2^24 in a decode batch
        masses[e] = mass[e];
    }
    __syncwarp();
    warp_topk(counts, masses, p.experts, p.budget, picked);
    for (int k = threadIdx.x; k < p.budget; k += 32) allowed[picked[k]] = 1;
}

// --- the model's router on the allowed experts -------------------------------------------------

template <typename TA>
__global__ void route_tokens(RoutingProblem p, const TA* logits, const int* allowed, int32_t* ids, float* weights) {
    const int64_t t = warp_token();
    if (t >= p.tokens) return;
    const int lane = threadIdx.x & 31;
    const WarpRow row = warp_row(p.experts, p.top_k);
    for (int e = lane; e < p.experts; e += 32) row.values[e] = allowed[e] ? to_float(logits[t * p.experts + e]) : -INFINITY;
    __syncwarp();
    const int k = p.top_k;
    if (p.router == 0) {  // softmax, top-K of the probabilities, optional renormalisation
        warp_softmax(row.values, p.experts);
        warp_topk(row.values, nullptr, p.experts, k, row.picked);
        if (lane == 0) {
            float total = 0.0f;
            for (int j = 0; j < k; ++j) total = __fadd_rn(total, row.values[row.picked[j]]);
            for (int j = 0; j < k; ++j) {
                const float w = row.values[row.picked[j]];
                ids[t * k + j] = row.picked[j];
                weights[t * k + j] = p.normalize ? (total > 0.0f ? __fdiv_rn(w, total) : 0.0f) : w;
            }
        }
    } else {  // top-K of the logits, softmax over the K picked
        warp_topk(row.values, nullptr, p.experts, k, row.picked);
        if (lane < k) row.secondary[lane] = row.values[row.picked[lane]];
        for (int j = lane + 32; j < k; j += 32) row.secondary[j] = row.values[row.picked[j]];
        __syncwarp();
        warp_softmax(row.secondary, k);
        for (int j = lane; j < k; j += 32) {
            ids[t * k + j] = row.picked[j];
            weights[t * k + j] = row.secondary[j];
        }
    }
}

}  // namespace lynx
