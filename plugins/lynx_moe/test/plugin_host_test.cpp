/*
 * plugin_host_test.cpp: the C++ TensorRT adapter on a machine with no GPU and no TensorRT library.
 *
 * Built by tests/test_plugin_cpp.py from trt/LynxMoEPlugin.cpp and TensorRT's headers (the
 * kernel-lens wheel's), linked to liblynx_moe_fake_cuda.so (the core library over
 * fake_cuda_runtime.cpp), so enqueue runs the core's real host code and its launches are recorded.
 * Prints one line per failed check and exits 1 if any failed.
 */
#include "LynxMoEChecks.h"
#include "LynxMoEPlugin.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

extern "C"
{
    void lynx_fake_reset(void);
    void lynx_fake_set_pending(int error);
    int lynx_fake_pending(void);
    void lynx_fake_fail_launch(int index, int error);
    int lynx_fake_launch_count(void);
}

using namespace nvinfer1;

namespace
{

int failures = 0;

#define CHECK(cond)                                                                                                    \
    do                                                                                                                 \
    {                                                                                                                  \
        if (!(cond))                                                                                                   \
        {                                                                                                              \
            std::printf("FAILED line %d: %s\n", __LINE__, #cond);                                                      \
            ++failures;                                                                                                \
        }                                                                                                              \
    } while (0)

constexpr int32_t E = 8, K = 2, H = 64, I = 32;

Dims dims(std::vector<int64_t> const& values)
{
    Dims d{};
    d.nbDims = static_cast<int32_t>(values.size());
    for (size_t i = 0; i < values.size(); ++i)
    {
        d.d[i] = values[i];
    }
    return d;
}

struct Fields
{
    std::vector<std::string> strings; // backing storage
    std::vector<int32_t> ints;
    std::vector<float> floats;
    std::vector<PluginField> fields;

    Fields()
    {
        strings.reserve(16);
        ints.reserve(16);
        floats.reserve(16);
    }
    void addInt(char const* name, int32_t v)
    {
        ints.push_back(v);
        fields.emplace_back(name, &ints.back(), PluginFieldType::kINT32, 1);
    }
    void addFloat(char const* name, float v)
    {
        floats.push_back(v);
        fields.emplace_back(name, &floats.back(), PluginFieldType::kFLOAT32, 1);
    }
    void addString(char const* name, std::string const& v, int32_t length = -1)
    {
        strings.push_back(v);
        fields.emplace_back(name, strings.back().c_str(), PluginFieldType::kCHAR,
            length >= 0 ? length : static_cast<int32_t>(v.size()));
    }
    PluginFieldCollection collection()
    {
        PluginFieldCollection fc{};
        fc.nbFields = static_cast<int32_t>(fields.size());
        fc.fields = fields.data();
        return fc;
    }
};

Fields nodeFields(std::string const& policy = "lynx", int32_t policyLength = -1)
{
    Fields f;
    f.addInt("num_experts", E);
    f.addInt("top_k", K);
    f.addInt("hidden_size", H);
    f.addInt("expert_size", I);
    f.addString("activation", "swiglu");
    f.addString("router", "softmax_topk");
    f.addInt("normalize", 1);
    f.addString("policy", policy, policyLength);
    f.addFloat("alpha", 3.0F);
    f.addInt("beta", 1);
    f.addInt("budget", 0);
    f.addString("tie_break", "logit");
    return f;
}

std::unique_ptr<lynx::LynxMoEPlugin> makePlugin(Fields& f)
{
    static lynx::LynxMoEPluginCreator creator;
    PluginFieldCollection fc = f.collection();
    return std::unique_ptr<lynx::LynxMoEPlugin>(
        static_cast<lynx::LynxMoEPlugin*>(creator.createPlugin("layers.0.mlp", &fc, TensorRTPhase::kBUILD)));
}

// A CHAR field whose one byte is the last of a readable page: reading a second byte faults.
void testStringsNeverReadPastTheirLength()
{
    long const page = sysconf(_SC_PAGESIZE);
    auto* base = static_cast<char*>(mmap(nullptr, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    CHECK(base != MAP_FAILED);
    CHECK(mprotect(base + page, page, PROT_NONE) == 0);
    char* last = base + page - 1;
    *last = 'x';
    std::string out;
    CHECK(lynx::readString(PluginField("policy", last, PluginFieldType::kCHAR, 1), out) && out == "x");
    std::memcpy(base + page - 4, "lynx", 4); // four bytes, no NUL
    CHECK(lynx::readString(PluginField("policy", base + page - 4, PluginFieldType::kCHAR, 4), out) && out == "lynx");
    CHECK(lynx::readString(PluginField("policy", "lynx\0junk", PluginFieldType::kCHAR, 9), out) && out == "lynx");
    CHECK(lynx::readString(PluginField("policy", "lynx", PluginFieldType::kCHAR, 0), out) && out.empty());
    CHECK(!lynx::readString(PluginField("policy", "lynx", PluginFieldType::kCHAR, -1), out));
    munmap(base, 2 * page);
    // A producer that claims one byte for "lynx" gets "l", an unknown policy: refused, not over-read.
    Fields f = nodeFields("lynx", 1);
    CHECK(makePlugin(f) == nullptr);
    Fields g = nodeFields("lynx", 5); // size with the NUL, as getFieldsToSerialize writes
    CHECK(makePlugin(g) != nullptr);
}

std::vector<DynamicPluginTensorDesc> buildInputs(int64_t tokens, Dims fc2)
{
    std::vector<Dims> const shapes = {dims({tokens, H}), dims({tokens, E}), dims({E, 2 * I, H}), dims({E, 2 * I}), fc2, dims({E, H}),
        dims({}), dims({})};
    std::vector<DynamicPluginTensorDesc> in(shapes.size());
    for (size_t i = 0; i < shapes.size(); ++i)
    {
        in[i].desc.dims = shapes[i];
        in[i].desc.type = i >= 6 ? DataType::kINT64 : DataType::kHALF;
        in[i].desc.format = TensorFormat::kLINEAR;
        in[i].min = in[i].max = in[i].opt = shapes[i];
    }
    return in;
}

void testShapesAreChecked()
{
    Fields f = nodeFields();
    auto plugin = makePlugin(f);
    CHECK(plugin != nullptr);
    DynamicPluginTensorDesc out{};
    out.desc.dims = dims({-1, H});
    auto good = buildInputs(-1, dims({E, H, I}));
    CHECK(plugin->configurePlugin(good.data(), 8, &out, 1) == 0);
    auto transposed = buildInputs(-1, dims({E, I, H}));
    CHECK(plugin->configurePlugin(transposed.data(), 8, &out, 1) == -1);
    auto bias = buildInputs(4, dims({E, H, I}));
    bias[3].desc.dims = dims({E, I}); // fc1_bias [E,I] instead of [E,2I]
    CHECK(plugin->configurePlugin(bias.data(), 8, &out, 1) == -1);
    auto scalar = buildInputs(4, dims({E, H, I}));
    scalar[6].desc.dims = dims({2});
    CHECK(plugin->configurePlugin(scalar.data(), 8, &out, 1) == -1);
    auto logits = buildInputs(4, dims({E, H, I}));
    logits[1].desc.dims = dims({5, E}); // 5 rows of logits for 4 tokens
    CHECK(plugin->configurePlugin(logits.data(), 8, &out, 1) == -1);

    lynx_moe_params_t p{};
    p.num_experts = E;
    p.hidden_size = H;
    p.expert_size = I;
    std::string const why = lynx::shapeProblem("fc2", "[E,H,I]", dims({E, I, H}), p, nullptr);
    CHECK(why == "input fc2 has shape [8,32,64]; the contract says [E,H,I] = [8,64,32] (E 8, H 64, I 32)");
    CHECK(lynx::shapeProblem("hidden", "[T,H]", dims({3, 1, H}), p, nullptr).empty()); // [B,S,H]
    CHECK(lynx::shapeProblem("seq_len", "[]", dims({1}), p, nullptr).empty());
}

void testRuntimeCallsTheCore()
{
    Fields f = nodeFields();
    auto plugin = makePlugin(f);
    auto build = buildInputs(4, dims({E, H, I}));
    std::vector<PluginTensorDesc> in;
    for (auto const& d : build)
    {
        in.push_back(d.desc);
    }
    PluginTensorDesc out = in[0];
    CHECK(plugin->onShapeChange(in.data(), 8, &out, 1) == 0);
    // Pointers are never dereferenced by the fake runtime; 256-byte aligned like TensorRT's.
    std::vector<void const*> inputs;
    for (int i = 0; i < 8; ++i)
    {
        inputs.push_back(reinterpret_cast<void const*>(static_cast<uintptr_t>(0x100000 * (i + 1))));
    }
    void* outputs[] = {reinterpret_cast<void*>(0x900000)};
    void* workspace = reinterpret_cast<void*>(0xa00000);
    lynx_fake_reset();
    lynx_fake_set_pending(1); // an error another library left behind
    CHECK(plugin->enqueue(in.data(), &out, inputs.data(), outputs, workspace, nullptr) == 0);
    CHECK(lynx_fake_launch_count() > 5);
    CHECK(lynx_fake_pending() == 0);
    lynx_fake_reset();
    lynx_fake_fail_launch(2, 700);
    CHECK(plugin->enqueue(in.data(), &out, inputs.data(), outputs, workspace, nullptr) == -1);
    CHECK(std::string(lynx_moe_last_error()).find("cudaErrorIllegalAddress") == 0);
    lynx_fake_reset();
    CHECK(plugin->enqueue(in.data(), &out, inputs.data(), outputs, workspace, nullptr) == 0);
    auto wrong = in;
    wrong[4].dims = dims({E, I, H});
    CHECK(plugin->onShapeChange(wrong.data(), 8, &out, 1) == -1);
}

void testFieldsRoundTrip()
{
    Fields f = nodeFields();
    auto plugin = makePlugin(f);
    PluginFieldCollection const* fc = plugin->getFieldsToSerialize();
    CHECK(fc != nullptr && fc->nbFields == 15);
    static lynx::LynxMoEPluginCreator creator;
    std::unique_ptr<IPluginV3> twin(creator.createPlugin("twin", fc, TensorRTPhase::kRUNTIME));
    CHECK(twin != nullptr);
    auto* copy = static_cast<lynx::LynxMoEPlugin*>(twin.get());
    PluginFieldCollection const* again = copy->getFieldsToSerialize();
    CHECK(again->nbFields == 15);
    for (int32_t i = 0; i < again->nbFields && i < 15; ++i)
    {
        CHECK(std::strcmp(again->fields[i].name, fc->fields[i].name) == 0);
    }
    float limit = 0.0F;
    CHECK(lynx::readFloat(again->fields[14], limit) && std::isinf(limit));
}

} // namespace

int main()
{
    testStringsNeverReadPastTheirLength();
    testShapesAreChecked();
    testRuntimeCallsTheCore();
    testFieldsRoundTrip();
    std::printf("%s\n", failures ? "plugin_host_test: FAILED" : "plugin_host_test: ok");
    return failures ? 1 : 0;
}
