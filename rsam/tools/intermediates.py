"""Named intermediate tensors of an RSAM forward pass, for comparing against the official implementation.

    with capture_intermediates(model) as store:
        features = model.encode_image(images, normalized=True)
        out = model.decode(features, expr_to_image, input_ids, attention_mask)
        record_heads(store, out)

Forward hooks only: the model's code is the same with and without capture. Names follow the official-model
reference files (``bert.*``, ``text_proj``, ``description_pe``, ``dense_pe``, ``fusion.*``, ``prompt.*``,
``decoder.*``, ``conv_s0/1``, ``image_encoder.*``, ``trunk.*``, ``neck.*``, ``heads.*``); ``description_pe`` is
(L, d) and ``dense_pe`` (d, h, w), as computed. Tensors are stored as produced (not cloned); a later forward
overwrites them.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Dict, Iterator

import torch
from torch import nn

__all__ = ["capture_intermediates", "record_heads"]

Store = Dict[str, torch.Tensor]


def _first(x):
    """transformers layers return a tensor or a tuple whose first entry is the hidden state."""
    return x[0] if isinstance(x, (tuple, list)) else x


class _Hooks:
    """Registers hooks that write into ``store``; ``remove`` takes them all off again."""

    def __init__(self, store: Store):
        self.store = store
        self.handles = []

    def output(self, module: nn.Module, record: Callable) -> None:
        self.handles.append(module.register_forward_hook(lambda m, args, out: record(out)))

    def inputs(self, module: nn.Module, record: Callable) -> None:
        signature = inspect.signature(module.forward)

        def pre_hook(m, args, kwargs):
            record(signature.bind(*args, **kwargs).arguments)

        self.handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))

    def put(self, **named: torch.Tensor) -> None:
        """``put(a__b=t)`` stores ``t`` as ``"a.b"``."""
        self.store.update({k.replace("__", "."): v for k, v in named.items()})

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _image_encoder(h: _Hooks, encoder: nn.Module) -> None:
    trunk, neck = getattr(encoder, "trunk", None), getattr(encoder, "neck", None)
    if trunk is not None:
        h.output(trunk, lambda out: h.store.update({f"trunk.stage{i}": t for i, t in enumerate(out)}))
        for i, block in enumerate(getattr(trunk, "blocks", [])):
            h.output(block, lambda out, i=i: h.store.__setitem__(f"trunk.block{i}", out))
    if neck is not None:
        def neck_out(out):
            feats, pos = out
            h.store.update({f"neck.fpn{i}": t for i, t in enumerate(feats)})
            h.store.update({f"neck.pos{i}": t for i, t in enumerate(pos)})
        h.output(neck, neck_out)

    def encoder_out(out):
        h.store.update({f"image_encoder.backbone_fpn{i}": t for i, t in enumerate(out["backbone_fpn"])})
        h.store.update({f"image_encoder.vision_pos_enc{i}": t for i, t in enumerate(out["vision_pos_enc"])})
        h.store["image_encoder.vision_features"] = out["vision_features"]
    h.output(encoder, encoder_out)


def _text(h: _Hooks, model: nn.Module) -> None:
    bert = model.text_encoder
    if hasattr(bert, "embeddings"):
        h.output(bert.embeddings, lambda out: h.put(bert__embeddings=_first(out)))
    for i, layer in enumerate(getattr(getattr(bert, "encoder", None), "layer", [])):
        h.output(layer, lambda out, i=i: h.store.__setitem__(f"bert.layer{i}", _first(out)))
    h.output(bert, lambda out: h.put(bert__last_hidden_state=out.last_hidden_state))
    h.output(model.text_proj, lambda out: h.put(text_proj=out))
    prompt = model.sam_prompt_encoder
    h.output(prompt.description_pe, lambda out: h.put(description_pe=out))
    h.output(prompt.pe_layer, lambda out: h.put(dense_pe=out))


def _fusion(h: _Hooks, fusion: nn.Module) -> None:
    h.inputs(fusion, lambda a: h.put(fusion__in_text=a["text"], fusion__in_text_pe=a["text_pe"],
                                     fusion__in_image=a["image"]))
    h.output(fusion, lambda out: h.put(fusion__out_text=out[0], fusion__out_image=out[1],
                                       fusion__out_cls=out[0][:, :1]))
    for i, layer in enumerate(fusion.layers):
        h.output(layer, lambda out, i=i: h.store.update({f"fusion.layer{i}.text": out[0],
                                                         f"fusion.layer{i}.image": out[1]}))


def _decoder(h: _Hooks, model: nn.Module) -> None:
    dec = model.sam_mask_decoder
    h.output(dec.conv_s0, lambda out: h.put(conv_s0=out))
    h.output(dec.conv_s1, lambda out: h.put(conv_s1=out))
    h.output(model.sam_prompt_encoder, lambda out: h.put(prompt__sparse=out[0], prompt__dense=out[1]))
    h.inputs(dec.transformer, lambda a: h.put(decoder__src_in=a["image_embedding"],
                                              decoder__tokens_in=a["point_embedding"]))
    h.output(dec.transformer, lambda out: h.put(decoder__transformer__hs=out[0], decoder__transformer__src=out[1]))
    h.output(dec.output_upscaling[-1], lambda out: h.put(decoder__upscaled=out))
    for i, mlp in enumerate(dec.output_hypernetworks_mlps):
        h.output(mlp, lambda out, i=i: h.store.__setitem__(f"decoder.hyper_in{i}", out))
    h.output(dec, lambda out: h.put(
        decoder__all_masks=out.masks, decoder__all_iou_pred=out.iou_pred,
        decoder__all_mask_tokens_out=out.mask_tokens_out, decoder__masks=out.masks[:, :1],
        decoder__iou_pred=out.iou_pred[:, :1], decoder__sam_tokens_out=out.mask_tokens_out[:, :1],
        decoder__object_score_logits=out.object_score_logits,
    ))
    h.inputs(dec, lambda a: h.put(decoder__feat_s0=a["high_res_features"][0],
                                  decoder__feat_s1=a["high_res_features"][1]))


@contextlib.contextmanager
def capture_intermediates(model: nn.Module) -> Iterator[Store]:
    """Record the named intermediate tensors of every forward of ``model`` (an RSAM) inside the block."""
    store: Store = {}
    hooks = _Hooks(store)
    _image_encoder(hooks, model.image_encoder)
    _text(hooks, model)
    _fusion(hooks, model.description_transformer)
    _decoder(hooks, model)
    try:
        yield store
    finally:
        hooks.remove()


def record_heads(store: Store, out) -> None:
    """Add the final outputs (an ``RSAMOutput``) under the reference names ``heads.*``."""
    store.update({"heads.low_res_masks": out.low_res_logits, "heads.high_res_masks": out.logits,
                  "heads.ious": out.iou_pred, "heads.object_score_logits": out.object_score_logits})
