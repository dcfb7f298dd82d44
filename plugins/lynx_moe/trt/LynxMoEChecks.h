/*
 * LynxMoEChecks.h: what the C++ adapter reads from TensorRT and checks before it trusts it: plugin
 * field values, data types, and input shapes against the contract's shape strings ("[E,2I,H]").
 * Header-only and TensorRT-headers-only, so plugins/lynx_moe/test/plugin_host_test.cpp tests it on
 * a machine with no GPU and no TensorRT library.
 */
#ifndef LYNX_MOE_TRT_CHECKS_H
#define LYNX_MOE_TRT_CHECKS_H

#include <NvInferRuntime.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "lynx_moe.h"

namespace lynx
{

inline bool readInt(nvinfer1::PluginField const& f, int32_t& out)
{
    if (f.type != nvinfer1::PluginFieldType::kINT32 || f.data == nullptr || f.length < 1)
    {
        return false;
    }
    out = *static_cast<int32_t const*>(f.data);
    return true;
}

inline bool readFloat(nvinfer1::PluginField const& f, float& out)
{
    if (f.type != nvinfer1::PluginFieldType::kFLOAT32 || f.data == nullptr || f.length < 1)
    {
        return false;
    }
    out = *static_cast<float const*>(f.data);
    return true;
}

// A CHAR field holds `length` bytes. Producers disagree on whether `length` counts a terminator
// (the ONNX parser passes the string size, getFieldsToSerialize the size plus its NUL), so the
// value ends at the first NUL or after `length` bytes, whichever comes first: nothing past
// `length` is ever read (a field claiming 1 byte for a longer string reads as its first byte).
inline bool readString(nvinfer1::PluginField const& f, std::string& out)
{
    if (f.type != nvinfer1::PluginFieldType::kCHAR || f.data == nullptr || f.length < 0)
    {
        return false;
    }
    char const* text = static_cast<char const*>(f.data);
    size_t const length = static_cast<size_t>(f.length);
    void const* nul = std::memchr(text, '\0', length);
    out.assign(text, nul ? static_cast<size_t>(static_cast<char const*>(nul) - text) : length);
    return true;
}

inline bool toLynxDtype(nvinfer1::DataType type, int32_t& out)
{
    switch (type)
    {
    case nvinfer1::DataType::kFLOAT: out = LYNX_DTYPE_FLOAT32; return true;
    case nvinfer1::DataType::kHALF: out = LYNX_DTYPE_FLOAT16; return true;
    case nvinfer1::DataType::kBF16: out = LYNX_DTYPE_BFLOAT16; return true;
    default: return false;
    }
}

inline bool isFloatType(nvinfer1::DataType type)
{
    int32_t unused = 0;
    return toLynxDtype(type, unused);
}

// Tokens are every dimension but the last, so [T,H] and [B,S,H] inputs both work.
inline int64_t leadingVolume(nvinfer1::Dims const& dims)
{
    int64_t volume = 1;
    for (int32_t i = 0; i + 1 < dims.nbDims; ++i)
    {
        volume *= dims.d[i];
    }
    return volume;
}

inline std::string formatDims(nvinfer1::Dims const& dims)
{
    std::string text = "[";
    for (int32_t i = 0; i < dims.nbDims; ++i)
    {
        text += (i ? "," : "") + std::to_string(dims.d[i]);
    }
    return text + "]";
}

// Why `dims` breaks `shape` (a contract shape string: "[]" a scalar, "[T,...]" any leading
// dimensions that equal `tokens`'s, then terms like E, 2I, H), or "" when it fits. A dimension
// of -1 is not known yet (build time) and matches anything.
inline std::string shapeProblem(
    char const* name, char const* shape, nvinfer1::Dims const& dims, lynx_moe_params_t const& p, nvinfer1::Dims const* tokens)
{
    std::string const spec = shape;
    std::string const got = std::string("input ") + name + " has shape " + formatDims(dims) + "; the contract says " + spec;
    if (dims.nbDims < 0 || dims.nbDims > nvinfer1::Dims::MAX_DIMS)
    {
        return got;
    }
    if (spec == "[]")
    {
        for (int32_t i = 0; i < dims.nbDims; ++i)
        {
            if (dims.d[i] != 1 && dims.d[i] != -1)
            {
                return got + " (a scalar)";
            }
        }
        return "";
    }
    std::string body = spec.substr(1, spec.size() - 2);
    int32_t first = 0; // the dimension the first fixed term describes
    if (body.compare(0, 2, "T,") == 0)
    {
        body = body.substr(2);
        first = dims.nbDims - 1;
        if (first < 1)
        {
            return got;
        }
        if (tokens != nullptr)
        {
            if (tokens->nbDims != dims.nbDims)
            {
                return got + " with the leading dimensions of hidden " + formatDims(*tokens);
            }
            for (int32_t i = 0; i < first; ++i)
            {
                if (dims.d[i] >= 0 && tokens->d[i] >= 0 && dims.d[i] != tokens->d[i])
                {
                    return got + " with the leading dimensions of hidden " + formatDims(*tokens);
                }
            }
        }
    }
    std::string expected;
    int32_t axis = first;
    size_t at = 0;
    while (at <= body.size())
    {
        size_t const comma = body.find(',', at);
        std::string const term = body.substr(at, comma == std::string::npos ? std::string::npos : comma - at);
        int64_t factor = 1;
        size_t symbol = 0;
        while (symbol < term.size() && term[symbol] >= '0' && term[symbol] <= '9')
        {
            ++symbol;
        }
        if (symbol > 0)
        {
            factor = std::stoll(term.substr(0, symbol));
        }
        std::string const name_of = term.substr(symbol);
        int64_t const base = name_of == "E" ? p.num_experts : name_of == "H" ? p.hidden_size : name_of == "I" ? p.expert_size : -1;
        if (base < 0)
        {
            return std::string("unknown term '") + term + "' in the contract shape " + spec;
        }
        int64_t const want = factor * base;
        expected += (expected.empty() ? "" : ",") + std::to_string(want);
        if (axis >= dims.nbDims || (dims.d[axis] >= 0 && dims.d[axis] != want))
        {
            axis = -1; // mismatch; keep building the expected text
        }
        else
        {
            ++axis;
        }
        if (comma == std::string::npos)
        {
            break;
        }
        at = comma + 1;
    }
    if (axis != dims.nbDims)
    {
        return got + " = [" + (first ? "...," : "") + expected + "] (E " + std::to_string(p.num_experts) + ", H "
            + std::to_string(p.hidden_size) + ", I " + std::to_string(p.expert_size) + ")";
    }
    return "";
}

} // namespace lynx

#endif // LYNX_MOE_TRT_CHECKS_H
