"""BERT WordPiece tokenisation of referring expressions.

Two modes:

* ``official``: ``[CLS]`` + word pieces, **no** ``[SEP]``, right-padded with 0 to the longest expression of
  the call, never truncated. This is what the official RSAM code feeds BERT (docs/official_differences.md, B5)
  and what its checkpoints were trained with; it reproduces ``tests/reference/golden_tokenizer.json`` exactly.
* ``standard``: ``[CLS]`` + word pieces + ``[SEP]``, truncated to ``max_tokens`` (the ``[SEP]`` is kept),
  right-padded to the longest expression of the call. This is how BERT was pre-trained.

The word pieces come from a ``transformers`` fast BERT tokenizer (Rust ``tokenizers`` underneath) built from a
``vocab.txt`` or a Hugging Face tokenizer directory on disk; nothing is fetched from the hub.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import List, Mapping, NamedTuple, Optional, Sequence

import torch
from iopath.common.file_io import g_pathmgr

from rsam.errors import UserError
from rsam.json_files import read_json_object

MODES = ("official", "standard")

log = logging.getLogger(__name__)


class TokenizedText(NamedTuple):
    """input_ids / attention_mask: (N, L) long, right-padded; attention_mask is 1 on real tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def _count_vocab_lines(vocab_file: str) -> int:
    with open(vocab_file, "r", encoding="utf-8") as f:
        return sum(1 for _ in f)


def _fast_bert_from_vocab(vocab_file: str, lower_case: bool):
    """A transformers fast BERT tokenizer whose vocabulary really is ``vocab_file``.

    transformers 5.x takes the file through ``vocab=`` and silently ignores ``vocab_file=`` (it then builds an
    empty vocabulary and maps every word to id 1); 4.x is the other way round. We try both and keep the one whose
    vocabulary has one entry per line of the file.
    """
    from transformers import BertTokenizerFast

    expected = _count_vocab_lines(vocab_file)
    for keyword in ("vocab", "vocab_file"):
        try:
            tok = BertTokenizerFast(**{keyword: vocab_file}, do_lower_case=lower_case)
        except (TypeError, ValueError, OSError):
            continue
        if len(tok.get_vocab()) == expected:
            return tok
    raise RuntimeError(
        f"{vocab_file}: could not build a BERT fast tokenizer with its {expected} entries "
        "(transformers ignored the vocabulary file)"
    )


def load_bert_tokenizer(path: str):
    """Build a fast BERT tokenizer from a ``vocab.txt`` file or a local HF tokenizer directory (any iopath URI)."""
    local = g_pathmgr.get_local_path(path) if not os.path.isdir(path) else path
    if os.path.isdir(local):
        lower_case = True
        config_path = os.path.join(local, "tokenizer_config.json")
        if os.path.isfile(config_path):
            config = read_json_object(config_path)
            lower_case = bool(config.get("do_lower_case", True))
        vocab_file = os.path.join(local, "vocab.txt")
        if os.path.isfile(vocab_file):
            # Prefer vocab.txt: it is what the official (slow) tokenizer reads.
            return _fast_bert_from_vocab(vocab_file, lower_case)
        if os.path.isfile(os.path.join(local, "tokenizer.json")):
            from transformers import BertTokenizerFast

            return BertTokenizerFast.from_pretrained(local, local_files_only=True)
        raise FileNotFoundError(f"{path}: tokenizer directory has neither vocab.txt nor tokenizer.json")
    if not os.path.isfile(local):
        raise FileNotFoundError(f"{path}: tokenizer vocabulary file not found")
    return _fast_bert_from_vocab(local, lower_case=True)


class RSAMTokenizer:
    """Referring-expression tokenizer with the ``official`` and ``standard`` conventions (see module doc).

    Args:
        vocab: path to a BERT ``vocab.txt`` or to a local Hugging Face tokenizer directory.
        mode: ``"official"`` or ``"standard"``.
        max_tokens: length cap (including ``[CLS]`` and ``[SEP]``) in ``standard`` mode; ignored in ``official``
            mode, exactly like the official code where it has no effect.
    """

    def __init__(self, vocab: str, mode: str = "official", max_tokens: int = 47):
        if mode not in MODES:
            raise UserError(f"tokenizer mode must be one of {MODES}, got {mode!r}")
        if mode == "standard" and max_tokens < 2:
            raise UserError(f"max_tokens must be >= 2 in standard mode (room for [CLS] and [SEP]), got {max_tokens}")
        self.vocab_path = vocab
        self.mode = mode
        self.max_tokens = max_tokens
        self.hf_tokenizer = load_bert_tokenizer(vocab)
        self.cls_id = self._special_id("[CLS]")
        self.sep_id = self._special_id("[SEP]")
        self.pad_id = self._special_id("[PAD]")

    def _special_id(self, token: str) -> int:
        idx = self.hf_tokenizer.convert_tokens_to_ids(token)
        if idx is None or (idx == self.hf_tokenizer.unk_token_id and token != "[UNK]"):
            raise UserError(f"{self.vocab_path}: vocabulary has no {token} token")
        return int(idx)

    @property
    def vocab_size(self) -> int:
        return len(self.hf_tokenizer.get_vocab())

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Token ids of each text with the mode's special tokens, unpadded."""
        if len(texts) == 0:
            return []
        pieces = self.hf_tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        if self.mode == "official":
            return [[self.cls_id] + p for p in pieces]
        keep = self.max_tokens - 2
        return [[self.cls_id] + p[:keep] + [self.sep_id] for p in pieces]

    def encode(self, text: str) -> List[int]:
        return self.encode_batch([text])[0]

    def __call__(self, texts: Sequence[str]) -> TokenizedText:
        """Tokenise N texts -> input_ids, attention_mask (N, L) long, L = longest sequence of the call."""
        ids = self.encode_batch(texts)
        length = max((len(x) for x in ids), default=1)
        input_ids = torch.full((len(ids), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
        for i, seq in enumerate(ids):
            input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention_mask[i, : len(seq)] = 1
        return TokenizedText(input_ids, attention_mask)

    def __repr__(self) -> str:
        return f"RSAMTokenizer(vocab={self.vocab_path!r}, mode={self.mode!r}, max_tokens={self.max_tokens})"


def _resolve_vocab(vocab: str, checkpoint: Optional[Path]) -> str:
    """A relative vocabulary path from a stored config is relative to the training run's working directory,
    which is unknown here: try the current directory, then the checkpoint's folder and its parents."""
    if os.path.isabs(vocab) or "://" in vocab:
        return vocab
    tried = [Path.cwd() / vocab]
    if checkpoint is not None:
        for parent in list(checkpoint.resolve().parents)[:4]:
            tried.append(parent / vocab)
    for candidate in tried:
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError(
        f"tokenizer vocabulary {vocab!r} (tokenizer.vocab of the config) not found; tried "
        + ", ".join(str(t) for t in tried) + ". Pass vocab=<path to vocab.txt> (rsam-predict --vocab)")


def tokenizer_from_config(cfg: Mapping, vocab: Optional[str] = None,
                          checkpoint: Optional[os.PathLike] = None) -> RSAMTokenizer:
    """The ``tokenizer:`` node of a (plain, resolved) config as an :class:`RSAMTokenizer`.

    ``vocab`` replaces the node's vocabulary path; a relative stored path is also looked up next to
    ``checkpoint``. A config without a tokenizer node (e.g. one written for an official checkpoint) gets the
    official convention (``[CLS]`` + word pieces, no ``[SEP]``) with ``vocab``.
    """
    node = dict(cfg.get("tokenizer") or {})
    node.pop("_target_", None)
    if vocab is None and not node.get("vocab"):
        raise UserError("the config has no tokenizer.vocab; pass vocab=<path to the BERT vocab.txt>")
    if not node:
        log.warning("the config has no `tokenizer:` node: using the official tokenizer convention with %s", vocab)
        node = {"mode": "official"}
    where = Path(checkpoint).expanduser() if checkpoint is not None else None
    node["vocab"] = vocab if vocab is not None else _resolve_vocab(str(node["vocab"]), where)
    try:
        return RSAMTokenizer(**node)
    except TypeError as exc:
        raise UserError(f"config tokenizer node {node}: {exc}") from None
