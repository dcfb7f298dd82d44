// The core library's C API (include/lynx_moe.h): parameter checks, the workspace layout, and the
// launch sequence routing -> permutation -> expert FFNs -> combine, and its error handling.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "expert_ffn.cuh"
#include "lynx_moe.h"
#include "permute.cuh"
#include "routing.cuh"
#include "tensor_core_gemm.cuh"

namespace lynx {
namespace {

constexpr size_t kAlign = 256;

// "name: description" of the CUDA error behind this thread's last LYNX_STATUS_CUDA_ERROR.
thread_local char last_error[256] = "";

lynx_status_t cuda_failure(cudaError_t error) {
    std::snprintf(last_error, sizeof last_error, "%s: %s", cudaGetErrorName(error), cudaGetErrorString(error));
    return LYNX_STATUS_CUDA_ERROR;
}

size_t aligned(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// Every buffer of one call, carved from the caller's workspace in this order.
struct Workspace {
    int32_t* ids;          // [T,K]
    float* weights;        // [T,K]
    int* allowed;          // [E]
    int* counts;           // [E] rows per expert
    int* offsets;          // [E+1]
    int* votes;            // [E] budget
    float* popularity;     // [E] lynx popularity, budget mass
    float* row_max;        // [T] lynx
    SoftmaxTerms* terms;   // [T] budget
    int32_t* slot_of;      // [T,K] permuted row of each (token, choice)
    int32_t* row_token;    // [T,K] token of each permuted row
    float* act;            // [T*K, I] silu(gate) * up
    float* rows;           // [T*K, H] expert outputs before the combine
    size_t bytes;
};

Workspace layout(const lynx_moe_params_t& p, int64_t tokens, unsigned char* base) {
    const size_t t = static_cast<size_t>(std::max<int64_t>(tokens, 1)), e = p.num_experts, pairs = t * p.top_k;
    Workspace w{};
    size_t at = 0;
    auto take = [&](size_t bytes) {
        unsigned char* ptr = base ? base + at : nullptr;
        at += aligned(bytes);
        return ptr;
    };
    w.ids = reinterpret_cast<int32_t*>(take(pairs * sizeof(int32_t)));
    w.weights = reinterpret_cast<float*>(take(pairs * sizeof(float)));
    w.allowed = reinterpret_cast<int*>(take(e * sizeof(int)));
    w.counts = reinterpret_cast<int*>(take(e * sizeof(int)));
    w.offsets = reinterpret_cast<int*>(take((e + 1) * sizeof(int)));
    w.votes = reinterpret_cast<int*>(take(e * sizeof(int)));
    w.popularity = reinterpret_cast<float*>(take(e * sizeof(float)));
    w.row_max = reinterpret_cast<float*>(take(t * sizeof(float)));
    w.terms = reinterpret_cast<SoftmaxTerms*>(take(t * sizeof(SoftmaxTerms)));
    w.slot_of = reinterpret_cast<int32_t*>(take(pairs * sizeof(int32_t)));
    w.row_token = reinterpret_cast<int32_t*>(take(pairs * sizeof(int32_t)));
    w.act = reinterpret_cast<float*>(take(pairs * static_cast<size_t>(p.expert_size) * sizeof(float)));
    w.rows = reinterpret_cast<float*>(take(pairs * static_cast<size_t>(p.hidden_size) * sizeof(float)));
    w.bytes = at;
    return w;
}

RoutingProblem routing_problem(const lynx_moe_params_t& p, int64_t tokens, const lynx_moe_tensors_t& x) {
    return {tokens, p.num_experts, p.top_k, p.router, p.normalize, p.policy, p.alpha, p.beta, p.budget, p.tie_break, x.seq_len, x.num_valid};
}

unsigned blocks_for(int64_t items, int per_block) { return static_cast<unsigned>((items + per_block - 1) / per_block); }

template <typename TA>
void launch_routing(const lynx_moe_params_t& p, int64_t tokens, const lynx_moe_tensors_t& x, const Workspace& w, cudaStream_t stream) {
    const RoutingProblem problem = routing_problem(p, tokens, x);
    const TA* logits = static_cast<const TA*>(x.router_logits);
    const unsigned token_blocks = blocks_for(tokens, kRouteWarps);
    const size_t smem = route_smem_bytes(p.num_experts, p.top_k);
    const unsigned expert_blocks = blocks_for(p.num_experts, 128);
    init_selection<<<1, 256, 0, stream>>>(problem, w.allowed, w.votes);
    if (p.policy == LYNX_POLICY_LYNX) {
        lynx_row_max<TA><<<token_blocks, kRouteWarps * 32, 0, stream>>>(problem, logits, w.row_max);
        if (p.kernels & LYNX_KERNEL_POPULARITY_TABLE)
            lynx_popularity_table<TA><<<p.num_experts, kPopularityThreads, 0, stream>>>(problem, logits, w.row_max, w.popularity);
        else
            lynx_popularity<TA><<<expert_blocks, 128, 0, stream>>>(problem, logits, w.row_max, w.popularity);
        lynx_pick<TA><<<token_blocks, kRouteWarps * 32, smem, stream>>>(problem, logits, w.row_max, w.popularity, w.allowed);
    } else if (p.policy == LYNX_POLICY_BUDGET) {
        budget_vote<TA><<<token_blocks, kRouteWarps * 32, smem, stream>>>(problem, logits, w.votes, w.terms);
        budget_mass<TA><<<expert_blocks, 128, 0, stream>>>(problem, logits, w.terms, w.popularity);
        const size_t keep_smem = 2 * p.num_experts * sizeof(float) + p.budget * sizeof(int);
        budget_keep<<<1, 32, keep_smem, stream>>>(problem, w.votes, w.popularity, w.allowed);
    }
    route_tokens<TA><<<token_blocks, kRouteWarps * 32, smem, stream>>>(problem, logits, w.allowed, w.ids, w.weights);
}

template <typename TW>
constexpr int vector_width() { return static_cast<int>(16 / sizeof(TW)); }

// One projection over the permuted rows: every kernel that may own an expert is launched, and each
// takes the experts whose row count (read on the device) falls in its range.
//   default: expert_gemv for 1..32 rows (8 rows per pass over the weights), expert_gemm above;
//   LYNX_KERNEL_GEMV_ONE_PASS (fp16/bf16 weights that vectorise): expert_gemv for 1..8 rows,
//     expert_gemv_one_pass for 9..16 and 17..32, each one pass; kernels no expert can reach (an
//     expert has at most `pairs` rows) are not launched;
//   LYNX_KERNEL_TENSOR_CORE_GEMM (fp16/bf16 weights): expert_gemm_tc instead of expert_gemm.
// 16-byte vector loads need the depth to be a multiple of the vector and the base pointer to be
// 16-byte aligned (a caller's tensor may be a view at any element offset): otherwise VEC is 1.
template <Epilogue EPI, typename TIn, typename TW>
void launch_projection(Rows<TIn> in, Projection<TW> proj, int experts, int64_t pairs, int kernels, const Workspace& w, float* out,
                       cudaStream_t stream) {
    constexpr int VEC = vector_width<TW>();
    const bool vec = proj.depth % VEC == 0 && aligned16(proj.weight);
    // Input rows as 8-element vectors: aligned base, rows a whole number of 16-byte units apart.
    const bool rows_vec = aligned16(in.data) && (in.stride * static_cast<int64_t>(sizeof(TIn))) % 16 == 0;
    // The new variants exist for 16-bit weights only (fp32 weights keep the default kernels): half
    // the instantiations, and compile time, of every dtype pair.
    constexpr bool kHalfWeights = sizeof(TW) == 2;
    const bool one_pass = kHalfWeights && (kernels & LYNX_KERNEL_GEMV_ONE_PASS) && vec;
    const dim3 gemv_grid(blocks_for(proj.outputs, 2 * kGemvWarps), experts);
    if (vec) {
        Rows<TIn> gemv_in = in;
        gemv_in.vec = one_pass && rows_vec;
        expert_gemv<EPI, VEC><<<gemv_grid, kGemvWarps * 32, 0, stream>>>(gemv_in, proj, w.counts, w.offsets, out,
                                                                          one_pass ? kGemvTile : kGemvMaxRows);
        if constexpr (kHalfWeights) {
            if (one_pass && pairs > kGemvTile)
                expert_gemv_one_pass<EPI, VEC, 16><<<gemv_grid, kGemvWarps * 32, 0, stream>>>(gemv_in, proj, w.counts, w.offsets, out);
            if (one_pass && pairs > 16)
                expert_gemv_one_pass<EPI, VEC, 32><<<gemv_grid, kGemvWarps * 32, 0, stream>>>(gemv_in, proj, w.counts, w.offsets, out);
        }
    } else {
        expert_gemv<EPI, 1><<<gemv_grid, kGemvWarps * 32, 0, stream>>>(in, proj, w.counts, w.offsets, out, kGemvMaxRows);
    }
    // Only experts with more than kGemvMaxRows rows run here; pairs bounds how many tiles any can have.
    if (pairs <= kGemvMaxRows) return;
    if constexpr (kHalfWeights) {
        if (kernels & LYNX_KERNEL_TENSOR_CORE_GEMM) {
            Rows<TIn> tc_in = in;
            tc_in.vec = rows_vec;
            Projection<TW> tc_proj = proj;
            tc_proj.vec = proj.depth % 8 == 0 && aligned16(proj.weight);
            const unsigned row_tiles = std::min<unsigned>(blocks_for(pairs, kTcRows), 32);
            const dim3 grid(blocks_for(proj.outputs, kTcCols), experts, row_tiles);
            expert_gemm_tc<EPI><<<grid, kTcThreads, 0, stream>>>(tc_in, tc_proj, w.counts, w.offsets, out);
            return;
        }
    }
    const unsigned row_tiles = std::min<unsigned>(blocks_for(pairs, kTileRows), 32);
    const dim3 gemm_grid(blocks_for(proj.outputs, kTileCols), experts, row_tiles);
    expert_gemm<EPI><<<gemm_grid, 256, 0, stream>>>(in, proj, w.counts, w.offsets, out);
}

template <typename TA, typename TW>
cudaError_t launch_experts(const lynx_moe_params_t& p, int64_t tokens, const lynx_moe_tensors_t& x, const Workspace& w, cudaStream_t stream) {
    const int64_t pairs = tokens * p.top_k;
    const int experts = p.num_experts, hidden = p.hidden_size, inner = p.expert_size;
    const unsigned pair_blocks = blocks_for(pairs, 256);
    const cudaError_t cleared = cudaMemsetAsync(w.counts, 0, experts * sizeof(int), stream);
    if (cleared != cudaSuccess) return cleared;
    count_pairs<<<pair_blocks, 256, 0, stream>>>(pairs, w.ids, w.counts, w.slot_of);
    if (p.kernels & LYNX_KERNEL_PARALLEL_SCAN)
        scan_counts_parallel<<<1, (experts + 31) / 32 * 32, 0, stream>>>(experts, w.counts, w.offsets);
    else
        scan_counts<<<1, 32, 0, stream>>>(experts, w.counts, w.offsets);
    place_pairs<<<pair_blocks, 256, 0, stream>>>(pairs, p.top_k, w.ids, w.offsets, w.slot_of, w.row_token);

    const Rows<TA> tokens_in{static_cast<const TA*>(x.hidden), w.row_token, hidden};
    const SwiGLU act{p.activation_alpha, p.activation_beta, p.swiglu_limit};
    const Projection<TW> fc1{static_cast<const TW*>(x.fc1), static_cast<const TW*>(x.fc1_bias), 2 * inner, hidden, act};
    launch_projection<Epilogue::kSwiGLU>(tokens_in, fc1, experts, pairs, p.kernels, w, w.act, stream);

    const Rows<float> act_in{w.act, nullptr, inner};
    const Projection<TW> fc2{static_cast<const TW*>(x.fc2), static_cast<const TW*>(x.fc2_bias), hidden, inner, act};
    launch_projection<Epilogue::kBias>(act_in, fc2, experts, pairs, p.kernels, w, w.rows, stream);

    combine<TA><<<blocks_for(tokens * hidden, 256), 256, 0, stream>>>(tokens, hidden, p.top_k, w.weights, w.slot_of, w.rows,
                                                                        static_cast<TA*>(x.output));
    return cudaSuccess;
}

template <typename F>
void with_dtype(int32_t dtype, F&& f) {
    switch (dtype) {
        case LYNX_DTYPE_FLOAT16: f(__half{}); break;
        case LYNX_DTYPE_BFLOAT16: f(__nv_bfloat16{}); break;
        default: f(float{}); break;
    }
}

lynx_status_t run(const lynx_moe_params_t* params, int64_t tokens, const lynx_moe_tensors_t* tensors, void* workspace,
                  size_t workspace_size, void* stream_handle, bool experts, lynx_moe_routing_t* routing) {
    if (lynx_moe_check_params(params) != LYNX_STATUS_OK || tensors == nullptr || tokens < 0 || tokens > INT32_MAX / params->top_k)
        return LYNX_STATUS_INVALID_ARGUMENT;
    const lynx_moe_params_t& p = *params;
    const lynx_moe_tensors_t& x = *tensors;
    if (tokens > 0 && x.router_logits == nullptr) return LYNX_STATUS_INVALID_ARGUMENT;
    if (experts && tokens > 0 && (x.hidden == nullptr || x.fc1 == nullptr || x.fc2 == nullptr || x.output == nullptr))
        return LYNX_STATUS_INVALID_ARGUMENT;
    const Workspace w = layout(p, tokens, static_cast<unsigned char*>(workspace));
    if (workspace == nullptr || workspace_size < w.bytes) return LYNX_STATUS_WORKSPACE_TOO_SMALL;
    if (routing) *routing = {w.ids, w.weights, w.allowed, w.counts};
    if (tokens == 0) return LYNX_STATUS_OK;
    cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
    // A launch reports a bad configuration only through the thread's last-error slot, which keeps
    // an earlier error until someone reads it. Clear what was pending before this call (another
    // library's, or ours already returned), so that it is not taken for this call's (a sticky error
    // comes back from every launch anyway), then read the slot once after the launches.
    (void)cudaGetLastError();
    cudaError_t error = cudaSuccess;
    with_dtype(p.activation_dtype, [&](auto act) {
        using TA = decltype(act);
        launch_routing<TA>(p, tokens, x, w, stream);
        if (!experts) return;
        with_dtype(p.weight_dtype, [&](auto weight) { error = launch_experts<TA, decltype(weight)>(p, tokens, x, w, stream); });
    });
    const cudaError_t launched = cudaGetLastError();
    if (error == cudaSuccess) error = launched;
    return error == cudaSuccess ? LYNX_STATUS_OK : cuda_failure(error);
}

}  // namespace
}  // namespace lynx

extern "C" {

int32_t lynx_moe_api_version(void) { return LYNX_MOE_API_VERSION; }

const char* lynx_moe_last_error(void) { return lynx::last_error; }

const char* lynx_moe_status_string(lynx_status_t status) {
    switch (status) {
        case LYNX_STATUS_OK: return "ok";
        case LYNX_STATUS_INVALID_ARGUMENT: return "invalid argument";
        case LYNX_STATUS_WORKSPACE_TOO_SMALL: return "workspace too small";
        case LYNX_STATUS_CUDA_ERROR: return "CUDA error";
    }
    return "unknown status";
}

lynx_status_t lynx_moe_check_params(const lynx_moe_params_t* p) {
    if (p == nullptr) return LYNX_STATUS_INVALID_ARGUMENT;
    const bool shape_ok = p->num_experts >= 1 && p->num_experts <= LYNX_MOE_MAX_EXPERTS && p->top_k >= 1 &&
                          p->top_k <= std::min(p->num_experts, LYNX_MOE_MAX_TOP_K) && p->hidden_size >= 1 && p->expert_size >= 1;
    const bool router_ok = p->router == LYNX_ROUTER_SOFTMAX_TOPK || p->router == LYNX_ROUTER_TOPK_SOFTMAX;
    bool policy_ok = false;
    switch (p->policy) {
        case LYNX_POLICY_OFF: policy_ok = true; break;
        case LYNX_POLICY_LYNX:
            policy_ok = p->alpha > 0.0f && p->alpha <= FLT_MAX && p->beta >= -1 &&
                        (p->tie_break == LYNX_TIE_BREAK_LOGIT || p->tie_break == LYNX_TIE_BREAK_INDEX);
            break;
        case LYNX_POLICY_BUDGET: policy_ok = p->budget >= p->top_k && p->budget <= p->num_experts; break;
    }
    const bool activation_ok = std::isfinite(p->activation_alpha) && std::isfinite(p->activation_beta) && p->swiglu_limit > 0.0f;
    const bool kernels_ok = (p->kernels & ~LYNX_KERNELS_ALL) == 0;
    const auto dtype_ok = [](int32_t d) { return d == LYNX_DTYPE_FLOAT32 || d == LYNX_DTYPE_FLOAT16 || d == LYNX_DTYPE_BFLOAT16; };
    return shape_ok && router_ok && policy_ok && activation_ok && kernels_ok && dtype_ok(p->activation_dtype) && dtype_ok(p->weight_dtype)
               ? LYNX_STATUS_OK
               : LYNX_STATUS_INVALID_ARGUMENT;
}

size_t lynx_moe_workspace_size(const lynx_moe_params_t* params, int64_t max_tokens) {
    if (lynx_moe_check_params(params) != LYNX_STATUS_OK || max_tokens < 0) return 0;
    return lynx::layout(*params, max_tokens, nullptr).bytes;
}

lynx_status_t lynx_moe_enqueue(const lynx_moe_params_t* params, int64_t num_tokens, const lynx_moe_tensors_t* tensors, void* workspace,
                               size_t workspace_size, void* stream) {
    return lynx::run(params, num_tokens, tensors, workspace, workspace_size, stream, true, nullptr);
}

lynx_status_t lynx_moe_route(const lynx_moe_params_t* params, int64_t num_tokens, const lynx_moe_tensors_t* tensors, void* workspace,
                             size_t workspace_size, void* stream, lynx_moe_routing_t* routing) {
    return lynx::run(params, num_tokens, tensors, workspace, workspace_size, stream, false, routing);
}

}  // extern "C"
