"""Hiera trunk (Ryali et al. 2023, "Hiera"; Bolya et al. 2023, "Window attention is bugged") as used by SAM 2.

A plain, hierarchical ViT without convolutions after the patch embedding:

* patch embedding: Conv2d(3, C0, kernel 7, stride 4, padding 3), channels-last afterwards;
* absolute position: a background embedding bicubic-resized to the grid plus a window embedding tiled
  over it ("windowed absolute" position embedding);
* 4 stages; the first block of stages 2..4 doubles the width and the heads and halves the resolution by
  max-pooling its queries ("q-pooling") and its shortcut;
* attention inside non-overlapping windows (padded when the map does not divide), except for a few
  global blocks.

The trunk returns the output of the last block of every stage, NCHW, finest first.
State-dict names equal SAM 2.1's ``image_encoder.trunk.*`` names.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rsam.modeling.activation_checkpointing import run_block
from rsam.modeling.sam.common import MLP

__all__ = ["Hiera", "MultiScaleBlock", "MultiScaleAttention"]


# --------------------------------------------------------------------------------------------------------
# small building blocks


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample (training only)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep  # rescale so the expectation matches eval


class PatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, H/4, W/4, C) with an overlapping 7x7 / stride-4 convolution."""

    def __init__(self, embed_dim: int, in_chans: int = 3, kernel_size: int = 7, stride: int = 4,
                 padding: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


def pool_channels_last(x: torch.Tensor, pool: Optional[nn.Module]) -> torch.Tensor:
    """Apply an NCHW pooling module to a (B, H, W, C) tensor."""
    if pool is None:
        return x
    return pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def to_windows(x: torch.Tensor, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> tiles (B * nh * nw, size, size, C) and the tile grid (nh, nw).

    H and W are zero-padded up to whole tiles. The padded tokens are *not* masked in attention: SAM 2 attends
    to them too (their keys are the qkv bias), and the pretrained weights expect that.
    """
    _, h, w, _ = x.shape
    grid = (-(-h // size), -(-w // size))  # ceil division
    extra_h, extra_w = grid[0] * size - h, grid[1] * size - w
    if extra_h or extra_w:
        x = F.pad(x, (0, 0, 0, extra_w, 0, extra_h))
    tiles = x.unflatten(1, (grid[0], size)).unflatten(3, (grid[1], size))  # (B, nh, size, nw, size, C)
    return tiles.transpose(2, 3).flatten(0, 2), grid


def from_windows(tiles: torch.Tensor, grid: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`to_windows` for tiles of any side: (B * nh * nw, s, s, C) -> (B, H, W, C), cropped to hw.

    The side may differ from the one :func:`to_windows` cut: q-pooling shrinks every tile by its stride.
    """
    rows = tiles.unflatten(0, (-1, grid[0], grid[1])).transpose(2, 3)  # (B, nh, s, nw, s, C)
    x = rows.flatten(3, 4).flatten(1, 2)
    return x[:, : hw[0], : hw[1]]


# --------------------------------------------------------------------------------------------------------
# attention and blocks


class MultiScaleAttention(nn.Module):
    """Multi-head self-attention whose queries may be max-pooled (keys/values keep full resolution).

    Input (B, H, W, dim) -> output (B, H', W', dim_out), with (H', W') = (H, W) / q_stride when pooling.
    """

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_pool: Optional[nn.Module] = None) -> None:
        super().__init__()
        if dim_out % num_heads != 0:
            raise ValueError(f"MultiScaleAttention: dim_out={dim_out} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.q_pool = q_pool
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, dim) -> (B, H', W', dim_out)."""
        # the qkv output's last axis is laid out (q|k|v, head, head_dim): split it, keep the pixel grid
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(-3)  # each (B, H, W, heads, hd)
        if self.q_pool is not None:
            q = pool_channels_last(q.flatten(-2), self.q_pool).unflatten(-1, (self.num_heads, -1))
        out_grid = q.shape[:3]  # (B, H', W')

        def tokens(t: torch.Tensor) -> torch.Tensor:  # (B, H, W, heads, hd) -> (B, heads, HW, hd)
            return t.flatten(1, 2).transpose(1, 2)

        attended = F.scaled_dot_product_attention(tokens(q), tokens(k), tokens(v))
        return self.proj(attended.transpose(1, 2).reshape(*out_grid, -1))


class MultiScaleBlock(nn.Module):
    """Pre-norm transformer block on a channels-last map, optionally a stage transition.

    Transition blocks (``q_stride`` set) change the width dim -> dim_out and pool the queries. Their
    shortcut is ``proj`` (a Linear) of the *normed* input, pooled the same way, so the residual matches.
    Windowed attention cuts ``window_size`` tiles; q-pooling shrinks every tile by the stride but keeps the
    tile grid, which is how the result is put back together. ``window_size == 0`` means global.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        q_stride: Optional[tuple[int, int]] = None,
        window_size: int = 0,
    ) -> None:
        super().__init__()
        self.dim, self.dim_out = dim, dim_out
        self.window_size = window_size
        self.q_stride = tuple(q_stride) if q_stride is not None else None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.pool = (nn.MaxPool2d(kernel_size=self.q_stride, stride=self.q_stride)
                     if self.q_stride is not None else None)
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, q_pool=self.pool)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = MLP(dim_out, int(dim_out * mlp_ratio), dim_out, num_layers=2, activation=nn.GELU)
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, dim) -> (B, H', W', dim_out)."""
        normed = self.norm1(x)
        # A transition's residual is the normed input projected to the new width, pooled like the queries.
        residual = self.proj(normed) if self.dim != self.dim_out else x
        residual = pool_channels_last(residual, self.pool)
        if self.window_size > 0:
            tiles, grid = to_windows(normed, self.window_size)
            attended = from_windows(self.attn(tiles), grid, tuple(residual.shape[1:3]))
        else:
            attended = self.attn(normed)
        x = residual + self.drop_path(attended)
        return x + self.drop_path(self.mlp(self.norm2(x)))


# --------------------------------------------------------------------------------------------------------
# the trunk


class Hiera(nn.Module):
    """Hiera trunk. ``forward((B, 3, H, W)) -> [stride-4, stride-8, stride-16, stride-32]`` NCHW maps.

    H and W must be multiples of 32: the window position embedding is tiled over the stride-4 grid in
    ``window_spec[0]``-sized tiles, and three q-pooling steps halve the grid. Defaults are SAM 2.1 B+.
    """

    def __init__(
        self,
        embed_dim: int = 112,
        num_heads: int = 2,
        drop_path_rate: float = 0.0,
        q_pool: int = 3,
        q_stride: Sequence[int] = (2, 2),
        stages: Sequence[int] = (2, 3, 16, 3),
        dim_mul: float = 2.0,
        head_mul: float = 2.0,
        window_pos_embed_bkg_spatial_size: Sequence[int] = (14, 14),
        window_spec: Sequence[int] = (8, 4, 14, 7),
        global_att_blocks: Sequence[int] = (12, 16, 20),
        mlp_ratio: float = 4.0,
        return_interm_layers: bool = True,
    ) -> None:
        super().__init__()
        stages, window_spec = tuple(stages), tuple(window_spec)
        if len(stages) != len(window_spec):
            raise ValueError(f"Hiera: stages {stages} and window_spec {window_spec} must have the same length")
        if not 0 <= q_pool <= len(stages) - 1:
            raise ValueError(f"Hiera: q_pool={q_pool} must be in [0, {len(stages) - 1}]")
        depth = sum(stages)
        if any(not 0 <= i < depth for i in global_att_blocks):
            raise ValueError(f"Hiera: global_att_blocks {tuple(global_att_blocks)} outside 0..{depth - 1}")
        self.q_stride = tuple(q_stride)
        self.window_spec = window_spec
        self.return_interm_layers = return_interm_layers
        # index of the last block of each stage, and the first block of stages 2.. that pools
        self.stage_ends = [sum(stages[: i + 1]) - 1 for i in range(len(stages))]
        self.q_pool_blocks = [end + 1 for end in self.stage_ends[:-1]][:q_pool]

        self.patch_embed = PatchEmbed(embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *window_pos_embed_bkg_spatial_size))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, embed_dim, window_spec[0], window_spec[0]))

        drop_rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList()
        dim, stage = embed_dim, 0
        for i in range(depth):
            dim_out = dim
            # a transition block still partitions with the previous stage's window: it pools *inside* it
            window = 0 if i in global_att_blocks else window_spec[stage]
            if i - 1 in self.stage_ends:
                dim_out = int(dim * dim_mul)
                num_heads = int(num_heads * head_mul)
                stage += 1
            self.blocks.append(MultiScaleBlock(
                dim, dim_out, num_heads, mlp_ratio=mlp_ratio, drop_path=drop_rates[i],
                q_stride=self.q_stride if i in self.q_pool_blocks else None, window_size=window,
            ))
            dim = dim_out

        ends = self.stage_ends if return_interm_layers else self.stage_ends[-1:]
        self.channel_list = [self.blocks[i].dim_out for i in ends[::-1]]  # coarsest first, as the FPN wants
        self.activation_checkpointing = False  # recompute each block in backward (rsam.modeling.activation_checkpointing)
        self._init_weights()

    def _init_weights(self) -> None:
        # timm-style: truncated normal for Linear and the embeddings. Any real use loads pretrained weights.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.pos_embed_window, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @property
    def size_multiple(self) -> int:
        """Input H and W must be multiples of this (patch stride 4 x window tile, and 4 x 2^(#pools))."""
        pools = len(self.q_pool_blocks)
        return max(4 * self.window_spec[0], 4 * self.q_stride[0] ** pools)

    def _pos_embed(self, hw: tuple[int, int]) -> torch.Tensor:
        """Absolute position embedding for a (h, w) stride-4 grid -> (1, h, w, C)."""
        pos = F.interpolate(self.pos_embed, size=hw, mode="bicubic")
        win = self.pos_embed_window
        tiles = (hw[0] // win.shape[-2], hw[1] // win.shape[-1])
        pos = pos + win.tile(1, 1, *tiles)
        return pos.permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, 3, H, W) -> list of (B, C_i, H / s_i, W / s_i), s = 4, 8, 16, 32 (finest first)."""
        if x.ndim != 4:
            raise ValueError(f"Hiera expects images of shape (B, 3, H, W), got {tuple(x.shape)}")
        m = self.size_multiple
        if x.shape[-2] % m or x.shape[-1] % m:
            raise ValueError(
                f"Hiera: input size {tuple(x.shape[-2:])} is not a multiple of {m} "
                f"(the position-embedding tiles and q-pooling need H and W divisible by {m})"
            )
        x = self.patch_embed(x)
        x = x + self._pos_embed(tuple(x.shape[1:3]))
        returned = self.stage_ends if self.return_interm_layers else self.stage_ends[-1:]
        maps = []
        for i, block in enumerate(self.blocks):
            x = run_block(block, x, enabled=self.activation_checkpointing)
            if i in returned:
                maps.append(x.permute(0, 3, 1, 2))  # channels-last inside the trunk, NCHW for the neck
        return maps
