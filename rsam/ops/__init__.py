"""Mask operations: connected components (CUDA extension or CPU fallback) and mask post-processing."""
from rsam.ops.connected_components import connected_components, connected_components_cpu, cuda_extension
from rsam.ops.postprocess import fill_holes, postprocess_masks, remove_small_islands

__all__ = [
    "connected_components",
    "connected_components_cpu",
    "cuda_extension",
    "fill_holes",
    "postprocess_masks",
    "remove_small_islands",
]
