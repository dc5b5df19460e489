"""RSAM: referring segmentation with a SAM 2 image encoder, BERT and a two-way guidance fusion.

Forward path for B images and N expressions (d: decoder width, h = R / 16):

    images (B,3,R,R) --image_encoder--> FPN maps at strides 4 / 8 / 16           once per image
                     --conv_s0 / conv_s1 on strides 4 / 8--> high-res skips      once per image
    input_ids (N,L)  --BERT--> (N,L,H) --text_proj--> text (N,L,d)
    text + description_pe, stride-16 map gathered per expression (N,d,h,w) + dense PE
                     --description_transformer--> text' (N,L,d), image' (N,d,h,w)
    [CLS] of text' added to the mask tokens; image' + no_mask_embed into the mask decoder
                     --> mask token 0: logits (N,1,4h,4w), IoU (N,1), object logit (N,1)
    gate: logits := -1024 where object logit <= 0; float32; bilinear x4 -> (N,1,R,R)
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Dict, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from rsam.modeling.guidance import TwoWayGuidanceTransformer
from rsam.modeling.sam.mask_decoder import MaskDecoder, MaskDecoderOutput
from rsam.modeling.sam.prompt_encoder import PromptEncoder
from rsam.modeling.sam.transformer import TwoWayTransformer
from rsam.modeling.text_encoder import freeze_module

__all__ = ["RSAM", "RSAMOutput", "ImageFeatures", "NO_OBJ_SCORE"]

# Logit written over the whole mask of an expression whose object score says "absent": far below any
# threshold, and exactly representable in bf16 / fp16 so it survives autocast unchanged.
NO_OBJ_SCORE = -1024.0


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

    # ------------------------------------------------------------------------------------------------
    # forward pieces

    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        """images (B, 3, R, R) normalised -> :class:`ImageFeatures` (run once per image)."""
        self._check_images(images)
        backbone = self.image_encoder(images)
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
        grad = torch.is_grad_enabled() and not self.freeze_text_encoder
        with torch.set_grad_enabled(grad):
            hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
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
        """images (B, 3, R, R); expr_to_image (N,); input_ids, attention_mask (N, L) -> :class:`RSAMOutput`."""
        # check everything first: a bad index should not cost an image-encoder pass
        self._check_images(images)
        self._check_expressions(images.shape[0], expr_to_image, input_ids, attention_mask)
        # Text before images: the transformers BERT reads its attention mask on the host (one sync). Queued
        # first, that sync waits for a few embedding kernels instead of the whole image encoder, and the CPU
        # then queues the rest of the step while the GPU runs the image encoder.
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

    def _check_images(self, images: torch.Tensor) -> None:
        r = self.image_size
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"RSAM: images must be a (B, 3, {r}, {r}) tensor, got {shape}")
        if tuple(images.shape[-2:]) != (r, r):
            raise ValueError(
                f"RSAM: images are {tuple(images.shape[-2:])} but the model was built for image_size={r}; "
                f"resize them to {r}x{r} (the position encodings are sized for that grid)"
            )
        if not images.is_floating_point():
            raise ValueError(f"RSAM: images must be a normalised float tensor, got dtype {images.dtype}")

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
        # one host sync (min and max fetched together); worth it, an out-of-range index on CUDA is an
        # unreadable device-side assert
        lo, hi = torch.stack(torch.aminmax(expr_to_image)).tolist()
        if lo < 0 or hi >= num_images:
            raise ValueError(
                f"RSAM: expr_to_image values must be in [0, {num_images - 1}] (B={num_images} images), "
                f"got min {lo}, max {hi}"
            )

    # ------------------------------------------------------------------------------------------------
    # introspection

    @contextlib.contextmanager
    def capture_intermediates(self) -> Iterator[Dict[str, torch.Tensor]]:
        """Record named intermediate tensors of every forward run inside the ``with`` block.

        Forward hooks only: the forward code is the same with and without capture. Names follow the
        official-model reference files (``bert.*``, ``text_proj``, ``description_pe``, ``dense_pe``,
        ``fusion.*``, ``prompt.*``, ``decoder.*``, ``conv_s0/1``, ``image_encoder.*``, ``trunk.*``,
        ``neck.*``, ``heads.*``); ``description_pe`` is (L, d) and ``dense_pe`` (d, h, w), as computed.
        Tensors are stored as produced (not cloned); a later forward overwrites them.
        """
        store: Dict[str, torch.Tensor] = {}
        handles = []

        def on_output(module: nn.Module, record) -> None:
            handles.append(module.register_forward_hook(lambda m, args, out: record(out)))

        def on_input(module: nn.Module, record) -> None:
            sig = inspect.signature(module.forward)

            def pre_hook(m, args, kwargs):
                record(sig.bind(*args, **kwargs).arguments)

            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))

        def put(**named: torch.Tensor) -> None:
            store.update({k.replace("__", "."): v for k, v in named.items()})

        def first(x):  # HF layers return a tensor or a tuple whose first entry is the hidden state
            return x[0] if isinstance(x, (tuple, list)) else x

        # image encoder
        enc = self.image_encoder
        trunk, neck = getattr(enc, "trunk", None), getattr(enc, "neck", None)
        if trunk is not None:
            on_output(trunk, lambda out: store.update({f"trunk.stage{i}": t for i, t in enumerate(out)}))
            for i, block in enumerate(getattr(trunk, "blocks", [])):
                on_output(block, lambda out, i=i: store.__setitem__(f"trunk.block{i}", out))
        if neck is not None:
            def neck_out(out):
                feats, pos = out
                store.update({f"neck.fpn{i}": t for i, t in enumerate(feats)})
                store.update({f"neck.pos{i}": t for i, t in enumerate(pos)})
            on_output(neck, neck_out)

        def encoder_out(out):
            store.update({f"image_encoder.backbone_fpn{i}": t for i, t in enumerate(out["backbone_fpn"])})
            store.update({f"image_encoder.vision_pos_enc{i}": t for i, t in enumerate(out["vision_pos_enc"])})
            store["image_encoder.vision_features"] = out["vision_features"]
        on_output(enc, encoder_out)
        dec = self.sam_mask_decoder
        on_output(dec.conv_s0, lambda out: put(conv_s0=out))
        on_output(dec.conv_s1, lambda out: put(conv_s1=out))

        # text
        bert = self.text_encoder
        if hasattr(bert, "embeddings"):
            on_output(bert.embeddings, lambda out: put(bert__embeddings=first(out)))
        for i, layer in enumerate(getattr(getattr(bert, "encoder", None), "layer", [])):
            on_output(layer, lambda out, i=i: store.__setitem__(f"bert.layer{i}", first(out)))
        on_output(bert, lambda out: put(bert__last_hidden_state=out.last_hidden_state))
        on_output(self.text_proj, lambda out: put(text_proj=out))
        prompt = self.sam_prompt_encoder
        on_output(prompt.description_pe, lambda out: put(description_pe=out))
        on_output(prompt.pe_layer, lambda out: put(dense_pe=out))

        # fusion
        fusion = self.description_transformer
        on_input(fusion, lambda a: put(fusion__in_text=a["text"], fusion__in_text_pe=a["text_pe"],
                                       fusion__in_image=a["image"]))
        on_output(fusion, lambda out: put(fusion__out_text=out[0], fusion__out_image=out[1],
                                          fusion__out_cls=out[0][:, :1]))
        for i, layer in enumerate(fusion.layers):
            on_output(layer, lambda out, i=i: store.update({f"fusion.layer{i}.text": out[0],
                                                            f"fusion.layer{i}.image": out[1]}))

        # prompt encoder and decoder
        on_output(prompt, lambda out: put(prompt__sparse=out[0], prompt__dense=out[1]))
        on_input(dec.transformer, lambda a: put(decoder__src_in=a["image_embedding"],
                                                decoder__tokens_in=a["point_embedding"]))
        on_output(dec.transformer, lambda out: put(decoder__transformer__hs=out[0],
                                                   decoder__transformer__src=out[1]))
        on_output(dec.output_upscaling[-1], lambda out: put(decoder__upscaled=out))
        for i, mlp in enumerate(dec.output_hypernetworks_mlps):
            on_output(mlp, lambda out, i=i: store.__setitem__(f"decoder.hyper_in{i}", out))
        on_output(dec, lambda out: put(
            decoder__all_masks=out.masks, decoder__all_iou_pred=out.iou_pred,
            decoder__all_mask_tokens_out=out.mask_tokens_out, decoder__masks=out.masks[:, :1],
            decoder__iou_pred=out.iou_pred[:, :1], decoder__sam_tokens_out=out.mask_tokens_out[:, :1],
            decoder__object_score_logits=out.object_score_logits,
        ))
        on_input(dec, lambda a: put(decoder__feat_s0=a["high_res_features"][0],
                                    decoder__feat_s1=a["high_res_features"][1]))

        # final outputs (hooked on forward(); a direct decode() call records everything but heads.*)
        def heads(out: RSAMOutput) -> None:
            put(heads__low_res_masks=out.low_res_logits, heads__high_res_masks=out.logits,
                heads__ious=out.iou_pred, heads__object_score_logits=out.object_score_logits)
        on_output(self, heads)
        try:
            yield store
        finally:
            for h in handles:
                h.remove()
