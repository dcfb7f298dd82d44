/*
 * lynx_moe.h: the LynxMoE core library's C API.
 *
 * The core library holds the CUDA kernels of one LynxMoE layer (routing with batch-aware expert
 * selection, token permutation by expert, the expert FFNs and the weighted combine) behind this
 * small C interface. It depends on the CUDA runtime only: the TensorRT adapter (trt/), the
 * Python plugin (lynx_export/backends/trt_plugin.py, through ctypes) and the GPU check script
 * all call these functions. The op's contract is in ../README.md and, as data, in
 * lynx_export/op/contract.py, against which tests/test_contract.py checks the structs and enums
 * below; the numpy routing oracle (lynx_export/routing/) and the op's numpy reference
 * (lynx_export/op/reference.py) are what the kernels are tested against. Quantized expert
 * weights (the contract's weight_bits and its scale / zero-point inputs) are not implemented here.
 *
 * Every function is asynchronous on `stream` (a cudaStream_t passed as void*, so this header
 * needs no CUDA include) and never synchronises: the phase flag and the number of valid rows are
 * read on the device.
 */
#ifndef LYNX_MOE_H
#define LYNX_MOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LYNX_MOE_API_VERSION 3

typedef enum { LYNX_DTYPE_FLOAT32 = 0, LYNX_DTYPE_FLOAT16 = 1, LYNX_DTYPE_BFLOAT16 = 2 } lynx_dtype_t;

/* How router logits become K expert ids and weights per token (the `router` attribute). */
typedef enum { LYNX_ROUTER_SOFTMAX_TOPK = 0, LYNX_ROUTER_TOPK_SOFTMAX = 1 } lynx_router_t;

typedef enum { LYNX_POLICY_OFF = 0, LYNX_POLICY_LYNX = 1, LYNX_POLICY_BUDGET = 2 } lynx_policy_t;

typedef enum { LYNX_TIE_BREAK_LOGIT = 0, LYNX_TIE_BREAK_INDEX = 1 } lynx_tie_break_t;

typedef enum {
    LYNX_STATUS_OK = 0,
    LYNX_STATUS_INVALID_ARGUMENT = 1, /* a parameter or pointer breaks the contract */
    LYNX_STATUS_WORKSPACE_TOO_SMALL = 2,
    LYNX_STATUS_CUDA_ERROR = 3 /* a launch failed; lynx_moe_last_error() names the CUDA error */
} lynx_status_t;

/* Kernel variants (the `kernels` parameter, bit flags). 0, the default, runs the first kernels
 * of each step; each flag swaps one step for a faster variant that computes the same result
 * (the routing variants bit for bit, the expert variants within the dtype's tolerance). The
 * variants stay off by default until a GPU run has verified them (docs/GPU.md). */
typedef enum {
    LYNX_KERNELS_DEFAULT = 0,
    LYNX_KERNEL_PARALLEL_SCAN = 1,      /* expert offsets by a block-wide scan, not one thread */
    LYNX_KERNEL_POPULARITY_TABLE = 2,   /* lynx popularity: a block per expert, pow from a table */
    LYNX_KERNEL_GEMV_ONE_PASS = 4,      /* 9..32 rows: one pass over the weights, not one per 8 rows */
    LYNX_KERNEL_TENSOR_CORE_GEMM = 8,   /* > 32 rows, fp16/bf16 weights: WMMA tensor-core tiles */
    LYNX_KERNELS_ALL = 15
} lynx_kernels_t;

/* One layer's attributes (the LynxMoE node's, as integers) and the tensors' element types. */
typedef struct {
    int32_t num_experts; /* E, 1..LYNX_MOE_MAX_EXPERTS */
    int32_t top_k;       /* K, 1..min(E, LYNX_MOE_MAX_TOP_K) */
    int32_t hidden_size; /* H */
    int32_t expert_size; /* I */
    int32_t router;      /* lynx_router_t */
    int32_t normalize;   /* 1: softmax_topk weights renormalised to sum 1 */
    int32_t policy;      /* lynx_policy_t */
    float alpha;         /* lynx: bin resolution, > 0 */
    int32_t beta;        /* lynx: bin floor, -1 for none */
    int32_t budget;      /* budget: experts kept, K..E */
    int32_t tie_break;   /* lynx_tie_break_t */
    int32_t activation_dtype; /* lynx_dtype_t of hidden, router_logits and output */
    int32_t weight_dtype;     /* lynx_dtype_t of fc1, fc1_bias, fc2, fc2_bias */
    /* SwiGLU: gate * sigmoid(alpha * gate) * (up + beta), gate clamped to <= limit and up to
     * [-limit, limit]; plain SwiGLU is alpha 1, beta 0, limit +INFINITY. */
    float activation_alpha;
    float activation_beta;
    float swiglu_limit;
    int32_t kernels; /* lynx_kernels_t flags; 0 for the default kernels */
} lynx_moe_params_t;

#define LYNX_MOE_MAX_EXPERTS 1024
#define LYNX_MOE_MAX_TOP_K 32

/* Device pointers of one call. Layouts are dense row-major, as in ../README.md. */
typedef struct {
    const void* hidden;        /* [T,H]   activation dtype */
    const void* router_logits; /* [T,E]   activation dtype */
    const void* fc1;           /* [E,2I,H] weight dtype; row 2i = gate_i, row 2i+1 = up_i */
    const void* fc1_bias;      /* [E,2I]  weight dtype, or NULL */
    const void* fc2;           /* [E,H,I] weight dtype */
    const void* fc2_bias;      /* [E,H]   weight dtype, or NULL */
    const int64_t* seq_len;    /* scalar; the policy runs only when it is 1. NULL: always decode */
    const int64_t* num_valid;  /* scalar; rows >= it do not vote. NULL (or >= T): all rows vote */
    void* output;              /* [T,H]   activation dtype */
} lynx_moe_tensors_t;

/* Where the routing of the last call can be read back (device pointers inside the workspace). */
typedef struct {
    const int32_t* ids;      /* [T,K] expert ids, by descending weight */
    const float* weights;    /* [T,K] gate weights */
    const int32_t* allowed;  /* [E] 1 where the policy allowed the expert in this call */
    const int32_t* counts;   /* [E] (token, choice) pairs routed to each expert; filled by
                                lynx_moe_enqueue only (lynx_moe_route stops before the permutation) */
} lynx_moe_routing_t;

int32_t lynx_moe_api_version(void);
const char* lynx_moe_status_string(lynx_status_t status);

/* The CUDA error behind this thread's last LYNX_STATUS_CUDA_ERROR ("name: description"), or "". */
const char* lynx_moe_last_error(void);

/* LYNX_STATUS_OK, or LYNX_STATUS_INVALID_ARGUMENT for parameters outside the contract. */
lynx_status_t lynx_moe_check_params(const lynx_moe_params_t* params);

/* Bytes of device workspace a call with up to `max_tokens` tokens needs (0 for bad params). */
size_t lynx_moe_workspace_size(const lynx_moe_params_t* params, int64_t max_tokens);

/* Run the layer on `num_tokens` tokens: output = sum_k w[t,k] * FFN_{ids[t,k]}(hidden[t]).
 * Experts that receive no token read no weights. A CUDA error pending from earlier work in this
 * thread that is not sticky is cleared on entry, so it is neither reported as this call's nor
 * repeated by every later call; an error of this call's own launches is returned once
 * (LYNX_STATUS_CUDA_ERROR) and cleared. */
lynx_status_t lynx_moe_enqueue(const lynx_moe_params_t* params, int64_t num_tokens, const lynx_moe_tensors_t* tensors,
                               void* workspace, size_t workspace_size, void* stream);

/* Routing only (policy, masking, the model's router); fills `routing` with pointers into the
 * workspace. The expert FFNs are not run. hidden, fc*, output in `tensors` may be NULL. */
lynx_status_t lynx_moe_route(const lynx_moe_params_t* params, int64_t num_tokens, const lynx_moe_tensors_t* tensors,
                             void* workspace, size_t workspace_size, void* stream, lynx_moe_routing_t* routing);

#ifdef __cplusplus
}
#endif

#endif /* LYNX_MOE_H */
