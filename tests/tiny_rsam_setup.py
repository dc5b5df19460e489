"""Shared set-up of the tests that need a model: a tiny random RSAM checkpoint in our format, a word
vocabulary for the tokenizer and a small synthetic RISORS split (everything written under a tmp folder)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence, Tuple

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "rsam_tiny_cpu.yaml"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BASE_WORDS = ("the a of at on in to left right top bottom center red white blue yellow green ship airplane "
              "vehicle building storage tank largest smallest second first third above below").split()


def write_vocab(path: Path, words: Iterable[str] = ()) -> Path:
    """A BERT-style vocab.txt: special tokens, then the words (ids stay far below the tiny BERT's 30522)."""
    vocab = SPECIALS + sorted(set(BASE_WORDS) | {w.lower() for w in words})
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return path


def tiny_config(overrides: Sequence[str] = ()) -> dict:
    """configs/rsam_tiny_cpu.yaml composed with ``overrides``, resolved to a plain dict."""
    from rsam.config import compose_config as _compose_yaml

    return OmegaConf.to_container(_compose_yaml(TINY_CONFIG, list(overrides)), resolve=True)


def make_checkpoint(path: Path, config: dict, object_bias: float = 4.0, mask_scale: float = 40.0,
                    seed: int = 0) -> Path:
    """A randomly initialised model of ``config`` saved in our checkpoint format.

    ``object_bias`` is added to the object-score head's last bias so that masks are not all gated (> 0) or
    are all gated (< 0): a random head sits around 0. ``mask_scale`` multiplies the mask logits (through the
    hyper-network's last layer): random logits are within +-0.2, which neither metric threshold would cut
    into an interesting mask.
    """
    from rsam.build import build_rsam, model_config

    torch.manual_seed(seed)
    model = build_rsam(model_config(config))
    with torch.no_grad():
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias += object_bias
        model.sam_mask_decoder.output_hypernetworks_mlps[0].layers[-1].weight *= mask_scale
        model.sam_mask_decoder.output_hypernetworks_mlps[0].layers[-1].bias *= mask_scale
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 1, "step": 10, "best": {}, "rng": [],
                "config": config}, path)
    return path


def tiny_checkpoint(folder: Path, name: str = "tiny.pt") -> Tuple[Path, dict, Path]:
    """The usual trio under ``folder``: vocab.txt, the 64 px tiny config reading it, and its random checkpoint
    ``name`` (default head offsets) -> (vocab, config, checkpoint)."""
    vocab = write_vocab(folder / "vocab.txt")
    config = tiny_config(["scratch.resolution=64", f"scratch.vocab={vocab}"])
    return vocab, config, make_checkpoint(folder / name, config)
