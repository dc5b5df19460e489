"""Position encodings.

* :class:`PositionEmbeddingSine` -- the fixed 2-D sine/cosine encoding of DETR, used by the FPN neck.
* :class:`PositionEmbeddingRandom` -- random Fourier features (Tancik et al. 2020), used by the prompt
  encoder for the dense image PE of the mask decoder and the guidance transformer.

Both return channel-first maps so that they can be added to NCHW features directly.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine", "PositionEmbeddingRandom"]


class PositionEmbeddingSine(nn.Module):
    """Fixed 2-D sine encoding: ``num_pos_feats // 2`` channels for y, then the same number for x.

    Within each half the channels alternate ``sin(p / t_0), cos(p / t_0), sin(p / t_1), ...`` with
    ``t_k = temperature ** (2k / (num_pos_feats // 2))``. Positions are the 1-based row / column indices;
    with ``normalize=True`` they are divided by the last index and multiplied by ``scale`` (default 2*pi),
    so the encoding does not depend on the resolution of the map.

    The module has no parameters or buffers. Encodings are cached per (H, W, device, dtype): the neck
    asks for the same four sizes at every step.
    """

    def __init__(
        self,
        num_pos_feats: int,
        temperature: float = 10000,
        normalize: bool = True,
        scale: Optional[float] = None,
    ) -> None:
        super().__init__()
        if num_pos_feats % 2 != 0:
            raise ValueError(f"PositionEmbeddingSine: num_pos_feats must be even (y and x halves), got {num_pos_feats}")
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: `scale` only has an effect with normalize=True")
        self.num_pos_feats = num_pos_feats // 2  # channels per axis
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self._cache: dict[tuple, torch.Tensor] = {}

    def extra_repr(self) -> str:
        return (f"num_pos_feats={2 * self.num_pos_feats}, temperature={self.temperature}, "
                f"normalize={self.normalize}, scale={self.scale:.4f}")

    @torch.no_grad()
    def _encode(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """(C, H, W) float32 encoding."""
        y = torch.arange(1, height + 1, dtype=torch.float32, device=device)
        x = torch.arange(1, width + 1, dtype=torch.float32, device=device)
        if self.normalize:
            eps = 1e-6  # keeps a 1-pixel axis finite; part of the reference numbers
            y = y / (y[-1] + eps) * self.scale
            x = x / (x[-1] + eps) * self.scale
        k = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)
        dim_t = self.temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / self.num_pos_feats)

        def axis(p: torch.Tensor) -> torch.Tensor:  # (n,) -> (n, num_pos_feats), sin/cos interleaved
            p = p[:, None] / dim_t
            return torch.stack((p[:, 0::2].sin(), p[:, 1::2].cos()), dim=2).flatten(1)

        pos_y = axis(y)[:, None, :].expand(height, width, -1)
        pos_x = axis(x)[None, :, :].expand(height, width, -1)
        return torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, *, H, W) feature map (only its size, device and dtype are used) -> (B, C, H, W)."""
        batch, height, width = x.shape[0], x.shape[-2], x.shape[-1]
        if torch.compiler.is_compiling():
            # traced: the encoding becomes part of the graph (shapes are static); a cache lookup would guard on
            # the dict's contents and recompile once it fills
            return self._encode(height, width, x.device).to(x.dtype)[None].expand(batch, -1, -1, -1)
        key = (height, width, x.device, x.dtype)
        pos = self._cache.get(key)
        if pos is None:
            # A tensor made under inference_mode (e.g. by the predictor) would stay an inference tensor in
            # the cache and break a later training forward that saves it for backward: build it outside.
            with torch.inference_mode(False):
                pos = self._encode(height, width, x.device).to(x.dtype)
            self._cache[key] = pos
        # expand, not repeat: identical for every image, and callers never write into it
        return pos[None].expand(batch, -1, -1, -1)


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of normalised (x, y) coordinates.

    A fixed Gaussian matrix ``G`` (2, num_pos_feats) maps coordinates in [0, 1], first rescaled to
    [-1, 1], to ``2*pi * (2c - 1) @ G``; the encoding is ``[sin, cos]`` of that, 2 * num_pos_feats channels.
    ``G`` is a persistent buffer (not a parameter): it is part of every checkpoint and is never trained.
    """

    def __init__(self, num_pos_feats: int = 64, scale: Optional[float] = None) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """size: (H, W) grid -> (C, H, W) encoding of the cell centres, C = 2 * num_pos_feats."""
        h, w = size
        g = self.positional_encoding_gaussian_matrix  # (2, F): row 0 weighs x, row 1 weighs y

        def centred(n: int) -> torch.Tensor:  # cell centres (i + 0.5) / n in [0, 1], mapped to [-1, 1]
            return 2 * ((torch.arange(n, device=g.device, dtype=g.dtype) + 0.5) / n) - 1

        ys, xs = torch.meshgrid(centred(h), centred(w), indexing="ij")
        phase = 2 * math.pi * (torch.stack((xs, ys), dim=-1) @ g)  # (H, W, F)
        return torch.cat([phase.sin(), phase.cos()], dim=-1).permute(2, 0, 1)
