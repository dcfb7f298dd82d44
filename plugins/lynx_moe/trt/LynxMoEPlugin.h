/*
 * LynxMoEPlugin.h: the TensorRT 10 IPluginV3 adapter over the LynxMoE core library (lynx_moe.h).
 *
 * All the work happens in the core library; this layer only maps TensorRT's descriptors, types and
 * plugin fields onto lynx_moe_params_t / lynx_moe_tensors_t. The op's contract is in ../README.md.
 */
#ifndef LYNX_MOE_TRT_PLUGIN_H
#define LYNX_MOE_TRT_PLUGIN_H

#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <vector>

#include "lynx_moe.h"

namespace lynx
{

constexpr char const* kPluginName = "LynxMoE";
constexpr char const* kPluginNamespace = "lynx";
constexpr char const* kPluginVersion = "1";

class LynxMoEPlugin final : public nvinfer1::IPluginV3,
                            public nvinfer1::IPluginV3OneCore,
                            public nvinfer1::IPluginV3OneBuild,
                            public nvinfer1::IPluginV3OneRuntime
{
public:
    // `params` must already have passed lynx_moe_check_params (the creator does that).
    explicit LynxMoEPlugin(lynx_moe_params_t const& params);
    LynxMoEPlugin(LynxMoEPlugin const& other) = default;
    ~LynxMoEPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild (getValidTactics/getNbTactics keep their defaults: no custom tactics)
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    lynx_moe_params_t mParams;

    // Backing storage of getFieldsToSerialize(). The fields point into this object (mParams and
    // these strings), so they are rebuilt on every call rather than copied with the object.
    std::string mActivation;
    std::string mRouter;
    std::string mPolicy;
    std::string mTieBreak;
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

class LynxMoEPluginCreator final : public nvinfer1::IPluginCreatorV3One
{
public:
    LynxMoEPluginCreator();
    ~LynxMoEPluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

} // namespace lynx

#endif // LYNX_MOE_TRT_PLUGIN_H
