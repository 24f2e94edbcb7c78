// pybind11 module armor_kernels._C: thin wrappers over armor_cuda.h. Compiled by the host
// compiler without CUDA or torch headers; tensors cross as integer device addresses.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "armor_cuda.h"

namespace py = pybind11;

namespace {

py::dict plan_dict(const armor::PlanInfo& i) {
  py::dict d;
  d["device"] = i.device;
  d["dtype"] = i.dtype == armor::kFloat16 ? "float16" : "bfloat16";
  d["n"] = i.n;
  d["k"] = i.k;
  d["tokens"] = i.tokens;
  d["has_bias"] = i.has_bias;
  d["alpha_vector"] = i.alpha_vector;
  d["searched"] = i.searched;
  d["alg_id"] = i.alg_id;
  d["max_alg_id"] = i.max_alg_id;
  d["split_k"] = i.split_k;
  d["split_k_mode"] = i.split_k_mode;
  d["split_k_buffers"] = i.split_k_buffers;
  d["workspace"] = i.workspace;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ARMOR's cuSPARSELt 2:4 GEMM (device memory passed as integer addresses)";
  py::register_exception<armor::Error>(m, "CudaExtError", PyExc_RuntimeError);

  m.attr("FLOAT16") = int(armor::kFloat16);
  m.attr("BFLOAT16") = int(armor::kBFloat16);

  m.def("versions", [] {
    py::dict d;
    for (const auto& kv : armor::versions()) d[py::str(kv.first)] = kv.second;
    return d;
  });
  m.def("device_count", &armor::device_count);
  m.def("compressed_size", &armor::compressed_size, py::arg("device"), py::arg("dtype"), py::arg("n"), py::arg("k"));
  m.def("compress", &armor::compress, py::arg("device"), py::arg("dtype"), py::arg("n"), py::arg("k"),
        py::arg("values"), py::arg("meta"), py::arg("dense_scratch"), py::arg("compressed"),
        py::arg("compress_buffer"), py::arg("stream"));
  m.def(
      "plan",
      [](int device, int dtype, int64_t n, int64_t k, int64_t tokens, uintptr_t bias, bool alpha_vector, int alg_id,
         int split_k, int split_k_mode, int split_k_buffers) {
        armor::AlgConfig cfg{alg_id, split_k, split_k_mode, split_k_buffers};
        return plan_dict(armor::plan(device, dtype, n, k, tokens, bias, alpha_vector, cfg));
      },
      py::arg("device"), py::arg("dtype"), py::arg("n"), py::arg("k"), py::arg("tokens"), py::arg("bias"),
      py::arg("alpha_vector"), py::arg("alg_id") = -1, py::arg("split_k") = 1, py::arg("split_k_mode") = 0,
      py::arg("split_k_buffers") = 0);
  m.def("plan_workspace", &armor::plan_workspace, py::arg("device"), py::arg("dtype"), py::arg("n"), py::arg("k"),
        py::arg("tokens"), py::arg("bias"), py::arg("alpha_vector"), py::arg("alg_id"));
  m.def(
      "search",
      [](int device, int dtype, int64_t n, int64_t k, int64_t tokens, uintptr_t bias, bool alpha_vector, uintptr_t x,
         uintptr_t compressed, uintptr_t out, uintptr_t alpha_ptr, float alpha, uintptr_t workspace,
         size_t workspace_size, uintptr_t stream) {
        armor::PlanInfo info;
        {
          py::gil_scoped_release release;  // the search runs the GEMM many times
          info = armor::search(device, dtype, n, k, tokens, bias, alpha_vector, x, compressed, out, alpha_ptr, alpha,
                               workspace, workspace_size, stream);
        }
        return plan_dict(info);
      },
      py::arg("device"), py::arg("dtype"), py::arg("n"), py::arg("k"), py::arg("tokens"), py::arg("bias"),
      py::arg("alpha_vector"), py::arg("x"), py::arg("compressed"), py::arg("out"), py::arg("alpha_ptr"),
      py::arg("alpha"), py::arg("workspace"), py::arg("workspace_size"), py::arg("stream"));
  m.def("matmul", &armor::matmul, py::arg("device"), py::arg("dtype"), py::arg("n"), py::arg("k"), py::arg("tokens"),
        py::arg("bias"), py::arg("x"), py::arg("compressed"), py::arg("out"), py::arg("alpha_ptr"), py::arg("alpha"),
        py::arg("workspace"), py::arg("workspace_size"), py::arg("stream"));
  m.def("expand24", &armor::expand24, py::arg("values"), py::arg("meta"), py::arg("dense"), py::arg("rows"),
        py::arg("cols"), py::arg("stream"));
  m.def(
      "expand24_host",
      [](uintptr_t values, uintptr_t meta, uintptr_t dense, int64_t rows, int64_t cols) {
        armor::expand24_host(reinterpret_cast<const void*>(values), reinterpret_cast<const uint8_t*>(meta),
                             reinterpret_cast<void*>(dense), rows, cols);
      },
      py::arg("values"), py::arg("meta"), py::arg("dense"), py::arg("rows"), py::arg("cols"));
  m.def("cached_plans", [] {
    py::list out;
    for (const auto& i : armor::cached_plans()) out.append(plan_dict(i));
    return out;
  });
  m.def("clear_plans", &armor::clear_plans);
}
