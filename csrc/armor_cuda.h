// Interface between the pybind11 binding (host compiler, no CUDA headers) and the
// CUDA/cuSPARSELt code. Device memory crosses it as integer addresses, the stream
// as an integer handle, and dtypes as the codes below, so the binding builds
// against a CPU-only PyTorch or no PyTorch at all.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace armor {

// dtype codes; armor_kernels/cuda_ext.py keeps the same table.
enum DType : int { kFloat16 = 0, kBFloat16 = 1 };

// Every failed CUDA or cuSPARSELt call becomes this, naming the call and the shape.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Expand (values [rows, cols/2], 4-bit meta [rows, ceil(cols/8)]) into a dense
// row-major [rows, cols] 2:4 matrix on `stream` (16-bit values copied bit for bit).
// Returns a cudaError_t as int so this header needs no CUDA types.
int launch_expand24(const void* values, const uint8_t* meta, void* dense, int64_t rows, int64_t cols,
                    void* stream);

// The same expansion on the host (CPU addresses), to check the kernel's indexing without a GPU.
void expand24_host(const void* values, const uint8_t* meta, void* dense, int64_t rows, int64_t cols);

// One cached matmul plan: zᵀ[n, tokens] = S[n, k] · xᵀ[k, tokens] (+ bias[n]).
struct PlanInfo {
  int device = 0;
  int dtype = 0;
  int64_t n = 0, k = 0, tokens = 0;
  bool has_bias = false;
  bool alpha_vector = false;
  bool searched = false;  // the configuration came from cusparseLtMatmulSearch on this plan
  int alg_id = 0, max_alg_id = 0, split_k = 1, split_k_mode = 0, split_k_buffers = 0;
  size_t workspace = 0;  // bytes the plan needs (cusparseLtMatmulGetWorkspace)
};

// A plan's algorithm configuration; alg_id < 0 leaves cuSPARSELt's default selection.
struct AlgConfig {
  int alg_id = -1, split_k = 1, split_k_mode = 0, split_k_buffers = 0;
};

// Versions: compile-time cuSPARSELt and CUDA runtime, and the loaded cuSPARSELt.
std::vector<std::pair<std::string, int>> versions();

// Number of visible CUDA devices; throws Error (naming cudaGetDeviceCount) when CUDA cannot start.
int device_count();

// (compressed bytes, scratch bytes) of S [n, k] in cuSPARSELt's layout.
std::pair<size_t, size_t> compressed_size(int device, int dtype, int64_t n, int64_t k);

// Our values+meta -> dense scratch (our kernel) -> cuSPARSELt's compressed buffer. Load time only.
void compress(int device, int dtype, int64_t n, int64_t k, uintptr_t values, uintptr_t meta, uintptr_t dense_scratch,
              uintptr_t compressed, uintptr_t compress_buffer, uintptr_t stream);

// Make the plan for exactly this problem with configuration cfg, replacing any earlier plan
// of the same problem (host-only: no GPU work, no search). Throws Error, naming the
// configuration, when cuSPARSELt cannot build it.
PlanInfo plan(int device, int dtype, int64_t n, int64_t k, int64_t tokens, uintptr_t bias, bool alpha_vector,
              const AlgConfig& cfg);

// Bytes of workspace cuSPARSELt reports (cusparseLtMatmulGetWorkspace) for this problem with
// algorithm alg_id, from a temporary plan that is not kept. Sizes the search's workspace.
size_t plan_workspace(int device, int dtype, int64_t n, int64_t k, int64_t tokens, uintptr_t bias, bool alpha_vector,
                      int alg_id);

// Run cusparseLtMatmulSearch on the existing plan (synchronizes: never inside a timed region
// or a CUDA graph capture); returns the chosen configuration and the workspace it needs.
PlanInfo search(int device, int dtype, int64_t n, int64_t k, int64_t tokens, uintptr_t bias, bool alpha_vector,
                uintptr_t x, uintptr_t compressed, uintptr_t out, uintptr_t alpha_ptr, float alpha,
                uintptr_t workspace, size_t workspace_size, uintptr_t stream);

// Expand values/meta into dense [rows, cols] (device addresses) on stream: launch_expand24, checked.
void expand24(uintptr_t values, uintptr_t meta, uintptr_t dense, int64_t rows, int64_t cols, uintptr_t stream);

// out[tokens, n] = alpha · x[tokens, k] · Sᵀ (+ bias). The plan must exist (see plan());
// no allocation, no synchronization: safe inside CUDA graph capture.
// alpha_ptr: 0 for the scalar alpha, else a device float32 [n] per-row scale.
void matmul(int device, int dtype, int64_t n, int64_t k, int64_t tokens, uintptr_t bias, uintptr_t x,
            uintptr_t compressed, uintptr_t out, uintptr_t alpha_ptr, float alpha, uintptr_t workspace,
            size_t workspace_size, uintptr_t stream);

std::vector<PlanInfo> cached_plans();

// Destroy all plans (the Python side keeps the searched choices). Handles stay: one per device.
void clear_plans();

}  // namespace armor
