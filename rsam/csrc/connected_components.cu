// Host launcher for the connected-components kernels (connected_components.cuh).
//
// Kept free of torch headers on purpose: nvcc then compiles this file in seconds per GPU
// architecture, and only the small binding in ext.cpp pays for the torch headers (once, with the
// host compiler).
#include <cuda_runtime.h>

#include <cstdint>

#include "connected_components.cuh"

namespace rsam {
namespace cc {

// Labels a batch of n binary masks of h x w pixels (any non-zero byte is foreground).
// Scratch: `code` holds `nodes` bytes, `parent` and `area` `nodes` int32 each, with
// nodes = n * ceil(h / 2) * ceil(w / 2). The caller checks that nodes and h * w fit in int32.
// `labels` and `areas` must be contiguous and 8-byte aligned. Four launches on `stream`,
// whatever n is; returns the launch status.
cudaError_t launch_connected_components(const uint8_t* mask, int32_t* labels, int32_t* areas,
                                        uint8_t* code, int32_t* parent, int32_t* area, int n,
                                        int h, int w, cudaStream_t stream) {
  Geometry g;
  g.height = h;
  g.width = w;
  g.block_cols = (w + 1) / 2;
  g.blocks = ((h + 1) / 2) * g.block_cols;
  g.nodes = n * g.blocks;
  if (g.nodes == 0) return cudaSuccess;

  const dim3 grid(static_cast<unsigned>((static_cast<int64_t>(g.nodes) + kThreads - 1) / kThreads));
  const dim3 block(kThreads);
  init_blocks<<<grid, block, 0, stream>>>(mask, code, parent, area, g);
  merge_blocks<<<grid, block, 0, stream>>>(code, parent, g);
  compress_blocks<<<grid, block, 0, stream>>>(code, parent, area, g);
  write_pixels<<<grid, block, 0, stream>>>(code, parent, area, labels, areas, g);
  return cudaGetLastError();
}

}  // namespace cc
}  // namespace rsam
