// One group of ARMOR's 2:4 format expanded to 4 dense 16-bit values; shared by the CUDA
// kernel (expand24.cu) and a host loop (checked against armor_kernels.sparse24 on CPU).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define ARMOR_HD __host__ __device__ __forceinline__
#else
#define ARMOR_HD inline
#endif

namespace armor {

// Group i (row-major over [rows, groups]): values hold its 2 kept entries as one 32-bit word
// (lower column first), meta a nibble i0 | i1 << 2 (even group in the low half of a byte).
// Returns the 4 dense entries, column j in bits 16j..16j+15 (little endian), zeros elsewhere.
ARMOR_HD uint64_t expand24_group(const uint32_t* values, const uint8_t* meta, int64_t i, int64_t groups,
                                 int64_t meta_cols) {
  const int64_t row = i / groups;
  const int64_t g = i - row * groups;
  const uint32_t nibble = (meta[row * meta_cols + (g >> 1)] >> ((g & 1) * 4)) & 0xF;
  const uint32_t i0 = nibble & 3, i1 = nibble >> 2;
  const uint32_t pair = values[i];
  return (uint64_t(pair & 0xFFFF) << (16 * i0)) | (uint64_t(pair >> 16) << (16 * i1));
}

}  // namespace armor
