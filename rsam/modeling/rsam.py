"""RSAM: referring segmentation with a SAM 2 image encoder, BERT and a two-way guidance fusion.

Forward path for B images and N expressions (d: decoder width, h = R / 16):

    images (B,3,R,R) uint8 --preprocess--> normalised float32                     once per image
                     --image_encoder--> FPN maps at strides 4 / 8 / 16
                     --conv_s0 / conv_s1 on strides 4 / 8--> high-res skips      once per image
    input_ids (N,L)  --BERT--> (N,L,H) --text_proj--> text (N,L,d)
    text + description_pe, stride-16 map gathered per expression (N,d,h,w) + dense PE
                     --description_transformer--> text' (N,L,d), image' (N,d,h,w)
    [CLS] of text' added to the mask tokens; image' + no_mask_embed into the mask decoder
                     --> mask token 0: logits (N,1,4h,4w), IoU (N,1), object logit (N,1)
    gate: logits := -1024 where object logit <= 0; float32; bilinear x4 -> (N,1,R,R)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rsam.modeling.guidance import TwoWayGuidanceTransformer
from rsam.modeling.sam.mask_decoder import MaskDecoder, MaskDecoderOutput
from rsam.modeling.sam.prompt_encoder import PromptEncoder
from rsam.modeling.sam.transformer import TwoWayTransformer
from rsam.modeling.text_encoder import freeze_module

__all__ = ["RSAM", "RSAMOutput", "ImageFeatures", "NO_OBJ_SCORE", "IMAGENET_MEAN", "IMAGENET_STD"]

# Logit written over the whole mask of an expression whose object score says "absent": far below any
# threshold, and exactly representable in bf16 / fp16 so it survives autocast unchanged.
NO_OBJ_SCORE = -1024.0
# Pixel statistics (RGB, [0, 1] scale) of the image encoder's pretraining. The one place they are written down:
# images travel as uint8 from the files to the model, and RSAM.preprocess normalises them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageFeatures:
    """Per-image features, computed once and shared by all expressions of an image.

    image_embed (B, d, h, w): stride-16 FPN map; feat_s0 (B, d/8, 4h, 4w) and feat_s1 (B, d/4, 2h, 2w):
    the stride-4 / stride-8 maps projected by the decoder's ``conv_s0`` / ``conv_s1``.
    """

    image_embed: torch.Tensor
    feat_s0: torch.Tensor
    feat_s1: torch.Tensor

    @property
    def num_images(self) -> int:
        return self.image_embed.shape[0]


@dataclass
class RSAMOutput:
    """Predictions for N expressions at network resolution R.

    low_res_logits (N, 1, R/4, R/4) and logits (N, 1, R, R): float32 mask logits, the constant ``NO_OBJ_SCORE``
    (-1024) over the whole mask where the object logit is <= 0; ``logits`` is the bilinear (align_corners=False)
    upsampling of ``low_res_logits``. iou_pred (N, 1): predicted IoU in [0, 1]. object_score_logits (N, 1):
    > 0 means the expression refers to something in the image.
    """

    low_res_logits: torch.Tensor
    logits: torch.Tensor
    iou_pred: torch.Tensor
    object_score_logits: torch.Tensor


class RSAM(nn.Module):
    """The whole network. Attribute names are the state-dict prefixes of the official checkpoints.

    Args:
        image_encoder: Hiera + FPN (``rsam.modeling.backbones.image_encoder.ImageEncoder``); its
            ``neck.d_model`` sets the width d of everything after it.
        text_encoder: ``transformers.BertModel`` without pooler (``rsam.modeling.text_encoder.build_bert``).
        image_size: network input resolution R (square); a multiple of 32 and of ``backbone_stride``.
        backbone_stride: stride of the map the fusion and the decoder work on (16).
        num_guidance_layers: depth of the two-way guidance transformer (official ``num_twgt``).
        num_heads, mlp_dim: heads and MLP width of both transformers (the decoder's two-way transformer
            and the guidance transformer).
        iou_head_hidden_dim: hidden width of the IoU head.
        num_multimask_outputs: extra mask tokens of the decoder (kept for checkpoint shapes; token 0 is used).
        max_text_tokens: rows of the learned text position embedding (longest expression in tokens).
        use_text_padding_mask: exclude padded text tokens from every text attention of the fusion. The
            official model does not (its predictions then depend on the batch's longest expression); False
            reproduces its numbers.
        freeze_text_encoder: BERT gets no gradients, stays in eval mode (no dropout) even after
            ``model.train()``, and runs under ``torch.no_grad()``.
        pixel_mean, pixel_std: RGB statistics on the [0, 1] scale that :meth:`preprocess` normalises with.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        text_encoder: nn.Module,
        image_size: int = 800,
        backbone_stride: int = 16,
        num_guidance_layers: int = 2,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        iou_head_hidden_dim: int = 256,
        num_multimask_outputs: int = 3,
        max_text_tokens: int = 512,
        use_text_padding_mask: bool = False,
        freeze_text_encoder: bool = True,
        pixel_mean: Sequence[float] = IMAGENET_MEAN,
        pixel_std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        neck = getattr(image_encoder, "neck", None)
        if neck is None or not hasattr(neck, "d_model"):
            raise TypeError("RSAM: image_encoder must have a `neck` with a `d_model` attribute (the width d)")
        text_config = getattr(text_encoder, "config", None)
        if text_config is None or not hasattr(text_config, "hidden_size"):
            raise TypeError("RSAM: text_encoder must be a transformers BertModel (it needs `config.hidden_size`)")
        d = int(neck.d_model)
        size_multiple = max(32, int(getattr(image_encoder, "size_multiple", 32)))
        if image_size % size_multiple or image_size % backbone_stride:
            raise ValueError(
                f"RSAM: image_size={image_size} must be a multiple of {size_multiple} (coarsest trunk stride / "
                f"window tiles) and of backbone_stride={backbone_stride}"
            )
        self.image_size = int(image_size)
        self.backbone_stride = int(backbone_stride)
        self.use_text_padding_mask = bool(use_text_padding_mask)
        self.freeze_text_encoder = bool(freeze_text_encoder)
        grid = self.image_size // self.backbone_stride

        self.image_encoder = image_encoder
        self.sam_prompt_encoder = PromptEncoder(
            embed_dim=d,
            image_embedding_size=(grid, grid),
            input_image_size=(self.image_size, self.image_size),
            mask_in_chans=16,
            max_text_tokens=max_text_tokens,
        )
        self.sam_mask_decoder = MaskDecoder(
            transformer_dim=d,
            transformer=TwoWayTransformer(depth=2, embedding_dim=d, num_heads=num_heads, mlp_dim=mlp_dim),
            num_multimask_outputs=num_multimask_outputs,
            iou_head_depth=3,
            iou_head_hidden_dim=iou_head_hidden_dim,
        )
        self.description_transformer = TwoWayGuidanceTransformer(
            depth=num_guidance_layers,
            embedding_dim=d,
            num_heads=num_heads,
            mlp_dim=mlp_dim,
            attention_downsample_rate=1,
        )
        self.text_encoder = text_encoder
        self.text_proj = nn.Linear(int(text_config.hidden_size), d)
        # preprocess() computes x * scale + shift = (x / 255 - mean) / std. Buffers follow .to(device) but are
        # not saved: the state dict keeps the official key set.
        mean = torch.tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(pixel_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("pixel_scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("pixel_shift", -mean / std, persistent=False)

        # Never part of the forward graph (no point/box/mask prompts, single-mask output): frozen, so that
        # DDP needs no find_unused_parameters and optimisers skip them. They stay only for strict loading.
        for module in self.sam_prompt_encoder.unused_modules():
            module.requires_grad_(False)
        for mlp in self.sam_mask_decoder.output_hypernetworks_mlps[1:]:
            mlp.requires_grad_(False)
        if self.freeze_text_encoder:
            freeze_module(self.text_encoder)

    # ------------------------------------------------------------------------------------------------
    # modes

    def train(self, mode: bool = True) -> "RSAM":
        """Like ``nn.Module.train`` but a frozen text encoder stays in eval mode (no dropout noise)."""
        super().train(mode)
        if self.freeze_text_encoder:
            self.text_encoder.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.text_proj.weight.device

    def set_activation_checkpointing(self, trunk: bool = True, transformers: bool = False) -> None:
        """Recompute activations in the backward pass instead of keeping them: of every Hiera block (``trunk``),
        and of every guidance / mask-decoder transformer layer (``transformers``). Same results, less memory."""
        self.image_encoder.trunk.activation_checkpointing = bool(trunk)
        self.description_transformer.activation_checkpointing = bool(transformers)
        self.sam_mask_decoder.transformer.activation_checkpointing = bool(transformers)

    # ------------------------------------------------------------------------------------------------
    # forward pieces

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (B, 3, R, R) -> normalised float (B, 3, R, R), in the dtype of the model's buffers.

        The input may have any memory layout (batches from the collate are channels-last views of (B, R, R, 3)
        pixels); the output is always contiguous, so the image encoder sees one layout.
        """
        pixels = images.to(self.pixel_scale.dtype, memory_format=torch.contiguous_format)
        return pixels.mul_(self.pixel_scale).add_(self.pixel_shift)

    def encode_image(self, images: torch.Tensor, normalized: bool = False) -> ImageFeatures:
        """images (B, 3, R, R) uint8 -> :class:`ImageFeatures` (run once per image).

        ``normalized=True`` takes float images that are already normalised (e.g. reference inputs).
        """
        self._check_images(images, normalized)
        backbone = self.image_encoder(images if normalized else self.preprocess(images))
        fpn = backbone["backbone_fpn"]
        if len(fpn) != 3:
            raise ValueError(
                f"RSAM: the image encoder must return 3 FPN levels (strides 4, 8, 16; scalp=1), got {len(fpn)}"
            )
        feat_s0, feat_s1 = self.sam_mask_decoder.project_high_res(fpn[0], fpn[1])
        return ImageFeatures(image_embed=fpn[2], feat_s0=feat_s0, feat_s1=feat_s1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask (N, L) -> projected text tokens (N, L, d), padded positions included."""
        limit = getattr(self.text_encoder.config, "max_position_embeddings", None)
        if limit is not None and input_ids.shape[-1] > limit:
            # BERT itself would fail with a bare shape error (or a device-side assert on CUDA)
            raise ValueError(
                f"RSAM: expressions of {input_ids.shape[-1]} tokens are longer than the text encoder's "
                f"max_position_embeddings={limit}; truncate them (the tokenizer's 'standard' mode does)"
            )
        mask = attention_mask
        if getattr(self.text_encoder.config, "_attn_implementation", None) == "sdpa":
            # transformers uses a 4-D boolean mask (True = attend) as given; from a 2-D mask it would first test
            # mask.all() on the host (a device sync per forward) to decide whether to drop it
            mask = attention_mask.bool()[:, None, None, :]
        grad = torch.is_grad_enabled() and not self.freeze_text_encoder
        with torch.set_grad_enabled(grad):
            hidden = self.text_encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return self.text_proj(hidden)

    def decode(
        self,
        features: ImageFeatures,
        expr_to_image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> RSAMOutput:
        """Predict one mask per expression from precomputed image features.

        Args:
            features: :meth:`encode_image` output for B images.
            expr_to_image: (N,) long, index of each expression's image in ``features``.
            input_ids, attention_mask: (N, L) long, right-padded token ids and their mask (1 = real token).
        """
        self._check_expressions(features.num_images, expr_to_image, input_ids, attention_mask)
        return self._decode(features, expr_to_image, self.encode_text(input_ids, attention_mask), attention_mask)

    def _decode(
        self,
        features: ImageFeatures,
        expr_to_image: torch.Tensor,
        text: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> RSAMOutput:
        """:meth:`decode` without the input checks, from the projected text tokens (N, L, d) of :meth:`encode_text`.

        No host synchronisation from here on: everything runs on the device.
        """
        n, length = attention_mask.shape
        prompt = self.sam_prompt_encoder

        text_pe = prompt.get_text_pe(length)
        image_pe = prompt.get_dense_pe()
        image = self._per_expression(features.image_embed, expr_to_image)
        padding = None
        if self.use_text_padding_mask:
            padding = attention_mask == 0
            # [CLS] (position 0) is a real token by construction; never masking it keeps every attention row
            # non-empty (an all-masked row would be NaN), even for a malformed all-zero attention_mask
            padding[:, 0] = False
        text, image = self.description_transformer(text, text_pe, image, image_pe, text_padding_mask=padding)
        cls_token = text[:, :1]  # (N, 1, d): only [CLS] steers the decoder

        sparse, dense = prompt(n)
        high_res = (
            self._per_expression(features.feat_s0, expr_to_image),
            self._per_expression(features.feat_s1, expr_to_image),
        )
        dec: MaskDecoderOutput = self.sam_mask_decoder(
            image_embeddings=image,
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            high_res_features=high_res,
            text_token=cls_token,
        )
        # single-mask output: mask token 0 and its IoU
        low_res = dec.masks[:, :1].float()
        object_score = dec.object_score_logits.float()
        # hard gate (no gradient through the decision): absent object -> the whole mask is "background"
        present = object_score[:, :, None, None] > 0
        low_res = torch.where(present, low_res, NO_OBJ_SCORE)
        logits = F.interpolate(
            low_res, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
        )
        return RSAMOutput(
            low_res_logits=low_res,
            logits=logits,
            iou_pred=dec.iou_pred[:, :1].float(),
            object_score_logits=object_score,
        )

    def forward(
        self,
        images: torch.Tensor,
        expr_to_image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> RSAMOutput:
        """images (B, 3, R, R) uint8; expr_to_image (N,); input_ids, attention_mask (N, L) -> :class:`RSAMOutput`."""
        # check everything first: a bad index should not cost an image-encoder pass
        self._check_images(images)
        self._check_expressions(images.shape[0], expr_to_image, input_ids, attention_mask)
        text = self.encode_text(input_ids, attention_mask)
        return self._decode(self.encode_image(images), expr_to_image, text, attention_mask)

    @staticmethod
    def _per_expression(per_image: torch.Tensor, expr_to_image: torch.Tensor) -> torch.Tensor:
        """Gather per-image tensors (B, ...) into per-expression tensors (N, ...).

        Always a gather: testing for the identity mapping first would cost a host sync per call.
        """
        return per_image.index_select(0, expr_to_image)

    # ------------------------------------------------------------------------------------------------
    # input validation (clear messages instead of shape errors deep inside attention)

    def _check_images(self, images: torch.Tensor, normalized: bool = False) -> None:
        r = self.image_size
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"RSAM: images must be a (B, 3, {r}, {r}) tensor, got {shape}")
        if tuple(images.shape[-2:]) != (r, r):
            raise ValueError(
                f"RSAM: images are {tuple(images.shape[-2:])} but the model was built for image_size={r}; "
                f"resize them to {r}x{r} (the position encodings are sized for that grid)"
            )
        if normalized and not images.is_floating_point():
            raise ValueError(f"RSAM: normalized images must be a float tensor, got dtype {images.dtype}")
        if not normalized and images.dtype != torch.uint8:
            raise ValueError(
                f"RSAM: images must be uint8 pixels (0-255), got dtype {images.dtype}; the model normalises them "
                "itself (RSAM.preprocess). Already normalised float images go through encode_image(x, normalized=True)"
            )

    @staticmethod
    def _check_expressions(
        num_images: int, expr_to_image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> None:
        for name, t in (("expr_to_image", expr_to_image), ("input_ids", input_ids),
                        ("attention_mask", attention_mask)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"RSAM: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.is_floating_point() or t.is_complex():
                raise TypeError(f"RSAM: {name} must be an integer tensor, got dtype {t.dtype}")
        if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"RSAM: input_ids must be (N, L) with N, L >= 1, got shape {tuple(input_ids.shape)}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"RSAM: attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        n = input_ids.shape[0]
        if expr_to_image.shape != (n,):
            raise ValueError(
                f"RSAM: expr_to_image must be (N,) = ({n},) (one image index per expression), "
                f"got shape {tuple(expr_to_image.shape)}"
            )
        # The values only where reading them is free: on the CPU. On an accelerator that read would be a host
        # sync per forward; batches are checked when they are built on the CPU (rsam.data.batch.Batch), and a
        # bad index there still fails, as a device-side assert of the gather.
        if expr_to_image.device.type == "cpu" and n:
            lo, hi = int(expr_to_image.min()), int(expr_to_image.max())
            if lo < 0 or hi >= num_images:
                raise ValueError(f"RSAM: expr_to_image values must be in [0, {num_images - 1}] (B={num_images} "
                                 f"images), got min {lo}, max {hi}")
