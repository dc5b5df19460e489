"""Image encoder = Hiera trunk + FPN neck (SAM 2's ``ImageEncoder``; state-dict names ``trunk.*``, ``neck.*``)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ImageEncoder", "FpnNeck"]


class FpnNeck(nn.Module):
    """Feature pyramid over the trunk's stage outputs, all projected to ``d_model`` channels.

    ``convs[k]`` is a lateral conv for ``backbone_channel_list[k]``; the list is coarsest first, so
    ``convs.0`` handles the stride-32 map. Levels are processed coarse to fine; a level in
    ``fpn_top_down_levels`` (indices into the finest-first trunk outputs) adds the 2x-upsampled result
    of the next coarser level, every other level is lateral-only. SAM 2.1 uses levels [2, 3]: only the
    stride-16 map receives top-down features (from stride 32); strides 4 and 8 stay lateral-only.
    Each level also gets its sine position encoding.
    """

    def __init__(
        self,
        position_encoding: nn.Module,
        d_model: int,
        backbone_channel_list: Sequence[int],
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        fpn_interp_model: str = "nearest",
        fuse_type: str = "sum",
        fpn_top_down_levels: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        if fuse_type not in ("sum", "avg"):
            raise ValueError(f"FpnNeck: fuse_type must be 'sum' or 'avg', got {fuse_type!r}")
        self.position_encoding = position_encoding
        self.d_model = d_model
        self.backbone_channel_list = list(backbone_channel_list)
        self.convs = nn.ModuleList()
        for dim in self.backbone_channel_list:
            lateral = nn.Sequential()  # a named "conv" child keeps the SAM 2 key names (convs.k.conv.*)
            lateral.add_module("conv", nn.Conv2d(dim, d_model, kernel_size, stride=stride, padding=padding))
            self.convs.append(lateral)
        self.fpn_interp_model = fpn_interp_model
        self.fuse_type = fuse_type
        levels = range(len(self.convs)) if fpn_top_down_levels is None else fpn_top_down_levels
        self.fpn_top_down_levels = [int(i) for i in levels]

    def forward(self, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """xs: trunk outputs finest first, (B, C_i, H_i, W_i) -> (features, pos), each finest first,
        (B, d_model, H_i, W_i)."""
        if len(xs) != len(self.convs):
            raise ValueError(f"FpnNeck: got {len(xs)} feature maps for {len(self.convs)} lateral convs")
        # Walk the pyramid from the coarsest map down: convs[k] belongs to the k-th coarsest map, and the
        # top-down signal of a level is the finished map of the level above it.
        coarse_first: list[torch.Tensor] = []
        for depth, (x, lateral) in enumerate(zip(reversed(xs), self.convs)):
            level = len(xs) - 1 - depth  # finest-first index, the numbering of fpn_top_down_levels
            y = lateral(x)
            if coarse_first and level in self.fpn_top_down_levels:
                y = self._fuse(y, self._upsample(coarse_first[-1]))
            coarse_first.append(y)
        features = coarse_first[::-1]
        return features, [self.position_encoding(f).to(f.dtype) for f in features]

    def _upsample(self, x: torch.Tensor) -> torch.Tensor:
        # in float32: under bf16 autocast SAM 2 interpolates in full precision, and its weights expect that
        align = None if self.fpn_interp_model == "nearest" else False
        return F.interpolate(x.float(), scale_factor=2.0, mode=self.fpn_interp_model, align_corners=align)

    def _fuse(self, lateral: torch.Tensor, top_down: torch.Tensor) -> torch.Tensor:
        fused = lateral + top_down
        return fused / 2 if self.fuse_type == "avg" else fused


class ImageEncoder(nn.Module):
    """Trunk + neck; drops the ``scalp`` coarsest levels after the FPN (they only feed the top-down path).

    ``forward(images (B, 3, R, R))`` returns a dict:

    * ``backbone_fpn``: list of NCHW maps finest first, ``d_model`` channels (3 maps, strides 4/8/16, with
      the 4-stage trunk and scalp=1);
    * ``vision_features``: the coarsest kept map (stride 16), ``backbone_fpn[-1]``;
    * ``vision_pos_enc``: the sine encodings matching ``backbone_fpn`` (stride-0 batch dim: read-only).
    """

    def __init__(self, trunk: nn.Module, neck: FpnNeck, scalp: int = 1) -> None:
        super().__init__()
        trunk_channels = getattr(trunk, "channel_list", None)
        if trunk_channels is not None and list(trunk_channels) != list(neck.backbone_channel_list):
            raise ValueError(
                f"ImageEncoder: trunk channel_list {list(trunk_channels)} != neck backbone_channel_list "
                f"{list(neck.backbone_channel_list)} (both coarsest first)"
            )
        if not 0 <= scalp < len(neck.convs):
            raise ValueError(f"ImageEncoder: scalp={scalp} must be in [0, {len(neck.convs) - 1}]")
        self.trunk = trunk
        self.neck = neck
        self.scalp = scalp

    @property
    def size_multiple(self) -> int:
        return int(getattr(self.trunk, "size_multiple", 32))

    def forward(self, images: torch.Tensor) -> dict:
        m = self.size_multiple
        if images.ndim != 4 or images.shape[-2] % m or images.shape[-1] % m:
            raise ValueError(
                f"ImageEncoder: images must be (B, 3, H, W) with H and W multiples of {m}, "
                f"got shape {tuple(images.shape)}"
            )
        # The `scalp` coarsest levels only feed the FPN's top-down path; the heads never see them.
        kept = len(self.neck.convs) - self.scalp
        features, pos = self.neck(self.trunk(images))
        return {"backbone_fpn": features[:kept], "vision_pos_enc": pos[:kept], "vision_features": features[kept - 1]}
