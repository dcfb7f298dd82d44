/*
 * LynxMoEPlugin.cpp: TensorRT 10 IPluginV3 adapter and creator for the LynxMoE core library.
 *
 * Loaded dynamically (trtexec --dynamicPlugins, IPluginRegistry::loadLibrary) through the
 * getCreators() entry point at the end of this file; no static registration.
 */
#include "LynxMoEPlugin.h"

#include "LynxMoEChecks.h"

#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>

using namespace nvinfer1;

namespace lynx
{
namespace
{

// Input slots, as in ../README.md and the contract table (lynx_export/op/contract.py). The
// quantized-only slots that follow NUM_VALID there are not plugin inputs: a node holding them has
// more than kNB_INPUTS inputs and is refused (quantized experts are not implemented yet).
// tests/test_contract.py checks this enum and the three field lists below against the table.
enum Slot : int32_t
{
    kHIDDEN = 0,
    kROUTER_LOGITS = 1,
    kFC1 = 2,
    kFC1_BIAS = 3,
    kFC2 = 4,
    kFC2_BIAS = 5,
    kSEQ_LEN = 6,
    kNUM_VALID = 7,
    kNB_INPUTS = 8,
};
constexpr int32_t kNB_OUTPUTS = 1;

// Each input's name and shape as the contract table writes them (tests/test_plugin_cpp.py
// compares these with lynx_export/op/contract.py): T is any token count, the leading dimensions of
// hidden; E, H, I are num_experts, hidden_size, expert_size.
constexpr char const* kInputNames[kNB_INPUTS]
    = {"hidden", "router_logits", "fc1", "fc1_bias", "fc2", "fc2_bias", "seq_len", "num_valid"};
constexpr char const* kInputShapes[kNB_INPUTS] = {"[T,H]", "[T,E]", "[E,2I,H]", "[E,2I]", "[E,H,I]", "[E,H]", "[]", "[]"};

struct Choice
{
    char const* name;
    int32_t value;
};

constexpr Choice kRouters[] = {{"softmax_topk", LYNX_ROUTER_SOFTMAX_TOPK}, {"topk_softmax", LYNX_ROUTER_TOPK_SOFTMAX}};
constexpr Choice kPolicies[] = {{"off", LYNX_POLICY_OFF}, {"lynx", LYNX_POLICY_LYNX}, {"budget", LYNX_POLICY_BUDGET}};
constexpr Choice kTieBreaks[] = {{"logit", LYNX_TIE_BREAK_LOGIT}, {"index", LYNX_TIE_BREAK_INDEX}};
constexpr char const* kActivation = "swiglu"; // the only expert activation the kernels implement

template <size_t N>
bool parseChoice(Choice const (&choices)[N], std::string const& text, int32_t& value)
{
    for (Choice const& c : choices)
    {
        if (text == c.name)
        {
            value = c.value;
            return true;
        }
    }
    return false;
}

template <size_t N>
char const* choiceName(Choice const (&choices)[N], int32_t value)
{
    for (Choice const& c : choices)
    {
        if (c.value == value)
        {
            return c.name;
        }
    }
    return "";
}

void logError(char const* what)
{
    std::fprintf(stderr, "[LynxMoE] %s\n", what);
}

void logFieldError(char const* field, char const* why)
{
    std::fprintf(stderr, "[LynxMoE] plugin field '%s': %s\n", field, why);
}

// The first input whose shape breaks the contract, as a message, or "" (dims(i) of input i).
// Never throws: the callers are noexcept.
template <typename GetDims>
std::string inputsProblem(lynx_moe_params_t const& params, GetDims dims) noexcept
{
    try
    {
        for (int32_t i = 0; i < kNB_INPUTS; ++i)
        {
            std::string why = shapeProblem(kInputNames[i], kInputShapes[i], dims(i), params, i == kHIDDEN ? nullptr : &dims(kHIDDEN));
            if (!why.empty())
            {
                return why;
            }
        }
        return "";
    }
    catch (std::exception const& e)
    {
        return std::string("checking the input shapes failed: ") + e.what();
    }
}

} // namespace

// ------------------------------------------------------------------------------------------------
// LynxMoEPlugin

LynxMoEPlugin::LynxMoEPlugin(lynx_moe_params_t const& params)
    : mParams(params)
    , mActivation(kActivation)
    , mRouter(choiceName(kRouters, params.router))
    , mPolicy(choiceName(kPolicies, params.policy))
    , mTieBreak(choiceName(kTieBreaks, params.tie_break))
{
}

IPluginCapability* LynxMoEPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* LynxMoEPlugin::clone() noexcept
{
    try
    {
        return new LynxMoEPlugin(*this);
    }
    catch (std::exception const& e)
    {
        logError(e.what());
    }
    return nullptr;
}

char const* LynxMoEPlugin::getPluginName() const noexcept
{
    return kPluginName;
}

char const* LynxMoEPlugin::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* LynxMoEPlugin::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

int32_t LynxMoEPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
    {
        logError("expects 8 inputs and 1 output (quantized experts are not implemented yet)");
        return -1;
    }
    // Catch a graph whose shapes disagree with the attributes (a transposed fc2 of a model with
    // H != I included) at build time rather than as a wrong result later; -1 marks a dimension
    // not known yet.
    std::string const problem = inputsProblem(mParams, [in](int32_t i) -> Dims const& { return in[i].desc.dims; });
    if (!problem.empty())
    {
        logError(problem.c_str());
        return -1;
    }
    if (!toLynxDtype(in[kHIDDEN].desc.type, mParams.activation_dtype)
        || !toLynxDtype(in[kFC1].desc.type, mParams.weight_dtype))
    {
        logError("unsupported activation or weight data type");
        return -1;
    }
    return 0;
}

int32_t LynxMoEPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbOutputs != kNB_OUTPUTS || nbInputs != kNB_INPUTS)
    {
        return -1;
    }
    outputTypes[0] = inputTypes[kHIDDEN];
    return 0;
}

int32_t LynxMoEPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& /*exprBuilder*/) noexcept
{
    if (nbOutputs != kNB_OUTPUTS || nbInputs != kNB_INPUTS)
    {
        return -1;
    }
    outputs[0] = inputs[kHIDDEN];
    return 0;
}

bool LynxMoEPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS || pos < 0 || pos >= nbInputs + nbOutputs)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    // Only positions below `pos` are settled when TensorRT asks, so each tensor is compared with
    // the first of its group: hidden for the activations, fc1 for the weights.
    switch (pos)
    {
    case kHIDDEN:
    case kFC1: return isFloatType(desc.type);
    case kROUTER_LOGITS: return desc.type == inOut[kHIDDEN].desc.type;
    case kFC1_BIAS:
    case kFC2:
    case kFC2_BIAS: return desc.type == inOut[kFC1].desc.type;
    case kSEQ_LEN:
    case kNUM_VALID: return desc.type == DataType::kINT64;
    default: return desc.type == inOut[kHIDDEN].desc.type; // the output
    }
}

int32_t LynxMoEPlugin::getNbOutputs() const noexcept
{
    return kNB_OUTPUTS;
}

size_t LynxMoEPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    if (nbInputs != kNB_INPUTS)
    {
        return 0;
    }
    // Size for the profile's largest batch, with the dtypes of this query (the method is const,
    // so it cannot rely on configurePlugin having stored them).
    lynx_moe_params_t params = mParams;
    toLynxDtype(inputs[kHIDDEN].desc.type, params.activation_dtype);
    toLynxDtype(inputs[kFC1].desc.type, params.weight_dtype);
    return lynx_moe_workspace_size(&params, leadingVolume(inputs[kHIDDEN].max));
}

int32_t LynxMoEPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
    {
        return -1;
    }
    if (!toLynxDtype(in[kHIDDEN].type, mParams.activation_dtype) || !toLynxDtype(in[kFC1].type, mParams.weight_dtype))
    {
        logError("unsupported activation or weight data type");
        return -1;
    }
    std::string const problem = inputsProblem(mParams, [in](int32_t i) -> Dims const& { return in[i].dims; });
    if (!problem.empty())
    {
        logError(problem.c_str());
        return -1;
    }
    return 0;
}

int32_t LynxMoEPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    int64_t const numTokens = leadingVolume(inputDesc[kHIDDEN].dims);
    if (numTokens == 0)
    {
        return 0; // an empty batch: nothing to write
    }

    lynx_moe_tensors_t tensors{};
    tensors.hidden = inputs[kHIDDEN];
    tensors.router_logits = inputs[kROUTER_LOGITS];
    tensors.fc1 = inputs[kFC1];
    tensors.fc1_bias = inputs[kFC1_BIAS];
    tensors.fc2 = inputs[kFC2];
    tensors.fc2_bias = inputs[kFC2_BIAS];
    tensors.seq_len = static_cast<int64_t const*>(inputs[kSEQ_LEN]);
    tensors.num_valid = static_cast<int64_t const*>(inputs[kNUM_VALID]);
    tensors.output = outputs[0];

    // enqueue is not told the workspace size. TensorRT allocated getWorkspaceSize() for the
    // profile's maximum, which covers any smaller batch, so the size for this batch is a safe bound.
    size_t const workspaceSize = lynx_moe_workspace_size(&mParams, numTokens);
    lynx_status_t const status = lynx_moe_enqueue(&mParams, numTokens, &tensors, workspace, workspaceSize, stream);
    if (status != LYNX_STATUS_OK)
    {
        std::fprintf(stderr, "[LynxMoE] enqueue failed: %s%s%s\n", lynx_moe_status_string(status),
            status == LYNX_STATUS_CUDA_ERROR ? ": " : "", status == LYNX_STATUS_CUDA_ERROR ? lynx_moe_last_error() : "");
        return -1;
    }
    return 0;
}

IPluginV3* LynxMoEPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    // No per-context resources: the workspace comes from TensorRT on every enqueue.
    return clone();
}

PluginFieldCollection const* LynxMoEPlugin::getFieldsToSerialize() noexcept
{
    try
    {
        mFields.clear();
        mFields.emplace_back("num_experts", &mParams.num_experts, PluginFieldType::kINT32, 1);
        mFields.emplace_back("top_k", &mParams.top_k, PluginFieldType::kINT32, 1);
        mFields.emplace_back("hidden_size", &mParams.hidden_size, PluginFieldType::kINT32, 1);
        mFields.emplace_back("expert_size", &mParams.expert_size, PluginFieldType::kINT32, 1);
        mFields.emplace_back("activation", mActivation.c_str(), PluginFieldType::kCHAR,
            static_cast<int32_t>(mActivation.size() + 1));
        mFields.emplace_back(
            "router", mRouter.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(mRouter.size() + 1));
        mFields.emplace_back("normalize", &mParams.normalize, PluginFieldType::kINT32, 1);
        mFields.emplace_back(
            "policy", mPolicy.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(mPolicy.size() + 1));
        mFields.emplace_back("alpha", &mParams.alpha, PluginFieldType::kFLOAT32, 1);
        mFields.emplace_back("beta", &mParams.beta, PluginFieldType::kINT32, 1);
        mFields.emplace_back("budget", &mParams.budget, PluginFieldType::kINT32, 1);
        mFields.emplace_back(
            "tie_break", mTieBreak.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(mTieBreak.size() + 1));
        mFields.emplace_back("activation_alpha", &mParams.activation_alpha, PluginFieldType::kFLOAT32, 1);
        mFields.emplace_back("activation_beta", &mParams.activation_beta, PluginFieldType::kFLOAT32, 1);
        mFields.emplace_back("swiglu_limit", &mParams.swiglu_limit, PluginFieldType::kFLOAT32, 1);
        mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
        mFieldCollection.fields = mFields.data();
        return &mFieldCollection;
    }
    catch (std::exception const& e)
    {
        logError(e.what());
    }
    return nullptr;
}

// ------------------------------------------------------------------------------------------------
// LynxMoEPluginCreator

LynxMoEPluginCreator::LynxMoEPluginCreator()
{
    mFields = {
        PluginField("num_experts", nullptr, PluginFieldType::kINT32, 1),
        PluginField("top_k", nullptr, PluginFieldType::kINT32, 1),
        PluginField("hidden_size", nullptr, PluginFieldType::kINT32, 1),
        PluginField("expert_size", nullptr, PluginFieldType::kINT32, 1),
        PluginField("activation", nullptr, PluginFieldType::kCHAR, 1),
        PluginField("router", nullptr, PluginFieldType::kCHAR, 1),
        PluginField("normalize", nullptr, PluginFieldType::kINT32, 1),
        PluginField("policy", nullptr, PluginFieldType::kCHAR, 1),
        PluginField("alpha", nullptr, PluginFieldType::kFLOAT32, 1),
        PluginField("beta", nullptr, PluginFieldType::kINT32, 1),
        PluginField("budget", nullptr, PluginFieldType::kINT32, 1),
        PluginField("tie_break", nullptr, PluginFieldType::kCHAR, 1),
        PluginField("activation_alpha", nullptr, PluginFieldType::kFLOAT32, 1),
        PluginField("activation_beta", nullptr, PluginFieldType::kFLOAT32, 1),
        PluginField("swiglu_limit", nullptr, PluginFieldType::kFLOAT32, 1),
    };
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

char const* LynxMoEPluginCreator::getPluginName() const noexcept
{
    return kPluginName;
}

char const* LynxMoEPluginCreator::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* LynxMoEPluginCreator::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

PluginFieldCollection const* LynxMoEPluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

IPluginV3* LynxMoEPluginCreator::createPlugin(
    char const* /*name*/, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    // The build phase gets the node's attributes and the runtime phase gets what
    // getFieldsToSerialize() wrote: the same fields, so one parser serves both.
    try
    {
        if (fc == nullptr || (fc->nbFields > 0 && fc->fields == nullptr))
        {
            logError("createPlugin: no plugin fields");
            return nullptr;
        }

        // Fields the exporter always writes; the defaults only matter for hand-built networks.
        lynx_moe_params_t params{};
        params.router = LYNX_ROUTER_SOFTMAX_TOPK;
        params.policy = LYNX_POLICY_OFF;
        params.beta = -1;
        params.tie_break = LYNX_TIE_BREAK_LOGIT;
        // SwiGLU parameters are absent from nodes of plain SwiGLU models (and swiglu_limit whenever
        // there is no clamp).
        params.activation_alpha = 1.0F;
        params.activation_beta = 0.0F;
        params.swiglu_limit = std::numeric_limits<float>::infinity();
        std::string activation = kActivation;

        for (int32_t i = 0; i < fc->nbFields; ++i)
        {
            PluginField const& f = fc->fields[i];
            if (f.name == nullptr)
            {
                continue;
            }
            std::string const name = f.name;
            std::string text;
            bool ok = true;
            if (name == "num_experts") ok = readInt(f, params.num_experts);
            else if (name == "top_k") ok = readInt(f, params.top_k);
            else if (name == "hidden_size") ok = readInt(f, params.hidden_size);
            else if (name == "expert_size") ok = readInt(f, params.expert_size);
            else if (name == "activation") ok = readString(f, activation);
            else if (name == "router") ok = readString(f, text) && parseChoice(kRouters, text, params.router);
            else if (name == "normalize") ok = readInt(f, params.normalize);
            else if (name == "policy") ok = readString(f, text) && parseChoice(kPolicies, text, params.policy);
            else if (name == "alpha") ok = readFloat(f, params.alpha);
            else if (name == "beta") ok = readInt(f, params.beta);
            else if (name == "budget") ok = readInt(f, params.budget);
            else if (name == "tie_break") ok = readString(f, text) && parseChoice(kTieBreaks, text, params.tie_break);
            else if (name == "activation_alpha") ok = readFloat(f, params.activation_alpha);
            else if (name == "activation_beta") ok = readFloat(f, params.activation_beta);
            else if (name == "swiglu_limit") ok = readFloat(f, params.swiglu_limit);
            else
            {
                // Tolerated so that an attribute added by a newer exporter does not break this build.
                std::fprintf(stderr, "[LynxMoE] ignoring unknown plugin field '%s'\n", f.name);
            }
            if (!ok)
            {
                std::string const why = text.empty() ? std::string("missing data or wrong type")
                                                     : "unknown value '" + text + "'";
                logFieldError(f.name, why.c_str());
                return nullptr;
            }
        }

        if (activation != kActivation)
        {
            logFieldError("activation", ("unsupported value '" + activation + "' (only 'swiglu')").c_str());
            return nullptr;
        }
        // The dtypes are not known until configurePlugin/onShapeChange; any valid value lets the
        // check judge the attributes alone.
        params.activation_dtype = LYNX_DTYPE_FLOAT32;
        params.weight_dtype = LYNX_DTYPE_FLOAT32;
        lynx_status_t const status = lynx_moe_check_params(&params);
        if (status != LYNX_STATUS_OK)
        {
            std::fprintf(stderr,
                "[LynxMoE] invalid plugin fields (num_experts=%d top_k=%d hidden_size=%d expert_size=%d "
                "normalize=%d alpha=%g beta=%d budget=%d): %s\n",
                params.num_experts, params.top_k, params.hidden_size, params.expert_size, params.normalize,
                static_cast<double>(params.alpha), params.beta, params.budget, lynx_moe_status_string(status));
            return nullptr;
        }
        return new LynxMoEPlugin(params);
    }
    catch (std::exception const& e)
    {
        logError(e.what());
    }
    return nullptr;
}

} // namespace lynx

// ------------------------------------------------------------------------------------------------
// Library entry points looked up by IPluginRegistry::loadLibrary (and so trtexec --dynamicPlugins).
// TensorRT's TENSORRTAPI is empty outside its own build, hence an explicit export attribute.
#define LYNX_TRT_EXPORT __attribute__((visibility("default")))

extern "C" LYNX_TRT_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* /*finder*/)
{
    // Errors go to stderr; TensorRT's logger is not needed.
}

extern "C" LYNX_TRT_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static lynx::LynxMoEPluginCreator creator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}
