"""Prompt encoder: position encodings and the "no prompt" embeddings, plus RSAM's text position embedding.

RSAM never gives the mask decoder points, boxes or mask prompts. What it uses from SAM's prompt encoder:

* ``pe_layer``: the random-Fourier position encoding of the stride-16 grid (:meth:`get_dense_pe`), used by the
  guidance transformer and by the mask decoder;
* ``not_a_point_embed`` / ``no_mask_embed``: the sparse and dense embeddings SAM uses when there is no prompt
  (:meth:`forward`);
* ``description_pe``: RSAM's learned absolute position embedding of the text-token index (:meth:`get_text_pe`).
"""
from __future__ import annotations

from typing import Tuple, Type

import torch
from torch import nn

from rsam.modeling.position_encoding import PositionEmbeddingRandom
from rsam.modeling.sam.common import LayerNorm2d

__all__ = ["PromptEncoder"]


def _mask_prompt_downscaler(hidden: int, out_channels: int, activation: Type[nn.Module]) -> nn.Sequential:
    """(B, 1, 4h, 4w) mask prompt -> (B, out_channels, h, w); built for checkpoint keys only, never run by RSAM.

    Two halving stages, each a 2x2 stride-2 convolution then LayerNorm2d then ``activation``, widen 1 channel to
    ``hidden // 4`` and then to ``hidden``; a 1x1 convolution projects to ``out_channels``. The flat order gives
    the Sequential indices of the checkpoints: convolutions 0, 3, 6, norms 1, 4 (activations hold no weights).
    """
    layers: list[nn.Module] = []
    width = 1
    for stage_width in (hidden // 4, hidden):
        layers += [nn.Conv2d(width, stage_width, kernel_size=2, stride=2), LayerNorm2d(stage_width), activation()]
        width = stage_width
    layers.append(nn.Conv2d(width, out_channels, kernel_size=1))
    return nn.Sequential(*layers)


class PromptEncoder(nn.Module):
    """Prompt embeddings for an image-only referring model.

    Args:
        embed_dim: width d of the decoder.
        image_embedding_size: (h, w) of the stride-16 map.
        input_image_size: (H, W) of the network input.
        mask_in_chans: hidden channels of the (unused) mask-prompt downscaler.
        max_text_tokens: rows of ``description_pe``, i.e. the longest supported expression in tokens.
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: Tuple[int, int],
        input_image_size: Tuple[int, int],
        mask_in_chans: int = 16,
        max_text_tokens: int = 512,
        activation: Type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.max_text_tokens = max_text_tokens
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)

        # Unused by RSAM (no point, box or mask prompts). Kept, and frozen by RSAM, only so that SAM 2 and
        # official RSAM checkpoints load strictly: 4 point/box-corner embeddings and the mask-prompt downscaler.
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = _mask_prompt_downscaler(mask_in_chans, embed_dim, activation)
        self.no_mask_embed = nn.Embedding(1, embed_dim)
        self.description_pe = nn.Embedding(max_text_tokens, embed_dim)

    def unused_modules(self) -> Tuple[nn.Module, ...]:
        """Modules that exist for checkpoint compatibility only and never enter the forward graph."""
        return (self.point_embeddings, self.mask_downscaling)

    def get_dense_pe(self) -> torch.Tensor:
        """(1, d, h, w) Fourier position encoding of the stride-16 grid (cell centres)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def get_text_pe(self, length: int) -> torch.Tensor:
        """(1, L, d): ``description_pe`` rows 0..L-1, the position encoding of the L text tokens.

        The same for every expression (it depends on the token index only), so it is returned once and
        broadcast by the caller.
        """
        if length > self.max_text_tokens:
            raise ValueError(
                f"text of {length} tokens is longer than the text position embedding "
                f"(sam_prompt_encoder.description_pe has {self.max_text_tokens} rows); truncate the expressions "
                f"or build the model with a larger max_text_tokens"
            )
        positions = torch.arange(length, device=self.description_pe.weight.device)
        return self.description_pe(positions).unsqueeze(0)

    def forward(self, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sparse and dense embeddings of "no prompt" for ``batch_size`` expressions.

        Returns:
            sparse (N, 2, d): two ``not_a_point_embed`` tokens. SAM without points still feeds one dummy point
                (label -1) plus one padding point (label -1, added because there is no box); both are replaced
                by ``not_a_point_embed``. They are kept because they take part in the decoder's attention.
            dense (N, d, h, w): ``no_mask_embed`` broadcast over the grid (an expanded view, not a copy).
        """
        sparse = self.not_a_point_embed.weight[None].expand(batch_size, 2, -1)
        h, w = self.image_embedding_size
        dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch_size, -1, h, w)
        return sparse, dense
