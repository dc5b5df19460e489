"""Two-Way Guidance Transformer: RSAM's vision-language fusion.

Unlike SAM's two-way transformer (a few output tokens reading the image), both streams here are refined:
the text tokens read the image and the image map reads the text, and each stream also attends to itself.
The refined image map replaces the backbone map at the mask decoder's input and the refined ``[CLS]`` token
is added to the decoder's mask tokens.

Conventions of the official model, kept for checkpoint parity: post-norm residual blocks, position encodings
added on the *key* side of every attention only (never to queries or values), full-width attentions
(``attention_downsample_rate=1``), ReLU MLP on the text stream only.
"""
from __future__ import annotations

from typing import Optional, Tuple, Type

import torch
from torch import nn

from rsam.modeling.activation_checkpointing import run_block
from rsam.modeling.sam.common import MLP
from rsam.modeling.sam.transformer import Attention

__all__ = ["GuidanceBlock", "TwoWayGuidanceTransformer"]


class GuidanceBlock(nn.Module):
    """One guidance layer (text T, image F; Pt, Pi their position encodings; every step is x = norm(x + out)):

    1. ``self_attn_query``:           T attends to T    (q = T, k = T + Pt, v = T)   -> norm1
    2. ``cross_attn_token_to_image``: T attends to F    (q = T, k = F + Pi, v = F)   -> norm2
    3. ``mlp`` on T (ReLU)                                                          -> norm3
    4. ``cross_attn_image_to_token``: F attends to T    (q = F, k = T + Pt, v = T)   -> norm4
    5. ``self_attn_key``:             F attends to F    (q = F, k = F + Pi, v = F)   -> norm5
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: Type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 1,
    ) -> None:
        super().__init__()
        self.self_attn_query = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLP(embedding_dim, mlp_dim, embedding_dim, num_layers=2, activation=activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.self_attn_key = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm5 = nn.LayerNorm(embedding_dim)

    def forward(
        self,
        text: torch.Tensor,
        image: torch.Tensor,
        text_pe: torch.Tensor,
        image_pe: torch.Tensor,
        text_padding_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """text (N, L, C), image (N, HW, C); PEs broadcastable to them; mask (N, L) bool, True = padding.

        Returns the refined (text, image) with unchanged shapes.
        """
        text_key = text + text_pe
        text = self.norm1(text + self.self_attn_query(text, text_key, text, text_padding_mask))
        text = self.norm2(text + self.cross_attn_token_to_image(text, image + image_pe, image))
        text = self.norm3(text + self.mlp(text))
        # the text keys are rebuilt: steps 1-3 changed the tokens
        image = self.norm4(image + self.cross_attn_image_to_token(image, text + text_pe, text, text_padding_mask))
        image = self.norm5(image + self.self_attn_key(image, image + image_pe, image))
        return text, image


class TwoWayGuidanceTransformer(nn.Module):
    """``depth`` :class:`GuidanceBlock` followed by a final text -> image attention (``final_attn_token_to_image``)."""

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: Type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 1,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.layers = nn.ModuleList(
            GuidanceBlock(embedding_dim, num_heads, mlp_dim, activation, attention_downsample_rate)
            for _ in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)
        self.activation_checkpointing = False  # recompute each layer in backward

    def forward(
        self,
        text: torch.Tensor,
        text_pe: torch.Tensor,
        image: torch.Tensor,
        image_pe: torch.Tensor,
        text_padding_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Fuse text and image.

        Args:
            text: (N, L, C) projected text tokens.
            text_pe: (1 or N, L, C) text position encoding.
            image: (N, C, H, W) image map, one per expression.
            image_pe: (1 or N, C, H, W) image position encoding.
            text_padding_mask: optional (N, L) bool, True on padded text tokens; they are then excluded as
                keys of every text attention. ``None`` lets padded tokens take part, as the official model does
                (its outputs then depend on how much the batch pads each expression).
        Returns:
            refined text (N, L, C) and refined image map (N, C, H, W).
        """
        n, c, h, w = image.shape
        image = image.flatten(2).transpose(1, 2)
        image_pe = image_pe.flatten(2).transpose(1, 2)
        for layer in self.layers:
            text, image = run_block(layer, text, image, text_pe, image_pe, text_padding_mask,
                                    enabled=self.activation_checkpointing)
        out = self.final_attn_token_to_image(text, image + image_pe, image)
        text = self.norm_final_attn(text + out)
        return text, image.transpose(1, 2).reshape(n, c, h, w)
