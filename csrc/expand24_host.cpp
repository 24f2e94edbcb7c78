// Host loop over the same group function the CUDA kernel runs (see expand24.h).
#include "armor_cuda.h"
#include "expand24.h"

namespace armor {

void expand24_host(const void* values, const uint8_t* meta, void* dense, int64_t rows, int64_t cols) {
  if (cols % 4) throw Error("expand24_host: cols = " + std::to_string(cols) + " is not a multiple of 4");
  const int64_t groups = cols / 4;
  auto* out = static_cast<uint64_t*>(dense);
  for (int64_t i = 0; i < rows * groups; ++i) {
    out[i] = expand24_group(static_cast<const uint32_t*>(values), meta, i, groups, (groups + 1) / 2);
  }
}

}  // namespace armor
