"""Multi-head attention and the SAM 2 two-way transformer of the mask decoder.

The two-way transformer lets a handful of output tokens and the image map attend to each other:
tokens -> self-attention -> token-to-image -> MLP -> image-to-token, repeated ``depth`` times, then one final
token-to-image attention. Parameter names follow SAM 2 (``layers.{i}.self_attn.q_proj`` ...), so SAM 2 and
official RSAM checkpoints load without renaming.
"""
from __future__ import annotations

from typing import Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from rsam.modeling.activation_checkpointing import run_block
from rsam.modeling.sam.common import MLP

__all__ = ["Attention", "TwoWayAttentionBlock", "TwoWayTransformer"]


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections and an optional down-projection.

    ``downsample_rate`` shrinks the internal width to ``embedding_dim // downsample_rate`` (SAM uses 2 for
    the decoder's cross-attentions to halve their cost); ``out_proj`` maps back to ``embedding_dim``.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads != 0:
            raise ValueError(
                f"Attention: num_heads ({num_heads}) must divide the internal width "
                f"embedding_dim // downsample_rate = {embedding_dim} // {downsample_rate} = {self.internal_dim}"
            )
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, heads, N, C / heads)."""
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Attend from ``q`` (B, Nq, C) to ``k``/``v`` (B, Nk, C); returns (B, Nq, C).

        key_padding_mask: optional (B, Nk) bool, True on keys to ignore (padded text tokens). Every row
        must keep at least one key, otherwise the softmax of that row is undefined (NaN).
        """
        q = self._split_heads(self.q_proj(q))
        k = self._split_heads(self.k_proj(k))
        v = self._split_heads(self.v_proj(v))
        attn_mask = None
        if key_padding_mask is not None:
            # SDPA's boolean mask marks the keys that *take part*; broadcast over heads and queries.
            attn_mask = ~key_padding_mask[:, None, None, :].to(torch.bool)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = out.transpose(1, 2).flatten(2)  # (B, Nq, internal_dim)
        return self.out_proj(out)


class TwoWayAttentionBlock(nn.Module):
    """One SAM two-way block (post-norm, residuals everywhere except the first layer's self-attention).

    1. token self-attention (token PE on q and k; the first layer uses neither PE nor residual);
    2. token -> image cross-attention (PE on q and k);
    3. token MLP;
    4. image -> token cross-attention (PE on q and k).
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: Type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLP(embedding_dim, mlp_dim, embedding_dim, num_layers=2, activation=activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """queries (B, Nt, C) tokens, keys (B, HW, C) image; PEs broadcastable to them. Returns both updated.

        Every step is post-norm: ``norm(x + sublayer(...))``. Position encodings go on what is matched (q, k),
        never on what is read (v).
        """
        if self.skip_first_layer_pe:
            # Layer 0's tokens *are* their PE, so it is neither added again nor kept as a residual.
            mixed = self.self_attn(queries, queries, queries)
        else:
            placed = queries + query_pe
            mixed = queries + self.self_attn(placed, placed, queries)
        tokens = self.norm1(mixed)

        image_placed = keys + key_pe  # the image is only read from until step 4, so one sum serves steps 2 and 4
        tokens = self.norm2(tokens + self.cross_attn_token_to_image(tokens + query_pe, image_placed, keys))
        tokens = self.norm3(tokens + self.mlp(tokens))
        image = self.norm4(keys + self.cross_attn_image_to_token(image_placed, tokens + query_pe, tokens))
        return tokens, image


class TwoWayTransformer(nn.Module):
    """SAM 2 two-way transformer: ``depth`` :class:`TwoWayAttentionBlock` + a final token -> image attention."""

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: Type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim,
                num_heads,
                mlp_dim=mlp_dim,
                activation=activation,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)
        self.activation_checkpointing = False  # recompute each layer in backward

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Run the transformer.

        Args:
            image_embedding: (B, C, H, W) image map.
            image_pe: (1 or B, C, H, W) position encoding of the map.
            point_embedding: (B, Nt, C) tokens; they also serve as their own position encoding.
        Returns:
            tokens (B, Nt, C) and image tokens (B, H*W, C).
        """
        def as_sequence(grid: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, H*W, C)
            return grid.flatten(2).transpose(1, 2)

        image, image_pos = as_sequence(image_embedding), as_sequence(image_pe)
        tokens = point_embedding
        for layer in self.layers:
            tokens, image = run_block(layer, tokens, image, query_pe=point_embedding, key_pe=image_pos,
                                      enabled=self.activation_checkpointing)
        # one last read of the image by the tokens; the image sequence is returned as the last layer left it
        read = self.final_attn_token_to_image(tokens + point_embedding, image + image_pos, image)
        return self.norm_final_attn(tokens + read), image
