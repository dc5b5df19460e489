// Connected-component labelling of binary masks, 8-connectivity: the device code.
//
// Algorithm: block-based union-find (BUF; Allegretti, Bolelli and Grana, "Optimized Block-Based
// Algorithms to Label Connected Components on GPUs", IEEE TPDS 31(2), 2020), written for a whole
// batch at once. Every phase is one launch over all 2x2 pixel blocks of all N images.
//
//   1. init_blocks      each block's 4-bit foreground code; parent = self; area = 0.
//   2. merge_blocks     union with the left / upper neighbour blocks the pixels touch.
//   3. compress_blocks  point every block at its root; add its pixel count to the root's area.
//   4. write_pixels     labels and areas for the four pixels of every block.
//
// Why 2x2 blocks: any two pixels of a 2x2 block are 8-adjacent, so a block is a single node of the
// union-find forest. That is 4x fewer nodes, unions and atomics than a per-pixel forest.
//
// Node ids are global (image * blocks_per_image + local), so one forest holds the whole batch;
// images never touch because unions only happen between blocks of the same image.
//
// Determinism: a union always hooks the larger root under the smaller one, so once merging is done
// the root of a component is its smallest block id, whatever the thread timing. The label of a
// component is 1 + the raster index (y * W + x) of that block's top-left pixel: unique within the
// image, never 0, and identical to what the CPU fallback (rsam/ops/connected_components.py) returns.
//
// Odd H or W: the last block row / column is partial; its pixels outside the image are background.
//
// This header is plain CUDA C++ with no host or torch code: it only uses threadIdx, blockIdx,
// blockDim, atomicCAS, atomicAdd, __popc and int2 (plus warp intrinsics behind __CUDA_ARCH__), so the
// tests can also compile it for a sequential CPU emulation of the CUDA execution model.
#pragma once

#include <cstdint>

namespace rsam {
namespace cc {

// Bits of a block's foreground code; the pixels of a 2x2 block are laid out as
//   A B
//   C D
constexpr uint8_t kA = 1;
constexpr uint8_t kB = 2;
constexpr uint8_t kC = 4;
constexpr uint8_t kD = 8;

// Threads per CUDA block for every kernel; a multiple of the warp size (compress_blocks needs
// full warps for its warp-level aggregation).
constexpr int kThreads = 256;

// Sizes shared by all kernels. The host checks that `nodes` and `height * width` fit in int32.
struct Geometry {
  int height;      // H, pixels
  int width;       // W, pixels
  int block_cols;  // ceil(W / 2)
  int blocks;      // ceil(H / 2) * ceil(W / 2): union-find nodes per image
  int nodes;       // N * blocks: union-find nodes in the batch
};

// Follows parent pointers to the root, without writing.
__device__ __forceinline__ int find_root(const int* parent, int v) {
  int next = parent[v];
  while (next != v) {
    v = next;
    next = parent[v];
  }
  return v;
}

// Follows parent pointers to the root, pointing every visited node at its grandparent (path
// splitting) to keep the trees shallow while other threads are still merging.
//
// Safe under concurrency because parent[v] <= v always holds and only roots are ever re-hooked
// (unite uses atomicCAS(&parent[root], root, smaller)): a non-root's parent is only replaced by
// one of its own ancestors, so no union is lost and the walk strictly descends. Not used once
// merging is over: compress_blocks must not overwrite a parent that another thread has just set
// to the final root.
__device__ __forceinline__ int find_root_splitting(int* parent, int v) {
  int next = parent[v];
  while (next != v) {
    const int grand = parent[next];
    if (grand != next) parent[v] = grand;
    v = next;
    next = grand;
  }
  return v;
}

// Joins the trees of a and b, hooking the larger root under the smaller. A failed CAS means
// another thread re-hooked that root first; retry from the fresh parent it returned. Each
// failure implies another thread's successful hook, so the loop terminates.
__device__ __forceinline__ void unite(int* parent, int a, int b) {
  while (true) {
    a = find_root_splitting(parent, a);
    b = find_root_splitting(parent, b);
    if (a == b) return;
    if (a > b) {
      const int t = a;
      a = b;
      b = t;
    }
    const int seen = atomicCAS(&parent[b], b, a);
    if (seen == b) return;
    b = seen;
  }
}

// The node (2x2 block) of this thread; 64-bit so that the last CUDA block cannot overflow.
__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

// Phase 1: one thread per block.
__global__ void init_blocks(const uint8_t* __restrict__ mask, uint8_t* __restrict__ code,
                            int* __restrict__ parent, int* __restrict__ area, Geometry g) {
  const int64_t thread = global_thread();
  if (thread >= g.nodes) return;
  const int node = static_cast<int>(thread);
  const int image = node / g.blocks;
  const int local = node - image * g.blocks;
  const int by = local / g.block_cols;
  const int bx = local - by * g.block_cols;
  const int y = 2 * by;
  const int x = 2 * bx;
  const bool has_right = x + 1 < g.width;
  const bool has_below = y + 1 < g.height;

  const uint8_t* top = mask + (static_cast<int64_t>(image) * g.height + y) * g.width + x;
  uint8_t bits = 0;
  if (top[0]) bits |= kA;
  if (has_right && top[1]) bits |= kB;
  if (has_below) {
    const uint8_t* bottom = top + g.width;
    if (bottom[0]) bits |= kC;
    if (has_right && bottom[1]) bits |= kD;
  }
  code[node] = bits;
  parent[node] = node;
  area[node] = 0;
}

// Phase 2: one thread per block; unions with the upper-left, upper, upper-right and left blocks
// (the lower and right neighbours do the symmetric work). Which pixels touch:
//   upper:       our A/B with its C/D   (all such pairs are 8-adjacent)
//   upper-left:  our A with its D
//   upper-right: our B with its C
//   left:        our A/C with its B/D
// A union is skipped when the two blocks are already joined through a union that is always done
// (by us, or by the thread of an earlier block): with every block of a solid region this leaves a
// single union (with the upper block) instead of four.
__global__ void merge_blocks(const uint8_t* __restrict__ code, int* parent, Geometry g) {
  const int64_t thread = global_thread();
  if (thread >= g.nodes) return;
  const int node = static_cast<int>(thread);
  const uint8_t own = code[node];
  if (!own) return;
  const int local = node % g.blocks;
  const int by = local / g.block_cols;
  const int bx = local - by * g.block_cols;
  const bool has_left = bx > 0;
  const bool has_right = bx + 1 < g.block_cols;

  bool up = false;    // joined to the upper block
  bool diag = false;  // joined to the upper-left block
  uint8_t above = 0;
  if (by > 0) {
    const int n_up = node - g.block_cols;
    above = code[n_up];
    up = (own & (kA | kB)) && (above & (kC | kD));
    if (up) unite(parent, node, n_up);
    if (has_left && (own & kA)) {
      const uint8_t above_left = code[n_up - 1];
      diag = (above_left & kD) != 0;
      // The upper block's C touches the upper-left block's D, so the upper block's own
      // left-union has already joined them.
      if (diag && !(up && (above & kC))) unite(parent, node, n_up - 1);
    }
    if (has_right && (own & kB)) {
      const uint8_t above_right = code[n_up + 1];
      // The upper block's D touches the upper-right block's C: joined by that block's left-union.
      if ((above_right & kC) && !(up && (above & kD))) unite(parent, node, n_up + 1);
    }
  }
  if (has_left && (own & (kA | kC))) {
    const uint8_t left = code[node - 1];
    if (left & (kB | kD)) {
      // The left block's B touches the upper-left block's D (vertically) and the upper block's C
      // (diagonally); either path already joins us to the left block.
      const bool via_above = (left & kB) && (diag || (up && (above & kC)));
      if (!via_above) unite(parent, node, node - 1);
    }
  }
}

// Phase 3: one thread per block; points every block straight at its root (each thread writes only
// its own parent, with the final root, so concurrent finds stay correct) and accumulates the pixel
// count of each component on its root. No early return: the warp-level aggregation below needs
// all 32 lanes of the warp.
__global__ void compress_blocks(const uint8_t* __restrict__ code, int* parent, int* __restrict__ area,
                                Geometry g) {
  const int64_t thread = global_thread();
  const int node = static_cast<int>(thread);
  int root = -1;
  int count = 0;
  if (thread < g.nodes) {
    const uint8_t own = code[node];
    if (own) {
      root = find_root(parent, node);
      parent[node] = root;
      count = __popc(own);
    }
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  // Neighbouring blocks mostly share a root; one atomicAdd per distinct root per warp instead of
  // one per block avoids serialising thousands of atomics on the same address for large regions.
  // count <= 4 fits in three bits, so three ballots give every peer group's sum.
  const unsigned all = 0xffffffffu;
  const unsigned peers = __match_any_sync(all, root);
  const unsigned bit0 = __ballot_sync(all, count & 1);
  const unsigned bit1 = __ballot_sync(all, count & 2);
  const unsigned bit2 = __ballot_sync(all, count & 4);
  const int lane = static_cast<int>(threadIdx.x) & 31;
  if (root >= 0 && __ffs(peers) - 1 == lane) {
    atomicAdd(&area[root], __popc(peers & bit0) + 2 * __popc(peers & bit1) + 4 * __popc(peers & bit2));
  }
#else
  if (root >= 0) atomicAdd(&area[root], count);
#endif
}

// Phase 4: one thread per block writes its (up to) four pixels of `labels` and `areas`; every
// output pixel is written, background ones with 0. With an even width, rows start at even
// offsets, so each block row is one 8-byte store per output.
__global__ void write_pixels(const uint8_t* __restrict__ code, const int* __restrict__ parent,
                             const int* __restrict__ area, int* __restrict__ labels,
                             int* __restrict__ areas, Geometry g) {
  const int64_t thread = global_thread();
  if (thread >= g.nodes) return;
  const int node = static_cast<int>(thread);
  const int image = node / g.blocks;
  const int local = node - image * g.blocks;
  const int by = local / g.block_cols;
  const int bx = local - by * g.block_cols;
  const int y = 2 * by;
  const int x = 2 * bx;

  const uint8_t own = code[node];
  int label = 0;
  int size = 0;
  if (own) {
    const int root = parent[node];
    size = area[root];
    const int root_local = root - image * g.blocks;
    const int ry = root_local / g.block_cols;
    const int rx = root_local - ry * g.block_cols;
    label = 1 + 2 * ry * g.width + 2 * rx;
  }

  const int64_t offset = (static_cast<int64_t>(image) * g.height + y) * g.width + x;
  const bool has_right = x + 1 < g.width;
  const bool has_below = y + 1 < g.height;
  const int la = (own & kA) ? label : 0, lb = (own & kB) ? label : 0;
  const int lc = (own & kC) ? label : 0, ld = (own & kD) ? label : 0;
  const int sa = (own & kA) ? size : 0, sb = (own & kB) ? size : 0;
  const int sc = (own & kC) ? size : 0, sd = (own & kD) ? size : 0;
  if ((g.width & 1) == 0) {
    *reinterpret_cast<int2*>(labels + offset) = make_int2(la, lb);
    *reinterpret_cast<int2*>(areas + offset) = make_int2(sa, sb);
    if (has_below) {
      *reinterpret_cast<int2*>(labels + offset + g.width) = make_int2(lc, ld);
      *reinterpret_cast<int2*>(areas + offset + g.width) = make_int2(sc, sd);
    }
  } else {
    labels[offset] = la;
    areas[offset] = sa;
    if (has_right) {
      labels[offset + 1] = lb;
      areas[offset + 1] = sb;
    }
    if (has_below) {
      labels[offset + g.width] = lc;
      areas[offset + g.width] = sc;
      if (has_right) {
        labels[offset + g.width + 1] = ld;
        areas[offset + g.width + 1] = sd;
      }
    }
  }
}

}  // namespace cc
}  // namespace rsam
