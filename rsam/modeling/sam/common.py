"""Small building blocks shared by the Hiera trunk, the prompt encoder, the mask decoder and the two transformers."""
from __future__ import annotations

from typing import Type

import torch
from torch import nn

__all__ = ["MLP", "LayerNorm2d"]


class MLP(nn.Module):
    """``num_layers`` Linear layers with ``activation`` between them (not after the last one).

    The layers live in ``self.layers`` (a ModuleList) so that parameter names read ``layers.{i}.weight``,
    the names used by SAM 2 and the official RSAM checkpoints. Used for the Hiera blocks' GELU MLPs, the
    token MLPs of both transformers and the hyper-network, IoU and object-score heads of the mask decoder.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        activation: Type[nn.Module] = nn.ReLU,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP: num_layers must be >= 1, got {num_layers}")
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))
        self.act = activation()
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., input_dim) -> (..., output_dim)."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = self.act(x)
        return torch.sigmoid(x) if self.sigmoid_output else x


class LayerNorm2d(nn.Module):
    """Layer normalisation of every pixel's channel vector in an NCHW map, with a per-channel affine (eps 1e-6).

    Each of the H x W positions is standardised over its C channels with the biased variance, then scaled by
    ``weight`` and shifted by ``bias`` (parameter names and shapes (C,) are checkpoint keys). It works on NCHW
    directly, so the decoder's upscaling path (rsam/modeling/sam/mask_decoder.py) never changes layout, and it
    runs in the input's dtype.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        centred = x - x.mean(dim=1, keepdim=True)
        spread = torch.sqrt(centred.square().mean(dim=1, keepdim=True) + self.eps)  # (B, 1, H, W) std
        per_channel = (1, -1, 1, 1)
        return (centred / spread) * self.weight.view(per_channel) + self.bias.view(per_channel)
