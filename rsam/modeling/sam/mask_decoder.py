"""SAM 2 mask decoder with high-resolution skips, plus RSAM's text token on the mask tokens.

Output tokens, in this order: object-score token, IoU token, ``num_multimask_outputs + 1`` mask tokens, then the
sparse prompt tokens. RSAM adds the refined ``[CLS]`` text vector to every mask token, so the masks are
conditioned on the expression. The decoder always computes all mask tokens (as SAM 2 does); RSAM uses token 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Type

import torch
from torch import nn

from rsam.modeling.sam.common import MLP, LayerNorm2d
from rsam.modeling.sam.transformer import TwoWayTransformer

__all__ = ["MaskDecoder", "MaskDecoderOutput"]


@dataclass
class MaskDecoderOutput:
    """All decoder outputs for N expressions and M = num_multimask_outputs + 1 mask tokens (h: stride-16 grid).

    masks (N, M, 4h, 4w) logits; iou_pred (N, M) in [0, 1]; mask_tokens_out (N, M, d);
    object_score_logits (N, 1), > 0 means "the object is present".
    """

    masks: torch.Tensor
    iou_pred: torch.Tensor
    mask_tokens_out: torch.Tensor
    object_score_logits: torch.Tensor


class MaskDecoder(nn.Module):
    """Predict masks from an image map and prompt tokens with a two-way transformer.

    Args:
        transformer_dim: width d (channels of the image map and of the tokens).
        transformer: the two-way transformer (token/image attention).
        num_multimask_outputs: extra mask tokens beyond the single-mask token 0 (SAM: 3).
        activation: activation of the upscaling path.
        iou_head_depth, iou_head_hidden_dim: the IoU head MLP (its output goes through a sigmoid).
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        activation: Type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        if transformer_dim % 8 != 0:
            raise ValueError(f"MaskDecoder: transformer_dim must be a multiple of 8, got {transformer_dim}")
        d = transformer_dim
        self.transformer_dim = d
        self.transformer = transformer
        self.num_mask_tokens = num_multimask_outputs + 1

        self.iou_token = nn.Embedding(1, d)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, d)
        self.obj_score_token = nn.Embedding(1, d)

        # Two x2 transposed convolutions take the stride-16 map to stride 4. The stride-8 and stride-4 FPN
        # maps are added after each of them (after projection by conv_s1 / conv_s0) to recover detail.
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(d, d // 4, kernel_size=2, stride=2),
            LayerNorm2d(d // 4),
            activation(),
            nn.ConvTranspose2d(d // 4, d // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.conv_s0 = nn.Conv2d(d, d // 8, kernel_size=1)
        self.conv_s1 = nn.Conv2d(d, d // 4, kernel_size=1)

        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(d, d, d // 8, num_layers=3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            d, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth, sigmoid_output=True
        )
        self.pred_obj_score_head = MLP(d, d, 1, num_layers=3)

    def project_high_res(self, fpn_s4: torch.Tensor, fpn_s8: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Project the stride-4 (B, d, 4h, 4w) and stride-8 (B, d, 2h, 2w) FPN maps for the upscaling skips.

        Returns (feat_s0 (B, d/8, 4h, 4w), feat_s1 (B, d/4, 2h, 2w)). Called once per *image*: the result is
        the same for every expression of that image.
        """
        return self.conv_s0(fpn_s4), self.conv_s1(fpn_s8)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        high_res_features: Tuple[torch.Tensor, torch.Tensor],
        text_token: Optional[torch.Tensor] = None,
    ) -> MaskDecoderOutput:
        """Decode N expressions.

        Args:
            image_embeddings: (N, d, h, w) image map (in RSAM the fused map, one per expression).
            image_pe: (1 or N, d, h, w) its position encoding.
            sparse_prompt_embeddings: (N, S, d) prompt tokens appended after the output tokens.
            dense_prompt_embeddings: (N, d, h, w) added to the image map.
            high_res_features: (feat_s0 (N, d/8, 4h, 4w), feat_s1 (N, d/4, 2h, 2w)) from :meth:`project_high_res`.
            text_token: optional (N, 1, d) text vector added to every mask token.
        """
        n = image_embeddings.shape[0]
        output_tokens = torch.cat(
            [self.obj_score_token.weight, self.iou_token.weight, self.mask_tokens.weight], dim=0
        )  # (2 + M, d)
        output_tokens = output_tokens[None].expand(n, -1, -1)
        if text_token is not None:
            obj_iou, mask_tokens = output_tokens[:, :2], output_tokens[:, 2:]
            output_tokens = torch.cat([obj_iou, mask_tokens + text_token], dim=1)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings], dim=1)  # (N, 2 + M + S, d)

        src = image_embeddings + dense_prompt_embeddings
        hs, src = self.transformer(src, image_pe, tokens)  # (N, T, d), (N, hw, d)
        obj_score_out = hs[:, 0]
        iou_token_out = hs[:, 1]
        mask_tokens_out = hs[:, 2 : 2 + self.num_mask_tokens]

        _, c, h, w = image_embeddings.shape
        src = src.transpose(1, 2).reshape(n, c, h, w)
        upscaled = self._upscale(src, high_res_features)  # (N, d/8, 4h, 4w)

        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # (N, M, d/8)
        masks = (hyper_in @ upscaled.flatten(2)).reshape(n, self.num_mask_tokens, 4 * h, 4 * w)

        return MaskDecoderOutput(
            masks=masks,
            iou_pred=self.iou_prediction_head(iou_token_out),
            mask_tokens_out=mask_tokens_out,
            object_score_logits=self.pred_obj_score_head(obj_score_out),
        )

    def _upscale(self, src: torch.Tensor, high_res_features: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """(N, d, h, w) -> (N, d/8, 4h, 4w): two x2 transposed convolutions, each followed by the FPN skip of
        its resolution (stride 8, then stride 4) and then its norm / activation."""
        feat_s0, feat_s1 = high_res_features
        up = self.output_upscaling  # [convT, LayerNorm2d, act, convT, act]: indices are checkpoint keys
        x = src
        for conv, skip, after in ((up[0], feat_s1, (up[1], up[2])), (up[3], feat_s0, (up[4],))):
            x = conv(x) + skip
            for module in after:
                x = module(x)
        return x
