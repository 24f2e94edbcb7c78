// Expand ARMOR's compressed 2:4 core into the dense matrix cuSPARSELt compresses.
//
// Input  values [rows, cols/2] (2 kept 16-bit values per group of 4 columns)
//        meta   uint8 [rows, ceil(cols/8)] (a nibble per group: i0 | i1 << 2, even group low)
// Output dense  [rows, cols] row-major, dropped positions +0.0.
// fp16 and bf16 are both 16 bits and copied bit for bit, so one kernel serves both.
#include <cuda_runtime.h>

#include <cstdint>

#include "armor_cuda.h"
#include "expand24.h"

namespace {

// One thread per group of 4 columns: a 4-byte load of the 2 kept values, an 8-byte store.
__global__ void expand24_kernel(const uint32_t* __restrict__ values, const uint8_t* __restrict__ meta,
                                uint64_t* __restrict__ dense, int64_t rows, int64_t groups, int64_t meta_cols) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < rows * groups; i += stride) {
    dense[i] = armor::expand24_group(values, meta, i, groups, meta_cols);
  }
}

}  // namespace

namespace armor {

int launch_expand24(const void* values, const uint8_t* meta, void* dense, int64_t rows, int64_t cols, void* stream) {
  const int64_t groups = cols / 4;
  const int64_t total = rows * groups;
  if (total == 0) return int(cudaSuccess);
  const int threads = 256;
  // grid-stride loop: cap the grid, every thread handles several groups on big layers
  const int64_t blocks = (total + threads - 1) / threads;
  const int grid = int(blocks < 65535 ? blocks : 65535);
  expand24_kernel<<<grid, threads, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const uint32_t*>(values), meta, static_cast<uint64_t*>(dense), rows, groups, (groups + 1) / 2);
  return int(cudaGetLastError());
}

}  // namespace armor
