"""Text encoder: a Hugging Face ``BertModel`` without pooler, and the rules for freezing it.

RSAM encodes each expression with BERT and uses the last hidden state of every token (the ``[CLS]`` token
ends up steering the mask decoder after the fusion). Parameter names are those of
``BertModel(add_pooling_layer=False)``, which are also the official RSAM names under ``text_encoder.``.

Weights never come from the model hub here: :func:`build_bert` builds a randomly initialised model from a
config and the checkpoint loader (``rsam.build``) fills it from a local file.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Union

from torch import nn
from transformers import BertConfig, BertModel

from rsam.json_files import read_json_object

__all__ = ["build_bert", "freeze_module", "read_bert_config"]

# Keys of a BERT config.json that describe the file rather than the architecture.
_NON_ARCH_KEYS = ("model_type", "architectures", "transformers_version", "_name_or_path")


def build_bert(config_path: Optional[str] = None, attn_implementation: str = "sdpa", **config: Any) -> BertModel:
    """Build ``BertModel(BertConfig(...), add_pooling_layer=False)`` with random weights.

    Args:
        config_path: optional path of a BERT ``config.json``; keyword arguments override its entries.
        attn_implementation: ``"sdpa"`` (default) or ``"eager"``.
        **config: ``BertConfig`` fields (vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
            intermediate_size, max_position_embeddings, type_vocab_size, layer_norm_eps, hidden_act, ...).
    """
    values = read_bert_config(config_path) if config_path is not None else {}
    values.update(config)
    for key in _NON_ARCH_KEYS:
        values.pop(key, None)
    hidden, heads = values.get("hidden_size", 768), values.get("num_attention_heads", 12)
    if hidden % heads != 0:
        raise ValueError(f"build_bert: hidden_size ({hidden}) must be divisible by num_attention_heads ({heads})")
    bert_config = BertConfig(**values)
    bert_config._attn_implementation = attn_implementation
    return BertModel(bert_config, add_pooling_layer=False)


def read_bert_config(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """The entries of a BERT ``config.json``; a missing file or bad JSON is an error naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"BERT config {path} does not exist")
    return read_json_object(path)


def freeze_module(module: nn.Module) -> nn.Module:
    """Freeze ``module`` in place: no parameter requires grad, and it is switched to eval mode.

    Eval mode matters as much as ``requires_grad``: a frozen BERT left in train mode keeps its dropout active
    and so feeds noise into training (docs/official_differences.md, B7). The owner must keep it in eval mode when it is itself
    put back into train mode (see ``RSAM.train``) and should run it under ``torch.no_grad()``.
    """
    module.requires_grad_(False)
    module.eval()
    return module
