"""Connected components (rsam.ops) and mask post-processing.

- CPU fallback vs scipy.ndimage.label (3x3 structure = 8-connectivity): same partition, same areas,
  and the documented ids (1 + raster index of the top-left pixel of the component's first 2x2 block).
- The CUDA kernels compiled for a sequential CPU emulation of the CUDA execution model (g++), with
  several thread orders: checks the kernel logic (indexing, borders, odd sizes, unions) without a GPU.
- The CUDA op on a GPU against the CPU fallback (skipped without CUDA).
- The extension compiles with the installed CUDA toolkit (skipped without one).
- fill_holes / remove_small_islands / postprocess_masks.
"""
from __future__ import annotations

import ctypes
import importlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rsam.ops import (
    connected_components,
    connected_components_cpu,
    cuda_extension,
    fill_holes,
    postprocess_masks,
    remove_small_islands,
)

# The module, not the function of the same name that rsam.ops re-exports.
cc_module = importlib.import_module("rsam.ops.connected_components")
try:  # scipy is a dev dependency; the GPU tests compare against the CPU fallback and run without it
    from scipy import ndimage
except ImportError:
    ndimage = None
needs_scipy = pytest.mark.skipif(ndimage is None, reason="needs scipy (pip install -e .[dev])")

CSRC = Path(cc_module.__file__).resolve().parents[1] / "csrc"
EIGHT = np.ones((3, 3), dtype=int)

KINDS = ["noise", "sparse", "dense", "blobs", "empty", "full", "pixel", "diagonal", "checker", "snake"]


def make_masks(kind: str, n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(n,1,h,w) bool test masks of one kind."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(h).view(h, 1)
    x = torch.arange(w).view(1, w)
    if kind in ("noise", "sparse", "dense"):
        p = {"noise": 0.5, "sparse": 0.15, "dense": 0.85}[kind]
        return torch.rand(n, 1, h, w, generator=g) < p
    if kind == "blobs":  # the benchmark's smooth blobs: 16x-upsampled uniform noise > 0.6
        coarse = torch.rand(n, 1, -(-h // 16) + 1, -(-w // 16) + 1, generator=g)
        return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) > 0.6
    if kind == "empty":
        return torch.zeros(n, 1, h, w, dtype=torch.bool)
    if kind == "full":
        return torch.ones(n, 1, h, w, dtype=torch.bool)
    if kind == "pixel":  # one pixel per image: the four corners, then random places
        masks = torch.zeros(n, 1, h, w, dtype=torch.bool)
        corners = [(0, 0), (h - 1, w - 1), (0, w - 1), (h - 1, 0)]
        for i in range(n):
            py, px = corners[i] if i < 4 else (int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g)))
            masks[i, 0, py, px] = True
        return masks
    if kind == "diagonal":  # 1-px diagonals: connected only through corners
        masks = torch.stack([((x - y) % 5 == 0) if i % 2 == 0 else ((x + y) % 6 == 0) for i in range(n)])
        return masks.unsqueeze(1).expand(n, 1, h, w).clone()
    if kind == "checker":  # a single component under 8-connectivity
        return (((x + y) % 2) == 0).expand(n, 1, h, w).clone()
    if kind == "snake":  # one long serpentine 1-px path: the worst case for label propagation
        m = torch.zeros(h, w, dtype=torch.bool)
        for i, row in enumerate(range(0, h, 3)):
            m[row] = True
            m[row : row + 3, w - 1 if i % 2 == 0 else 0] = True
        return m.expand(n, 1, h, w).clone()
    raise ValueError(kind)


def reference(masks: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Expected (labels, areas) from scipy.ndimage.label, with the ids of the rsam contract."""
    m = masks.cpu().numpy() != 0
    n, _, h, w = m.shape
    cols = (w + 1) // 2
    yy, xx = np.mgrid[:h, :w]
    block = ((yy // 2) * cols + xx // 2).ravel()
    labels = np.zeros(m.shape, np.int32)
    areas = np.zeros(m.shape, np.int32)
    for i in range(n):
        ref, k = ndimage.label(m[i, 0], structure=EIGHT)
        first = np.full(k + 1, np.iinfo(np.int64).max)
        np.minimum.at(first, ref.ravel(), block)
        ids = 1 + 2 * (first // cols) * w + 2 * (first % cols)
        ids[0] = 0
        labels[i, 0] = ids[ref]
        areas[i, 0] = np.bincount(ref.ravel(), minlength=k + 1)[ref] * (ref > 0)
    return labels, areas


def assert_matches_scipy(masks: torch.Tensor, labels: torch.Tensor, areas: torch.Tensor) -> None:
    """Same partition and areas as scipy (label values aside), then the exact documented ids."""
    assert labels.shape == areas.shape == masks.shape
    assert labels.dtype == areas.dtype == torch.int32
    m = masks.cpu().numpy() != 0
    lab, area = labels.cpu().numpy(), areas.cpu().numpy()
    for i in range(m.shape[0]):
        fg = m[i, 0]
        ref, k = ndimage.label(fg, structure=EIGHT)
        assert np.array_equal(lab[i, 0] > 0, fg), f"image {i}: foreground support differs"
        pairs = np.unique(np.stack([lab[i, 0][fg], ref[fg]]), axis=1)
        assert pairs.shape[1] == k == len(np.unique(lab[i, 0][fg])), f"image {i}: partition differs from scipy"
        assert np.array_equal(area[i, 0], np.bincount(ref.ravel(), minlength=k + 1)[ref] * fg), f"image {i}: areas"
    expected_labels, expected_areas = reference(masks)
    np.testing.assert_array_equal(lab, expected_labels)
    np.testing.assert_array_equal(area, expected_areas)


# ------------------------------------------------------------------------------------------------
# CPU fallback


@needs_scipy
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(3, 64, 64), (2, 33, 47), (1, 1, 1), (2, 1, 9), (2, 9, 1), (1, 2, 2), (1, 130, 97)])
def test_cpu_matches_scipy(kind, shape):
    masks = make_masks(kind, *shape, seed=sum(shape))
    labels, areas = connected_components_cpu(masks)
    assert_matches_scipy(masks, labels, areas)


@needs_scipy
def test_cpu_800px_is_correct():
    # speed is benchmarks/bench_cc.py's business, not a test's
    masks = make_masks("noise", 1, 800, 800)
    labels, areas = connected_components(masks)
    assert_matches_scipy(masks, labels, areas)


def test_batch_is_labelled_per_image():
    masks = torch.cat([make_masks(k, 1, 37, 50, seed=i) for i, k in enumerate(["noise", "blobs", "empty", "snake"])])
    labels, areas = connected_components(masks)
    for i in range(len(masks)):
        alone = connected_components(masks[i : i + 1])
        assert torch.equal(labels[i : i + 1], alone[0]) and torch.equal(areas[i : i + 1], alone[1])


def test_input_dtypes_and_layouts():
    masks = make_masks("noise", 2, 31, 40)
    expected = connected_components(masks)
    as_bytes = masks.to(torch.uint8) * 255  # any non-zero byte is foreground
    for variant in (as_bytes, masks.transpose(2, 3).contiguous().transpose(2, 3)):
        got = connected_components(variant)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_bad_input_is_reported_clearly():
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        connected_components(torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        connected_components(torch.zeros(1, 2, 4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool or uint8"):
        connected_components(torch.zeros(1, 1, 4, 4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        connected_components(np.zeros((1, 1, 4, 4), bool))


def test_empty_batch():
    labels, areas = connected_components(torch.zeros(0, 1, 5, 6, dtype=torch.bool))
    assert labels.shape == areas.shape == (0, 1, 5, 6) and labels.dtype == torch.int32


# ------------------------------------------------------------------------------------------------
# The CUDA kernels in a sequential CPU emulation

EMULATOR = r"""
// Sequential emulation of the CUDA execution model, enough for connected_components.cuh: each
// thread runs to completion, one at a time, in the order given by `seed` -- every such order is a
// legal schedule of the real kernels (atomics become plain read-modify-writes).
#include <algorithm>
#include <cstdint>
#include <random>
#include <utility>
#include <vector>

struct EmuIndex { unsigned x, y, z; };
static EmuIndex threadIdx, blockIdx, blockDim;
struct int2 { int x, y; };
static inline int2 make_int2(int x, int y) { return {x, y}; }
static inline int atomicCAS(int* p, int expected, int value) { int old = *p; if (old == expected) *p = value; return old; }
static inline int atomicAdd(int* p, int value) { int old = *p; *p += value; return old; }
static inline int __popc(unsigned v) { return __builtin_popcount(v); }
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__

#include "connected_components.cuh"

template <class Kernel>
static void launch(int nodes, unsigned seed, Kernel kernel) {
  const unsigned blocks = (nodes + rsam::cc::kThreads - 1) / rsam::cc::kThreads;
  std::vector<std::pair<unsigned, unsigned>> order;
  for (unsigned b = 0; b < blocks; ++b)
    for (unsigned t = 0; t < unsigned(rsam::cc::kThreads); ++t) order.emplace_back(b, t);
  if (seed == 1) std::reverse(order.begin(), order.end());
  if (seed > 1) std::shuffle(order.begin(), order.end(), std::mt19937(seed));
  blockDim = {unsigned(rsam::cc::kThreads), 1, 1};
  for (auto [b, t] : order) {
    blockIdx = {b, 0, 0};
    threadIdx = {t, 0, 0};
    kernel();
  }
}

extern "C" void emulate(const uint8_t* mask, int32_t* labels, int32_t* areas, int n, int h, int w,
                        unsigned seed) {
  using namespace rsam::cc;
  Geometry g;
  g.height = h;
  g.width = w;
  g.block_cols = (w + 1) / 2;
  g.blocks = ((h + 1) / 2) * g.block_cols;
  g.nodes = n * g.blocks;
  std::vector<uint8_t> code(g.nodes);
  std::vector<int> parent(g.nodes), area(g.nodes);
  launch(g.nodes, seed, [&] { init_blocks(mask, code.data(), parent.data(), area.data(), g); });
  launch(g.nodes, seed, [&] { merge_blocks(code.data(), parent.data(), g); });
  launch(g.nodes, seed, [&] { compress_blocks(code.data(), parent.data(), area.data(), g); });
  launch(g.nodes, seed, [&] { write_pixels(code.data(), parent.data(), area.data(), labels, areas, g); });
}
"""


@pytest.fixture(scope="module")
def emulated_kernel(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler to build the CPU emulation of the CUDA kernels")
    folder = tmp_path_factory.mktemp("cc_emulator")
    (folder / "emulator.cpp").write_text(EMULATOR)
    library = folder / "emulator.so"
    subprocess.run(
        [compiler, "-std=c++17", "-O2", "-fno-strict-aliasing", "-shared", "-fPIC", f"-I{CSRC}",
         str(folder / "emulator.cpp"), "-o", str(library)],
        check=True, capture_output=True, text=True, timeout=120,
    )
    lib = ctypes.CDLL(str(library))

    def run(masks: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        m = np.ascontiguousarray(masks.numpy().astype(np.uint8))
        labels = np.full(m.shape, -1, np.int32)  # the kernel must write every pixel
        areas = np.full(m.shape, -1, np.int32)
        n, _, h, w = m.shape
        pointer = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
        lib.emulate(pointer(m), pointer(labels), pointer(areas), n, h, w, ctypes.c_uint(seed))
        return torch.from_numpy(labels), torch.from_numpy(areas)

    return run


@needs_scipy
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(3, 64, 64), (2, 33, 47), (1, 1, 1), (2, 1, 9), (2, 9, 1), (2, 97, 130)])
def test_emulated_kernel_matches_scipy(emulated_kernel, kind, shape):
    masks = make_masks(kind, *shape, seed=sum(shape))
    for seed in (0, 1, 7):  # raster order, reverse order, a random order
        labels, areas = emulated_kernel(masks, seed)
        assert_matches_scipy(masks, labels, areas)


# ------------------------------------------------------------------------------------------------
# The CUDA op (needs a GPU)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_extension = pytest.mark.skipif(
    not torch.cuda.is_available() or cuda_extension() is None, reason="needs a CUDA device and the rsam._C extension"
)


@needs_extension
@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape",
    [(1, 64, 64), (256, 64, 64), (7, 65, 63), (16, 257, 255), (32, 200, 200), (2, 1024, 1024),
     (1, 1023, 1025), (4, 1, 1024), (4, 1024, 1), (2, 1, 1)],
)
def test_cuda_matches_cpu(shape):
    for kind in KINDS:
        masks = make_masks(kind, *shape, seed=sum(shape))
        labels, areas = connected_components(masks.cuda())
        assert labels.is_cuda and areas.is_cuda
        expected = connected_components_cpu(masks)
        assert torch.equal(labels.cpu(), expected[0]), f"{kind}: CUDA labels differ from the CPU fallback"
        assert torch.equal(areas.cpu(), expected[1]), f"{kind}: CUDA areas differ from the CPU fallback"
        if ndimage is not None and masks.numel() <= 300_000:
            assert_matches_scipy(masks, labels, areas)


@needs_extension
@pytest.mark.gpu
def test_cuda_blobs_256_batch_and_determinism():
    masks = make_masks("blobs", 256, 256, 256).cuda()
    first = connected_components(masks)
    second = connected_components(masks.to(torch.uint8))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    expected = connected_components_cpu(masks.cpu())
    assert torch.equal(first[0].cpu(), expected[0]) and torch.equal(first[1].cpu(), expected[1])


@needs_extension
@pytest.mark.gpu
def test_cuda_strided_input_and_errors():
    base = make_masks("noise", 4, 90, 70).cuda()
    view = base[1:3, :, 3:, 1:]  # non-contiguous, odd offsets
    got = connected_components(view)
    expected = connected_components_cpu(view.cpu())
    assert torch.equal(got[0].cpu(), expected[0]) and torch.equal(got[1].cpu(), expected[1])
    extension = cuda_extension()
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        extension.connected_components(base.cpu())
    with pytest.raises(RuntimeError, match="uint8 or bool"):
        extension.connected_components(base.float())


@needs_cuda
@pytest.mark.gpu
def test_cuda_without_extension_warns_once(monkeypatch):
    monkeypatch.setattr(cc_module, "_extension_checked", True)
    monkeypatch.setattr(cc_module, "_extension", None)
    monkeypatch.setattr(cc_module, "_warned_fallback", False)
    masks = make_masks("blobs", 2, 64, 64).cuda()
    with pytest.warns(RuntimeWarning, match="CPU fallback") as record:
        labels, areas = connected_components(masks)
        connected_components(masks)
    assert len([w for w in record if "CPU fallback" in str(w.message)]) == 1
    assert labels.device == masks.device
    expected = connected_components_cpu(masks.cpu())
    assert torch.equal(labels.cpu(), expected[0]) and torch.equal(areas.cpu(), expected[1])


# ------------------------------------------------------------------------------------------------
# The extension builds


def _cuda_toolkit() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    for root in ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []) + ["/usr/local/cuda"]:
        if os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


@pytest.mark.skipif(_cuda_toolkit() is None, reason="no CUDA toolkit (nvcc) on this machine")
@pytest.mark.skipif(os.environ.get("RSAM_BUILD_CUDA") == "0", reason="RSAM_BUILD_CUDA=0")
def test_extension_compiles(tmp_path, monkeypatch):
    """`pip install` built rsam._C from the current sources; otherwise compile them here (~30 s)."""
    sources = [CSRC / "ext.cpp", CSRC / "connected_components.cu"]
    try:
        module = importlib.import_module("rsam._C")
        built = Path(module.__file__).stat().st_mtime
        stale = any(p.stat().st_mtime > built for p in [*sources, CSRC / "connected_components.cuh"])
    except ImportError:
        module, stale = None, True
    if stale:
        from torch.utils import cpp_extension

        monkeypatch.setattr(cpp_extension, "CUDA_HOME", _cuda_toolkit())
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0")
        monkeypatch.setenv("MAX_JOBS", os.environ.get("MAX_JOBS", "2"))
        module = cpp_extension.load(
            name="rsam_cc_compile_test",
            sources=[str(p) for p in sources],
            extra_cflags=["-O1"],
            extra_cuda_cflags=["-O3"],
            build_directory=str(tmp_path),
            verbose=False,
        )
    assert callable(module.connected_components)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        module.connected_components(torch.zeros(1, 1, 4, 4, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------
# Post-processing


def _grid(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "#" for c in row] for row in rows])


def test_fill_holes_by_area():
    masks = _grid([
        "#########.",
        "#.##...##.",
        "####...##.",
        "#########.",
        "..........",
    ])
    one = fill_holes(masks, 1)  # the 1-px hole only
    assert one[1, 1] and not one[1, 4:7].any()
    six = fill_holes(masks, 6)  # both holes; the large outside region stays
    assert six[:4, :9].all() and not six[4].any() and not six[:, 9].any()
    assert torch.equal(fill_holes(masks, 0), masks)


def test_fill_holes_background_is_8_connected_and_border_pockets_count():
    # The rim is closed only diagonally at the bottom-right corner of the hole, so under
    # 8-connectivity the "hole" leaks into the outside: not filled.
    leaky = _grid([
        "......",
        ".###..",
        ".#.#..",
        ".##.#.",
        "......",
    ])
    assert torch.equal(fill_holes(leaky, 1), leaky)
    # SAM 2 semantics: a small background pocket on the border is a hole too.
    pocket = _grid(["#.#", "###", "###"])
    assert fill_holes(pocket, 1).all()


def test_remove_small_islands():
    masks = _grid([
        "#.....##",
        "......##",
        "..#.....",
        "...#....",
        "........",
    ])
    kept = remove_small_islands(masks, 2)  # the 1-px island goes; the diagonal pair (area 2) stays
    assert not kept[0, 0] and kept[2, 2] and kept[3, 3] and kept[0:2, 6:8].all()
    assert not remove_small_islands(masks, 3)[2:4].any()
    assert remove_small_islands(masks, 4)[0:2, 6:8].all()
    assert not remove_small_islands(masks, 5).any()


@needs_scipy
def test_postprocess_matches_scipy_reference():
    masks = make_masks("noise", 3, 40, 36, seed=3) | make_masks("blobs", 3, 40, 36, seed=4)
    got = postprocess_masks(masks, fill_hole_area=5, min_island_area=4)
    assert got.shape == (3, 1, 40, 36) and got.dtype == torch.bool
    for i in range(3):
        m = masks[i, 0].numpy().copy()
        bg, k = ndimage.label(~m, structure=EIGHT)
        m |= (np.bincount(bg.ravel(), minlength=k + 1)[bg] <= 5) & (bg > 0)
        fg, k = ndimage.label(m, structure=EIGHT)
        m &= np.bincount(fg.ravel(), minlength=k + 1)[fg] >= 4
        np.testing.assert_array_equal(got[i, 0].numpy(), m)


def test_postprocess_logits():
    logits = torch.full((2, 7, 7), -3.0)
    logits[:, 1:5, 1:5] = 2.0
    logits[:, 2, 2] = -1.0  # a 1-px hole
    logits[0, 6, 6] = 0.5  # a 1-px island (not touching the square), only in the first mask
    out = postprocess_masks(logits, fill_hole_area=1, min_island_area=2, threshold=0.0)
    assert out.dtype == logits.dtype and out.shape == logits.shape
    assert (out[:, 2, 2] == 10.0).all() and out[0, 6, 6] == -10.0
    changed = torch.zeros_like(logits, dtype=torch.bool)
    changed[:, 2, 2] = True
    changed[0, 6, 6] = True
    assert torch.equal(out[~changed], logits[~changed])
    assert torch.equal(postprocess_masks(logits), logits)


def test_postprocess_bad_input():
    with pytest.raises(TypeError, match="bool or floating"):
        postprocess_masks(torch.zeros(4, 4, dtype=torch.int64), 1, 1)
    with pytest.raises(ValueError, match="non-negative"):
        fill_holes(torch.zeros(4, 4, dtype=torch.bool), -1)
