// Python binding of the CUDA connected-components op: `rsam._C.connected_components(masks)`.
// Input checks, output allocation and stream selection live here; the kernels are in
// connected_components.cuh and are launched from connected_components.cu.
//
// Narrow includes on purpose: <torch/extension.h> triples the compile time, and
// ATen/cuda/CUDAContext.h needs the cuBLAS/cuSPARSE headers that a minimal CUDA toolkit lacks.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include <torch/csrc/utils/pybind.h>

namespace rsam {
namespace cc {
cudaError_t launch_connected_components(const uint8_t* mask, int32_t* labels, int32_t* areas,
                                        uint8_t* code, int32_t* parent, int32_t* area, int n,
                                        int h, int w, cudaStream_t stream);
}  // namespace cc
}  // namespace rsam

namespace {

// (N,1,H,W) uint8/bool CUDA masks -> (labels, areas), both (N,1,H,W) int32 on the same device.
// labels: 0 on background, otherwise 1 + raster index of the top-left pixel of the component's
// first 2x2 block (unique within an image); areas: the pixel count of each pixel's component.
std::tuple<at::Tensor, at::Tensor> connected_components(const at::Tensor& masks) {
  TORCH_CHECK(masks.is_cuda(), "rsam._C.connected_components: masks must be a CUDA tensor, got device ",
              masks.device());
  TORCH_CHECK(masks.dim() == 4 && masks.size(1) == 1,
              "rsam._C.connected_components: masks must have shape (N, 1, H, W), got ", masks.sizes());
  TORCH_CHECK(masks.scalar_type() == at::kByte || masks.scalar_type() == at::kBool,
              "rsam._C.connected_components: masks must be uint8 or bool, got ", masks.scalar_type());

  const int64_t n = masks.size(0), h = masks.size(2), w = masks.size(3);
  const int64_t int_max = std::numeric_limits<int32_t>::max();
  const int64_t nodes = n * ((h + 1) / 2) * ((w + 1) / 2);
  TORCH_CHECK(h * w <= int_max, "rsam._C.connected_components: H * W = ", h * w,
              " exceeds the int32 label range");
  TORCH_CHECK(nodes <= int_max, "rsam._C.connected_components: batch too large (", nodes,
              " 2x2 blocks > 2^31 - 1); split it");

  const c10::cuda::CUDAGuard guard(masks.device());
  // bool and uint8 share a 1-byte layout; the kernel treats any non-zero byte as foreground.
  at::Tensor input = masks.contiguous();
  if (input.scalar_type() == at::kBool) input = input.view(at::kByte);

  const auto int_options = masks.options().dtype(at::kInt);
  at::Tensor labels = at::empty({n, 1, h, w}, int_options);
  at::Tensor areas = at::empty({n, 1, h, w}, int_options);
  if (nodes == 0) return {labels, areas};

  at::Tensor code = at::empty({nodes}, masks.options().dtype(at::kByte));
  at::Tensor forest = at::empty({2, nodes}, int_options);  // parent, root area
  const cudaError_t status = rsam::cc::launch_connected_components(
      input.data_ptr<uint8_t>(), labels.data_ptr<int32_t>(), areas.data_ptr<int32_t>(),
      code.data_ptr<uint8_t>(), forest[0].data_ptr<int32_t>(), forest[1].data_ptr<int32_t>(),
      static_cast<int>(n), static_cast<int>(h), static_cast<int>(w),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess, "rsam._C.connected_components: kernel launch failed: ",
              cudaGetErrorString(status),
              status == cudaErrorNoKernelImageForDevice
                  ? " (rebuild rsam with TORCH_CUDA_ARCH_LIST naming this GPU's compute capability)"
                  : "");
  return {labels, areas};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "RSAM CUDA ops";
  m.def("connected_components", &connected_components, pybind11::arg("masks"),
        "8-connectivity connected components of (N,1,H,W) uint8/bool CUDA masks -> (labels, areas), "
        "both (N,1,H,W) int32; one launch per phase for the whole batch.");
}
