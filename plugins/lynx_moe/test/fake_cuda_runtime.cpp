/*
 * fake_cuda_runtime.cpp: the part of the CUDA runtime the core library uses, faked for host tests.
 *
 * Linked with the nvcc-built object of src/lynx_moe.cu in place of libcudart (`make host-test`),
 * it lets a machine with no GPU run the library's host code for real: the C API's checks, the
 * workspace layout, the choice of kernels and their launch configurations, and its handling of
 * CUDA errors. Kernels are recorded, never run. The runtime's last-error slot behaves as CUDA's:
 * a failed launch sets it, cudaGetLastError reads and clears it, cudaPeekAtLastError only reads.
 *
 * Control and inspection (extern "C", for ctypes and the C++ tests):
 *   lynx_fake_reset()                     forget launches, clear the slot and every injection
 *   lynx_fake_set_pending(error)          leave an error in the slot, as another library would
 *   lynx_fake_pending()                   the slot's value
 *   lynx_fake_fail_launch(index, error)   make the index-th launch from now fail with `error`
 *   lynx_fake_fail_memset(error)          make every cudaMemsetAsync fail with `error`
 *   lynx_fake_launch_count()              launches recorded since the reset
 *   lynx_fake_launch(i, name, size, dims, shared, stream)  launch i: demangled kernel name,
 *                                         grid x/y/z and block x/y/z, dynamic shared bytes, stream
 */
#include <cuda_runtime_api.h>
#include <cxxabi.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

namespace
{

struct Launch
{
    std::string kernel;
    dim3 grid, block;
    size_t shared;
    void* stream;
};

struct Config
{
    dim3 grid, block;
    size_t shared;
    void* stream;
};

struct State
{
    std::map<void const*, std::string> names; // host stub -> demangled kernel name
    std::vector<Launch> launches;
    std::vector<Config> configs;
    cudaError_t pending = cudaSuccess;
    long failAt = -1;
    cudaError_t failLaunch = cudaSuccess;
    cudaError_t failMemset = cudaSuccess;
};

State& state()
{
    static State s;
    return s;
}

std::string demangle(char const* name)
{
    int status = 0;
    char* text = abi::__cxa_demangle(name, nullptr, nullptr, &status);
    std::string out = status == 0 && text ? text : name;
    std::free(text);
    return out;
}

// What the real runtime refuses at launch time (cudaErrorInvalidConfiguration); 48 KiB is the
// static + dynamic shared memory a kernel gets without cudaFuncSetAttribute.
bool validConfig(dim3 grid, dim3 block, size_t shared)
{
    unsigned long const threads = 1UL * block.x * block.y * block.z;
    return grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.y <= 65535 && grid.z <= 65535 && threads >= 1 && threads <= 1024
        && block.z <= 64 && shared <= 48 * 1024;
}

} // namespace

extern "C"
{

    void** __cudaRegisterFatBinary(void* /*fatCubin*/)
    {
        static void* handle = nullptr;
        return &handle;
    }

    void __cudaRegisterFatBinaryEnd(void** /*handle*/) {}

    void __cudaUnregisterFatBinary(void** /*handle*/) {}

    void __cudaRegisterFunction(void** /*handle*/, char const* hostFun, char* /*deviceFun*/, char const* deviceName, int /*limit*/,
        uint3* /*tid*/, uint3* /*bid*/, dim3* /*bDim*/, dim3* /*gDim*/, int* /*wSize*/)
    {
        state().names[hostFun] = demangle(deviceName);
    }

    unsigned __cudaPushCallConfiguration(dim3 grid, dim3 block, size_t shared, struct CUstream_st* stream)
    {
        state().configs.push_back({grid, block, shared, stream});
        return 0;
    }

    cudaError_t __cudaPopCallConfiguration(dim3* grid, dim3* block, size_t* shared, void* stream)
    {
        State& s = state();
        if (s.configs.empty())
        {
            return cudaErrorMissingConfiguration;
        }
        Config const c = s.configs.back();
        s.configs.pop_back();
        *grid = c.grid;
        *block = c.block;
        *shared = c.shared;
        *static_cast<void**>(stream) = c.stream;
        return cudaSuccess;
    }

    cudaError_t __cudaGetKernel(cudaKernel_t* kernel, void const* hostFun)
    {
        *kernel = reinterpret_cast<cudaKernel_t>(const_cast<void*>(hostFun));
        return cudaSuccess;
    }

    cudaError_t __cudaLaunchKernel(cudaKernel_t kernel, dim3 grid, dim3 block, void** /*args*/, size_t shared, cudaStream_t stream)
    {
        State& s = state();
        auto const name = s.names.find(reinterpret_cast<void const*>(kernel));
        s.launches.push_back({name == s.names.end() ? "?" : name->second, grid, block, shared, stream});
        cudaError_t error = validConfig(grid, block, shared) ? cudaSuccess : cudaErrorInvalidConfiguration;
        if (s.failAt == 0)
        {
            error = s.failLaunch;
        }
        if (s.failAt >= 0)
        {
            --s.failAt;
        }
        if (error != cudaSuccess)
        {
            s.pending = error;
        }
        return error;
    }

    cudaError_t __cudaLaunchKernel_ptsz(cudaKernel_t kernel, dim3 grid, dim3 block, void** args, size_t shared, cudaStream_t stream)
    {
        return __cudaLaunchKernel(kernel, grid, block, args, shared, stream);
    }

    cudaError_t cudaMemsetAsync(void* /*ptr*/, int /*value*/, size_t /*count*/, cudaStream_t /*stream*/)
    {
        State& s = state();
        if (s.failMemset != cudaSuccess)
        {
            s.pending = s.failMemset;
        }
        return s.failMemset;
    }

    cudaError_t cudaGetLastError(void)
    {
        cudaError_t const error = state().pending;
        state().pending = cudaSuccess;
        return error;
    }

    cudaError_t cudaPeekAtLastError(void)
    {
        return state().pending;
    }

    char const* cudaGetErrorName(cudaError_t error)
    {
        switch (error)
        {
        case cudaSuccess: return "cudaSuccess";
        case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
        case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
        case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
        case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
        case cudaErrorNoDevice: return "cudaErrorNoDevice";
        case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
        default: return "cudaErrorUnknown";
        }
    }

    char const* cudaGetErrorString(cudaError_t error)
    {
        return error == cudaSuccess ? "no error" : "injected by the fake CUDA runtime";
    }

    // --- control ---------------------------------------------------------------------------------

    void lynx_fake_reset(void)
    {
        State& s = state();
        s.launches.clear();
        s.configs.clear();
        s.pending = cudaSuccess;
        s.failAt = -1;
        s.failLaunch = cudaSuccess;
        s.failMemset = cudaSuccess;
    }

    void lynx_fake_set_pending(int error)
    {
        state().pending = static_cast<cudaError_t>(error);
    }

    int lynx_fake_pending(void)
    {
        return static_cast<int>(state().pending);
    }

    void lynx_fake_fail_launch(int index, int error)
    {
        state().failAt = index;
        state().failLaunch = static_cast<cudaError_t>(error);
    }

    void lynx_fake_fail_memset(int error)
    {
        state().failMemset = static_cast<cudaError_t>(error);
    }

    int lynx_fake_launch_count(void)
    {
        return static_cast<int>(state().launches.size());
    }

    int lynx_fake_launch(int i, char* name, int size, unsigned* dims, size_t* shared, void** stream)
    {
        State const& s = state();
        if (i < 0 || i >= static_cast<int>(s.launches.size()) || size < 1)
        {
            return -1;
        }
        Launch const& l = s.launches[static_cast<size_t>(i)];
        std::strncpy(name, l.kernel.c_str(), static_cast<size_t>(size) - 1);
        name[size - 1] = '\0';
        unsigned const values[6] = {l.grid.x, l.grid.y, l.grid.z, l.block.x, l.block.y, l.block.z};
        std::memcpy(dims, values, sizeof values);
        *shared = l.shared;
        *stream = l.stream;
        return 0;
    }

} // extern "C"
