// cuSPARSELt 2:4 GEMM: one handle per device, load-time compression, and a plan cache.
// The policy (which configuration a plan gets, when to search, how large the search
// workspace is, falling back to the default algorithm) lives in armor_kernels/cuda_ext.py;
// this file makes, searches and runs plans and reports what cuSPARSELt says.
//
// Layout (only matrix A of a cuSPARSELt product may be sparse): we compute
//   zᵀ[n, T] = S[n, k] · xᵀ[k, T]
// with A = S row-major (ld k, the layout we compress), B = x as a row-major [T, k]
// matrix (ld k) taken with op TRANSPOSE, and C = D = out as a column-major [n, T]
// matrix (ld n), which is exactly a row-major out[T, n]. No transposes are materialized.
#include <cuda_runtime.h>
#include <cusparseLt.h>

#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <tuple>

#include "armor_cuda.h"

namespace armor {
namespace {

std::string shape_str(int dtype, int64_t n, int64_t k, int64_t tokens = -1) {
  std::ostringstream s;
  s << (dtype == kFloat16 ? "float16" : "bfloat16") << " S[" << n << ", " << k << "]";
  if (tokens >= 0) s << " x[" << tokens << ", " << k << "]";
  return s.str();
}

void check_cuda(cudaError_t err, const char* call, const std::string& what) {
  if (err != cudaSuccess) {
    throw Error(std::string(call) + " failed for " + what + ": " + cudaGetErrorName(err) + " (" +
                cudaGetErrorString(err) + ")");
  }
}

// Our own names: cusparseLtGetErrorName is missing from older cuSPARSELt releases.
const char* status_name(cusparseStatus_t st) {
  static const char* names[] = {
      "SUCCESS",        "NOT_INITIALIZED",  "ALLOC_FAILED",   "INVALID_VALUE",
      "ARCH_MISMATCH",  "MAPPING_ERROR",    "EXECUTION_FAILED", "INTERNAL_ERROR",
      "MATRIX_TYPE_NOT_SUPPORTED", "ZERO_PIVOT", "NOT_SUPPORTED", "INSUFFICIENT_RESOURCES",
  };  // cusparseStatus_t 0..11
  const int i = int(st);
  return i >= 0 && i < int(sizeof(names) / sizeof(names[0])) ? names[i] : "UNKNOWN";
}

void check_lt(cusparseStatus_t st, const char* call, const std::string& what) {
  if (st != CUSPARSE_STATUS_SUCCESS) {
    throw Error(std::string(call) + " failed for " + what + ": CUSPARSE_STATUS_" + status_name(st) + " (status " +
                std::to_string(int(st)) + "; CUSPARSELT_LOG_LEVEL=5 makes cuSPARSELt log why)");
  }
}

#define CUDA_CHECK(expr, what) check_cuda((expr), #expr, (what))
#define LT_CHECK(expr, what) check_lt((expr), #expr, (what))

cudaDataType to_cuda_type(int dtype) {
  if (dtype == kFloat16) return CUDA_R_16F;
  if (dtype == kBFloat16) return CUDA_R_16BF;
  throw Error("dtype code " + std::to_string(dtype) + " is not float16 (0) or bfloat16 (1)");
}

void check_shape(int dtype, int64_t n, int64_t k, int64_t tokens) {
  to_cuda_type(dtype);
  // cuSPARSELt's 16-bit limits: sparse rows/cols multiples of 16, dense dims multiples of 8
  if (n <= 0 || k <= 0 || n % 16 || k % 16) {
    throw Error("cuSPARSELt needs n and k to be positive multiples of 16, got " + shape_str(dtype, n, k));
  }
  if (tokens == 0 || tokens < -1 || (tokens > 0 && tokens % 8)) {
    throw Error("cuSPARSELt needs the token count to be a positive multiple of 8, got " +
                shape_str(dtype, n, k, tokens));
  }
}

// Switch to `device` for the scope and back (cuSPARSELt handles are tied to the current device).
struct DeviceGuard {
  int previous = -1;
  explicit DeviceGuard(int device) {
    CUDA_CHECK(cudaGetDevice(&previous), "device " + std::to_string(device));
    if (previous != device) CUDA_CHECK(cudaSetDevice(device), "device " + std::to_string(device));
  }
  ~DeviceGuard() {
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous) cudaSetDevice(previous);
  }
};

std::mutex g_mutex;

// One handle per device for the life of the process (destroying at exit races CUDA's own teardown).
const cusparseLtHandle_t* handle_for(int device) {
  static std::map<int, std::unique_ptr<cusparseLtHandle_t>> handles;
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = handles.find(device);
  if (it != handles.end()) return it->second.get();
  auto h = std::make_unique<cusparseLtHandle_t>();
  LT_CHECK(cusparseLtInit(h.get()), "device " + std::to_string(device));
  return handles.emplace(device, std::move(h)).first->second.get();
}

// The sparse operand's descriptor; compression and every plan must use the same one.
void init_sparse_descr(const cusparseLtHandle_t* h, cusparseLtMatDescriptor_t* d, int dtype, int64_t n, int64_t k) {
  LT_CHECK(cusparseLtStructuredDescriptorInit(h, d, n, k, k, 16, to_cuda_type(dtype), CUSPARSE_ORDER_ROW,
                                              CUSPARSELT_SPARSITY_50_PERCENT),
           shape_str(dtype, n, k));
}

// All descriptors of one plan; they live as long as the plan (the plan may refer to them).
struct Plan {
  const cusparseLtHandle_t* handle = nullptr;
  cusparseLtMatDescriptor_t a{}, b{}, c{};
  cusparseLtMatmulDescriptor_t mm{};
  cusparseLtMatmulAlgSelection_t alg{};
  cusparseLtMatmulPlan_t plan{};
  int made = 0;  // how many of a, b, c, alg, plan were initialized (destroyed in reverse)
  PlanInfo info;

  ~Plan() {
    if (made >= 5) cusparseLtMatmulPlanDestroy(&plan);
#if CUSPARSELT_VERSION >= 800
    if (made >= 4) cusparseLtMatmulAlgSelectionDestroy(&alg);  // required from cuSPARSELt 0.8
#endif
    if (made >= 3) cusparseLtMatDescriptorDestroy(&c);
    if (made >= 2) cusparseLtMatDescriptorDestroy(&b);
    if (made >= 1) cusparseLtMatDescriptorDestroy(&a);
  }

  void read_config(const std::string& what) {
    LT_CHECK(cusparseLtMatmulAlgGetAttribute(handle, &alg, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &info.alg_id,
                                             sizeof(int)),
             what);
    LT_CHECK(cusparseLtMatmulAlgGetAttribute(handle, &alg, CUSPARSELT_MATMUL_ALG_CONFIG_MAX_ID, &info.max_alg_id,
                                             sizeof(int)),
             what);
    LT_CHECK(cusparseLtMatmulAlgGetAttribute(handle, &alg, CUSPARSELT_MATMUL_SPLIT_K, &info.split_k, sizeof(int)),
             what);
    LT_CHECK(cusparseLtMatmulAlgGetAttribute(handle, &alg, CUSPARSELT_MATMUL_SPLIT_K_MODE, &info.split_k_mode,
                                             sizeof(int)),
             what);
    LT_CHECK(cusparseLtMatmulAlgGetAttribute(handle, &alg, CUSPARSELT_MATMUL_SPLIT_K_BUFFERS,
                                             &info.split_k_buffers, sizeof(int)),
             what);
    LT_CHECK(cusparseLtMatmulGetWorkspace(handle, &plan, &info.workspace), what);
  }
};

// Plans are per exact problem (descriptors hold the token count); the bias address is part
// of the key because it is set on the matmul descriptor before the plan is made. The Python
// side passes only a bias that lives as long as its compressed core (never a per-call tensor).
using PlanKey = std::tuple<int, int, int64_t, int64_t, int64_t, uintptr_t, bool>;

std::map<PlanKey, std::shared_ptr<Plan>> g_plans;

std::shared_ptr<Plan> make_plan(int device, int dtype, int64_t n, int64_t k, int64_t tokens, uintptr_t bias,
                                bool alpha_vector, const AlgConfig& cfg) {
  const std::string what = shape_str(dtype, n, k, tokens);
  const cudaDataType type = to_cuda_type(dtype);
  auto p = std::make_shared<Plan>();
  p->handle = handle_for(device);
  const cusparseLtHandle_t* h = p->handle;
  PlanInfo& info = p->info;
  info.device = device;
  info.dtype = dtype;
  info.n = n;
  info.k = k;
  info.tokens = tokens;
  info.has_bias = bias != 0;
  info.alpha_vector = alpha_vector;

  init_sparse_descr(h, &p->a, dtype, n, k);
  p->made = 1;
  LT_CHECK(cusparseLtDenseDescriptorInit(h, &p->b, tokens, k, k, 16, type, CUSPARSE_ORDER_ROW), what);
  p->made = 2;
  LT_CHECK(cusparseLtDenseDescriptorInit(h, &p->c, n, tokens, n, 16, type, CUSPARSE_ORDER_COL), what);
  p->made = 3;
  LT_CHECK(cusparseLtMatmulDescriptorInit(h, &p->mm, CUSPARSE_OPERATION_NON_TRANSPOSE, CUSPARSE_OPERATION_TRANSPOSE,
                                          &p->a, &p->b, &p->c, &p->c, CUSPARSE_COMPUTE_32F),
           what);
  if (bias) {
    // one bias entry per row of D = per output feature
    void* ptr = reinterpret_cast<void*>(bias);
    LT_CHECK(cusparseLtMatmulDescSetAttribute(h, &p->mm, CUSPARSELT_MATMUL_BIAS_POINTER, &ptr, sizeof(ptr)), what);
  }
  if (alpha_vector) {
    int on = 1;  // alpha becomes a device float32 vector, one scale per row of D
    LT_CHECK(cusparseLtMatmulDescSetAttribute(h, &p->mm, CUSPARSELT_MATMUL_ALPHA_VECTOR_SCALING, &on, sizeof(on)),
             what);
  }
  LT_CHECK(cusparseLtMatmulAlgSelectionInit(h, &p->alg, &p->mm, CUSPARSELT_MATMUL_ALG_DEFAULT), what);
  p->made = 4;
  if (cfg.alg_id >= 0) {  // else cuSPARSELt's default configuration
    const std::string with = what + " with alg " + std::to_string(cfg.alg_id) + ", split-K " +
                             std::to_string(cfg.split_k);
    LT_CHECK(cusparseLtMatmulAlgSetAttribute(h, &p->alg, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &cfg.alg_id, sizeof(int)),
             with);
    LT_CHECK(cusparseLtMatmulAlgSetAttribute(h, &p->alg, CUSPARSELT_MATMUL_SPLIT_K, &cfg.split_k, sizeof(int)), with);
    if (cfg.split_k > 1) {
      LT_CHECK(cusparseLtMatmulAlgSetAttribute(h, &p->alg, CUSPARSELT_MATMUL_SPLIT_K_MODE, &cfg.split_k_mode,
                                               sizeof(int)),
               with);
      LT_CHECK(cusparseLtMatmulAlgSetAttribute(h, &p->alg, CUSPARSELT_MATMUL_SPLIT_K_BUFFERS, &cfg.split_k_buffers,
                                               sizeof(int)),
               with);
    }
    LT_CHECK(cusparseLtMatmulPlanInit(h, &p->plan, &p->mm, &p->alg), with);
  } else {
    LT_CHECK(cusparseLtMatmulPlanInit(h, &p->plan, &p->mm, &p->alg), what);
  }
  p->made = 5;
  p->read_config(what);
  return p;
}

std::shared_ptr<Plan> find_plan(int device, int dtype, int64_t n, int64_t k, int64_t tokens, uintptr_t bias,
                                bool alpha_vector) {
  check_shape(dtype, n, k, tokens);
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_plans.find(PlanKey{device, dtype, n, k, tokens, bias, alpha_vector});
  if (it == g_plans.end()) {
    throw Error("no cuSPARSELt plan for " + shape_str(dtype, n, k, tokens) + " on device " + std::to_string(device) +
                (bias ? " with this bias" : "") + ": call plan() first");
  }
  return it->second;
}

void check_workspace(const Plan& p, uintptr_t workspace, size_t workspace_size) {
  if (workspace_size < p.info.workspace || (p.info.workspace > 0 && workspace == 0)) {
    throw Error("workspace of " + std::to_string(workspace_size) + " bytes is smaller than the " +
                std::to_string(p.info.workspace) + " bytes the plan for " +
                shape_str(p.info.dtype, p.info.n, p.info.k, p.info.tokens) + " needs");
  }
}

}  // namespace

std::vector<std::pair<std::string, int>> versions() {
  int major = -1, minor = -1, patch = -1, runtime = -1;
  cusparseLtGetProperty(MAJOR_VERSION, &major);
  cusparseLtGetProperty(MINOR_VERSION, &minor);
  cusparseLtGetProperty(PATCH_LEVEL, &patch);
  cudaRuntimeGetVersion(&runtime);
  return {{"cusparselt_compiled", CUSPARSELT_VERSION},
          {"cusparselt_loaded", major < 0 ? -1 : major * 1000000 + minor * 100 + patch},
          {"cudart_compiled", CUDART_VERSION},
          {"cudart_loaded", runtime}};
}

int device_count() {
  int n = 0;
  CUDA_CHECK(cudaGetDeviceCount(&n), "the CUDA runtime");
  return n;
}

std::pair<size_t, size_t> compressed_size(int device, int dtype, int64_t n, int64_t k) {
  check_shape(dtype, n, k, -1);
  DeviceGuard guard(device);
  const cusparseLtHandle_t* h = handle_for(device);
  cusparseLtMatDescriptor_t d;
  init_sparse_descr(h, &d, dtype, n, k);
  size_t size = 0, buffer = 0;
  cusparseStatus_t st = cusparseLtSpMMACompressedSize2(h, &d, &size, &buffer);
  cusparseLtMatDescriptorDestroy(&d);
  LT_CHECK(st, shape_str(dtype, n, k));
  return {size, buffer};
}

void compress(int device, int dtype, int64_t n, int64_t k, uintptr_t values, uintptr_t meta, uintptr_t dense_scratch,
              uintptr_t compressed, uintptr_t compress_buffer, uintptr_t stream) {
  check_shape(dtype, n, k, -1);
  const std::string what = shape_str(dtype, n, k);
  if (!values || !meta || !dense_scratch || !compressed) throw Error("compress: null device address for " + what);
  DeviceGuard guard(device);
  const cusparseLtHandle_t* h = handle_for(device);
  void* s = reinterpret_cast<void*>(stream);
  CUDA_CHECK(cudaError_t(launch_expand24(reinterpret_cast<const void*>(values), reinterpret_cast<const uint8_t*>(meta),
                                         reinterpret_cast<void*>(dense_scratch), n, k, s)),
             what);
  cusparseLtMatDescriptor_t d;
  init_sparse_descr(h, &d, dtype, n, k);
  cusparseStatus_t st = cusparseLtSpMMACompress2(h, &d, 1, CUSPARSE_OPERATION_NON_TRANSPOSE,
                                                 reinterpret_cast<const void*>(dense_scratch),
                                                 reinterpret_cast<void*>(compressed),
                                                 reinterpret_cast<void*>(compress_buffer), static_cast<cudaStream_t>(s));
  cusparseLtMatDescriptorDestroy(&d);
  LT_CHECK(st, what);
}

PlanInfo plan(int device, int dtype, int64_t n, int64_t k, int64_t tokens, uintptr_t bias, bool alpha_vector,
              const AlgConfig& cfg) {
  check_shape(dtype, n, k, tokens);
  DeviceGuard guard(device);
  auto p = make_plan(device, dtype, n, k, tokens, bias, alpha_vector, cfg);  // takes g_mutex for the handle only
  std::lock_guard<std::mutex> lock(g_mutex);
  g_plans[PlanKey{device, dtype, n, k, tokens, bias, alpha_vector}] = p;  // replaces an earlier plan of the key
  return p->info;
}

size_t plan_workspace(int device, int dtype, int64_t n, int64_t k, int64_t tokens, uintptr_t bias, bool alpha_vector,
                      int alg_id) {
  check_shape(dtype, n, k, tokens);
  DeviceGuard guard(device);
  AlgConfig cfg;
  cfg.alg_id = alg_id;
  return make_plan(device, dtype, n, k, tokens, bias, alpha_vector, cfg)->info.workspace;  // not kept
}

PlanInfo search(int device, int dtype, int64_t n, int64_t k, int64_t tokens, uintptr_t bias, bool alpha_vector,
                uintptr_t x, uintptr_t compressed, uintptr_t out, uintptr_t alpha_ptr, float alpha,
                uintptr_t workspace, size_t workspace_size, uintptr_t stream) {
  auto p = find_plan(device, dtype, n, k, tokens, bias, alpha_vector);
  const std::string what = shape_str(dtype, n, k, tokens);
  check_workspace(*p, workspace, workspace_size);
  if (alpha_vector != (alpha_ptr != 0)) throw Error("search: alpha vector given/expected mismatch for " + what);
  DeviceGuard guard(device);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const float beta = 0.0f;
  const void* a = alpha_vector ? reinterpret_cast<const void*>(alpha_ptr) : static_cast<const void*>(&alpha);
  {
    // the search rewrites the plan's algorithm: no other thread may run this plan meanwhile
    std::lock_guard<std::mutex> lock(g_mutex);
    LT_CHECK(cusparseLtMatmulSearch(p->handle, &p->plan, a, reinterpret_cast<const void*>(compressed),
                                    reinterpret_cast<const void*>(x), &beta, reinterpret_cast<const void*>(out),
                                    reinterpret_cast<void*>(out), reinterpret_cast<void*>(workspace), &s, 1),
             what);
    p->read_config(what);  // the chosen configuration and the workspace it needs
    p->info.searched = true;
  }
  return p->info;
}

void expand24(uintptr_t values, uintptr_t meta, uintptr_t dense, int64_t rows, int64_t cols, uintptr_t stream) {
  if (cols % 4 || rows < 0) throw Error("expand24: cols = " + std::to_string(cols) + " is not a multiple of 4");
  if (rows * cols > 0 && (!values || !meta || !dense)) throw Error("expand24: null device address");
  CUDA_CHECK(cudaError_t(launch_expand24(reinterpret_cast<const void*>(values), reinterpret_cast<const uint8_t*>(meta),
                                         reinterpret_cast<void*>(dense), rows, cols,
                                         reinterpret_cast<void*>(stream))),
             "expand24 [" + std::to_string(rows) + ", " + std::to_string(cols) + "]");
}

void matmul(int device, int dtype, int64_t n, int64_t k, int64_t tokens, uintptr_t bias, uintptr_t x,
            uintptr_t compressed, uintptr_t out, uintptr_t alpha_ptr, float alpha, uintptr_t workspace,
            size_t workspace_size, uintptr_t stream) {
  const bool alpha_vector = alpha_ptr != 0;
  auto p = find_plan(device, dtype, n, k, tokens, bias, alpha_vector);
  check_workspace(*p, workspace, workspace_size);
  if (!x || !compressed || !out) throw Error("matmul: null device address for " + shape_str(dtype, n, k, tokens));
  DeviceGuard guard(device);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const float beta = 0.0f;
  const void* a = alpha_vector ? reinterpret_cast<const void*>(alpha_ptr) : static_cast<const void*>(&alpha);
  LT_CHECK(cusparseLtMatmul(p->handle, &p->plan, a, reinterpret_cast<const void*>(compressed),
                            reinterpret_cast<const void*>(x), &beta, reinterpret_cast<const void*>(out),
                            reinterpret_cast<void*>(out), reinterpret_cast<void*>(workspace), &s, 1),
           shape_str(dtype, n, k, tokens));
}

std::vector<PlanInfo> cached_plans() {
  std::lock_guard<std::mutex> lock(g_mutex);
  std::vector<PlanInfo> out;
  out.reserve(g_plans.size());
  for (const auto& kv : g_plans) out.push_back(kv.second->info);
  return out;
}

void clear_plans() {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_plans.clear();
}

}  // namespace armor
